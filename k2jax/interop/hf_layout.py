"""Where each k2jax weight comes from in a DeepSeek-V3 / Kimi-K2 checkpoint: one source per leaf.

`sources(cfg, fused_experts)` mirrors the model's parameter and router-bias trees; each leaf is a
`Source` (one k2jax array made from named Hugging Face tensors) or a `Stacked` (sources stacked on a new
first axis: the layers of a scanned stack, the experts of a layer). Both the in-memory conversion
(`deepseek_v3.from_hf_state_dict`) and the streamed import (`interop.importer`) read this one table, so
the name mapping, the transposes and the rotary permutation live only here.

Differences from the HF layout handled here:
- torch Linear weights are (out, in); ours are (in, out) with heads split out.
- DeepSeek's rotary dims are interleaved pairs (x0, x1), (x2, x3), ...; k2jax rotates halves. Permuting
  the rotary output columns of q_b / q_proj (per head) and of kv_a_proj_with_mqa by
  [0, 2, 4, ..., 1, 3, 5, ...] makes our rotate-half compute exactly HF's rotation.
- Experts: checkpoint files keep one Linear per expert (experts.{j}.gate_proj.weight, ...); transformers
  fuses them (experts.gate_up_proj (E, 2F, D), experts.down_proj (E, D, F)). Either is read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from k2jax.config import ModelConfig

Read = Callable[[str], np.ndarray]  # HF tensor name -> float32 array as stored (torch orientation)


@dataclasses.dataclass(frozen=True)
class Source:
    """A k2jax array (one layer's, one expert's) computed by `make` from the named HF tensors."""

    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (name, expected HF shape)
    make: Callable[..., np.ndarray]
    depth = 0  # stacked axes in front

    def block(self, read: Read, index: tuple[slice, ...]) -> np.ndarray:
        return self.make(*(read(name) for name, _ in self.tensors))[index]

    def names(self):
        return self.tensors


@dataclasses.dataclass(frozen=True)
class Stacked:
    """Parts (Source or Stacked) stacked along a new first axis."""

    parts: tuple

    @property
    def depth(self) -> int:
        return 1 + self.parts[0].depth

    def block(self, read: Read, index: tuple[slice, ...]) -> np.ndarray:
        first, rest = (index[0], index[1:]) if index else (slice(None), ())  # () = everything
        return np.stack([self.parts[i].block(read, rest) for i in range(*first.indices(len(self.parts)))])

    def names(self):
        return tuple(t for part in self.parts for t in part.names())


def _src(name: str, shape: tuple, make=lambda w: w) -> Source:
    return Source(((name, tuple(shape)),), make)


def _linear(name: str, out_dim: int, in_dim: int) -> Source:
    """A torch Linear weight as our (in, out) matrix."""
    return _src(name, (out_dim, in_dim), lambda w: w.T)


def rope_perm(r: int) -> np.ndarray:
    """Interleaved rotary pairs -> halves (the column order k2jax's rotate-half expects)."""
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2)])


def _attention(p: str, cfg: ModelConfig) -> dict:
    att = cfg.attention
    d, h, nope, r, dv = cfg.d_model, att.num_heads, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim
    qr, kvr = att.q_lora_rank, att.kv_lora_rank
    perm = np.concatenate([np.arange(nope), nope + rope_perm(r)])
    out = {}
    if qr:
        out["wq_a"] = _linear(f"{p}q_a_proj.weight", qr, d)
        out["q_norm"] = {"scale": _src(f"{p}q_a_layernorm.weight", (qr,))}
        out["wq_b"] = _src(f"{p}q_b_proj.weight", (h * (nope + r), qr),
                           lambda w: w.T.reshape(qr, h, nope + r)[..., perm])  # (qr, H, nope + rope)
    else:
        out["wq"] = _src(f"{p}q_proj.weight", (h * (nope + r), d), lambda w: w.T.reshape(d, h, nope + r)[..., perm])
    out["wkv_a"] = _src(f"{p}kv_a_proj_with_mqa.weight", (kvr + r, d),
                        lambda w: np.concatenate([w[:kvr].T, w[kvr:][rope_perm(r)].T], 1))  # (D, kvr + rope)
    out["kv_norm"] = {"scale": _src(f"{p}kv_a_layernorm.weight", (kvr,))}
    out["wkv_b"] = _src(f"{p}kv_b_proj.weight", (h * (nope + dv), kvr), lambda w: w.T.reshape(kvr, h, nope + dv))
    out["wo"] = _src(f"{p}o_proj.weight", (d, h * dv), lambda w: w.T.reshape(h, dv, d))
    return out


