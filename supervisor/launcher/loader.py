"""Guest images: flat binaries and 32-bit x86 ELF executables.

A flat image is the guest's bytes as they sit in memory from
:data:`~supervisor.launcher.layout.IMAGE_BASE`, where it is loaded and entered,
ending with the 16 bytes :data:`FLAT_TRAILER` (``LGUEST_FLAT_IMG\0``, loaded
with the rest): guests/guest.ld writes them after everything else, and
``supervisor.testing.assemble`` appends them.  The trailer is how a file is
recognised as a flat image (as Linux's lguest Launcher recognised a bzImage by
its ``HdrS`` magic); it sits at the end so that the first instruction stays at
``IMAGE_BASE``.  An ELF image (``ET_EXEC``, ``ELFCLASS32``, little endian,
``EM_386``) has each ``PT_LOAD`` segment copied to its ``p_paddr`` (the bytes
past ``p_filesz`` up to ``p_memsz`` are zeroed) and is entered at ``e_entry``.
Anything else (text, another format, a truncated flat image) is refused.

Nothing an image carries may overlap the boot info page, the page tables or the
device page of the :class:`~supervisor.launcher.layout.Layout` it is loaded
into; every problem is an :class:`ImageError`, whose message names the image.
"""

from __future__ import annotations

import itertools
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path

from .layout import IMAGE_BASE, Layout

ELF_MAGIC = b"\x7fELF"
FLAT_TRAILER = b"LGUEST_FLAT_IMG\0"  # the last 16 bytes of every flat image
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386 = 3
PT_LOAD = 1
_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")  # Elf32_Ehdr
_PHDR = struct.Struct("<8I")  # Elf32_Phdr: type offset vaddr paddr filesz memsz flags align


class ImageError(ValueError):
    """The file is not an image this Launcher can load (message says why)."""


@dataclass(frozen=True)
class Segment:
    """Bytes to place at guest-physical ``paddr``; ``memsz - len(data)`` zeros follow."""

    paddr: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class Image:
    """A parsed image: what to load where, and where to start."""

    name: str
    kind: str  # "flat" or "elf"
    segments: tuple[Segment, ...]
    entry: int

    @property
    def end(self) -> int:
        """One past the highest guest-physical byte the image occupies."""
        return max(s.end for s in self.segments)


# Parsed images by (name, bytes): guests launched from one file share one Image (its
# bytes are held once, not once a guest) for as long as any of them holds it.
_parsed: weakref.WeakValueDictionary[tuple[str, bytes], Image] = weakref.WeakValueDictionary()


def read_image(path: str | Path) -> Image:
    """Read and parse the image at ``path``; an unreadable file is an :class:`ImageError`.

    The file is read on every call; an image with the same name and bytes as one
    still in use is that same (immutable) :class:`Image`.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image: {exc.strerror or exc}") from None
    key = (str(path), data)
    image = _parsed.get(key)
    if image is None:
        image = _parsed[key] = parse_image(data, str(path))
    return image


def parse_image(data: bytes, name: str = "image") -> Image:
    """Parse ``data`` as an ELF image if it starts with the ELF magic, as a flat image if
    it ends with :data:`FLAT_TRAILER`.

    Raises :class:`ImageError` for an empty file, a file that is neither, or an ELF
    file that is not a 32-bit little-endian x86 executable with sane ``PT_LOAD``
    segments.
    """
    if not data:
        raise ImageError(f"{name}: empty image")
    if data.startswith(ELF_MAGIC):
        return _parse_elf(data, name)
    if len(data) > len(FLAT_TRAILER) and data.endswith(FLAT_TRAILER):
        return Image(name, "flat", (Segment(IMAGE_BASE, bytes(data), len(data)),), IMAGE_BASE)
    raise ImageError(
        f"{name}: not a guest image: neither an ELF32 executable nor a flat image "
        "(one ends with the 16 bytes 'LGUEST_FLAT_IMG\\0', which guests/guest.ld writes)"
    )


def _parse_elf(data: bytes, name: str) -> Image:
    if len(data) < _EHDR.size:
        raise ImageError(f"{name}: truncated ELF header")
    ident, e_type, machine, _ver, entry, phoff, _sh, _fl, _eh, phentsize, phnum = _EHDR.unpack_from(
        data
    )[:11]
    if ident[4] == ELFCLASS64:
        raise ImageError(f"{name}: 64-bit ELF images are not supported (need ELF32 for i386)")
    if ident[4] != ELFCLASS32 or ident[5] != ELFDATA2LSB:
        raise ImageError(f"{name}: not a 32-bit little-endian ELF image")
    if machine != EM_386:
        raise ImageError(f"{name}: ELF machine {machine} is not x86 (EM_386)")
    if e_type != ET_EXEC:
        raise ImageError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC)")
    if phentsize != _PHDR.size or phoff + phnum * _PHDR.size > len(data):
        raise ImageError(f"{name}: bad ELF program header table")
    segments = []
    for i in range(phnum):
        p_type, offset, _vaddr, paddr, filesz, memsz = _PHDR.unpack_from(data, phoff + i * 32)[:6]
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > len(data):
            raise ImageError(f"{name}: ELF segment {i} lies outside the file")
        segments.append(Segment(paddr, data[offset : offset + filesz], memsz))
    if not segments:
        raise ImageError(f"{name}: ELF image has nothing to load")
    segments.sort(key=lambda s: s.paddr)
    for a, b in itertools.pairwise(segments):
        if b.paddr < a.end:
            raise ImageError(f"{name}: ELF segments overlap at {b.paddr:#x}")
    if not any(s.paddr <= entry < s.end for s in segments):
        raise ImageError(f"{name}: ELF entry point {entry:#x} is outside every segment")
    return Image(name, "elf", tuple(segments), entry)


def check_fits(image: Image, layout: Layout) -> None:
    """Raise :class:`ImageError` unless every segment lies in RAM clear of reserved pages."""
    for seg in image.segments:
        if seg.end > layout.ram_size:
            raise ImageError(
                f"{image.name}: image needs memory up to {seg.end:#x}, "
                f"more than the guest's {layout.ram_size:#x} bytes"
            )
        for start, end, what in layout.reserved():
            if seg.paddr < end and start < seg.end:
                raise ImageError(
                    f"{image.name}: segment {seg.paddr:#x}-{seg.end:#x} overlaps {what} "
                    f"({start:#x}-{end:#x}); use more memory or another load address"
                )


def load_image(image: Image, ram: memoryview, layout: Layout) -> int:
    """Copy ``image`` into guest memory ``ram`` (checked first); return the entry point.

    ``ram`` is indexed by guest-physical address.  Zero-fill regions are cleared
    explicitly, so loading into reused memory is safe.
    """
    check_fits(image, layout)
    for seg in image.segments:
        ram[seg.paddr : seg.paddr + len(seg.data)] = seg.data
        tail = seg.memsz - len(seg.data)
        if tail:
            ram[seg.paddr + len(seg.data) : seg.end] = bytes(tail)
    return image.entry
