"""Every runnable snippet of the user documentation runs as it is written.

The rule, stated once for writers of ``docs/api.md``, ``docs/guide.md`` and ``README.md``:

- a block fenced exactly as ```` ```python ```` is a complete program: this test runs it
  with ``sys.executable -c``, from the repository root, in a fresh process, and expects
  exit status 0 within ``SNIPPET_TIMEOUT_S`` (keep each well under 5 s);
- any other fence (```` ```text ```` for signatures and fragments, ```` ```bash ````,
  ```` ```pycon ````, or no language at all) is not run.

``tests/unit/test_readme.py`` only reads the README's *first* block (its two commands),
so the fence parsing lives here; it uses the same pattern.

The snippets inherit this process's environment, so ``MPMESH_RUNTIME_DIR`` points at the
test session's private runtime directory, and the leak guard of ``tests/conftest.py``
fails a snippet that leaves a process, a socket or a key file behind.

The documents may only name files the repository has: every repository path quoted in
their prose must exist (the architecture's module paths, such as ``_pool/_engine.py``,
count from the package, ``mpmesh/``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = ("docs/api.md", "docs/guide.md", "README.md")
RUNNABLE = "python"
SNIPPET_TIMEOUT_S = 60.0
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def code_blocks(markdown: str) -> list[tuple[str, int, str]]:
    """``(language, line number of the opening fence, code)`` of every fenced block."""
    return [(m.group(1).strip(), markdown.count("\n", 0, m.start()) + 1, m.group(2))
            for m in FENCE.finditer(markdown)]


def runnable_snippets() -> list[Any]:
    """One ``pytest.param`` per runnable block, its id ``document:line``."""
    params = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        for language, line, code in code_blocks(text):
            if language == RUNNABLE:
                params.append(pytest.param(code, id=f"{document}:{line}"))
    return params


SNIPPETS = runnable_snippets()


def test_the_guide_and_the_reference_have_snippets() -> None:
    for document in ("docs/api.md", "docs/guide.md"):
        assert any(str(p.id).startswith(document + ":") for p in SNIPPETS), document


@pytest.mark.timeout(SNIPPET_TIMEOUT_S + 30)
@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True, timeout=SNIPPET_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the snippet ran longer than {SNIPPET_TIMEOUT_S:g} s\n"
                    f"--- stdout\n{_text(exc.stdout)}\n--- stderr\n{_text(exc.stderr)}")
    assert done.returncode == 0, (f"exit status {done.returncode}\n--- stdout\n{done.stdout}\n"
                                  f"--- stderr\n{done.stderr}")


def _text(output: str | bytes | None) -> str:
    """What a timed-out run captured (``TimeoutExpired`` may hold bytes even with ``text``)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def referenced_paths(markdown: str) -> set[str]:
    """Repository paths quoted in the prose (outside code blocks): ``docs/api.md``,
    ``examples/x.py``; not placeholders (``<name>.sock``), variables, URLs or absolute paths."""
    prose = FENCE.sub("", markdown)
    return {quoted for quoted in re.findall(r"`([^`\s]+)`", prose)
            if "/" in quoted and not quoted.startswith("/") and "://" not in quoted
            and not re.search(r"[<>$*]", quoted)}


@pytest.mark.parametrize("document", ["docs/api.md", "docs/guide.md", "docs/architecture.md"])
def test_the_files_the_docs_name_exist(document: str) -> None:
    paths = referenced_paths((ROOT / document).read_text())
    assert paths, "expected the docs to point to other files of the repository"
    missing = sorted(path for path in paths
                     if not (ROOT / path).exists() and not (ROOT / "mpmesh" / path).exists())
    assert not missing, f"{document} names files the repository does not have: {missing}"


@pytest.mark.parametrize(("markdown", "expected"), [
    ("```python\na = 1\n```\n", [("python", 1, "a = 1\n")]),
    ("x\n\n```text\nsig()\n```\n```python\nb\n```\n", [("text", 3, "sig()\n"), ("python", 6, "b\n")]),
    ("```\nplain\n```\n", [("", 1, "plain\n")]),
    ("no code\n", []),
])
def test_block_parser(markdown: str, expected: list[tuple[str, int, str]]) -> None:
    assert code_blocks(markdown) == expected


def test_referenced_paths() -> None:
    text = ("See `docs/x.md`, `<dir>/<name>.sock`, `/tmp/y`, `$HOME/z`, `a b/c`, `redis://h:1/0`.\n"
            "```text\n`in/code.md`\n```\n")
    assert referenced_paths(text) == {"docs/x.md"}
