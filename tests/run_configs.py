"""Helpers the training tests share: a configs/*.py config with dotted overrides, and a state's
leaves as arrays (keys as their data) for exact comparisons."""

import importlib.util
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def config(name, arg="tiny", **overrides):
  """configs/NAME.py's get_config(arg), without progress bars, with `overrides` given by dotted
  field names ("asd.alpha") or plain ones."""
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.progress = False
  return override(c, **overrides)


def override(c, **overrides):
  """Sets `overrides` on the ConfigDict `c`, by dotted field names ("asd.alpha") or plain ones;
  returns `c`."""
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def leaves(tree):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree_util.tree_leaves(tree)]
