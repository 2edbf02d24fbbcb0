"""ELF32 helpers: drop DWARF (``.debug_*``) sections, keeping the symbols; read the symbols.

Zig's linker either strips everything (symbols included) or keeps the DWARF of
musl, which names the absolute path of Zig's installation; a guest image wants
its symbol table (for gdb and crash reports) and no machine-specific bytes.
Loadable contents and program headers are left byte for byte; the kept
non-loadable sections (symbols, strings) are re-packed after them.
"""

from __future__ import annotations

import struct

_EHDR = struct.Struct("<16sHHIIIIIHHHHHH")
_SHDR = struct.Struct("<10I")
_SYM = struct.Struct("<IIIBBH")
SHF_ALLOC = 0x2
SHT_NOBITS = 8
SHT_SYMTAB = 2
SHN_LORESERVE = 0xFF00
SHN_ABS = 0xFFF1


def strip_debug(data: bytes) -> bytes:
    """Return ``data`` (an ELF32 little-endian file) without its ``.debug_*`` sections."""
    ehdr = list(_EHDR.unpack_from(data))
    shoff, shentsize, shnum, shstrndx = ehdr[6], ehdr[11], ehdr[12], ehdr[13]
    if shoff == 0 or shentsize != _SHDR.size:
        return data
    shdrs = [list(_SHDR.unpack_from(data, shoff + i * shentsize)) for i in range(shnum)]
    names = shdrs[shstrndx]

    def name(sh: list[int]) -> bytes:
        start = names[4] + sh[0]
        return data[start : data.index(b"\0", start)]

    keep = [i for i, sh in enumerate(shdrs) if i == 0 or not name(sh).startswith(b".debug")]
    if len(keep) == shnum:
        return data
    new_index = {old: new for new, old in enumerate(keep)}
    loose = [i for i in keep if i and not shdrs[i][2] & SHF_ALLOC and shdrs[i][1] != SHT_NOBITS]
    cut = min(
        (shdrs[i][4] for i, sh in enumerate(shdrs) if i and not sh[2] & SHF_ALLOC), default=shoff
    )
    out = bytearray(data[:cut])
    for i in loose:
        sh = shdrs[i]
        align = max(sh[8], 1)
        out += bytes(-len(out) % align)
        body = bytearray(data[sh[4] : sh[4] + sh[5]])
        if sh[1] == SHT_SYMTAB:
            for off in range(0, len(body), _SYM.size):
                st = list(_SYM.unpack_from(body, off))
                if 0 < st[5] < SHN_LORESERVE:
                    st[5] = new_index.get(st[5], SHN_ABS)
                    _SYM.pack_into(body, off, *st)
        sh[4] = len(out)
        out += body
    for i in keep:
        sh = shdrs[i]
        if sh[6]:
            sh[6] = new_index.get(sh[6], 0)
    out += bytes(-len(out) % 4)
    ehdr[6] = len(out)
    ehdr[12] = len(keep)
    ehdr[13] = new_index[shstrndx]
    for i in keep:
        out += _SHDR.pack(*shdrs[i])
    _EHDR.pack_into(out, 0, *ehdr)
    return bytes(out)


def symbols(data: bytes) -> dict[str, int]:
    """Name -> value of every named symbol in an ELF32 file's ``.symtab``."""
    shoff, shentsize, shnum = (
        _EHDR.unpack_from(data)[6],
        _EHDR.unpack_from(data)[11],
        _EHDR.unpack_from(data)[12],
    )
    sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[str, int] = {}
    for sh in sections:
        if sh[1] != SHT_SYMTAB:
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], _SYM.size):
            name, value = _SYM.unpack_from(data, off)[:2]
            if name:
                start = strtab[4] + name
                out[data[start : data.index(b"\0", start)].decode()] = value
    return out
