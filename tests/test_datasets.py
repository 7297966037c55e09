"""Tests for edgecap.train.datasets: every layout on tiny fixtures, the error paths, and the real Flickr8k."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgecap.runtime.errors import DataError
from edgecap.train.datasets import LAYOUTS, CaptionCorpus, ImageCaptions, load_corpus

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = REPO.parent / "shared" / "flickr8k"
FLICKR8K_NO_PHOTO = ["2258277193_586949ec62.jpg", "2258277193_586949ec62.jpg.1"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def touch(folder: Path, *names: str) -> None:
    """Tiny stand-in image files: the loader only checks that they exist."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"\xff\xd8\xff\xd9")


def names(items: list[ImageCaptions]) -> list[str]:
    return [item.image.name for item in items]


def split_names(corpus: CaptionCorpus) -> dict[str, list[str]]:
    return {split: names(items) for split, items in corpus.splits.items()}


def captions_of(corpus: CaptionCorpus, name: str) -> list[str]:
    items = [i for items in (*corpus.splits.values(), corpus.unsplit) for i in items if i.image.name == name]
    assert len(items) == 1, name
    return items[0].captions


def n_images(corpus: CaptionCorpus) -> int:
    return sum(len(items) for items in corpus.splits.values()) + len(corpus.unsplit)


def n_captions(corpus: CaptionCorpus) -> int:
    return sum(len(i.captions) for items in (*corpus.splits.values(), corpus.unsplit) for i in items)


TOKEN = (
    "b.jpg#0\tA dog runs .\n"
    "a.jpg#0\t  A cat sits .  \n"
    "a.jpg#1\tA cat, sleeping .\n"
    "b.jpg#1\t   \n"
    "\n"
    "c.jpg#0\tA bird .\n"
    "a.jpg#2\tThird cat .\n"
    "d.jpg#0\tA fish .\n"
    "e.jpg#0\tOutside the split .\n"
)


def official_split(root: Path) -> None:
    write(root / "Flickr_8k.trainImages.txt", "b.jpg\na.jpg\n")
    write(root / "Flickr_8k.devImages.txt", "c.jpg\n")
    write(root / "Flickr_8k.testImages.txt", "d.jpg\n")


def flickr8k(root: Path, image_dir: str = "images") -> Path:
    write(root / "Flickr8k.token.txt", TOKEN)
    official_split(root)
    touch(root / image_dir, "a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg")
    return root


def hashed(root: Path, count: int = 200) -> list[str]:
    """A csv-layout file of `count` images without a split column; returns the image names."""
    image_names = [f"{i:05d}_photo.jpg" for i in range(count)]
    write(root / "data.csv", "image,caption\n" + "".join(f"{n},Caption {n}\n" for n in image_names))
    touch(root, *image_names)
    return image_names


# ---- flickr8k -----------------------------------------------------------------------------------


@pytest.mark.parametrize("image_dir", ["images", "Flicker8k_Dataset", "Flickr8k_Dataset", "."])
def test_flickr8k_official_split_and_grouping(tmp_path, image_dir):
    corpus = load_corpus(flickr8k(tmp_path, image_dir))
    assert corpus.layout == "flickr8k" and corpus.root == tmp_path.resolve()
    assert split_names(corpus) == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["d.jpg"]}
    assert names(corpus.unsplit) == ["e.jpg"] and corpus.missing == []
    assert captions_of(corpus, "a.jpg") == ["A cat sits .", "A cat, sleeping .", "Third cat ."]
    assert captions_of(corpus, "b.jpg") == ["A dog runs ."]  # the blank caption is skipped
    assert corpus.splits["train"][0].image == (tmp_path / image_dir / "a.jpg").resolve()
    assert corpus.splits["train"][0].image.is_absolute()


def test_flickr8k_token_file_preferred_over_captions_txt(tmp_path):
    write(flickr8k(tmp_path) / "captions.txt", "image,caption\na.jpg,From the CSV .\n")
    corpus = load_corpus(tmp_path)
    assert corpus.layout == "flickr8k"
    assert captions_of(corpus, "a.jpg")[0] == "A cat sits ."


def test_token_file_given_directly(tmp_path):
    corpus = load_corpus(flickr8k(tmp_path) / "Flickr8k.token.txt")
    assert corpus.layout == "flickr8k" and names(corpus.splits["train"]) == ["a.jpg", "b.jpg"]


