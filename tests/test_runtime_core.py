"""The runtime core: one backend table, one decode path, one home per default, a serving-ready Captioner."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgecap.runtime.captioner import Captioner
from edgecap.runtime.decode import decode
from edgecap.runtime.engines import BACKENDS, check_choices, make_engine
from edgecap.runtime.errors import DataError, ModelError
from edgecap.runtime.manifest import PRECISIONS, Manifest
from edgecap.runtime.preprocess import decode_image
from edgecap.runtime.search import SearchOptions
from edgecap.train.synthetic import SyntheticSplit

ROOT = Path(__file__).resolve().parents[1]


def test_every_pairing_in_the_table_is_checked_with_did_you_mean():
    for name, b in BACKENDS.items():
        for device in b.devices:
            for precision in b.precisions:
                assert check_choices(name, device, precision) is b
    with pytest.raises(ValueError, match="unknown engine 'ortt' \\(did you mean 'ort'\\?\\)"):
        check_choices("ortt")
    with pytest.raises(ValueError, match="unknown device for --engine trt 'cpu'; choose from cuda"):
        check_choices("trt", "cpu")
    with pytest.raises(ValueError, match="did you mean 'int8'"):
        check_choices("ort", "cpu", "int4")
    assert set(BACKENDS["ort"].precisions) == set(PRECISIONS)


def test_make_engine_runs_the_torch_row_from_a_checkpoint_and_rejects_bad_threads(exported, trained):
    images = SyntheticSplit("test", 4, image_size=112)
    folder, ckpt = exported["attention"], trained("attention")
    manifest = Manifest.load(folder)
    batch = manifest.preprocessing.batch([images.image(i) for i in range(4)])
    ort_engine, torch_engine = make_engine("ort", folder, "fp32"), make_engine("torch", ckpt)
    opts = SearchOptions(num_beams=1)
    assert [h[0].tokens for h in decode(ort_engine, batch, opts)] == \
        [h[0].tokens for h in decode(torch_engine, batch, opts, batch_size=3)]
    with pytest.raises(ValueError, match="threads must be a positive whole number"):
        make_engine("ort", folder, "fp32", threads=0)


def test_decode_batches_and_times_without_changing_captions(exported):
    cap = Captioner.load(exported["attention"])
    split = SyntheticSplit("test", 5, image_size=112)
    batch = cap.preprocess.batch([split.image(i) for i in range(5)])
    timings: dict[str, float] = {}
    whole = decode(cap.engine, batch, cap.options, timings=timings)
    assert [h[0].tokens for h in whole] == [h[0].tokens for h in decode(cap.engine, batch, cap.options, batch_size=2)]
    assert timings["encoder_ms"] > 0 and timings["decoder_ms"] > 0
    with pytest.raises(ValueError, match="images or features"):
        decode(cap.engine, None, cap.options)


def test_one_captioner_from_eight_threads_equals_a_serial_run(exported):
    cap = Captioner.load(exported["attention"], precision="int8")
    split = SyntheticSplit("test", 16, image_size=112)
    images = [split.image(i) for i in range(16)]
    serial = [cap.caption(image).tokens for image in images]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(lambda image: cap.caption(image).tokens, images)) == serial


def test_bytes_and_file_objects_are_decoded(exported):
    cap = Captioner.load(exported["plain"])
    rgb = SyntheticSplit("test", 1, image_size=112).image(0)
    png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    assert np.array_equal(decode_image(png), rgb) and np.array_equal(decode_image(io.BytesIO(png)), rgb)
    assert cap.caption(png).text == cap.caption(io.BytesIO(png)).text == cap.caption(rgb).text
    with pytest.raises(DataError, match="not a readable image"):
        cap.caption(b"not an image")
    for bad in (rgb.astype(bool), None, np.zeros((0, 0, 3), np.uint8)):
        with pytest.raises(DataError):
            cap.caption(bad)
    with pytest.raises(DataError, match="empty list"):
        cap.caption([])


def test_caption_to_dict_is_the_json_record(exported):
    cap = Captioner.load(exported["attention"], num_beams=3, num_return_sequences=2)
    record = cap.caption(SyntheticSplit("test", 1, image_size=112).image(0)).to_dict(batch=2)
    assert json.loads(json.dumps(record)) == record
    assert record["caption"] == " ".join(record["words"]) and len(record["alternatives"]) == 2
    assert set(record["timings"]) >= {"preprocess_ms", "encoder_ms", "decoder_ms", "total_ms"}


def test_manifest_fields_are_typed_and_unknown_search_keys_named(exported, tmp_path):
    manifest = Manifest.load(exported["plain"])
    assert isinstance(manifest.search, SearchOptions) and manifest.preprocessing.size == 112
    raw = json.loads((exported["plain"] / "manifest.json").read_text())
    raw["search"]["beams"] = 3
    folder = tmp_path / "m"
    folder.mkdir()
    for f in exported["plain"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="unknown key in the manifest's search 'beams' \\(did you mean 'num_beams'"):
        Manifest.load(folder)
    del raw["search"]["beams"]
    raw["graphs"]["fp32"]["decoder_step"]["outputs"][0]["shape"] = []  # a hand-edited manifest
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="is malformed: IndexError"):
        Manifest.load(folder)


def _declared_defaults(field: str, flag: str) -> list[str]:
    """Lines of edgecap/ and benchmarks/ that declare a literal default for `field` (a dataclass field or a
    keyword parameter) or for the command-line `flag`."""
    declaration = re.compile(rf"\b{field}\s*:\s*[\w| ]+=\s*\d|add_argument\(\"{flag}\"[^)]*default=\\d")
    return [f"{path.relative_to(ROOT)}:{n}"
            for path in sorted([*ROOT.joinpath("edgecap").rglob("*.py"), *ROOT.joinpath("benchmarks").glob("*.py")])
            for n, line in enumerate(path.read_text().splitlines(), 1) if declaration.search(line)]


def test_the_beam_count_has_one_declared_default():
    assert [x.split(":")[0] for x in _declared_defaults("num_beams", "--beams")] == ["edgecap/runtime/search.py"]
    assert _declared_defaults("beams", "--beams") == []


def test_the_image_size_has_one_declared_default():
    assert [x.split(":")[0] for x in _declared_defaults("(image_)?size", "--image-size")] == \
        ["edgecap/runtime/preprocess.py"]
