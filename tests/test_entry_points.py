"""Each of the seven console scripts runs through its installed entry point (pyproject's [project.scripts]), not
only through its main() in-process: a wrong target there would leave a command that cannot start."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import cv2
import pytest

from edgecap.runtime.captioner import BUNDLED
from edgecap.train.synthetic import SyntheticSplit

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def script(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=180, cwd=cwd)


def test_all_seven_scripts_are_installed():
    assert sorted(SCRIPTS) == ["caption-attend", "caption-batch", "caption-eval", "caption-run", "caption-serve",
                               "caption-train", "export-onnx"]
    assert all((BIN / name).is_file() for name in SCRIPTS)


@pytest.mark.parametrize("name, usage", [("caption-train", "--resume"), ("export-onnx", "--int8"),
                                         ("caption-eval", "--baseline"), ("caption-serve", "--replicas"),
                                         ("caption-batch", "--actors")])
def test_help_of_each_script(name, usage):
    proc = script(name, "--help")
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert proc.stdout.startswith(f"usage: {name}") and usage in proc.stdout


def test_caption_run_and_caption_attend_caption_a_photo(tmp_path):
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), SyntheticSplit("test", 1, image_size=224).image(0))
    run = script("caption-run", "--json", "--quiet", "--threads", "1", str(image), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-1500:]
    record = json.loads(run.stdout)
    assert record["source"] == str(image) and record["caption"] and BUNDLED.name in run.stderr
    attend = script("caption-attend", str(image), "-o", str(tmp_path / "figure.png"), cwd=tmp_path)
    assert attend.returncode == 0, attend.stderr[-1500:]
    assert attend.stdout.splitlines()[0] == record["caption"] and (tmp_path / "figure.png").stat().st_size > 0

