"""The two lock files: `make train` installs requirements.lock (runtime), `make test` adds
requirements-test.lock on top. Every package the library imports must be in the runtime lock,
and the test-only packages must not be."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# imported lazily behind a message that says how to install it (k2jax prepare hf:NAME)
OPTIONAL = {"datasets"}
TEST_ONLY = {"torch", "transformers", "pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "openai", "chex"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>\[ ;]", requirement, maxsplit=1)[0]).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith(("#", "-r ")):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path.name}: {line!r} is not pinned with =="
        pins[_name(name)] = version
    return pins


def _library_imports() -> set[str]:
    modules = set()
    for path in (ROOT / "k2jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"k2jax", "__future__"}


def test_locks_split_runtime_from_test_packages():
    runtime = _pins(ROOT / "requirements.lock")
    test = _pins(ROOT / "requirements-test.lock")
    assert "-r requirements.lock" in (ROOT / "requirements-test.lock").read_text().splitlines()
    assert not runtime.keys() & test.keys(), "packages pinned in both locks"
    assert TEST_ONLY <= test.keys()
    assert not TEST_ONLY & runtime.keys()


def test_runtime_lock_covers_every_library_import():
    runtime = _pins(ROOT / "requirements.lock")
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(_library_imports() - OPTIONAL):
        names = {_name(d) for d in distributions.get(module, [module])}
        if not names & runtime.keys():
            missing[module] = sorted(names)
    assert not missing, f"imported by k2jax but not in requirements.lock: {missing}"


def test_pyproject_matches_the_locks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _pins(ROOT / "requirements.lock")
    test = _pins(ROOT / "requirements-test.lock")
    for requirement in project["dependencies"] + project["optional-dependencies"]["plan"]:
        name = _name(requirement)
        assert name in runtime, f"pyproject dependency {name} is not in requirements.lock"
        if "==" in requirement:
            assert requirement.split("==")[1] == runtime[name], requirement
    for requirement in project["optional-dependencies"]["test"]:
        name = _name(requirement)
        assert name in runtime or name in test, f"test extra {name} is in neither lock"


def test_makefile_installs_test_packages_only_for_test():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train: \$\(VENV\)/\.runtime$", makefile, re.M)
    assert re.search(r"^test: \$\(VENV\)/\.test$", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/\.test: \$\(VENV\)/\.runtime requirements-test\.lock$", makefile, re.M)
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
