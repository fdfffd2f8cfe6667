"""k2jax.interop.safetensors_io and k2jax.interop.quant against independent writers: the `safetensors`
package (torch bf16 / float8 tensors) and the `compressed-tensors` package (pack-quantized int weights)."""

import json
import os
from collections import Counter

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from k2jax.interop.deepseek_v3 import InteropError
from k2jax.interop.quant import (WeightReader, dequantize_fp8_block, dequantize_pack_quantized,
                                 quantize_fp8_block)
from k2jax.interop.safetensors_io import SafetensorsDir, save_file, save_index

F8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16


def _bits(a) -> bytes:
    """The raw bytes of a numpy array or torch tensor."""
    if isinstance(a, torch.Tensor):
        return a.contiguous().view(torch.uint8).numpy().tobytes()
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def _torch_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.fp8": (torch.randn(4, 7, generator=g) * 40).to(torch.float8_e4m3fn),
        "c.f32": torch.randn(2, 3, 4, generator=g),
        "d.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_reads_what_safetensors_writes_multishard(tmp_path):
    t = _torch_tensors()
    torch_save_file({k: t[k] for k in ("a.bf16", "b.fp8")}, tmp_path / "m-1.safetensors", metadata={"format": "pt"})
    torch_save_file({k: t[k] for k in ("c.f32", "d.i64")}, tmp_path / "m-2.safetensors")
    # a file the index does not list is not part of the checkpoint
    torch_save_file({"stray": torch.zeros(2)}, tmp_path / "consolidated.safetensors")
    save_index(tmp_path, {"a.bf16": "m-1.safetensors", "b.fp8": "m-1.safetensors",
                          "c.f32": "m-2.safetensors", "d.i64": "m-2.safetensors"}, total_size=0)
    sd = SafetensorsDir(tmp_path)
    assert sd.names() == sorted(t) and "a.bf16" in sd and "stray" not in sd
    codes = {"a.bf16": "BF16", "b.fp8": "F8_E4M3", "c.f32": "F32", "d.i64": "I64"}
    for name, ref in t.items():
        got = sd.read(name)
        assert sd.dtype(name) == codes[name] and sd.shape(name) == tuple(ref.shape) == got.shape
        assert sd.nbytes(name) == got.nbytes == ref.numel() * ref.element_size()
        assert _bits(got) == _bits(ref), name
    np.testing.assert_array_equal(sd.read("a.bf16").astype(np.float32), t["a.bf16"].float().numpy())
    np.testing.assert_array_equal(sd.read("b.fp8").astype(np.float32), t["b.fp8"].float().numpy())

    (tmp_path / "model.safetensors.index.json").unlink()  # no index: every file
    assert SafetensorsDir(tmp_path).names() == sorted([*t, "stray"])

    save_index(tmp_path, {"a.bf16": "m-1.safetensors", "gone": "m-2.safetensors"}, total_size=0)
    with pytest.raises(InteropError, match=r"m-2\.safetensors: has no tensor 'gone'"):
        SafetensorsDir(tmp_path)


