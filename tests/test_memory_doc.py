"""The README's memory table is the planner's output."""

from __future__ import annotations

from services.actions import memorydoc


def test_readme_memory_table_is_generated_from_the_planner() -> None:
    """Catches a README table edited by hand or left behind after the planner changed."""
    text = memorydoc.README.read_text()
    assert memorydoc.updated_readme(text) == text, "run: python -m services.actions.memorydoc"
