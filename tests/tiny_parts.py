"""Tiny random model parts on disk, the way a user gets them: PyTorch references saved with
save_pretrained, then converted by `python -m asd_jax.convert`. Shared by the end-to-end tests."""

from __future__ import annotations

import io
import random
from pathlib import Path

_SYLLABLES = ["ka", "to", "ri", "mu", "se", "lo", "an", "ve", "ni", "da", "pe", "zo", "ba", "el"]

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


def dit(root: Path) -> Path:
  """A random diffusers WanTransformer3DModel that reads tiny-VAE latents and tiny-umT5 text."""
  import diffusers
  import torch
  torch.manual_seed(0)
  model = diffusers.WanTransformer3DModel(
      patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=VAE_Z_DIM,
      out_channels=VAE_Z_DIM, text_dim=UMT5_D_MODEL, freq_dim=32, ffn_dim=32, num_layers=2,
      cross_attn_norm=True, qk_norm="rms_norm_across_heads").eval()
  model.save_pretrained(root / "hf_dit")
  _convert("wan", f"--src={root / 'hf_dit'}", f"--dst={root / 'dit'}")
  return root / "dit"


def vae(root: Path) -> Path:
  """A random diffusers AutoencoderKLWan (WAN.md's tiny config), converted."""
  import diffusers
  import torch
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(
      base_dim=8, z_dim=VAE_Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
      temperal_downsample=[False, True, True], latents_mean=[0.0] * VAE_Z_DIM,
      latents_std=[1.0] * VAE_Z_DIM).eval()
  model.save_pretrained(root / "hf_vae")
  _convert("vae", f"--src={root / 'hf_vae'}", f"--dst={root / 'vae'}")
  return root / "vae"


def model_dir(root: Path) -> Path:
  """root/model with dit/, vae/, umt5/, tokenizer/ (the `--model_dir` layout)."""
  out = root / "model"
  out.mkdir(parents=True, exist_ok=True)
  work = root / "work"
  work.mkdir(parents=True, exist_ok=True)
  for name, make in (("dit", dit), ("vae", vae), ("umt5", umt5)):
    make(work).rename(out / name)
  train_tokenizer(work).rename(out / "tokenizer")
  return out
