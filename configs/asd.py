"""DMD + Adversarial Self-Distillation (the paper): 1.3B student and critic, 14B teacher.

  python -m asd_jax.train --config=configs/asd.py --workdir=runs/asd \
      --config.init.student=ckpt/ode_init/export --config.init.teacher=ckpt/wan_14b \
      --config.init.critic=ckpt/wan_1.3b --config.data.prompts=data/prompts
Arguments: `:tiny` (CPU smoke run), `:teacher=1.3b` (one-GPU setups).
"""

from asd_jax.train.config import apply_arg, base_config


def get_config(arg=None):
  c = base_config("asd")
  c.update_ratio = (1, 4, 1)
  c.asd.alpha = 0.01
  c.mesh_shape = (1, -1, 1)  # FSDP: the states and the teacher sharded over every device
  c.device_batch = 1  # one sample a device per forward/backward; the global batch accumulated
  return apply_arg(c, arg)
