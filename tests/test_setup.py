"""scripts/setup.sh, scripts/python and the README's two set-up commands, checked without installing
anything: setup's interpreter choice runs with `--check` (or fails before it creates or installs
anything) in a copy of the scripts, against real and fake interpreters on PATH."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VER = "%d.%d" % sys.version_info[:2]


def _base_python() -> Path:
    """The interpreter this test's Python was made from: a Python outside any virtualenv."""
    base = Path(sys.base_prefix)
    exe = base / "bin" / f"python{VER}"
    if not exe.exists() or (base / "conda-meta").is_dir():
        pytest.skip(f"no plain (non-venv, non-conda) Python {VER} at {exe}")
    return exe


def _sandbox(tmp_path: Path) -> Path:
    """A copy of the repo's scripts, without a .venv or a recorded interpreter."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("setup.sh", "python"):
        shutil.copy2(ROOT / "scripts" / name, repo / "scripts" / name)
    return repo


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _run(cmd: list[str], path_first: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
    """Run with a clean environment: no active venv or conda env, no `python` but the ones we put first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "SWARM_PYTHON", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = (f"{path_first}{os.pathsep}" if path_first else "") + "/usr/bin:/bin"
    env.update(extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_missing_venv_module_is_one_line_naming_the_package(tmp_path):
    """Debian/Ubuntu without python3.X-venv: one line naming the package, non-zero exit, nothing made."""
    base = _base_python()
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "ensurepip.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "python3", f'PYTHONPATH="{hide}" exec "{base}" "$@"')
    repo = _sandbox(tmp_path)
    for args in ([], ["--check"]):
        line = _one_line_error(_run(["bash", str(repo / "scripts" / "setup.sh"), *args], bin_dir))
        assert line.startswith("setup.sh: ")
        assert f"apt install python{VER}-venv" in line, line
        assert not (repo / ".venv").exists()
        assert not (repo / ".swarm-python").exists()
    # A .venv left broken (e.g. by a failed `python3 -m venv`) is not reused: the same line.
    _script(repo / ".venv" / "bin" / "python", "exit 1")
    line = _one_line_error(_run(["bash", str(repo / "scripts" / "setup.sh"), "--check"], bin_dir))
    assert f"apt install python{VER}-venv" in line, line
    # A working .venv is reused, and then no venv module is needed.
    _script(repo / ".venv" / "bin" / "python", "exit 0")
    res = _run(["bash", str(repo / "scripts" / "setup.sh"), "--check"], bin_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(repo / ".venv" / "bin" / "python")


def test_outside_any_env_setup_chooses_the_project_venv(tmp_path):
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "python3", f'exec "{_base_python()}" "$@"')
    repo = _sandbox(tmp_path)
    res = _run(["bash", str(repo / "scripts" / "setup.sh"), "--check"], bin_dir)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(repo / ".venv" / "bin" / "python")
    assert not (repo / ".venv").exists(), "--check must not create anything"


def test_inside_an_active_venv_setup_installs_there(tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([str(_base_python()), "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    repo = _sandbox(tmp_path)
    # "activated": the venv's bin first on PATH, as `source env/bin/activate` does.
    res = _run(["bash", str(repo / "scripts" / "setup.sh"), "--check"], env_dir / "bin", VIRTUAL_ENV=str(env_dir))
    assert res.returncode == 0, res.stderr
    chosen = Path(res.stdout.strip())
    assert chosen.parent == env_dir / "bin", chosen
    # SWARM_PYTHON overrides the choice.
    res = _run(["bash", str(repo / "scripts" / "setup.sh"), "--check"], None, SWARM_PYTHON=sys.executable)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == sys.executable


def test_too_old_python_is_one_line(tmp_path):
    bin_dir = tmp_path / "bin"
    _script(bin_dir / "python3", 'echo "3.8 0 0 1 /opt/python3.8/bin/python3"')
    line = _one_line_error(_run(["bash", str(_sandbox(tmp_path) / "scripts" / "setup.sh")], bin_dir))
    assert "Python 3.8" in line and ">= 3.10" in line, line


def test_launcher_runs_the_interpreter_setup_chose(tmp_path):
    repo = _sandbox(tmp_path)
    launcher = str(repo / "scripts" / "python")
    line = _one_line_error(_run([launcher, "-V"]))
    assert "bash scripts/setup.sh" in line, line
    # The project .venv when setup made one...
    _script(repo / ".venv" / "bin" / "python", 'echo "venv python: $*"')
    res = _run([launcher, "-m", "swarm.testbed", "--peers", "3"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "venv python: -m swarm.testbed --peers 3"
    # ...and whatever setup recorded (an active env it installed into) wins over it.
    other = _script(tmp_path / "env" / "bin" / "python3", 'echo "env python: $*"')
    (repo / ".swarm-python").write_text(f"{other}\n")
    res = _run([launcher, "-c", "x"])
    assert res.stdout.strip() == "env python: -c x"
    other.unlink()
    line = _one_line_error(_run([launcher, "-c", "x"]))
    assert "no longer exists" in line and "setup.sh" in line, line


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block in README's 'Set up and run'"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_setup_commands_are_the_ones_the_scripts_support():
    cmds = _setup_commands()
    assert cmds == ["bash scripts/setup.sh && scripts/python -m swarm.testbed --peers 3 --max-rounds 20",
                    "bash scripts/test.sh"], cmds
    for cmd in cmds:  # no `python`/`python3` command needed: only bash and the launcher
        assert not re.search(r"(^|[\s&;|])python3?\s", cmd), cmd
    assert os.access(ROOT / "scripts" / "python", os.X_OK)
    # The launcher reads what setup records, and the tests run with that same interpreter.
    assert ".swarm-python" in (ROOT / "scripts" / "setup.sh").read_text()
    assert ".swarm-python" in (ROOT / "scripts" / "python").read_text()
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert "bash scripts/setup.sh" in test_sh and "scripts/python -m pytest" in test_sh
    testbed = (ROOT / "swarm" / "testbed.py").read_text()
    assert '"--peers"' in testbed and '"--max-rounds"' in testbed
