"""The Self Forcing DMD baseline: the ASD config with alpha = 0 and the 1:5 update ratio.

  python -m asd_jax.train --config=configs/self_forcing.py --workdir=runs/sf ...
Arguments: `:tiny`, `:teacher=1.3b`.
This is Self Forcing's own recipe (1:5:0, no discriminator). The baseline paired with an ASD run
(same update ratio 1:4:1, batches and random draws, so that a difference is ASD's alone) is
configs/asd.py with --config.asd.alpha=0: its generator equals this stage's with ratio 1:4:0 bit
for bit (tests/test_toy_paired_arms.py).
"""

from asd_jax.train.config import apply_arg, base_config


def get_config(arg=None):
  c = base_config("dmd")
  c.update_ratio = (1, 5, 0)
  c.asd.alpha = 0.0
  c.mesh_shape = (1, -1, 1)  # FSDP: the states and the teacher sharded over every device
  c.device_batch = 1  # one sample a device per forward/backward; the global batch accumulated
  return apply_arg(c, arg)
