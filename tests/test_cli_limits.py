"""caption-eval and export-onnx refuse out-of-range flags in one line naming the flag, with the limits the
server keeps (issue 19, item 8), before loading anything; caption-eval also an output it could not write."""

from __future__ import annotations

import pytest

from edgecap.export.cli import main as export_main
from edgecap.runtime.search import MAX_BEAMS, MAX_LENGTH
from edgecap.train.eval_cli import main as eval_main


def one_line(capsys, main, prog: str, *argv: str) -> str:
    """main(argv) must fail with exactly one `prog: error:` line; -> that line."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err.rstrip("\n").removeprefix(f"{prog}: error: ")


@pytest.mark.parametrize("flags, expected", [
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--limit", "-5"], "--limit must be at least 1, got -5"),
    (["--beams", "1,17"], f"--beams must be between 1 and {MAX_BEAMS}, got 17"),
    (["--beams", "0"], f"--beams must be between 1 and {MAX_BEAMS}, got 0"),
    (["--max-length", "0"], f"--max-length must be between 1 and {MAX_LENGTH}, got 0"),
    (["--json", "nowhere/r.json"], "could not write --json nowhere/r.json: no folder nowhere"),
])
def test_caption_eval_names_the_flag(tmp_path, capsys, flags, expected):
    assert one_line(capsys, eval_main, "caption-eval", "--model", str(tmp_path / "no-model"), "--data", "synthetic",
                    *flags) == expected


@pytest.mark.parametrize("flags, expected", [
    (["--beams", "0"], f"--beams must be between 1 and {MAX_BEAMS}, got 0"),
    (["--beams", str(MAX_BEAMS + 1)], f"--beams must be between 1 and {MAX_BEAMS}, got {MAX_BEAMS + 1}"),
    (["--max-length", str(MAX_LENGTH + 1)], f"--max-length must be between 1 and {MAX_LENGTH}, got {MAX_LENGTH + 1}"),
])
def test_export_onnx_names_the_flag(tmp_path, capsys, flags, expected):
    assert one_line(capsys, export_main, "export-onnx", str(tmp_path / "no.pt"), *flags) == expected


def test_caption_eval_beams_that_are_no_numbers(capsys):
    with pytest.raises(SystemExit) as exit:
        eval_main(["--model", "m", "--data", "synthetic", "--beams", "1,x"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert exit.value.code == 2 and err == "caption-eval: error: argument --beams: expected comma-separated whole " \
                                           "numbers, got '1,x'"
