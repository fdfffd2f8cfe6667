"""Test helper: tiny DeepSeek-V3 / Kimi-K2 checkpoints in the released file formats, and transformers' logits for them.

An independent reference for k2jax's checkpoint importer: nothing here imports k2jax. The writers follow the
published formats (facts and sources in the notes below), and the references come from transformers' own
DeepseekV3ForCausalLM on the same files.

Released formats (checked against public copies of the release files; see tests/test_hf_checkpoints.py):

* Names. One tensor per routed expert: ``model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight``
  (transformers 5 fuses them internally into ``mlp.experts.gate_up_proj`` (E, 2I, H) = cat(gate, up) per expert
  and ``mlp.experts.down_proj`` (E, H, I); its conversion mapping "qwen2_moe" does this on load and reverses it
  on save). The router is ``mlp.gate.weight`` plus ``mlp.gate.e_score_correction_bias``.
* dtypes. bf16 everywhere except ``e_score_correction_bias``, which every release stores as float32.
* FP8 (DeepSeek-V3/R1, Kimi-K2-Base/Instruct). config.json ``quantization_config`` =
  ``{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}``.
  Every ``nn.Linear`` weight inside the decoder layers (q_a/q_b/q, kv_a_proj_with_mqa, kv_b, o, dense MLP,
  shared experts, routed experts) is float8_e4m3fn with a float32 ``<name>.weight_scale_inv`` of shape
  (ceil(out/128), ceil(in/128)); a ragged edge block is zero-padded to 128 for its scale (e.g.
  kv_a_proj_with_mqa (576, 7168) -> scale (5, 56)). The router weight, embeddings, lm_head, norms and the MTP
  module's eh_proj/embed/head stay bf16. w = float(q) * s over each block.
* MTP. DeepSeek-V3 ships one MTP module as ``model.layers.{num_hidden_layers}.*`` (num_nextn_predict_layers 1):
  embed_tokens, enorm, hnorm, eh_proj (H, 2H), shared_head.norm, shared_head.head and a full MoE decoder layer.
  Kimi-K2 ships none (num_nextn_predict_layers 0).
* int4 (Kimi-K2-Thinking, also K2.5/K2.6). compressed-tensors "pack-quantized": routed experts only, as
  ``weight_packed`` int32 (out, in/8; eight 4-bit values per word, low nibble first, stored as q + 8),
  ``weight_scale`` bf16 (out, in/32) and ``weight_shape`` int32 (2,); symmetric groups of 32 along the input
  dim, w = scale * q with q in [-8, 7]. Attention, dense MLP, shared experts, router, embeddings and lm_head
  stay bf16 (the ignore list below).

``meta_parameters`` gives the full published shapes without allocating anything (transformers on the meta device).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
            bos_token_id=0, eos_token_id=1)

# A long-context rope like the releases' (theirs: factor 32 or 64 over 4096 positions), scaled down.
YARN = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

# The published configs: config.json of deepseek-ai/DeepSeek-V3 and of moonshotai/Kimi-K2-Instruct (model_type
# "kimi_k2"; K2-Instruct-0905 and K2-Thinking differ only in rope factor 64 / max_position_embeddings 262144).
PRESETS = {
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
                        num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8,
                        n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5,
                        max_position_embeddings=163840, num_nextn_predict_layers=1,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                         "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "kimi-k2": dict(vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=64, num_key_value_heads=64,
                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=384, num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1,
                    routed_scaling_factor=2.827, max_position_embeddings=131072, num_nextn_predict_layers=0,
                    rms_norm_eps=1e-6, bos_token_id=163584, eos_token_id=163585,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                     "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0,
                                     "mscale": 1.0, "mscale_all_dim": 1.0}),
}

FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# Kimi-K2-Thinking's config.json quantization_config (group_size 32); write_int4_experts substitutes its group size.
K2_THINKING_QUANTIZATION_CONFIG = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}

# Linear weights of a decoder layer (FP8 in the FP8 releases); the router mlp.gate.weight is not one.
FP8_LINEAR = re.compile(r"^model\.layers\.\d+\."
                        r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.((shared_experts|experts\.\d+)\.)?(gate_proj|up_proj|down_proj))\.weight$")
ROUTED_EXPERT = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# ---------------------------------------------------------------------------------------------------- configs
def tiny_deepseek_config(yarn: bool = False, **overrides) -> DeepseekV3Config:
    """A small DeepseekV3Config (3 layers, the first dense; MLA with q_lora; 8 experts in 2 groups; 1 shared).

    `yarn=True` adds a yarn rope (YARN); any DeepseekV3Config field can be overridden (q_lora_rank=None for the
    plain q_proj, moe_intermediate_size=160 for ragged FP8 blocks, rope_parameters=..., ...).
    """
    kw = dict(TINY)
    if yarn:
        kw["rope_parameters"] = dict(YARN)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def preset_config(preset: str) -> DeepseekV3Config:
    """The published full-size config: "kimi-k2" (Kimi-K2-Instruct) or "deepseek-v3"."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
    return DeepseekV3Config(**PRESETS[preset])


