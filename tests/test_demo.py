"""make demo records its numbers (exact matches per decoder and precision, times) in a JSON file."""

from __future__ import annotations

import json

from edgecap.demo import _compare, write_results
from edgecap.runtime.captioner import Captioner
from edgecap.train.synthetic import SyntheticSplit


def test_demo_results_hold_the_exact_match_counts(exported, tmp_path, capsys):
    split = SyntheticSplit("test", 6, image_size=112)
    model = exported["attention"]
    counts = {precision: _compare(model, split, precision) for precision in ("fp32", "int8")}
    printed = capsys.readouterr().out
    for precision, count in counts.items():
        captioner = Captioner.load(model, precision=precision, threads=1)
        texts = [c.text for c in captioner.caption([split.image(i) for i in range(len(split))])]
        exact = sum(text == split.captions(i)[0] for i, text in enumerate(texts))
        assert count == {"exact": exact, "scenes": 6, "beams": captioner.options.num_beams}
        assert f"{exact}/6 held-out scenes captioned exactly ({precision}" in printed
    results = {"decoders": {"attention": {"train_s": 1.5, **counts}}, "synthetic_s": 9.0}
    write_results(tmp_path / "demo" / "results.json", results)
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
