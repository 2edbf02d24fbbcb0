"""The framing shared by snapshot files and guest-state encodings.

::

    header   magic (8 bytes), version (u16), flags (u16), payload length (u64),
             SHA-256 of the payload (32 bytes)
    payload  u32 length of the JSON part, the JSON part, then binary sections

The JSON part is ``{"meta": ..., "sections": [[name, length], ...]}``; the
sections follow in that order.  The checksum detects damage, not tampering:
whoever decodes must still check what the JSON says (see docs/security.md).
Whatever the bytes, :func:`unpack` returns or raises :class:`FormatError`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

_HEADER = struct.Struct("<8sHHQ32s")
_LENGTH = struct.Struct("<I")


class FormatError(ValueError):
    """Not a well-formed container of the expected kind (the message says why)."""


def pack(magic: bytes, version: int, meta: Any, blobs: dict[str, bytes]) -> bytes:
    """Frame ``meta`` (JSON-able) and the binary ``blobs``."""
    head = {"meta": meta, "sections": [[name, len(blob)] for name, blob in blobs.items()]}
    encoded = json.dumps(head, separators=(",", ":")).encode()
    payload = b"".join([_LENGTH.pack(len(encoded)), encoded, *blobs.values()])
    digest = hashlib.sha256(payload).digest()
    return _HEADER.pack(magic, version, 0, len(payload), digest) + payload


def unpack(raw: bytes, magic: bytes, version: int, *, kind: str) -> tuple[Any, dict[str, bytes]]:
    """The ``meta`` and sections of a framed container; :class:`FormatError` if it is not one
    of ``kind`` at ``version``, is truncated, has stray bytes or fails its checksum."""
    if not raw:
        raise FormatError(f"not a {kind} (it is empty)")
    if len(raw) < _HEADER.size:
        if not magic.startswith(bytes(raw[: len(magic)])):
            raise FormatError(f"not a {kind}")
        raise FormatError(f"truncated: {len(raw)} bytes, not even a header")
    found, found_version, _flags, length, digest = _HEADER.unpack_from(raw)
    if found != magic:
        raise FormatError(f"not a {kind}")
    if found_version != version:
        raise FormatError(f"{kind} format version {found_version}, expected {version}")
    payload = memoryview(raw)[_HEADER.size :]
    if len(payload) < length:
        raise FormatError(f"truncated: {len(payload)} of {length} payload bytes present")
    if len(payload) > length:
        raise FormatError(f"{len(payload) - length} stray bytes after the {kind}")
    if hashlib.sha256(payload).digest() != digest:
        raise FormatError("corrupt: checksum mismatch")
    try:
        (size,) = _LENGTH.unpack_from(payload)
        head = json.loads(bytes(payload[_LENGTH.size : _LENGTH.size + size]))
        offset = _LENGTH.size + size
        blobs: dict[str, bytes] = {}
        for name, n in head["sections"]:
            if not isinstance(name, str) or not isinstance(n, int) or n < 0:
                raise ValueError("bad section entry")
            if offset + n > len(payload):
                raise ValueError(f"section {name} runs past the end")
            blobs[name] = bytes(payload[offset : offset + n])
            offset += n
        if offset != len(payload):
            raise ValueError("sections do not cover the payload")
        return head["meta"], blobs
    except RecursionError:  # JSON nested deeper than the interpreter's stack allows
        raise FormatError(f"malformed {kind} contents: JSON nested too deeply") from None
    except (KeyError, ValueError, TypeError, struct.error) as exc:
        raise FormatError(f"malformed {kind} contents: {exc}") from None
