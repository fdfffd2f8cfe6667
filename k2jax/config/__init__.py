"""Typed, validated configuration for every knob in k2jax: the sections (`schema.py`), the named
presets (`presets.py`) and loading from YAML and `--set` overrides (`load.py`)."""

from k2jax.config.load import (LEGACY_VALUES, MOVED_KEYS, from_dict, load_config, parse_overrides, read_yaml,
                               replace, to_dict, upgrade_layout, with_legacy_values)
from k2jax.config.presets import PRESETS, get_preset, k2_family, preset_execution
from k2jax.config.schema import (AttentionConfig, CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig,
                                 ExecutionConfig, MeshConfig, ModelConfig, MoEConfig, OptimConfig, TrainConfig,
                                 YarnConfig, may_change_on_resume, resume_table)

__all__ = [
    "AttentionConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "ExecutionConfig",
    "MeshConfig", "ModelConfig", "MoEConfig", "OptimConfig", "TrainConfig", "YarnConfig", "PRESETS", "get_preset",
    "k2_family", "preset_execution", "LEGACY_VALUES", "MOVED_KEYS", "from_dict", "load_config", "parse_overrides",
    "read_yaml", "replace", "to_dict", "upgrade_layout", "with_legacy_values", "may_change_on_resume", "resume_table",
]
