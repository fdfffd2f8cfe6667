"""Configs: YAML + --set overrides, strict keys and types, shape validation naming the field."""

import dataclasses

import pytest

from k2jax.config import Config, ConfigError, ModelConfig, from_dict, load_config, to_dict
from k2jax.model.presets import PRESETS


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.batch_size=4", "optim.name=adamw", "model.num_heads=2",
                             "model.num_kv_heads=2"])
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4 and cfg.optim.name == "adamw"
    assert cfg.model.d_model == PRESETS["tiny"].d_model and cfg.model.num_heads == 2
    assert load_config(None, ["optim.learning_rate=3e-4"]).optim.learning_rate == 3e-4  # YAML 1.1 string
    # the saved (plain dict) form loads back to the same config
    assert from_dict(Config, to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, needle", [
    ("train.stpes=3", "did you mean: steps"),
    ("modle.d_model=3", "did you mean: model"),
    ("train.steps=ten", "train.steps: expected an integer"),
    ("optim.learning_rate=fast", "optim.learning_rate: expected a number"),
    ("train.progress=3", "train.progress: expected true/false"),
    ("optim.name=muonclp", "did you mean 'muonclip'"),
    ("model.preset=kimi-k3", "unknown preset 'kimi-k3'"),
    ("train.grad_accum=3", "train.grad_accum"),
    ("data.seq_len=99999", "data.seq_len"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match="(?i)" + needle.replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize("changes, field", [
    (dict(attention="mha", num_heads=6, num_kv_heads=4), "model.num_kv_heads"),
    (dict(attention="gqa", num_heads=6, num_kv_heads=4), "model.num_heads"),
    (dict(experts_per_token=9, num_experts=8), "model.experts_per_token"),
    (dict(attention="mla", kv_lora_rank=512, d_model=128), "model.kv_lora_rank"),
    (dict(attention="mla", q_lora_rank=256, d_model=128), "model.q_lora_rank"),
    (dict(attention="flash"), "model.attention"),
    (dict(num_expert_groups=3, num_experts=8), "model.num_expert_groups"),
    (dict(num_dense_layers=5, num_layers=2), "model.num_dense_layers"),
])
def test_inconsistent_model_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        dataclasses.replace(ModelConfig(), **changes)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_every_experiment_file_loads():
    from pathlib import Path

    files = sorted(Path(__file__).parents[1].glob("experiments/*.yaml"))
    assert files
    for f in files:
        assert isinstance(load_config(f), Config)


def test_vocab_size_follows_the_tokenizer_unless_set():
    assert load_config(None, ["model.preset=small"]).model.vocab_size == PRESETS["small"].vocab_size  # bytes fit
    bpe = ["model.preset=small", "data.tokenizer=bpe", "data.bpe_vocab_size=2048"]
    assert load_config(None, bpe).model.vocab_size == 2048
    assert load_config(None, [*bpe, "model.vocab_size=4096"]).model.vocab_size == 4096
    assert load_config(None, [*bpe, "model.vocab_size=320"]).model.vocab_size == 320  # explicit: checked at train