# ---------------------------------------------------------------------------------------------------- names
def _name_key(name):
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split("."))


def to_checkpoint_names(model_sd: dict) -> dict:
    """transformers' fused names -> the released per-expert names (values: torch or numpy arrays)."""
    out = {}
    for name, value in model_sd.items():
        m = _FUSED.match(name)
        if m is None:
            out[name] = value
            continue
        prefix, kind = m.groups()
        for j in range(value.shape[0]):
            if kind == "down_proj":
                out[f"{prefix}.{j}.down_proj.weight"] = value[j]
            else:
                half = value.shape[1] // 2
                out[f"{prefix}.{j}.gate_proj.weight"] = value[j][:half]
                out[f"{prefix}.{j}.up_proj.weight"] = value[j][half:]
    return dict(sorted(out.items(), key=lambda kv: _name_key(kv[0])))


def to_transformers_names(ckpt_sd: dict) -> dict:
    """The released per-expert names -> transformers' fused experts (torch tensors; what its loader builds)."""
    out, experts = {}, {}
    for name, value in ckpt_sd.items():
        m = _PER_EXPERT.match(name)
        if m is None:
            out[name] = torch.as_tensor(value)
        else:
            prefix, j, kind = m.groups()
            experts.setdefault(prefix, {}).setdefault(int(j), {})[kind] = torch.as_tensor(value)
    for prefix, by_j in experts.items():
        js = sorted(by_j)
        if js != list(range(len(js))):
            raise ValueError(f"{prefix}: experts {js} are not 0..{len(js) - 1}")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([by_j[j]["gate_proj"], by_j[j]["up_proj"]]) for j in js])
        out[f"{prefix}.down_proj"] = torch.stack([by_j[j]["down_proj"] for j in js])
    return out


