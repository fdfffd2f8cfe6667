"""`k2jax import` and `train --init-from` on checkpoints in the released formats, written by writers
independent of k2jax (tests/hf_checkpoints.py: numpy FP8 blocks, compressed-tensors int4, torch bf16),
against transformers' logits on the same files; every published tensor name of Kimi-K2 and
DeepSeek-V3 mapped without allocating; export -> import round trips; bad checkpoints refused before
anything is written."""

from __future__ import annotations

import json
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_checkpoints as hfc
from k2jax.cli import main
from k2jax.config import get_preset
from k2jax.data.tokenizer import ByteTokenizer
from k2jax.generate import load
from k2jax.interop import hf_layout, importer
from k2jax.interop.deepseek_v3 import _is_fp8_weight, check_tensors, config_from_hf
from k2jax.interop.quant import WeightReader
from k2jax.model.transformer import Transformer

IDS = np.array([[5, 17, 250, 3, 99, 42, 7, 128, 64, 1, 200, 11]])


def _write(directory, fmt: str, config, sd, **kw):
    """A checkpoint directory in `fmt` (bf16, fp8, int4) with a byte-level tokenizer beside it."""
    writer = {"bf16": hfc.write_bf16, "fp8": hfc.write_fp8_block, "int4": hfc.write_int4_experts}[fmt]
    writer(directory, config, sd, **kw)
    ByteTokenizer().save(directory / "tokenizer")
    return directory


def _logits(run_dir) -> np.ndarray:
    run = load(run_dir, compute_dtype="float32")
    logits, _ = run.model(jnp.asarray(IDS, jnp.int32))
    return np.asarray(logits)


@pytest.fixture(scope="module")
def tiny():
    """A tiny DeepSeek-V3 config with ragged 128-blocks (expert FFN 160) and its random weights plus an MTP layer."""
    config = hfc.tiny_deepseek_config(yarn=True, moe_intermediate_size=160)
    sd = hfc.random_state_dict(config, seed=0)
    return config, sd, {**sd, **hfc.random_mtp_state_dict(config)}


@pytest.mark.parametrize("fmt, tol", [("bf16", 1e-4), ("fp8", 1e-4), ("int4", 1e-4)])
def test_import_matches_transformers_on_the_same_files(tiny, tmp_path, capsys, fmt, tol):
    config, sd, with_mtp = tiny
    hf_dir = _write(tmp_path / fmt, fmt, config, with_mtp if fmt == "fp8" else sd)
    run_dir = tmp_path / "run"
    assert main(["import", str(hf_dir), str(run_dir)]) == 0
    out = capsys.readouterr().out
    if fmt == "fp8":
        assert "skipping the multi-token-prediction layer 3" in out
    record = json.loads((run_dir / "import.json").read_text())
    assert record["tensors"] == len(WeightReader(hf_dir).logical_names()) - record["skipped_mtp_tensors"]
    ours = _logits(run_dir)
    # the float model of the same file contents (the format's definition, dequantized in torch)
    exact = hfc.float_logits(config, hfc.dequantized_state_dict(hf_dir), IDS)
    np.testing.assert_allclose(ours, exact, atol=tol, rtol=tol)
    # transformers' own loader (int4: it rounds scale * q to bf16, so within bf16's step)
    np.testing.assert_allclose(ours, hfc.reference_logits(hf_dir, IDS), atol=2e-2 if fmt == "int4" else tol, rtol=tol)


def test_export_then_import_round_trips_each_format(tiny, tmp_path):
    config, sd, _ = tiny
    run_dir = tmp_path / "run"
    assert main(["import", str(_write(tmp_path / "hf", "bf16", config, sd)), str(run_dir)]) == 0
    params = nnx.to_pure_dict(nnx.state(load(run_dir).model, nnx.Param))
    for dtype in ("bfloat16", "fp8"):
        out, again = tmp_path / f"out-{dtype}", tmp_path / f"again-{dtype}"
        assert main(["export", str(run_dir), str(out), "--dtype", dtype]) == 0
        assert main(["import", str(out), str(again)]) == 0
        back = nnx.to_pure_dict(nnx.state(load(again).model, nnx.Param))
        if dtype == "bfloat16":  # the weights are bf16 values: exact
            jax.tree.map(np.testing.assert_array_equal, back, params)
        else:  # what we wrote is what the independent FP8 reader reads, and transformers agrees on the logits
            np.testing.assert_allclose(_logits(again), hfc.reference_logits(out, IDS), atol=1e-4, rtol=1e-4)
            stored = hfc.read_checkpoint(out)
            assert {n for n in stored if n.endswith("_scale_inv")} == set(hfc.fp8_scale_names(
                {n: tuple(t.shape) for n, t in stored.items()}))


