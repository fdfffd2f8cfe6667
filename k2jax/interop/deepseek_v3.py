"""Weights to and from the Hugging Face DeepSeek-V3 layout (used by Kimi-K2 checkpoints).

Differences handled here:
- torch Linear weights are (out, in); ours are (in, out) with heads split out.
- DeepSeek's rotary dims are interleaved pairs (x0, x1), (x2, x3), ...; k2jax
  rotates halves. Permuting the rotary output columns of q_b / q_proj (per
  head) and of kv_a_proj_with_mqa by [0, 2, 4, ..., 1, 3, 5, ...] makes our
  rotate-half compute exactly HF's rotation (scores are unchanged because
  queries and keys are permuted alike).
- Experts: transformers fuses them (experts.gate_up_proj (E, 2F, D),
  experts.down_proj (E, D, F)); checkpoint files keep one Linear per expert
  (experts.{j}.gate_proj.weight, ...). Both are read; either is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from k2jax.config import AttentionConfig, ModelConfig, MoEConfig, YarnConfig


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


def _rope_perm(r: int) -> np.ndarray:
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


class _Reader:
    """Checked access to a HF state dict (numpy arrays)."""

    def __init__(self, sd: Mapping):
        self.sd = sd
        self.used: set[str] = set()

    def __call__(self, key: str, shape: tuple) -> np.ndarray:
        if key not in self.sd:
            raise InteropError(f"missing key {key!r} in the Hugging Face state dict")
        value = np.asarray(self.sd[key], np.float32)
        if value.shape != tuple(shape):
            raise InteropError(f"{key}: expected shape {tuple(shape)}, got {value.shape}")
        self.used.add(key)
        return value

    def has(self, key: str) -> bool:
        return key in self.sd


def _attention_from_hf(get, p: str, cfg: ModelConfig) -> dict:
    att = cfg.attention
    d, h, nope, r, dv = cfg.d_model, att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
    perm = np.concatenate([np.arange(nope), nope + _rope_perm(r)])
    out = {}
    if att.q_lora_rank:
        out["wq_a"] = get(f"{p}q_a_proj.weight", (att.q_lora_rank, d)).T
        out["q_norm"] = {"scale": get(f"{p}q_a_layernorm.weight", (att.q_lora_rank,))}
        q_b = get(f"{p}q_b_proj.weight", (h * (nope + r), att.q_lora_rank))
        out["wq_b"] = q_b.T.reshape(att.q_lora_rank, h, nope + r)[..., perm]
    else:
        out["wq"] = get(f"{p}q_proj.weight", (h * (nope + r), d)).T.reshape(d, h, nope + r)[..., perm]
    kv_a = get(f"{p}kv_a_proj_with_mqa.weight", (att.kv_lora_rank + r, d)).T
    out["wkv_a"] = np.concatenate([kv_a[:, :att.kv_lora_rank], kv_a[:, att.kv_lora_rank:][:, _rope_perm(r)]], 1)
    out["kv_norm"] = {"scale": get(f"{p}kv_a_layernorm.weight", (att.kv_lora_rank,))}
    out["wkv_b"] = get(f"{p}kv_b_proj.weight", (h * (nope + dv), att.kv_lora_rank)).T.reshape(
        att.kv_lora_rank, h, nope + dv)
    out["wo"] = get(f"{p}o_proj.weight", (d, h * dv)).T.reshape(h, dv, d)
    return out


def _swiglu_from_hf(get, p: str, d: int, f: int) -> dict:
    return {"gate": get(f"{p}gate_proj.weight", (f, d)).T, "up": get(f"{p}up_proj.weight", (f, d)).T,
            "down": get(f"{p}down_proj.weight", (d, f)).T}


def _moe_from_hf(get, p: str, cfg: ModelConfig) -> tuple[dict, np.ndarray]:
    moe = cfg.moe
    d, e, f = cfg.d_model, moe.num_experts, moe.expert_ffn_dim
    out = {"router": get(f"{p}gate.weight", (e, d)).T}
    if get.has(f"{p}experts.gate_up_proj"):
        gate_up = get(f"{p}experts.gate_up_proj", (e, 2 * f, d))
        out["wi_gate"] = gate_up[:, :f].transpose(0, 2, 1)
        out["wi_up"] = gate_up[:, f:].transpose(0, 2, 1)
        out["wo"] = get(f"{p}experts.down_proj", (e, d, f)).transpose(0, 2, 1)
    else:
        experts = [_swiglu_from_hf(get, f"{p}experts.{j}.", d, f) for j in range(e)]
        out["wi_gate"] = np.stack([x["gate"] for x in experts])
        out["wi_up"] = np.stack([x["up"] for x in experts])
        out["wo"] = np.stack([x["down"] for x in experts])
    if moe.num_shared_experts:
        out["shared"] = _swiglu_from_hf(get, f"{p}shared_experts.", d, moe.num_shared_experts * f)
    bias = get(f"{p}gate.e_score_correction_bias", (e,))
    return out, bias


def _stack(layers: list[dict]):
    import jax

    return jax.tree.map(lambda *xs: np.stack(xs), *layers)


def from_hf_state_dict(state_dict: Mapping, cfg: ModelConfig):
    """(params, router_biases) as the pure dicts of nnx.state(model, nnx.Param) and of RouterBias."""
    scan = cfg.scan_layers
    get = _Reader(state_dict)
    d, v = cfg.d_model, cfg.vocab_size
    stacks = {"dense_layers": [], "moe_layers": []}
    biases = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {"attn_norm": {"scale": get(f"{p}input_layernorm.weight", (d,))},
                 "ffn_norm": {"scale": get(f"{p}post_attention_layernorm.weight", (d,))},
                 "attn": _attention_from_hf(get, f"{p}self_attn.", cfg)}
        if i < cfg.num_dense_layers:
            layer["ffn"] = _swiglu_from_hf(get, f"{p}mlp.", d, cfg.dense_ffn_dim)
            stacks["dense_layers"].append(layer)
        else:
            layer["ffn"], bias = _moe_from_hf(get, f"{p}mlp.", cfg)
            stacks["moe_layers"].append(layer)
            biases.append(bias)
    params = {"embed": {"table": get("model.embed_tokens.weight", (v, d))},
              "final_norm": {"scale": get("model.norm.weight", (d,))}}
    if not cfg.tie_embeddings:
        params["lm_head"] = get("lm_head.weight", (v, d)).T
    bias_tree = {}
    for name, layers in stacks.items():
        if not layers:
            continue
        params[name] = _stack(layers) if scan else dict(enumerate(layers))
    if biases:
        bias_tree["moe_layers"] = ({"ffn": {"bias": np.stack(biases)}} if scan
                                   else {i: {"ffn": {"bias": b}} for i, b in enumerate(biases)})
    unused = sorted(k for k in state_dict if k not in get.used and "rotary_emb" not in k)
    if unused:
        raise InteropError(f"{len(unused)} Hugging Face tensors have no place in the k2jax model, e.g. {unused[:3]}")
    return params, bias_tree


def _layer(tree: dict, i: int, scan: bool):
    import jax

    return jax.tree.map(lambda x: np.asarray(x)[i], tree) if scan else tree[i]


def to_hf_state_dict(params: Mapping, router_biases: Mapping, cfg: ModelConfig, *,
                     fused_experts: bool = True) -> dict[str, np.ndarray]:
    """The inverse of from_hf_state_dict (float32 numpy arrays keyed like HF)."""
    scan = cfg.scan_layers
    att = cfg.attention
    h, nope, r, dv = att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
    inverse = np.argsort(np.concatenate([np.arange(nope), nope + _rope_perm(r)]))
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
        rope_cols = kv_a[:, att.kv_lora_rank:][:, np.argsort(_rope_perm(r))]
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
    """(cfg, params, router_biases) from a local directory with config.json and float32/float16
    *.safetensors (numpy has no bfloat16: convert bf16/fp8 checkpoints to float32 first)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if cfg is None:
        cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InteropError(f"no *.safetensors files in {directory}")
    state_dict: dict = {}
    for f in files:
        state_dict.update(load_file(str(f)))
    params, biases = from_hf_state_dict(state_dict, cfg)
    return cfg, params, biases


def save_hf_checkpoint(directory: str | Path, params: Mapping, router_biases: Mapping, cfg: ModelConfig, *,
                       fused_experts: bool = False) -> Path:
    """Write config.json and model.safetensors (float32; one tensor per expert, like DeepSeek-V3 and Kimi-K2
    checkpoint files) into `directory`, which load_hf_checkpoint and transformers'
    DeepseekV3ForCausalLM.from_pretrained read."""
    from safetensors.numpy import save_file

    hf_config = config_to_hf(cfg)  # refuses before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(params, router_biases, cfg, fused_experts=fused_experts),
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    return directory
