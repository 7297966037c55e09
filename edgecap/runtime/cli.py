"""`caption-run SOURCE...`: caption images, folders, globs, videos, cameras and streams with an exported model.

The loop is capture -> caption -> print/save/show -> report. File sources are captioned in batches for
throughput; live sources (cameras, streams) one frame at a time, always the newest one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import cv2

from .captioner import Caption, Captioner, model_dir
from .console import run_main
from .engines import BACKENDS, DEVICES, RUNTIME_ENGINES, check_choices
from .errors import DataError, EdgecapError, ModelError
from .manifest import PRECISIONS, Manifest
from .preprocess import MAX_PIXELS
from .render import attention_figure, draw_caption, save_rgb
from .scenes import HOLD_S, THRESHOLD, Event, GateOptions, timestamp
from .search import check_limits
from .sources import Frame, Source, open_source, quiet_opencv
from .timeline import VIDEO_CODECS, AnnotatedVideo, Subtitles, Timeline
from .timing import TimingStats

PROG = "caption-run"
SEARCH_FLAGS = {"beams": "num_beams", "max_length": "max_length", "length_penalty": "length_penalty",
                "n_best": "num_return_sequences"}  # flag -> SearchOptions field; unset flags keep the manifest's
STAGES = ("preprocess_ms", "encoder_ms", "decoder_ms", "decoder_per_word_ms")
QUIT_KEYS = (ord("q"), 27)  # q, ESC
SCENE_KINDS = ("video", "camera", "csi", "stream")  # sources captioned by scene unless --every-frame
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool that a closed pipe ended
ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r",
                         **{chr(c): f"\\x{c:02x}" for c in [*range(32), 127] if chr(c) not in "\n\t\r"}})


def add_model_arguments(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    """The flags that choose a model, its engine and search: shared by caption-run, caption-serve, caption-batch.
    `threads`: the default of --threads (None: all cores)."""
    p.add_argument("--model", metavar="DIR", help="model folder made by export-onnx (default: $EDGECAP_MODEL, "
                                                  "then ./model, then the bundled Flickr8k model)")
    p.add_argument("--engine", default="ort", metavar="{" + ",".join(RUNTIME_ENGINES) + "}",
                   help="ONNX Runtime (ort) or its TensorRT provider (trt) (default: ort)")
    p.add_argument("--device", metavar="{" + ",".join(DEVICES) + "}",
                   help="; ".join(f"{n}: {', '.join(BACKENDS[n].devices)}" for n in RUNTIME_ENGINES)
                   + " (default: the first)")
    p.add_argument("--precision", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="graphs to run (default: fp32, or the best the model folder has)")
    p.add_argument("--beams", metavar="K", type=int, help="beam width, 1 = greedy (default: the model's)")
    p.add_argument("--max-length", metavar="N", type=int, help="most words per caption (default: the model's)")
    p.add_argument("--length-penalty", metavar="X", type=float,
                   help="score = log p / length ** X (default: the model's)")
    p.add_argument("--n-best", metavar="N", type=int, help="also give the N best captions (N <= --beams)")
    p.add_argument("--tags", metavar="K", type=int, default=0,
                   help="also give the K most likely ImageNet labels with their probabilities, from the model's "
                        "tagger graph (default: 0, none)")
    p.add_argument("--threads", metavar="N", type=int, default=threads,
                   help=f"ONNX Runtime threads (default: {threads or 'all cores'})")
    p.add_argument("--max-pixels", metavar="P", type=int, default=MAX_PIXELS,
                   help=f"refuse images with more pixels, read from the file's header before decoding "
                        f"(default: {MAX_PIXELS:,})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image, folder, glob, video file, cameraN, csi://N, rtsp:// / http(s):// stream, or - "
                        "(one image on standard input)")
    add_model_arguments(p)
    p.add_argument("--recursive", action=argparse.BooleanOptionalAction, default=True,
                   help="caption the images in a folder's subfolders too (default); --no-recursive: its top level "
                        "only")
    p.add_argument("--batch", metavar="N", type=int, default=8, help="images per batch for file sources (default: 8)")
    p.add_argument("--every", metavar="N", type=int, default=1, help="caption every N-th frame of a video (default: 1)")
    p.add_argument("--max-fps", metavar="F", type=float, help="caption at most F frames per second")
    scenes = p.add_argument_group("videos and cameras", "by default a video, camera or stream is captioned when its "
                                  "scene changes (the encoder runs on every frame, the decoder on a change): one "
                                  "event per caption, `HH:MM:SS.mmm  caption` (with --json, one record per event "
                                  "with start and end, printed when it ends)")
    mode = scenes.add_mutually_exclusive_group()
    mode.add_argument("--on-change", dest="every_frame", action="store_false", default=False,
                      help="caption when the scene changes (the default)")
    mode.add_argument("--every-frame", dest="every_frame", action="store_true",
                      help="caption every (sampled) frame, one line each")
    scenes.add_argument("--change-threshold", metavar="D", type=float, default=THRESHOLD,
                        help=f"cosine distance of the encoder's pooled features that makes a new scene "
                             f"(default: {THRESHOLD}, measured for the bundled model)")
    scenes.add_argument("--hold", metavar="S", type=float, default=HOLD_S,
                        help=f"seconds a change must last to be a new scene (default: {HOLD_S})")
    scenes.add_argument("--refresh", metavar="S", type=float,
                        help="caption again after S seconds without a change (default: never)")
    scenes.add_argument("--subtitles", metavar="FILE", type=Path,
                        help="write the events as SubRip (.srt) or WebVTT (.vtt) cues, rewritten as each one ends")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of SOURCE<TAB>caption")
    p.add_argument("--save", type=Path, metavar="DIR",
                   help="write each image with its caption as DIR/<name>.jpg; for a video, OUT.mp4/.avi writes the "
                        "video with the current caption on every frame")
    p.add_argument("--attention", action="store_true", help="with --save: also DIR/<name>.attention.png")
    p.add_argument("--show", action="store_true", help="show captioned frames in a window (q or ESC quits)")
    p.add_argument("--quiet", action="store_true", help="no timing report on stderr")
    return p


def captioner_kwargs(args: argparse.Namespace, prog: str) -> dict:
    """`Captioner.load` keyword arguments from the model flags, checked before the (slow) model load: the model
    folder (--model, $EDGECAP_MODEL, ./model, else the bundled model, announced on stderr) and the typed search
    flags over its defaults."""
    check_choices(args.engine, args.device, args.precision, RUNTIME_ENGINES)
    if args.threads is not None and args.threads < 1:
        raise EdgecapError(f"--threads must be at least 1, got {args.threads}")
    folder = model_dir(args.model, say=lambda line: print(f"{prog}: {line}", file=sys.stderr))
    if folder.exists() and not folder.is_dir():
        raise ModelError(f"{folder} is a file, not a model folder (the folder export-onnx writes)")
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder} (make one with `export-onnx CKPT -o {folder}`, "
                         "then pass --model or set $EDGECAP_MODEL)")
    return {"folder": folder, "engine": args.engine, "precision": args.precision, "device": args.device,
            "threads": args.threads, "max_pixels": args.max_pixels, "tags": args.tags,
            **search_overrides(args, folder)}


def search_overrides(args: argparse.Namespace, folder: Path) -> dict:
    """The typed search flags as SearchOptions fields over the model's defaults, each checked against the limits
    the server keeps too and against those defaults: a bad value is refused naming its flag, before the load."""
    check_limits(args.beams, args.max_length)
    model = Manifest.load(folder, check_files=False).search
    beams = model.num_beams if args.beams is None else args.beams
    if args.n_best is not None and not 1 <= args.n_best <= beams:
        width = "--beams" if args.beams is not None else "the model's default beam width; raise it with --beams"
        raise EdgecapError(f"--n-best must be between 1 and {beams} ({width}), got {args.n_best}")
    if args.max_length is not None and args.max_length <= model.min_length:
        raise EdgecapError(f"--max-length must be more than {model.min_length}, the model's fewest words before "
                           f"a caption may end, got {args.max_length}")
    if args.length_penalty is not None and not math.isfinite(args.length_penalty):
        raise EdgecapError(f"--length-penalty must be a finite number, got {args.length_penalty}")
    return {field: v for flag, field in SEARCH_FLAGS.items() if (v := getattr(args, flag)) is not None}


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad option values before the (slow) model load."""
    if args.batch < 1:
        raise EdgecapError(f"--batch must be at least 1, got {args.batch}")
    if args.every < 1:
        raise EdgecapError(f"--every must be at least 1, got {args.every}")
    if args.max_fps is not None and not args.max_fps > 0:
        raise EdgecapError(f"--max-fps must be more than 0, got {args.max_fps}")
    if args.attention and args.save is None:
        raise EdgecapError("--attention writes figures next to the captioned images: add --save DIR")
    if args.attention and saves_video(args):
        raise EdgecapError("--attention writes figures into a --save folder, not into a video")
    gate_options(args)
    if args.every_frame and (args.subtitles or saves_video(args)):
        raise EdgecapError("--subtitles and --save VIDEO write scene events: leave out --every-frame")
    if args.show:
        check_display()