def checkpoint_shapes(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter (and persistent buffer) of DeepseekV3ForCausalLM(config), in checkpoint names, built on the
    meta device: no memory, a second or two even for the full models."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config)
    return {k: tuple(v.shape) for k, v in to_checkpoint_names(model.state_dict()).items()}  # meta slices: no memory


def meta_parameters(preset: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor of the published "kimi-k2" or "deepseek-v3" main model (without MTP)."""
    return checkpoint_shapes(preset_config(preset))


def is_fp8_weight(name: str) -> bool:
    """Whether the FP8 releases store this tensor as float8_e4m3fn with a weight_scale_inv."""
    return FP8_LINEAR.match(name) is not None


def fp8_scale_shape(shape, block=(128, 128)) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def fp8_scale_names(params: dict, block=(128, 128)) -> dict[str, tuple[int, int]]:
    """The `<name>.weight_scale_inv` tensors an FP8 release holds for these parameters (name -> shape)."""
    return {name[: -len("weight")] + "weight_scale_inv": fp8_scale_shape(shape, block)
            for name, shape in params.items() if is_fp8_weight(name)}


def mtp_tensors(config: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """One MTP module as DeepSeek-V3 ships it: `model.layers.{num_hidden_layers}.` + embed_tokens, enorm, hnorm,
    eh_proj (H, 2H), shared_head.norm, shared_head.head and a full MoE decoder layer (same names as the others)."""
    n, h, v = config.num_hidden_layers, config.hidden_size, config.vocab_size
    if n <= config.first_k_dense_replace:
        raise ValueError("the MTP decoder layer is a MoE layer; this config has none to copy")
    p = f"model.layers.{n}."
    out = {p + "embed_tokens.weight": (v, h), p + "enorm.weight": (h,), p + "hnorm.weight": (h,),
           p + "eh_proj.weight": (h, 2 * h), p + "shared_head.norm.weight": (h,), p + "shared_head.head.weight": (v, h)}
    last = f"model.layers.{n - 1}."
    for name, shape in checkpoint_shapes(config).items():  # the last layer is a MoE layer
        if name.startswith(last):
            out[p + name[len(last):]] = shape
    return dict(sorted(out.items(), key=lambda kv: _name_key(kv[0])))


# ---------------------------------------------------------------------------------------------------- values
def _bf16_exact(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _random_values(shapes: dict, seed: int, bf16_exact: bool, std: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            out[name] = rng.uniform(-0.05, 0.05, shape).astype(np.float32)  # float32 in every release
            continue
        if len(shape) == 1:  # RMSNorm weights
            x = rng.uniform(0.8, 1.2, shape)
        else:
            x = rng.normal(0.0, std, shape)
        x = x.astype(np.float32)
        out[name] = _bf16_exact(x) if bf16_exact else x
    return out


def random_state_dict(config: DeepseekV3Config, seed: int = 0, *, bf16_exact: bool = True,
                      std: float = 0.08) -> dict[str, np.ndarray]:
    """Random float32 weights for DeepseekV3ForCausalLM(config) in checkpoint names (per-expert tensors).

    Matrices ~ N(0, std), norms ~ U(0.8, 1.2), router biases ~ U(-0.05, 0.05). With bf16_exact (default) every
    value but the float32 router biases is a bf16 number, so write_bf16 is lossless.
    """
    return _random_values(checkpoint_shapes(config), seed, bf16_exact, std)


def random_mtp_state_dict(config: DeepseekV3Config, seed: int = 1, *, bf16_exact: bool = True,
                          std: float = 0.08) -> dict[str, np.ndarray]:
    """Random values for mtp_tensors(config), to add to a state dict before writing it."""
    return _random_values(mtp_tensors(config), seed, bf16_exact, std)


# ---------------------------------------------------------------------------------------------------- writers
def _to_torch(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    x = np.asarray(x)
    if x.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint8)).view(torch.float8_e4m3fn)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


def _bf16_or_f32(name: str, x) -> torch.Tensor:
    t = _to_torch(x)
    return t.to(torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16)


def _has_mtp(config, sd) -> bool:
    return f"model.layers.{config.num_hidden_layers}.eh_proj.weight" in sd


# transformers' bookkeeping keys that released config.json files do not have (head_dim, qk_head_dim: derived).
_NOT_IN_RELEASES = {"transformers_version", "output_hidden_states", "output_attentions", "return_dict",
                    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
                    "_name_or_path", "qk_head_dim", "head_dim", "dtype"}


def config_json(config: DeepseekV3Config, quantization_config: dict | None = None, *, mtp: bool = False,
                model_type: str = "deepseek_v3") -> dict:
    """config.json as the releases write it: transformers-4 style rope (rope_theta + rope_scaling with "type"),
    num_nextn_predict_layers 1 with an MTP module else 0; model_type "kimi_k2" as Kimi's releases have it."""
    d = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_RELEASES}
    rope = dict(d.pop("rope_parameters", None) or {})
    d["rope_theta"] = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    d["rope_scaling"] = None if rope_type == "default" else {**rope, "type": rope_type}
    d.update(architectures=["DeepseekV3ForCausalLM"], model_type=model_type, torch_dtype="bfloat16",
             num_nextn_predict_layers=1 if mtp else 0)
    if quantization_config is not None:
        d["quantization_config"] = quantization_config
    return d


def write_shards(directory, tensors: dict[str, torch.Tensor], num_shards: int = 2) -> dict:
    """safetensors shards named like the releases' (model-00001-of-000002.safetensors) + model.safetensors.index.json.

    Tensors go in name order (layers in numeric order), split into `num_shards` runs of about equal bytes; a weight
    and its scale may land in different shards, as nothing in the format promises otherwise."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors, key=_name_key)
    if len(names) < num_shards:
        raise ValueError(f"{len(names)} tensors cannot fill {num_shards} shards")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    shards, current, acc = [], [], 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        current.append(name)
        acc += size
        left = len(names) - i - 1
        need = num_shards - len(shards) - 1  # shards still to fill after this one
        if need and (acc >= total * (len(shards) + 1) / num_shards or left == need):
            shards.append(current)
            current = []
    shards.append(current)
    assert len(shards) == num_shards and all(shards)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{num_shards:06d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _write_config(directory, config, quantization_config, mtp, model_type):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d = config_json(config, quantization_config, mtp=mtp, model_type=model_type)
    (directory / "config.json").write_text(json.dumps(d, indent=2))


def write_bf16(directory, config: DeepseekV3Config, sd: dict, *, num_shards: int = 2,
               model_type: str = "deepseek_v3") -> Path:
    """A bf16 release: every tensor bf16 but e_score_correction_bias (float32); no quantization_config.

    Every writer writes whatever `sd` holds (add random_mtp_state_dict for an MTP module), in `num_shards` shards,
    with config.json's model_type `model_type` ("kimi_k2" for Kimi's releases)."""
    tensors = {name: _bf16_or_f32(name, x) for name, x in sd.items()}
    write_shards(directory, tensors, num_shards)
    _write_config(directory, config, None, _has_mtp(config, sd), model_type)
    return Path(directory)


def fp8_block_quantize(w, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's FP8 format in numpy: per (block[0] x block[1]) block s = amax / 448 (edge blocks zero-padded),
    q = float8_e4m3fn(w / s) (round to nearest even). Returns (q as ml_dtypes.float8_e4m3fn, s as float32)."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = np.zeros((nr * br, nc * bc), np.float32)
    padded[:rows, :cols] = w
    blocks = padded.reshape(nr, br, nc, bc)
    amax = np.abs(blocks).max(axis=(1, 3))
    s = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    q = (blocks / s[:, None, :, None]).astype(ml_dtypes.float8_e4m3fn)
    return q.reshape(nr * br, nc * bc)[:rows, :cols].copy(), s


def write_fp8_block(directory, config: DeepseekV3Config, sd: dict, *, block=(128, 128), num_shards: int = 2,
                    model_type: str = "deepseek_v3") -> Path:
    """An FP8 release (DeepSeek-V3 / Kimi-K2-Instruct format): decoder-layer Linear weights (is_fp8_weight) as
    float8_e4m3fn `<name>.weight` + float32 `<name>.weight_scale_inv`; the rest as write_bf16.

    `block` goes to config.json's weight_block_size, where readers must take it from (the releases: 128 x 128);
    a smaller block exercises several blocks per tensor in tiny models."""
    block = tuple(int(b) for b in block)
    tensors = {}
    for name, x in sd.items():
        if is_fp8_weight(name):
            q, s = fp8_block_quantize(_to_torch(x).float().numpy(), block)
            tensors[name] = _to_torch(q)
            tensors[name[: -len("weight")] + "weight_scale_inv"] = torch.from_numpy(s)
        else:
            tensors[name] = _bf16_or_f32(name, x)
    write_shards(directory, tensors, num_shards)
    _write_config(directory, config, dict(FP8_QUANTIZATION_CONFIG, weight_block_size=list(block)),
                  _has_mtp(config, sd), model_type)
    return Path(directory)


def int4_quantization_config(group_size: int = 32) -> dict:
    qc = json.loads(json.dumps(K2_THINKING_QUANTIZATION_CONFIG))
    qc["config_groups"]["group_0"]["weights"]["group_size"] = group_size
    return qc


def int4_compress(w, scheme) -> dict[str, torch.Tensor]:
    """One expert weight -> {weight_packed, weight_scale, weight_shape} with compressed-tensors' own code: its
    min/max -> scale rule (calculate_qparams; symmetric: scale = group amax / 7.5) and its pack-quantized compressor.
    The scale is stored in bf16 (as in the releases) and the weight is quantized in float32 against that stored
    value, so q = round(w / scale) exactly (quantizing in bf16 would round w / scale first)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    w = _to_torch(w).float()
    groups = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    scale = scale.to(torch.bfloat16)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    out = compressor.compress({"weight": w, "weight_scale": scale.float(), "weight_zero_point": zero_point}, scheme)
    assert set(out) == {"weight_packed", "weight_scale", "weight_shape"}, set(out)
    return {"weight_packed": out["weight_packed"], "weight_scale": scale,
            "weight_shape": out["weight_shape"].to(torch.int32)}


