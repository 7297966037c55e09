"""`export-onnx CKPT`: a verified ONNX model folder (encoder, decoder_init, decoder_step, tagger, manifest).

`export-onnx --add-tagger MODEL_DIR --verify-images IMAGES` adds the tagger to a folder exported without one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgecap.runtime.console import run_main
from edgecap.runtime.errors import EdgecapError
from edgecap.runtime.search import SearchOptions, check_limits
from edgecap.runtime.sources import read_images

from .exporter import DEFAULT_OPSET, ExportOptions, export_model
from .tagger import tag_folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export-onnx", description=__doc__)
    p.add_argument("checkpoint", help="a checkpoint written by caption-train (best.pt, last.pt); with --add-tagger, "
                                      "a model folder")
    p.add_argument("-o", "--output", type=Path, help="model folder (default: CKPT's folder / <name>-onnx)")
    p.add_argument("--int8", action="store_true", help="add int8 graphs: static QDQ encoder, weight-only int8 decoder")
    p.add_argument("--calib", help="image folder or glob for int8 calibration (default: the training split)")
    p.add_argument("--calib-count", type=int, default=64, help="calibration images (default: 64)")
    p.add_argument("--fp16", action="store_true", help="add float16 graphs for GPU targets")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the ONNX Runtime vs PyTorch comparison (the ONNX checker still runs)")
    p.add_argument("--verify-images", help="image folder or glob for verification (default: the test split)")
    p.add_argument("--verify-count", type=int, default=16, help="verification images (default: 16)")
    p.add_argument("--drop-fp32", action="store_true",
                   help="leave the fp32 graphs out of the folder (they are still verified and used to make the "
                        "variants): a smaller folder to ship")
    p.add_argument("--keep-fp32", metavar="ROLES", type=lambda t: tuple(t.split(",")), default=(),
                   help="comma-separated graphs (encoder, decoder_init, decoder_step) that the --int8/--fp16 "
                        "variants keep in fp32, e.g. an encoder whose int8 form changes too many captions")
    p.add_argument("--beams", type=int, default=SearchOptions.num_beams,
                   help=f"the model's default beam width, 1 = greedy (default: {SearchOptions.num_beams})")
    p.add_argument("--max-length", type=int, default=SearchOptions.max_length,
                   help=f"the model's default most words per caption (default: {SearchOptions.max_length})")
    p.add_argument("--no-tags", dest="tags", action="store_false",
                   help="leave out the tagger graph (the encoder's ImageNet classifier over its regions)")
    p.add_argument("--add-tagger", action="store_true",
                   help="add the tagger graph to the model folder given in place of CKPT (needs --verify-images)")
    p.add_argument("--force", action="store_true", help="replace an existing model folder")
    args = vars(p.parse_args(argv))
    ckpt, add = args.pop("checkpoint"), args.pop("add_tagger")

    def body() -> None:
        if add:
            if not args["verify_images"]:
                raise EdgecapError("--add-tagger checks the tagger on real photos: add --verify-images IMAGES")
            images = read_images(args["verify_images"], args["verify_count"])
            tag_folder(Path(ckpt), images, args["opset"], print)
            print(f"model folder: {ckpt} (tagger added)")
            return
        check_limits(args["beams"], args["max_length"])
        export_model(ckpt, ExportOptions(**args))

    return run_main(body, "export-onnx")


if __name__ == "__main__":
    sys.exit(main())
