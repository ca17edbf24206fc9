"""The umT5 text encoder: parity with transformers, the converter, the tokenizer and TextEncoder.

Precision reference: transformers' `UMT5EncoderModel` (eager attention) in float32 on CPU, tiny and
random (vocab 256, d_model 32, d_ff 64, 4 heads of 8, 2 layers; norm weights and position-bias
tables perturbed well away from their initial values), saved with `save_pretrained` and converted
through the command line's code path. asd_jax runs in float32 on CPU. Reached: 2.0e-6 absolute on
outputs of magnitude ~4.3 (padded batch of 200 tokens) and 4.6e-6 on ~3.6 (TextEncoder, 512 tokens);
tolerance below: 2e-5 absolute plus 1e-5 relative. bfloat16 compute (bfloat16 params) differs from
float32 by ~1.5e-2 of the output scale; the check allows 5e-2. A prompt encoded alone or in a batch
gives the same context to 1e-6 (bit-identical on CPU).
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
import safetensors.numpy  # noqa: E402

from asd_jax import pretrained  # noqa: E402
from asd_jax import text  # noqa: E402
from asd_jax.convert import umt5 as cu  # noqa: E402
from asd_jax.convert.__main__ import main as convert_main  # noqa: E402
from asd_jax.convert.common import ConversionError  # noqa: E402
from asd_jax.models import umt5  # noqa: E402
import tiny_parts  # noqa: E402  (tests/ helper)

ATOL, RTOL = 2e-5, 1e-5
HF_CONFIG = dict(vocab_size=256, d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=2,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6)
# Hugging Face -> Wan names, written out here independently of the converter's table.
HF_TO_WAN_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}


def _hf_config(**overrides):
  return transformers.UMT5Config(**{**HF_CONFIG, **overrides}, attn_implementation="eager")


def _perturb(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
  return model


def _wan_state(hf_state):
  """Hugging Face encoder state dict -> Wan's T5Encoder names (torch tensors)."""
  out = {"token_embedding.weight": hf_state["shared.weight"]}
  for name, value in hf_state.items():
    m = re.match(r"^encoder\.block\.(\d+)\.(.+)$", name)
    if m:
      out[f"blocks.{m.group(1)}.{HF_TO_WAN_BLOCK[m.group(2)]}"] = value
  out["norm.weight"] = hf_state["encoder.final_layer_norm.weight"]
  return out


def _restore_numpy(directory):
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(Path(directory) / "params")


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_nothing_written(dst):
  dst = Path(dst)
  assert not dst.exists()
  assert not list(dst.parent.glob(dst.name + ".tmp-*")), "a staging directory was left behind"


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """(reference model, its save_pretrained folder, the converted folder)."""
  torch.manual_seed(0)
  model = _perturb(transformers.UMT5EncoderModel(_hf_config()).eval(), seed=1)
  root = tmp_path_factory.mktemp("umt5")
  model.save_pretrained(root / "hf")
  assert convert_main(["umt5", f"--src={root / 'hf'}", f"--dst={root / 'jax'}", "--quiet"]) == 0
  return model, root / "hf", root / "jax"


@pytest.fixture(scope="module")
def loaded(hf):
  module, params = pretrained.load(hf[2])
  return module, params, jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))


def _reference(model, ids, mask):
  with torch.no_grad():
    return model(torch.from_numpy(ids.astype(np.int64)),
                 attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()


# ----------------------------------------------------------------------------------------------
# The model.


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20)])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance):
  from transformers.models.umt5.modeling_umt5 import UMT5Attention
  cfg = _hf_config(relative_attention_num_buckets=num_buckets,
                   relative_attention_max_distance=max_distance)
  attn = UMT5Attention(cfg, has_relative_attention_bias=True)
  q_len, k_len = 600, 700
  rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
  ref = attn._relative_position_bucket(rel).numpy()  # pylint: disable=protected-access
  ours = umt5.relative_position_buckets(q_len, k_len, num_buckets, max_distance)
  np.testing.assert_array_equal(ours, ref)


