"""Ray processes that tests start themselves, each Ray isolated and ended by process id.

Each Ray here has its own ``RAY_TMPDIR``, so it neither sees nor is seen by any other
Ray on the machine (a driver with no address joins the cluster ``ray start`` recorded
there), and is ended by process id: every process whose environment carries
:data:`MARKER` with its root (``ray stop`` would end every Ray on the machine, other
users' too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "LGUEST_TEST_RAY"  # environment variable naming the Ray a process belongs to
LIMIT = 120  # seconds for one command: a bound for failing, never a wait
TERM_GRACE = 0.5  # seconds the processes of a Ray ending get before the KILL


def ray_env(root: Path) -> dict[str, str]:
    """The environment of every process of the Ray rooted at ``root``: its own temporary
    directory (where ``ray start`` records the cluster a driver with no address joins),
    no inherited address or token, and the marker that finds its processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = str(root)
    env[MARKER] = str(root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def processes_of(root: Path) -> list[int]:
    """Ids of the live processes started for the Ray rooted at ``root``."""
    want = f"{MARKER}={root}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if want in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def end_ray(root: Path) -> None:
    """End every process of the Ray rooted at ``root`` (TERM, then KILL), by id.

    TERM gets :data:`TERM_GRACE`: Ray's GCS server (and a helper) outlast a TERM by
    seconds, so a longer grace only waits for the KILL; nothing of a test's Ray is
    kept (its root is removed)."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 3.0)):
        for pid in processes_of(root):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while processes_of(root) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not processes_of(root):
            break
    shutil.rmtree(root, ignore_errors=True)


def new_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="lgray-", dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT, check=False
    )


def ray(*args: str, env: dict[str, str]) -> None:
    done = run([sys.executable, "-m", "ray.scripts.scripts", *args], env)
    assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def token_env(root: Path) -> dict[str, str]:
    """:func:`ray_env` with token authentication as docs/cluster.md sets it up: the mode,
    and a token file of this Ray's own for every node and driver."""
    token = root / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = ray_env(root)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    return env


@contextlib.contextmanager
def head_node(cpus: int) -> Iterator[dict[str, str]]:
    """``ray start --head`` with ``cpus`` CPUs, ended on leaving: yields the environment
    in which a driver with no address (``Cluster()``, ``--cluster ray``) joins it."""
    root = new_root()
    try:
        env = token_env(root)
        ray(
            "start", "--head", f"--port={free_port()}", f"--num-cpus={cpus}",
            "--include-dashboard=false", "--disable-usage-stats", env=env,
        )  # fmt: skip
        yield env
    finally:
        end_ray(root)
