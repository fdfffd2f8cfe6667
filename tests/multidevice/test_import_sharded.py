"""A checkpoint streamed into a sharded layout (interop.importer) on 8 devices: every shard equals the
whole-tensor conversion, each HF tensor is read once, and blocks built in pieces equal blocks built whole."""

import jax
import numpy as np
import pytest
from flax import nnx

from k2jax.config import load_config
from k2jax.generate import _with_weights
from k2jax.interop import importer
from k2jax.interop.deepseek_v3 import load_hf_checkpoint, save_hf_checkpoint
from k2jax.interop.quant import WeightReader
from k2jax.train.step import abstract_train_state, init_train_state


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model (scanned layers, q_lora) written as FP8 and as bf16 checkpoints."""
    cfg = load_config("experiments/tiny.yaml", ["model.attention.q_lora_rank=24"])
    _, state = init_train_state(cfg)
    params, biases = jax.device_get(state["params"]), jax.device_get(state["model_state"])
    dirs = {}
    for dtype in ("fp8", "bfloat16"):
        dirs[dtype] = tmp_path_factory.mktemp(dtype)
        save_hf_checkpoint(dirs[dtype], params, biases, cfg.model, dtype=dtype, shard_bytes=40_000)
    return dirs


@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
@pytest.mark.parametrize("mesh, budget", [(dict(fsdp=2, expert=4), None), (dict(fsdp=4, expert=2), 2048),
                                          (dict(expert=8), 512)])
def test_sharded_import_equals_whole_tensors(exported, dtype, mesh, budget, monkeypatch):
    hf_dir = exported[dtype]
    assert len(list(hf_dir.glob("*.safetensors"))) > 1  # several files and an index
    overrides = [f"mesh.{k}={v}" for k, v in mesh.items()] + ["model.compute_dtype=float32"]
    cfg = importer.run_config(hf_dir, None, overrides)
    _, expected_params, expected_biases = load_hf_checkpoint(hf_dir)
    setup, abstract = abstract_train_state(cfg)
    if budget is not None:
        monkeypatch.setattr(importer, "BLOCK_BYTES", budget)  # blocks built in pieces on the device
    params, biases, stats = importer.import_weights(WeightReader(hf_dir), cfg, abstract, importer.hf_config(hf_dir))
    got, want = jax.tree_util.tree_flatten_with_path((params, biases))[0], jax.tree.leaves((expected_params,
                                                                                            expected_biases))
    assert len(got) == len(want)
    for (path, x), y, sh in zip(got, want, jax.tree.leaves(setup.shardings["params"]) + jax.tree.leaves(
            setup.shardings["model_state"])):
        assert x.sharding == sh, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=jax.tree_util.keystr(path))
    # each stored tensor read once, whatever the layout
    assert stats.tensors == len(WeightReader(hf_dir).logical_names())


def test_imported_model_generates_what_the_whole_tensor_model_does(exported):
    from k2jax.data.tokenizer import ByteTokenizer
    from k2jax.inference.engine import Engine, SamplingParams

    hf_dir = exported["fp8"]
    cfg = importer.run_config(hf_dir, None, ["mesh.fsdp=2", "mesh.expert=4", "model.compute_dtype=float32"])
    setup, abstract = abstract_train_state(cfg)
    params, biases, _ = importer.import_weights(WeightReader(hf_dir), cfg, abstract, importer.hf_config(hf_dir))
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sharded = Engine(_with_weights(cfg, params, biases), ByteTokenizer(), max_batch=8, max_len=48,
                     mesh=setup.mesh).generate(["def f(x):", "import os\n"], sampling)
    _, p, b = load_hf_checkpoint(hf_dir)
    single = Engine(_with_weights(cfg, p, b), ByteTokenizer(), max_batch=2, max_len=48).generate(
        ["def f(x):", "import os\n"], sampling)
    assert [c.token_ids for c in sharded] == [c.token_ids for c in single]
    assert nnx.to_pure_dict(nnx.state(_with_weights(cfg, p, b), nnx.Param)).keys() == params.keys()