def _swiglu(p: str, d: int, f: int) -> dict:
    return {"gate": _linear(f"{p}gate_proj.weight", f, d), "up": _linear(f"{p}up_proj.weight", f, d),
            "down": _linear(f"{p}down_proj.weight", d, f)}


def _experts(p: str, cfg: ModelConfig, fused: bool) -> dict:
    d, e, f = cfg.d_model, cfg.moe.num_experts, cfg.moe.expert_ffn_dim
    if fused:  # transformers' in-memory layout: one (E, 2F, D) and one (E, D, F) tensor
        gate_up, down = (f"{p}experts.gate_up_proj", (e, 2 * f, d)), (f"{p}experts.down_proj", (e, d, f))
        return {"wi_gate": Source((gate_up,), lambda w: w[:, :f].transpose(0, 2, 1)),
                "wi_up": Source((gate_up,), lambda w: w[:, f:].transpose(0, 2, 1)),
                "wo": Source((down,), lambda w: w.transpose(0, 2, 1))}
    per_expert = [_swiglu(f"{p}experts.{j}.", d, f) for j in range(e)]
    return {ours: Stacked(tuple(x[theirs] for x in per_expert))
            for ours, theirs in (("wi_gate", "gate"), ("wi_up", "up"), ("wo", "down"))}


def _layer(i: int, cfg: ModelConfig, fused: bool) -> tuple[dict, dict | None]:
    """(parameter sources, router-bias sources or None) of decoder layer i."""
    d, p = cfg.d_model, f"model.layers.{i}."
    layer = {"attn_norm": {"scale": _src(f"{p}input_layernorm.weight", (d,))},
             "ffn_norm": {"scale": _src(f"{p}post_attention_layernorm.weight", (d,))},
             "attn": _attention(f"{p}self_attn.", cfg)}
    if i < cfg.num_dense_layers:
        layer["ffn"] = _swiglu(f"{p}mlp.", d, cfg.dense_ffn_dim)
        return layer, None
    moe = cfg.moe
    layer["ffn"] = {"router": _linear(f"{p}mlp.gate.weight", moe.num_experts, d),
                    **_experts(f"{p}mlp.", cfg, fused)}
    if moe.num_shared_experts:
        layer["ffn"]["shared"] = _swiglu(f"{p}mlp.shared_experts.", d, moe.num_shared_experts * moe.expert_ffn_dim)
    return layer, {"ffn": {"bias": _src(f"{p}mlp.gate.e_score_correction_bias", (moe.num_experts,))}}


def _stack(trees: list):
    """Per-layer source trees -> one tree of Stacked leaves (a scanned stack)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack([t[k] for t in trees]) for k in first}
    return Stacked(tuple(trees))


def sources(cfg: ModelConfig, *, fused_experts: bool = False) -> tuple[dict, dict]:
    """(parameter sources, model-state sources): trees shaped like nnx.to_pure_dict of the model's
    nnx.Param state and of the rest (the router biases)."""
    d, v = cfg.d_model, cfg.vocab_size
    params = {"embed": {"table": _src("model.embed_tokens.weight", (v, d))},
              "final_norm": {"scale": _src("model.norm.weight", (d,))}}
    if not cfg.tie_embeddings:
        params["lm_head"] = _linear("lm_head.weight", v, d)
    layers = [_layer(i, cfg, fused_experts) for i in range(cfg.num_layers)]
    state = {}
    for name, group in (("dense_layers", layers[:cfg.num_dense_layers]), ("moe_layers", layers[cfg.num_dense_layers:])):
        if not group:
            continue
        weights, biases = [w for w, _ in group], [b for _, b in group if b is not None]
        params[name] = _stack(weights) if cfg.scan_layers else dict(enumerate(weights))
        if biases:
            state[name] = _stack(biases) if cfg.scan_layers else dict(enumerate(biases))
    return params, state


def leaves(tree: dict, prefix: tuple = ()):
    """(path, Source | Stacked) pairs of a sources tree, in order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def expected_tensors(trees) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the sources read, with its expected shape."""
    return {name: shape for tree in trees for _, src in leaves(tree) for name, shape in src.names()}


def is_mtp(name: str, cfg: ModelConfig, mtp_layers: int) -> bool:
    """A tensor of the multi-token-prediction layers (config.json's num_nextn_predict_layers) that V3 and K2
    ship after the last decoder layer."""
    if not name.startswith("model.layers."):
        return False
    return cfg.num_layers <= int(name.split(".")[2]) < cfg.num_layers + mtp_layers
