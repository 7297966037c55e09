"""The Ray Serve deployment behind caption-serve: HTTP in, dynamic batches of images through one Captioner.

Routes: `GET /` (a page to try the model in a browser), `POST /v1/caption` (raw `image/*` bytes, or a multipart
form with one or more files; optional query parameters `beams`, `max_length`, `n_best`, `tags` (K labels) and
`attention` (per word, the weights over the encoder's grid)), `GET /v1/model`, `GET /healthz`. Every error is `{"error": "<one line>"}` with
its status: 400 undecodable image or form, 404 no such route, 405 wrong method, 413 too large, 415 wrong content
type, 422 bad or unknown parameters, 503 (with Retry-After) when the replica holds its capacity or the service
is stopping (the driver sets a flag in Ray's key-value store that every replica polls).
"""

import asyncio
import threading
import time
from dataclasses import astuple, dataclass, field
from importlib.resources import files

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from edgecap.runtime.captioner import Caption, Captioner, tag_count
from edgecap.runtime.errors import DataError, EdgecapError, ImageTooLarge, ModelError
from edgecap.runtime.preprocess import decode_image
from edgecap.runtime.search import SearchOptions, check_limits

MULTIPART = "multipart/form-data"
QUERY = ("beams", "max_length", "n_best", "tags", "attention")  # the query parameters /v1/caption takes
MAX_TAGS = 20                     # most labels a request may ask for
PAGE = files("edgecap.scale").joinpath("page.html").read_text(encoding="utf-8")
RETRY = {"Retry-After": "1"}      # on every 503: the condition is brief (a full queue, a replica going away)
DRAINING = "edgecap/draining/"    # + the application's name: the internal-KV key set when the service stops
DRAIN_POLL_S = 0.1                # how often a replica looks at that key

app = FastAPI(title="edgecap", summary="Image captioning on ONNX Runtime, served by Ray Serve")


@dataclass
class HTTPError(Exception):
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


