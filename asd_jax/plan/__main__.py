"""python -m asd_jax.plan --config=configs/NAME.py[:ARG] --target=TARGET [--config.FIELD=VALUE ...]
    [--json=FILE] [--sample [--num_frames=81 --height=480 --width=832 --steps=4 ...]]
    [--ode_pairs [--ode_steps=48 --ode_batch_size=1 --ode_dtype=bfloat16 ...]]

Compiles every program of the config's training stage (or, with --sample, the chunk sampler of its
student and the streaming VAE decode of one chunk, at the sample CLI's flags; with --ode_pairs, the
ODE-pair builder's teacher solve at its flags, prefixed ode_) for TARGET, which
need not be attached: a TPU slice (v5p-8, v6e-1, v5e-1, ...) or a GPU host (h100x8, h100x1, ...).
Prints a table of per-device memory against the device's; exit status 0 when every program fits, 3
when one does not, 2 on bad input (nothing is compiled then).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from asd_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_TARGET = flags.DEFINE_string("target", None, "e.g. v5p-8, v6e-1, v5e-1, h100x8, h100x1")
_JSON = flags.DEFINE_string("json", None, "also write every figure to this JSON file")
_SAMPLE = flags.DEFINE_bool("sample", False, "plan the sampler and the VAE decode instead")
_ONLY = flags.DEFINE_list("only", None, "compile only these programs (names as in the table)")
_FRACTION = flags.DEFINE_float(
    "memory_fraction", 1.0, "the share of each device's memory a plan may use (e.g. 0.75: jax's "
    "default preallocation on GPUs; below 1 to keep a margin)", lower_bound=0.0, upper_bound=1.0)
_EFFICIENCY = flags.DEFINE_float(
    "kernel_efficiency", None, "the share of peak assumed for the attention kernels (splash, "
    "cuDNN) in the time breakdown, in (0, 1]: XLA cannot see inside them (an assumption, not a "
    "measurement; default asd_jax.plan.breakdown.DEFAULT_KERNEL_EFFICIENCY)")
_PARAM_DTYPE = flags.DEFINE_enum("sample_param_dtype", "float32", ["float32", "bfloat16"],
                                 "--sample: the stored dtype of the generator's and VAE's params "
                                 "(the sample CLI's --param_dtype)")
# The sample CLI's flags (`python -m asd_jax.sample`); unset ones keep its defaults.
_SAMPLE_INTS = ("steps", "first_chunk_steps", "training_steps", "num_frames", "height", "width",
                "cache_frames", "sink_frames")
for _name in _SAMPLE_INTS:
  flags.DEFINE_integer(_name, None, f"--sample: the sample CLI's --{_name}")
flags.DEFINE_string("first_chunk_timesteps", None, "--sample: the sample CLI's flag")
flags.DEFINE_string("later_chunk_timesteps", None, "--sample: the sample CLI's flag")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "--sample: the sample CLI's --dtype")
flags.DEFINE_bool("offload_dit", False, "--sample: the sample CLI's --offload_dit (the DiT's "
                  "params in host memory while the VAE decodes)")
# The ODE-pair builder's flags (`python -m asd_jax.data.ode_pairs`), prefixed: --ode_steps=48 ...
_ODE_PAIRS = flags.DEFINE_bool("ode_pairs", False, "plan the ODE-pair builder's teacher solve "
                               "(the config's models.teacher) instead")
_ODE_NAMES = ("frames", "height", "width", "steps", "shift", "guidance", "training_timesteps",
              "batch_size", "dtype", "param_dtype")
for _name in _ODE_NAMES:
  flags.DEFINE_string(f"ode_{_name}", None, f"--ode_pairs: the builder's --{_name}")
FLAGS = flags.FLAGS


def _sample_argv() -> list[str]:
  names = _SAMPLE_INTS + ("first_chunk_timesteps", "later_chunk_timesteps", "dtype")
  return ([f"--{n}={FLAGS[n].value}" for n in names if FLAGS[n].value is not None] +
          (["--offload_dit"] if FLAGS["offload_dit"].value else []))


def _ode_argv() -> list[str]:
  return [f"--{n}={FLAGS['ode_' + n].value}" for n in _ODE_NAMES
          if FLAGS["ode_" + n].value is not None]


def _log(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def main(argv) -> int:
  if len(argv) > 1:
    return _error(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _TARGET.value:
    return _error("give --config=configs/NAME.py[:ARG] and --target=TARGET")
  from asd_jax import plan, targets  # pylint: disable=g-import-not-at-top
  from asd_jax.plan import breakdown as bd  # pylint: disable=g-import-not-at-top
  targets.quiet_cuda_plugin()  # before jax looks for its plugins: GPU targets need it
  config = _CONFIG.value
  try:
    target, mesh, world = plan.resolve(config, _TARGET.value, _FRACTION.value)
    if _SAMPLE.value and _ODE_PAIRS.value:
      return _error("--sample and --ode_pairs plan different programs; give one of them")
    if _SAMPLE.value:
      plan.sample_request(_sample_argv())  # checks the sample flags before any compile
    if _ODE_PAIRS.value:
      plan.ode_pairs_request(_ode_argv())
  except (plan.BadInput, RuntimeError, FileNotFoundError, ValueError) as e:
    return _error(str(e))
  only = tuple(_ONLY.value) if _ONLY.value else None
  efficiency = {}
  if _EFFICIENCY.value is not None:
    try:
      efficiency = {"kernel_efficiency": bd.check_kernel_efficiency(_EFFICIENCY.value)}
    except ValueError as e:
      return _error(f"--{e}")
  try:
    if _ODE_PAIRS.value:
      entries = plan.plan_ode_pairs(config, target, mesh, _ode_argv(), only=only, log=_log,
                                    **efficiency)
    elif _SAMPLE.value:
      entries = plan.plan_sampler(config, target, mesh, _sample_argv(),
                                  param_dtype=_PARAM_DTYPE.value, only=only, log=_log,
                                  **efficiency)
    else:
      entries = plan.plan_training(config, target, mesh, world, only=only, log=_log,
                                   **efficiency)
  except plan.BadInput as e:  # raised before the first compile
    return _error(str(e))
  config_name = FLAGS["config"].serialize().split("=", 1)[-1]
  print(plan.table(entries, target))
  for note in plan.NOTES:
    print(f"note: {note}")
  if _JSON.value:
    kind = "ode_pairs" if _ODE_PAIRS.value else "sample" if _SAMPLE.value else "train"
    extra = {"kind": kind, "stage": config.stage,
             "sample_flags": _sample_argv() if _SAMPLE.value else None,
             "ode_pairs_flags": _ode_argv() if _ODE_PAIRS.value else None,
             "config_values": config.to_dict()}
    plan.write_json(_JSON.value, plan.report(entries, target, mesh, config_name, extra))
  if any(e.error and not e.error.startswith("out of memory") for e in entries):
    return 1
  return 0 if all(e.fits for e in entries) else 3


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_absl_flags)