def write_int4_experts(directory, config: DeepseekV3Config, sd: dict, group_size: int = 32, *,
                       num_shards: int = 2, model_type: str = "deepseek_v3") -> Path:
    """A Kimi-K2-Thinking style release: routed experts int4 (compressed-tensors pack-quantized, symmetric
    groups of `group_size` along the input dim), everything else as write_bf16; quantization_config as K2-Thinking's."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = int4_quantization_config(group_size)
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    tensors = {}
    for name, x in sd.items():
        if ROUTED_EXPERT.match(name):
            if x.shape[-1] % group_size:
                raise ValueError(f"{name}: in dim {x.shape[-1]} is not a multiple of group_size {group_size}")
            base = name[: -len("weight")]
            tensors.update({base + k: v for k, v in int4_compress(x, scheme).items()})
        else:
            tensors[name] = _bf16_or_f32(name, x)
    write_shards(directory, tensors, num_shards)
    _write_config(directory, config, qc, _has_mtp(config, sd), model_type)
    return Path(directory)


# ---------------------------------------------------------------------------------------------------- readers
def read_checkpoint(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a directory, as stored (the shards of model.safetensors.index.json, or model.safetensors)."""
    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(str(directory / file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert index is None or set(out) == set(index["weight_map"]), "index and shards disagree"
    return out


def fp8_block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The published FP8 dequantization in torch: float(q) * scale_inv of its block (edge blocks cut short)."""
    rows, cols = q.shape
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return q.float() * s


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, shape, group_size: int) -> torch.Tensor:
    """The pack-quantized int4 definition in torch: value i of a row sits in bits 4*(i%8).. of word i//8 as q+8;
    w = scale[:, i // group_size] * q."""
    rows, cols = (int(v) for v in shape)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * k)) & 0xF for k in range(8)], dim=-1).reshape(rows, -1)[:, :cols]
    q = nibbles.float() - 8.0
    return q * scale.float().repeat_interleave(group_size, 1)[:, :cols]


