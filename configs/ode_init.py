"""ODE initialisation: block-causal regression of the student onto teacher ODE pairs.

  python -m asd_jax.data.ode_pairs --prompts=data/prompts --teacher=ckpt/wan_1.3b --out=data/ode
  python -m asd_jax.train --config=configs/ode_init.py --workdir=runs/ode_init \
      --config.init.student=ckpt/wan_1.3b --config.data.ode_pairs=data/ode \
      --config.data.prompts=data/prompts
Arguments: `:tiny` (pairs made on the fly by a tiny random teacher).
"""

from asd_jax.train.config import apply_arg, base_config


def get_config(arg=None):
  c = base_config("ode_init")
  c.update_ratio = (1, 0, 0)
  c.asd.alpha = 0.0
  c.optim.b1 = 0.9  # CausVid / Self Forcing ODE regression: betas (0.9, 0.999)
  c.models.teacher.preset = "1.3b"  # the bidirectional model whose trajectories are regressed
  c.mesh_shape = (1, -1, 1)  # FSDP: the states and the teacher sharded over every device
  c.device_batch = 1  # one sample a device per forward/backward; the global batch accumulated
  return apply_arg(c, arg)
