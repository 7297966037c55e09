"""caption-batch and caption-serve on a real three-node Ray cluster on this machine (edgecap.scale.netns: a head
and two workers, each host in its own network namespace with its own address, each running `ray start`), one
cluster for the module: work spread over every node, exactly once; a worker host killed in the middle of a
batch job and of a served load; a rerun after the head host died; an image only the driver can read; and the
namespaces, interfaces and processes all gone afterwards. Skipped with the reason where namespaces cannot be
made (not root); CI runs as root."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import write_scenes  # noqa: E402
from test_batch import rows  # noqa: E402

from edgecap.scale import netns  # noqa: E402
from edgecap.scale.serve import INGRESS  # noqa: E402

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no cluster of network namespaces here: {REASON}")

N = 240  # images of the batch jobs, 30 batches of 8
BIN = Path(sys.executable).parent
SERVE_LOAD = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"
TIMEOUT = 240  # seconds for any one command: no test waits forever


@pytest.fixture(scope="module")
def cluster():
    """Head + 2 workers with caption-serve's default ingress (HAProxy) in the nodes' environment; 2 logical CPUs
    each, so that three actors or two replicas could pack onto fewer nodes, and are seen to spread."""
    with netns.NetnsCluster(workers=2, num_cpus=2, env=INGRESS["haproxy"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_scenes(tmp_path_factory.mktemp("photos"), N)


@pytest.fixture(scope="module")
def expected(folder) -> dict[str, str]:
    """caption-run's caption of each image, by path."""
    done = subprocess.run([str(BIN / "caption-run"), str(folder), "--json", "--quiet", "--threads", "1"],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return {(r := json.loads(line))["source"]: r["caption"] for line in done.stdout.splitlines()}


def caption_batch(cluster: netns.NetnsCluster, *argv: str) -> subprocess.Popen:
    """caption-batch run on the head host, joining the cluster, with 3 one-thread actors (of 6 CPUs)."""
    return subprocess.Popen(cluster.on("head", str(BIN / "caption-batch"), *argv, "--actors", "3", "--address",
                                       cluster.address), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[str, list[str]]:
    """Wait for a command: its stdout, and its stderr's lines (progress bar updates split apart)."""
    out, err = proc.communicate(timeout=TIMEOUT)
    return out, [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


def when_rows(out: Path, proc: subprocess.Popen, count: int) -> int:
    """Wait until `out` holds at least `count` whole rows (the job is under way); how many it holds."""
    deadline = time.monotonic() + TIMEOUT
    while (done := out.read_text().count("\n") if out.exists() else 0) < count:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    return done


def exactly_once(out: Path, images: list[Path], expected: dict[str, str]) -> None:
    got = rows(out)
    assert sorted(r["path"] for r in got) == sorted(map(str, images))  # each once, none missing
    assert {r["path"]: r["caption"] for r in got} == expected


def test_a_failed_start_leaves_nothing():
    broken = netns.NetnsCluster(workers=1, ray="/bin/false")
    with pytest.raises(netns.ClusterError, match=r"^ray start on head \(10\.10\.0\.2\) failed: exit 1$"):
        with broken:
            pass
    assert broken.leftovers() == []


def test_three_hosts_with_their_own_addresses(cluster):
    addresses = {n.address for n in cluster.nodes.values()}
    assert cluster.alive() == addresses == {"10.10.0.2", "10.10.0.3", "10.10.0.4"}
    for node in cluster.nodes.values():
        assert f"inet {node.address}/24" in netns.ip("-n", node.namespace, "-4", "addr").stdout
        assert netns.pids(node.namespace)  # its Ray processes run in its namespace


def test_batch_spreads_over_every_node_exactly_once(cluster, folder, expected, tmp_path):
    out = tmp_path / "captions.jsonl"
    stdout, err = finish(proc := caption_batch(cluster, str(folder), "-o", str(out), "--batch-size", "8"))
    assert proc.returncode == 0, err[-5:]
    exactly_once(out, list(folder.iterdir()), expected)
    [closing] = [line for line in err if " rows written to " in line]
    shares = dict(re.findall(r"(10\.10\.0\.\d+): (\d+)", closing))
    assert f"{N} rows written" in closing and " with 3 actor(s) on 3 node(s) " in closing, closing
    assert set(shares) == {n.address for n in cluster.nodes.values()} and all(int(n) for n in shares.values())
    assert stdout == "" and all(line.startswith("caption-batch: ") for line in err), err  # no Ray noise


def test_an_image_only_the_driver_can_read_is_an_error_row_naming_the_node(cluster, folder, expected, tmp_path):
    """The driver runs in a mount namespace of its own with a tmpfs holding six images: no node sees them. A
    file:// URI of an image every node reads is captioned through pyarrow's file system."""
    private, out, uri = tmp_path / "driver-only", tmp_path / "captions.jsonl", f"file://{folder}/scene010.jpg"
    private.mkdir()
    script = 'mount -t tmpfs tmpfs "$1" && cp "$2"/scene00[0-5].jpg "$1" && shift 2 && exec "$@"'
    proc = subprocess.Popen(cluster.on("head", "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                                       "sh", str(private), str(folder), str(BIN / "caption-batch"), str(private), uri,
                                       "-o", str(out), "--batch-size", "1", "--actors", "3", "--address", cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = finish(proc)
    assert proc.returncode == 1, err[-5:]
    got = {r["path"]: r for r in rows(out)}
    assert sorted(got) == sorted([*(f"{private}/scene00{i}.jpg" for i in range(6)), uri])
    assert got.pop(uri)["caption"] == expected[f"{folder}/scene010.jpg"]
    addresses = "|".join(re.escape(n.address) for n in cluster.nodes.values())
    for path, row in got.items():
        assert re.fullmatch(rf"image not found: {re.escape(path)} \(read on node ({addresses})\)", row["error"]), row
    assert not any(private.iterdir())  # the images never were on the hosts' file system


def test_batch_finishes_exactly_once_when_a_worker_host_is_killed(cluster, folder, expected, tmp_path):
    out = tmp_path / "captions.jsonl"
    proc = caption_batch(cluster, str(folder), "-o", str(out), "--batch-size", "8")
    at_kill = when_rows(out, proc, 16)
    cluster.kill("w2")
    stdout, err = finish(proc)
    assert at_kill < N and proc.returncode == 0, err[-5:]
    exactly_once(out, list(folder.iterdir()), expected)
    [lost] = [line for line in err if "lost" in line]
    assert lost == (f"caption-batch: lost node(s) {cluster.nodes['w2'].address} during the run: the batches they "
                    "had were captioned again on the others")
    assert stdout == "" and all(line.startswith("caption-batch: ") for line in err), err


def test_a_rerun_after_the_head_host_is_killed_resumes(cluster, folder, expected, tmp_path):
    """The head host dies with the driver on it (100 of the images); the cluster is started again and the same
    command resumes."""
    out, images = tmp_path / "captions.jsonl", sorted(folder.glob("scene0*.jpg"))
    proc = caption_batch(cluster, f"{folder}/scene0*.jpg", "-o", str(out), "--batch-size", "8")
    when_rows(out, proc, 16)
    cluster.kill("head")
    assert proc.wait(timeout=TIMEOUT) == -9
    kept = out.read_text().count("\n")  # whole rows: a line the kill cut is redone
    assert 0 < kept < len(images) == 100
    cluster.restart()
    _, err = finish(proc := caption_batch(cluster, f"{folder}/scene0*.jpg", "-o", str(out), "--batch-size", "8"))
    assert proc.returncode == 0, err[-5:]
    assert any(f"{kept} of 100 images already in {out}; captioning the rest" in line for line in err), err
    exactly_once(out, images, {str(p): expected[str(p)] for p in images})


def test_serve_keeps_answering_when_a_replica_host_is_killed(cluster, tmp_path):
    """caption-serve --replicas 2 spread over two hosts, 240 requests from 4 clients on the head host; the host of
    a replica on a worker is killed 1.5 s in (benchmarks/serve_load.py's crash run, on the cluster)."""
    report = tmp_path / "crash.json"
    done = subprocess.run(cluster.on("head", sys.executable, str(SERVE_LOAD), "--address", cluster.address,
                                     "--replicas", "2", "--threads", "1", "--count", "12", "--kill-replica-at", "1.5",
                                     "--kill-host", "--kill-load", "240", "4", "--json", str(report)),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    crash = json.loads(report.read_text())["crash"]
    before, after, killed = crash["replica_hosts_before"], crash["replica_hosts_after"], crash["killed_node"]
    assert len(set(before)) == 2 and killed in before and killed != cluster.nodes["head"].address  # spread
    assert len(after) == 2 and killed not in after and set(after) <= cluster.alive()  # capacity came back
    assert crash["recovery_s"] is not None and crash["answered_after_kill"] > 0
    outcomes = crash["outcomes"]
    assert sum(outcomes.values()) == 240
    assert set(outcomes) <= {"200", "503 json retry-after"}, outcomes  # no reset, no plain-text 500, no wrong caption


def test_teardown_leaves_no_namespace_interface_or_process(cluster):
    """Nothing listed, and no process left in any of the hosts' network namespaces (a process would keep its
    namespace, with the interfaces in it, alive unlisted)."""
    names = [n.namespace for n in cluster.nodes.values()] + [cluster.lan]
    inodes = {Path(f"/run/netns/{name}").stat().st_ino for name in names}
    inside = lambda: [p for p in Path("/proc").glob("[0-9]*") if network_namespace(p) in inodes]
    assert len(inodes) == len(names) and inside()  # the hosts' Ray processes are found this way
    cluster.close()
    assert cluster.leftovers() == [] and not set(names) & set(netns.namespaces())
    assert inside() == []


def network_namespace(process: Path) -> int | None:
    try:
        return (process / "ns" / "net").stat().st_ino
    except OSError:  # a process that ended meanwhile, or a zombie
        return None
