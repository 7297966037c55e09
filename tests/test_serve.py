"""caption-serve on a local Ray (2 CPUs, loopback): parity with the API under concurrent load, dynamic batching,
every error status as one-line JSON (a decompression bomb included), overload answered with 503 + Retry-After
while the service stays healthy, and a drain that finishes the requests in flight while refusing new ones."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

from conftest import black_png, drawn_scenes

from edgecap.runtime.captioner import Captioner
from edgecap.runtime.preprocess import decode_image
from edgecap.scale import serve as caption_serve
from edgecap.train.synthetic import SyntheticSplit

IMAGES, REQUESTS, CLIENTS = 12, 100, 8
TIMEOUT = 60  # seconds per HTTP request: no test waits forever


def bad_model(folder: Path) -> Path:
    """A model folder whose manifest lacks most of its keys."""
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format_version": 1}')
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    """One local Ray (with the default ingress; 2 cores, 6 logical CPUs for the extra applications' one-thread
    replicas) and one caption-serve (bundled model, batches up to 8, 200 kB limit) for the module; the
    environment start() sets for the ingress is restored after."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in caption_serve.INGRESS[caption_serve.build_parser().get_default("ingress")].items():
            mp.setenv(name, value)
        ray.init(num_cpus=6, include_dashboard=False)
        args = caption_serve.build_parser().parse_args(
            ["--port", str(free_port()), "--threads", "1", "--max-bytes", "200000", "--batch-wait-ms", "20"])
        yield caption_serve.start(args)
        ray.shutdown()  # with the applications on it


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    split = SyntheticSplit("test", IMAGES, image_size=112)
    return [cv2.imencode(".jpg", cv2.cvtColor(split.image(i), cv2.COLOR_RGB2BGR))[1].tobytes()
            for i in range(IMAGES)]


def listener(url: str) -> str:
    """The name (comm) of the process that listens on the URL's port: which ingress answers."""
    port = int(url.rsplit(":", 1)[1])
    inodes = {f"socket:[{fields[9]}]" for table in ("/proc/net/tcp", "/proc/net/tcp6") if Path(table).exists()
              for fields in (line.split() for line in Path(table).read_text().splitlines()[1:])
              if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A"}  # 0A: LISTEN
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) in inodes:
                return (fd.parent.parent / "comm").read_text().strip()
        except OSError:  # a process or descriptor that went away meanwhile
            continue
    raise AssertionError(f"nothing listens on {url}")


def post(url: str, data: bytes, kind: str = "image/jpeg", session=requests, **params):
    return session.post(f"{url}/v1/caption", data=data, headers={"Content-Type": kind}, params=params,
                        timeout=TIMEOUT)


def test_the_default_ingress_is_haproxy(service):
    assert caption_serve.build_parser().get_default("ingress") == "haproxy" and listener(service) == "haproxy"


