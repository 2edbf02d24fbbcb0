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
    :class:`~supervisor.net.Network` it is made with.
``build_guest``
    ``build_guest(source, lang="c", flags=()) -> pathlib.Path``: build a guest
    image from source text, C (with :mod:`supervisor.sdk`: musl, ``lguest.h``)
    or ``"asm"`` (a :mod:`supervisor.testing` body starting at ``main``).
    Images are cached by content in pytest's cache directory, so a source is
    built once across tests and runs.  Without a toolchain the test is skipped
    with the reason (what to install).

The async fixtures are ``pytest_asyncio`` fixtures, so they work in both
``asyncio_mode = "strict"`` and ``"auto"`` (in strict mode mark the tests
``@pytest.mark.asyncio``); they run on the test's own event loop.
"""

from __future__ import annotations

import os
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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{NETWORK_MARKER}(**options): options of the Network of lguest_net_supervisor"
        " (seed, stream_timeout, connect_timeout, stream_buffer, datagram_queue, clock)",
    )


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


@_async_fixture
async def lguest_device() -> AsyncIterator[LguestDevice]:
    """An open LguestDevice, closed (every guest on it stopped) after the test."""
    async with LguestDevice() as dev:
        yield dev


@_async_fixture
async def lguest_supervisor() -> AsyncIterator[Supervisor]:
    """A Supervisor; leaving the test kills what still runs and closes its device."""
    async with Supervisor() as sup:
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
    network = Network(**(marker.kwargs if marker is not None else {}))
    async with _NetworkedSupervisor(network=network) as sup:
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