def dequantized_state_dict(directory) -> dict[str, torch.Tensor]:
    """A directory's tensors as float32 in checkpoint names, dequantized from the format definitions (no transformers):
    FP8 weight + weight_scale_inv -> weight; int4 weight_packed/scale/shape -> weight."""
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    raw = read_checkpoint(directory)
    out = {}
    if qc.get("quant_method") == "fp8":
        block = tuple(qc["weight_block_size"])
        for name, t in raw.items():
            if name.endswith(".weight_scale_inv"):
                continue
            scale = raw.get(name[: -len("weight")] + "weight_scale_inv") if name.endswith(".weight") else None
            out[name] = t.float() if scale is None else fp8_block_dequantize(t, scale, block)
    elif qc.get("quant_method") == "compressed-tensors":
        group = qc["config_groups"]["group_0"]["weights"]["group_size"]
        for name, t in raw.items():
            if name.endswith((".weight_scale", ".weight_shape")):
                continue
            if name.endswith(".weight_packed"):
                base = name[: -len("weight_packed")]
                out[base + "weight"] = int4_dequantize(t, raw[base + "weight_scale"], raw[base + "weight_shape"], group)
            else:
                out[name] = t.float()
    elif not qc:
        out = {k: v.float() for k, v in raw.items()}
    else:
        raise ValueError(f"unknown quantization_config {qc}")
    return out


# ---------------------------------------------------------------------------------------------------- references
def _logits(model, input_ids) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
    if ids.ndim == 1:
        ids = ids[None]
    with torch.no_grad():
        return model(ids).logits.float().numpy()