def check_display() -> None:
    """--show needs an OpenCV built with a GUI and, on Linux, a display to open a window on."""
    gui = re.search(r"GUI:\s*(\w+)", cv2.getBuildInformation())
    if gui and gui[1] == "NONE":
        raise EdgecapError("--show needs OpenCV with GUI support, and this OpenCV is a headless build "
                           "(opencv-python-headless); use --save DIR instead")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise EdgecapError("--show needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set; "
                           "use --save DIR instead")


def load_captioner(args: argparse.Namespace) -> Captioner:
    """The captioner the model flags choose (see `captioner_kwargs`)."""
    kwargs = captioner_kwargs(args, PROG)
    captioner = Captioner.load(**kwargs)
    if args.attention and captioner.manifest.decoder != "attention":
        raise EdgecapError(f"--attention needs an attention model; {kwargs['folder']} has a "
                           f"{captioner.manifest.decoder} decoder")
    return captioner


class Output:
    """Where each captioned frame goes: a stdout line (text or JSON), annotated files, a window."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json, self.save, self.attention, self.show = args.json, args.save, args.attention, args.show
        self.names: set[str] = set()
        if self.save is not None and not saves_video(args):
            try:
                self.save.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise EdgecapError(f"could not create --save folder {self.save}: {e.strerror}") from None

    def __call__(self, frame: Frame, caption: Caption, batch: int) -> bool:
        """Emit one result; False once the user has closed the window."""
        if self.json:
            print(json.dumps({"source": frame.source, "batch": batch, **caption.to_dict(batch)}), flush=True)
        else:
            tags = "".join(f"\t{label} {p:.2f}" for label, p in caption.tags)
            print(f"{escape(frame.source)}\t{caption.text}{tags}", flush=True)
        return self.show_or_save(frame, caption)

    def show_or_save(self, frame: Frame, caption: Caption, save: bool = True) -> bool:
        """The frame with its caption into the --save folder (unless not `save`) and the --show window; False once
        the window is closed."""
        if (self.save is None or not save) and not self.show:
            return True
        annotated = draw_caption(frame.rgb, caption.text)
        if self.save is not None and save:
            name = self.name(frame.source)
            save_rgb(self.save / f"{name}.jpg", annotated)
            if self.attention:
                figure = attention_figure(frame.rgb, caption.words, caption.attention)
                save_rgb(self.save / f"{name}.attention.png", figure)
        if self.show:
            cv2.imshow(PROG, cv2.cvtColor(annotated, cv2.COLOR_RGB2BGR))
            return (cv2.waitKey(1) & 0xFF) not in QUIT_KEYS
        return True

    def name(self, source: str) -> str:
        """File stem from the frame's source (`clip-000012` for frame 12 of clip.avi), unique in this run."""
        path, number = m.groups() if (m := re.fullmatch(r"(.*)#(\d+)", source)) else (source, None)
        stem = re.sub(r"[^\w.-]+", "_", Path(path).stem) or "frame"
        base = f"{stem}-{int(number):06d}" if number else stem
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}-{k}"
        self.names.add(name)
        return name