@app.exception_handler(HTTPError)
async def http_error(_: Request, e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


@app.exception_handler(HTTPException)
async def routing_error(request: Request, e: HTTPException) -> JSONResponse:
    """Starlette's own answers (404 no such route, 405 wrong method) in the same shape."""
    return JSONResponse({"error": f"{e.detail}: {request.method} {request.url.path}"}, status_code=e.status_code,
                        headers=e.headers)


@app.exception_handler(RequestValidationError)
async def bad_parameter(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)


async def read_images(request: Request, max_bytes: int) -> list[tuple[str, bytes]]:
    """The request's images as (name, encoded bytes): the body of an `image/*` request, or each file of a
    multipart form. 413 past `max_bytes`, 415 for any other content type, 400 for a form without files."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind == MULTIPART):
        raise HTTPError(415, f"send an image (Content-Type: image/*) or a {MULTIPART} form, not {kind or 'nothing'}")
    if int(request.headers.get("content-length") or 0) > max_bytes:
        raise HTTPError(413, f"request body over the {max_bytes}-byte limit")
    body = await request.body()
    if len(body) > max_bytes:
        raise HTTPError(413, f"request body over the {max_bytes}-byte limit")
    if kind != MULTIPART:
        return [("request body", body)]
    try:
        form = await request.form()
    except HTTPException as e:
        raise HTTPError(400, f"not a readable {MULTIPART} body: {e.detail}") from None
    files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise HTTPError(400, "the form has no image files")
    return files


def decode(name: str, data: bytes, max_pixels: int) -> np.ndarray:
    """An uploaded image as RGB; 413 over the pixel budget, 400 when it cannot be captioned."""
    try:
        return decode_image(data, name, max_pixels)
    except ImageTooLarge as e:
        raise HTTPError(413, str(e)) from None
    except DataError as e:
        raise HTTPError(400, str(e)) from None


@serve.deployment
@serve.ingress(app)
class CaptionServer:
    """One Captioner per replica; concurrent requests' images are captioned together in dynamic batches."""

    def __init__(self, captioner: dict, max_batch_size: int, batch_wait_ms: float, max_bytes: int,
                 capacity: int) -> None:
        """`captioner`: `Captioner.load` arguments; `capacity`: requests this replica holds at once before it
        answers 503; the rest as caption-serve's flags (whose defaults they are)."""
        self.captioner = Captioner.load(**captioner)
        self.name = captioner["folder"].name
        self.max_batch_size, self.max_bytes, self.capacity = max_batch_size, max_bytes, capacity
        self.caption_batched.set_max_batch_size(max_batch_size)
        self.caption_batched.set_batch_wait_timeout_s(batch_wait_ms / 1e3)
        self.in_flight, self.draining = 0, False
        key = DRAINING + serve.get_replica_context().app_name
        threading.Thread(target=self.watch_drain, args=(key,), name="drain-flag", daemon=True).start()

    def watch_drain(self, key: str) -> None:
        """Poll the stop flag until caption-serve sets it; from then on every request gets 503."""
        from ray.experimental.internal_kv import _internal_kv_get

        while not self.draining:
            time.sleep(DRAIN_POLL_S)
            self.draining = _internal_kv_get(key) is not None

    def check_draining(self) -> None:
        """503 + Retry-After once the service is stopping."""
        if self.draining:
            raise HTTPError(503, "the service is shutting down", RETRY)

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        """The page to try the model: one self-contained HTML document (no CDN, no build step)."""
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    def healthz(self) -> dict:
        self.check_draining()
        return {"status": "ok"}

    @app.get("/v1/model")
    def model(self) -> dict:
        m = self.captioner.manifest
        return {"model": self.name, "decoder": m.decoder, "encoder": m.source.encoder,
                "precision": self.captioner.precision, "precisions": sorted(m.graphs), "vocabulary": len(m.vocab),
                "image_size": m.preprocessing.size, "search": self.captioner.options.to_dict(),
                "tagger": m.has_tagger(self.captioner.precision), "labels": len(m.labels),
                "max_batch_size": self.max_batch_size, "max_bytes": self.max_bytes}

    @app.post("/v1/caption")
    async def caption(self, request: Request, beams: int | None = None, max_length: int | None = None,
                      n_best: int | None = None, tags: int = 0, attention: bool = False) -> dict:
        """Caption every image of the request; each answer carries its batch's size and per-image timings."""
        start = time.perf_counter()
        self.check_draining()
        if self.in_flight >= self.capacity:
            raise HTTPError(503, f"busy: {self.in_flight} requests are waiting on this replica", RETRY)
        if unknown := sorted(set(request.query_params) - set(QUERY)):
            raise HTTPError(422, f"unknown query parameter(s) {', '.join(unknown)}; /v1/caption takes "
                                 f"{', '.join(QUERY)}")
        self.in_flight += 1
        try:
            files = await read_images(request, self.max_bytes)
            options = self.search_options(beams, max_length, n_best)
            tags = self.tag_count(tags)
            images = [decode(name, data, self.captioner.max_pixels) for name, data in files]
            results = await asyncio.gather(*(self.caption_batched((rgb, options, tags)) for rgb in images))
        finally:
            self.in_flight -= 1
        return {"model": self.name, "search": options.name, "total_ms": round((time.perf_counter() - start) * 1e3, 3),
                "captions": [{"batch": batch, **caption.to_dict(batch, attention)} for caption, batch in results]}

    def search_options(self, beams: int | None, max_length: int | None, n_best: int | None) -> SearchOptions:
        """The replica's search defaults with the request's overrides; 422 when out of range."""
        overrides = {k: v for k, v in (("num_beams", beams), ("max_length", max_length),
                                       ("num_return_sequences", n_best)) if v is not None}
        if not overrides:
            return self.captioner.options
        try:
            check_limits(beams, max_length, QUERY[:2])
            return SearchOptions.from_dict({**self.captioner.options.to_dict(), **overrides})
        except (ValueError, EdgecapError) as e:
            raise HTTPError(422, str(e)) from None

    def tag_count(self, k: int) -> int:
        """The labels a request asks for; 422 past MAX_TAGS or for a model without a tagger graph."""
        if k > MAX_TAGS:
            raise HTTPError(422, f"tags must be between 0 and {MAX_TAGS}, got {k}")
        try:
            return tag_count(self.captioner.manifest, self.captioner.precision, k)
        except (DataError, ModelError) as e:
            raise HTTPError(422, str(e)) from None

    @serve.batch
    async def caption_batched(self, items: list[tuple[np.ndarray, SearchOptions, int]]) -> list[tuple[Caption, int]]:
        """One decoder pass per distinct search options and tag count in the batch. It runs on the replica's event loop: the
        requests that arrive meanwhile wait in the replica's queue and form the next batch (a worker thread
        would let them in sooner, but measured 2 ms slower per request, its Python fighting the loop's for the GIL)."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, options, tags) in enumerate(items):
            groups.setdefault((astuple(options), tags), []).append(i)
        results: list[tuple[Caption, int] | None] = [None] * len(items)
        for chosen in groups.values():
            _, options, tags = items[chosen[0]]
            captions = self.captioner.caption_batch([items[i][0] for i in chosen], options, tags)
            for i, caption in zip(chosen, captions):
                results[i] = (caption, len(chosen))
        return results
