"""The tiny released-format checkpoints of tests/hf_checkpoints.py: transformers loads each, its logits match the
float model's, the files follow the published formats, and the full-size shapes add up to the published counts.

Tolerances (measured, seeds 0-3, ids (2, 32), weights ~ N(0, 0.08)): this tiny random model amplifies weight
noise (2.8% relative FP8 weight error -> 16-39% relative logit error; the routers flip experts), so the logit
checks against the float model are loose (relative L2 < 0.5; an unrelated model is ~1.4) and the exact checks are
on the weights (per-element rounding bounds) and on transformers' logits vs the dequantized weights' (1e-5).
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import DeepseekV3Config

import hf_checkpoints as hf

IDS = np.random.default_rng(1).integers(0, hf.TINY["vocab_size"], (2, 32))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _experts(name):
    return hf.ROUTED_EXPERT.match(name) is not None


@pytest.fixture(scope="module")
def tiny():
    cfg = hf.tiny_deepseek_config()
    sd = hf.random_state_dict(cfg, seed=0)
    return cfg, sd, hf.float_logits(cfg, sd, IDS)


def test_names_convert_both_ways_as_transformers_does(tiny, tmp_path):
    cfg, sd, _ = tiny
    assert sum(".mlp.experts." in k for k in sd) == 2 * 8 * 3  # 2 MoE layers x 8 experts x gate/up/down
    assert sd["model.layers.1.mlp.experts.7.down_proj.weight"].shape == (64, 32)
    fused = hf.to_transformers_names(sd)
    assert fused["model.layers.2.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    back = hf.to_checkpoint_names(fused)
    assert list(back) == sorted(sd, key=hf._name_key) and all(np.array_equal(back[k].numpy(), sd[k]) for k in sd)
    # transformers' loader fuses the per-expert files into exactly these tensors ...
    model = hf.load_transformers(hf.write_bf16(tmp_path / "bf16", cfg, sd))
    loaded = model.state_dict()
    assert set(loaded) == set(fused)
    assert all(torch.equal(loaded[k], fused[k]) for k in fused)
    # ... and its save_pretrained splits them back into the released per-expert names
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    assert set(saved) == set(sd)
    assert all(np.array_equal(saved[k].float().numpy(), sd[k]) for k in sd)
    # a directory that leaves a weight unset is refused, not loaded with random values
    hf.write_bf16(tmp_path / "short", cfg, {k: v for k, v in sd.items() if k != "model.norm.weight"})
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        hf.load_transformers(tmp_path / "short")


@pytest.mark.parametrize("overrides, model_type", [({}, "deepseek_v3"), (dict(q_lora_rank=None, yarn=True), "kimi_k2")])
def test_bf16_directory_is_the_float_model(tmp_path, overrides, model_type):
    cfg = hf.tiny_deepseek_config(**overrides)
    sd = hf.random_state_dict(cfg, seed=3)  # bf16-exact values: writing bf16 loses nothing
    d = hf.write_bf16(tmp_path, cfg, sd, model_type=model_type)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-000002.safetensors",
                                                         "model-00002-of-000002.safetensors"]
    assert set(index["weight_map"]) == set(sd)
    raw = hf.read_checkpoint(d)
    assert {str(t.dtype) for k, t in raw.items() if "e_score" not in k} == {"torch.bfloat16"}
    assert {str(t.dtype) for k, t in raw.items() if "e_score" in k} == {"torch.float32"}
    written = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in written and written["num_nextn_predict_layers"] == 0
    assert written["model_type"] == model_type and written["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "rope_parameters" not in written and written["rope_theta"] == (50000.0 if overrides else 10000.0)
    assert written["rope_scaling"] == ({**{k: v for k, v in hf.YARN.items() if k not in ("rope_type", "rope_theta")},
                                        "type": "yarn"} if overrides else None)
    back = DeepseekV3Config.from_pretrained(str(d))  # transformers reads the release-style rope back
    assert {k: v for k, v in back.rope_parameters.items() if k != "type"} == cfg.rope_parameters
    assert back.q_lora_rank == cfg.q_lora_rank and back.n_group == 2 and back.first_k_dense_replace == 1
    np.testing.assert_allclose(hf.reference_logits(d, IDS), hf.float_logits(cfg, sd, IDS), rtol=0, atol=1e-5)


def _check_fp8_files(d, cfg, sd, block):
    written = json.loads((d / "config.json").read_text())
    assert written["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                              "weight_block_size": list(block)}
    raw = hf.read_checkpoint(d)
    fp8 = {k for k in sd if hf.is_fp8_weight(k)}
    assert "model.layers.1.mlp.gate.weight" not in fp8 and "model.layers.0.mlp.down_proj.weight" in fp8
    assert len(fp8) == 3 * 5 + 3 + 2 * (3 + 8 * 3)  # attention x3 layers, dense MLP, 2 MoE layers (shared + 8 experts)
    assert set(raw) == set(sd) | {k[: -len("weight")] + "weight_scale_inv" for k in fp8}
    for name, w in sd.items():
        if name not in fp8:
            assert raw[name].dtype == (torch.float32 if "e_score" in name else torch.bfloat16), name
            continue
        q, s = raw[name], raw[name[: -len("weight")] + "weight_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, name
        assert tuple(s.shape) == tuple(math.ceil(n / b) for n, b in zip(w.shape, block)), name
        qf = q.float()
        assert torch.isfinite(qf).all()
        # s = block amax / 448: each block's largest |q| is 448 (zero padding does not count)
        nr, nc = s.shape
        padded = torch.zeros(nr * block[0], nc * block[1])
        padded[: w.shape[0], : w.shape[1]] = qf.abs()
        assert torch.equal(padded.reshape(nr, block[0], nc, block[1]).amax(dim=(1, 3)), torch.full((nr, nc), 448.0))
        # e4m3 rounding: |w - q s| <= max(2^-4 |w|, 2^-10 s) (3 mantissa bits; subnormal step 2^-9)
        deq = hf.fp8_block_dequantize(q, s, block).numpy()
        s_full = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: w.shape[0], : w.shape[1]].numpy()
        bound = np.maximum(np.abs(w) * 2.0**-4, s_full * 2.0**-10) * (1 + 1e-6)
        assert (np.abs(w - deq) <= bound).all(), name


@pytest.mark.parametrize("case, overrides, block", [
    ("one block per tensor", {}, (128, 128)),
    ("ragged multi-block", dict(intermediate_size=160, moe_intermediate_size=160), (128, 128)),
    ("small blocks", dict(yarn=True), (32, 48)),
])
def test_fp8_directory(tmp_path, case, overrides, block):
    cfg = hf.tiny_deepseek_config(**overrides)
    sd = hf.random_state_dict(cfg, seed=0)
    d = hf.write_fp8_block(tmp_path, cfg, sd, block=block)
    _check_fp8_files(d, cfg, sd, block)
    ref = hf.reference_logits(d, IDS)
    # transformers on the dequantized weights, computed apart from reference_logits' temporary directory
    np.testing.assert_allclose(ref, hf.float_logits(cfg, hf.dequantized_state_dict(d), IDS), rtol=0, atol=1e-5)
    float_ = hf.float_logits(cfg, sd, IDS)
    assert _rel(ref, float_) < 0.5  # measured 0.26-0.31 for these three, 0.16-0.39 over seeds 0-3


def test_transformers_fp8_loader_agrees_where_every_tensor_is_whole_blocks(tmp_path, monkeypatch):
    """An independent reader of write_fp8_block: transformers' FineGrainedFP8 dequantization. It insists on
    `accelerate` (unused on this path), so the check is lifted unless accelerate is installed. Block 32 makes every
    tiny tensor a whole number of blocks or a single block, where its rows // scale_rows block rule holds."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        import transformers.quantizers.quantizer_finegrained_fp8 as fp8_quantizer
        monkeypatch.setattr(fp8_quantizer, "is_accelerate_available", lambda: True)
    cfg = hf.tiny_deepseek_config()
    sd = hf.random_state_dict(cfg, seed=0)
    d = hf.write_fp8_block(tmp_path, cfg, sd, block=(32, 32))
    loaded = hf.to_checkpoint_names(hf.load_transformers(d).state_dict())
    deq = hf.dequantized_state_dict(d)
    assert set(loaded) == set(deq) == set(sd)
    assert all(torch.equal(loaded[k], deq[k]) for k in deq)


