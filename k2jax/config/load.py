"""Building a `Config` from YAML files and `--set section.key=value` overrides, strictly.

Every key is checked against the dataclass fields (unknown keys name close matches), every value
against the field type, and shapes for consistency, before anything is compiled. `model.preset`
starts the model (and its recommended execution) from a named preset. Configs written before the
model was split into attention/moe/execution parts are read with their keys moved (`upgrade_layout`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from k2jax.config.presets import get_preset, preset_execution
from k2jax.config.schema import Config, ConfigError, DataConfig, ModelConfig


def _type_error(path: str, expected: Any, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {value!r} ({type(value).__name__})")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`, converting YAML forms where lossless."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}{hint}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{path}[{i}]", args[0], v) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _type_error(path, "a mapping", value)
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(path, "true/false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _type_error(path, "a number", value) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        return value
    return value


def _unknown_key(path: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known keys: {', '.join(sorted(known))}."
    where = f"{path}.{key}" if path else key
    return ConfigError(f"unknown config key '{where}'.{hint}")


# Where the flat `model.*` keys of configs written before the split went (old name -> new path).
_ATTENTION_KEYS = ("num_heads", "num_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                   "qk_rope_head_dim", "v_head_dim", "rope_theta", "yarn")
_MOE_KEYS = ("num_experts", "experts_per_token", "num_shared_experts", "expert_ffn_dim", "router",
             "num_expert_groups", "top_groups", "routed_scaling_factor", "norm_topk_prob", "aux_loss_coef",
             "router_z_loss_coef", "router_balance", "bias_update_rate", "capacity_factor")
_EXECUTION_KEYS = ("remat", "attention_impl", "expert_parallel", "expert_buffer_factor", "grouped_matmul")
MOVED_KEYS = {
    "model.attention": "model.attention.kind",  # when a string ("mha", "gqa", "mla"); first, as the section
    **{f"model.{k}": f"model.attention.{k}" for k in _ATTENTION_KEYS},
    **{f"model.{k}": f"model.moe.{k}" for k in _MOE_KEYS},
    **{f"model.{k}": f"execution.{k}" for k in _EXECUTION_KEYS},
    "model.moe_dispatch": "model.moe.dispatch",
}


def upgrade_layout(raw: dict) -> tuple[dict, list[str]]:
    """A config dict with every old flat `model.*` key (MOVED_KEYS) moved to its new place, and the
    moves made ("old -> new"). A key given both ways keeps the old name's value."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw, []
    raw, model, moved = dict(raw), dict(model), []
    for old, new in MOVED_KEYS.items():
        key = old.split(".", 1)[1]
        if key not in model or (key == "attention" and isinstance(model[key], dict)):
            continue
        value = model.pop(key)
        _set_path(raw if new.startswith("execution.") else model, new.removeprefix("model."), value)
        moved.append(f"{old} -> {new}")
    raw["model"] = model
    return raw, moved


# Settings added after runs had been saved without them, with the value those runs trained with
# (not today's default): a resume compares against these.
LEGACY_VALUES = {"model.moe.router_balance": "sign"}


def with_legacy_values(saved: dict) -> dict:
    """A saved config dict in today's layout with each LEGACY_VALUES key it lacks filled in."""
    saved, _ = upgrade_layout(saved)
    saved = json.loads(json.dumps(saved))  # a deep copy of plain data
    for dotted, value in LEGACY_VALUES.items():
        *parents, key = dotted.split(".")
        node = saved
        for name in parents:
            node = node.setdefault(name, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(key, value)
    return saved


def from_dict(cls: type, raw: dict, path: str = "", base=None):
    """Build dataclass `cls` from a nested dict, rejecting unknown or ill-typed keys. Fields the dict
    does not name keep `base`'s values (a preset's, for the model), else the defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    raw = dict(raw)
    if cls is ModelConfig and "preset" in raw:
        base = get_preset(raw.pop("preset"))
    if cls is Config and isinstance(raw.get("model"), dict) and "preset" in raw["model"]:
        base = Config(execution=preset_execution(raw["model"]["preset"]))
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(path, key, names + (["preset"] if cls is ModelConfig else []))
        where = f"{path}.{key}" if path else key
        current = getattr(base, key, None)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            kwargs[key] = from_dict(type(current), value, where, base=current)
        else:
            kwargs[key] = _coerce(where, hints[key], value)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def replace(cfg, changes: dict[str, Any]):
    """`cfg` with the fields named by dotted paths changed, e.g.
    replace(model_cfg, {"attention.kind": "gqa", "moe.num_experts": 4}); validated like any config."""
    here, nested = {}, {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            here[head] = value
    for head, sub in nested.items():
        here[head] = replace(getattr(cfg, head), sub)
    return dataclasses.replace(cfg, **here)


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (tuples as lists), suitable for YAML/JSON."""

    def convert(v):
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v

    return convert(dataclasses.asdict(cfg))


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["train.steps=20", "model.preset=tiny"] into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({_yaml_problem(e)}); quote it "
                              f"to pass it as a string") from None
        _set_path(tree, key, value)
    return tree


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def read_yaml(path: Path):
    """A YAML file's contents; ConfigError naming the file, line and problem if it does not parse."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict | None = None) -> Config:
    """Load a YAML experiment file (or the defaults) and apply `--set` overrides; `base`: sections (e.g. an
    imported model's) under the file's."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = loaded
    raw, moved = upgrade_layout(raw)
    extra, moved_too = upgrade_layout(parse_overrides(overrides or []))
    if moved or moved_too:
        where = " and ".join(([str(path)] if moved else []) + (["--set"] if moved_too else []))
        moves = moved + moved_too
        listed = ", ".join(moves[:4]) + (f" and {len(moves) - 4} more" if len(moves) > 4 else "")
        print(f"k2jax: {where} uses key names from before the model config was split; read as {listed}",
              file=sys.stderr)
    raw = _merge(_merge(base or {}, raw), extra)
    cfg = from_dict(Config, raw)
    vocab = _tokenizer_vocab(cfg.data)
    if "vocab_size" not in (raw.get("model") or {}) and vocab and vocab > cfg.model.vocab_size:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    return cfg


def _tokenizer_vocab(data: DataConfig) -> int | None:
    """The vocabulary size of the tokenizer a run on `data` uses, where known before reading the corpus:
    a prepared corpus's (its manifest.json) or a BPE's to be trained; None for bytes (259 ids, fewer than
    any preset's vocabulary) and for a manifest that does not read (training reports it)."""
    manifest = Path(data.corpus) / "manifest.json"
    if manifest.is_file():
        try:
            return int(json.loads(manifest.read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return data.bpe_vocab_size if data.tokenizer == "bpe" else None
