"""ODE-initialisation pairs: teacher trajectories kept at the training timesteps (ALGORITHM.md 9).

    python -m asd_jax.data.ode_pairs --prompts=data/prompts --teacher=ckpt/dit --out=data/ode \
        [--num_examples=N] [--frames=21 --height=60 --width=104] [--steps=48] [--shift=5] \
        [--guidance=6] [--training_timesteps=1000,750,500,250] [--seed=0] [--batch_size=1] \
        [--dtype=bfloat16] [--store_dtype=bfloat16] [--resume]

Example i takes prompt i mod P of the prompt dataset (P prompts; `--num_examples` defaults to P, and
a larger value cycles through the prompts with fresh noise) and the noise
`normal(fold_in(key(seed), i))`; the teacher integrates the probability-flow ODE from it with
classifier-free guidance against the dataset's negative prompt, and x at the warped training
timesteps (`noisy` [K, F, H, W, C]) and at t = 0 (`clean` [F, H, W, C]) is stored. Contexts are not
stored: `OdePairDataset(DIR).with_context(PromptDataset(PROMPTS))` joins them.

Modules, one concept each:
  trajectories  the Euler grid, the examples' noise and the teacher's guided solve (also used by
                the trainer when it makes pairs on the fly)
  layout        the dataset on disk: a TFDS ArrayRecord dataset, its shards and completeness mark
  shards        generating the shards in order, each complete once renamed, and resuming
  writer        `build_ode_pairs`: checks before the teacher loads, the partial directory, the
                metadata and the mark, then one rename into place
  reader        `OdePairDataset`, `OdePairsWithContext`
  cli           `python -m asd_jax.data.ode_pairs`
"""

from asd_jax.data.ode_pairs.cli import main
from asd_jax.data.ode_pairs.layout import MARKER
from asd_jax.data.ode_pairs.reader import OdePairDataset
from asd_jax.data.ode_pairs.reader import OdePairsWithContext
from asd_jax.data.ode_pairs.trajectories import OdePairError
from asd_jax.data.ode_pairs.trajectories import OdeTimesteps
from asd_jax.data.ode_pairs.trajectories import example_noise
from asd_jax.data.ode_pairs.trajectories import generate_pairs
from asd_jax.data.ode_pairs.trajectories import ode_timesteps
from asd_jax.data.ode_pairs.writer import build_ode_pairs
from asd_jax.data.ode_pairs.writer import partial_dir

__all__ = ["MARKER", "OdePairDataset", "OdePairError", "OdePairsWithContext", "OdeTimesteps",
           "build_ode_pairs", "example_noise", "generate_pairs", "main", "ode_timesteps",
           "partial_dir"]
