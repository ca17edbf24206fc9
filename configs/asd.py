"""DMD + Adversarial Self-Distillation (the paper): 1.3B student and critic, 14B teacher.

  python -m asd_jax.train --config=configs/asd.py --workdir=runs/asd \
      --config.init.student=ckpt/ode_init/export --config.init.teacher=ckpt/wan_14b \
      --config.init.critic=ckpt/wan_1.3b --config.data.prompts=data/prompts
Arguments: `:tiny` (CPU smoke run), `:teacher=1.3b` (one-GPU setups).
The paired baseline of an ASD run is this config with --config.asd.alpha=0 (same update ratio,
batches and draws; the discriminator trains beside it and is ignored); configs/self_forcing.py
is Self Forcing's own 1:5:0 recipe.

The discriminator (the paper gives neither its learning rate nor a working noise level):
- optim.heads_lr = 1e-4 (not the critic's 4e-7). AdamW with beta1 = 0 moves a weight by about
  lr per update (g / sqrt(nu) is of order 1), at most 3,000 lr in the paper's 3,000 updates:
  1.2e-3 at 4e-7, against a fresh head's initial scale of 0.0255 (xavier, 1536 wide): the heads
  would stay where they were drawn. 1e-4 is about the smallest rate at which a consistent
  gradient moves a weight by its initial scale within the first 10% of the run (0.0255 / 300
  updates = 8.5e-5);
  with a sign-random gradient it still drifts 1e-4 x sqrt(3000) = 22% of it. Per update, relative
  to the initial scale, that is half the toy's rate (1e-3 against 0.125, 64 wide; the toy's
  measurement: docs/toy_results.md), with ten times the toy's updates.
- asd.t_law = 'uniform' (this project's): t ~ U[20, 980] without the shift, mean signal weight
  1 - t/1000 of 0.5. DMD's shifted law (the first implementation's) averages 0.25 and the
  paper's Algorithm 1 (t uniform over 1000, 937.5, 833.3, 625) 0.15, with a quarter of the pairs
  at t = 1000, pure noise that carries nothing to tell apart. On the toy world, generator frozen,
  fresh heads at the toy's rate, 150 steps, the held-out AUC for n = 1 / 2 / 3 was 0.64 / 0.56 /
  0.65 under this law, 0.62 / 0.53 / 0.56 under DMD's and 0.56 / 0.50 / 0.51 (chance) under
  Algorithm 1's (chance band 0.5 +- 0.07; one seed: docs/toy_results.md). At a tenth of the
  toy's rate every law stayed at or near chance: the rate matters first, the law second.
- asd.r_form = 'eq6': the paper's Eq. 6 with lambda 600 and sigma 0.05. Self Forcing's GAN code
  divides the difference by sigma ('sigma', 400x stronger); which one the authors ran is unknown.
Watch `disc_auc/n1..n3` in metrics.jsonl (the held-out AUC, every asd.auc_every steps): a warning
is logged when it stays at chance; ASD cannot act through a discriminator that does not learn.
"""

from asd_jax.train.config import apply_arg, base_config


def get_config(arg=None):
  c = base_config("asd")
  c.update_ratio = (1, 4, 1)
  c.asd.alpha = 0.01
  c.optim.heads_lr = 1e-4  # the discriminator heads' own rate: see the docstring
  c.asd.t_law = "uniform"  # the ASD noise level: see the docstring
  c.asd.r_form = "eq6"  # the paper's R1/R2 form
  c.mesh_shape = (1, -1, 1)  # FSDP: the states and the teacher sharded over every device
  c.device_batch = 1  # one sample a device per forward/backward; the global batch accumulated
  return apply_arg(c, arg)
