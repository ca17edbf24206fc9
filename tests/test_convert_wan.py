"""The Wan DiT converter: key coverage of the real checkpoints, every input format, bad inputs,
export round trip, and loading the result."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import torch

from asd_jax import pretrained
from asd_jax.convert import wan as cw
from asd_jax.convert import wan_keys
from asd_jax.convert.common import ConversionError
from asd_jax.io import orbax_io
from asd_jax.models import wan
from tiny_parts import ShapeReader  # noqa: E402  (tests/ helper)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
KEY_LISTS = {"1.3b": "wan21_t2v_1.3b_dit_keys.txt", "14b": "wan21_t2v_14b_dit_keys.txt"}

# Tiny original-format model: out_channels != in_channels and an odd layer count on purpose.
TINY = wan.WanConfig(dim=32, ffn_dim=48, num_heads=2, num_layers=3, freq_dim=16, text_dim=12,
                     in_channels=4, out_channels=8)


def _read_key_list(name):
  path = SHARED / "data" / "wan_keys" / KEY_LISTS[name]
  if not path.is_file():
    pytest.skip(f"key list {path} is absent (the shared/ folder lives next to the repository)")
  out = {}
  for line in path.read_text().splitlines():
    if line.strip():
      key, shape = line.split("\t")
      out[key] = tuple(json.loads(shape))
  return out


def _arch(cfg):
  return {k: getattr(cfg, k) for k in wan.WanConfig.ARCH_FIELDS}


def _original_state(cfg, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return {n: rng.standard_normal(s.torch_shape).astype(dtype)
          for n, s in wan_keys.expected_keys(cfg).items()}


def _restore_numpy(directory):
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(Path(directory) / "params")


def _assert_params_match_original(params, state, cfg):
  """Every original tensor sits where WAN.md says, transposed as the model expects."""
  b = params["blocks"]
  checks = [
      (params["patch_embedding"]["kernel"], state["patch_embedding.weight"].transpose(2, 3, 4, 1, 0)),
      (params["text_embedding"]["fc2"]["kernel"], state["text_embedding.2.weight"].T),
      (params["time_embedding"]["fc1"]["bias"], state["time_embedding.0.bias"]),
      (params["time_projection"]["kernel"], state["time_projection.1.weight"].T),
      (params["head"]["modulation"], state["head.modulation"][0]),
      (params["head"]["head"]["kernel"], state["head.head.weight"].T),
  ]
  for i in range(cfg.num_layers):
    checks += [
        (b["modulation"][i], state[f"blocks.{i}.modulation"][0]),
        (b["self_attn"]["q"]["kernel"][i], state[f"blocks.{i}.self_attn.q.weight"].T),
        (b["self_attn"]["o"]["bias"][i], state[f"blocks.{i}.self_attn.o.bias"]),
        (b["cross_attn"]["k"]["kernel"][i], state[f"blocks.{i}.cross_attn.k.weight"].T),
        (b["cross_attn"]["norm_q"]["scale"][i], state[f"blocks.{i}.cross_attn.norm_q.weight"]),
        (b["norm3"]["scale"][i], state[f"blocks.{i}.norm3.weight"]),
        (b["ffn"]["fc1"]["kernel"][i], state[f"blocks.{i}.ffn.0.weight"].T),
        (b["ffn"]["fc2"]["kernel"][i], state[f"blocks.{i}.ffn.2.weight"].T),
    ]
  for got, want in checks:
    np.testing.assert_array_equal(np.asarray(got), want)
  # And nothing else: every leaf of the tree equals its original tensor(s).
  for name, spec in wan_keys.expected_keys(cfg).items():
    leaf = params
    for k in spec.path:
      leaf = leaf[k]
    leaf = np.asarray(leaf)
    got = leaf if spec.layer is None else leaf[spec.layer]
    np.testing.assert_array_equal(got, wan_keys.to_jax(state[name], spec.layout), err_msg=name)


def _listing(folder):
  return sorted(p.name for p in Path(folder).iterdir())


# ----------------------------------------------------------------------------------------------
# Coverage of the real checkpoints (shapes only, nothing large is allocated).


@pytest.mark.parametrize("preset", ["1.3b", "14b"])
def test_real_key_list_maps_onto_abstract_params(preset):
  shapes = _read_key_list(preset)
  plan = cw.make_plan(ShapeReader(shapes), log=lambda m: None)
  assert _arch(plan.cfg) == _arch(wan.WanConfig.preset(preset))
  assert plan.naming == "original" and plan.selection.key is None
  assert set(plan.keys) == set(shapes)

  leaves = orbax_io.flatten(wan.abstract_params(plan.cfg))
  filled = {}
  for name, spec in plan.keys.items():
    leaf_shape = leaves[spec.path].shape
    slot_shape = leaf_shape if spec.layer is None else leaf_shape[1:]
    assert wan_keys.to_jax(np.empty(shapes[name], np.bool_), spec.layout).shape == slot_shape, name
    assert (spec.path, spec.layer) not in filled, f"{name} and {filled.get((spec.path, spec.layer))}"
    filled[(spec.path, spec.layer)] = name
  # The other way round: every slot of every leaf is filled by exactly one key.
  slots = {(p, i) for p, l in leaves.items()
           for i in ([None] if p[0] != "blocks" else range(l.shape[0]))}
  assert set(filled) == slots
  assert sum(int(np.prod(s)) for s in shapes.values()) == sum(
      int(np.prod(l.shape)) for l in leaves.values())


def test_diffusers_names_match_diffusers_model():
  from diffusers import WanTransformer3DModel  # pylint: disable=g-import-not-at-top
  shapes = _read_key_list("1.3b")
  with torch.device("meta"):
    model = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                  num_layers=30)
  reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  renamed = {wan_keys.original_to_diffusers(k): s for k, s in shapes.items()}
  assert renamed == reference
  assert {wan_keys.diffusers_to_original(k) for k in reference} == set(shapes)
  # The planner takes the diffusers names (and the heads from config.json) as well.
  plan = cw.make_plan(ShapeReader(reference), config_json=dict(model.config), log=lambda m: None)
  assert plan.naming == "diffusers" and plan.info["num_heads_from"] == "config.json"
  assert _arch(plan.cfg) == _arch(wan.WanConfig.preset("1.3b"))


# ----------------------------------------------------------------------------------------------
# Formats.


@pytest.fixture(scope="module")
def tiny_diffusers(tmp_path_factory):
  """The tiny diffusers model of WAN.md, saved with save_pretrained."""
  from diffusers import WanTransformer3DModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=20, in_channels=4,
      out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
      qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
  folder = tmp_path_factory.mktemp("diffusers") / "tiny"
  model.save_pretrained(folder)
  return model, folder


def test_diffusers_folder_converts_exactly_and_runs(tiny_diffusers, tmp_path):
  model, folder = tiny_diffusers
  cfg = cw.convert(folder, tmp_path / "out", verbose=False)
  assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.rope_max_len) == (40, 2, 2, 32)
  meta = json.loads((tmp_path / "out" / "config.json").read_text())
  assert meta["kind"] == "wan" and wan.WanConfig.from_dict(meta["config"]) == cfg
  assert meta["source"]["naming"] == "diffusers"
  assert _listing(tmp_path) == ["out"]  # no temp or staging folders left

  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  params = _restore_numpy(tmp_path / "out")
  b = params["blocks"]
  for i in range(2):  # the diffusers -> JAX names written out by hand, independent of the tables
    p = f"blocks.{i}."
    np.testing.assert_array_equal(b["self_attn"]["q"]["kernel"][i], sd[p + "attn1.to_q.weight"].T)
    np.testing.assert_array_equal(b["self_attn"]["o"]["kernel"][i], sd[p + "attn1.to_out.0.weight"].T)
    np.testing.assert_array_equal(b["cross_attn"]["v"]["bias"][i], sd[p + "attn2.to_v.bias"])
    np.testing.assert_array_equal(b["cross_attn"]["norm_k"]["scale"][i], sd[p + "attn2.norm_k.weight"])
    np.testing.assert_array_equal(b["norm3"]["bias"][i], sd[p + "norm2.bias"])
    np.testing.assert_array_equal(b["ffn"]["fc1"]["kernel"][i], sd[p + "ffn.net.0.proj.weight"].T)
    np.testing.assert_array_equal(b["ffn"]["fc2"]["kernel"][i], sd[p + "ffn.net.2.weight"].T)
    np.testing.assert_array_equal(b["modulation"][i], sd[p + "scale_shift_table"][0])
  np.testing.assert_array_equal(params["patch_embedding"]["kernel"],
                                sd["patch_embedding.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params["text_embedding"]["fc1"]["kernel"],
                                sd["condition_embedder.text_embedder.linear_1.weight"].T)
  np.testing.assert_array_equal(params["time_embedding"]["fc2"]["bias"],
                                sd["condition_embedder.time_embedder.linear_2.bias"])
  np.testing.assert_array_equal(params["time_projection"]["kernel"],
                                sd["condition_embedder.time_proj.weight"].T)
  np.testing.assert_array_equal(params["head"]["modulation"], sd["scale_shift_table"][0])
  np.testing.assert_array_equal(params["head"]["head"]["kernel"], sd["proj_out.weight"].T)
  original = {wan_keys.diffusers_to_original(k): v for k, v in sd.items()}
  _assert_params_match_original(params, original, cfg)

  # The in-memory path gives the same tree, from torch tensors directly.
  cfg2, params2 = cw.state_dict_to_params(model.state_dict(), config_json=dict(model.config))
  assert cfg2 == cfg
  _assert_params_match_original(params2, original, cfg)

  # pretrained.load: the forward runs and agrees with diffusers (fp32, CPU).
  module, loaded = pretrained.load(tmp_path / "out")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 4, 2, 4, 6)).astype(np.float32)  # [B, C, F, H, W] for torch
  t = np.array([937.5], np.float32)
  ctx = rng.standard_normal((1, 8, 16)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                return_dict=False)[0].numpy()
  v = module.apply({"params": loaded}, jnp.asarray(x.transpose(0, 2, 3, 4, 1)), jnp.asarray(t),
                   jnp.asarray(ctx))
  np.testing.assert_allclose(np.asarray(v).transpose(0, 4, 1, 2, 3), ref, atol=2e-5, rtol=0)


def test_cli_subprocess(tiny_diffusers, tmp_path):
  model, folder = tiny_diffusers
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, "-m", "asd_jax.convert", "wan", f"--src={folder}",
                        f"--dst={tmp_path / 'cli'}", "--dtype=bfloat16"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert out.returncode == 0, out.stderr
  meta = json.loads((tmp_path / "cli" / "config.json").read_text())
  assert meta["config"]["param_dtype"] == "bfloat16" and meta["source"]["dtype"] == "bfloat16"
  params = _restore_numpy(tmp_path / "cli")
  got = params["blocks"]["ffn"]["fc1"]["kernel"]
  assert got.dtype == ml_dtypes.bfloat16
  # float32 -> bfloat16 rounds like torch (to nearest even).
  want = model.state_dict()["blocks.1.ffn.net.0.proj.weight"].to(torch.bfloat16).T.contiguous()
  np.testing.assert_array_equal(got[1].view(np.uint16), want.view(torch.int16).numpy().view(np.uint16))


def _write_sharded(state, folder, config=None):
  folder.mkdir(parents=True)
  names = list(state)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
  weight_map = {}
  for fname, keys in shards.items():
    safetensors.numpy.save_file({k: state[k] for k in keys}, folder / fname)
    weight_map.update({k: fname for k in keys})
  (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
  if config:
    (folder / "config.json").write_text(json.dumps(config))


def test_original_safetensors_single_and_sharded(tmp_path):
  state = _original_state(TINY)
  single = tmp_path / "single.safetensors"
  safetensors.numpy.save_file(state, single)
  cfg = cw.convert(single, tmp_path / "a", num_heads=2, verbose=False)
  assert _arch(cfg) == _arch(TINY)
  _assert_params_match_original(_restore_numpy(tmp_path / "a"), state, TINY)

  # An original Wan release folder: shards + index + the release's config.json (num_heads).
  release = tmp_path / "release"
  _write_sharded(state, release, config={"_class_name": "WanModel", "dim": 32, "num_heads": 2,
                                         "num_layers": 3, "in_dim": 4, "out_dim": 8,
                                         "ffn_dim": 48, "eps": 1e-6, "text_len": 512})
  torch.save({"not": torch.zeros(2)}, release / "Wan2.1_VAE.pth")  # the release's other parts
  for src in (release, release / "diffusion_pytorch_model.safetensors.index.json"):
    dst = tmp_path / f"b_{src.name}"
    cfg = cw.convert(src, dst, verbose=False)
    assert _arch(cfg) == _arch(TINY)
    meta = json.loads((dst / "config.json").read_text())
    assert meta["source"]["container"] == "sharded-safetensors"
    assert meta["source"]["num_heads_from"] == "config.json"
    _assert_params_match_original(_restore_numpy(dst), state, TINY)


def test_training_checkpoint_with_subdicts_and_prefixes(tmp_path):
  states = {name: _original_state(TINY, seed) for seed, name in
            enumerate(["generator", "generator_ema", "critic"])}
  prefixes = {"generator": "model._fsdp_wrapped_module.", "generator_ema": "model._orig_mod.",
              "critic": "model."}
  ckpt = {name: {prefixes[name] + k: torch.from_numpy(v) for k, v in s.items()}
          for name, s in states.items()}
  # FSDP also wraps inside blocks; a bf16 tensor in the generator is widened to float32.
  g = ckpt["generator"]
  g["model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.ffn.0.bias"] = g.pop(
      "model._fsdp_wrapped_module.blocks.0.ffn.0.bias").to(torch.bfloat16)
  ckpt["step"] = 1200
  path = tmp_path / "run.pth"
  torch.save(ckpt, path)

  cw.convert(path, tmp_path / "ema", num_heads=2, verbose=False)
  _assert_params_match_original(_restore_numpy(tmp_path / "ema"), states["generator_ema"], TINY)
  meta = json.loads((tmp_path / "ema" / "config.json").read_text())["source"]
  assert meta["key"] == "generator_ema"
  assert sorted(meta["subdicts_with_weights"]) == ["critic", "generator", "generator_ema"]
  assert meta["stripped_prefixes"] == ["model._orig_mod."]

  cw.convert(path, tmp_path / "critic", key="critic", fmt="training", num_heads=2, verbose=False)
  _assert_params_match_original(_restore_numpy(tmp_path / "critic"), states["critic"], TINY)

  cfg, params = cw.state_dict_to_params(torch.load(path, weights_only=True), num_heads=2,
                                        key="generator")
  want = dict(states["generator"])
  want["blocks.0.ffn.0.bias"] = (torch.from_numpy(want["blocks.0.ffn.0.bias"]).to(torch.bfloat16)
                                 .float().numpy())
  _assert_params_match_original(params, want, TINY)

  # ComfyUI-style prefix in a safetensors file.
  comfy = tmp_path / "comfy.safetensors"
  safetensors.numpy.save_file({"model.diffusion_model." + k: v for k, v in states["critic"].items()},
                              comfy)
  cw.convert(comfy, tmp_path / "comfy", num_heads=2, verbose=False)
  _assert_params_match_original(_restore_numpy(tmp_path / "comfy"), states["critic"], TINY)


def test_pickles_that_need_more_than_weights_only(tmp_path):
  """A checkpoint with a non-tensor object, and a legacy (non-zip) file: both load, with a note."""
  state = _original_state(TINY, seed=5)
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  torch.save({"generator": tensors, "args": argparse.Namespace(lr=0.1)}, tmp_path / "objs.pt")
  torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
  for name, note in (("objs.pt", "weights_only=False"), ("legacy.pt", "legacy (non-zip)")):
    cw.convert(tmp_path / name, tmp_path / f"out_{name}", num_heads=2, verbose=False)
    meta = json.loads((tmp_path / f"out_{name}" / "config.json").read_text())
    assert any(note in n for n in meta["source"]["notes"]), meta["source"]["notes"]
    _assert_params_match_original(_restore_numpy(tmp_path / f"out_{name}"), state, TINY)


def test_architecture_flags_follow_the_keys(tmp_path):
  cfg = TINY.replace(qk_norm=False, cross_attn_norm=False)
  state = _original_state(cfg)
  assert not any("norm" in k for k in state)
  got, params = cw.state_dict_to_params(state, num_heads=2)
  assert _arch(got) == _arch(cfg)
  assert "norm3" not in params["blocks"] and "norm_q" not in params["blocks"]["self_attn"]


def test_num_heads_resolution():
  shapes = {n: s.torch_shape for n, s in wan_keys.expected_keys(
      TINY.replace(dim=256, num_heads=4)).items()}
  notes = []
  cfg, info = cw.infer_config(shapes, log=notes.append)
  assert cfg.num_heads == 2 and info["num_heads_from"] == "dim // 128" and "--num_heads" in notes[0]
  assert cw.infer_config(shapes, num_heads=4)[0].num_heads == 4
  with pytest.raises(ConversionError, match="contradicts config.json"):
    cw.infer_config(shapes, config_json={"num_heads": 8}, num_heads=4)
  with pytest.raises(ConversionError, match="dim: config.json says 512"):
    cw.infer_config(shapes, config_json={"num_heads": 8, "dim": 512})
  odd = {n: s.torch_shape for n, s in wan_keys.expected_keys(TINY).items()}
  with pytest.raises(ConversionError, match="pass --num_heads"):
    cw.infer_config(odd)
  with pytest.raises(ConversionError, match="does not divide dim"):
    cw.infer_config(odd, num_heads=5)


# ----------------------------------------------------------------------------------------------
# Bad inputs: a clear error, nothing at --dst, no temp folder.


def _bad_input(kind, tmp_path):
  state = _original_state(TINY)
  src = tmp_path / "in" / "model.safetensors"
  src.parent.mkdir()
  kwargs = {"num_heads": 2}
  if kind == "missing":
    del state["blocks.1.ffn.2.bias"]
    match = r"missing \(1\):\n    blocks.1.ffn.2.bias \[32\]"
  elif kind == "unexpected":
    state["blocks.1.self_attn.extra.weight"] = np.zeros((3, 4), np.float32)
    match = r"unexpected \(1\):\n    blocks.1.self_attn.extra.weight \[3, 4\]"
  elif kind == "misshaped":
    state["blocks.2.cross_attn.q.weight"] = np.zeros((32, 30), np.float32)
    match = r"blocks.2.cross_attn.q.weight is \[32, 30\], expected \[32, 32\]"
  elif kind == "no_checkpoint":
    src.write_text("hello, I am a text file " * 10)
    match = "is not a checkpoint"
  elif kind == "no_subdict":
    torch.save({"generator": {k: torch.from_numpy(v) for k, v in state.items()}},
               src.with_suffix(".pt"))
    src = src.with_suffix(".pt")
    kwargs["key"] = "generator_ema"
    match = r"--key 'generator_ema' is not a sub-dict .* \['generator'\]"
  elif kind == "training_without_subdict":
    kwargs["fmt"] = "training"
    match = "no sub-dict"
  elif kind == "missing_src":
    src = tmp_path / "in" / "nowhere.safetensors"
    match = "does not exist"
  if not src.exists() and kind != "missing_src":
    safetensors.numpy.save_file(state, src)
  return src, kwargs, match


@pytest.mark.parametrize("kind", ["missing", "unexpected", "misshaped", "no_checkpoint",
                                  "no_subdict", "training_without_subdict", "missing_src"])
def test_bad_inputs_are_refused_cleanly(kind, tmp_path):
  src, kwargs, match = _bad_input(kind, tmp_path)
  out_parent = tmp_path / "out"
  dst = out_parent / "sub" / "model"
  with pytest.raises((ConversionError, FileNotFoundError), match=match):
    cw.convert(src, dst, verbose=False, **kwargs)
  assert not out_parent.exists()
  assert _listing(tmp_path) == ["in"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
  safetensors.numpy.save_file(_original_state(TINY), tmp_path / "m.safetensors")

  def boom(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(orbax_io, "save_tree", boom)
  with pytest.raises(OSError, match="disk full"):
    cw.convert(tmp_path / "m.safetensors", tmp_path / "out", num_heads=2, verbose=False)
  assert _listing(tmp_path) == ["m.safetensors"]


def test_existing_destination_needs_overwrite(tmp_path):
  src = tmp_path / "m.safetensors"
  safetensors.numpy.save_file(_original_state(TINY), src)
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  with pytest.raises(ConversionError, match="--overwrite"):
    cw.convert(src, dst, num_heads=2, verbose=False)
  assert _listing(dst) == ["keep.txt"]
  cw.convert(src, dst, num_heads=2, overwrite=True, verbose=False)
  assert _listing(dst) == ["config.json", "params"]
  assert _listing(tmp_path) == ["m.safetensors", "out"]


def test_cli_reports_errors(tmp_path, capsys, monkeypatch):
  from asd_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["wan", f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'out'}"]) == 1
  assert "does not exist" in capsys.readouterr().err
  monkeypatch.setitem(cli._MODULE_COMMANDS, "later", "asd_jax.convert.no_such_module")
  assert cli.main(["later", "--src=x", "--dst=y"]) == 2
  assert "not implemented yet" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Export and loading.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip_is_bit_identical(dtype, tmp_path):
  np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  state = _original_state(TINY, dtype=np_dtype)
  safetensors.numpy.save_file(state, tmp_path / "in.safetensors")
  cw.convert(tmp_path / "in.safetensors", tmp_path / "jax", dtype=dtype, num_heads=2,
             verbose=False)
  from asd_jax.convert.__main__ import main  # pylint: disable=g-import-not-at-top
  assert main(["export-wan", f"--src={tmp_path / 'jax'}", f"--dst={tmp_path / 'out.safetensors'}",
               "--quiet"]) == 0
  back = safetensors.numpy.load_file(tmp_path / "out.safetensors")
  assert list(back) == list(wan_keys.expected_keys(TINY))
  assert set(back) == set(state)
  for k, v in state.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    assert back[k].tobytes() == v.tobytes(), k
  # torch reads it too (bf16 included), and export refuses to overwrite silently.
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  assert load_file(tmp_path / "out.safetensors")["head.head.weight"].shape == (32, 32)
  with pytest.raises(ConversionError, match="--overwrite"):
    cw.export_wan(tmp_path / "jax", tmp_path / "out.safetensors", verbose=False)
  assert _listing(tmp_path) == ["in.safetensors", "jax", "out.safetensors"]


def test_export_from_a_training_export_with_default_orbax_settings(tmp_path):
  """A trainer saves jax arrays with orbax defaults (OCDBT); export-wan and load read that too."""
  state = _original_state(TINY, seed=3)
  _, params = cw.state_dict_to_params(state, num_heads=2)
  folder = tmp_path / "student"
  folder.mkdir()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(folder / "params", jax.tree.map(jnp.asarray, params))
  (folder / "config.json").write_text(json.dumps({"kind": "wan", "config": TINY.to_dict()}))
  cw.export_wan(folder, tmp_path / "student.safetensors", verbose=False)
  back = safetensors.numpy.load_file(tmp_path / "student.safetensors")
  assert set(back) == set(state)
  for k, v in state.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  _, loaded = pretrained.load(folder)
  _assert_params_match_original(loaded, state, TINY)


def test_restore_into_shardings_on_two_devices(tmp_path):
  safetensors.numpy.save_file(_original_state(TINY.replace(num_layers=2)), tmp_path / "m.safetensors")
  cw.convert(tmp_path / "m.safetensors", tmp_path / "jax", num_heads=2, verbose=False)
  script = f"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from asd_jax import pretrained
from asd_jax.io import orbax_io
mesh = Mesh(np.array(jax.devices()), ("x",))
meta = orbax_io.tree_metadata({str(tmp_path / "jax" / "params")!r})
shardings = orbax_io.unflatten({{p: NamedSharding(mesh, P("x") if p[0] == "blocks" else P())
                                for p in meta}})
params = pretrained.load_params({str(tmp_path / "jax")!r}, shardings=shardings)
k = params["blocks"]["ffn"]["fc1"]["kernel"]
assert k.sharding.spec == P("x") and len(k.addressable_shards) == 2, k.sharding
assert k.addressable_shards[1].data.shape == (1,) + k.shape[1:]
ref = pretrained.load_params({str(tmp_path / "jax")!r})["blocks"]["ffn"]["fc1"]["kernel"]
np.testing.assert_array_equal(np.asarray(k), np.asarray(ref))
print("ok")
"""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=300)
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_load_overrides_and_refusals(tmp_path):
  safetensors.numpy.save_file(_original_state(TINY), tmp_path / "m.safetensors")
  cw.convert(tmp_path / "m.safetensors", tmp_path / "jax", num_heads=2, verbose=False)
  module, params = pretrained.load(tmp_path / "jax", dtype="bfloat16", scan_layers=False,
                                   param_dtype="bfloat16")
  assert module.config.dtype == "bfloat16" and not module.config.scan_layers
  assert params["blocks"]["ffn"]["fc1"]["kernel"].dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="architecture fields"):
    pretrained.load(tmp_path / "jax", num_layers=4)
  meta = json.loads((tmp_path / "jax" / "config.json").read_text())
  meta["kind"] = "flux"
  (tmp_path / "jax" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="unknown checkpoint kind 'flux'"):
    pretrained.load(tmp_path / "jax")