def test_concurrent_requests_match_the_api_and_are_batched(service, jpegs):
    url = service
    expected = [Captioner.load(threads=1).caption(decode_image(j)).text for j in jpegs]

    def client(k: int) -> list[tuple[int, int, dict]]:
        with requests.Session() as session:
            return [(i % IMAGES, (r := post(url, jpegs[i % IMAGES], session=session)).status_code, r.json())
                    for i in range(k, REQUESTS, CLIENTS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for part in pool.map(client, range(CLIENTS)) for a in part]
    assert len(answers) == REQUESTS
    assert all(status == 200 for _, status, _ in answers), {s for _, s, _ in answers}
    assert [body["captions"][0]["caption"] for _, _, body in answers] == [expected[i] for i, _, _ in answers]
    assert max(body["captions"][0]["batch"] for _, _, body in answers) > 1  # requests shared decoder calls
    timings = answers[0][2]["captions"][0]["timings"]
    assert {"encoder_ms", "decoder_ms", "total_ms"} <= set(timings)


def test_multipart_query_parameters_and_model_summary(service, jpegs):
    url = service
    files = [("files", (f"scene{i}.jpg", jpegs[i], "image/jpeg")) for i in range(3)]
    r = requests.post(f"{url}/v1/caption", files=files, params={"beams": 1, "max_length": 12}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    captioner = Captioner.load(threads=1, num_beams=1, max_length=12)
    assert body["search"] == "greedy"
    assert [c["caption"] for c in body["captions"]] == [captioner.caption(decode_image(j)).text for j in jpegs[:3]]
    model = requests.get(f"{url}/v1/model", timeout=TIMEOUT).json()
    assert model["model"] == "flickr8k-lite1" and model["decoder"] == "attention" and model["max_batch_size"] == 8
    assert requests.get(f"{url}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}


def test_tags_attention_and_n_best_in_the_api(service, jpegs):
    url = service
    r = post(url, jpegs[0], tags=3, attention=1, n_best=2)
    assert r.status_code == 200, r.text
    got = r.json()["captions"][0]
    want = Captioner.load(threads=1, tags=3, num_return_sequences=2).caption(decode_image(jpegs[0]))
    assert got["caption"] == want.text and [a["caption"] for a in got["alternatives"]] == [t for t, _ in want.alternatives]
    assert [(t["label"], t["probability"]) for t in got["tags"]] == want.tags
    assert got["attention"]["grid"] == [8, 8] and len(got["attention"]["words"]) == len(got["words"])  # Lite1: 240 px
    for word in got["attention"]["words"]:
        assert abs(sum(map(sum, word)) - 1) < 3e-3  # rounded to 4 places
    plain = post(url, jpegs[0]).json()["captions"][0]
    assert "tags" not in plain and "attention" not in plain and "alternatives" not in plain
    model = requests.get(f"{url}/v1/model", timeout=TIMEOUT).json()
    assert model["tagger"] is True and model["labels"] == 1000
    refused = post(url, jpegs[0], tags=21)
    assert refused.status_code == 422 and refused.json() == {"error": "tags must be between 0 and 20, got 21"}


@pytest.mark.parametrize("case, status, message", [
    ("corrupt", 400, "not a readable image"),
    ("too large", 413, "200000-byte limit"),
    ("bomb", 413, "over the 100,000,000-pixel limit (--max-pixels)"),
    ("text", 415, "Content-Type: image/*"),
    ("beams=0", 422, "beams must be between 1 and 16"),
    ("beams=abc", 422, "beams"),
    ("unknown parameter", 422, "unknown query parameter(s) beam, size; /v1/caption takes beams, max_length"),
    ("empty form", 400, "no image files"),
    ("form without boundary", 400, "not a readable multipart/form-data body"),
    ("no such route", 404, "Not Found: GET /v1/captions"),
    ("wrong method", 405, "Method Not Allowed: GET /v1/caption"),
])
def test_errors_answer_one_line_json_and_the_replica_keeps_serving(service, jpegs, case, status, message):
    url = service
    r = {"corrupt": lambda: post(url, b"\xff\xd8 not really a jpeg"),
         "too large": lambda: post(url, np.random.default_rng(0).bytes(300_000)),
         "bomb": lambda: post(url, black_png(20_000, 20_000), "image/png"),
         "text": lambda: post(url, b"hello", "text/plain"),
         "beams=0": lambda: post(url, jpegs[0], beams=0),
         "beams=abc": lambda: post(url, jpegs[0], beams="abc"),
         "unknown parameter": lambda: post(url, jpegs[0], beam=3, size=2),
         "empty form": lambda: requests.post(f"{url}/v1/caption", files={"note": (None, "no file")},
                                             timeout=TIMEOUT),
         "form without boundary": lambda: post(url, b"--x\r\n", "multipart/form-data"),
         "no such route": lambda: requests.get(f"{url}/v1/captions", timeout=TIMEOUT),
         "wrong method": lambda: requests.get(f"{url}/v1/caption", timeout=TIMEOUT)}[case]()
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    assert list(r.json()) == ["error"] and message in r.json()["error"] and "\n" not in r.json()["error"], r.text
    assert post(url, jpegs[1]).status_code == 200


def test_overload_gets_503_with_retry_after_and_the_service_recovers(service, jpegs):
    """A second application (made by the builder Serve config files use) whose replica holds at most 17 requests
    (16 working, 1 queued): 24 at once overflow it, and the replica itself answers the rest 503 JSON."""
    url = service
    app = caption_serve.build({"threads": "1", "max_batch_size": "1", "max-queued": "1"})
    serve.run(app, name="overload", route_prefix="/overload")
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: post(f"{url}/overload", jpegs[2]), range(24)))
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {200, 503}, statuses
    refused = [r for r in answers if r.status_code == 503]
    assert all(r.headers.get("Retry-After") == "1" and r.json()["error"].startswith("busy: ") for r in refused)
    assert post(f"{url}/overload", jpegs[2]).status_code == 200
    serve.delete("overload", _blocking=False)


def test_a_drain_finishes_requests_in_flight_and_refuses_new_ones_with_503(service, jpegs):
    """Slow requests (8 images at beam 16, one at a time) are in flight when the drain starts: each gets its
    captions, a request sent meanwhile gets 503 JSON + Retry-After, and the drain returns once they are done."""
    url = f"{service}/drain"
    serve.run(caption_serve.build({"threads": "1", "max_batch_size": "1"}), name="drain", route_prefix="/drain")
    files = [("files", (f"{i}.jpg", jpegs[i], "image/jpeg")) for i in range(8)]
    slow = lambda _: (requests.post(f"{url}/v1/caption", files=files, params={"beams": 16}, timeout=TIMEOUT),
                      time.monotonic())
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(slow, k) for k in range(4)]
        time.sleep(0.5)
        drained: list[tuple[int, float]] = []
        drainer = threading.Thread(target=lambda: drained.append((caption_serve.drain(30, "drain"), time.monotonic())))
        drainer.start()
        time.sleep(0.5)
        late = post(url, jpegs[0])
        drainer.join(timeout=60)
        answers = [f.result() for f in in_flight]
    assert late.status_code == 503 and late.headers.get("Retry-After") == "1", late.text
    assert late.json() == {"error": "the service is shutting down"}
    assert [r.status_code for r, _ in answers] == [200] * 4 and all(len(r.json()["captions"]) == 8 for r, _ in answers)
    left, finished = drained[0]
    assert left == 0 and finished > max(t for _, t in answers) - 0.25  # it waited for them (give or take a reply)
    serve.delete("drain", _blocking=False)