def test_bad_checkpoints_are_refused_before_anything_is_written(tiny, tmp_path, capsys):
    config, sd, _ = tiny
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "model.layers.2.mlp.experts.5.up_proj.weight"},
                    "missing key 'model.layers.2.mlp.experts.5.up_proj.weight'"),
        "shape": ({**sd, "model.norm.weight": np.ones(65, np.float32)}, r"model.norm.weight: expected shape (64,)"),
        "extra": ({**sd, "model.layers.3.self_attn.o_proj.weight": np.ones((64, 64), np.float32)}, "no place"),
    }
    for name, (bad, message) in cases.items():
        run_dir = tmp_path / f"run-{name}"
        assert main(["import", str(_write(tmp_path / name, "bf16", config, bad)), str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not run_dir.exists() and not list(tmp_path.glob(".run-*"))


def test_an_interrupted_import_leaves_no_run_and_the_same_command_then_works(tiny, tmp_path, monkeypatch):
    config, sd, _ = tiny
    hf_dir, run_dir = _write(tmp_path / "hf", "fp8", config, sd), tmp_path / "run"
    original = importer.place
    calls = []

    def dies_on_the_tenth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the weights
        return original(*args, **kwargs)

    monkeypatch.setattr(importer, "place", dies_on_the_tenth)
    with pytest.raises(KeyboardInterrupt):
        importer.import_run(hf_dir, run_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # neither the run nor its partial directory
    (tmp_path / ".run.importing" / "checkpoints").mkdir(parents=True)  # what a SIGKILL leaves
    monkeypatch.setattr(importer, "place", original)
    importer.import_run(hf_dir, run_dir)  # replaces a killed import's partial directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
    assert (run_dir / "checkpoints" / "0").is_dir()


def test_imported_run_resumes_with_new_data_settings_and_init_from_starts_a_run(tiny, tmp_path, capsys):
    config, sd, _ = tiny
    hf_dir, run_dir = _write(tmp_path / "hf", "int4", config, sd), tmp_path / "run"
    assert main(["import", str(hf_dir), str(run_dir)]) == 0
    small = ["--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "data.seq_len=32", "--set",
             "data.max_corpus_bytes=200000", "--set", "train.progress=false", "--set", "eval.tasks=[]", "--set", "eval.bits_per_byte=[]"]
    # an imported checkpoint fixes only the model: data, optimizer and batch may differ from import's defaults
    assert main(["train", str(run_dir / "config.yaml"), "--resume", *small]) == 0
    assert "resuming at step 0" in capsys.readouterr().out
    assert main(["sample", str(run_dir), "--tokens", "4"]) == 0
    assert main(["train", str(run_dir / "config.yaml"), "--resume", "--set", "model.d_model=32", *small]) == 2
    assert "model.d_model" in capsys.readouterr().err
    # train --init-from: a new run whose model is config.json's and whose first loss is the imported model's
    fresh = tmp_path / "fresh"
    assert main(["train", "--init-from", str(hf_dir), "--set", f"train.out_dir={fresh}", *small]) == 0
    assert (fresh / "tokenizer" / "tokenizer_kind.json").read_text() == (hf_dir / "tokenizer" /
                                                                           "tokenizer_kind.json").read_text()
    assert main(["train", "--init-from", str(hf_dir), "--set", "model.num_layers=2", *small]) == 2
    assert "model.num_layers comes from" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["kimi-k2", "deepseek-v3"])
def test_every_published_tensor_maps_to_a_k2jax_weight_without_allocating(preset):
    hf = hfc.preset_config(preset)
    published = hfc.meta_parameters(preset)  # transformers on the meta device, checkpoint names
    cfg = config_from_hf(hf.to_dict())
    ours = get_preset(preset)  # our preset of the same model: the same architecture
    architecture = ("d_model", "num_layers", "num_dense_layers", "dense_ffn_dim", "vocab_size", "attention",
                    "moe.num_experts", "moe.experts_per_token", "moe.num_shared_experts", "moe.expert_ffn_dim",
                    "moe.num_expert_groups", "moe.top_groups", "moe.routed_scaling_factor", "moe.router")
    for field in architecture:  # (how the router is balanced in training is not in config.json)
        assert operator.attrgetter(field)(cfg) == operator.attrgetter(field)(ours), field
    mtp = hfc.mtp_tensors(hf)
    shapes = {**published, **hfc.fp8_scale_names(published), **mtp}
    # with FP8 scales dropped (WeightReader folds them into their weights) every tensor has a place, MTP skipped
    logical = {k: v for k, v in shapes.items() if not k.endswith("_scale_inv")}
    assert sorted(check_tensors(cfg, logical, fused_experts=False, mtp_layers=1)) == sorted(mtp)
    # our FP8 export writes scales for exactly the weights the releases quantize, in the same shapes
    assert {f"{n}_scale_inv": tuple(math.ceil(d / 128) for d in s) for n, s in published.items()
            if _is_fp8_weight(n)} == hfc.fp8_scale_names(published)
    # every k2jax weight has a source whose output has the model's shape (one layer / expert of each)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    sources, _ = hf_layout.sources(cfg)
    flat = dict(hf_layout.leaves(sources))
    assert set(flat) == {tuple(str(getattr(k, "key", k)) for k in path)
                         for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, src in flat.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        unit, stacked = src, []
        while isinstance(unit, hf_layout.Stacked):
            stacked.append(len(unit.parts))
            unit = unit.parts[0]
        assert tuple(stacked) == leaf.shape[:src.depth], path
        zeros = [np.broadcast_to(np.float32(0), shape) for _, shape in unit.tensors]
        assert unit.make(*zeros).shape == leaf.shape[src.depth:], path
