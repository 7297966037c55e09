"""A pixel budget read from the header, images too small to caption, and one bad image never stopping the others
(issue 19, item 2): the Python API, caption-run (batches of 8 and 1) and caption-attend."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import black_png

from edgecap.runtime import preprocess
from edgecap.runtime.attend import main as attend_main
from edgecap.runtime.captioner import Captioner
from edgecap.runtime.cli import main as run_main
from edgecap.runtime.errors import DataError, ImageTooLarge
from edgecap.train.synthetic import SyntheticSplit

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two scenes with a decompression bomb (40000x40000, one colour) between them."""
    folder = tmp_path_factory.mktemp("bomb")
    split = SyntheticSplit("test", 2, image_size=112)
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(split.image(0), cv2.COLOR_RGB2BGR))
    (folder / "b-bomb.png").write_bytes(black_png(40000, 40000))
    cv2.imwrite(str(folder / "c.png"), cv2.cvtColor(split.image(1), cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def model(exported) -> Path:
    return exported["attention"]


def test_over_the_budget_is_refused_from_the_header_before_decoding(monkeypatch):
    def never(*_):
        raise AssertionError("decoded an image that is over the budget")

    monkeypatch.setattr(preprocess.cv2, "imdecode", never)
    with pytest.raises(ImageTooLarge, match=r"big\.png is 12000x10000, over the 100,000,000-pixel limit"):
        preprocess.decode_image(black_png(12000, 10000), "big.png")
    with pytest.raises(ImageTooLarge, match=r"over the 5,000,000-pixel limit \(--max-pixels\)"):
        preprocess.decode_image(black_png(3000, 2000), "photo.png", max_pixels=5_000_000)
    with pytest.raises(ImageTooLarge, match="bomb.png has over"):  # past Pillow's own refusal too
        preprocess.decode_image(black_png(40000, 40000), "bomb.png")


def test_small_strips_are_refused_and_extreme_ratios_warned(recwarn):
    assert preprocess.decode_image(black_png(3000, 2000)).shape == (2000, 3000, 3)  # within the default
    for width, height in ((20000, 10), (15, 15)):
        with pytest.raises(DataError, match=f"is {width}x{height}: too small to caption"):
            preprocess.decode_image(black_png(width, height), "strip.png")
    assert not recwarn.list
    preprocess.decode_image(black_png(2000, 100), "wide.png")
    assert [str(w.message) for w in recwarn.list] == [
        "wide.png is 2000x100, an aspect ratio past 8:1; its caption is unlikely to be good"]


def test_the_api_raises_data_errors(model, folder):
    captioner = Captioner.load(model, threads=1)
    for image in (folder / "b-bomb.png", (folder / "b-bomb.png").read_bytes()):
        with pytest.raises(ImageTooLarge):
            captioner.caption(image)
    with pytest.raises(DataError, match="too small"):
        captioner.caption(np.zeros((8, 300, 3), np.uint8))
    small = Captioner.load(model, threads=1, max_pixels=100 * 100)
    with pytest.raises(ImageTooLarge, match="112x112, over the 10,000-pixel limit"):
        small.caption(folder / "a.png")
    assert captioner.caption(folder / "a.png").text


@pytest.mark.parametrize("batch", ["8", "1"])
def test_caption_run_captions_the_images_beside_a_bomb(model, folder, capsys, batch):
    status = run_main(["--model", str(model), "--batch", batch, "--quiet", "--threads", "1", str(folder)])
    out, err = capsys.readouterr()
    assert status == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(folder / "a.png"), str(folder / "c.png")]
    assert err.splitlines() == [f"caption-run: warning: {folder / 'b-bomb.png'} has over 178,956,970 pixels, "
                                "over the 100,000,000-pixel limit (--max-pixels)"]
    assert run_main(["--model", str(model), "--max-pixels", "0", str(folder)]) == 2
    assert "--max-pixels must be at least 1" in capsys.readouterr().err


def test_caption_attend_gives_one_line(model, folder, tmp_path, capsys):
    assert attend_main([str(folder / "b-bomb.png"), "--model", str(model), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("caption-attend: error:") and "pixel limit" in err
    assert not (tmp_path / "x.png").exists()
