"""Prompts -> umT5 text context for the Wan DiT.

    encoder = TextEncoder.load("ckpt/umt5", "ckpt/tokenizer")         # bfloat16 compute
    context, lengths = encoder(["a cat surfing a wave", "a red fox"])
    # context: np.float32 [2, 512, 4096], rows >= lengths[i] exactly zero; lengths: np.int32 [2]

The steps are Wan's (wan/modules/t5.py and tokenizers.py): clean each prompt (ftfy when
installed, HTML entities unescaped twice, whitespace collapsed), tokenise with the umT5 tokenizer
(EOS appended, truncated and right-padded to `text_len` = 512), run the encoder with the padding
masked, and keep each prompt's first `length` rows (its tokens plus EOS), zeroing the rest: the
`[B, 512, 4096]` context convention of API.md. ftfy is not a dependency; without it the cleaning
is the HTML and whitespace steps only (ftfy only repairs mojibake, rare in prompts).
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax.models import umt5

try:  # Wan runs ftfy.fix_text first; it is optional here (mojibake repair only).
  import ftfy  # pylint: disable=g-import-not-at-top
except ImportError:
  ftfy = None

TEXT_LEN = 512
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
  """Wan's 'whitespace' cleaning: ftfy.fix_text (only when ftfy is installed), HTML entities
  unescaped twice (so '&amp;amp;' becomes '&'), runs of whitespace collapsed to one space, ends
  stripped."""
  if not isinstance(text, str):
    raise TypeError(f"a prompt must be a str, got {type(text).__name__}.")
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip()


def _check_prompts(prompts: Sequence[str]) -> list[str]:
  if isinstance(prompts, str):
    raise TypeError("pass a list of prompts, not a single str (wrap it: [prompt]).")
  prompts = list(prompts)
  bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
  if bad:
    raise TypeError(f"every prompt must be a str; got {sorted(set(bad))}.")
  return prompts


class Tokenizer:
  """A transformers tokenizer used the umT5 way: EOS appended, truncated and right-padded."""

  def __init__(self, tokenizer: Any, text_len: int = TEXT_LEN):
    if text_len < 1:
      raise ValueError(f"text_len must be >= 1, got {text_len}.")
    self.tokenizer = tokenizer
    self.text_len = int(text_len)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
      raise ValueError(f"the tokenizer needs an EOS and a pad token (eos_token_id={eos}, "
                       f"pad_token_id={pad}); load the umT5 (google/umt5-xxl) tokenizer.")
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    if not probe or probe[-1] != eos:
      raise ValueError("the tokenizer does not append EOS to its output; umT5 expects T5-style "
                       "tokenisation (google/umt5-xxl).")
    tokenizer.padding_side = "right"  # positions count from the row start

  @classmethod
  def load(cls, directory: str | os.PathLike, *, text_len: int = TEXT_LEN) -> "Tokenizer":
    """Loads a folder (e.g. the release's google/umt5-xxl/) with AutoTokenizer, offline."""
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    path = Path(directory).expanduser()
    if not path.is_dir():
      raise FileNotFoundError(f"tokenizer folder {path} does not exist (give a local folder such "
                              f"as the release's google/umt5-xxl/, with tokenizer.json or "
                              f"spiece.model).")
    try:
      tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e
    return cls(tok, text_len)

  def __len__(self) -> int:
    return len(self.tokenizer)

  def __call__(self, prompts: Sequence[str], *,
               clean: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids int32 [N, text_len], mask int32 [N, text_len], 1 for tokens incl. EOS)."""
    prompts = _check_prompts(prompts)
    if clean:
      prompts = [clean_prompt(p) for p in prompts]
    if not prompts:
      empty = np.zeros((0, self.text_len), np.int32)
      return empty, empty.copy()
    out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.text_len,
                         add_special_tokens=True, return_attention_mask=True, return_tensors="np")
    return (np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32))


def encode_tokens(module: umt5.UMT5Encoder, params: Any, token_ids: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """umT5 output with the rows of padding set to exactly zero (jittable).

  Args:
    token_ids, mask: [B, L] (right-padded; mask 1 for tokens).
  Returns:
    context [B, L, d_model] float32, zero where mask == 0.
  """
  hidden = module.apply({"params": params}, token_ids, mask)
  return jnp.where(mask.astype(bool)[:, :, None], hidden, 0.0)


class TextEncoder:
  """Prompts -> (context [N, text_len, d_model] float32, lengths [N] int32), as numpy.

  The encoder is jitted once; it compiles once per batch size (with `batch_size` set, prompts run in
  chunks of exactly that many, padded with empty prompts, so there is a single compile).
  """

  def __init__(self, module: umt5.UMT5Encoder, params: Any, tokenizer: Tokenizer, *,
               batch_size: int | None = None):
    if not isinstance(module, umt5.UMT5Encoder):
      raise TypeError(f"module must be a UMT5Encoder, got {type(module).__name__}.")
    if len(tokenizer) > module.config.vocab_size:
      raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary "
                       f"has {module.config.vocab_size}: they do not belong together.")
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
    self.module, self.params, self.tokenizer = module, params, tokenizer
    self.batch_size = batch_size
    self._encode = jax.jit(lambda p, ids, mask: encode_tokens(module, p, ids, mask))

  @classmethod
  def load(cls, umt5_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
           dtype: str = "bfloat16", param_dtype: str | None = None, text_len: int = TEXT_LEN,
           batch_size: int | None = None, shardings: Any = None) -> "TextEncoder":
    """Loads a converted encoder (`python -m asd_jax.convert umt5`) and its tokenizer folder.

    Args:
      umt5_dir: directory written by the converter (config.json kind "umt5" + params/).
      tokenizer_dir: tokenizer folder (e.g. google/umt5-xxl/ of the Wan release).
      dtype: compute dtype of the matmuls ('bfloat16' as Wan runs the XXL, or 'float32').
      param_dtype: dtype the params are restored in (default: bfloat16 when `dtype` is, else the
        stored dtype). Norm scales are applied in float32 whatever their storage.
      text_len: padded length of the context (512 for Wan).
      batch_size: see the class docstring.
      shardings: passed to `load_converted` (None: the first local device).
    """
    from asd_jax.convert import umt5 as convert_umt5  # pylint: disable=g-import-not-at-top

    overrides = {"dtype": dtype}
    if param_dtype is None and dtype == "bfloat16":
      param_dtype = "bfloat16"
    if param_dtype is not None:
      overrides["param_dtype"] = param_dtype
    tokenizer = Tokenizer.load(tokenizer_dir, text_len=text_len)
    module, params = convert_umt5.load_converted(umt5_dir, shardings=shardings, **overrides)
    return cls(module, params, tokenizer, batch_size=batch_size)

  @property
  def text_len(self) -> int:
    return self.tokenizer.text_len

  def encode_ids(self, token_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Token ids and mask [N, L] -> context np.float32 [N, L, d_model], zero past each length."""
    token_ids, mask = np.asarray(token_ids), np.asarray(mask)
    if token_ids.ndim != 2 or mask.shape != token_ids.shape:
      raise ValueError(f"token_ids and mask must both be [N, L]; got {token_ids.shape} and "
                       f"{mask.shape}.")
    vocab = self.module.config.vocab_size
    if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= vocab):
      raise ValueError(f"token ids must lie in [0, {vocab}); got [{token_ids.min()}, "
                       f"{token_ids.max()}].")
    n = token_ids.shape[0]
    step = self.batch_size or max(n, 1)
    outs = []
    for start in range(0, n, step):
      ids, m = token_ids[start:start + step], mask[start:start + step]
      pad = step - ids.shape[0]
      if pad:  # a short last chunk runs at the same batch size (no second compile)
        ids = np.concatenate([ids, np.zeros((pad,) + ids.shape[1:], ids.dtype)])
        m = np.concatenate([m, np.zeros((pad,) + m.shape[1:], m.dtype)])
      out = self._encode(self.params, jnp.asarray(ids, jnp.int32), jnp.asarray(m, jnp.int32))
      outs.append(np.asarray(out, np.float32)[:step - pad])
    if not outs:
      return np.zeros((0, token_ids.shape[1], self.module.config.d_model), np.float32)
    return np.concatenate(outs) if len(outs) > 1 else outs[0]

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (context np.float32 [N, text_len, d_model], lengths np.int32 [N]).

    lengths[i] counts prompt i's tokens including EOS (at most text_len); context[i, lengths[i]:]
    is exactly zero. A prompt's context does not depend on the other prompts of the call.
    """
    ids, mask = self.tokenizer(prompts)
    lengths = mask.sum(axis=1).astype(np.int32)
    return self.encode_ids(ids, mask), lengths
