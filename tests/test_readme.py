"""The README's code runs as written: every ```python block is executed (write code meant only
to be read in a block of another language), and every k2jax command of its ```bash blocks
parses with the real command line and names files that exist."""

import re
import shlex
from pathlib import Path

import pytest

from k2jax.cli import build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.M | re.S)


def _commands() -> list[list[str]]:
    """argv of every k2jax command in the bash blocks (`make train ARGS=...` as the train it runs)."""
    commands = []
    for line in "\n".join(_blocks("bash")).splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == [".venv/bin/k2jax"]:
            commands.append(words[1:])
        elif words[:2] == ["make", "train"]:
            extra = [w.removeprefix("ARGS=") for w in words[2:] if w.startswith("ARGS=")]
            commands.append(["train", "experiments/default.yaml", *shlex.split(" ".join(extra))])
    return commands


def test_readme_has_code_to_check():
    assert len(_blocks("python")) >= 1 and len(_commands()) >= 10


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(index):
    exec(compile(_blocks("python")[index], f"README.md python block {index + 1}", "exec"), {})


@pytest.mark.parametrize("argv", _commands(), ids=lambda argv: " ".join(argv)[:60])
def test_command_parses_and_its_repository_files_exist(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"k2jax {' '.join(argv)}: the command line rejects it (exit {e.code})")
    for word in argv:
        if re.match(r"(experiments|benchmarks|docs|colab)/", word):
            assert (ROOT / word).exists(), f"k2jax {' '.join(argv)}: {word} does not exist"