def test_config_presets_and_round_trip():
  xxl = umt5.UMT5Config.preset("xxl")
  assert (xxl.vocab_size, xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.d_kv, xxl.num_layers) == (
      256384, 4096, 10240, 64, 64, 24)
  assert (xxl.relative_attention_num_buckets, xxl.relative_attention_max_distance, xxl.eps,
          xxl.dtype) == (32, 128, 1e-6, "float32")
  tiny = umt5.UMT5Config.preset("umt5-tiny", dtype="bfloat16")
  assert (tiny.vocab_size, tiny.d_model, tiny.d_ff, tiny.num_heads, tiny.d_kv, tiny.num_layers) == (
      256, 32, 64, 4, 8, 2)
  assert umt5.UMT5Config.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(umt5.abstract_params(xxl)))
  assert n == 5_680_910_336  # Wan's umT5-XXL encoder
  with pytest.raises(ValueError, match="Unknown UMT5Config fields"):
    umt5.UMT5Config.from_dict({"d_modle": 8})
  with pytest.raises(ValueError, match="dtype"):
    umt5.UMT5Config(dtype="float64")
  with pytest.raises(ValueError, match="preset"):
    umt5.UMT5Config.preset("xl")


def test_forward_matches_transformers_padded_batch(hf, loaded):
  model = hf[0]
  _, params, fwd = loaded
  rng = np.random.default_rng(0)
  lengths = np.array([200, 57, 1])  # 200 > max_distance: the saturated buckets are used
  ids = rng.integers(0, 256, (3, 200)).astype(np.int32)
  mask = (np.arange(200)[None, :] < lengths[:, None]).astype(np.int32)
  ids[mask == 0] = 0
  ref = _reference(model, ids, mask)
  out = np.asarray(fwd(params, ids, mask))
  assert out.dtype == np.float32 and out.shape == (3, 200, 32)
  print(f"max abs error {np.abs(out - ref).max():.2e} (output scale {np.abs(ref).max():.2f})")
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)


def test_forward_without_mask_and_bf16(hf, loaded):
  model = hf[0]
  module, params, fwd = loaded
  ids = np.random.default_rng(1).integers(0, 256, (1, 23)).astype(np.int32)
  ref = _reference(model, ids, np.ones_like(ids))
  out = np.asarray(jax.jit(lambda p, i: module.apply({"params": p}, i))(params, ids))
  np.testing.assert_allclose(out, ref, atol=ATOL, rtol=RTOL)
  bf16 = umt5.UMT5Encoder(module.config.replace(dtype="bfloat16"))
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out16 = np.asarray(jax.jit(lambda p, i: bf16.apply({"params": p}, i))(params16, ids))
  assert out16.dtype == np.float32
  assert np.abs(out16 - ref).max() < 5e-2 * np.abs(ref).max()


def test_bad_model_inputs(loaded):
  module, params, _ = loaded
  ids = jnp.zeros((2, 5), jnp.int32)
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    module.apply({"params": params}, ids[0])
  with pytest.raises(ValueError, match="mask"):
    module.apply({"params": params}, ids, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="integers"):
    module.apply({"params": params}, ids.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# The converter.


def test_converted_directory(hf):
  model, _, jax_dir = hf
  meta = json.loads((jax_dir / "config.json").read_text())
  assert meta["kind"] == "umt5"
  cfg = umt5.UMT5Config.from_dict(meta["config"])
  ref = model.config
  assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers) == (
      ref.vocab_size, ref.d_model, ref.d_ff, ref.num_heads, ref.d_kv, ref.num_layers)
  assert meta["source"]["naming"] == "hf" and meta["source"]["dtype"] == "float32"
  module, params = pretrained.load(jax_dir, dtype="bfloat16")
  assert module.config.dtype == "bfloat16"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  with pytest.raises(ValueError, match="architecture"):
    pretrained.load(jax_dir, d_model=64)


def test_wan_pth_converts_to_identical_params(hf, tmp_path):
  model, _, jax_dir = hf
  expected = _flat(_restore_numpy(jax_dir))
  torch.save(_wan_state(model.state_dict()), tmp_path / "models_t5_umt5-xxl-enc.pth")
  assert convert_main(["umt5", f"--src={tmp_path / 'models_t5_umt5-xxl-enc.pth'}",
                       f"--dst={tmp_path / 'wan'}", "--quiet"]) == 0
  meta = json.loads((tmp_path / "wan" / "config.json").read_text())
  assert meta["source"]["naming"] == "original"
  got = _flat(_restore_numpy(tmp_path / "wan"))
  assert sorted(got) == sorted(expected)
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)

  # Wan's release is bfloat16: kept as bfloat16 (the rounding of the float32 params).
  state16 = {k: v.to(torch.bfloat16) for k, v in _wan_state(model.state_dict()).items()}
  torch.save(state16, tmp_path / "bf16.pth")
  cfg = cu.convert(tmp_path / "bf16.pth", tmp_path / "wan16", verbose=False)
  assert cfg.param_dtype == "bfloat16"
  got16 = _flat(_restore_numpy(tmp_path / "wan16"))
  for k in expected:
    assert got16[k].dtype == ml_dtypes.bfloat16, k
    np.testing.assert_array_equal(got16[k], expected[k].astype(ml_dtypes.bfloat16), err_msg=k)


