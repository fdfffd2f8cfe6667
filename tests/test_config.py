"""Configs: YAML + --set overrides, strict keys and types, shape validation naming the field."""

from pathlib import Path

import pytest
import yaml

from k2jax.config import (PRESETS, AttentionConfig, Config, ConfigError, ExecutionConfig, ModelConfig, from_dict,
                          load_config, replace, to_dict, with_legacy_values)

OLD_RUN_CONFIG = Path(__file__).parent / "data" / "config_before_split.yaml"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.batch_size=4", "optim.name=adamw", "model.attention.num_heads=2",
                             "model.attention.num_kv_heads=2"])
    assert cfg.train.steps == 7 and cfg.train.batch_size == 4 and cfg.optim.name == "adamw"
    assert cfg.model.d_model == PRESETS["tiny"].d_model and cfg.model.attention.num_heads == 2
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
    ({"attention.kind": "mha", "attention.num_heads": 6, "attention.num_kv_heads": 4},
     "model.attention.num_kv_heads"),
    ({"attention.kind": "gqa", "attention.num_heads": 6, "attention.num_kv_heads": 4}, "model.attention.num_heads"),
    ({"moe.experts_per_token": 9, "moe.num_experts": 8}, "model.moe.experts_per_token"),
    ({"attention.kind": "mla", "attention.kv_lora_rank": 512, "d_model": 128}, "model.attention.kv_lora_rank"),
    ({"attention.kind": "mla", "attention.q_lora_rank": 256, "d_model": 128}, "model.attention.q_lora_rank"),
    ({"attention.kind": "flash"}, "model.attention.kind"),
    ({"moe.num_expert_groups": 3, "moe.num_experts": 8}, "model.moe.num_expert_groups"),
    ({"num_dense_layers": 5, "num_layers": 2}, "model.num_dense_layers"),
])
def test_inconsistent_model_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        replace(ModelConfig(), changes)


def test_a_preset_is_the_base_of_nested_overrides():
    cfg = load_config(None, ["model.preset=kimi-k2", "model.attention.yarn.factor=2", "model.moe.num_experts=64"])
    kimi = PRESETS["kimi-k2"]
    assert cfg.model.attention == replace(kimi.attention, {"yarn.factor": 2.0})  # the rest of K2's attention kept
    assert cfg.model.moe == replace(kimi.moe, {"num_experts": 64})
    assert cfg.execution == ExecutionConfig(remat="full")  # the preset's recommended execution...
    assert load_config(None, ["model.preset=kimi-k2", "execution.remat=dots"]).execution.remat == "dots"  # ...unless set
    assert load_config(None, ["model.preset=tiny"]).execution == ExecutionConfig()


def test_a_run_directory_from_before_the_split_still_loads(capsys):
    """An old run's flat config.yaml (written by the previous layout) loads to today's layout with the
    same values, and says which keys it read under their new names."""
    cfg = load_config(OLD_RUN_CONFIG)
    note = capsys.readouterr().err
    assert "before the model config was split" in note and "model.attention -> model.attention.kind" in note
    assert "and 27 more" in note  # 31 keys moved; the note stays one short line
    old = yaml.safe_load(OLD_RUN_CONFIG.read_text())["model"]
    assert cfg.model.attention.kind == old["attention"] == "mla"
    assert cfg.model.attention.kv_lora_rank == old["kv_lora_rank"] and cfg.model.moe.num_experts == old["num_experts"]
    assert cfg.model.moe.dispatch == old["moe_dispatch"] and cfg.execution.remat == old["remat"]
    assert cfg.model == PRESETS["small"]  # the default run's model
    assert from_dict(Config, with_legacy_values(yaml.safe_load(OLD_RUN_CONFIG.read_text()))) == cfg


def test_old_key_names_are_read_with_a_note_and_never_beat_new_ones(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  preset: tiny\n  attention: gqa\n  num_kv_heads: 2\n  remat: full\n")
    cfg = load_config(path, ["model.attention.num_heads=8"])
    assert cfg.model.attention == replace(PRESETS["tiny"].attention, {"kind": "gqa", "num_kv_heads": 2,
                                                                      "num_heads": 8})
    assert cfg.execution.remat == "full"
    assert "model.remat -> execution.remat" in capsys.readouterr().err
    # a --set under the old name overrides the file's new one (later wins, whatever the spelling)
    path.write_text("model:\n  preset: tiny\n  moe:\n    num_experts: 4\n")
    assert load_config(path, ["model.num_experts=16"]).model.moe.num_experts == 16


def test_replace_follows_dotted_paths_and_validates():
    cfg = replace(Config(), {"model.attention.kind": "gqa", "model.attention.num_kv_heads": 2, "train.steps": 3})
    assert cfg.model.attention == AttentionConfig(kind="gqa", num_kv_heads=2) and cfg.train.steps == 3
    with pytest.raises(ConfigError, match="model.attention.num_kv_heads"):
        replace(Config(), {"model.attention.num_kv_heads": 3})


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
