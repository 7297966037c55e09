"""The Ray Serve deployment behind caption-serve: HTTP in, dynamic batches of images through one Captioner.

Routes: `POST /v1/caption` (raw `image/*` bytes, or a multipart form with one or more files; optional `beams` and
`max_length` query parameters), `GET /v1/model`, `GET /healthz`. Every error is `{"error": "<one line>"}` with
its status: 400 undecodable image, 413 too large, 415 wrong content type, 422 bad parameters; 503 (with
Retry-After) when the queue is full comes from Serve's backpressure before a request reaches a replica.
"""

import asyncio
import time
from dataclasses import astuple, dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile

from edgecap.runtime.captioner import Caption, Captioner
from edgecap.runtime.errors import DataError, EdgecapError
from edgecap.runtime.preprocess import decode_image
from edgecap.runtime.search import SearchOptions

MAX_BEAMS, MAX_LENGTH = 16, 100   # per-request search limits: a request cannot ask for unbounded work
MULTIPART = "multipart/form-data"

app = FastAPI(title="edgecap", summary="Image captioning on ONNX Runtime, served by Ray Serve")


@dataclass
class HTTPError(Exception):
    status: int
    message: str


@app.exception_handler(HTTPError)
async def http_error(_: Request, e: HTTPError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


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
    form = await request.form()
    files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise HTTPError(400, "the form has no image files")
    return files


def decode(name: str, data: bytes) -> np.ndarray:
    try:
        return decode_image(data, name)
    except DataError as e:
        raise HTTPError(400, str(e)) from None


@serve.deployment
@serve.ingress(app)
class CaptionServer:
    """One Captioner per replica; concurrent requests' images are captioned together in dynamic batches."""

    def __init__(self, captioner: dict, max_batch_size: int, batch_wait_ms: float, max_bytes: int) -> None:
        """`captioner`: `Captioner.load` arguments; the rest as caption-serve's flags (whose defaults they are)."""
        self.captioner = Captioner.load(**captioner)
        self.name = captioner["folder"].name
        self.max_batch_size, self.max_bytes = max_batch_size, max_bytes
        self.caption_batched.set_max_batch_size(max_batch_size)
        self.caption_batched.set_batch_wait_timeout_s(batch_wait_ms / 1e3)

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    def model(self) -> dict:
        m = self.captioner.manifest
        return {"model": self.name, "decoder": m.decoder, "encoder": m.source.encoder,
                "precision": self.captioner.precision, "precisions": sorted(m.graphs), "vocabulary": len(m.vocab),
                "image_size": m.preprocessing.size, "search": self.captioner.options.to_dict(),
                "max_batch_size": self.max_batch_size, "max_bytes": self.max_bytes}

    @app.post("/v1/caption")
    async def caption(self, request: Request, beams: int | None = None, max_length: int | None = None) -> dict:
        """Caption every image of the request; each answer carries its batch's size and per-image timings."""
        start = time.perf_counter()
        files = await read_images(request, self.max_bytes)
        options = self.search_options(beams, max_length)
        images = [decode(name, data) for name, data in files]
        results = await asyncio.gather(*(self.caption_batched((rgb, options)) for rgb in images))
        return {"model": self.name, "search": options.name, "total_ms": round((time.perf_counter() - start) * 1e3, 3),
                "captions": [{"batch": batch, **caption.to_dict(batch)} for caption, batch in results]}

    def search_options(self, beams: int | None, max_length: int | None) -> SearchOptions:
        """The replica's search defaults with the request's overrides; 422 when out of range."""
        if beams is not None and not 1 <= beams <= MAX_BEAMS:
            raise HTTPError(422, f"beams must be between 1 and {MAX_BEAMS}, got {beams}")
        if max_length is not None and not 1 <= max_length <= MAX_LENGTH:
            raise HTTPError(422, f"max_length must be between 1 and {MAX_LENGTH}, got {max_length}")
        overrides = {k: v for k, v in (("num_beams", beams), ("max_length", max_length)) if v is not None}
        if not overrides:
            return self.captioner.options
        try:
            return SearchOptions.from_dict({**self.captioner.options.to_dict(), **overrides})
        except (ValueError, EdgecapError) as e:
            raise HTTPError(422, str(e)) from None

    @serve.batch
    async def caption_batched(self, items: list[tuple[np.ndarray, SearchOptions]]) -> list[tuple[Caption, int]]:
        """One decoder pass per distinct search options in the batch. It runs on the replica's event loop: the
        requests that arrive meanwhile wait in the replica's queue and form the next batch (a worker thread
        would let them in sooner, but measured 2 ms slower per request, its Python fighting the loop's for the GIL)."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, options) in enumerate(items):
            groups.setdefault(astuple(options), []).append(i)
        results: list[tuple[Caption, int] | None] = [None] * len(items)
        for chosen in groups.values():
            captions = self.captioner.caption_batch([items[i][0] for i in chosen], items[chosen[0]][1])
            for i, caption in zip(chosen, captions):
                results[i] = (caption, len(chosen))
        return results
