"""The accelerator programs lower on this CPU-only machine (no GPU or TPU needed).

`lowering_for(platform)` makes the layers pick that platform's kernels while tracing, and
`lower(lowering_platforms=...)` runs JAX's lowering for it: Pallas kernels are translated
to Triton here, so a kernel that only the accelerator would reject fails in this suite.
What is not checked: Triton's and XLA's own compilation, and speed.
"""

import collections
import re

import jax
import jax.numpy as jnp
import pytest

from k2jax.config import load_config
from k2jax.model.flash_attention import flash_attend
from k2jax.platform import lowering_for, target_platform
from k2jax.train.bench import _random_batch
from k2jax.train.step import init_train_state, make_train_step
from test_train import TINY

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"


def _custom_calls(lowered) -> collections.Counter:
    return collections.Counter(re.findall(r"custom_call @([^(]+)\(", lowered.as_text()))


@pytest.mark.parametrize("dims", [(64, 64), (192, 128)], ids=["head64", "mla192"])
def test_flash_forward_and_backward_lower_to_triton(dims):
    """Forward, dK/dV and dQ kernels are Triton kernels (JAX 0.10 would route them to Mosaic GPU,
    which rejects them, unless the kernel names Triton); MLA's 192-wide heads lower too."""
    dqk, dv = dims
    q = jnp.zeros((2, 256, 4, dqk), jnp.bfloat16)
    k = jnp.zeros((2, 256, 2, dqk), jnp.bfloat16)
    v = jnp.zeros((2, 256, 2, dv), jnp.bfloat16)
    seg = jnp.ones((2, 256), jnp.int32)

    def loss(q, k, v):
        out, max_logits = flash_attend(q, k, v, seg, 0.1)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(max_logits)

    with lowering_for("cuda"):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",))
    assert _custom_calls(lowered)[TRITON] == 3


@pytest.fixture(scope="module")
def tiny_mla_run():
    cfg = load_config(TINY, ["model.attention=mla", "data.seq_len=128", "train.batch_size=4"])
    setup, state = init_train_state(cfg)
    return cfg, setup, state


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_whole_train_step_lowers_for_accelerators(tiny_mla_run, platform):
    """The tiny MLA MoE's MuonClip train step with the default kernel choices: flash attention
    (3 kernels per attention stack: Triton on GPU, Mosaic on TPU) and XLA's ragged dot for the
    experts; the CPU's tiled grouped matmul on neither. T = 128: one TPU tile."""
    cfg, setup, state = tiny_mla_run
    step = make_train_step(cfg, setup)  # a new jit: its trace cache does not know the platform
    with lowering_for(platform):
        assert target_platform() == ("gpu" if platform == "cuda" else "tpu")
        lowered = step.trace(state, _random_batch(cfg)).lower(lowering_platforms=(platform,))
    text = lowered.as_text()
    calls = _custom_calls(lowered)  # dense + MoE stacks: forward, dK/dV and dQ kernels each
    assert (calls[TRITON], calls[MOSAIC]) == ((6, 0) if platform == "cuda" else (0, 6)), calls
    assert "ragged_dot" in text
    assert target_platform() == jax.default_backend()  # the block restores the host's platform


def test_lowering_for_rejects_unknown_platform():
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        with lowering_for("metal"):
            pass
