"""CI runs the README's test command verbatim, and the README opens with the two set-up commands."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_two_setup_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "projsweep run sweeps/smoke.yaml" in main_job
    assert tests.rstrip().endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _readme_commands()[1] in ci.splitlines()