def test_a_killed_replica_loses_no_request(service, jpegs):
    """Two replicas under a bounded load (96 requests from 4 clients, keep-alive); one is SIGKILLed a second in:
    every request is answered, 200 (retried on the live replica) or 503 JSON + Retry-After; none is reset."""
    url = f"{service}/crash"
    serve.run(caption_serve.build({"threads": "1", "replicas": "2"}), name="crash", route_prefix="/crash")
    victim = ray.get(next(caption_serve.replicas("crash")).__ray_call__.remote(lambda _: os.getpid()))

    def client(k: int) -> list:
        with requests.Session() as session:
            answers = []
            for i in range(k, 96, 4):
                try:
                    answers.append(post(url, jpegs[i % IMAGES], session=session))
                except requests.ConnectionError as e:
                    answers.append(e)
            return answers

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, k) for k in range(4)]
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        answers = [a for f in futures for a in f.result()]
    serve.delete("crash", _blocking=False)
    resets = [a for a in answers if isinstance(a, Exception)]
    assert not resets, resets
    assert {a.status_code for a in answers} <= {200, 503}, [a.text for a in answers if a.status_code not in (200, 503)]
    assert all(a.headers.get("Retry-After") and set(a.json()) == {"error"} for a in answers if a.status_code == 503)


