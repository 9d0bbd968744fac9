"""Pieces shared by both wire formats: the decoding error and a bounds-checked reader."""

from __future__ import annotations

import struct


class FrameError(ValueError):
    """A frame could not be decoded or violated the protocol."""


def too_long(value: bytes, limit: int) -> FrameError:
    """The error for a field longer than its length prefix can say (C{limit} bytes)."""
    return FrameError(f"field longer than {limit} bytes ({len(value)})")


def check_done(data: bytes, pos: int) -> None:
    """Refuse a message that goes on past C{pos}, where its last field ended."""
    if pos != len(data):
        raise FrameError(f"{len(data) - pos} trailing bytes")


def str8(value: bytes) -> bytes:
    """A 1-byte length and the bytes."""
    if len(value) > 0xFF:
        raise too_long(value, 0xFF)
    return bytes((len(value),)) + value


def str16(value: bytes) -> bytes:
    """A 2-byte big-endian length and the bytes."""
    if len(value) > 0xFFFF:
        raise too_long(value, 0xFFFF)
    return struct.pack(">H", len(value)) + value


class Reader:
    """Bounds-checked cursor over one frame: nothing is sliced past the end."""

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self._data = data
        self._pos = offset

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise FrameError("truncated frame")
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def str8(self) -> bytes:
        return self.take(self.u8())

    def str16(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        check_done(self._data, self._pos)
