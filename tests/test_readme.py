"""The README's and the docs' code runs as written: every ```python block of README.md and docs/*.md is executed
(write code meant only to be read in a block of another language), and every k2jax command of their ```bash blocks
parses with the real command line and names files that exist (tests/markdown_code.py reads the blocks)."""

import re

import pytest

from k2jax.cli import build_parser
from markdown_code import PAGES, PLACEHOLDERS, ROOT, blocks, k2jax_argv, page_name, shell_commands

README = (ROOT / "README.md").read_text()
PYTHON = blocks("python")
COMMANDS = [(page, argv) for page, words in shell_commands() if (argv := k2jax_argv(words)) is not None]


def test_readme_has_code_to_check():
    assert len(PYTHON) >= 1 and len(COMMANDS) >= 10
    assert len(PAGES) > 1, "no docs/*.md page found"


def test_readme_links_every_docs_page():
    """The README is the front door: each docs page is one link away."""
    unlinked = [page_name(p) for p in PAGES[1:] if f"]({page_name(p)})" not in README]
    assert not unlinked, f"README.md links no {unlinked}"


@pytest.mark.parametrize("index", range(len(PYTHON)), ids=lambda i: f"{PYTHON[i][0]}-{i + 1}")
def test_python_block_runs(index):
    page, code = PYTHON[index]
    exec(compile(code, f"{page} python block {index + 1}", "exec"), {})


@pytest.mark.parametrize("page, argv", COMMANDS, ids=[f"{page}: {' '.join(argv)}"[:80] for page, argv in COMMANDS])
def test_command_parses_and_its_repository_files_exist(page, argv):
    unset = [w for w in argv if "$" in w]
    assert not unset, f"{page}: k2jax {' '.join(argv)}: set {unset} in the block, or name it in PLACEHOLDERS " \
                      f"(tests/markdown_code.py: {sorted(PLACEHOLDERS)})"
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: k2jax {' '.join(argv)}: the command line rejects it (exit {e.code})")
    for word in argv:
        if re.match(r"(experiments|benchmarks|docs|colab)/", word):
            assert (ROOT / word).exists(), f"{page}: k2jax {' '.join(argv)}: {word} does not exist"


def test_what_a_resume_may_change_is_the_schemas_declaration():
    """The "Kills, resumes and errors" table is rendered from the `resume` declarations in k2jax/config/schema.py."""
    from k2jax.config import resume_table

    tables = re.findall(r"^\| section \| may a resumed run change it\? \|\n(?:\|.*\n)*", README, flags=re.M)
    assert tables == [resume_table()], ("README.md's table of what a resumed run may change is stale: replace it "
                                        "with the output of `python -c 'from k2jax.config import resume_table; "
                                        "print(resume_table())'`")
