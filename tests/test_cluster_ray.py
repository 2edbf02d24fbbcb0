"""supervisor.cluster against real Ray processes that the tests start themselves.

* A local ``Cluster()`` starts its own Ray without Ray's token warning on stderr.
* A two-node cluster on this machine: ``ray start --head`` and a second ``ray start
  --address=...`` node, one CPU each, with token authentication as docs/cluster.md sets
  it up (``RAY_AUTH_MODE=token`` and a token file for every node and driver).  The CLI
  (``--cluster ray`` on the head, ``--cluster HOST:PORT``), the library
  (``Cluster(address=...)``) and Ray Client (``ray://HOST:PORT``) each place a worker
  on each node (Ray's node ids) and move a guest from one node to the other.

Every driver runs in a process of its own, as a user's would: Ray keeps its token and
its connection per process.  Each Ray here is isolated and ended by process id
(tests/rayprocs.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rayprocs import end_ray, free_port, new_root, ray, ray_env, run, token_env

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"

pytestmark = [pytest.mark.one_loop, pytest.mark.slow]


# -- a local Cluster() -------------------------------------------------------------------------
LOCAL_DRIVER = """
import asyncio
from supervisor.cluster import Cluster

async def main():
    async with Cluster(workers=1) as cl:
        print("workers", len(cl.workers))

asyncio.run(main())
"""


def test_a_local_cluster_starts_without_the_token_warning() -> None:
    pytest.importorskip("ray")
    root = new_root()
    env = ray_env(root)
    env["HOME"] = str(root / "home")  # Ray keeps its token in ~/.ray: this test's own
    try:
        done = run([sys.executable, "-c", LOCAL_DRIVER], env)
    finally:
        end_ray(root)
    assert done.returncode == 0, done.stderr
    assert "workers 1" in done.stdout
    assert "Started a local Ray instance" in done.stderr  # a Ray of its own, not joined
    assert "token authentication" not in done.stderr.lower(), done.stderr


# -- a two-node cluster --------------------------------------------------------------------------
@dataclass
class TwoNodes:
    env: dict[str, str]  # a driver's environment: the token set up as docs/cluster.md says
    gcs: str  # HOST:PORT of the head
    client: str  # ray://HOST:PORT of the head's Ray Client server


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    """``ray start --head`` and a second node, one CPU each; ended at the module's end."""
    pytest.importorskip("ray")
    root = new_root()
    env = token_env(root)
    gcs, client = free_port(), free_port()
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        ray(
            "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
            "--include-dashboard=false", *common, env=env,
        )  # fmt: skip
        ray("start", f"--address=127.0.0.1:{gcs}", *common, env=env)
        yield TwoNodes(env, f"127.0.0.1:{gcs}", f"ray://127.0.0.1:{client}")
    finally:
        end_ray(root)


def _worker_rows(out: str) -> list[list[str]]:
    """The workers table's rows: name, node address, node id prefix, pid, placed, state."""
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 5 and re.fullmatch(r"w\d+", cells[0]):
            address, node_id = cells[1].split()
            rows.append([cells[0], address, node_id, *cells[2:]])
    return rows


# One driver per address form by default (the CLI joining the cluster `ray start` made,
# the library at HOST:PORT); the other two (the CLI at HOST:PORT, Ray Client) in the soak
# run: each driver is a process of its own that connects and starts two workers.
@pytest.mark.parametrize("where", ["ray", pytest.param("address", marks=pytest.mark.soak)])
def test_the_cli_places_a_worker_on_each_node(two_nodes: TwoNodes, where: str) -> None:
    """``--cluster ray`` on the head joins the cluster ``ray start`` started (not a Ray of
    its own, and without passing it a CPU count, which Ray refuses); HOST:PORT names it."""
    address = "ray" if where == "ray" else two_nodes.gcs
    argv = [sys.executable, "-m", "supervisor", "swarm", "-n", "4", str(GUESTS / "counter.img")]
    argv += ["--memory", "1M", "--cmdline", "lines=3 spin=1000"]
    done = run([*argv, "--cluster", address, "--workers", "2"], two_nodes.env)
    assert done.returncode == 0, done.stderr
    assert "Connecting to existing Ray cluster" in done.stderr
    rows = _worker_rows(done.stdout)
    assert [row[0] for row in rows] == ["w0", "w1"]
    assert len({row[2] for row in rows}) == 2  # two nodes
    assert all(row[-1] == "alive" for row in rows)
    assert sum(int(row[4]) for row in rows) == 4


@pytest.mark.parametrize("via", ["address", pytest.param("client", marks=pytest.mark.soak)])
def test_the_library_moves_a_guest_between_the_nodes(two_nodes: TwoNodes, via: str) -> None:
    """``Cluster(address=HOST:PORT)`` and Ray Client (``ray://``): a worker on each node,
    and a guest moved from one to the other, exact."""
    address = two_nodes.gcs if via == "address" else two_nodes.client
    done = run([sys.executable, __file__, address], two_nodes.env)
    if via == "client" and done.returncode != 0 and "client server failed" in done.stderr:
        # Ray's client proxy starts a server per client; a start that fails is retried
        # by the next connection, as a user would retry.
        done = run([sys.executable, __file__, address], two_nodes.env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["alive_nodes"]) == 2
    assert sorted(report["worker_nodes"]) == sorted(report["alive_nodes"])
    assert report["moved"] == ["w0", "w1"]
    lines, spin = 6, 300_000
    assert report["console"] == [
        *map(str, range(1, lines + 1)),
        f"count {lines * spin} {lines * spin}",
    ]
    assert report["ok"] and report["moves"] == 1


async def _drive(address: str) -> dict[str, Any]:
    """A driver on the cluster at ``address``: a guest started on w0, moved to w1."""
    import ray

    from supervisor import GuestConfig
    from supervisor.cluster import Cluster

    config = GuestConfig(image=GUESTS / "counter.img", memory="1M", cmdline="lines=6 spin=300000")
    async with Cluster(address=address, workers=2) as cl:
        alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        first, second = cl.workers
        guest = await cl.launch(config, worker=first)
        console = [await anext(guest.console)]
        where = [guest.worker.name]
        where.append((await cl.migrate(guest, second)).name)
        console += [line async for line in guest.console]
        end = await guest.wait()
        return {
            "alive_nodes": alive,
            "worker_nodes": [w.node_id for w in cl.workers],
            "moved": where,
            "console": console,
            "ok": end.ok,
            "moves": guest.moves,
        }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_drive(sys.argv[1]))))
