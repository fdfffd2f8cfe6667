"""The 8-device tests of tests/multidevice, each file in a pytest process of its own: the fake device
count must be set before JAX starts its backend, and the rest of the suite runs on one device."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests" / "multidevice").glob("test_*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: Path(p).stem)
def test_multidevice(path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", path], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        pytest.fail(f"pytest {path} failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}", pytrace=False)