def float_logits(config: DeepseekV3Config, sd: dict, input_ids) -> np.ndarray:
    """transformers' float32 logits for a state dict in checkpoint names (extra MTP tensors are ignored)."""
    model = DeepseekV3ForCausalLM(config).float().eval()
    wanted = to_transformers_names({k: v for k, v in sd.items()
                                    if not k.startswith(f"model.layers.{config.num_hidden_layers}.")})
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in wanted.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit: missing {missing}, unexpected {unexpected}")
    return _logits(model, input_ids)


def load_transformers(directory, **kw) -> DeepseekV3ForCausalLM:
    """transformers' own loader on a directory, float32 on CPU; refuses a load that leaves any weight missing.

    bf16: plain from_pretrained. int4: its compressed-tensors integration with
    CompressedTensorsConfig(dequantize=True) (the routed experts come out as bf16(scale * q), everything else as
    stored). FP8: FineGrainedFP8Config(dequantize=True), which in transformers 5.23 refuses to start without the
    `accelerate` package and is only right where every FP8 tensor is a whole number of blocks or a single block
    (see reference_logits).

    model_type is forced to "deepseek_v3": transformers picks its expert-merging conversion by model_type, and with
    Kimi's "kimi_k2" it silently leaves every routed expert at its random init (missing keys, per-expert tensors
    unexpected). Unexpected tensors are allowed only under model.layers.{num_hidden_layers}. (the MTP module) and
    as rotary_emb.inv_freq buffers (Kimi-K2-Instruct's files hold one per layer)."""
    import warnings

    from transformers import CompressedTensorsConfig, FineGrainedFP8Config

    directory = str(directory)
    config = DeepseekV3Config.from_pretrained(directory)
    config.model_type = "deepseek_v3"
    qc = getattr(config, "quantization_config", None) or {}
    if qc.get("quant_method") == "compressed-tensors":
        kw.setdefault("quantization_config", CompressedTensorsConfig(dequantize=True))
    elif qc.get("quant_method") == "fp8":
        kw.setdefault("quantization_config", FineGrainedFP8Config(dequantize=True))
    with warnings.catch_warnings():  # "the quantization_config from the model will be used" (with our dequantize)
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model, info = DeepseekV3ForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32,
                                                            output_loading_info=True, **kw)
    mtp = f"model.layers.{config.num_hidden_layers}."
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(mtp) and not k.endswith("rotary_emb.inv_freq")]
    if info["missing_keys"] or unexpected or info["mismatched_keys"] or info["error_msgs"]:
        raise ValueError(f"transformers did not load {directory} whole: missing {sorted(info['missing_keys'])}, "
                         f"unexpected {sorted(unexpected)}, mismatched {info['mismatched_keys']} {info['error_msgs']}")
    return model.float().eval()


def reference_logits(directory, input_ids) -> np.ndarray:
    """transformers' float32 CPU logits (batch, seq, vocab) for a directory written here (or any DeepSeek-V3
    layout), extra MTP tensors ignored as transformers ignores them.

    bf16 and int4: transformers loads the directory itself (load_transformers). FP8: transformers 5.23 does not
    load DeepSeek's FP8 format correctly on CPU: FineGrainedFP8Config(dequantize=True) raises ImportError without
    `accelerate` (not a dependency here), and its Fp8Dequantize takes the block as rows // scale_rows, which is
    wrong for a ragged edge block spanning several blocks (160 rows, block 128 -> it uses 80) and raises for
    V3's kv_a_proj_with_mqa (576 rows, 5 scale rows). So the FP8 weights are dequantized here in torch from the
    published definition (dequantized_state_dict), and transformers loads that float32 state dict (its own name
    conversion included) from a temporary unquantized directory.
    """
    directory = Path(directory)
    qc = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return _logits(load_transformers(directory), input_ids)
    with tempfile.TemporaryDirectory() as tmp:
        sd = dequantized_state_dict(directory)
        write_shards(tmp, {k: v.contiguous() for k, v in sd.items()}, 1)
        cfg = json.loads((directory / "config.json").read_text())
        cfg.pop("quantization_config")
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        return _logits(load_transformers(tmp), input_ids)
