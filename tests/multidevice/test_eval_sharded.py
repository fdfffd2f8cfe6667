"""The evaluation suite on parameters sharded over meshes of 8 fake CPU devices, as the training loop's
`eval` section runs it, against one device."""

import jax
import pytest

from k2jax.config import MeshConfig, load_config, replace
from k2jax.data.tokenizer import ByteTokenizer
from k2jax.eval.scoring import ModelParts
from k2jax.eval.suite import Suite, metrics
from k2jax.parallel.sharding import make_mesh
from k2jax.train.step import init_train_state

MESHES = {"one device": dict(data=1), "data=2 fsdp=2 expert=2": dict(data=2, fsdp=2, expert=2),
          "fsdp=2 expert=2 tensor=2": dict(data=1, fsdp=2, expert=2, tensor=2)}


def test_suite_on_a_mesh_matches_one_device(tmp_path):
    cfg = load_config("experiments/tiny.yaml", ["model.compute_dtype=float32"])
    text = tmp_path / "text.txt"
    text.write_text("import os\n\n\ndef main(argv):\n    return os.path.join(*argv)\n" * 8)
    suite = Suite.build(ByteTokenizer(), cfg.data.seq_len, texts=[f"code={text}"], tasks=["stdlib_mc"], heldout=None,
                        max_items=12, where=("texts", "tasks"))
    results = {}
    for name, axes in MESHES.items():
        run_cfg = replace(cfg, {"execution.expert_parallel": "all_to_all"}) if "tensor" in name else cfg
        devices = jax.devices()[:1] if name == "one device" else None
        setup, state = init_train_state(run_cfg, make_mesh(MeshConfig(**axes), devices))
        parts = ModelParts(setup.graphdef, state["params"], state["model_state"], setup.mesh)
        results[name] = metrics(suite.run(parts, cfg.train.batch_size))
    ref = results["one device"]
    assert set(ref) == {"eval/bpb/code", "eval/stdlib_mc/acc", "eval/stdlib_mc/acc_norm"}
    for name, got in results.items():
        assert got == pytest.approx(ref, rel=1e-5), name
