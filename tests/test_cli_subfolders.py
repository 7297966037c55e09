"""caption-run and caption-batch list a folder the same way (issue 19, item 8): its subfolders too by default,
its top level only when asked; links that cannot be read are listed, so each is warned about (caption-run) or
gets an error row (caption-batch), never dropped in silence. Globs list a file reached through a link loop once."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecap.runtime.sources import open_source
from edgecap.scale.collection import expand


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "sub/deeper/c.gif"):
        cv2.imwrite(str(tmp_path / name), np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "sub" / "up").symlink_to(tmp_path)
    return tmp_path


@pytest.mark.parametrize("recursive, names", [
    (True, ["a.png", "gone.png", "sub/b.jpg", "sub/deeper/c.gif", "sub/up"]),
    (False, ["a.png", "gone.png"]),
])
def test_caption_batch_lists_a_folder_as_caption_run_does(tree: Path, recursive: bool, names: list[str]) -> None:
    batch = expand(str(tree), recursive=recursive)
    run = [f.source for f in open_source(str(tree), recursive=recursive)]
    assert batch == run == [str(tree / n) for n in names]


def test_a_glob_through_a_link_loop_lists_each_file_once(tree: Path) -> None:
    assert expand(str(tree / "**" / "*.*")) == \
        [str(tree / n) for n in ("a.png", "gone.png", "sub/b.jpg", "sub/deeper/c.gif")]


def test_caption_batch_takes_no_recursive_too(tree: Path) -> None:
    from edgecap.scale.batch import build_parser
    from edgecap.scale.collection import image_paths

    args = build_parser().parse_args([str(tree), "-o", "out.jsonl", "--no-recursive"])
    assert args.recursive is False and build_parser().parse_args([str(tree), "-o", "x"]).recursive is True
    assert image_paths(args.sources, warn=print, recursive=args.recursive) == [str(tree / "a.png"),
                                                                              str(tree / "gone.png")]
