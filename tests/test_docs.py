"""The README's generated tables and CLI reference match the catalogs and commands."""

from pathlib import Path

from robkit.docs import BLOCK, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_generated_blocks_are_up_to_date():
    text = README.read_text(encoding="utf-8")
    assert {m.group(2) for m in BLOCK.finditer(text)} == {"teachers", "recipes", "targets", "cli"}
    assert render(text) == text, "README.md is out of date: run `python -m robkit.docs`"


def test_readme_has_exactly_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert "bash scripts/setup.sh && .venv/bin/robkit demo --budget small" in text
    assert "bash scripts/test.sh" in text
