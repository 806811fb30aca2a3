"""The README's test command from a fresh virtualenv (issue 15, point 1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = (REPO / ".ci" / "run").read_text()
README = (REPO / "README.md").read_text()


def _pip_installs(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines()
            if re.match(r"\s*python3 -m pip install\b", line)]


def test_ci_upgrades_pip_before_it_installs_anything() -> None:
    """A new venv's bundled pip (23.x) gave ResolutionImpossible on `.[dev]` after a minute."""
    installs = _pip_installs(RUN)
    assert installs[0] == "python3 -m pip install -q -U pip", installs
    assert any("-e '.[dev]'" in line for line in installs[1:])


def test_readme_test_command_is_ci_and_says_so() -> None:
    block = README[README.index("## The two commands"):].split("## Quick start")[0]
    assert "bash .ci/run " in block and "bash .ci/fresh-venv install" in block
    assert "ResolutionImpossible" in block


def test_fresh_venv_runs_ci_in_a_new_venv_with_its_bundled_pip() -> None:
    script = (REPO / ".ci" / "fresh-venv").read_text()
    assert re.search(r"^python3 -m venv \"\$venv\"$", script, re.M)
    assert 'PATH="$venv/bin:$PATH"' in script and "bash .ci/run \"$@\"" in script
    assert "pip install" not in script  # the upgrade is .ci/run's, as a new user gets it


def test_install_mode_stops_before_lint_and_tests() -> None:
    before, _, after = RUN.partition('if [ "${1:-}" = install ]; then')
    assert after, "no install mode"
    assert "-e '.[dev]'" in before and "pytest" not in before and "ruff" not in before
    assert "python3 -m pytest" in after


@pytest.mark.subprocess
@pytest.mark.skipif(os.environ.get("TRT_BATCH_RUNNER_FRESH_VENV") != "1",
                    reason="downloads every dev dependency into a new venv (about 2 minutes "
                    "and a package registry); set TRT_BATCH_RUNNER_FRESH_VENV=1 to run it")
def test_fresh_venv_install_resolves() -> None:
    assert shutil.which("bash")
    result = subprocess.run(["bash", str(REPO / ".ci" / "fresh-venv"), "install"], cwd=REPO,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ResolutionImpossible" not in result.stderr
    assert re.search(r"^fresh venv .*: pip \d+", result.stdout, re.M), result.stdout
