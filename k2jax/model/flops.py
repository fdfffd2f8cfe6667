"""Analytic parameter counts, training FLOPs per token, the Newton-Schulz share of a step, device
peaks and MFU.

The counts are derived from the formulas of each component, independently of
the Flax model, so tests can cross-check the two.
"""

from __future__ import annotations

from k2jax.config import Config, ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    att = cfg.attention
    d, h = cfg.d_model, att.num_heads
    if att.kind == "mla":
        qk = att.qk_nope_head_dim + att.qk_rope_head_dim
        q = d * att.q_lora_rank + att.q_lora_rank + att.q_lora_rank * h * qk if att.q_lora_rank else d * h * qk
        kv = d * (att.kv_lora_rank + att.qk_rope_head_dim) + att.kv_lora_rank
        kv += att.kv_lora_rank * h * (att.qk_nope_head_dim + att.v_head_dim)
        return q + kv + h * att.v_head_dim * d
    return d * h * att.head_dim * 2 + d * att.num_kv_heads * att.head_dim * 2


def analytic_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total / activated / embedding parameters from the config's formulas; activated counts K of E
    routed experts. `count.count_model_params` reads the same off the built model."""
    d = cfg.d_model
    per_layer_common = attention_params(cfg) + 2 * d  # + two RMSNorm scales
    dense_ffn = 3 * d * cfg.dense_ffn_dim
    moe = cfg.moe
    expert = 3 * d * moe.expert_ffn_dim
    shared = moe.num_shared_experts * expert
    router = d * moe.num_experts
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    dense_layers = cfg.num_dense_layers * (per_layer_common + dense_ffn)
    moe_common = cfg.num_moe_layers * (per_layer_common + shared + router)
    routed = cfg.num_moe_layers * moe.num_experts * expert
    active_routed = cfg.num_moe_layers * moe.experts_per_token * expert
    base = embedding + d + dense_layers + moe_common  # + final norm
    return {"total": base + routed, "activated": base + active_routed, "embedding": embedding,
            "routed_experts": routed}


def newton_schulz_fraction(ns_flops: float, cfg: Config) -> float:
    """Newton-Schulz FLOPs of one Muon update (`optim.muon.newton_schulz_flops`) over the model
    FLOPs of one training step of train.batch_size x data.seq_len tokens. Muon's cost scales
    with total parameters, the model's with activated ones times tokens."""
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return ns_flops / (flops_per_token(cfg.model, cfg.data.seq_len)["total"] * tokens)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward).

    matmul = 6 * (activated parameters - input embedding table), i.e. every weight a token
      touches, including the output head; the embedding lookup is a gather, not a matmul.
    attention = 6 * layers * heads * (qk_head_dim + v_head_dim) * seq_len / 2: the
      QK^T and PV products (2 FLOPs per MAC, x3 for training) over the causal half.
    """
    counts = analytic_param_counts(cfg)
    lookup = cfg.vocab_size * cfg.d_model
    matmul = 6.0 * (counts["activated"] - lookup)
    att = cfg.attention
    attention = 6.0 * cfg.num_layers * att.num_heads * (att.qk_head_dim + att.v_dim) * seq_len / 2
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_BF16 = {
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v5": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "b200": 2250e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name in sorted(PEAK_BF16, key=len, reverse=True):  # longest name first: "tpu v5 lite" before "tpu v5"
        if name in kind:
            return PEAK_BF16[name]
    return None


def mfu(tokens_per_second: float, flops_per_token: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak."""
    return tokens_per_second * flops_per_token / num_devices / peak
