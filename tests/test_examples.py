"""Each program in examples/ runs to completion and says what it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("embed.py", [], ["[hello] Hello from an lguest guest!", "[echo] pong", "[echo] bye"]),
        ("swarm.py", ["50"], ["50 guests in", "{'finished': 50}"]),
        ("custom_device.py", [], ["[guest] blockcopy ok", "sectors copied: True", "exit status 0"]),
        (
            "net_service.py",
            [],
            ["[host] sent pong, got pong", "[client] hello from a guest", "[echo] ended: status 0"],
        ),
        (
            "kv_store.py",
            [],
            [
                "[2] cut: the write to kv-a still waits: True",
                "[2] cut: GET color at kv-b: VALUE blue",
                "[2] healed: GET color at kv-b: VALUE green",
                "[2] healed: a guest reads kv-a: VALUE green",
                "[3] long cut: SET size 3 at kv-a: OK unreplicated",
                "[3] kv-a said: replica lost: Operation timed out",
                "kv-a has color=green size=3, kv-b has color=green\n",
            ],
        ),
        (
            "smp.py",
            [],
            ["snapshot of 4 CPUs taken mid-count", "[copy] exact", "[copy] exit status 0"],
        ),
    ],
)
def test_example(script: str, args: list[str], expected: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for text in expected:
        assert text in proc.stdout


def test_the_readmes_list_of_examples_names_every_example() -> None:
    """README's sentence "examples/ has ..." is where a newcomer finds them all."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("examples/ has ")
    listing = " ".join(readme[start : readme.index("\n\n", start)].split())
    names = [path.name for path in sorted((ROOT / "examples").glob("*.py"))]
    missing = [name for name in names if f"`{name}`" not in listing]
    assert not missing, f"README's examples/ paragraph does not name {missing}"