def escape(text: str) -> str:
    """Text with backslashes and control characters escaped as Python writes them (`\\n`, `\\t`, `\\x1b`): a
    file name holding a newline or a tab stays on its one line and its one column."""
    return text.translate(ESCAPES)


def warn(line: str) -> None:
    print(f"{PROG}: warning: {escape(line)}", file=sys.stderr)


def batches(sources: list[Source], size: int) -> Iterator[list[Frame]]:
    """Frames in lists of `size` for file sources, one at a time (the newest) for live sources."""
    for source in sources:
        frames = iter(source)
        while chunk := list(itertools.islice(frames, 1 if source.live else size)):
            yield chunk


def readable(frames: list[Frame], stats: TimingStats) -> list[Frame]:
    """The frames that have an image; the others are warned about and counted as failures."""
    for frame in frames:
        if frame.rgb is None:
            warn(frame.error)
            stats.failures += 1
    return [f for f in frames if f.rgb is not None]


def open_sources(args: argparse.Namespace, stack: ExitStack, stats: TimingStats) -> list[Source]:
    """Every source that opens; each one that does not is warned about and counted as a failure. When none
    opens, the first one's error ends the command."""
    sources, errors = [], []
    for uri in args.sources:
        try:
            sources.append(stack.enter_context(open_source(uri, args.every, args.max_fps, max_pixels=args.max_pixels,
                                                           recursive=args.recursive)))
        except DataError as e:
            errors.append(e)
    if not sources:
        raise DataError(escape(str(errors[0])))
    for e in errors:
        warn(str(e))
        stats.failures += 1
    return sources


def saves_video(args: argparse.Namespace) -> bool:
    """Whether --save names a video file (the annotated video of a video source) rather than a folder."""
    return args.save is not None and args.save.suffix.lower() in VIDEO_CODECS


def gate_options(args: argparse.Namespace) -> GateOptions:
    return GateOptions(args.change_threshold, args.hold, args.refresh)


