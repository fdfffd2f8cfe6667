"""Named model shapes: the published Kimi-K2 and DeepSeek-V3, and a K2-shaped family.

The family keeps K2's proportions (MLA, one dense layer, one shared expert,
8-of-N sparse routing) and varies width, depth, heads and sparsity through one
function, `k2_family`, so every experiment differs from K2 only in the knobs
it names. A preset may also recommend how to run it (`preset_execution`: the
larger ones recompute activations to fit), which `model.preset` applies unless
the config's execution section says otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib

from k2jax.config.schema import AttentionConfig, ConfigError, ExecutionConfig, ModelConfig, MoEConfig, YarnConfig

KIMI_K2 = ModelConfig(
    vocab_size=163840, d_model=7168, num_layers=61, num_dense_layers=1, dense_ffn_dim=18432,
    max_seq_len=131072,
    attention=AttentionConfig(
        kind="mla", num_heads=64, num_kv_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, rope_theta=50000.0,
        yarn=YarnConfig(factor=32.0, original_max_position=4096, beta_fast=1.0, beta_slow=1.0,
                        mscale=1.0, mscale_all_dim=1.0)),
    moe=MoEConfig(
        num_experts=384, experts_per_token=8, num_shared_experts=1, expert_ffn_dim=2048, router="sigmoid_bias",
        num_expert_groups=1, top_groups=1, routed_scaling_factor=2.827, norm_topk_prob=True,
        router_balance="sign", bias_update_rate=1e-3),  # the aux-loss-free bias of DeepSeek-V3, which K2 keeps
    rms_eps=1e-6, tie_embeddings=False,
    param_dtype="float32", compute_dtype="bfloat16",  # float32 master weights and optimizer state
)

DEEPSEEK_V3 = dataclasses.replace(
    KIMI_K2, vocab_size=129280, num_dense_layers=3,
    attention=dataclasses.replace(
        KIMI_K2.attention, num_heads=128, num_kv_heads=128, rope_theta=10000.0,
        yarn=YarnConfig(factor=40.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0,
                        mscale=1.0, mscale_all_dim=1.0)),
    moe=dataclasses.replace(
        KIMI_K2.moe, num_experts=256, num_expert_groups=8, top_groups=4, routed_scaling_factor=2.5,
        aux_loss_coef=1e-4),  # V3's complementary sequence-wise balance loss beside the bias
)


def k2_family(*, d_model: int, num_layers: int, num_heads: int, sparsity: int, experts_per_token: int = 8,
              vocab_size: int = 512, attention: str = "mla", num_dense_layers: int = 1, q_lora_rank: int = 0,
              kv_lora_rank: int | None = None) -> ModelConfig:
    """A K2-proportioned model: num_experts = sparsity * experts_per_token.

    Widths follow K2's ratios to d_model (7168): dense FFN x2.57, expert FFN x0.286,
    kv_lora_rank / d = 1/14, head size d / num_heads split 2:1 into nope:rope for MLA.
    """
    head = max(8, d_model // num_heads)
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_dense_layers=num_dense_layers,
        dense_ffn_dim=_round(d_model * 18432 / 7168), max_seq_len=4096,
        attention=AttentionConfig(
            kind=attention, num_heads=num_heads, num_kv_heads=num_heads, head_dim=head, q_lora_rank=q_lora_rank,
            kv_lora_rank=kv_lora_rank or max(16, _round(d_model / 14)), qk_nope_head_dim=head,
            qk_rope_head_dim=max(8, head // 2), v_head_dim=head, rope_theta=50000.0),
        moe=MoEConfig(
            num_experts=sparsity * experts_per_token, experts_per_token=experts_per_token, num_shared_experts=1,
            expert_ffn_dim=_round(d_model * 2048 / 7168), router="sigmoid_bias", routed_scaling_factor=2.827),
    )


def _round(x: float, multiple: int = 8) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


PRESETS: dict[str, ModelConfig] = {
    "kimi-k2": KIMI_K2,
    "deepseek-v3": DEEPSEEK_V3,
    # CPU unit tests: compiles in seconds.
    "tiny": k2_family(d_model=64, num_layers=2, num_heads=4, sparsity=4, experts_per_token=2,
                      vocab_size=320, kv_lora_rank=16),
    # Default training run: a few minutes on a 2-core CPU.
    "small": k2_family(d_model=128, num_layers=4, num_heads=4, sparsity=8, experts_per_token=2,
                       vocab_size=320),
    # Between the two: a CPU benchmark size, or quick single-GPU iterations.
    "medium": k2_family(d_model=512, num_layers=8, num_heads=8, sparsity=8, experts_per_token=8,
                        vocab_size=32768),
    # One GPU: about 1B activated parameters with a 32k vocabulary.
    "base": k2_family(d_model=2048, num_layers=16, num_heads=16, sparsity=8, experts_per_token=8,
                      vocab_size=32768),
    # Its dense equivalent (same width/depth, dense FFN everywhere) for MFU comparisons.
    "base-dense": k2_family(d_model=2048, num_layers=16, num_heads=16, sparsity=8, experts_per_token=8,
                            vocab_size=32768, num_dense_layers=16),
    # TPU slices.
    "large": k2_family(d_model=3072, num_layers=28, num_heads=24, sparsity=32, experts_per_token=8,
                       vocab_size=163840, q_lora_rank=768),
}

# How the larger presets are meant to run: their activations fit only when recomputed.
_EXECUTION = {
    "kimi-k2": ExecutionConfig(remat="full"),
    "deepseek-v3": ExecutionConfig(remat="full"),
    "base": ExecutionConfig(remat="dots"),
    "base-dense": ExecutionConfig(remat="dots"),
    "large": ExecutionConfig(remat="full"),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)}.{hint}")
    return PRESETS[name]


def preset_execution(name: str) -> ExecutionConfig:
    """The execution a preset recommends (ExecutionConfig's defaults for the small ones)."""
    get_preset(name)  # an unknown name fails here, with the known ones
    return _EXECUTION.get(name, ExecutionConfig())
