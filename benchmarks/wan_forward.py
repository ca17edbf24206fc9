"""Speed of the Wan DiT forward: asd_jax (JAX/XLA) against diffusers (PyTorch), same weights and inputs.

One process, one device, warm-up calls first, then the median of several timed repeats. Prints one
JSON object: device, config, token counts, seconds, tokens/s, the FLOP count (convention below),
achieved TFLOP/s and the JAX/PyTorch time ratio.

What is timed:
- "bidirectional": one forward over one chunk of `--frames` latent frames (x, t [B], 512-token text),
  in JAX and in PyTorch (diffusers `WanTransformer3DModel`) on identical random weights.
- "cached_chunk" (JAX only; diffusers has no KV cache): the causal forward of that chunk against a
  KV cache of `--cache_frames` latent frames, all filled (the last chunk of a video: the most work).

FLOP convention (`asd_jax.plan.flops`: matmul FLOPs, 2 per multiply-add; softmax, norms and
elementwise ops not counted): per block, self-attention projections 8*T*D^2, cross-attention q/o
4*T*D^2 and k/v 4*L*D^2 on the L=512 text tokens, FFN 4*T*D*F, self-attention scores and values 4*T*S*D (S = keys attended),
cross-attention 4*T*L*D; plus the text embedding 2*L*(text_dim*D + D^2), the time MLP and head.

On CPU the defaults use the real 1.3B architecture at a reduced size (3 latent frames of 16x26,
i.e. 128x208 pixels, 312 tokens; float32 on both sides). On a GPU use e.g.
`--height=60 --width=104 --dtype=bfloat16 --cache_frames=21` (832x480: 4,680 query tokens against a
32,760-token cache).

Usage: python benchmarks/wan_forward.py [--preset=1.3b] [--jax_only] [--repeats=5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asd_jax.models import wan  # noqa: E402
from asd_jax.plan.flops import forward_flops  # noqa: E402


def timeit(fn, warmup: int, repeats: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="1.3b")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--frames", type=int, default=3, help="latent frames in the chunk")
  ap.add_argument("--height", type=int, default=16, help="latent height (pixels / 8)")
  ap.add_argument("--width", type=int, default=26, help="latent width (pixels / 8)")
  ap.add_argument("--cache_frames", type=int, default=21, help="latent frames in the KV cache")
  ap.add_argument("--text_len", type=int, default=512)
  ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU)")
  ap.add_argument("--attention", default="auto", help="attention implementation for JAX")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--jax_only", action="store_true", help="skip PyTorch (no torch/diffusers)")
  ap.add_argument("--torch_threads", type=int, default=os.cpu_count())
  args = ap.parse_args()

  on_gpu = jax.default_backend() == "gpu"
  dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
  cfg = wan.WanConfig.preset(args.preset, dtype=dtype, attention_impl=args.attention,
                             scan_layers=False)
  B, Fc, Hl, Wl = args.batch, args.frames, args.height, args.width
  pt, ph, pw = cfg.patch_size
  tokens_per_frame = (Hl // ph) * (Wl // pw)
  tokens = Fc // pt * tokens_per_frame
  cache_tokens = args.cache_frames // pt * tokens_per_frame

  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, Fc, Hl, Wl, cfg.in_channels), dtype=np.float32)
  t = np.full((B,), 937.5, np.float32)
  ctx = rng.standard_normal((B, args.text_len, cfg.text_dim), dtype=np.float32)

  result = {
      "benchmark": "wan_forward",
      "device": {"jax": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                 "cpu_count": os.cpu_count(), "machine": platform.machine()},
      "config": {"preset": args.preset, "dim": cfg.dim, "layers": cfg.num_layers,
                 "heads": cfg.num_heads, "dtype": dtype, "attention": args.attention,
                 "batch": B, "latent_frames": Fc, "latent_hw": [Hl, Wl],
                 "pixel_hw": [Hl * 8, Wl * 8], "text_len": args.text_len,
                 "cache_frames": args.cache_frames},
      "tokens": {"query": tokens, "cache": cache_tokens},
      "flop_convention": "matmul FLOPs (2 per MAC), attention scores+values counted over the "
                         "keys attended; softmax/norms/elementwise excluded",
      "repeats": args.repeats, "warmup": args.warmup,
  }

  torch_model = None
  if args.jax_only:
    params = jax.jit(wan.init_params, static_argnums=0)(cfg, jax.random.key(0))
  else:
    import torch
    from diffusers import WanTransformer3DModel

    from asd_jax.convert.wan import state_dict_to_params
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    torch_model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps).eval()
    _, params = state_dict_to_params(
        {k: v.detach().numpy() for k, v in torch_model.state_dict().items()},
        num_heads=cfg.num_heads)
    params = jax.device_put(params)
  params = wan.split_layers(params)  # per-layer weights for the unrolled layers (as the sampler)
  module = wan.WanModel(cfg)

  # Bidirectional forward on the chunk.
  fwd = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
  xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
  times = timeit(lambda: fwd(params, xj, tj, cj).block_until_ready(), args.warmup, args.repeats)
  sec = statistics.median(times)
  flops = forward_flops(cfg, B, tokens, tokens, args.text_len)
  result["bidirectional"] = {"jax_seconds": sec, "jax_tokens_per_s": B * tokens / sec,
                             "flops": flops, "jax_tflops_per_s": flops / sec / 1e12,
                             "jax_all_seconds": times}

  if torch_model is not None:
    import torch
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch_model = torch_model.to(dev, tdtype)
    if tdtype != torch.float32:  # diffusers keeps these in float32 (as from_pretrained would)
      for name, mod in torch_model.named_modules():
        if any(k in name.split(".") for k in torch_model._keep_in_fp32_modules):
          mod.to(torch.float32)
    xt = torch.from_numpy(x.transpose(0, 4, 1, 2, 3).copy()).to(dev, tdtype)
    tt = torch.from_numpy(t).to(dev)
    ct = torch.from_numpy(ctx).to(dev, tdtype)

    def run_torch():
      with torch.inference_mode():
        torch_model(xt, tt, ct, return_dict=False)
      if dev == "cuda":
        torch.cuda.synchronize()

    ttimes = timeit(run_torch, args.warmup, args.repeats)
    tsec = statistics.median(ttimes)
    result["bidirectional"].update({
        "torch_seconds": tsec, "torch_tokens_per_s": B * tokens / tsec,
        "torch_tflops_per_s": flops / tsec / 1e12, "torch_all_seconds": ttimes,
        "torch_device": dev, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "jax_over_torch_time": sec / tsec})

  # Cached causal chunk against a full cache (JAX only).
  cache = jax.jit(lambda p, c: module.apply(
      {"params": p}, c, height=Hl, width=Wl, capacity_frames=args.cache_frames,
      method="init_cache"))(params, cj)
  last = args.cache_frames - Fc
  step = jax.jit(lambda p, x, t, cache, off: module.apply(
      {"params": p}, x, t, cache, off, method="forward_chunk"))
  times = timeit(lambda: jax.block_until_ready(step(params, xj, tj, cache, last)), args.warmup,
                 args.repeats)
  sec = statistics.median(times)
  flops = forward_flops(cfg, B, tokens, cache_tokens, 0)  # text K/V come from the cache
  flops += B * cfg.num_layers * 4 * tokens * args.text_len * cfg.dim
  result["cached_chunk"] = {"jax_seconds": sec, "jax_tokens_per_s": B * tokens / sec,
                            "flops": flops, "jax_tflops_per_s": flops / sec / 1e12,
                            "jax_all_seconds": times}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
