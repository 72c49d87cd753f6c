"""The README and .env.example stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from config.settings import Settings
from services.actions import apidoc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def env_names() -> list[str]:
    return [name.upper() for name in Settings.model_fields]


def test_api_reference_and_schema_file_are_generated_from_the_models() -> None:
    assert apidoc.updated_readme(README) == README, "run: python -m services.actions.apidoc"
    assert (ROOT / "docs" / "job-input.schema.json").read_text() == apidoc.schema_text()


def test_every_setting_is_documented_in_readme_and_env_example() -> None:
    example = (ROOT / ".env.example").read_text()
    config_section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name in env_names():
        assert f"`{name}`" in config_section or re.search(rf"`{name}` /|/ `{name}`", config_section), name
        assert re.search(rf"^{name}=", example, re.MULTILINE), name


def test_env_example_holds_no_real_value_for_credentials() -> None:
    example = (ROOT / ".env.example").read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert re.search(rf"^{name}=$", example, re.MULTILINE), name


def test_readme_has_exactly_two_setup_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick_start, re.DOTALL)
    assert len(blocks) == 2
    assert blocks[0].strip().endswith("python rp_handler.py")
    assert blocks[1].strip().endswith("python -m pytest -q")


def test_the_apidoc_command_runs_from_the_project_root() -> None:
    """Catches the generator losing its way to README.md (it once looked for services/README.md
    after a move): the README's own command, ``python -m services.actions.apidoc --check``."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "services.actions.apidoc", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