def test_save_file_round_trips_and_safetensors_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w.bf16": rng.normal(size=(5, 3)).astype(BF16),
        "w.fp8": (rng.normal(size=(3, 7)) * 50).astype(F8),
        "w.f32": rng.normal(size=(4,)).astype(np.float32),
        "n.i64": np.arange(5, dtype=np.int64),
        "n.i32": np.arange(3, dtype=np.int32),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no .tmp left
    sd = SafetensorsDir(tmp_path)
    for name, a in tensors.items():
        got = sd.read(name)
        assert got.dtype == a.dtype and got.shape == a.shape and _bits(got) == _bits(a), name
    loaded = torch_load_file(path)
    assert loaded["w.bf16"].dtype == torch.bfloat16 and loaded["w.fp8"].dtype == torch.float8_e4m3fn
    for name, a in tensors.items():
        np.testing.assert_array_equal(loaded[name].to(torch.float64).numpy(), a.astype(np.float64), err_msg=name)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_save_file_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"

    def fail(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk gone"):
        save_file({"x": np.ones(4, np.float32)}, path)
    assert list(tmp_path.iterdir()) == []


def test_truncated_or_bad_files_raise_naming_them(tmp_path):
    path = tmp_path / "shard.safetensors"
    save_file({"x": np.ones((64, 64), np.float32)}, path)
    sd = SafetensorsDir(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(InteropError, match=r"shard\.safetensors is truncated: tensor 'x'"):
        sd.read("x")  # truncated after open
    with pytest.raises(InteropError, match=r"shard\.safetensors is truncated: tensor 'x'"):
        SafetensorsDir(tmp_path)
    path.write_bytes(data[:5])
    with pytest.raises(InteropError, match=r"shard\.safetensors: not a safetensors file"):
        SafetensorsDir(tmp_path)
    path.write_bytes((8).to_bytes(8, "little") + b"{not js}")
    with pytest.raises(InteropError, match=r"shard\.safetensors: bad safetensors header"):
        SafetensorsDir(tmp_path)
    header = json.dumps({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    with pytest.raises(InteropError, match=r"shard\.safetensors: tensor 'x' has a dtype .* 'F4'"):
        SafetensorsDir(tmp_path)


# ----- FP8 block scales


def test_fp8_dequantize_matches_a_per_element_loop():
    rng = np.random.default_rng(1)
    q = (rng.normal(size=(300, 200)) * 100).clip(-448, 448).astype(F8)
    scale_inv = rng.uniform(1e-4, 1e-2, size=(3, 2)).astype(np.float32)
    got = dequantize_fp8_block(q, scale_inv)
    want = np.empty((300, 200), np.float32)
    qf = q.astype(np.float32)
    for i in range(300):
        for j in range(200):
            want[i, j] = qf[i, j] * scale_inv[i // 128, j // 128]
    np.testing.assert_array_equal(got, want)
    with pytest.raises(InteropError, match="do not fit a"):
        dequantize_fp8_block(q, scale_inv[:, :1])


def test_fp8_quantize_error_is_within_e4m3_precision():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(300, 200)).astype(np.float32) * np.exp(rng.normal(size=(300, 1))).astype(np.float32)
    w[128:256, :128] = 0  # a zero block
    q, scale_inv = quantize_fp8_block(w)
    assert q.dtype == F8 and q.shape == w.shape and scale_inv.shape == (3, 2) and scale_inv[1, 0] == 1
    s = np.repeat(np.repeat(scale_inv, 128, 0), 128, 1)[:300, :200]
    err = np.abs(dequantize_fp8_block(q, scale_inv) - w)
    # 3 mantissa bits: half an ulp is 2**-4 relative; below the normals (2**-6) the step is 2**-9 of the scale
    assert np.all(err <= 2.0**-4 * np.abs(w) * (1 + 1e-6) + 2.0**-10 * s)
    assert np.abs(q.astype(np.float32)).max() == 448


def test_fp8_representable_weight_round_trips_exactly():
    rng = np.random.default_rng(3)
    q = (rng.normal(size=(300, 200)) * 60).clip(-448, 448).astype(F8)
    q[::128, ::128] = 448  # every block's amax is 448 ...
    scale_inv = (2.0 ** rng.integers(-12, 0, size=(3, 2))).astype(np.float32)  # ... times a power of two
    w = dequantize_fp8_block(q, scale_inv)
    q2, scale_inv2 = quantize_fp8_block(w)
    assert _bits(q2) == _bits(q)
    np.testing.assert_array_equal(scale_inv2, scale_inv)


# ----- compressed-tensors pack-quantized


def _ct_compress(w: torch.Tensor, **weights) -> tuple[dict, torch.Tensor, dict]:
    """(compressed tensors, the package's own decompression, config group) of `w` (out, in) by
    compressed-tensors, with min-max scales (and zero points) per group or row."""
    args = QuantizationArgs(type="int", **weights)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = w.unflatten(1, (-1, args.group_size if args.strategy == "group" else w.shape[1]))  # (out, g, size)
    scale, zero_point = calculate_qparams(groups.amin(2), groups.amax(2), args)  # (out, g)
    packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale,
                                                    "weight_zero_point": zero_point}, scheme)
    ref = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    return packed, ref, scheme.model_dump(exclude={"format"})


# (shape, weight and scale dtype, weights args); 44 rows: the 4-bit zero points end in half a word, 100 columns:
# so do the packed rows
CASES = {
    "sym-g32-bf16": ((44, 192), torch.bfloat16, dict(num_bits=4, symmetric=True, strategy="group", group_size=32)),
    "sym-g32-f32": ((44, 192), torch.float32, dict(num_bits=4, symmetric=True, strategy="group", group_size=32)),
    "asym-g32-f32": ((44, 192), torch.float32, dict(num_bits=4, symmetric=False, strategy="group", group_size=32)),
    "asym-g32-bf16": ((44, 192), torch.bfloat16, dict(num_bits=4, symmetric=False, strategy="group", group_size=32)),
    "asym-channel": ((44, 100), torch.float32, dict(num_bits=4, symmetric=False, strategy="channel")),
    "sym-3bit-channel": ((44, 100), torch.float32, dict(num_bits=3, symmetric=True, strategy="channel")),
    "asym-8bit-g64": ((44, 192), torch.float32, dict(num_bits=8, symmetric=False, strategy="group", group_size=64)),
}


@pytest.mark.parametrize("case", CASES)
def test_pack_quantized_equals_compressed_tensors(case, tmp_path):
    shape, dtype, weights = CASES[case]
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    packed, ref, group = _ct_compress(w, **weights)
    np_packed = {k: v.view(torch.int16).numpy().view(BF16) if v.dtype == torch.bfloat16 else v.numpy()
                 for k, v in packed.items()}
    got = dequantize_pack_quantized(np_packed["weight_packed"], np_packed["weight_scale"], np_packed["weight_shape"],
                                    np_packed.get("weight_zero_point"), num_bits=weights["num_bits"],
                                    group_size=weights.get("group_size"))
    assert got.dtype == np.float32 and got.shape == shape
    # the package computes in the scales' dtype; ours is the exact float32 product, which rounds to it
    np.testing.assert_array_equal(torch.from_numpy(got).to(dtype).float().numpy(), ref.float().numpy())
    if dtype == torch.float32:
        np.testing.assert_array_equal(got, ref.numpy())
    step = np.repeat(packed["weight_scale"].float().numpy(), shape[1] // packed["weight_scale"].shape[1], axis=1)
    assert np.all(np.abs(got - w.float().numpy()) <= step * (1 + 1e-6))

    torch_save_file({f"mlp.proj.{k}": v for k, v in packed.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": group},
        "ignore": ["lm_head"]}}))
    reader = WeightReader(tmp_path)
    assert reader.logical_names() == ["mlp.proj.weight"] and reader.shape("mlp.proj.weight") == shape
    np.testing.assert_array_equal(reader.read("mlp.proj.weight"), got)


def test_int4_packing_order_by_hand():
    q = np.array([[-8, -7, 1, 2, 3, 4, 5, 7, 0, -1]], np.int8)  # 10 values: 2 int32 words
    u = q.astype(np.int64) + 8  # stored unsigned, element j at bits 4j of the row's little-endian bit stream
    words = [sum(int(u[0, j]) << 4 * (j - 8 * k) for j in range(8 * k, min(8 * k + 8, 10))) for k in range(2)]
    packed = np.array([words], np.uint32).view(np.int32)
    got = dequantize_pack_quantized(packed, np.ones((1, 1), np.float32), np.array([1, 10]), group_size=10)
    np.testing.assert_array_equal(got, q.astype(np.float32))


# ----- WeightReader


def _write_config(directory, quantization_config):
    (directory / "config.json").write_text(json.dumps({"model_type": "deepseek_v3",
                                                       "quantization_config": quantization_config}))


def test_weight_reader_fp8_checkpoint(tmp_path):
    rng = np.random.default_rng(5)
    w_down = rng.normal(size=(300, 200)).astype(np.float32)
    q, s = quantize_fp8_block(w_down)
    norm = rng.normal(size=(200,)).astype(BF16)
    save_file({"model.layers.0.mlp.down_proj.weight": q, "model.layers.0.mlp.down_proj.weight_scale_inv": s},
              tmp_path / "model-1.safetensors")
    save_file({"model.norm.weight": norm}, tmp_path / "model-2.safetensors")
    save_index(tmp_path, {"model.layers.0.mlp.down_proj.weight": "model-1.safetensors",
                          "model.layers.0.mlp.down_proj.weight_scale_inv": "model-1.safetensors",
                          "model.norm.weight": "model-2.safetensors"}, total_size=q.nbytes + s.nbytes + norm.nbytes)
    _write_config(tmp_path, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]})
    r = WeightReader(tmp_path)
    down = "model.layers.0.mlp.down_proj.weight"
    assert r.logical_names() == [down, "model.norm.weight"]
    assert r.shape(down) == (300, 200) and r.stored_format(down) == "fp8_block"
    assert r.stored_names(down) == (down, down + "_scale_inv")
    assert r.stored_format("model.norm.weight") == "float"
    np.testing.assert_array_equal(r.read(down), dequantize_fp8_block(q, s))
    np.testing.assert_array_equal(r.read("model.norm.weight"), norm.astype(np.float32))
    assert r.read(down, dtype=BF16).dtype == BF16

    _write_config(tmp_path, {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]})
    with pytest.raises(InteropError, match="unsupported fp8 quantization_config: fmt 'e5m2'"):
        WeightReader(tmp_path)
    _write_config(tmp_path, {"quant_method": "awq", "bits": 4})
    with pytest.raises(InteropError, match="unsupported quant_method 'awq'"):
        WeightReader(tmp_path)


