"""The Hugging Face DeepSeek-V3 layout (used by Kimi-K2 checkpoints): config.json <-> ModelConfig,
state dicts in and out.

Which HF tensor makes which k2jax weight (transposes, rotary permutation, expert layouts) is the table in
`hf_layout`; reading it back for export is `to_hf_state_dict`. Streamed, sharded import of real (bf16,
FP8, int4) checkpoints is `interop.importer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from k2jax.config import AttentionConfig, ModelConfig, MoEConfig, YarnConfig
from k2jax.interop import hf_layout


class InteropError(ValueError):
    """A Hugging Face state dict or config does not fit the k2jax model."""

    exit_code = 2  # of the CLI: an input error


def config_from_hf(hf: Mapping) -> ModelConfig:
    """ModelConfig from a DeepSeek-V3 / Kimi-K2 config.json dict."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    yarn = None
    if rope.get("type", rope.get("rope_type")) == "yarn":
        yarn = YarnConfig(factor=float(rope["factor"]), original_max_position=int(rope["original_max_position_embeddings"]),
                          beta_fast=float(rope.get("beta_fast", 32)), beta_slow=float(rope.get("beta_slow", 1)),
                          mscale=float(rope.get("mscale", 1)), mscale_all_dim=float(rope.get("mscale_all_dim", 0)))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_dense_layers=hf.get("first_k_dense_replace", 0), dense_ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 4096),
        attention=AttentionConfig(
            kind="mla", num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_attention_heads"],
            q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], rope_theta=float(theta), yarn=yarn),
        moe=MoEConfig(
            num_experts=hf["n_routed_experts"], experts_per_token=hf["num_experts_per_tok"],
            num_shared_experts=hf.get("n_shared_experts") or 0, expert_ffn_dim=hf["moe_intermediate_size"],
            router="sigmoid_bias", num_expert_groups=hf.get("n_group") or 1, top_groups=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True))),
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(cfg: ModelConfig) -> dict:
    """The DeepSeek-V3 config.json dict of `cfg` (config_from_hf's inverse); InteropError for a model the
    layout cannot hold (it has MLA attention and the sigmoid router with a selection bias only)."""
    att, moe = cfg.attention, cfg.moe
    if att.kind != "mla" or moe.router != "sigmoid_bias":
        raise InteropError(f"the DeepSeek-V3 layout needs model.attention.kind='mla' and model.moe.router="
                           f"'sigmoid_bias'; this model has {att.kind!r} and {moe.router!r}")
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "float32",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.num_dense_layers, "intermediate_size": cfg.dense_ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.num_heads, "q_lora_rank": att.q_lora_rank or None,
        "kv_lora_rank": att.kv_lora_rank, "qk_nope_head_dim": att.qk_nope_head_dim,
        "qk_rope_head_dim": att.qk_rope_head_dim, "v_head_dim": att.v_head_dim, "rope_theta": att.rope_theta,
        "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.experts_per_token,
        "n_shared_experts": moe.num_shared_experts, "moe_intermediate_size": moe.expert_ffn_dim,
        "n_group": moe.num_expert_groups, "topk_group": moe.top_groups, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "routed_scaling_factor": moe.routed_scaling_factor,
        "norm_topk_prob": moe.norm_topk_prob, "rms_norm_eps": cfg.rms_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.attention.yarn is not None:
        y = cfg.attention.yarn
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": y.factor, "original_max_position_embeddings":
                              y.original_max_position, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                              "mscale": y.mscale, "mscale_all_dim": y.mscale_all_dim}
    return hf


def check_tensors(cfg: ModelConfig, present: Mapping[str, tuple], *, fused_experts: bool,
                  mtp_layers: int = 0) -> list[str]:
    """Refuse a checkpoint (name -> shape) that misses, mis-shapes or adds a tensor, naming it; returns the
    multi-token-prediction tensors it holds, which k2jax skips."""
    expected = hf_layout.expected_tensors(hf_layout.sources(cfg, fused_experts=fused_experts))
    missing = [name for name in expected if name not in present]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InteropError(f"missing key {missing[0]!r}{more} in the Hugging Face checkpoint")
    for name, shape in expected.items():
        if tuple(present[name]) != shape:
            raise InteropError(f"{name}: expected shape {shape}, got {tuple(present[name])}")
    extra = [name for name in present if name not in expected and "rotary_emb" not in name]
    skipped = [name for name in extra if hf_layout.is_mtp(name, cfg, mtp_layers)]
    unused = sorted(set(extra) - set(skipped))
    if unused:
        raise InteropError(f"{len(unused)} Hugging Face tensors have no place in the k2jax model, e.g. {unused[:3]}")
    return skipped


def has_fused_experts(names) -> bool:
    """Whether a checkpoint holds transformers' fused expert tensors (else one tensor per expert)."""
    return any(name.endswith("experts.gate_up_proj") for name in names)