def caption_frames(captioner: Captioner, source: Source, args: argparse.Namespace, output: Output,
                   stats: TimingStats) -> bool:
    """Images, or every sampled frame: batches through the captioner, one output per frame; False once the
    user has closed the window."""
    for chunk in batches([source], args.batch):
        start = time.perf_counter()
        if not (frames := readable(chunk, stats)):
            continue
        captions = captioner.caption_batch([f.rgb for f in frames])
        going = all([output(f, c, len(frames)) for f, c in zip(frames, captions)])
        timings = {k: captions[0].timings[k] for k in STAGES}
        timings["end_to_end_ms"] = (time.perf_counter() - start) * 1e3  # caption + print/save/show
        stats.add(timings, len(frames))
        if not going:
            return False
    return True


def caption_scenes(captioner: Captioner, source: Source, args: argparse.Namespace, output: Output,
                   stats: TimingStats, subtitles: Subtitles | None, video: AnnotatedVideo | None) -> bool:
    """A video, camera or stream by scene (see scenes.py): a line when an event starts (with --json, a record
    when it ends), subtitle cues and the annotated video as it goes. A source that ends early or drops is a
    warning; the events so far stay written."""
    name = str(getattr(source, "path", None) or getattr(source, "name", source.kind))

    def started(event: Event) -> None:
        if not args.json:
            print(f"{timestamp(event.start)}  {event.caption.text}", flush=True)

    def ended(event: Event) -> None:
        if args.json:
            print(json.dumps(event.to_dict()), flush=True)
        if subtitles is not None:
            subtitles.add(event)

    timeline = Timeline(captioner, gate_options(args), started, ended, source=name)
    going, end, fps = True, None, getattr(source, "fps", 0.0)
    try:
        for frame in source:
            if frame.rgb is None:
                warn(frame.error)
                stats.failures += 1
                continue
            start = time.perf_counter()
            current = timeline.current
            event = timeline.feed(frame.rgb, frame.time or 0.0, frame.index)
            if video is not None:
                video.write(frame.rgb, event.caption)
            new = event is not current and args.save is not None and video is None  # a JPEG per event
            if new or args.show:  # the window shows every frame, with the current caption
                going = output.show_or_save(frame, event.caption, save=new)
            stats.add({**{k: v for k, v in timeline.timings.items() if k in STAGES},
                       "end_to_end_ms": (time.perf_counter() - start) * 1e3})
            end = (frame.time or 0.0) + (args.every / fps if fps > 0 else 0.0)  # the last event lasts its frames
            if not going:
                break
    except DataError as e:  # a live source that dropped for good
        warn(str(e))
        stats.failures += 1
    finally:
        timeline.close(end)
    return going


def scene_writers(args: argparse.Namespace, sources: list[Source],
                  stack: ExitStack) -> tuple[Subtitles | None, AnnotatedVideo | None]:
    """--subtitles and --save VIDEO, opened before any frame is captioned (a bad path is one line, no work)."""
    if not (args.subtitles or saves_video(args)):
        return None, None
    if len(sources) != 1 or sources[0].kind not in SCENE_KINDS:
        raise EdgecapError("--subtitles and --save VIDEO take one video, camera or stream source")
    subtitles = Subtitles(args.subtitles) if args.subtitles else None
    video = None
    if saves_video(args):  # at the source's rate over --every (a camera's: --max-fps, else 25): the same duration
        video = AnnotatedVideo(args.save, (getattr(sources[0], "fps", 0.0) or args.max_fps or 25.0) / args.every)
        stack.callback(video.close)
    return subtitles, video


def caption_run(args: argparse.Namespace) -> int:
    """The command's body: 0 when every input was captioned, 1 when some could not be read, EXIT_BROKEN_PIPE
    (quietly) when whatever read standard output stopped reading."""
    quiet_opencv()  # our one-line errors say it instead
    check_options(args)
    captioner = load_captioner(args)
    with ExitStack() as stack:
        stats = TimingStats()
        sources = open_sources(args, stack, stats)
        subtitles, video = scene_writers(args, sources, stack)
        output = Output(args)
        try:
            for source in sources:
                by_scene = not args.every_frame and source.kind in SCENE_KINDS
                going = (caption_scenes(captioner, source, args, output, stats, subtitles, video) if by_scene
                         else caption_frames(captioner, source, args, output, stats))
                if not going:
                    break
        except BrokenPipeError:  # `caption-run ... | head -1`: stop as quietly as other Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush at exit too
            return EXIT_BROKEN_PIPE
        finally:  # also on Ctrl-C, a dropped stream or a closed pipe: the report so far
            if args.show:
                cv2.destroyAllWindows()
            if not args.quiet:
                print(stats.report(PROG), file=sys.stderr)
    return 1 if stats.failures else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: caption_run(args), PROG)


if __name__ == "__main__":
    sys.exit(main())
