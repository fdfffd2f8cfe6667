"""make_optimizer's variants, `describe` and the learning-rate schedules (k2jax/optim/__init__.py, schedules.py)."""

import dataclasses

import chex
import jax
import pytest
from param_trees import k2_tree

from k2jax.config import OptimConfig
from k2jax.optim import describe, make_optimizer, make_schedule


@pytest.mark.parametrize("name", ["muonclip", "muon", "adamw"])
def test_factory_variants_accept_the_same_step(name):
    params, infos = k2_tree()
    tx = make_optimizer(OptimConfig(name=name, warmup_steps=2), infos, total_steps=10)
    state = tx.init(params)
    updates, state = jax.jit(lambda s: tx.update(params, s, params, attn_max_logits={}))(state)
    chex.assert_tree_all_finite(updates)
    rules = {row[0]: row[2] for row in describe(infos, name)}
    assert rules["embed"] == "adamw" and rules["norm"] == "adamw_no_decay"
    assert rules["experts"].startswith("muon") == (name != "adamw")


def test_schedules():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    wsd = make_schedule(dataclasses.replace(cfg, schedule="wsd"), 100)
    cosine = make_schedule(dataclasses.replace(cfg, schedule="cosine"), 100)
    assert float(wsd(0)) == 0.0 and float(wsd(5)) == pytest.approx(0.5)
    assert float(wsd(10)) == pytest.approx(1.0) and float(wsd(79)) == pytest.approx(1.0)  # stable phase
    assert float(wsd(100)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.1)
    assert float(cosine(55)) == pytest.approx(0.55, abs=1e-2)  # halfway down the cosine
