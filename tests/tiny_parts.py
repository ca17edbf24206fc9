"""Shared test helpers: tiny random model parts on disk, the way a user gets them (PyTorch
references saved with save_pretrained, then converted by `python -m asd_jax.convert`), and a
shapes-only tensor reader for the converters' planning tests."""

from __future__ import annotations

import io
import random
from pathlib import Path

_SYLLABLES = ["ka", "to", "ri", "mu", "se", "lo", "an", "ve", "ni", "da", "pe", "zo", "ba", "el"]

class ShapeReader:
  """A TensorReader with shapes only (every tensor of `dtype`): planning must never read data."""

  def __init__(self, shapes, dtype="float32"):
    import numpy as np
    self.shapes = shapes
    self._dtype = np.dtype(dtype)

  def keys(self):
    return list(self.shapes)

  def shape(self, name):
    return self.shapes[name]

  def dtype(self, name):
    return self._dtype

  def read(self, name):
    raise AssertionError("planning read tensor data")


UMT5_D_MODEL = 32
VAE_Z_DIM = 4


def train_tokenizer(root: Path) -> Path:
  """A SentencePiece unigram model (vocab 200) trained here, wrapped the transformers 5.x way
  (`T5Tokenizer.from_pretrained` on a folder with spiece.model; the constructor's vocab_file is
  ignored in 5.x) and saved with save_pretrained. Returns the saved folder."""
  import sentencepiece as spm
  import transformers
  rnd = random.Random(0)
  words = ["".join(rnd.choice(_SYLLABLES) for _ in range(rnd.randint(1, 3))) for _ in range(300)]
  words += "a red cat dog runs over the lazy fox blue sky".split()
  sentences = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12))) for _ in range(500)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model,
                                 vocab_size=200, model_type="unigram", pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
  (root / "spm").mkdir(parents=True, exist_ok=True)
  (root / "spm" / "spiece.model").write_bytes(model.getvalue())
  tok = transformers.T5Tokenizer.from_pretrained(str(root / "spm"), extra_ids=0)
  tok.save_pretrained(str(root / "tokenizer"))
  return root / "tokenizer"


def _convert(*argv: str) -> None:
  from asd_jax.convert.__main__ import main
  rc = main([*argv, "--quiet"])
  if rc:
    raise RuntimeError(f"convert {argv[0]} failed with exit code {rc}")


def umt5(root: Path) -> Path:
  """A random UMT5EncoderModel (vocab 256, d_model 32), converted. Returns the converted folder."""
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=256, d_model=UMT5_D_MODEL, d_ff=64, num_heads=4, d_kv=8, num_layers=2,
      feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  model.save_pretrained(root / "hf_umt5")
  _convert("umt5", f"--src={root / 'hf_umt5'}", f"--dst={root / 'umt5'}")
  return root / "umt5"


def release(root: Path) -> Path:
  """A tiny official-style Wan 2.1 release folder: original key names and file names."""
  import json

  import diffusers
  import safetensors.torch
  import torch
  import transformers

  from asd_jax.convert import umt5 as umt5_convert
  from asd_jax.convert import vae as vae_convert
  from asd_jax.convert import wan_keys
  from asd_jax.models.vae import VAEConfig
  out = root / "release"
  out.mkdir(parents=True)
  torch.manual_seed(0)
  dit_model = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=VAE_Z_DIM,
      out_channels=VAE_Z_DIM, text_dim=UMT5_D_MODEL, freq_dim=32, ffn_dim=32, num_layers=2,
      cross_attn_norm=True, qk_norm="rms_norm_across_heads")
  safetensors.torch.save_file(
      {wan_keys.diffusers_to_original(k): v.contiguous()
       for k, v in dit_model.state_dict().items()},
      out / "diffusion_pytorch_model.safetensors")
  (out / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 24,
                                               "num_heads": 2, "eps": 1e-6}))
  vae_model = diffusers.AutoencoderKLWan(
      base_dim=8, z_dim=VAE_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
      temperal_downsample=[False, True, True])
  to_original = {spec.diffusers: name for name, spec in vae_convert.expected_keys(
      VAEConfig.preset("tiny")).items()}
  torch.save({to_original[k]: v for k, v in vae_model.state_dict().items()},
             out / "Wan2.1_VAE.pth")
  text_model = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=256, d_model=UMT5_D_MODEL, d_ff=64, num_heads=4, d_kv=8, num_layers=2,
      feed_forward_proj="gated-gelu", dropout_rate=0.0))
  state = {umt5_convert.hf_to_original(k): v.to(torch.bfloat16)
           for k, v in text_model.state_dict().items()}
  torch.save(state, out / "models_t5_umt5-xxl-enc-bf16.pth")
  train_tokenizer(root / "tok").rename(_mkparent(out / "google" / "umt5-xxl"))
  return out


def _mkparent(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def model_dir(root: Path) -> Path:
  """root/model with dit/, vae/, umt5/, tokenizer/, written by `convert release`."""
  _convert("release", f"--src={release(root)}", f"--dst={root / 'model'}")
  return root / "model"
