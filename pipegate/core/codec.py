"""Pieces shared by both wire formats: the decoding error and a bounds-checked reader."""

from __future__ import annotations

import struct


class FrameError(ValueError):
    """A frame could not be decoded or violated the protocol."""


def str8(value: bytes) -> bytes:
    """A 1-byte length and the bytes."""
    if len(value) > 0xFF:
        raise FrameError(f"field longer than 255 bytes ({len(value)})")
    return bytes((len(value),)) + value


def str16(value: bytes) -> bytes:
    """A 2-byte big-endian length and the bytes."""
    if len(value) > 0xFFFF:
        raise FrameError(f"field longer than 65535 bytes ({len(value)})")
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
        if self._pos != len(self._data):
            raise FrameError(f"{len(self._data) - self._pos} trailing bytes")
