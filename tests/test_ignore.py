"""The README's and the docs' commands leave `git status` clean: every path a command of the ```bash blocks of
README.md and docs/*.md writes (run directories, corpora, exports, rephrased text, sweep results, reports, the
venv), and every output directory the shipped experiment and sweep files name, is ignored by .gitignore (asked of
`git check-ignore`, which reads only; tests/markdown_code.py reads the blocks)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from k2jax.cli import build_parser
from k2jax.config import load_config
from k2jax.sweep.grid import load_sweep
from markdown_code import ROOT, k2jax_argv, shell_commands

# what each `k2jax` command writes, from its parsed arguments (a new command needs an entry: the test says so)
WRITES = {
    "train": lambda a: [_train_out(a)],
    "sample": lambda a: [],
    "eval": lambda a: [f"{a.run_dir}/eval/step_1.json"],
    "export": lambda a: [a.out_dir],
    "import": lambda a: [a.run_dir],
    "serve": lambda a: [],
    "info": lambda a: [],
    "prepare": lambda a: [a.out],
    "rephrase": lambda a: [a.out],
    "sweep": lambda a: [f"{load_sweep(a.file).out_dir}/results.csv"],
    "analyze": lambda a: [f"{a.file if Path(a.file).is_dir() else load_sweep(a.file).out_dir}/report/report.md"],
    "bench": lambda a: [a.profile],
    "lower": lambda a: [a.out],
    "plan": lambda a: [a.json, a.hlo],
}


def _train_out(a) -> str:
    """train.out_dir of a train command; a resumed run's config.yaml (made by an earlier command) is in it."""
    if a.resume and a.config.endswith("/config.yaml") and not Path(a.config).exists():
        return str(Path(a.config).parent)
    if a.init_from:  # the model is the (absent) HF directory's: only the train section decides
        return load_config(None, [s for s in a.set if s.startswith("train.")]).train.out_dir
    return load_config(a.config, a.set).train.out_dir


MAKE_WRITES = {"train": [".venv/bin/python"], "test": [".venv/bin/python", ".pytest_cache/README.md"],
               "venv": [".venv/bin/python"]}


def _written(words: list[str]) -> list[str]:
    """The paths a README or docs command writes (relative to the repository root, where the pages run them)."""
    if words[0] == "make":
        target = words[1] if len(words) > 1 else "train"
        assert target in MAKE_WRITES, f"{' '.join(words)}: teach tests/test_ignore.py what `make {target}` writes"
        k2jax = k2jax_argv(["make", "train", *words[2:]]) if target == "train" else None
        return MAKE_WRITES[target] + (_written_by_k2jax(k2jax) if k2jax else [])
    if (k2jax := k2jax_argv(words)) is not None:
        return _written_by_k2jax(k2jax)
    return []  # scripts (benchmarks/*.py write into a temporary directory) and other programs


def _written_by_k2jax(argv: list[str]) -> list[str]:
    assert argv[0] in WRITES, f"k2jax {' '.join(argv)}: teach tests/test_ignore.py what `k2jax {argv[0]}` writes"
    args = build_parser().parse_args(argv)
    return [str(p) for p in WRITES[argv[0]](args) if p]


def _outputs() -> dict[str, str]:
    """path -> where it comes from, for every path to keep out of `git status`."""
    outputs = {}
    for page, words in shell_commands():
        for path in _written(words):
            outputs.setdefault(path, f"{page}: " + " ".join(words)[:100])
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        outputs.setdefault(load_config(path).train.out_dir + "/metrics.jsonl", str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")):
        outputs.setdefault(f"{load_sweep(path).out_dir}/results.csv", str(path.relative_to(ROOT)))
    return outputs


def _in_repository(path: str) -> bool:
    return not Path(path).is_absolute() or ROOT in Path(path).resolve().parents


def test_readme_commands_and_experiments_write_only_ignored_paths(monkeypatch):
    monkeypatch.chdir(ROOT)  # where the pages' commands run, and what their relative paths mean
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT,
                                                     capture_output=True).returncode:
        pytest.skip("not a git work tree")
    outputs = {p: why for p, why in _outputs().items() if _in_repository(p)}
    kinds = {p.split("/")[0] for p in outputs}
    assert {"runs", "corpora", "hf", "rephrased", ".venv"} <= kinds, kinds  # the parsing found the pages' outputs
    listed = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(outputs), text=True,
                            capture_output=True)
    assert listed.returncode in (0, 1), listed.stderr  # 1: none ignored
    ignored = set(listed.stdout.splitlines())
    missing = [f"{p} ({why})" for p, why in outputs.items() if p not in ignored]
    assert not missing, "not ignored by .gitignore, so `git status` would list them: " + "; ".join(missing)