def test_sharded_folder_with_both_tied_copies(hf, tmp_path):
  model, hf_dir, jax_dir = hf
  expected = _flat(_restore_numpy(jax_dir))
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "encoder.embed_tokens.weight" in state and "shared.weight" in state
  names = sorted(state)
  shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}

  def write(folder, values):
    folder.mkdir()
    for fname, keys in shards.items():
      safetensors.numpy.save_file({k: values[k] for k in keys}, folder / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())

  write(tmp_path / "sharded", state)
  cfg = cu.convert(tmp_path / "sharded", tmp_path / "out", dtype="float32", verbose=False)
  assert cfg.d_model == 32
  got = _flat(_restore_numpy(tmp_path / "out"))
  for k in expected:
    np.testing.assert_array_equal(got[k], expected[k], err_msg=k)

  # Tied copies that differ are refused.
  state["encoder.embed_tokens.weight"] = state["encoder.embed_tokens.weight"] + 1.0
  write(tmp_path / "untied", state)
  with pytest.raises(ConversionError, match="tied"):
    cu.convert(tmp_path / "untied", tmp_path / "bad", verbose=False)
  _assert_nothing_written(tmp_path / "bad")


def test_encoder_of_a_full_model(tmp_path):
  torch.manual_seed(3)
  full = _perturb(transformers.UMT5ForConditionalGeneration(_hf_config()).eval(), seed=4)
  full.save_pretrained(tmp_path / "full")
  with pytest.raises(ConversionError, match="--encoder_only") as e:
    cu.convert(tmp_path / "full", tmp_path / "out", verbose=False)
  assert "decoder.block.0.layer.0.SelfAttention.q.weight" in str(e.value)
  _assert_nothing_written(tmp_path / "out")
  cu.convert(tmp_path / "full", tmp_path / "out", encoder_only=True, verbose=False)
  module, params = pretrained.load(tmp_path / "out")
  ids = np.random.default_rng(2).integers(0, 256, (2, 30)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 11:] = 0
  with torch.no_grad():
    ref = full.get_encoder()(input_ids=torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)))
  out = np.asarray(module.apply({"params": params}, ids, mask))
  np.testing.assert_allclose(out, ref.last_hidden_state.numpy(), atol=ATOL, rtol=RTOL)


