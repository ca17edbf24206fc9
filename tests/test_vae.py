"""The Wan 2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming decoding, the converter.

Precision reference: diffusers' AutoencoderKLWan in float32 on CPU, built tiny and random here
(WAN.md's tiny config with every gamma, bias and the latent statistics perturbed, and the decoder's
output conv scaled x4 so that the clamp to [-1, 1] is active on ~9% of the values), saved with
save_pretrained and converted through the CLI code path. asd_jax runs in float32 on CPU under
jax.jit. diffusers does not normalise latents, so (mu - mean) / std and z * std + mean are applied
by hand on its side.
Reached: encode 4.5e-7 absolute on latents of magnitude ~2 (tolerance 1e-5 absolute); decode
4.5e-6 absolute on frames in [-1, 1] (tolerance 2e-5 absolute plus 1e-5 relative; the x4 output
conv scales the float32 rounding up by as much). A second random config (channel changes, two
residual blocks, another temporal pattern; one-pass encode) reaches 1.2e-7 and 1.7e-6. The
streaming decoder equals the full decode to 4.9e-6 with chunks of 3 latent frames and exactly with
chunks of 1 (tolerance 2e-5).
"""

import contextlib
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from asd_jax import pretrained  # noqa: E402
from asd_jax.convert import __main__ as cli  # noqa: E402
from asd_jax.convert import vae as cv  # noqa: E402
from asd_jax.convert.common import ConversionError  # noqa: E402
from asd_jax.io import orbax_io  # noqa: E402
from asd_jax.models import vae  # noqa: E402
from tiny_parts import ShapeReader  # noqa: E402  (tests/ helper)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ENC_ATOL = 1e-5  # reached 4.5e-7 on latents of magnitude ~2
ATOL, RTOL = 2e-5, 1e-5  # decode: reached 4.5e-6 (the x4 output conv scales the rounding up)
CHUNK_ATOL = 2e-5  # the same network on other chunkings: reached 4.9e-6 (chunks of 1: exact)
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True])
MEAN, STD = [0.3, -0.5, 0.1, 0.0], [1.5, 0.5, 2.0, 1.0]


def _listing(folder):
  return sorted(p.name for p in Path(folder).iterdir())


def _diffusers_to_original(name: str, num_res_blocks: int) -> str:
  """WAN.md's renaming rules, written out independently of the converter's tables."""
  r = num_res_blocks

  def up(m):
    i, kind, j = int(m.group(1)), m.group(2), int(m.group(3))
    return f"decoder.upsamples.{i * (r + 2) + (j if kind == 'resnets' else r + 1)}."
  name = re.sub(r"^quant_conv\.", "conv1.", name)
  name = re.sub(r"^post_quant_conv\.", "conv2.", name)
  name = re.sub(r"^(encoder|decoder)\.conv_in\.", r"\1.conv1.", name)
  name = re.sub(r"^(encoder|decoder)\.norm_out\.gamma", r"\1.head.0.gamma", name)
  name = re.sub(r"^(encoder|decoder)\.conv_out\.", r"\1.head.2.", name)
  name = re.sub(r"mid_block\.resnets\.0\.", "middle.0.", name)
  name = re.sub(r"mid_block\.attentions\.0\.", "middle.1.", name)
  name = re.sub(r"mid_block\.resnets\.1\.", "middle.2.", name)
  name = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", name)
  name = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.", up, name)
  for d, o in (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."),
               ("norm2.gamma", "residual.3.gamma"), ("conv2.", "residual.6."),
               ("conv_shortcut.", "shortcut.")):
    name = re.sub(rf"^((?:en|de)coder\.(?:downsamples|upsamples|middle)\.\d+\.){re.escape(d)}",
                  rf"\g<1>{o}", name)
  return name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Tiny random AutoencoderKLWan, saved with save_pretrained and converted by the CLI code."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(**TINY, latents_mean=MEAN, latents_std=STD).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
    model.decoder.conv_out.weight.mul_(4.0)  # outputs beyond [-1, 1]: the clamp matters
  root = tmp_path_factory.mktemp("vae")
  model.save_pretrained(root / "diffusers")
  assert cli.main(["vae", f"--src={root / 'diffusers'}", f"--dst={root / 'jax'}", "--quiet"]) == 0
  module, params = pretrained.load(root / "jax")
  return model, root, module, params


