"""python -m asd_jax.train --config=configs/NAME.py[:ARG] [--config.FIELD=VALUE ...] [--workdir=DIR]"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "run directory (resumes from it)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # checkpoint libraries log every write at INFO
  config = _CONFIG.value
  if config.stage == "toy":  # the toy pipeline runs every stage through the loop below
    from asd_jax.toy.pipeline import run  # pylint: disable=g-import-not-at-top
  else:
    from asd_jax.train.loop import train as run  # pylint: disable=g-import-not-at-top
  run(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
