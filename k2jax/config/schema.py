"""The sections of a run's configuration, as frozen dataclasses that validate themselves.

A run is one `Config`: what the model computes (`model`, with its `attention` and `moe` parts), how it is
computed (`execution`), the optimizer, data, loop, checkpointing and device mesh. `load.py` builds one
from YAML and `--set` overrides.

Which settings a resumed run may change is declared here, once, by `_field(..., resume=...)` on a section
of `Config` or on a field (which overrides its section's); `may_change_on_resume` reads it and
`resume_table` renders it for the README.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Optional


class ConfigError(ValueError):
    """A configuration value is unknown, ill-typed or inconsistent."""

    exit_code = 2  # of the CLI


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


def _field(default=dataclasses.MISSING, *, resume: bool, default_factory=dataclasses.MISSING):
    """A field (or section) declaring whether a resumed run may change it: `may_change_on_resume`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"resume": resume})


@dataclasses.dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE extension (as in DeepSeek-V3 / Kimi-K2 `rope_scaling`)."""

    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    def __post_init__(self):
        _require(self.factor >= 1.0, "model.attention.yarn.factor", f"must be >= 1, got {self.factor}")
        _require(self.original_max_position > 0, "model.attention.yarn.original_max_position", "must be positive")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Self-attention: "mha" (num_kv_heads == num_heads), "gqa" or "mla", and its RoPE."""

    kind: Literal["mha", "gqa", "mla"] = "mha"
    num_heads: int = 4
    num_kv_heads: int = 4  # mha/gqa only
    head_dim: int = 32  # mha/gqa query/key/value head size
    # MLA (kind == "mla"); q_lora_rank 0 means a direct query projection.
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    yarn: Optional[YarnConfig] = None

    def __post_init__(self):
        _require(self.kind in ("mha", "gqa", "mla"), "model.attention.kind",
                 f"unknown attention kind {self.kind!r}; choose 'mha', 'gqa' or 'mla'")
        _require(self.num_heads > 0, "model.attention.num_heads", f"must be positive, got {self.num_heads}")
        if self.kind == "mha":
            _require(self.num_kv_heads == self.num_heads, "model.attention.num_kv_heads",
                     f"must equal num_heads={self.num_heads} for kind='mha' (use 'gqa' for fewer)")
        if self.kind in ("mha", "gqa"):
            _require(self.num_kv_heads > 0, "model.attention.num_kv_heads", "must be positive")
            _require(self.num_heads % self.num_kv_heads == 0, "model.attention.num_heads",
                     f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
            _require(self.head_dim > 0 and self.head_dim % 2 == 0, "model.attention.head_dim",
                     f"must be positive and even (RoPE rotates pairs), got {self.head_dim}")
        if self.kind == "mla":
            _require(self.kv_lora_rank > 0, "model.attention.kv_lora_rank", "must be positive for kind='mla'")
            _require(self.q_lora_rank >= 0, "model.attention.q_lora_rank", "must be >= 0")
            _require(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                     "model.attention.qk_rope_head_dim", "must be positive and even")
            _require(self.qk_nope_head_dim > 0, "model.attention.qk_nope_head_dim", "must be positive")
            _require(self.v_head_dim > 0, "model.attention.v_head_dim", "must be positive")

    @property
    def qk_head_dim(self) -> int:
        """Width of one head's query/key (the softmax scale is its -1/2 power)."""
        if self.kind == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def v_dim(self) -> int:
        return self.v_head_dim if self.kind == "mla" else self.head_dim


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Experts and router of the MoE layers (those after model.num_dense_layers)."""

    num_experts: int = 8
    experts_per_token: int = 2
    num_shared_experts: int = 1
    expert_ffn_dim: int = 96
    router: Literal["sigmoid_bias", "softmax_topk"] = "sigmoid_bias"
    num_expert_groups: int = 1
    top_groups: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # Balance loss weight: Switch-style (softmax_topk) or DeepSeek-V3's sequence-wise loss (sigmoid_bias,
    # V3 used 1e-4 beside its bias).
    aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 0.0
    # How the sigmoid router's selection bias is updated after each step: Quantile Balancing (Kimi K3:
    # set so that every expert would have taken k/E of the step's tokens), DeepSeek-V3's sign rule
    # (bias += bias_update_rate * sign(mean load - load)), or never.
    router_balance: Literal["quantile", "sign", "none"] = "quantile"
    bias_update_rate: float = 1e-3  # step of the sign rule
    # "ragged": every token reaches its experts; "capacity": at most capacity_factor x the balanced
    # load per expert, the rest dropped (changes the model's output, hence a model setting).
    dispatch: Literal["ragged", "capacity"] = "ragged"
    capacity_factor: float = 1.25

    def check(self) -> None:
        """Validate; ModelConfig calls it when MoE layers exist."""
        _require(self.num_experts > 0, "model.moe.num_experts", "must be positive when MoE layers exist")
        _require(0 < self.experts_per_token <= self.num_experts, "model.moe.experts_per_token",
                 f"must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}")
        _require(self.expert_ffn_dim > 0, "model.moe.expert_ffn_dim", "must be positive")
        _require(self.num_shared_experts >= 0, "model.moe.num_shared_experts", "must be >= 0")
        _require(self.num_expert_groups > 0 and self.num_experts % self.num_expert_groups == 0,
                 "model.moe.num_expert_groups",
                 f"must divide num_experts={self.num_experts}, got {self.num_expert_groups}")
        _require(0 < self.top_groups <= self.num_expert_groups, "model.moe.top_groups",
                 f"must be in [1, num_expert_groups={self.num_expert_groups}], got {self.top_groups}")
        per_group = self.num_experts // self.num_expert_groups
        _require(self.experts_per_token <= self.top_groups * per_group, "model.moe.experts_per_token",
                 f"{self.experts_per_token} experts cannot be chosen from {self.top_groups} groups of {per_group}")
        _require(self.router_balance in ("quantile", "sign", "none"), "model.moe.router_balance",
                 f"unknown rule {self.router_balance!r}; choose 'quantile', 'sign' or 'none'")
        _require(self.router_balance != "quantile" or self.experts_per_token < self.num_experts,
                 "model.moe.router_balance", "quantile needs experts_per_token < num_experts (with k = E "
                 "every expert takes every token)")
        _require(self.aux_loss_coef >= 0, "model.moe.aux_loss_coef", "must be >= 0")
        _require(self.capacity_factor > 0, "model.moe.capacity_factor", "must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a DeepSeek-V3 / Kimi-K2 style MoE decoder computes: its shapes, parts and numerics.

    How it is computed (kernels, recomputation, the expert exchange) is `ExecutionConfig`.
    """

    # load_config raises it to the tokenizer's vocabulary (a prepared corpus's, or data.bpe_vocab_size)
    # unless set explicitly; an explicit value must hold the tokenizer's ids (checked when training).
    vocab_size: int = 512
    d_model: int = 128
    num_layers: int = 2
    num_dense_layers: int = 1  # leading layers with a dense FFN instead of MoE
    dense_ffn_dim: int = 384
    max_seq_len: int = 4096
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    # float32: master weights and optimizer state in float32 (K2's recipe; layers cast the weights to
    # compute_dtype). bfloat16: weights and optimizer state in bfloat16 (not K2's recipe), to save
    # memory. Gradients are accumulated over micro-batches in float32 either way.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Layers stacked on a leading axis and run by one scan (fast compiles) or unrolled. It decides the
    # parameter tree's layout, so a checkpoint restores only with the same value.
    scan_layers: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        for name in ["vocab_size", "d_model", "num_layers", "max_seq_len"]:
            _require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        _require(0 <= self.num_dense_layers <= self.num_layers, "model.num_dense_layers",
                 f"must be between 0 and num_layers={self.num_layers}, got {self.num_dense_layers}")
        if self.num_dense_layers > 0:
            _require(self.dense_ffn_dim > 0, "model.dense_ffn_dim", "must be positive when dense layers exist")
        if self.attention.kind == "mla":
            _require(self.attention.kv_lora_rank <= self.d_model, "model.attention.kv_lora_rank",
                     f"rank {self.attention.kv_lora_rank} is larger than d_model={self.d_model}")
            _require(self.attention.q_lora_rank <= self.d_model, "model.attention.q_lora_rank",
                     f"rank {self.attention.q_lora_rank} must be in [0, d_model={self.d_model}]")
        if self.has_moe:
            self.moe.check()
        _require(self.rms_eps > 0, "model.rms_eps", "must be positive")

    @property
    def has_moe(self) -> bool:
        return self.num_layers > self.num_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the model is computed: these change what it computes only by float rounding (and
    expert_buffer_factor > 0 by the tokens it drops), so a resumed run may change them (`Config.execution`)."""

    # Recompute each block's activations in the backward pass: "full" (save nothing), "dots" (save the
    # matmul outputs), or "none".
    remat: Literal["none", "full", "dots"] = "none"
    # "plain" materialises the logits (reference, CPU); "flash" is a Pallas kernel (ours in Triton on GPU,
    # interpreted on CPU, slowly; the library's Mosaic kernel on TPU); "auto" = flash on GPU when the
    # sequence tiles into 16-position blocks, on TPU into 128-position blocks, else plain.
    attention_impl: Literal["auto", "plain", "flash"] = "auto"
    # Ragged dispatch on a mesh with experts sharded over its expert axis, under shard_map:
    # all-gather the group's tokens + reduce-scatter (exact), or send each token copy to its
    # expert's shard and back (ragged all-to-all: ep/K times fewer bytes when ep > K); or left
    # to GSPMD (slower; for comparison). See k2jax/kernels/expert_parallel.py.
    expert_parallel: Literal["all_gather", "all_to_all", "gspmd"] = "all_gather"
    # all_to_all receive buffer, in multiples of a shard's balanced inflow (tokens x K); copies
    # past a full buffer are dropped (dropped_fraction). 0: the worst case, never drops.
    expert_buffer_factor: float = 0.0
    # Grouped matmul of the ragged dispatch: jax.lax.ragged_dot ("auto" on GPU), batched matmuls
    # over expert-pure row tiles (k2jax's own; "auto" on CPU, where ragged_dot is dense), or JAX's
    # megablox Pallas kernels ("auto" on TPU, where ragged_dot's weight gradient is dense;
    # interpreted elsewhere; ragged_dot where GSPMD partitions the MoE, e.g. expert_parallel=gspmd).
    grouped_matmul: Literal["auto", "ragged_dot", "tiled", "megablox"] = "auto"

    def __post_init__(self):
        _require(self.expert_buffer_factor >= 0, "execution.expert_buffer_factor", "must be >= 0 (0: never drop)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer family, its hyper-parameters and the learning-rate schedule."""

    name: Literal["muonclip", "muon", "adamw"] = _field("muonclip", resume=False)  # its state's kind: fixed
    learning_rate: float = 2e-3
    adam_learning_rate: Optional[float] = None  # defaults to learning_rate (RMS matching)
    weight_decay: float = 0.1
    # Muon
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
    # dtype of the Newton-Schulz iterations: optax's float32, or bfloat16 as K2 ran them
    ns_dtype: Literal["float32", "bfloat16"] = "float32"
    rms_scale: float = 0.2  # update RMS = rms_scale * sqrt(max(A, B)) matching
    # on a mesh of several devices: "owner" orthogonalises every matrix once, on one device, with
    # explicit all-to-alls (k2jax/optim/owner.py); "gspmd" leaves the partitioning to XLA
    muon_sharding: Literal["owner", "gspmd"] = "owner"
    # AdamW (also the non-matrix branch of Muon/MuonClip)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    # QK-Clip
    qk_clip_tau: float = 100.0
    qk_clip_alpha: float = 0.5
    # Schedule
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying
    min_lr_ratio: float = 0.1
    grad_clip_norm: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        _require(self.learning_rate >= 0, "optim.learning_rate", "must be >= 0")
        _require(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        _require(self.qk_clip_tau > 0, "optim.qk_clip_tau", "must be positive")
        _require(0 <= self.qk_clip_alpha <= 1, "optim.qk_clip_alpha", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.decay_fraction <= 1, "optim.decay_fraction", "must be in [0, 1]")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(len(self.ns_coeffs) == 3, "optim.ns_coeffs", "needs exactly three coefficients")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One prepared corpus of a data mixture (`data.sources`)."""

    path: str  # a directory written by `k2jax prepare`
    weight: float = 1.0  # share of the training tokens, relative to the other sources' weights
    max_epochs: Optional[float] = None  # refuse a run that would read this source's train split more often
    name: Optional[str] = None  # in logs (data/tokens/NAME); default: the directory's name

    def __post_init__(self):
        _require(bool(self.path), "data.sources.path", "must name a prepared corpus directory")
        _require(self.weight > 0, "data.sources.weight", f"must be positive, got {self.weight}")
        _require(self.max_epochs is None or self.max_epochs > 0, "data.sources.max_epochs",
                 f"must be positive or null, got {self.max_epochs}")

    @property
    def label(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where text comes from and how it becomes fixed-length rows."""

    corpus: str = "stdlib"  # "stdlib" (Python's own sources), a directory, a .txt/.jsonl file
    # a mixture of prepared corpora instead of `corpus` (k2jax/data/mixture.py); each {path, weight, max_epochs, name}
    sources: tuple[SourceConfig, ...] = ()
    tokenizer: Literal["byte", "bpe"] = "byte"
    bpe_vocab_size: int = 1024
    seq_len: int = 128
    heldout_fraction: float = 0.02
    max_corpus_bytes: int = 8_000_000  # cap on text read from the corpus
    seed: int = 0

    def __post_init__(self):
        _require(self.seq_len > 1, "data.seq_len", "must be > 1")
        _require(0 < self.heldout_fraction < 1, "data.heldout_fraction", "must be in (0, 1)")
        _require(self.bpe_vocab_size >= 260, "data.bpe_vocab_size", "must be >= 260")
        _require(self.max_corpus_bytes > 0, "data.max_corpus_bytes", "must be positive")
        _require(not (self.sources and self.corpus != "stdlib"), "data.sources",
                 f"set data.corpus ({self.corpus!r}) or data.sources, not both")
        labels = [s.label for s in self.sources]
        _require(len(set(labels)) == len(labels), "data.sources", f"names must differ, got {labels}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batch, evaluation and logging cadence."""

    steps: int = _field(200, resume=True)
    batch_size: int = 16  # global, in rows of data.seq_len tokens
    grad_accum: int = _field(1, resume=True)  # micro-batches per step; must divide batch_size
    eval_every: int = _field(50, resume=True)
    eval_batches: int = _field(4, resume=True)
    log_every: int = _field(10, resume=True)
    seed: int = 0
    out_dir: str = _field("runs/default", resume=True)
    progress: bool = _field(True, resume=True)

    def __post_init__(self):
        _require(self.steps > 0, "train.steps", "must be positive")
        _require(self.batch_size > 0, "train.batch_size", "must be positive")
        _require(self.grad_accum > 0, "train.grad_accum", "must be positive")
        _require(self.batch_size % self.grad_accum == 0, "train.grad_accum",
                 f"must divide train.batch_size={self.batch_size}, got {self.grad_accum}")
        _require(self.eval_every > 0, "train.eval_every", "must be positive")
        _require(self.log_every > 0, "train.log_every", "must be positive")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing cadence and retention."""

    every: int = 100
    keep: int = 2  # most recent checkpoints kept (the best eval one is kept too)
    async_save: bool = True

    def __post_init__(self):
        _require(self.every > 0, "checkpoint.every", "must be positive")
        _require(self.keep > 0, "checkpoint.keep", "must be positive")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluations run during training (k2jax/eval; `k2jax eval` runs them on a checkpoint), logged as
    eval/bpb/NAME and eval/TASK/{acc,acc_norm}."""

    every: Optional[int] = None  # steps between evaluations (and at the last step); None: train.eval_every
    # text sets scored in bits per byte: "heldout" (the run's held-out split) or NAME=PATH
    bits_per_byte: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()  # multiple-choice tasks: shipped names (stdlib_mc) or .jsonl paths
    max_bytes: Optional[int] = 65536  # of each text set (its first documents; None: all)
    max_items: Optional[int] = None  # of each task (its first items; None: all)

    def __post_init__(self):
        _require(self.every is None or self.every > 0, "eval.every", f"must be positive, got {self.every}")
        for key in ("max_bytes", "max_items"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"eval.{key}", f"must be positive or null, got {value}")
        for spec in self.bits_per_byte:
            name, sep, path = spec.partition("=")
            _require(spec == "heldout" or (sep and name and path and "/" not in name), "eval.bits_per_byte",
                     f"expected 'heldout' or NAME=PATH, got {spec!r}")
        _require(all(self.tasks), "eval.tasks", "task names must be non-empty")

    @property
    def enabled(self) -> bool:
        return bool(self.bits_per_byte or self.tasks)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        _require(sum(v == -1 for v in sizes.values()) <= 1, "mesh", "at most one axis may be -1")
        for name, v in sizes.items():
            _require(v == -1 or v > 0, f"mesh.{name}", f"must be positive or -1, got {v}")


@dataclasses.dataclass(frozen=True)
class Config:
    """A run. Each section's `resume` holds for its fields that declare none: `may_change_on_resume`."""

    model: ModelConfig = _field(default_factory=ModelConfig, resume=False)
    execution: ExecutionConfig = _field(default_factory=ExecutionConfig, resume=True)
    optim: OptimConfig = _field(default_factory=OptimConfig, resume=True)
    data: DataConfig = _field(default_factory=DataConfig, resume=False)
    train: TrainConfig = _field(default_factory=TrainConfig, resume=False)
    checkpoint: CheckpointConfig = _field(default_factory=CheckpointConfig, resume=True)
    mesh: MeshConfig = _field(default_factory=MeshConfig, resume=True)
    eval: EvalConfig = _field(default_factory=EvalConfig, resume=True)

    def __post_init__(self):
        _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                 f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")


def may_change_on_resume(key: str) -> bool:
    """Whether a resumed run may change the setting at dotted `key` ("train.steps"): the `resume` declared on
    its field, else on the nearest section above it (nothing declared: it must match the checkpoint)."""
    cls, allowed = Config, False
    for name in key.split("."):
        field = next((f for f in dataclasses.fields(cls) if f.name == name), None) if cls else None
        if field is None:
            break
        allowed = field.metadata.get("resume", allowed)
        cls = typing.get_type_hints(cls)[name]
        cls = cls if dataclasses.is_dataclass(cls) else None
    return allowed


def _leaf_keys(cls: type, prefix: str) -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys += _leaf_keys(hint, f"{prefix}{name}.") if dataclasses.is_dataclass(hint) else [prefix + name]
    return keys


def resume_table() -> str:
    """Markdown table of what a resumed run may change, per section, from the `resume` declarations (the
    README's "Kills, resumes and errors" holds it; tests/test_readme.py checks it is current)."""
    rows = ["| section | may a resumed run change it? |", "|---|---|"]
    for section in dataclasses.fields(Config):
        keys = _leaf_keys(typing.get_type_hints(Config)[section.name], f"{section.name}.")
        fixed = [k for k in keys if not may_change_on_resume(k)]
        answer = ("no" if len(fixed) == len(keys) else "yes" if not fixed else
                  "all but " + ", ".join(f"`{k}`" for k in fixed))
        rows.append(f"| `{section.name}` | {answer} |")
    return "\n".join(rows) + "\n"
