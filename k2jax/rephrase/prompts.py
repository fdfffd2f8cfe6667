"""Prompt sets: YAML files of named styles, each a template with {previous} and {chunk}.

Shipped sets live in k2jax/rephrase/prompts/ (`knowledge`: styles and perspectives for
knowledge text; `math`: learning notes; judge.yaml there is not a set but the rubric of
`--fidelity judge`); `--styles` takes one of their names or a path to a YAML file of the
same shape:

    name: my-set
    styles:
      - name: encyclopedic
        template: "... {previous} ... {chunk} ..."
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from pathlib import Path

import yaml

from k2jax.config import ConfigError

SHIPPED = Path(__file__).parent / "prompts"
JUDGE = SHIPPED / "judge.yaml"  # the rubric of --fidelity judge (fidelity.py), not a prompt set
FIELDS = {"previous", "chunk"}


@dataclasses.dataclass(frozen=True)
class Style:
    prompt_set: str
    name: str
    template: str

    @property
    def prompt_hash(self) -> str:
        """sha256 of the template (first 16 hex digits): which prompt wrote a record."""
        return hashlib.sha256(self.template.encode()).hexdigest()[:16]

    def render(self, previous: str, chunk: str) -> str:
        return self.template.format(previous=previous, chunk=chunk)


def shipped_sets() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml") if p != JUDGE)


def load_styles(spec: str) -> list[Style]:
    """The styles of a shipped set's name or of a YAML file; a ConfigError names what is wrong."""
    path = SHIPPED / f"{spec}.yaml" if spec in shipped_sets() else Path(spec)
    if not path.is_file():
        raise ConfigError(f"--styles: {spec!r} is neither a shipped prompt set ({', '.join(shipped_sets())}) "
                          f"nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
        set_name, entries = str(data.get("name", path.stem)), data["styles"]
        styles = [Style(set_name, str(e["name"]), str(e["template"])) for e in entries]
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise ConfigError(f"--styles: {path} is not a prompt set (a mapping with 'styles': a list of "
                          f"name + template): {type(e).__name__}: {e}") from None
    if not styles:
        raise ConfigError(f"--styles: {path} has no styles")
    names = [s.name for s in styles]
    if len(set(names)) != len(names):
        raise ConfigError(f"--styles: {path} names a style twice: {names}")
    for s in styles:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(s.template) if f is not None}
        except ValueError as e:
            raise ConfigError(f"--styles: {path}, style {s.name!r}: {e} (write a literal brace as {{{{ or }}}})")
        if fields != FIELDS:
            raise ConfigError(f"--styles: {path}, style {s.name!r} must use exactly the fields {{previous}} and "
                              f"{{chunk}}, it uses {sorted(fields)}")
    return styles
