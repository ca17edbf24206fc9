"""The Self Forcing DMD baseline: the ASD config with alpha = 0 and the 1:5 update ratio.

  python -m asd_jax.train --config=configs/self_forcing.py --workdir=runs/sf ...
Arguments: `:tiny`, `:teacher=1.3b`.
"""

from asd_jax.train.config import apply_arg, base_config


def get_config(arg=None):
  c = base_config("dmd")
  c.update_ratio = (1, 5, 0)
  c.asd.alpha = 0.0
  c.mesh_shape = (1, -1, 1)  # FSDP: the states and the teacher sharded over every device
  c.device_batch = 1  # one sample a device per forward/backward; the global batch accumulated
  return apply_arg(c, arg)
