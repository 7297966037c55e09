"""`caption-attend IMAGE`: the Show-Attend-Tell figure — each word of the caption with its attention map."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .captioner import Captioner, as_rgb, model_dir
from .console import run_main
from .errors import ModelError
from .manifest import PRECISIONS
from .preprocess import MAX_PIXELS
from .render import attention_figure, save_rgb
from .search import check_limits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="caption-attend", description=__doc__)
    p.add_argument("image", help="an image file")
    p.add_argument("--model", help="model folder (default: $EDGECAP_MODEL, then ./model, then the bundled model)")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="graphs to run (default: the folder's best)")
    p.add_argument("--beams", type=int, default=None, help="beam width (default: the model's)")
    p.add_argument("--max-pixels", metavar="P", type=int, default=MAX_PIXELS,
                   help=f"refuse larger images before decoding them (default: {MAX_PIXELS:,})")
    p.add_argument("-o", "--output", type=Path,
                   help="PNG to write (default: beside the image, IMAGE.attention.png)")
    args = p.parse_args(argv)

    def body() -> None:
        check_limits(args.beams, None)  # a bad --beams is named as the flag, before the model loads
        search = {} if args.beams is None else {"num_beams": args.beams}
        folder = model_dir(args.model, say=lambda line: print(f"caption-attend: {line}", file=sys.stderr))
        cap = Captioner.load(folder, precision=args.precision, max_pixels=args.max_pixels, **search)
        if cap.manifest.decoder != "attention":
            raise ModelError(f"{folder} holds a {cap.manifest.decoder} model; attention maps need an "
                             "attention model")
        rgb = as_rgb(args.image, cap.max_pixels)
        result = cap.caption(rgb)
        out = args.output or Path(args.image).with_suffix(".attention.png")
        save_rgb(out, attention_figure(rgb, result.words, result.attention))
        print(f"{result.text}\nattention figure: {out}")

    return run_main(body, "caption-attend")


if __name__ == "__main__":
    sys.exit(main())
