"""Every Orbax reader and writer of the package takes relative directories (`--workdir=runs/x`)."""

import jax
import jax.numpy as jnp
import numpy as np

from asd_jax import pretrained
from asd_jax.io import orbax_io
from asd_jax.models import wan
from asd_jax.train import checkpoint
from asd_jax.train.loop import export_generator


def test_as_path_makes_local_paths_absolute_and_keeps_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(orbax_io.as_path("runs/x")) == str(tmp_path / "runs" / "x")
  assert str(orbax_io.as_path("gs://bucket/runs/x")) == "gs://bucket/runs/x"


def test_saves_restores_exports_and_loads_under_relative_directories(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  flat = {("a", "w"): np.arange(6, dtype=np.float32).reshape(2, 3)}
  orbax_io.save_tree("rel/tree", flat)
  assert orbax_io.tree_metadata("rel/tree")[("a", "w")].shape == (2, 3)
  abstract = {"a": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
  np.testing.assert_array_equal(orbax_io.restore_checked("rel/tree", abstract)["a"]["w"],
                                flat[("a", "w")])

  state = {"x": jnp.arange(4.0), "step": jnp.int32(3)}
  with checkpoint.Checkpointer("rel/ckpt", save_interval_steps=1, async_save=False) as ckpt:
    ckpt.save(3, state, {"note": "relative"}, force=True)
  with checkpoint.Checkpointer("rel/ckpt", save_interval_steps=1, async_save=False) as ckpt:
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
  np.testing.assert_array_equal(restored["x"], state["x"])
  assert meta["note"] == "relative"

  cfg = wan.WanConfig.preset("tiny")
  params = wan.init_params(cfg, jax.random.key(0))
  export_generator(params, cfg, "rel/export", {"stage": "test"})
  _, loaded = pretrained.load("rel/export")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