def test_weight_reader_mixed_float_and_pack_quantized(tmp_path):
    """Kimi-K2-Thinking's layout: routed experts int4 (symmetric, group 32), the rest bf16; here one more
    group, more specific by its regex, stores the down projections asymmetric per channel."""
    g = torch.Generator().manual_seed(6)
    up, up_ref, sym = _ct_compress(torch.randn(64, 96, generator=g).to(torch.bfloat16),
                                   num_bits=4, symmetric=True, strategy="group", group_size=32)
    down, down_ref, asym = _ct_compress(torch.randn(96, 64, generator=g),
                                        num_bits=4, symmetric=False, strategy="channel")
    float_tensors = {"model.embed_tokens.weight": torch.randn(10, 96, generator=g).to(torch.bfloat16),
                     "model.layers.1.self_attn.o_proj.weight": torch.randn(96, 96, generator=g).to(torch.bfloat16),
                     "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(4, generator=g)}
    e = "model.layers.1.mlp.experts.0"
    stored = {**float_tensors, **{f"{e}.up_proj.{k}": v for k, v in up.items()},
              **{f"{e}.down_proj.{k}": v for k, v in down.items()}}
    names = sorted(stored)
    torch_save_file({k: stored[k] for k in names[:4]}, tmp_path / "a.safetensors")
    torch_save_file({k: stored[k] for k in names[4:]}, tmp_path / "b.safetensors")
    asym["targets"] = ["re:.*down_proj$"]
    _write_config(tmp_path, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                             "config_groups": {"group_0": sym, "group_1": asym},
                             "ignore": ["lm_head", "re:.*self_attn.*"], "quantization_status": "compressed"})
    r = WeightReader(tmp_path)
    assert r.logical_names() == sorted([*float_tensors, f"{e}.up_proj.weight", f"{e}.down_proj.weight"])
    assert Counter(s for n in r.logical_names() for s in r.stored_names(n)) == Counter(stored.keys())
    assert r.stored_names(f"{e}.down_proj.weight") == tuple(
        f"{e}.down_proj.{k}" for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"))
    assert r.stored_format(f"{e}.up_proj.weight") == "int4_pack" and r.stored_format(names[0]) == "float"
    assert r.shape(f"{e}.up_proj.weight") == (64, 96) and r.shape(f"{e}.down_proj.weight") == (96, 64)
    assert r.shape("model.embed_tokens.weight") == (10, 96)
    np.testing.assert_array_equal(r.read(f"{e}.down_proj.weight"), down_ref.numpy())
    np.testing.assert_array_equal(torch.from_numpy(r.read(f"{e}.up_proj.weight")).to(torch.bfloat16).float(),
                                  up_ref.float())
    np.testing.assert_array_equal(r.read("model.embed_tokens.weight"),
                                  float_tensors["model.embed_tokens.weight"].float().numpy())

    _write_config(tmp_path, {"quant_method": "compressed-tensors", "format": "float-quantized",
                             "config_groups": {"group_0": sym}})
    with pytest.raises(InteropError, match="unsupported compressed-tensors format 'float-quantized'"):
        WeightReader(tmp_path)
    asym["targets"] = ["re:.*gate_proj$"]  # now the asymmetric down projection is read as group_0 (symmetric)
    _write_config(tmp_path, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                             "config_groups": {"group_0": sym, "group_1": asym}})
    with pytest.raises(InteropError, match="down_proj: symmetric pack-quantized weights are stored as"):
        WeightReader(tmp_path)