def test_summary_is_one_line_with_counts(tmp_path):
    summary = load_corpus(flickr8k(tmp_path)).summary()
    assert "\n" not in summary and summary.startswith("flickr8k")
    assert "train 2 images/4 captions" in summary and "dev 1 images/1 captions" in summary
    assert "1 images outside the official split" in summary and "0 missing" in summary


# ---- flickr8k-csv -------------------------------------------------------------------------------

KAGGLE = 'image,caption\na.jpg,"A cat, on a mat, sleeps ."\na.jpg,A cat .\nb.jpg,"He said ""hi"" ."\n'


def test_kaggle_csv_keeps_quoted_commas_and_uses_split_files(tmp_path):
    write(tmp_path / "captions.txt", KAGGLE + "c.jpg,A bird .\n")
    official_split(tmp_path)
    touch(tmp_path / "images", "a.jpg", "b.jpg", "c.jpg")
    corpus = load_corpus(tmp_path)
    assert corpus.layout == "flickr8k-csv"
    assert captions_of(corpus, "a.jpg") == ["A cat, on a mat, sleeps .", "A cat ."]
    assert captions_of(corpus, "b.jpg") == ['He said "hi" .']
    assert split_names(corpus) == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": []}


def test_kaggle_csv_without_split_files_uses_the_hash_split(tmp_path):
    image_names = hashed(tmp_path / "plain")
    write(tmp_path / "kaggle" / "captions.txt", (tmp_path / "plain" / "data.csv").read_text())
    touch(tmp_path / "kaggle" / "images", *image_names)
    write(tmp_path / "plain" / "data.jsonl", "".join(json.dumps({"image": n, "caption": "C"}) + "\n"
                                                     for n in image_names))
    kaggle = load_corpus(tmp_path / "kaggle")
    plain = [load_corpus(tmp_path / "plain" / name) for name in ("data.csv", "data.jsonl")]
    assert split_names(kaggle) == split_names(plain[0]) == split_names(plain[1])  # one hash rule for all
    sizes = {split: len(items) for split, items in kaggle.splits.items()}
    assert sum(sizes.values()) == len(image_names) and kaggle.unsplit == []
    assert 140 <= sizes["train"] <= 180 and 8 <= sizes["dev"] <= 32 and 8 <= sizes["test"] <= 32


def test_hash_split_is_the_same_in_every_process(tmp_path):
    hashed(tmp_path)
    script = ("import json, sys; from edgecap.train.datasets import load_corpus; "
              "c = load_corpus(sys.argv[1]); print(json.dumps({s: [i.image.name for i in v] "
              "for s, v in c.splits.items()}))")
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / "data.csv")], cwd=REPO, check=True,
                           capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
            for seed in ("1", "2")]
    here = split_names(load_corpus(tmp_path / "data.csv"))
    assert json.loads(runs[0].stdout) == json.loads(runs[1].stdout) == here


# ---- flickr30k ----------------------------------------------------------------------------------


def test_flickr30k_kaggle_results_csv(tmp_path):
    write(tmp_path / "results.csv", "image_name| comment_number| comment\n"
          "1.jpg| 0| Two dogs play .\n1.jpg| 1| A dog, jumping .\n2.jpg| 0| A man .\n"
          "2.jpg| 4 A woman .\n")  # the real file has one row without its second pipe
    touch(tmp_path / "flickr30k-images", "1.jpg", "2.jpg")
    corpus = load_corpus(tmp_path)
    assert corpus.layout == "flickr30k" and n_images(corpus) == 2 and corpus.unsplit == []
    assert captions_of(corpus, "1.jpg") == ["Two dogs play .", "A dog, jumping ."]
    assert captions_of(corpus, "2.jpg") == ["A man .", "A woman ."]
    folder = (tmp_path / "flickr30k-images").resolve()
    assert all(i.image.parent == folder for items in corpus.splits.values() for i in items)


def test_flickr30k_token_file_uses_the_hash_split(tmp_path):
    image_names = hashed(tmp_path / "plain")
    write(tmp_path / "f30k" / "results_20130124.token", "".join(f"{n}#0\tA photo .\n" for n in image_names))
    write(tmp_path / "f30k" / "results.csv", "image_name| comment_number| comment\nx.jpg| 0| Ignored .\n")
    touch(tmp_path / "f30k" / "images", *image_names)
    corpus = load_corpus(tmp_path / "f30k")
    assert corpus.layout == "flickr30k" and n_images(corpus) == len(image_names)  # token file preferred
    assert split_names(corpus) == split_names(load_corpus(tmp_path / "plain" / "data.csv"))