def test_plan_for_the_xxl_release_without_reading_data():
  xxl = umt5.UMT5Config.preset("xxl")
  wan_shapes = {n: s.torch_shape for n, s in cu.expected_keys(xxl).items()}
  assert len(wan_shapes) == 2 + 24 * 10
  assert wan_shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
  # Next to the .pth of a Wan release lies the DiT's config.json: it must be ignored.
  dit_json = {"_class_name": "WanModel", "model_type": "t2v", "dim": 1536, "num_heads": 12}
  plan = cu.make_plan(tiny_parts.ShapeReader(wan_shapes, ml_dtypes.bfloat16),
                      config_json=dit_json, log=lambda m: None)
  assert plan.naming == "original" and plan.dtype == "bfloat16"
  assert plan.cfg == xxl.replace(param_dtype="bfloat16")

  # The same weights under Hugging Face names, with google/umt5-xxl's config.json.
  inverse = {"token_embedding.weight": "shared.weight",
             "norm.weight": "encoder.final_layer_norm.weight"}
  for hf_suffix, wan_suffix in HF_TO_WAN_BLOCK.items():
    for i in range(24):
      inverse[f"blocks.{i}.{wan_suffix}"] = f"encoder.block.{i}.{hf_suffix}"
  hf_shapes = {inverse[n]: s for n, s in wan_shapes.items()}
  hf_shapes["encoder.embed_tokens.weight"] = hf_shapes["shared.weight"]
  hf_json = {"model_type": "umt5", "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64,
             "num_layers": 24, "num_decoder_layers": 24, "vocab_size": 256384,
             "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
             "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
  plan = cu.make_plan(tiny_parts.ShapeReader(hf_shapes, ml_dtypes.bfloat16),
                      config_json=hf_json, dtype="float32",
                      log=lambda m: None)
  assert plan.naming == "hf" and plan.cfg == xxl
  assert plan.copies == {"token_embedding.weight": ["encoder.embed_tokens.weight"]}


def _broken(state, kind):
  state = dict(state)
  if kind == "missing":
    del state["blocks.1.attn.k.weight"]
  elif kind == "unexpected":
    state["blocks.0.attn.extra.weight"] = np.zeros((4, 4), np.float32)
  elif kind == "misshaped":
    state["blocks.1.ffn.fc1.weight"] = np.zeros((63, 32), np.float32)
  elif kind == "wrong dtype":
    state["norm.weight"] = np.zeros((32,), np.int32)
  return state


@pytest.mark.parametrize("kind,listed", [
    ("missing", "blocks.1.attn.k.weight [32, 32]"),
    ("unexpected", "blocks.0.attn.extra.weight [4, 4]"),
    ("misshaped", "blocks.1.ffn.fc1.weight is [63, 32], expected [64, 32]"),
    ("wrong dtype", "norm.weight has dtype int32"),
])
def test_unmappable_checkpoints_are_refused(hf, tmp_path, capsys, kind, listed):
  state = {k: v.numpy() for k, v in _wan_state(hf[0].state_dict()).items()}
  with pytest.raises(ConversionError) as e:
    cu.state_dict_to_params(_broken(state, kind))
  assert kind in str(e.value) and listed in str(e.value)
  # Through the command line: exit code 1, the listing on stderr, nothing written.
  safetensors.numpy.save_file(_broken(state, kind), tmp_path / "w.safetensors")
  rc = convert_main(["umt5", f"--src={tmp_path / 'w.safetensors'}", f"--dst={tmp_path / 'out'}",
                     "--quiet"])
  assert rc == 1
  assert listed in capsys.readouterr().err
  _assert_nothing_written(tmp_path / "out")


def test_bad_inputs_are_refused(hf, tmp_path, capsys):
  model, _, jax_dir = hf
  hf_state = {k: v.numpy() for k, v in model.state_dict().items()}
  hf_json = json.loads((hf[1] / "config.json").read_text())
  for change, message in (({"model_type": "mt5"}, "model_type"),
                          ({"feed_forward_proj": "relu"}, "gated-gelu"),
                          ({"num_heads": 8, "d_kv": 4}, "disagrees")):
    with pytest.raises(ConversionError, match=message):
      cu.state_dict_to_params(hf_state, {**hf_json, **change})
  with pytest.raises(ConversionError, match="--format"):
    cu.state_dict_to_params({**hf_state, "blocks.0.norm1.weight": np.ones(32, np.float32)})
  with pytest.raises(ConversionError, match="no umT5 encoder weights"):
    cu.state_dict_to_params({"foo.weight": np.ones(3, np.float32)})
  assert convert_main(["umt5", f"--src={tmp_path / 'absent.pth'}", f"--dst={tmp_path / 'o'}"]) == 1
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  assert convert_main(["umt5", f"--src={tmp_path / 'junk.pth'}", f"--dst={tmp_path / 'o'}"]) == 1
  assert "not a checkpoint" in capsys.readouterr().err
  assert convert_main(["umt5", f"--src={hf[1]}", f"--dst={jax_dir}", "--quiet"]) == 1
  assert "already exists" in capsys.readouterr().err
  _assert_nothing_written(tmp_path / "o")


# ----------------------------------------------------------------------------------------------
# Tokenizer and TextEncoder.

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A SentencePiece unigram model (vocab 200) trained here, wrapped the transformers 5.x way:
  `T5Tokenizer.from_pretrained` on a folder holding spiece.model (the constructor's vocab_file is
  ignored in 5.x), saved with save_pretrained, to be read back with AutoTokenizer."""
  root = tmp_path_factory.mktemp("tokenizer")
  tiny_parts.train_tokenizer(root)
  return root


def test_clean_prompt():
  assert text.clean_prompt("  a\tred \n\n cat  ") == "a red cat"
  assert text.clean_prompt("fish &amp;amp; chips &lt;b&gt;&#39;hi&#39;") == "fish & chips <b>'hi'"
  assert text.clean_prompt("a&nbsp;b") == "a b"  # a non-breaking space is whitespace too
  assert text.clean_prompt("") == ""
  with pytest.raises(TypeError):
    text.clean_prompt(3)


def test_tokenizer(tokenizer_dir):
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "spm" / "spiece.model"))
  tok = text.Tokenizer.load(tokenizer_dir / "tokenizer", text_len=16)
  prompts = ["a red cat", "the  lazy fox\nruns", "", " ".join(["blue sky"] * 20)]
  ids, mask = tok(prompts)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (4, 16)
  for i, p in enumerate(prompts[:3]):
    want = sp.encode(text.clean_prompt(p)) + [1]  # EOS appended
    np.testing.assert_array_equal(ids[i, :len(want)], want)
    assert mask[i].sum() == len(want) and not ids[i, len(want):].any()  # right-padded with 0
  assert mask[3].all() and ids[3, -1] == 1  # truncated to text_len, EOS kept last
  with pytest.raises(FileNotFoundError, match="tokenizer folder"):
    text.Tokenizer.load(tokenizer_dir / "absent")
  with pytest.raises(TypeError, match="list of prompts"):
    tok("a red cat")


@pytest.fixture(scope="module")
def encoder(hf, tokenizer_dir):
  return text.TextEncoder.load(hf[2], tokenizer_dir / "tokenizer", dtype="float32")


def test_text_encoder_end_to_end(hf, encoder):
  model = hf[0]
  prompts = ["a red cat", "  the   lazy fox &amp;amp; blue\tsky\n", "", "dog " * 700]
  context, lengths = encoder(prompts)
  assert context.dtype == np.float32 and context.shape == (4, 512, 32)
  assert lengths.dtype == np.int32 and lengths.tolist()[2] == 1 and lengths[3] == 512
  for i, n in enumerate(lengths):
    assert np.all(context[i, n:] == 0.0), f"prompt {i}: rows past its length are not zero"
    assert np.all(np.abs(context[i, :n]).sum(-1) > 0)
  ids, mask = encoder.tokenizer(prompts)
  ref = _reference(model, ids, mask)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(context[i, :n], ref[i, :n], atol=ATOL, rtol=RTOL)

  # Cleaning: entities and whitespace do not change the context.
  clean, _ = encoder(["the lazy fox & blue sky"])
  np.testing.assert_array_equal(clean[0], context[1])
  # A prompt's context does not depend on the other prompts of the batch.
  alone, n_alone = encoder(["a red cat"])
  assert n_alone[0] == lengths[0]
  np.testing.assert_allclose(alone[0], context[0], atol=1e-6, rtol=0)


def test_text_encoder_batch_size_and_bf16(hf, tokenizer_dir, encoder):
  prompts = ["a red cat", "the lazy fox", "blue sky over the dog"]
  full, lengths = encoder(prompts)
  chunked = text.TextEncoder(encoder.module, encoder.params, encoder.tokenizer, batch_size=2)
  out, lengths2 = chunked(prompts)
  np.testing.assert_array_equal(lengths2, lengths)
  np.testing.assert_allclose(out, full, atol=1e-6, rtol=0)
  assert chunked([])[0].shape == (0, 512, 32)

  bf16 = text.TextEncoder.load(hf[2], tokenizer_dir / "tokenizer")  # the default: bfloat16
  assert bf16.module.config.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16.params))
  out16, lengths16 = bf16(prompts)
  np.testing.assert_array_equal(lengths16, lengths)
  assert out16.dtype == np.float32
  for i, n in enumerate(lengths):
    assert np.all(out16[i, n:] == 0.0)
  assert np.abs(out16 - full).max() < 5e-2 * np.abs(full).max()


def test_text_encoder_bad_inputs(hf, tokenizer_dir, encoder, tmp_path):
  with pytest.raises(TypeError, match="list of prompts"):
    encoder("a red cat")
  with pytest.raises(TypeError, match="str"):
    encoder(["a red cat", None])
  with pytest.raises(ValueError, match="token ids"):
    encoder.encode_ids(np.full((1, 4), 300), np.ones((1, 4)))
  with pytest.raises(FileNotFoundError):
    text.TextEncoder.load(tmp_path / "absent", tokenizer_dir / "tokenizer")
  (tmp_path / "wan").mkdir()
  (tmp_path / "wan" / "config.json").write_text(json.dumps({"kind": "wan", "config": {}}))
  with pytest.raises(ValueError, match="not a umT5"):
    text.TextEncoder.load(tmp_path / "wan", tokenizer_dir / "tokenizer")
  big = text.Tokenizer.load(tokenizer_dir / "tokenizer")
  small = umt5.UMT5Encoder(umt5.UMT5Config.preset("tiny", vocab_size=100))
  with pytest.raises(ValueError, match="vocabulary"):
    text.TextEncoder(small, None, big)
