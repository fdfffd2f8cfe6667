"""The ragged all-to-all that the expert exchange and owner-sharded Muon share.

`ragged_all_to_all` is XLA's jax.lax.ragged_all_to_all on GPU and TPU. XLA:CPU answers
UNIMPLEMENTED for ragged-all-to-all, so on CPU the same exchange is built from all-gathers by
the primitive's documented semantics: that is how the tests check the bookkeeping on fake
devices (slowly, and with all-gather bytes, so byte counts are read off TPU compiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax.platform import target_platform


def ragged_all_to_all_by_gather(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    """jax.lax.ragged_all_to_all with one slice (of dim-0 rows) per peer, from all-gathers."""
    del recv_sizes  # implied by the senders' send_sizes
    me = jax.lax.axis_index(axis_name)
    everyone = jax.lax.all_gather(operand, axis_name)  # (peers, *operand.shape)
    starts, sizes, dests = (jax.lax.all_gather(a, axis_name)[:, me] for a in (input_offsets, send_sizes,
                                                                                output_offsets))  # (peers,)
    rows = jnp.arange(output.shape[0])
    for source in range(everyone.shape[0]):
        pos = rows - dests[source]
        inside = ((pos >= 0) & (pos < sizes[source])).reshape((-1,) + (1,) * (output.ndim - 1))
        sent = everyone[source][jnp.clip(starts[source] + pos, 0, operand.shape[0] - 1)]
        output = jnp.where(inside, sent, output)
    return output


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """Sends operand[input_offsets[p]:+send_sizes[p]] to peer p, where it lands at output_offsets[p]
    of p's `output`; returns this device's output. XLA's on GPU/TPU, the gather form on CPU."""
    ragged = ragged_all_to_all_by_gather if target_platform() == "cpu" else jax.lax.ragged_all_to_all
    return ragged(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name)
