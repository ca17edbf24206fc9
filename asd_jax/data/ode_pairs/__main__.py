"""python -m asd_jax.data.ode_pairs (see asd_jax/data/ode_pairs/cli.py)."""

import sys

from asd_jax.data.ode_pairs.cli import main

if __name__ == "__main__":
  sys.exit(main())