def mtp_layers(hf: Mapping) -> int:
    """The multi-token-prediction layers a config.json declares (num_nextn_predict_layers)."""
    return int(hf.get("num_nextn_predict_layers") or 0)


def check_checkpoint(cfg: ModelConfig, shapes: Mapping[str, tuple], mtp: int = 0) -> tuple[bool, list[str]]:
    """(fused experts?, skipped MTP tensors) of a checkpoint (name -> shape) whose every tensor has its place;
    InteropError naming the first that has not (`check_tensors`)."""
    fused = has_fused_experts(shapes)
    return fused, check_tensors(cfg, shapes, fused_experts=fused, mtp_layers=mtp)


def _materialize(tree: dict, read) -> dict:
    return {k: _materialize(v, read) if isinstance(v, dict) else v.block(read, ()) for k, v in tree.items()}


def _convert(cfg: ModelConfig, shapes: Mapping[str, tuple], read, mtp: int = 0) -> tuple[dict, dict]:
    """(params, router_biases) as numpy trees, once the checkpoint (name -> shape; `read`: name -> float32) checks."""
    fused, _ = check_checkpoint(cfg, shapes, mtp)
    params, biases = hf_layout.sources(cfg, fused_experts=fused)
    return _materialize(params, read), _materialize(biases, read)


def from_hf_state_dict(state_dict: Mapping, cfg: ModelConfig):
    """(params, router_biases) as the pure dicts of nnx.state(model, nnx.Param) and of RouterBias."""
    return _convert(cfg, {k: np.shape(v) for k, v in state_dict.items()},
                    lambda name: np.asarray(state_dict[name], np.float32))


def _layer(tree: dict, i: int, scan: bool):
    import jax

    return jax.tree.map(lambda x: np.asarray(x)[i], tree) if scan else tree[i]


