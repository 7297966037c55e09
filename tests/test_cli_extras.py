"""The commands that need an extra say which one, in one line, in an install that lacks it (issue 19, item 4).

Each runs as its console script does (the `module:function` of pyproject.toml's [project.scripts]) in a fresh
Python: with `-S`, which leaves site-packages off the path (torch, onnx, ... are not found, as in a runtime-only
install), or with a module blocked in sys.modules (how Python says "not installed" to both import and find_spec).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
EXTRAS = {"caption-train": "train", "export-onnx": "export", "caption-eval": "eval"}


def run_script(command: str, *args: str, python: tuple[str, ...] = (), blocked: tuple[str, ...] = ()):
    """The console script `command` with `args`, in a Python started with the options `python`."""
    module, function = SCRIPTS[command].split(":")
    code = (f"import sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); sys.argv[0] = {command!r}; "
            f"from {module} import {function}; sys.exit({function}())")
    return subprocess.run([sys.executable, *python, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("command", sorted(EXTRAS))
@pytest.mark.parametrize("args", [(), ("--help",)])
def test_runtime_only_install_names_the_extra(command, args):
    done = run_script(command, *args, python=("-S",))
    extra = EXTRAS[command]
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{command}: error: needs the {extra} extra"), \
        done.stderr
    assert done.stderr.rstrip().endswith(f"pip install 'edgecap[{extra}]'") and "torch" in done.stderr


def test_export_without_onnx_names_the_export_extra():
    done = run_script("export-onnx", "--help", blocked=("onnx",))
    assert done.returncode == 2 and done.stderr == \
        "export-onnx: error: needs the export extra (onnx not installed): pip install 'edgecap[export]'\n"
    assert run_script("caption-train", "--help", blocked=("onnx",)).returncode == 0  # train needs no onnx


@pytest.mark.parametrize("command", sorted(EXTRAS))
def test_with_the_extra_the_command_runs(command):
    done = run_script(command, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {command} "), done.stderr
