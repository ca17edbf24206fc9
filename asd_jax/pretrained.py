"""Load a converted network: `module, params = load(DIR)`.

DIR is what `python -m asd_jax.convert` (or a training export) writes: `config.json` with a "kind"
and a "config", and `params/`, an Orbax checkpoint of the param tree. Params come back as plain
nested dicts of jax arrays, restored straight into the given shardings when there are some (so a
14B model never has to exist whole on one host).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any


from asd_jax.io import orbax_io
from asd_jax.models import wan

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# Other kinds are loaded by `load_converted(directory, *, shardings, **overrides)` in their
# converter module.
_KIND_MODULES = {"vae": "asd_jax.convert.vae", "umt5": "asd_jax.convert.umt5"}


def _kind_module(kind: str):
  name = _KIND_MODULES[kind]
  if importlib.util.find_spec(name) is None:
    raise NotImplementedError(f"loading kind {kind!r} is not implemented yet.")
  return importlib.import_module(name)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The config.json of a converted directory: {"kind": ..., "config": {...}, "source": {...}}."""
  path = Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist; is {directory} a directory written by "
                            f"`python -m asd_jax.convert`?")
  meta = json.loads(path.read_text())
  if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
    raise ValueError(f"{path} lacks the 'kind' and 'config' entries of a converted checkpoint.")
  return meta


def _model_config(meta: dict[str, Any], overrides: dict[str, Any]) -> wan.WanConfig:
  kind = meta["kind"]
  if kind != "wan":
    raise ValueError(f"checkpoint kind {kind!r} in config.json is not a Wan DiT.")
  arch = sorted(set(overrides) & set(wan.WanConfig.ARCH_FIELDS))
  changed = [k for k in arch if overrides[k] != meta["config"].get(k)]
  if changed:
    raise ValueError(f"cannot override architecture fields {changed} at load time: the params "
                     f"were made for {[(k, meta['config'].get(k)) for k in changed]}. Override "
                     f"execution fields only (dtype, param_dtype, attention_impl, scan_layers, ...).")
  return wan.WanConfig.from_dict({**meta["config"], **overrides})


def _restore(directory: Path, cfg: wan.WanConfig, shardings: Any, dtype: Any) -> dict[str, Any]:
  return orbax_io.restore_checked(directory / PARAMS_DIR, wan.abstract_params(cfg),
                                 shardings=shardings, dtype=dtype,
                                 what="the WanConfig of config.json")


def load_params(directory: str | os.PathLike, *, shardings: Any = None,
                dtype: Any = None) -> dict[str, Any]:
  """Params of a converted directory as nested dicts of jax arrays.

  Args:
    directory: written by `python -m asd_jax.convert`.
    shardings: None (first local device), one `jax.sharding.Sharding` for every leaf, or a pytree
      of shardings shaped like the params: each leaf is read straight into its shards.
    dtype: cast every leaf on restore (default: the stored dtype).
  """
  directory = Path(directory)
  meta = read_config(directory)
  cfg = _model_config(meta, {})
  return _restore(directory, cfg, shardings, dtype)


def load(directory: str | os.PathLike, *, shardings: Any = None,
         **config_overrides) -> tuple[Any, dict[str, Any]]:
  """(module, params) of a converted directory.

  Args:
    directory: written by `python -m asd_jax.convert` (config.json + params/).
    shardings: see `load_params`.
    **config_overrides: execution fields of the model config, e.g. dtype='bfloat16',
      scan_layers=False, attention_impl='cudnn'. `param_dtype` also casts the restored params.

  Returns:
    (module, params): `module.apply({'params': params}, ...)` runs the network.
  """
  directory = Path(directory)
  meta = read_config(directory)
  if meta["kind"] in _KIND_MODULES:
    return _kind_module(meta["kind"]).load_converted(directory, shardings=shardings,
                                                     **config_overrides)
  if meta["kind"] != "wan":
    raise ValueError(f"unknown checkpoint kind {meta['kind']!r} in {directory}/config.json; "
                     f"known: {['wan', *_KIND_MODULES]}.")
  cfg = _model_config(meta, config_overrides)
  dtype = config_overrides.get("param_dtype")
  params = _restore(directory, cfg, shardings, dtype)
  return wan.WanModel(cfg), params
