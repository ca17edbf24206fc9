"""The on-disk layout of an ODE-pair dataset (a TFDS ArrayRecord dataset, read without TensorFlow).

    DIR/dataset_info.json, features.json               TFDS metadata
    DIR/{name}-train.array_record-0000i-of-0000n        `examples_per_shard` examples per shard
    DIR/ode_pairs.json                                   build facts (timesteps included), last

Each example holds `index` (int64, its position), `prompt_index` (int64, its row in the prompt
dataset), `prompt` (text, to check joins) and `noisy`, `clean` as raw bfloat16 (or float32) bytes.
Contexts are not stored: the reader joins them from the prompt dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asd_jax.data import build

MARKER = "ode_pairs.json"  # written last; its absence means "incomplete"
PLAN = "plan.json"  # settings of a partial build, checked on resume
FORMAT_VERSION = 1
SPLIT = "train"
DEFAULT_NAME = "ode_pairs"
STORE_DTYPES = ("bfloat16", "float32")


def features(latent_shape: Sequence[int], num_timesteps: int, store_dtype: str = "bfloat16"):
  """The TFDS features of one example (latents as raw bytes: exact, bfloat16 allowed)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  shape = tuple(int(s) for s in latent_shape)
  dtype = build._store_dtype(store_dtype)  # pylint: disable=protected-access
  return tfds.features.FeaturesDict({
      "index": tfds.features.Scalar(np.int64, doc="position of the example in its split"),
      "prompt_index": tfds.features.Scalar(np.int64, doc="row of the prompt dataset"),
      "prompt": tfds.features.Text(doc="the prompt, to check joins with the prompt dataset"),
      "noisy": tfds.features.Tensor(shape=(num_timesteps,) + shape, dtype=dtype, encoding="bytes",
                                    doc="x at the training timesteps: [K, F, H, W, C]"),
      "clean": tfds.features.Tensor(shape=shape, dtype=dtype, encoding="bytes",
                                    doc="the ODE's end x0: [F, H, W, C]"),
  })


def shard_template(directory: Path, name: str):
  """The TFDS file-name template of the shards of dataset `name` in `directory`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.core.ShardedFileTemplate(
      data_dir=directory, template=build._FILENAME_TEMPLATE,  # pylint: disable=protected-access
      dataset_name=name, split=SPLIT, filetype_suffix="array_record")


def num_records(path: Path) -> int:
  """The number of records in one ArrayRecord file."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  reader = array_record_module.ArrayRecordReader(os.fspath(path))
  try:
    return int(reader.num_records())
  finally:
    reader.close()


def shard_paths(tmp: Path, settings: dict[str, Any], i: int) -> tuple[Path, Path]:
  """(while written, once complete) paths of shard i."""
  final = Path(shard_template(tmp, settings["name"]).sharded_filepath(
      shard_index=i, num_shards=settings["num_shards"]))
  return final.with_name(final.name + ".tmp"), final


def shard_range(settings: dict[str, Any], i: int) -> range:
  """The example indices of shard i (a build's `settings`: examples_per_shard, num_examples)."""
  per = settings["examples_per_shard"]
  return range(i * per, min((i + 1) * per, settings["num_examples"]))

