"""A Ray cluster of several hosts on one Linux machine, for tests and benchmarks of the cluster path: each node in
its own network namespace (its own address, ports and loopback), joined by veth pairs to a bridge in a further
"lan" namespace, each running `ray start` with this environment. The machine's own network is not touched.
Needs root and iproute2; `close` (also on a failed start) kills every process in the namespaces and removes
them, and with them every interface and address they held.

  with NetnsCluster(workers=2) as cluster:
      subprocess.run(cluster.on("head", "caption-batch", "photos/", "-o", "out.jsonl", "--address", cluster.address))
      cluster.kill("w1")   # a host lost: every process in its namespace SIGKILLed
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgecap.runtime.errors import EdgecapError

PREFIX = "edgecap"            # namespaces: PREFIX + creator's pid + "." + serial + "-" + node: stale ones are found
SUBNET = "10.10.0"            # the lan's /24, private to these namespaces (.1 is unused, the head is .2)
GCS_PORT = 6379
SERIAL = itertools.count()    # clusters made by this process
# every node and driver in token mode, with Ray's token file (~/.ray/auth_token, made by the head's start when
# missing): these hosts share this machine's home; real ones each need a copy (or RAY_AUTH_TOKEN)
AUTH = {"RAY_AUTH_MODE": "token"}
# the GCS marks a lost node dead after 3 missed checks 1 s apart, sooner than with Ray's defaults
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                      "RAY_health_check_failure_threshold": "3"}


class ClusterError(EdgecapError):
    """The namespaces or a node could not be set up."""


@dataclass
class Node:
    name: str          # head, w1, w2, ...
    namespace: str
    address: str       # its IP on the lan
    temp_dir: Path     # ray start --temp-dir


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`; a failure is a ClusterError with ip's message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode:
        raise ClusterError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


def unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, a kernel or container that refuses), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "network namespaces need iproute2 (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    """Every network namespace `ip netns` lists."""
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def pids(namespace: str) -> list[int]:
    """The processes in a namespace, never the calling one (a driver on a host that kills what runs there)."""
    return [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split() if int(p) != os.getpid()]


def kill_all(namespace: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace until none is left (one forked meanwhile is taken next round)."""
    deadline = time.monotonic() + timeout
    while found := pids(namespace):
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise ClusterError(f"processes {found} in namespace {namespace} outlived SIGKILL")
        time.sleep(0.05)


def remove(namespace: str) -> None:
    """Kill what runs in a namespace and delete it (its interfaces go with it)."""
    kill_all(namespace)
    ip("netns", "del", namespace, check=False)


def reap_stale() -> None:
    """Remove the namespaces of an earlier process that died before it could (SIGKILLed pytest, say)."""
    for name in namespaces():
        if (m := re.fullmatch(rf"{PREFIX}(\d+)\.\d+-\w+", name)) and not Path(f"/proc/{m[1]}").exists():
            remove(name)


