"""README.md opens with the two commands a newcomer runs; CI runs the second one verbatim."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
VENV_PREFIX = "python3 -m venv .venv && "


def first_code_block(markdown: str) -> tuple[str, list[str]]:
    """``(language, lines)`` of the first fenced code block."""
    match = re.search(r"^```([^\n`]*)\n(.*?)^```\s*$", markdown, re.MULTILINE | re.DOTALL)
    assert match is not None, "README.md has no fenced code block"
    return match.group(1).strip(), match.group(2).splitlines()


def prose_before(markdown: str) -> str:
    return markdown[: markdown.index("```")]


def readme_commands() -> tuple[str, str]:
    language, lines = first_code_block(README.read_text())
    assert language == "bash"
    assert len(lines) == 2, lines
    return lines[0].strip(), lines[1].strip()


def ci_function_body(name: str) -> str:
    text = CI_RUN.read_text()
    match = re.search(rf"^{name}\(\)\s*\{{\n(.*?)\n\}}", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f".ci/run defines no {name}() function"
    return match.group(1).strip()


def with_quiet_pip(command: str) -> str:
    """The README command with pip's ``-q`` added: the only difference CI may have."""
    assert command.count("pip install ") == 1
    return command.replace("pip install ", "pip install -q ", 1)


def test_readme_opens_with_a_bash_block() -> None:
    text = README.read_text()
    assert text.startswith("# mpmesh\n")
    assert prose_before(text).strip() == "# mpmesh", "the commands come first, before any prose"
    readme_commands()


def test_demo_command() -> None:
    demo, _ = readme_commands()
    assert demo.startswith(VENV_PREFIX)
    assert ".venv/bin/pip install -e . &&" in demo
    script = shlex.split(demo)[-1]
    assert script.endswith(".py") and (ROOT / script).is_file(), f"the demo runs {script}"


def test_test_command() -> None:
    _, test = readme_commands()
    assert test.startswith(VENV_PREFIX)
    assert ".venv/bin/pip install -e '.[test]'" in test
    assert test.endswith(".venv/bin/python -m pytest -n auto")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    _, test = readme_commands()
    body = ci_function_body("readme_test_command")
    expected = with_quiet_pip(test[len(VENV_PREFIX):])
    assert expected in body, f"{body!r} must contain {expected!r}"
    assert body == with_quiet_pip(test), "apart from pip's -q, CI runs exactly the README command"


def test_ci_calls_the_function() -> None:
    calls = [line for line in CI_RUN.read_text().splitlines()
             if "readme_test_command" in line and "()" not in line]
    assert calls, ".ci/run never calls readme_test_command"


def test_test_extra_provides_what_the_command_needs() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    match = re.search(r"^test = \[(.*?)\]", pyproject, re.MULTILINE)
    assert match is not None
    extra = match.group(1)
    for dist in ("pytest", "pytest-xdist", "pytest-timeout"):  # -n auto needs xdist
        assert f'"{dist}' in extra


@pytest.mark.parametrize(("markdown", "ok"), [
    ("# mpmesh\n\n```bash\na\nb\n```\n", True),
    ("# mpmesh\n\n```python\na\nb\n```\n", False),
    ("# mpmesh\n\nno code here\n", False),
])
def test_block_parser(markdown: str, ok: bool) -> None:
    if not ok and "```" not in markdown:
        with pytest.raises(AssertionError):
            first_code_block(markdown)
        return
    language, lines = first_code_block(markdown)
    assert (language == "bash") is ok
    assert lines == ["a", "b"]
