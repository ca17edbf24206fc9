"""The toy world end to end on a CPU: teacher -> ODE init -> DMD+ASD -> evaluation -> report.

  python -m asd_jax.train --config=configs/toy.py --workdir=runs/toy

Every stage runs the real training loop (`asd_jax.train.loop.train`) on the toy world of
`asd_jax.toy` (TOY.md) and writes its own checkpoints and export under the workdir; a stage whose
export exists is skipped, a killed stage resumes. The evaluation samples the distilled generator at
4, 2, 1, 2* and 1* steps (both FFE variants) and scores it against the exact density. The
ablation over seeds and variants is `python -m asd_jax.toy.ablation`.

Arguments and the toy-specific choices: `asd_jax/toy/config.py`.
"""

from asd_jax.toy.config import get_config

__all__ = ["get_config"]
