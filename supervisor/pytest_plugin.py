"""A pytest plugin for people who test guests (registered as ``pytest11: lguest``).

Fixtures:

``lguest_device``
    An open :class:`~supervisor.LguestDevice`, closed after the test.
``lguest_supervisor``
    A :class:`~supervisor.Supervisor`; guests still running after the test are killed.
``lguest_net_supervisor``
    A :class:`~supervisor.Supervisor` whose guests join its network (``sup.net``)
    unless their config says ``net=False``.  The marker
    ``@pytest.mark.lguest_network(**options)`` passes ``options`` (``seed``,
    ``stream_timeout``, ``connect_timeout``, ...) to the
    :class:`~supervisor.net.Network` it is made with.  Under
    ``lguest_deterministic`` its network draws its faults from the test's seed and
    runs on the virtual clock, as a deterministic Supervisor's default network does.
``build_guest``
    ``build_guest(source, lang="c", flags=()) -> pathlib.Path``: build a guest
    image from source text, C (with :mod:`supervisor.sdk`: musl, ``lguest.h``)
    or ``"asm"`` (a :mod:`supervisor.testing` body starting at ``main``).
    Images are cached by content in pytest's cache directory, so a source is
    built once across tests and runs.  Without a toolchain the test is skipped
    with the reason (what to install).

Deterministic tests (docs/determinism.md): mark a test
``@pytest.mark.lguest_deterministic`` (or ``lguest_deterministic(seed=N)``) and its
``lguest_device`` / ``lguest_supervisor`` / ``lguest_net_supervisor`` run on virtual time
with a seeded schedule.
Without a seed in the marker the seed is ``--lguest-seed N`` if given, else a random
one.  A failing deterministic test's report has a section "lguest" naming the seed
that reproduces it and how to pass it, as hypothesis prints its falsifying example.

The async fixtures are ``pytest_asyncio`` fixtures, so they work in both
``asyncio_mode = "strict"`` and ``"auto"`` (in strict mode mark the tests
``@pytest.mark.asyncio``); they run on the test's own event loop.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from . import sdk, testing
from .config import GuestConfig
from .device import LguestDevice
from .host import Guest, Supervisor
from .launcher.devices import Device
from .launcher.loader import FLAT_TRAILER
from .net import Network
from .snapshot import Snapshot

BuildGuest = Callable[..., Path]

_NO_ASYNCIO = (
    "lguest_device, lguest_supervisor and lguest_net_supervisor need pytest-asyncio"
    " (pip install pytest-asyncio)"
)
NETWORK_MARKER = "lguest_network"


def _async_fixture(fn: Callable[..., AsyncIterator[Any]]) -> Any:
    """A pytest-asyncio fixture; without pytest-asyncio (the plugin loads wherever
    pytest runs) a fixture that skips the test and says what to install."""
    try:
        import pytest_asyncio
    except ImportError:

        def skip() -> None:
            pytest.skip(_NO_ASYNCIO)

        return pytest.fixture(name=fn.__name__)(skip)
    return pytest_asyncio.fixture(fn)


MARKER = "lguest_deterministic"
_SEED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("lguest").addoption(
        "--lguest-seed",
        type=int,
        metavar="N",
        help="the seed of tests marked lguest_deterministic that do not name one",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{NETWORK_MARKER}(**options): options of the Network of lguest_net_supervisor"
        " (seed, stream_timeout, connect_timeout, stream_buffer, datagram_queue, clock)",
    )
    config.addinivalue_line(
        "markers",
        f"{MARKER}(seed=None): run the test's lguest_device / lguest_supervisor on virtual "
        "time with a seeded schedule (a failure prints the seed)",
    )


def _determinism(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The ``deterministic``/``seed`` arguments for the test's device: its marker's seed,
    else --lguest-seed, else a random one; remembered for the failure report."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return {}
    seed = marker.kwargs.get("seed", marker.args[0] if marker.args else None)
    if seed is None:
        seed = request.config.getoption("lguest_seed")
    if seed is None:
        seed = random.SystemRandom().getrandbits(32)
    request.node.stash[_SEED] = seed
    return {"deterministic": True, "seed": seed}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    seed = item.stash.get(_SEED, None)
    if seed is not None and report.failed:
        report.sections.append(
            (
                "lguest",
                f"deterministic run, seed {seed}: reproduce it with --lguest-seed {seed} "
                f"or @pytest.mark.{MARKER}(seed={seed})",
            )
        )


@_async_fixture
async def lguest_device(request: pytest.FixtureRequest) -> AsyncIterator[LguestDevice]:
    """An open LguestDevice, closed (every guest on it stopped) after the test."""
    async with LguestDevice(**_determinism(request)) as dev:
        yield dev


@_async_fixture
async def lguest_supervisor(request: pytest.FixtureRequest) -> AsyncIterator[Supervisor]:
    """A Supervisor; leaving the test kills what still runs and closes its device."""
    async with Supervisor(**_determinism(request)) as sup:
        yield sup


class _NetworkedSupervisor(Supervisor):
    """A Supervisor whose guests join its network unless their config sets ``net``."""

    async def launch(
        self,
        config: GuestConfig,
        *,
        devices: Sequence[Device] = (),
        snapshot: Snapshot | None = None,
    ) -> Guest:
        if "net" not in config.model_fields_set:
            config = config.model_copy(update={"net": True})
        return await super().launch(config, devices=devices, snapshot=snapshot)


@_async_fixture
async def lguest_net_supervisor(request: pytest.FixtureRequest) -> AsyncIterator[Supervisor]:
    """A Supervisor whose guests join ``sup.net`` by default; the ``lguest_network``
    marker's keyword arguments make its Network."""
    marker = request.node.get_closest_marker(NETWORK_MARKER)
    if marker is not None and marker.args:
        raise pytest.UsageError(f"{NETWORK_MARKER} takes keyword arguments only")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    determinism = _determinism(request)
    if not determinism:
        async with _NetworkedSupervisor(network=Network(**options)) as sup:
            yield sup
        return
    # A deterministic Supervisor makes its default network from its simulation: the
    # faults draw from the seed and are timed on the virtual clock.  The marker's
    # options keep those two unless they name their own.
    async with _NetworkedSupervisor(**determinism) as sup:
        if options:
            sim = sup.device.virtual
            assert sim is not None
            made = {"seed": sim.random("net").getrandbits(64), "clock": sim}
            sup.net = Network(**{**made, **options})
        yield sup


