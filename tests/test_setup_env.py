"""setup_env.sh, which demo.sh and test.sh source: it creates or reuses the environment, keeps an installed torch,
installs only when a requirements file changed, and says what it does. A fake venv's python records its calls."""

import shlex
import subprocess

from conftest import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls"
if [[ "$1" == -c && "$2" == *"import torch"* ]]; then
  [[ -f "$(dirname "$0")/torch" ]] && { echo 9.9.9+cu999; exit 0; } || exit 1
fi
"""


def fake_venv(tmp_path, torch=False):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    if torch:
        (venv / "bin" / "torch").touch()
    return venv


def setup(venv, **env):
    result = subprocess.run(
        ["bash", "-c", "source setup_env.sh"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "RLHF_VENV": str(venv), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = (venv / "bin" / "calls").read_text().splitlines() if (venv / "bin" / "calls").exists() else []
    return result.stdout, [c for c in calls if not c.startswith(("-c", "-m pip --version"))]


def test_a_new_environment_gets_torch_then_the_requirements_and_is_reused_after(tmp_path):
    venv = fake_venv(tmp_path)
    out, calls = setup(venv)
    assert calls == ["-m pip install -q torch==2.13.0", "-m pip install -q -r requirements-dev.txt"]
    assert "setup: installing torch==2.13.0" in out and "setup: installing requirements-dev.txt" in out
    both = ["cat", *(REPO / f"requirements{s}.txt" for s in ("", "-gguf", "-dev"))]
    wanted = subprocess.run(f"{shlex.join(map(str, both))} | cksum", shell=True, capture_output=True, text=True)
    assert (venv / ".rlhf-requirements").read_text() == wanted.stdout  # what it installed from
    (venv / "bin" / "calls").unlink()
    out, calls = setup(venv)  # nothing changed: nothing installed
    assert calls == [] and "is up to date with requirements*.txt" in out
    (venv / ".rlhf-requirements").write_text("an older requirements.txt\n")
    out, calls = setup(venv)
    assert calls == ["-m pip install -q torch==2.13.0", "-m pip install -q -r requirements-dev.txt"]


def test_an_installed_torch_a_cuda_build_say_is_kept(tmp_path):
    venv = fake_venv(tmp_path, torch=True)
    out, calls = setup(venv)
    assert calls == ["-m pip install -q -r requirements-dev.txt"]
    assert "setup: torch 9.9.9+cu999 is installed" in out and ": kept" in out


def test_demo_and_tests_start_from_the_environment_and_pass_their_arguments_on():
    for script, command in (("demo.sh", "run_pipeline.sh --preset tiny"), ("test.sh", 'pytest -q -n 2 "$@"')):
        text = (REPO / script).read_text()
        assert "source setup_env.sh" in text and command in text, script
    assert "bash test.sh" in (REPO / ".ci" / "run").read_text()


def test_a_venv_whose_creation_failed_is_made_anew(tmp_path):
    """Debian without python3-venv leaves bin/python but no activate: that folder is not reused as it is."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (venv / "bin" / "python").chmod(0o755)
    python3 = tmp_path / "python3"  # makes the fake venv where the real one would be made
    python3.write_text(
        "#!/usr/bin/env bash\n"
        'case "$1" in --version) echo Python 3.11.7 ;; -c) exit 0 ;;\n'
        f'  -m) echo "$*" >> {tmp_path}/python3-calls; mkdir -p "$4/bin"\n'
        f'      printf %s {shlex.quote(FAKE_PYTHON)} > "$4/bin/python"; chmod +x "$4/bin/python"\n'
        """      echo "PATH=\\"$4/bin:\\$PATH\\"" > "$4/bin/activate" ;;\n"""
        "esac\n"
    )
    python3.chmod(0o755)
    out, calls = setup(venv, PYTHON3=str(python3))
    assert (tmp_path / "python3-calls").read_text().split() == ["-m", "venv", "--clear", str(venv)]
    assert "setup: creating the virtual environment" in out
    assert calls == ["-m pip install -q torch==2.13.0", "-m pip install -q -r requirements-dev.txt"]