class NetnsCluster:
    """A head and `workers` worker nodes, each `num_cpus` logical CPUs, each in its namespace; `env` is added to
    every node's environment (Ray settings read at start, such as Serve's ingress)."""

    def __init__(self, workers: int = 2, num_cpus: int = 1, env: dict[str, str] | None = None,
                 ray: str | None = None) -> None:
        self.ray = ray or str(Path(sys.executable).parent / "ray")
        self.num_cpus, self.env = num_cpus, {**AUTH, **FAST_HEALTH_CHECKS, **(env or {})}
        self.tag = f"{PREFIX}{os.getpid()}.{next(SERIAL)}"
        self.lan = f"{self.tag}-lan"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        names = ["head", *(f"w{i}" for i in range(1, workers + 1))]
        self.nodes = {n: Node(n, f"{self.tag}-{n}", f"{SUBNET}.{i}", self.root / n) for i, n in enumerate(names, 2)}
        self.address = f"{self.nodes['head'].address}:{GCS_PORT}"

    def __enter__(self) -> NetnsCluster:
        try:
            self.create()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def create(self) -> None:
        """The lan namespace with its bridge, and each node's namespace: loopback up, eth0 on the bridge with the
        node's address and a default route (Ray finds a node's own address by routing towards the outside)."""
        reap_stale()
        ip("netns", "add", self.lan)
        ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
        ip("-n", self.lan, "link", "set", "br0", "up")
        for node in self.nodes.values():
            ip("netns", "add", node.namespace)
            ip("-n", node.namespace, "link", "set", "lo", "up")
            ip("-n", self.lan, "link", "add", node.name, "type", "veth", "peer", "name", "eth0",
               "netns", node.namespace)
            ip("-n", self.lan, "link", "set", node.name, "master", "br0", "up")
            ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", "eth0")
            ip("-n", node.namespace, "link", "set", "eth0", "up")
            ip("-n", node.namespace, "route", "add", "default", "dev", "eth0")

    def on(self, node: str, *argv: str) -> list[str]:
        """A command line that runs `argv` on `node` (in its namespace, with the nodes' environment)."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["ip", "netns", "exec", self.nodes[node].namespace, "env", *env, *argv]

    def start(self, names: list[str] | None = None) -> None:
        """`ray start` on the named nodes (default: all): the head first when it is one of them, then the workers
        together; then wait until the cluster has every node alive."""
        names = names or list(self.nodes)
        if "head" in names:
            self.ray_start(["head"])
        self.ray_start([n for n in names if n != "head"])
        self.wait_alive(len(self.nodes))

    def ray_start(self, names: list[str]) -> None:
        """`ray start` on these nodes at once; a ClusterError naming the first that failed."""
        starts = {}
        for name in names:
            node = self.nodes[name]
            role = (["--head", f"--port={GCS_PORT}", "--include-dashboard=false"] if name == "head"
                    else [f"--address={self.address}"])
            starts[name] = subprocess.Popen(
                self.on(name, self.ray, "start", *role, f"--node-ip-address={node.address}",
                        f"--num-cpus={self.num_cpus}", "--object-store-memory=100000000", f"--temp-dir={node.temp_dir}",
                        "--disable-usage-stats"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, proc in starts.items():
            out, err = proc.communicate(timeout=120)
            if proc.returncode:
                last = (err.strip() or out.strip() or f"exit {proc.returncode}").splitlines()[-1]
                raise ClusterError(f"ray start on {name} ({self.nodes[name].address}) failed: {last}")

    def alive(self) -> set[str]:
        """The addresses of the nodes the head's GCS counts alive (asked from the head's namespace, by a process
        that is no Ray driver: state 0 is ALIVE)."""
        probe = ("import sys; from ray._raylet import GcsClient; "
                 "print(*sorted(n.node_manager_address for n in GcsClient(address=sys.argv[1])"
                 ".get_all_node_info(timeout=5).values() if n.state == 0))")
        done = subprocess.run(self.on("head", sys.executable, "-c", probe, self.address), capture_output=True,
                              text=True, timeout=60)
        if done.returncode:
            raise ClusterError(f"cannot ask the head which nodes are alive: {done.stderr.strip().splitlines()[-1:]}")
        return set(done.stdout.split())

    def wait_alive(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(found := self.alive()) != count:
            if time.monotonic() > deadline:
                raise ClusterError(f"{count} nodes expected alive, the head counts {len(found)}: {sorted(found)}")
            time.sleep(0.5)

    def kill(self, node: str) -> None:
        """Lose a host: SIGKILL every process in its namespace (its Ray processes, and any command run there)."""
        kill_all(self.nodes[node].namespace)

    def restart(self) -> None:
        """Kill every node and start the cluster afresh (a new head has a new GCS: the workers must rejoin)."""
        for name in self.nodes:
            self.kill(name)
        self.start()

    def close(self) -> None:
        """Kill every process in the namespaces, delete them, remove the temp dirs; safe to call twice."""
        for namespace in [*(n.namespace for n in self.nodes.values()), self.lan]:
            if namespace in namespaces():
                remove(namespace)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What of this cluster is still there: namespaces, processes in them, the temp dir (for tests)."""
        left = [n for n in namespaces() if n.startswith(f"{self.tag}-")]
        left += [f"pid {p}" for n in left for p in pids(n)]
        return left + ([str(self.root)] if self.root.exists() else [])


def identify(pid: int) -> str:
    """The name of the namespace process `pid` runs in (its host); ClusterError when it is in none of them."""
    if not (name := ip("netns", "identify", str(pid)).stdout.strip()):
        raise ClusterError(f"process {pid} is in no named network namespace")
    return name
