"""PyTorch checkpoints <-> asd_jax param trees. Command line: `python -m asd_jax.convert --help`.

Python API (the same code paths as the command line):
  asd_jax.convert.wan.convert(src, dst, ...) -> WanConfig
  asd_jax.convert.wan.state_dict_to_params(state, ...) -> (WanConfig, params)
  asd_jax.convert.wan.export_wan(src_dir, dst_file, ...)
"""

from asd_jax.convert.common import ConversionError

__all__ = ["ConversionError"]
