#!/usr/bin/env python
"""Video captioned by scene against every frame, in one run: throughput, encoder and decoder calls, flicker
(caption changes inside a held scene), cuts found and their time error.

By default it builds a test video from N Flickr8k test photos held T seconds each at F frames per second, each
frame with camera noise (sensor noise, +-2 px shake, brightness flicker, JPEG then MPEG-4 re-encoding), so the
true cuts are known; `--video FILE` measures any video (no cut truth: counts and throughput only).

  python benchmarks/video.py --images ../shared/flickr8k --count 10 --hold 3 --fps 25 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from edgecap.runtime.captioner import Captioner, model_dir
from edgecap.runtime.console import run_main
from edgecap.runtime.errors import DataError
from edgecap.runtime.scenes import Event, GateOptions, distance
from edgecap.runtime.sources import open_source
from edgecap.runtime.timeline import Timeline

CUT_TOLERANCE_S = 0.5


def camera_noise(bgr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One frame of a held photo as a camera would deliver it."""
    dx, dy = rng.integers(-2, 3, 2)
    shifted = cv2.warpAffine(bgr, np.float32([[1, 0, dx], [0, 1, dy]]), (bgr.shape[1], bgr.shape[0]),
                             borderMode=cv2.BORDER_REFLECT)
    noisy = shifted.astype(np.float32) * (1 + rng.uniform(-0.04, 0.04)) + rng.normal(0, 4, bgr.shape)
    _, jpeg = cv2.imencode(".jpg", np.clip(noisy, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 75])
    return cv2.imdecode(jpeg, cv2.IMREAD_COLOR)


def build_video(photos: list[Path], hold: float, fps: float, path: Path, seed: int) -> list[float]:
    """Write the test video; -> each photo's start time in seconds (the true scene starts, 0 first)."""
    rng = np.random.default_rng(seed)
    first = cv2.imread(str(photos[0]))
    size = (first.shape[1], first.shape[0])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    per_photo = round(hold * fps)
    for photo in photos:
        bgr = cv2.resize(cv2.imread(str(photo)), size, interpolation=cv2.INTER_AREA)
        for _ in range(per_photo):
            writer.write(camera_noise(bgr, rng))
    writer.release()
    return [i * per_photo / fps for i in range(len(photos))]


def test_photos(flickr8k: Path, count: int) -> list[Path]:
    names = (flickr8k / "Flickr_8k.testImages.txt").read_text().split()
    photos = [flickr8k / "images" / n for n in sorted(names) if (flickr8k / "images" / n).is_file()][:count]
    if len(photos) < count:
        raise DataError(f"need {count} Flickr8k test photos under {flickr8k}/images, found {len(photos)}")
    return photos


def frames(video: Path):
    with open_source(str(video)) as source:
        for frame in source:
            if frame.rgb is not None:
                yield frame.rgb, frame.time, frame.index


def score(events: list[Event], cuts: list[float] | None) -> dict:
    """Cuts found (the first event within the tolerance after each true scene start), their time error, and
    extra events (any other event: a caption change inside a held scene)."""
    if cuts is None:
        return {}
    found, errors, extra = set(), [], 0
    for event in events:
        scene = max(i for i, c in enumerate(cuts) if c <= event.start + 1e-6)
        late = event.start - cuts[scene]
        if scene not in found and late <= CUT_TOLERANCE_S:
            found.add(scene)
            errors.append(late)
        else:
            extra += 1
    return {"scenes": len(cuts), "cuts_found": len(found), "cut_error_s_max": round(max(errors, default=0.0), 3),
            "extra_events_in_held_scenes": extra}


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """32x32 grey: what a pixel pre-gate in front of the encoder would compare."""
    return cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def spread(values: list[float]) -> dict:
    return {"p1": float(np.percentile(values, 1)), "p50": float(np.median(values)),
            "p99": float(np.percentile(values, 99)), "min": float(np.min(values)), "max": float(np.max(values)),
            "pairs": len(values)}