# ---- karpathy -----------------------------------------------------------------------------------


def karpathy_entry(filename: str, split: str, *raw: str, filepath: str | None = None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": r, "tokens": []} for r in raw]}
    return entry | ({"filepath": filepath} if filepath else {})


def karpathy(root: Path, name: str = "dataset_flickr8k.json", split_d: str = "test") -> Path:
    images = [karpathy_entry("a.jpg", "train", "A cat .", "  Two cats . "),
              karpathy_entry("b.jpg", "restval", "B ."), karpathy_entry("c.jpg", "val", "C ."),
              karpathy_entry("d.jpg", split_d, "D ."),
              karpathy_entry("e.jpg", "val", "E .", filepath="val2014")]
    touch(root / "images", "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    touch(root / "val2014", "e.jpg")
    return write(root / name, json.dumps({"images": images, "dataset": "flickr8k"}))


def test_karpathy_maps_val_to_dev_and_restval_to_train(tmp_path):
    karpathy(tmp_path)
    corpus = load_corpus(tmp_path)
    assert corpus.layout == "karpathy"
    assert split_names(corpus) == {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg", "e.jpg"], "test": ["d.jpg"]}
    assert captions_of(corpus, "a.jpg") == ["A cat .", "Two cats ."]
    assert corpus.splits["dev"][1].image == (tmp_path / "val2014" / "e.jpg").resolve()
    assert corpus.splits["dev"][0].image == (tmp_path / "images" / "c.jpg").resolve()


def test_karpathy_preferred_over_coco_and_detected_by_content(tmp_path):
    karpathy(tmp_path, "dataset_coco.json")
    write(tmp_path / "annotations" / "captions_train2014.json", json.dumps({"images": [], "annotations": []}))
    assert load_corpus(tmp_path).layout == "karpathy"
    assert load_corpus(karpathy(tmp_path / "other", "my_split.json")).layout == "karpathy"


def test_karpathy_unknown_split_is_an_error(tmp_path):
    karpathy(tmp_path, split_d="holdout")
    with pytest.raises(DataError, match=r"dataset_flickr8k.json: images\[3\] has split 'holdout'"):
        load_corpus(tmp_path)


# ---- coco ---------------------------------------------------------------------------------------


def coco(root: Path, year: int, val_count: int = 40) -> None:
    write(root / "annotations" / f"captions_train{year}.json", json.dumps({
        "images": [{"id": 1, "file_name": "t1.jpg"}, {"id": 2, "file_name": "t2.jpg"}],
        "annotations": [{"image_id": 2, "caption": "x"}, {"image_id": 1, "caption": "y"},
                        {"image_id": 2, "caption": "z"}]}))
    val = [f"v{i:03d}.jpg" for i in range(val_count)]
    write(root / "annotations" / f"captions_val{year}.json", json.dumps({
        "images": [{"id": 100 + i, "file_name": n} for i, n in enumerate(val)],
        "annotations": [{"image_id": 100 + i, "caption": f"val {i}"} for i in range(val_count)]}))
    touch(root / f"train{year}", "t1.jpg", "t2.jpg")
    touch(root / f"val{year}", *val)


@pytest.mark.parametrize("year", [2014, 2017])
def test_coco_train_file_is_train_and_val_file_is_halved(tmp_path, year):
    coco(tmp_path, year)
    corpus = load_corpus(tmp_path)
    assert corpus.layout == "coco"
    assert names(corpus.splits["train"]) == ["t1.jpg", "t2.jpg"]
    assert captions_of(corpus, "t2.jpg") == ["x", "z"]
    assert corpus.splits["train"][0].image == (tmp_path / f"train{year}" / "t1.jpg").resolve()
    dev, test = set(names(corpus.splits["dev"])), set(names(corpus.splits["test"]))
    assert dev | test == {f"v{i:03d}.jpg" for i in range(40)} and not dev & test
    assert 10 <= len(dev) <= 30
    assert all(i.image.parent == (tmp_path / f"val{year}").resolve() for i in corpus.splits["dev"])


def test_coco_file_given_directly(tmp_path):
    coco(tmp_path, 2014)
    corpus = load_corpus(tmp_path / "annotations" / "captions_val2014.json")
    assert corpus.layout == "coco" and corpus.splits["train"] == [] and n_images(corpus) == 40


def test_coco_annotation_of_unknown_image_is_an_error(tmp_path):
    write(tmp_path / "annotations" / "captions_val2014.json", json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(DataError, match="captions_val2014.json: not a COCO captions file"):
        load_corpus(tmp_path)


# ---- csv / jsonl --------------------------------------------------------------------------------


def test_csv_with_split_column_and_relative_and_absolute_paths(tmp_path):
    touch(tmp_path / "imgs", "a.jpg", "b.jpg", "c.jpg")
    touch(tmp_path / "elsewhere", "d.jpg")
    write(tmp_path / "data" / "data.csv", 'Image,Caption,Split\n../imgs/a.jpg,"A, b",train\n'
          f"../imgs/b.jpg,B,val\n../imgs/c.jpg,C,TEST\n{tmp_path / 'elsewhere' / 'd.jpg'},D,dev\n")
    corpus = load_corpus(tmp_path / "data" / "data.csv")
    assert corpus.layout == "csv" and corpus.root == (tmp_path / "data").resolve()
    assert split_names(corpus) == {"train": ["a.jpg"], "dev": ["b.jpg", "d.jpg"], "test": ["c.jpg"]}
    assert captions_of(corpus, "a.jpg") == ["A, b"]
    assert corpus.splits["dev"][0].image == (tmp_path / "imgs" / "b.jpg").resolve()


def test_csv_unknown_split_names_the_line(tmp_path):
    touch(tmp_path, "a.jpg", "b.jpg")
    write(tmp_path / "data.csv", "image,caption,split\na.jpg,A,train\nb.jpg,B,holdout\n")
    with pytest.raises(DataError, match="data.csv:3: unknown split 'holdout'"):
        load_corpus(tmp_path / "data.csv")


def test_csv_image_in_two_splits_is_an_error(tmp_path):
    touch(tmp_path, "a.jpg")
    write(tmp_path / "data.csv", "image,caption,split\na.jpg,A,train\na.jpg,B,test\n")
    with pytest.raises(DataError, match="a.jpg is listed in two splits"):
        load_corpus(tmp_path / "data.csv")


def test_csv_without_the_needed_columns(tmp_path):
    write(tmp_path / "data.csv", "file,text\na.jpg,A\n")
    with pytest.raises(DataError, match="data.csv:1: header .* needs the columns image, caption"):
        load_corpus(tmp_path / "data.csv")


def test_jsonl_with_split(tmp_path):
    touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    records = [("a.jpg", "A one", "val"), ("b.jpg", " B ", "train"), ("a.jpg", "A two", "val"),
               ("c.jpg", "C", "test")]
    lines = [json.dumps({"image": i, "caption": c, "split": s}) for i, c, s in records]
    write(tmp_path / "data.jsonl", "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]))  # with a blank line
    corpus = load_corpus(tmp_path / "data.jsonl")
    assert corpus.layout == "jsonl"
    assert split_names(corpus) == {"train": ["b.jpg"], "dev": ["a.jpg"], "test": ["c.jpg"]}
    assert captions_of(corpus, "a.jpg") == ["A one", "A two"] and captions_of(corpus, "b.jpg") == ["B"]
    assert corpus.splits["dev"][0].image == (tmp_path / "a.jpg").resolve()


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg", "caption": ', "data.jsonl:2: invalid JSON"),
    ('["a.jpg", "A"]', "data.jsonl:2: expected a JSON object"),
    ('{"image": "a.jpg"}', "data.jsonl:2: needs an 'image' path and a 'caption'"),
])
def test_jsonl_malformed_line(tmp_path, line, message):
    touch(tmp_path, "a.jpg")
    write(tmp_path / "data.jsonl", '{"image": "a.jpg", "caption": "A"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_corpus(tmp_path / "data.jsonl")


def test_csv_layout_needs_a_file(tmp_path):
    hashed(tmp_path, 3)
    with pytest.raises(DataError, match="pass the .csv file itself"):
        load_corpus(tmp_path, layout="csv")


# ---- errors shared by all layouts ---------------------------------------------------------------


def test_missing_image_is_an_error_unless_skipped(tmp_path):
    flickr8k(tmp_path)
    (tmp_path / "images" / "c.jpg").unlink()
    pattern = r"1 of 5 listed images are missing \(e\.g\. .*c\.jpg\).*--on-missing skip"
    with pytest.raises(DataError, match=pattern):
        load_corpus(tmp_path)
    corpus = load_corpus(tmp_path, on_missing="skip")
    assert corpus.missing == [(tmp_path / "images" / "c.jpg").resolve()]
    assert corpus.splits["dev"] == [] and names(corpus.splits["train"]) == ["a.jpg", "b.jpg"]
    assert "1 missing images skipped" in corpus.summary()


def test_on_missing_must_be_error_or_skip(tmp_path):
    with pytest.raises(ValueError, match="on_missing"):
        load_corpus(flickr8k(tmp_path), on_missing="ignore")


def test_unknown_layout_suggests_close_names(tmp_path):
    with pytest.raises(DataError, match="unknown data set layout 'flicker8k' \\(did you mean 'flickr8k'"):
        load_corpus(flickr8k(tmp_path), layout="flicker8k")
    assert "flickr8k" in LAYOUTS


def test_undetectable_folder_lists_what_was_looked_for_and_found(tmp_path):
    write(tmp_path / "notes.txt", "hello")
    (tmp_path / "pics").mkdir()
    with pytest.raises(DataError) as error:
        load_corpus(tmp_path)
    message = str(error.value)
    for expected in ("Flickr8k.token.txt", "captions.txt", "results.csv", "dataset_coco.json",
                     "annotations/captions_train2014.json", "found notes.txt, pics/"):
        assert expected in message


def test_forced_layout_that_does_not_match_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"looked for coco: annotations/captions_train2014\.json"):
        load_corpus(flickr8k(tmp_path), layout="coco")


def test_unknown_file_type_and_absent_path(tmp_path):
    with pytest.raises(DataError, match="cannot tell the layout"):
        load_corpus(write(tmp_path / "notes.txt", "a.jpg A cat\n"))
    with pytest.raises(DataError, match="no such file or folder"):
        load_corpus(tmp_path / "nothing-here")


@pytest.mark.parametrize("file, text, where", [
    ("Flickr8k.token.txt", "a.jpg#0\tA cat .\na.jpg#1 A cat without a tab .\n", "Flickr8k.token.txt:2"),
    ("captions.txt", "image,caption\na.jpg,A cat .\na.jpg\n", "captions.txt:3"),
    ("results.csv", "image_name| comment_number| comment\na.jpg| 0| A .\na.jpg A cat .\n", "results.csv:3"),
])
def test_malformed_line_names_file_and_line(tmp_path, file, text, where):
    write(tmp_path / file, text)
    touch(tmp_path / "images", "a.jpg")
    with pytest.raises(DataError, match=where):
        load_corpus(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "a.jpg#0\t   \n"])
def test_empty_corpus_is_an_error(tmp_path, text):
    write(tmp_path / "Flickr8k.token.txt", text)
    touch(tmp_path / "images", "a.jpg")
    with pytest.raises(DataError, match="empty flickr8k data set"):
        load_corpus(tmp_path)


def test_module_does_not_import_torch():
    code = "import sys, edgecap.train.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---- the real Flickr8k --------------------------------------------------------------------------

real = pytest.mark.skipif(not (FLICKR8K / "Flickr8k.token.txt").is_file(),
                          reason=f"the real Flickr8k is not at {FLICKR8K}")


@real
def test_real_flickr8k_token_file():
    with pytest.raises(DataError, match="2 of 8093 listed images are missing"):
        load_corpus(FLICKR8K)
    corpus = load_corpus(FLICKR8K, on_missing="skip")
    assert corpus.layout == "flickr8k"
    assert n_images(corpus) == 8091 and n_captions(corpus) == 40455
    assert {s: len(items) for s, items in corpus.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert len(corpus.unsplit) == 91  # photos with captions that no official split file names
    # The one image without a photo; its caption #0 is listed under the misspelt name "....jpg.1#0".
    assert [p.name for p in corpus.missing] == FLICKR8K_NO_PHOTO


@real
def test_real_flickr8k_kaggle_csv():
    corpus = load_corpus(FLICKR8K, layout="flickr8k-csv")
    assert corpus.layout == "flickr8k-csv" and corpus.missing == []
    assert n_images(corpus) == 8091 and n_captions(corpus) == 40455
    assert {s: len(items) for s, items in corpus.splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    assert sum("," in c for items in corpus.splits.values() for i in items for c in i.captions) > 0
