"""Parity of the JAX Wan DiT with diffusers' WanTransformer3DModel (the PyTorch reference).

Precision reference: diffusers in float32 on CPU (its residual stream, norms, time MLP and
modulation are float32 there, as in the original Wan code); asd_jax in float32 on CPU. The weights go
through the converter's own code path (`asd_jax.convert.wan.convert`, what the CLI runs) and are
loaded back with `asd_jax.pretrained.load`. Reached on these configs: 1e-6 to 2.3e-6 absolute on
outputs of magnitude ~2.5 (tolerance below: 1e-5 absolute plus 1e-5 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from asd_jax import pretrained  # noqa: E402
from asd_jax.convert import wan as convert_wan  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5

CONFIGS = {
    # WAN.md's tiny model: head_dim 20 gives an 8/6/6 RoPE split.
    "head_dim20": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=20,
                       in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                       num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                       rope_max_seq_len=32),
    # Three heads of 16 (8/4/4 split), three layers, no cross-attention norm, 16 channels.
    "heads3_nonorm": dict(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16,
                          in_channels=16, out_channels=16, text_dim=24, freq_dim=64, ffn_dim=40,
                          num_layers=3, cross_attn_norm=False, qk_norm="rms_norm_across_heads",
                          rope_max_seq_len=64),
}


def _reference(name: str, seed: int = 0):
  torch.manual_seed(seed)
  model = diffusers.WanTransformer3DModel(**CONFIGS[name]).eval()
  with torch.no_grad():  # make every norm weight and modulation table non-trivial
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "scale_shift_table" in pname or pname.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
  name = request.param
  model = _reference(name)
  root = tmp_path_factory.mktemp(name)
  model.save_pretrained(root / "diffusers")
  convert_wan.convert(root / "diffusers", root / "jax")
  module, params = pretrained.load(root / "jax")
  return name, model, module, params


def _run_both(model, module, params, x, t_torch, t_jax, ctx):
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t_torch), torch.from_numpy(ctx),
                return_dict=False)[0].numpy()
  fwd = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
  out = fwd(params, jnp.asarray(x.transpose(0, 2, 3, 4, 1)), jnp.asarray(t_jax), jnp.asarray(ctx))
  return ref, np.asarray(out).transpose(0, 4, 1, 2, 3)


def test_converted_config_matches_the_reference(converted):
  name, model, module, _ = converted
  cfg, ref = module.config, CONFIGS[name]
  assert cfg.num_heads == ref["num_attention_heads"]
  assert cfg.dim == ref["num_attention_heads"] * ref["attention_head_dim"]
  assert (cfg.ffn_dim, cfg.num_layers, cfg.text_dim, cfg.freq_dim) == (
      ref["ffn_dim"], ref["num_layers"], ref["text_dim"], ref["freq_dim"])
  assert (cfg.in_channels, cfg.out_channels, cfg.cross_attn_norm) == (
      ref["in_channels"], ref["out_channels"], ref["cross_attn_norm"])


@pytest.mark.parametrize("batch,frames,height,width", [(2, 5, 6, 8), (1, 3, 4, 10)])
def test_forward_matches_diffusers_per_frame_timesteps(converted, batch, frames, height, width):
  _, model, module, params = converted
  cfg = module.config
  rng = np.random.default_rng(1)
  x = rng.standard_normal((batch, cfg.in_channels, frames, height, width), dtype=np.float32)
  ctx = rng.standard_normal((batch, 11, cfg.text_dim), dtype=np.float32)
  # Different, fractional timesteps per frame (the causal model's [B, F] form); diffusers takes them
  # per token.
  base = np.array([1000.0, 937.5, 833.3333, 625.0, 20.25, 0.0, 999.9], np.float32)
  t_frame = np.stack([np.roll(base, i)[:frames] for i in range(batch)])
  t_token = np.repeat(t_frame, (height // 2) * (width // 2), axis=1)
  ref, out = _run_both(model, module, params, x, t_token, t_frame, ctx)
  err = float(np.abs(out - ref).max())
  print(f"max abs error {err:.2e} (output scale {np.abs(ref).max():.2f})")
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)


def test_forward_matches_diffusers_one_timestep_per_sample(converted):
  _, model, module, params = converted
  cfg = module.config
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, cfg.in_channels, 5, 6, 8), dtype=np.float32)
  ctx = rng.standard_normal((2, 512, cfg.text_dim), dtype=np.float32)
  ctx[:, 20:] = 0.0  # zero-padded text like Wan's: the padding positions are attended, not masked
  t = np.array([937.5, 17.25], np.float32)
  ref, out = _run_both(model, module, params, x, t, t, ctx)
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