def frame_distances(captioner: Captioner, video: Path, cuts: list[float]) -> dict:
    """Between each frame and the previous one, within a held scene and across a cut: the cosine distance of the
    pooled features (what the gate's threshold must separate) and the mean absolute difference of 32x32 grey
    thumbnails (what a cheaper pixel pre-gate would see)."""
    features, pixels, previous = {"within_scene": [], "across_cut": []}, {"within_scene": [], "across_cut": []}, None
    for rgb, t, _ in frames(video):
        pooled, small = captioner.encode([rgb])[0]["pooled"][0], thumbnail(rgb)
        if previous is not None:
            kind = "across_cut" if any(previous[2] < c <= t + 1e-6 for c in cuts) else "within_scene"
            features[kind].append(distance(previous[0], pooled))
            pixels[kind].append(float(np.abs(small - previous[1]).mean()))
        previous = (pooled, small, t)
    return {"features": {k: spread(v) for k, v in features.items()},
            "pixels": {k: spread(v) for k, v in pixels.items()}}


def measure(captioner: Captioner, video: Path, gate: GateOptions | None, cuts: list[float] | None) -> dict:
    """One pass over the video; wall time per frame, and the encoder's and decoder's own times (p50, ms)."""
    events: list[Event] = []
    stages: dict[str, list[float]] = {"encoder_ms": [], "decoder_ms": []}
    timeline = Timeline(captioner, gate, on_start=events.append)
    start = time.perf_counter()
    for rgb, t, index in frames(video):
        decoded = timeline.counts.decoder_calls
        timeline.feed(rgb, t, index)
        stages["encoder_ms"].append(timeline.timings["encoder_ms"])
        if timeline.counts.decoder_calls > decoded:
            stages["decoder_ms"].append(timeline.timings["decoder_ms"])
    timeline.close()
    seconds = time.perf_counter() - start
    c = timeline.counts
    count = c.encoder_calls  # the encoder runs on every frame
    return {"frames": count, "seconds": round(seconds, 2), "frames_per_s": round(count / seconds, 1),
            "ms_per_frame": round(seconds * 1e3 / count, 2),
            "p50_ms": {k: round(float(np.median(v)), 2) for k, v in stages.items() if v},
            "encoder_calls": c.encoder_calls, "decoder_calls": c.decoder_calls, "events": c.events,
            **score(events, cuts), "captions": [[round(e.start, 3), e.caption.text] for e in events]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--images", type=Path, default=Path("../shared/flickr8k"), help="Flickr8k folder")
    p.add_argument("--video", type=Path, help="measure this video instead of building one")
    p.add_argument("--count", type=int, default=10, help="photos in the built video (default: 10)")
    p.add_argument("--hold", type=float, default=3.0, help="seconds each photo is held (default: 3)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate of the built video (default: 25)")
    p.add_argument("--refresh", type=float, help="the gate's --refresh (default: none)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="where to keep the built video (default: a temporary file)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)

    def body() -> int:
        captioner = Captioner.load(model_dir(args.model), threads=args.threads)
        cuts = None
        video = args.video
        if video is None:
            video = args.keep or Path(f"/tmp/edgecap-video-bench-{args.seed}.mp4")
            cuts = build_video(test_photos(args.images, args.count), args.hold, args.fps, video, args.seed)
        gate = GateOptions(refresh=args.refresh)
        result = {"video": str(video), "built": None if args.video else {
                      "photos": args.count, "hold_s": args.hold, "fps": args.fps, "seed": args.seed},
                  "gate": {"threshold": gate.threshold, "hold_s": gate.hold, "refresh_s": gate.refresh},
                  "every_frame": measure(captioner, video, None, cuts),
                  "on_change": measure(captioner, video, gate, cuts)}
        if cuts is not None:
            result["distances"] = frame_distances(captioner, video, cuts)
        every, gated = result["every_frame"], result["on_change"]
        result["speedup"] = round(gated["frames_per_s"] / every["frames_per_s"], 2)
        # the most gating can give: a frame's cost without the decoder, all else (reading, preprocessing) kept
        overhead = every["ms_per_frame"] - every["p50_ms"]["encoder_ms"] - every["p50_ms"]["decoder_ms"]
        result["speedup_bound"] = round(every["ms_per_frame"] / (every["p50_ms"]["encoder_ms"] + max(overhead, 0)), 2)
        print(json.dumps({k: v for k, v in result.items() if k not in ("every_frame", "on_change")}, indent=1))
        for name in ("every_frame", "on_change"):
            print(name, json.dumps({k: v for k, v in result[name].items() if k != "captions"}))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return 0

    return run_main(body, "video.py")


if __name__ == "__main__":
    sys.exit(main())