def page_helpers():
    """docs/page_screenshot.py: headless Chromium through selenium, and the page's upload step."""
    spec = importlib.util.spec_from_file_location("page_screenshot", Path(__file__).resolve().parents[1] / "docs"
                                                  / "page_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def browser():
    page = page_helpers()
    if page.find_chromium() is None:
        pytest.skip("no chromium and chromedriver on PATH (.ci/run installs Debian's chromium and chromium-driver)")
    pytest.importorskip("selenium")
    with page.chromium() as driver:
        yield page, driver


def test_the_page_in_a_real_browser(service, browser, tmp_path):
    """GET / in headless Chromium: upload a drawn photo, get the API's caption, n-best and tags; a word's attention
    map drawn over the photo; the server's error line for a corrupt file; a message when the server is gone."""
    from selenium.webdriver.common.by import By

    page, driver = browser
    url = service
    photo = tmp_path / "scene.png"
    cv2.imwrite(str(photo), cv2.cvtColor(drawn_scenes()[3], cv2.COLOR_RGB2BGR))
    want = Captioner.load(threads=1, tags=5, num_return_sequences=3).caption(photo.read_bytes())  # the page's asks
    page.open_page(driver, f"{url}/")
    card = driver.find_element(By.ID, "card").text
    assert "efficientnet-lite1" in card and "240 px" in card
    assert page.upload(driver, photo) == "done", driver.find_element(By.ID, "error").text
    text = lambda css: [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]
    assert driver.find_element(By.ID, "caption").text == want.text
    assert driver.find_element(By.ID, "photo").get_attribute("alt") == want.text
    assert text(".word") == want.words
    assert [line.rsplit(" ", 1)[0].strip() for line in text("#nbest li")] == [t for t, _ in want.alternatives]
    assert text("#tags li span:first-child") == [label for label, _ in want.tags]
    assert "encoder" in driver.find_element(By.ID, "timings").text

    overlay = driver.find_element(By.ID, "overlay")
    pixels = lambda: driver.execute_script("return arguments[0].toDataURL()", overlay)
    blank = pixels()
    words = driver.find_elements(By.CSS_SELECTOR, ".word")
    other = int(np.abs(want.attention[: len(want.words)] - want.attention[0]).sum(1).argmax())  # looked elsewhere
    words[0].click()
    first = pixels()
    assert first != blank and overlay.get_attribute("data-word") == want.words[0]
    words[other].click()
    assert pixels() not in (blank, first) and overlay.get_attribute("data-word") == want.words[other]

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    server = post(url, broken.read_bytes())
    assert page.upload(driver, broken) == "error"
    assert driver.find_element(By.ID, "error").text == f"{server.status_code}: {server.json()['error']}"

    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                                                                "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        assert page.upload(driver, photo) == "error"
        assert driver.find_element(By.ID, "error").text.startswith("the server does not answer")
    finally:
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                                    "downloadThroughput": -1, "uploadThroughput": -1})


def test_a_bad_model_folder_is_one_line_before_ray_starts(tmp_path, capsys):
    t0 = time.monotonic()
    assert caption_serve.main(["--model", str(bad_model(tmp_path / "bad")), "--port", str(free_port())]) == 2
    assert time.monotonic() - t0 < 5  # no replica was started
    [line] = [line for line in capsys.readouterr().err.splitlines() if "caption-serve" in line]  # not the Ray logs
    assert line.startswith("caption-serve: error: manifest: missing key(s) ['decoder'")


def test_bad_flags_are_one_line_errors(capsys):
    assert caption_serve.main(["--replicas", "0"]) == 2
    assert capsys.readouterr().err.strip().endswith("--replicas must be at least 1, got 0")


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert caption_serve.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"caption-serve: error: cannot listen on 127.0.0.1:{port}") and "--port" in err