def test_int4_directory_is_k2_thinking_format(tmp_path, tiny):
    from compressed_tensors.quantization import QuantizationConfig

    cfg, sd, float_ = tiny
    d = hf.write_int4_experts(tmp_path, cfg, sd)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc == hf.K2_THINKING_QUANTIZATION_CONFIG
    weights = QuantizationConfig.model_validate(qc).config_groups["group_0"].weights
    assert (weights.num_bits, weights.type, weights.symmetric, weights.strategy, weights.group_size) == \
        (4, "int", True, "group", 32)
    raw = hf.read_checkpoint(d)
    experts = {k for k in sd if _experts(k)}
    assert len(experts) == 2 * 8 * 3
    suffixes = ("weight_packed", "weight_scale", "weight_shape")
    assert set(raw) == (set(sd) - experts) | {k[: -len("weight")] + s for k in experts for s in suffixes}
    for name, t in raw.items():
        if name in sd:  # attention, dense MLP, shared experts, router, embeddings, head: as stored in bf16 releases
            assert t.dtype == (torch.float32 if "e_score" in name else torch.bfloat16), name
    deq = hf.dequantized_state_dict(d)
    for name in experts:
        base, (rows, cols) = name[: -len("weight")], sd[name].shape
        packed, scale, shape = (raw[base + s] for s in suffixes)
        assert (packed.dtype, tuple(packed.shape)) == (torch.int32, (rows, cols // 8)), name
        assert (scale.dtype, tuple(scale.shape)) == (torch.bfloat16, (rows, cols // 32)), name
        assert shape.dtype == torch.int32 and shape.tolist() == [rows, cols], name
        # symmetric groups: scale = bf16(group amax / 7.5); q = round(w / scale) in [-8, 7], so
        # |w - scale q| <= scale / 2, but for the group's largest |w| when bf16 rounded its scale down
        # (w / scale <= 7.5 (1 + 2^-8)), clamped to 7
        w = torch.as_tensor(sd[name])
        amax = w.abs().unflatten(-1, (cols // 32, 32)).amax(-1)
        assert torch.equal(scale, (amax / 7.5).bfloat16()), name
        err = (w - deq[name]).abs()
        assert (err <= scale.float().repeat_interleave(32, 1) * (0.5 + 7.5 * 2.0**-8) * (1 + 1e-6)).all(), name
    # transformers' compressed-tensors loader: the experts as bf16(scale * q), everything else as stored
    loaded = hf.to_checkpoint_names(hf.load_transformers(d).state_dict())
    for name, value in deq.items():
        assert torch.equal(loaded[name], value.bfloat16().float() if name in experts else value), name
    bf16_experts = {k: (v.bfloat16().float() if k in experts else v) for k, v in deq.items()}
    ref = hf.reference_logits(d, IDS)
    np.testing.assert_allclose(ref, hf.float_logits(cfg, bf16_experts, IDS), rtol=0, atol=1e-5)
    assert _rel(ref, float_) < 0.5  # measured 0.16 here, 0.18-0.31 over seeds 0-3 with other ids


def test_int4_group_size_is_the_writers(tmp_path):
    cfg = hf.tiny_deepseek_config()
    sd = hf.random_state_dict(cfg, seed=2)
    d = hf.write_int4_experts(tmp_path, cfg, sd, group_size=16)
    assert json.loads((d / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"][
        "weights"]["group_size"] == 16
    assert tuple(hf.read_checkpoint(d)["model.layers.1.mlp.experts.3.down_proj.weight_scale"].shape) == (64, 2)
    ref = hf.reference_logits(d, IDS)
    np.testing.assert_allclose(ref, hf.float_logits(cfg, hf.dequantized_state_dict(d), IDS), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        hf.write_int4_experts(tmp_path / "bad", cfg, sd, group_size=64)  # down_proj's in dim is 32


def test_mtp_layer_is_written_and_ignored_by_transformers(tmp_path, tiny):
    cfg, sd, float_ = tiny
    mtp = hf.mtp_tensors(cfg)
    p = "model.layers.3."
    assert {k: v for k, v in mtp.items() if ".mlp." not in k and ".self_attn." not in k} == {
        p + "embed_tokens.weight": (300, 64), p + "enorm.weight": (64,), p + "hnorm.weight": (64,),
        p + "eh_proj.weight": (64, 128), p + "shared_head.norm.weight": (64,), p + "shared_head.head.weight": (300, 64),
        p + "input_layernorm.weight": (64,), p + "post_attention_layernorm.weight": (64,)}
    assert mtp[p + "mlp.experts.7.up_proj.weight"] == (32, 64) and p + "mlp.gate.e_score_correction_bias" in mtp
    assert len(mtp) == 6 + 2 + 7 + 2 + 3 + 8 * 3  # extras, layer norms, attention, router, shared, experts
    full = {**sd, **hf.random_mtp_state_dict(cfg)}
    d = hf.write_fp8_block(tmp_path, cfg, full)
    assert json.loads((d / "config.json").read_text())["num_nextn_predict_layers"] == 1
    raw = hf.read_checkpoint(d)
    assert raw[p + "eh_proj.weight"].dtype == torch.bfloat16 and p + "eh_proj.weight_scale_inv" not in raw
    assert raw[p + "embed_tokens.weight"].dtype == raw[p + "shared_head.head.weight"].dtype == torch.bfloat16
    assert raw[p + "self_attn.o_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw[p + "mlp.experts.0.gate_proj.weight_scale_inv"].dtype == torch.float32
    without = hf.write_fp8_block(tmp_path / "without", cfg, sd)
    np.testing.assert_array_equal(hf.reference_logits(d, IDS), hf.reference_logits(without, IDS))


# Published totals. DeepSeek-V3 (README_WEIGHTS.md): 671B main model + an MTP module of 11.5B unique parameters.
# Per-tensor inventories of the FP8 releases (shapes, dtypes, sums): DeepSeek-R1 (V3 layout) 91,991 tensors holding
# 684,531,386,000 values; Kimi-K2-Instruct 139,644 tensors holding 1,026,470,731,056 values, 61 of them
# `self_attn.rotary_emb.inv_freq` of 56 values that transformers' model does not have.
@pytest.mark.parametrize("preset, tensors, params, scales, published", [
    ("deepseek-v3", 45395, 671_026_419_200, 45032, 671e9),
    ("kimi-k2", 69975, 1_026_408_232_448, 69608, 1.04e12),
])
def test_full_size_shapes_add_up_to_the_releases(preset, tensors, params, scales, published):
    cfg = hf.preset_config(preset)
    shapes = hf.meta_parameters(preset)
    count = lambda d: sum(math.prod(s) for s in d.values())  # noqa: E731
    assert (len(shapes), count(shapes)) == (tensors, params)
    experts = cfg.n_routed_experts * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    assert sum(".mlp.experts." in k for k in shapes) == 3 * experts
    assert shapes["model.layers.60.mlp.experts.0.gate_proj.weight"] == (2048, 7168)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    # V3: 0.004% over 671B. K2: 1.3% under its "1.04T" (1.0264T; with one MTP module of its shape, 1.0459T)
    assert abs(params / published - 1) < (0.001 if preset == "deepseek-v3" else 0.015)
    fp8 = hf.fp8_scale_names(shapes)
    assert len(fp8) == scales
    assert fp8["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == (5, 56)  # 576 rows: ragged
    assert fp8["model.layers.60.mlp.experts.0.down_proj.weight_scale_inv"] == (56, 16)
    assert "model.layers.60.mlp.gate.weight_scale_inv" not in fp8 and "lm_head.weight_scale_inv" not in fp8
    release = {**shapes, **fp8}
    if preset == "deepseek-v3":
        mtp = hf.mtp_tensors(cfg)
        release.update({**mtp, **hf.fp8_scale_names(mtp)})
        assert count(mtp) - 2 * cfg.vocab_size * cfg.hidden_size == 11_610_068_224  # "11.5B unique parameters"
        assert (len(release), count(release)) == (91_991, 684_531_386_000)
    else:
        assert (len(release) + 61, count(release) + 61 * 56) == (139_644, 1_026_470_731_056)