def _cache_dir(config: pytest.Config) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("lguest-guests"))
    path = Path(tempfile.gettempdir()) / "lguest-guests"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def build_guest(pytestconfig: pytest.Config) -> BuildGuest:
    """``build_guest(source, lang="c" | "asm", flags=()) -> Path`` of a cached image."""
    cache = _cache_dir(pytestconfig)

    def build(source: str, lang: str = "c", flags: Sequence[str] = ()) -> Path:
        if lang == "asm":
            key = sdk.content_key("asm", FLAT_TRAILER, source, *flags)  # the format too
            out = cache / f"{key}.img"
            if not out.exists():
                try:
                    image = testing.assemble(source).image
                except FileNotFoundError as exc:
                    pytest.skip(f"assembly guests need GNU binutils (as, ld): {exc}")
                _write_atomically(out, image)
            return out
        if lang != "c":
            raise ValueError(f"lang must be 'c' or 'asm', not {lang!r}")
        key = sdk.content_key("c", source, *flags)
        out = cache / f"{key}.elf"
        if out.exists():
            return out
        try:
            toolchain = sdk.find_toolchain()
        except sdk.ToolchainError as exc:
            pytest.skip(str(exc))
        work = cache / f"{key}.src"
        work.mkdir(exist_ok=True)
        src = work / "guest.c"
        src.write_text(source)
        options = sdk.BuildOptions(extra_cflags=list(flags))
        tmp = cache / f"{key}.{os.getpid()}.tmp"
        sdk.build([src], tmp, options, toolchain)
        os.replace(tmp, out)
        return out

    return build


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