def to_hf_state_dict(params: Mapping, router_biases: Mapping, cfg: ModelConfig, *,
                     fused_experts: bool = True) -> dict[str, np.ndarray]:
    """The inverse of from_hf_state_dict (float32 numpy arrays keyed like HF)."""
    scan = cfg.scan_layers
    att = cfg.attention
    h, nope, r, dv = att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
    inverse = np.argsort(np.concatenate([np.arange(nope), nope + hf_layout.rope_perm(r)]))
    sd = {"model.embed_tokens.weight": params["embed"]["table"], "model.norm.weight": params["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = np.asarray(params["lm_head"]).T
    for i in range(cfg.num_layers):
        dense = i < cfg.num_dense_layers
        j = i if dense else i - cfg.num_dense_layers
        layer = _layer(params["dense_layers" if dense else "moe_layers"], j, scan)
        p = f"model.layers.{i}."
        sd[f"{p}input_layernorm.weight"] = layer["attn_norm"]["scale"]
        sd[f"{p}post_attention_layernorm.weight"] = layer["ffn_norm"]["scale"]
        a = {k: (np.asarray(v) if not isinstance(v, dict) else v) for k, v in layer["attn"].items()}
        if att.q_lora_rank:
            sd[f"{p}self_attn.q_a_proj.weight"] = a["wq_a"].T
            sd[f"{p}self_attn.q_a_layernorm.weight"] = a["q_norm"]["scale"]
            sd[f"{p}self_attn.q_b_proj.weight"] = a["wq_b"][..., inverse].reshape(att.q_lora_rank, -1).T
        else:
            sd[f"{p}self_attn.q_proj.weight"] = a["wq"][..., inverse].reshape(cfg.d_model, -1).T
        kv_a = a["wkv_a"]
        rope_cols = kv_a[:, att.kv_lora_rank:][:, np.argsort(hf_layout.rope_perm(r))]
        sd[f"{p}self_attn.kv_a_proj_with_mqa.weight"] = np.concatenate([kv_a[:, :att.kv_lora_rank], rope_cols], 1).T
        sd[f"{p}self_attn.kv_a_layernorm.weight"] = a["kv_norm"]["scale"]
        sd[f"{p}self_attn.kv_b_proj.weight"] = a["wkv_b"].reshape(att.kv_lora_rank, h * (nope + dv)).T
        sd[f"{p}self_attn.o_proj.weight"] = a["wo"].reshape(h * dv, cfg.d_model).T
        ffn = {k: (np.asarray(v) if not isinstance(v, dict) else v) for k, v in layer["ffn"].items()}
        if dense:
            for name in ("gate", "up", "down"):
                sd[f"{p}mlp.{name}_proj.weight"] = np.asarray(ffn[name]).T
            continue
        sd[f"{p}mlp.gate.weight"] = ffn["router"].T
        sd[f"{p}mlp.gate.e_score_correction_bias"] = np.asarray(_layer(router_biases["moe_layers"], j, scan)["ffn"]["bias"])
        if fused_experts:
            sd[f"{p}mlp.experts.gate_up_proj"] = np.concatenate([ffn["wi_gate"], ffn["wi_up"]], 2).transpose(0, 2, 1)
            sd[f"{p}mlp.experts.down_proj"] = ffn["wo"].transpose(0, 2, 1)
        else:
            for e in range(cfg.moe.num_experts):
                sd[f"{p}mlp.experts.{e}.gate_proj.weight"] = ffn["wi_gate"][e].T
                sd[f"{p}mlp.experts.{e}.up_proj.weight"] = ffn["wi_up"][e].T
                sd[f"{p}mlp.experts.{e}.down_proj.weight"] = ffn["wo"][e].T
        if cfg.moe.num_shared_experts:
            for name in ("gate", "up", "down"):
                sd[f"{p}mlp.shared_experts.{name}_proj.weight"] = np.asarray(ffn["shared"][name]).T
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sd.items()}


def load_hf_checkpoint(directory: str | Path, cfg: ModelConfig | None = None):
    """(cfg, params, router_biases) as numpy trees from a local directory with config.json and *.safetensors
    (float32/bf16, FP8 block-scaled or int4 pack-quantized; see interop.quant), all in host memory: for
    small models and tests. Large checkpoints: interop.importer streams them onto devices."""
    from k2jax.interop.quant import WeightReader

    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(hf) if cfg is None else cfg
    reader = WeightReader(directory)
    return cfg, *_convert(cfg, reader.shapes(), lambda name: reader.read(name, np.float32), mtp_layers(hf))


EXPORT_DTYPES = ("float32", "bfloat16", "fp8")
FP8_BLOCK = (128, 128)  # DeepSeek-V3's and Kimi-K2's weight_block_size
SHARD_BYTES = 5 << 30  # per safetensors file, as the released checkpoints split them


def _is_fp8_weight(name: str) -> bool:
    """The weights V3 and K2 release in FP8: every projection inside a decoder layer (attention, dense MLP,
    experts, shared experts); not the router, norms, embeddings or lm_head."""
    return name.startswith("model.layers.") and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def encode_state_dict(sd: Mapping[str, np.ndarray], dtype: str) -> tuple[dict, dict | None]:
    """(tensors as stored, config.json's quantization_config or None) of a float32 state dict in
    `dtype`: float32, bfloat16, or fp8 (FP8 e4m3 with float32 128x128 block scales, the rest bfloat16)."""
    import ml_dtypes

    from k2jax.interop.quant import quantize_fp8_block

    if dtype not in EXPORT_DTYPES:
        raise InteropError(f"export dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    if dtype == "float32":
        return dict(sd), None
    out = {}
    for name, w in sd.items():
        if dtype == "fp8" and _is_fp8_weight(name):
            out[name], out[f"{name}_scale_inv"] = quantize_fp8_block(w, FP8_BLOCK)
        else:
            out[name] = np.asarray(w).astype(ml_dtypes.bfloat16)
    if dtype == "bfloat16":
        return out, None
    return out, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": list(FP8_BLOCK)}


def save_hf_checkpoint(directory: str | Path, params: Mapping, router_biases: Mapping, cfg: ModelConfig, *,
                       fused_experts: bool = False, dtype: str = "float32", shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config.json and safetensors files (one tensor per expert, like the DeepSeek-V3 and Kimi-K2
    releases; files of at most `shard_bytes` with model.safetensors.index.json when there are several) in
    `dtype` (EXPORT_DTYPES) into `directory`, which load_hf_checkpoint, `k2jax import` and transformers'
    DeepseekV3ForCausalLM.from_pretrained read."""
    from k2jax.interop.safetensors_io import save_file, save_index

    hf_config = config_to_hf(cfg)  # refuses before anything is written
    if fused_experts and dtype == "fp8":
        raise InteropError("FP8 export writes one tensor per expert (the released layout); drop --fused-experts")
    tensors, quantization = encode_state_dict(to_hf_state_dict(params, router_biases, cfg, fused_experts=fused_experts),
                                              dtype)
    files: list[dict] = [{}]
    size = 0  # of the last file
    for name, t in tensors.items():
        if files[-1] and size + t.nbytes > shard_bytes:
            files.append({})
            size = 0
        files[-1][name] = t
        size += t.nbytes
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    for file_name, part in zip(names, files):
        save_file(part, directory / file_name, metadata={"format": "pt"})
    if len(files) > 1:
        save_index(directory, {n: f for f, part in zip(names, files) for n in part},
                   sum(t.nbytes for t in tensors.values()))
    hf_config["torch_dtype"] = "float32" if dtype == "float32" else "bfloat16"
    if quantization:
        hf_config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    return directory
