"""A training export written back with `python -m asd_jax.convert export-wan` loads into diffusers'
WanTransformer3DModel (diffusers' own original-key conversion, strict key matching) and runs the
same forward as the JAX model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from asd_jax.models import wan
from asd_jax.train.loop import export_generator

# A tiny architecture diffusers can express (rope_max_len and qk_norm as Wan 2.1's).
CFG = wan.WanConfig(dim=40, ffn_dim=32, num_heads=2, num_layers=2, freq_dim=32, text_dim=16,
                    in_channels=4, out_channels=4, rope_max_len=32)


@pytest.mark.slow  # a diffusers import, an orbax export and two forwards: ~100 s on a busy 2-core box
def test_export_wan_loads_into_diffusers_strictly_and_runs_the_same_forward(tmp_path):
  from diffusers import WanTransformer3DModel  # pylint: disable=g-import-not-at-top
  from diffusers.loaders.single_file_utils import (  # pylint: disable=g-import-not-at-top
      convert_wan_transformer_to_diffusers)
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  from asd_jax.convert.__main__ import main  # pylint: disable=g-import-not-at-top

  # Parameters drawn in JAX (nothing comes from PyTorch), nudged off their init values so that
  # zero-initialised leaves (biases, modulation) are checked too; written as the trainer writes.
  params = wan.init_params(CFG, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  export_generator(params, CFG, tmp_path / "export", {"stage": "test"})
  assert main(["export-wan", f"--src={tmp_path / 'export'}",
               f"--dst={tmp_path / 'wan.safetensors'}", "--quiet"]) == 0

  original = load_file(tmp_path / "wan.safetensors")
  model = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=CFG.num_heads,
      attention_head_dim=CFG.dim // CFG.num_heads, in_channels=CFG.in_channels,
      out_channels=CFG.out_channels, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
      ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers, cross_attn_norm=True,
      qk_norm="rms_norm_across_heads", rope_max_seq_len=CFG.rope_max_len).eval()
  converted = convert_wan_transformer_to_diffusers(dict(original))
  result = model.load_state_dict(converted, strict=True)  # raises on a missing/unexpected key
  assert not result.missing_keys and not result.unexpected_keys

  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 2, 4, 6)).astype(np.float32)  # [B, C, F, H, W] for torch
  t = np.array([625.0], np.float32)
  ctx = rng.standard_normal((1, 8, CFG.text_dim)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                return_dict=False)[0].numpy()
  v = wan.WanModel(CFG).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 4, 1)),
                              jnp.asarray(t), jnp.asarray(ctx))
  v = np.asarray(v).transpose(0, 4, 1, 2, 3)
  assert float(np.max(np.abs(ref))) > 0.1  # a forward with something to compare
  np.testing.assert_allclose(v, ref, atol=1e-5, rtol=0)
  # The check has power: one swapped tensor moves the output far past the tolerance.
  swapped = dict(converted)
  a, b = "blocks.0.attn1.to_q.weight", "blocks.0.attn1.to_k.weight"
  swapped[a], swapped[b] = converted[b], converted[a]
  model.load_state_dict(swapped, strict=True)
  with torch.no_grad():
    wrong = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                  return_dict=False)[0].numpy()
  assert float(np.max(np.abs(wrong - v))) > 1e-3
