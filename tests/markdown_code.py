"""The code blocks of README.md and of every docs/*.md page, for the tests that run or check them
(tests/test_readme.py, tests/test_ignore.py).

Commands are read as a shell would split them: a line ending in a backslash continues on the next, a quoted
string may span lines, `;`, `&&`, `||`, `|` and `&` separate commands, everything from a redirection (`>`, `<`)
on is dropped, leading VAR=value assignments are dropped (and remembered: a later `$VAR` of the same block is
expanded), `srun`/`nohup` in front of a command are dropped, and the string given to `--command` (e.g.
`gcloud compute tpus tpu-vm ssh ... --command "..."`) is read as commands of its own."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# variables the pages leave to the reader's environment (a host's rank, the number of hosts), with the value a
# command is checked with; a new one needs an entry here (the tests say so)
PLACEHOLDERS = {"N": "2", "RANK": "0"}

_SEPARATORS = {";", "&&", "||", "|", "&"}
_WRAPPERS = {"srun", "nohup"}


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def blocks(language: str) -> list[tuple[str, str]]:
    """(page, text) of every ```LANGUAGE block, pages in PAGES order, blocks in page order."""
    return [(page_name(page), block) for page in PAGES
            for block in re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(), flags=re.M | re.S)]


def _lines(block: str) -> list[str]:
    """The block's logical lines: backslash continuations joined, quoted strings kept whole across lines."""
    lines, pending = [], ""
    for line in block.splitlines():
        if line.endswith("\\") and not line.lstrip().startswith("#"):
            pending += line[:-1] + " "
            continue
        pending += line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the string goes on on the next line
            pending += "\n"
            continue
        lines.append(pending)
        pending = ""
    assert not pending.strip(), f"unterminated shell line: {pending!r}"
    return lines


def _expand(word: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), PLACEHOLDERS.get(m.group(1), m.group(0))),
                  word)


def _split(line: str, variables: dict[str, str]) -> list[list[str]]:
    """The commands of one logical line, assignments recorded in `variables` and dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, words, redirected = [], [], False
    for token in list(lexer) + [";"]:
        if token in _SEPARATORS:
            commands.append(words)
            words, redirected = [], False
        elif redirected or set(token) <= set("<>&") or re.fullmatch(r"\d*[<>]+&?", token):
            redirected = True
        else:
            words.append(token)
    result = []
    for words in commands:
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0], flags=re.S):
            name, value = words.pop(0).split("=", 1)
            variables[name] = _expand(value, variables)
        while words and words[0] in _WRAPPERS:
            words = words[1:]
        words = [_expand(w, variables) for w in words]
        if not words:
            continue
        result.append(words)
        for flag, value in zip(words, words[1:]):
            if flag == "--command":
                result.extend(_split(value, dict(variables)))
    return result


def shell_commands() -> list[tuple[str, list[str]]]:
    """(page, words) of every command of every ```bash block."""
    commands = []
    for page, block in blocks("bash"):
        variables: dict[str, str] = {}
        for line in _lines(block):
            commands.extend((page, words) for words in _split(line, variables))
    return commands


def k2jax_argv(words: list[str]) -> list[str] | None:
    """The k2jax arguments a command runs (`make train ARGS=...` as the train it runs), or None."""
    if words[:1] == [".venv/bin/k2jax"]:
        return words[1:]
    if words[:2] == ["make", "train"]:
        extra = [w.removeprefix("ARGS=") for w in words[2:] if w.startswith("ARGS=")]
        return ["train", "experiments/default.yaml", *shlex.split(" ".join(extra))]
    return None
