"""Paired arms of an ablation: every arm sees the same batches, noise and draws; the
discriminator's held-out AUC is measured and a blind discriminator is reported."""

import json
import math
import logging

import jax
import numpy as np
import pytest
import run_configs

from asd_jax.distill import losses
from asd_jax.toy import ablation
from asd_jax.train import loop
from asd_jax.train import sharding as shd
from asd_jax.train.disc_auc import DiscAuc
from asd_jax.train.steps import AUC_STREAM, DISC_STREAM, cycle_substeps



def _config(name, **overrides):
  c = run_configs.config(name, **overrides)
  c.export = False
  return c


_leaves = run_configs.leaves


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def test_generator_and_critic_batches_do_not_depend_on_the_discriminator_count():
  for step in (0, 1, 7):
    base, asd = cycle_substeps(step, (1, 4, 0)), cycle_substeps(step, (1, 4, 1))
    assert base["generator"] == asd["generator"] and base["critic"] == asd["critic"]
    assert base["disc"] == [] and asd["disc"] == [DISC_STREAM + step]
  # Consecutive over the stream (an epoch covers the dataset), and never the AUC pool's.
  subs = [s for step in range(3) for s in cycle_substeps(step, (1, 4, 2))["generator"]
          + cycle_substeps(step, (1, 4, 2))["critic"]]
  assert subs == list(range(15))
  assert max(cycle_substeps(10**6, (1, 4, 1))["disc"]) < AUC_STREAM


class _FakeAucProgram:
  """Scores of D_1..D_3 for a pool chunk: D_1 separates perfectly, D_2 is reversed, D_3 blind."""

  def __call__(self, teacher_params, state, batch, chunk):
    rows = batch["context"].shape[0]
    base = np.arange(rows, dtype=np.float32) + 100.0 * int(chunk)
    return {"f_n": np.stack([base, base + 1000.0, base * state]),
            "f_n1": np.stack([base + 1000.0, base, base * state])}


def test_disc_auc_over_the_pool_and_the_chance_warning(caplog):
  source_calls = []

  def source(substep):
    source_calls.append(substep)
    return {"context": np.full((4, 2, 3), substep, np.float32)}

  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
  watch = DiscAuc(_FakeAucProgram(), source, rows=2, batch_size=4, samples=6, every=5,
                  patience=2, mesh=mesh, rules=shd.DEFAULT_RULES)
  assert source_calls == [AUC_STREAM, AUC_STREAM + 1] and len(watch.pool) == 3
  assert watch.samples == 6 and watch.band == pytest.approx(losses.auc_chance_band(6, 6))
  assert watch.due(5, 100) and watch.due(100, 100) and not watch.due(6, 100)
  out = watch({}, 1.0)
  assert out["disc_auc/n1"] == 1.0 and out["disc_auc/n2"] == 0.0 and out["disc_auc/n3"] == 0.5
  assert out["disc_auc/at_chance_streak"] == 0.0  # D_1 is far from chance
  blind = DiscAuc(_FakeAucProgram(), source, rows=2, batch_size=4, samples=6, every=5,
                  patience=2, mesh=mesh, rules=shd.DEFAULT_RULES)
  blind.program = lambda tp, state, batch, chunk: {"f_n": np.zeros((3, 2)),
                                                   "f_n1": np.zeros((3, 2))}
  with caplog.at_level(logging.WARNING, logger="asd_jax.train.disc_auc"):
    blind({}, None)
    assert not caplog.records
    blind({}, None)
  assert len(caplog.records) == 1 and "stayed at chance" in caplog.records[0].message
  assert blind.state() == {"at_chance": 2, "warned": 1}


def test_ablation_paired_statistics_by_hand():
  st = ablation.paired([1.0, 2.0, 3.0, 4.0])
  assert st["mean"] == 2.5 and st["sd"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
  se = st["sd"] / 2.0
  assert st["ci95"][0] == pytest.approx(2.5 - 3.182446 * se, rel=1e-5)  # t(0.975, 3)
  t = 2.5 / se  # the paired t-test on 3 df; its CDF in closed form (Student, nu = 3)
  cdf = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
  assert st["p"] == pytest.approx(2 * (1 - cdf), rel=1e-6)
  assert st["mde80"] == pytest.approx((3.182446 + 0.978472) * se, rel=1e-5)
  assert ablation.arm_names([0.1, 0.3]) == ["asd@0", "asd@0.1", "asd@0.3"]


@pytest.mark.slow
def test_alpha_zero_arms_are_identical_and_equal_the_self_forcing_baseline(tmp_path):
  """Two alpha-0 ASD arms agree bit for bit (the AUC watch in one of them changes nothing), and
  their generator, EMA and critic equal the Self Forcing stage's with the same g:c ratio: the
  discriminator's updates draw neither the others' batches nor their random numbers. An arm with
  alpha > 0 differs (the test can fail)."""
  ratio = {"update_ratio": (1, 2, 1)}
  a = loop.train(_config("asd", total_steps=3, **{"asd.alpha": 0.0, "asd.auc_every": 1,
                                                  "asd.auc_samples": 2}, **ratio), tmp_path / "a")
  b = loop.train(_config("asd", total_steps=3, **{"asd.alpha": 0.0, "asd.auc_every": 0},
                         **ratio), tmp_path / "b")
  assert _same(a, b)
  sf = loop.train(_config("self_forcing", total_steps=3, update_ratio=(1, 2, 0)), tmp_path / "sf")
  for field in ("generator", "generator_ema", "critic", "critic_opt", "gen_opt"):
    assert _same(getattr(a, field), getattr(sf, field)), field
  asd = loop.train(_config("asd", total_steps=3, **{"asd.alpha": 0.5, "asd.auc_every": 0},
                           **ratio), tmp_path / "asd")
  assert not _same(a.generator, asd.generator)
  records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text()
             .splitlines()]
  assert all(0.0 <= r[f"disc_auc/n{n}"] <= 1.0 for r in records for n in (1, 2, 3))
  # The alpha > 0 arm drew the same exits as the baseline: its ASD draws have their own stream.
  asd_records = [json.loads(line) for line in (tmp_path / "asd" / "metrics.jsonl").read_text()
                 .splitlines()]
  assert [r["generator/exit_index"] for r in records] == \
      [r["generator/exit_index"] for r in asd_records]


@pytest.mark.parametrize("field,value", [("optim.heads_lr", 0.0), ("asd.t_law", "beta"),
                                         ("asd.r_form", "R1"), ("asd.auc_every", -1),
                                         ("asd.auc_samples", 1), ("asd.auc_patience", 0)])
def test_the_discriminator_fields_are_validated(field, value):
  from asd_jax.train.config import validate  # pylint: disable=g-import-not-at-top
  validate(_config("asd"), check_paths=False)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    validate(_config("asd", **{field: value}), check_paths=False)
