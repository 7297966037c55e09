"""Latency and throughput statistics for caption-run: per-stage samples in milliseconds, numpy percentiles."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

PERCENTILES = (50, 90, 99)


def percentiles(values: list[float]) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ...} of the values."""
    return dict(zip((f"p{q}" for q in PERCENTILES), np.percentile(values, PERCENTILES).tolist()))


class TimingStats:
    """Per-image samples per stage, images captioned, failures and the wall time since creation.

    `add` takes one batch's stage times and records batch time / batch size once per image of the batch,
    so percentiles are over images whatever the batching.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start = clock()
        self.samples: dict[str, list[float]] = {}
        self.images = self.failures = self.largest_batch = 0

    def add(self, timings_ms: dict[str, float], images: int = 1) -> None:
        """Record one batch of `images` images: {stage: batch time in ms}."""
        for stage, ms in timings_ms.items():
            self.samples.setdefault(stage, []).extend([ms / images] * images)
        self.images += images
        self.largest_batch = max(self.largest_batch, images)

    def summary(self) -> dict:
        """Counts, wall time, images per second and {stage: {p50, p90, p99}} in ms per image."""
        wall = self.clock() - self.start
        stages = {stage: percentiles(s) for stage, s in self.samples.items()}
        return {"images": self.images, "failures": self.failures, "wall_s": wall,
                "images_per_s": self.images / wall if wall > 0 else 0.0, "stages_ms": stages}

    def report(self, prog: str = "caption-run") -> str:
        """A few aligned lines for stderr."""
        s = self.summary()
        header = f"{prog}: timing in ms per image"
        if self.largest_batch > 1:
            header += f" (batches of up to {self.largest_batch}: per-image time = batch time / batch size)"
        names = {stage: stage.removesuffix("_ms").replace("_", " ") for stage in s["stages_ms"]}
        width = max(map(len, names.values()), default=0)
        lines = [header] + [
            f"  {names[stage]:<{width}}" + "".join(f"  {q} {v:8.2f}" for q, v in p.items())
            for stage, p in s["stages_ms"].items()]
        lines.append(f"  captioned {s['images']}, failed {s['failures']}: "
                     f"{s['images_per_s']:.1f} images/s over {s['wall_s']:.2f} s")
        return "\n".join(lines)