@contextlib.contextmanager
def _torch_cpu():
  """No grad, and no oneDNN: its per-shape set-up makes these tiny convs ~20x slower."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
      yield


def _encode_ref(model, video_BCTHW):
  with _torch_cpu():
    mu = model.encode(torch.from_numpy(video_BCTHW)).latent_dist.mode().numpy()
  return (mu - np.reshape(MEAN, (1, -1, 1, 1, 1))) / np.reshape(STD, (1, -1, 1, 1, 1))


def _decode_ref(model, latents_BCFHW):
  z = latents_BCFHW * np.reshape(STD, (1, -1, 1, 1, 1)) + np.reshape(MEAN, (1, -1, 1, 1, 1))
  with _torch_cpu():
    return model.decode(torch.from_numpy(z.astype(np.float32))).sample.numpy()


_encode = jax.jit(lambda m, p, v: m.apply({"params": p}, v, method="encode"), static_argnums=0)
_decode = jax.jit(lambda m, p, z: m.apply({"params": p}, z, method="decode"), static_argnums=0)


# ----------------------------------------------------------------------------------------------
# Parity with diffusers.


def test_converted_config(reference):
  _, root, module, _ = reference
  meta = json.loads((root / "jax" / "config.json").read_text())
  assert meta["kind"] == "vae" and meta["source"]["naming"] == "diffusers"
  assert vae.VAEConfig.from_dict(meta["config"]) == module.config
  assert module.config == vae.VAEConfig.preset("tiny", latents_mean=MEAN, latents_std=STD)
  assert _listing(root) == ["diffusers", "jax"]


# Shared shapes keep the number of compiles (the slow part on CPU) small.
VIDEO_SHAPE = (2, 13, 16, 24, 3)  # [B, T, H, W, 3] -> latents [2, 4, 2, 3, 4]
LATENT_SHAPE = (2, 9, 2, 3, 4)  # [B, F, h, w, z] -> video [2, 33, 16, 24, 3]


@pytest.fixture(scope="module")
def video():
  return np.random.default_rng(0).uniform(-1, 1, VIDEO_SHAPE).astype(np.float32)


@pytest.fixture(scope="module")
def latents():
  return np.random.default_rng(1).standard_normal(LATENT_SHAPE).astype(np.float32)


def test_encode_matches_diffusers(reference, video):
  model, _, module, params = reference
  want = _encode_ref(model, video.transpose(0, 4, 1, 2, 3))
  got = _encode(module, params, jnp.asarray(video))
  assert got.shape == (2, 4, 2, 3, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got).transpose(0, 4, 1, 2, 3), want, atol=ENC_ATOL,
                             rtol=0)


def test_decode_matches_diffusers(reference, latents):
  model, _, module, params = reference
  want = _decode_ref(model, latents.transpose(0, 4, 1, 2, 3))
  assert 0.02 < np.mean(np.abs(want) == 1.0) < 0.98  # the clamp is active
  got = _decode(module, params, jnp.asarray(latents))
  assert got.shape == (2, 33, 16, 24, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got).transpose(0, 4, 1, 2, 3), want, atol=ATOL, rtol=RTOL)


def test_parity_with_channel_changes_and_another_temporal_pattern():
  """Shortcut convs in encoder and decoder, two residual blocks, uneven widths, temporal
  downsampling in the first stage; in-memory conversion, one-pass encode, decode with a remainder
  chunk."""
  torch.manual_seed(1)
  config = dict(base_dim=4, z_dim=6, dim_mult=[1, 2, 3, 2], num_res_blocks=2,
                temperal_downsample=[True, False, True], latents_mean=[0.1] * 6,
                latents_std=[0.7] * 6)
  model = diffusers.AutoencoderKLWan(**config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  cfg, params = cv.state_dict_to_params(model.state_dict(), config_json=dict(model.config))
  assert (cfg.dim_mult, cfg.num_res_blocks, cfg.temporal_downsample) == (
      (1, 2, 3, 2), 2, (True, False, True))
  module = vae.WanVAE(cfg)
  video = np.random.default_rng(5).uniform(-1, 1, (1, 5, 16, 8, 3)).astype(np.float32)
  with _torch_cpu():
    mu = model.encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3))).latent_dist.mode()
    want_video = model.decode(mu).sample.numpy()
  want_z = (mu.numpy() - 0.1) / 0.7
  z = jax.jit(lambda p, v: module.apply({"params": p}, v, None, method="encode"))(params, video)
  np.testing.assert_allclose(np.asarray(z).transpose(0, 4, 1, 2, 3), want_z, atol=ENC_ATOL, rtol=0)
  # Two latent frames in steps of 2: the first frame, then a remainder of 1 (no scan).
  y = jax.jit(lambda p, x: module.apply({"params": p}, x, 2, method="decode"))(params, z)
  np.testing.assert_allclose(np.asarray(y).transpose(0, 4, 1, 2, 3), want_video, atol=ATOL,
                             rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# Streaming decoder.


def test_streaming_decode_equals_full_decode(reference, latents):
  _, _, module, params = reference
  z = jnp.asarray(latents)
  full = np.asarray(_decode(module, params, z))  # compared with diffusers above
  B, F, h, w, _ = latents.shape
  traces = []

  def chunk_fn(p, state, zc):
    traces.append(state.started)
    return module.apply({"params": p}, state, zc, method="decode_chunk")
  step = jax.jit(chunk_fn)

  # Chunks of 1 latent frame, one jitted call each.
  state = module.init_decode_state(B, h, w)
  out = []
  for start in range(F):
    frames, state = step(params, state, z[:, start:start + 1])
    assert frames.shape == (B, 1 if start == 0 else 4, 8 * h, 8 * w, 3)
    out.append(np.asarray(frames))
  assert traces == [False, True]  # the first chunk, then one trace for all 8 later chunks
  np.testing.assert_allclose(np.concatenate(out, axis=1), full, atol=CHUNK_ATOL, rtol=0)

  # Chunks of 3: the first its own call, the later ones under lax.scan with the state as carry.
  traces.clear()
  state = module.init_decode_state(B, h, w)
  first, state = step(params, state, z[:, :3])
  assert first.shape == (B, 9, 8 * h, 8 * w, 3)
  later = jnp.moveaxis(z[:, 3:].reshape(B, 2, 3, h, w, 4), 1, 0)  # [chunks, B, 3, h, w, z]
  scan = jax.jit(lambda p, s, zs: jax.lax.scan(lambda c, x: chunk_fn(p, c, x)[::-1], s, zs))
  state, frames = scan(params, state, later)
  assert traces == [False, True] and frames.shape == (2, B, 12, 8 * h, 8 * w, 3)
  frames = jnp.moveaxis(frames, 0, 1).reshape(B, 24, 8 * h, 8 * w, 3)
  np.testing.assert_allclose(np.concatenate([first, frames], axis=1), full, atol=CHUNK_ATOL,
                             rtol=0)


def test_decode_state_shapes_and_errors(reference):
  _, _, module, params = reference
  state = vae.WanVAE(module.config).init_decode_state(1, 2, 3)  # unbound: no params needed
  new = jax.eval_shape(lambda s, x: module.apply({"params": params}, s, x,
                                                 method="decode_chunk")[1],
                       state, jax.ShapeDtypeStruct((1, 3, 2, 3, 4), jnp.float32))
  assert new.started and not state.started
  assert jax.tree.structure(new.caches) == jax.tree.structure(state.caches)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), new.caches) == jax.tree.map(
      lambda a: (a.shape, a.dtype), state.caches)
  with pytest.raises(ValueError, match="decode state was made for"):
    jax.eval_shape(lambda s, x: module.apply({"params": params}, s, x, method="decode_chunk"),
                   state, jax.ShapeDtypeStruct((1, 1, 4, 3, 4), jnp.float32))


def test_bad_video_shapes_are_refused(reference):
  _, _, module, params = reference
  for shape in [(1, 8, 16, 16, 3), (1, 5, 12, 16, 3), (1, 5, 16, 16, 4)]:
    with pytest.raises(ValueError, match="video must be"):
      jax.eval_shape(lambda v: module.apply({"params": params}, v, method="encode"),
                     jax.ShapeDtypeStruct(shape, jnp.float32))


def test_bfloat16_compute_stays_close(reference, latents):
  _, root, module, params = reference
  module16, params16 = pretrained.load(root / "jax", dtype="bfloat16", param_dtype="bfloat16")
  assert {l.dtype for l in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
  z = jnp.asarray(latents)
  f32 = _decode(module, params, z)
  bf16 = jax.jit(lambda p, x: module16.apply({"params": p}, x, None, method="decode"))(params16, z)
  assert bf16.dtype == jnp.float32
  err = np.abs(np.asarray(bf16) - np.asarray(f32))
  assert err.mean() < 0.03 and err.max() < 0.3  # reached: 0.013 and 0.13


# ----------------------------------------------------------------------------------------------
# Converter: coverage of the real checkpoint, formats, bad inputs.


def test_real_key_list_and_diffusers_names_map_onto_the_preset():
  path = SHARED / "data" / "wan_keys" / "wan21_vae_keys.txt"
  if not path.is_file():
    pytest.skip(f"key list {path} is absent (the shared/ folder lives next to the repository)")
  shapes = {}
  for line in path.read_text().splitlines():
    if line.strip():
      key, shape = line.split("\t")
      shapes[key] = tuple(json.loads(shape))
  cfg = vae.VAEConfig.preset("wan2.1")
  leaves = orbax_io.flatten(vae.abstract_params(cfg))  # jax.eval_shape: nothing allocated
  plan = cv.make_plan(ShapeReader(shapes), log=lambda m: None)
  assert plan.cfg == cfg and plan.naming == "original"
  assert set(plan.keys) == set(shapes)
  filled = {}
  for name, spec in plan.keys.items():
    assert cv.to_jax(np.empty(shapes[name], np.bool_), spec.layout).shape == leaves[spec.path].shape
    assert spec.path not in filled, (name, filled.get(spec.path))
    filled[spec.path] = name
  assert set(filled) == set(leaves)  # nothing unmapped either way
  assert sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531

  with torch.device("meta"):
    model = diffusers.AutoencoderKLWan()
  reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert {_diffusers_to_original(k, 2): s for k, s in reference.items()} == shapes
  plan = cv.make_plan(ShapeReader(reference), config_json=dict(model.config), log=lambda m: None)
  assert plan.cfg == cfg and plan.naming == "diffusers"
  assert {s.diffusers for s in plan.keys.values()} == set(reference)


def test_original_pth_converts_to_the_same_params(reference, tmp_path):
  model, root, _, params = reference
  state = {_diffusers_to_original(k, 1): v.clone() for k, v in model.state_dict().items()}
  assert cv.detect_naming(state) == "original"
  (tmp_path / "release").mkdir()
  torch.save(state, tmp_path / "release" / "Wan2.1_VAE.pth")
  (tmp_path / "release" / "config.json").write_text(json.dumps({"dim": 1536, "model_type": "t2v"}))
  # A release folder: the .pth is found, the DiT's config.json is ignored.
  assert cli.main(["vae", f"--src={tmp_path / 'release'}", f"--dst={tmp_path / 'out'}",
                   "--quiet"]) == 0
  meta = json.loads((tmp_path / "out" / "config.json").read_text())
  assert meta["source"]["naming"] == "original"
  assert meta["source"]["latents_stats_from"] == "identity"  # z_dim 4: no statistics known
  module, loaded = pretrained.load(tmp_path / "out")
  assert module.config == vae.VAEConfig.preset("tiny")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # The in-memory path agrees.
  cfg, in_memory = cv.state_dict_to_params(state)
  assert cfg == module.config
  jax.tree.map(np.testing.assert_array_equal, in_memory, jax.tree.map(np.asarray, params))


def _bad_input(kind, model, tmp_path):
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  (tmp_path / "in").mkdir()
  src = tmp_path / "in" / "vae.safetensors"
  if kind == "missing":
    del state["decoder.up_blocks.0.upsamplers.0.time_conv.weight"]
    match = (r"missing \(1\):\n    decoder.up_blocks.0.upsamplers.0.time_conv.weight "
             r"\[16, 8, 3, 1, 1\]")
  elif kind == "unexpected":
    state["decoder.extra.weight"] = np.zeros((3,), np.float32)
    match = r"unexpected \(1\):\n    decoder.extra.weight \[3\]"
  elif kind == "misshaped":
    state["encoder.mid_block.attentions.0.proj.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    match = r"misshaped \(1\):\n    encoder.mid_block.attentions.0.proj.weight is \[8, 8, 3, 3\]"
  else:
    src.write_text("not a checkpoint")
    match = "is not a checkpoint"
  if kind != "not_a_checkpoint":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    safetensors.numpy.save_file(state, src)
  return src, match


@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshaped", "not_a_checkpoint"])
def test_bad_inputs_are_refused_cleanly(kind, reference, tmp_path, capsys):
  src, match = _bad_input(kind, reference[0], tmp_path)
  dst = tmp_path / "out" / "sub" / "vae"
  with pytest.raises(ConversionError, match=match):
    cv.convert(src, dst, verbose=False)
  assert _listing(tmp_path) == ["in"]
  assert cli.main(["vae", f"--src={src}", f"--dst={dst}", "--quiet"]) == 1
  assert re.search(match, capsys.readouterr().err)
  assert _listing(tmp_path) == ["in"]


def test_unsupported_configs_and_missing_src_are_refused(reference, tmp_path):
  model, root, _, _ = reference
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cv.convert(tmp_path / "nowhere", tmp_path / "out", verbose=False)
  state = model.state_dict()
  with pytest.raises(ConversionError, match="is_residual"):
    cv.state_dict_to_params(state, config_json={**model.config, "is_residual": True})
  with pytest.raises(ConversionError, match="config.json says base_dim=16"):
    cv.state_dict_to_params(state, config_json={**model.config, "base_dim": 16})
  # diffusers' default 16-value statistics on a 4-channel model are ignored, not fatal.
  cfg, _ = cv.state_dict_to_params(state, config_json={**model.config, "latents_mean": [0.5] * 16,
                                                       "latents_std": [2.0] * 16})
  assert cfg.latents_mean == (0.0,) * 4 and cfg.latents_std == (1.0,) * 4
  assert _listing(tmp_path) == []


def test_load_overrides_and_refusals(reference):
  _, root, _, _ = reference
  module, _ = pretrained.load(root / "jax", precision="highest")
  assert module.config.precision == "highest"
  with pytest.raises(ValueError, match="cannot override"):
    pretrained.load(root / "jax", z_dim=8)
  with pytest.raises(ValueError, match="cannot override"):
    pretrained.load(root / "jax", latents_std=(1.0,) * 4)
