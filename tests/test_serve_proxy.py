"""caption-serve --ingress proxy, Serve's Python proxy (its own local Ray: the ingress is chosen when Ray
starts): captions equal to the API's, errors as one-line JSON, health."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
requests = pytest.importorskip("requests")

from edgecap.runtime.captioner import Captioner
from edgecap.runtime.preprocess import decode_image
from edgecap.scale import serve as caption_serve

from test_serve import TIMEOUT, free_port, jpegs, listener, post  # noqa: F401  (jpegs: the shared fixture)


@pytest.fixture(scope="module")
def service():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in caption_serve.INGRESS["proxy"].items():
            mp.setenv(name, value)  # as start() does; undone after the module for the others
        args = caption_serve.build_parser().parse_args(["--ingress", "proxy", "--port", str(free_port()),
                                                        "--threads", "1"])
        yield caption_serve.start(args)
        ray.shutdown()


def test_serves_proxy_answers_not_haproxy(service):
    assert listener(service).startswith("ray::ProxyActor")


def test_proxy_ingress_serves_the_same_captions(service, jpegs):
    captioner = Captioner.load(threads=1)
    for data in jpegs[:3]:
        r = post(service, data)
        assert r.status_code == 200 and r.json()["captions"][0]["caption"] == captioner.caption(decode_image(data)).text
    bad = post(service, b"not an image")
    assert bad.status_code == 400 and bad.json() == {"error": "not a readable image: request body"}
    assert requests.get(f"{service}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
