"""The accelerator programs lower on this CPU-only machine (no GPU or TPU needed).

`lowering_for(platform)` makes the layers pick that platform's kernels while tracing, and
`lower(lowering_platforms=...)` runs JAX's lowering for it: Pallas kernels are translated
to Triton here, so a kernel that only the accelerator would reject fails in this suite.
What is not checked: Triton's and XLA's own compilation, and speed.
"""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from k2jax.cli import main
from k2jax.config import load_config
from k2jax.kernels.flash_attention import flash_attend
from k2jax.platform import lowering_for, target_platform
from k2jax.tools.lowering import lower_train_step, summarize

TINY = Path(__file__).parents[1] / "experiments" / "tiny.yaml"
TRITON = "__gpu$xla.gpu.triton"


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
    assert summarize(lowered)["Triton kernel"] == 3


def test_lower_command_lowers_the_train_step_for_gpu(tmp_path, capsys):
    """`k2jax lower` on the tiny MuonClip MoE, from an abstract state: flash attention as Triton
    kernels (forward, dK/dV, dQ for the dense and the MoE stack) and XLA's ragged dot."""
    out = tmp_path / "step.mlir"
    assert main(["lower", str(TINY), "--platform", "cuda", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train step lowered for cuda" in printed
    assert re.search(r"Triton kernel\s+6\n", printed) and not re.search(r"ragged_dot\s+0\n", printed), printed
    assert TRITON in out.read_text()
    assert target_platform() == jax.default_backend()  # the platform is the host's again


def test_train_step_lowers_for_tpu_with_mosaic_flash():
    """The MLA variant for TPU: the library's Mosaic flash kernels (T = 128, one tile) and the
    megablox grouped-matmul kernels (no ragged dot: XLA's TPU ragged dot computes dW densely)."""
    cfg = load_config(TINY, ["model.attention.kind=mla", "data.seq_len=128", "train.batch_size=4"])
    lowered, mesh = lower_train_step(cfg, "tpu")
    counts = summarize(lowered)
    assert (counts["Triton kernel"], counts["Mosaic TPU kernel"], counts["ragged_dot"]) == (0, 12, 0), counts
    assert mesh == {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}


def test_lowering_for_rejects_unknown_platform():
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        with lowering_for("metal"):
            pass
