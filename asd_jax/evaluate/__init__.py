"""`python -m asd_jax.evaluate`: the paper's evaluations of a distilled generator.

  vbench        VBench videos (`{prompt}-{index}.mp4`, one folder a setting), also 20-second ones
  vbench-score  VBench's own evaluation of those folders, then Total / Quality / Semantic tables
  similarity    cosine similarity of the predicted x0 between denoising steps (Figs. 4 and 9)
  distances     n-step vs (n+1)-step and vs teacher distribution distances (Table 3)

Every video is sampled exactly as `python -m asd_jax.sample` samples it: the parts are loaded by
`asd_jax.sample.load_models`, schedules come from `asd_jax.sample.plan`, the sampler is
`asd_jax.sample.make_sampler` (`asd_jax.sampling.generate`), written by `asd_jax.sample.write_mp4`.
"""

from asd_jax.evaluate.vbench_scores import weighted_scores
from asd_jax.evaluate.videos import Setting, parse_settings, video_key, video_name

__all__ = ["Setting", "parse_settings", "video_key", "video_name", "weighted_scores"]
