"""ForwardStats: each field combines over layers and micro-batches by its declared rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from k2jax.model.stats import ForwardStats, finish, merge, over_layers


def _layer(max_logit, counts=None, dropped=None, loss=None):
    moe = counts is not None
    return ForwardStats(max_logits=jnp.full((2,), max_logit), expert_counts=counts,
                        aux_loss=jnp.float32(loss) if moe else None, z_loss=jnp.float32(loss) if moe else None,
                        dropped_fraction=jnp.float32(dropped) if moe else None)


def test_layers_are_kept_summed_or_averaged_by_their_rule():
    stats = over_layers({"dense_layers.0": _layer(1.0),
                         "moe_layers.0": _layer(2.0, jnp.array([3.0, 1.0]), 0.2, 0.5),
                         "moe_layers.1": _layer(3.0, jnp.array([2.0, 2.0]), 0.4, 0.25)})
    assert set(stats.max_logits) == {"dense_layers.0", "moe_layers.0", "moe_layers.1"}
    assert set(stats.expert_counts) == set(stats.dropped_fraction_per_layer) == {"moe_layers.0", "moe_layers.1"}
    assert stats.balance_hist == {}
    assert float(stats.aux_loss) == float(stats.z_loss) == 0.75  # sum over MoE layers
    assert float(stats.dropped_fraction) == pytest.approx(0.3)  # mean over MoE layers
    np.testing.assert_array_equal(stats.layer("moe_layers.1").expert_counts, [2.0, 2.0])
    assert stats.layer("moe_layers.1").balance_hist is None
    logged = stats.logged()  # what the train step hands the host: no unlogged field
    assert logged.balance_hist is None and logged.log() == stats.log()


def test_micro_batches_merge_by_max_sum_and_mean():
    a = over_layers({"moe_layers": _layer(1.0, jnp.array([1.0, 3.0]), 0.1, 0.2)})
    b = over_layers({"moe_layers": _layer(4.0, jnp.array([2.0, 2.0]), 0.3, 0.4)})
    stats = finish(merge(a, b), 2)
    np.testing.assert_array_equal(stats.max_logits["moe_layers"], [4.0, 4.0])  # max
    np.testing.assert_array_equal(stats.expert_counts["moe_layers"], [3.0, 5.0])  # sum
    assert float(stats.aux_loss) == pytest.approx(0.3)  # mean
    assert float(stats.dropped_fraction) == pytest.approx(0.3)  # max


def test_log_entries_come_from_the_fields():
    stats = over_layers({"dense_layers": _layer(1.0), "moe_layers": _layer(2.0, jnp.array([3.0, 1.0]), 0.5, 0.0)})
    record = stats.log()
    assert record["max_logit"] == 2.0 and record["max_logit_per_layer"] == [1.0, 2.0]
    assert record["dropped_fraction_per_layer"] == [0.5] and record["expert_load_max_per_layer"] == [1.5]
    assert {"aux_loss", "z_loss", "dropped_fraction", "expert_balance"} <= set(record)
    assert "balance_hist" not in record
