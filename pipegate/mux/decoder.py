"""
The mux byte stream into frames: L{FrameDecoder} takes whatever a read returned and gives
back the whole frames it completed (docs/protocol.md section 2.2), each parsed by
L{pipegate.mux.frames.decode_body}; L{decode} parses exactly one encoded frame.
"""

from __future__ import annotations

import struct

from pipegate.core.codec import FrameError
from pipegate.core.window import MAX_DATA
from pipegate.mux.frames import (
    DATA, DATAGRAM, HEADER_SIZE, MAX_DATAGRAM, MAX_FRAME_SIZE, MIN_MAX_FRAME_SIZE, PREFIX, Data, Datagram,
    Frame, decode_body,
)

_LENGTH = struct.Struct(">I")     # the length prefix (as frames.encode writes it)
_HEADER = struct.Struct(">BI")    # type, channel


def _check_limit(max_frame_size: int) -> None:
    if max_frame_size < MIN_MAX_FRAME_SIZE:
        raise ValueError(f"max frame size must be at least {MIN_MAX_FRAME_SIZE} bytes")


# A DATA frame as FrameDecoder(data_pairs=True) gives it: (channel, payload); with views, the
# payload may be a memoryview or a list of them (see FrameDecoder).
DataPair = tuple[int, "bytes | memoryview | list[memoryview]"]

_PREFIX = _LENGTH.size + HEADER_SIZE   # length, type, channel: what precedes a payload
_LENGTH_SIZE = _LENGTH.size
_FRAME_PREFIX = PREFIX.unpack_from   # length, type, channel at once
_MAX_DATA_SIZE = HEADER_SIZE + MAX_DATA  # the largest declared length of a DATA frame
_MAX_DATAGRAM_SIZE = HEADER_SIZE + MAX_DATAGRAM  # the largest declared length of a DATAGRAM frame
_SMALL_READ = 4096
_MIN_VIEW = HEADER_SIZE + _SMALL_READ   # the smallest declared length of a DATA frame given as a view


class FrameDecoder:
    """
    Incremental decoder for one link's byte stream.  L{feed} takes whatever a read
    returned and gives back the frames it completed; a partial frame is kept for the
    next call.  A declared length above C{max_frame_size} (or below the 5-byte header)
    is refused as soon as the 4 length bytes are in, before any of the body is buffered,
    so the decoder never holds more than one frame plus one read.  After a L{FrameError}
    the stream is unusable and every further L{feed} raises again.

    What is not yet a whole frame is kept as views of the reads it came in (not
    copied into a buffer), and each payload is copied once, from those views into
    the bytes its frame carries: a 64 KiB DATA frame usually spans two reads.  A read
    given as a read-only memoryview is kept as it is, not copied: whoever made it must
    not change the buffer under it (the mux links' TLS layer gives a fresh one per read).

    With C{data_pairs}, a DATA frame is given as the tuple C{(channel, payload)} instead of
    a L{Data} (checked the same way; every other frame as always): a link dispatching
    one DATA frame per message then makes no attrs object per message
    (L{pipegate.mux.session.MuxLink}; about a tenth of its per-message work).

    With C{views} too, a DATA payload of 4 KiB or more that lies whole in a read given as a
    read-only memoryview is given as a view of that read (no copy: a bulk link's receiver
    copied every byte once here); its frame is checked as any other.  Such a view is valid
    as long as its reader keeps it (the buffer is never reused) but holds the whole read's
    memory while kept: whoever takes it should write it on or copy it (L{MuxLink.dataReceived}).
    With C{data_pairs} too, such a payload across reads is given as a list of its pieces (views of
    those reads, in order), and the bulk payloads of consecutive DATA frames of one channel
    (views or such lists) as one pair whose payload is the list of all their pieces: a payload
    is then bytes, a memoryview or a list of memoryviews (whose concatenation it stands for).
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE, data_pairs: bool = False,
                 views: bool = False) -> None:
        _check_limit(max_frame_size)
        self.max_frame_size = max_frame_size
        self.data_pairs = data_pairs
        self.views = views
        self._parts: list[memoryview] = []
        self._held = 0
        self._failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete."""
        return self._held

    def feed(self, data: bytes) -> list[Frame | DataPair]:
        """The frames completed by C{data} (bytes, or a read-only memoryview), in order."""
        if self._failed is not None:
            raise FrameError(f"link already failed: {self._failed}")
        try:
            return self._feed(data)
        except FrameError as e:
            self._failed = e
            self._parts.clear()
            self._held = 0
            raise

    def _feed(self, data: bytes) -> list[Frame | DataPair]:
        if not data:
            return []
        if type(data) is not bytes and not (type(data) is memoryview and data.readonly):
            data = bytes(data)  # views are kept: they must not see the caller reuse a buffer
        parts = self._parts
        if not parts:
            if type(data) is not bytes and (
                    len(data) < _LENGTH.size or _LENGTH.unpack_from(data)[0] < _SMALL_READ):
                # A view that starts with a small frame (many small frames: a link under
                # request/response load): one copy, and the frames are parsed in place.
                data = bytes(data)
            if type(data) is bytes:
                return self._feed_fresh(data)
        if parts and len(data) < _SMALL_READ and len(parts[-1]) < _SMALL_READ:
            # Small reads are merged (a copy of at most 2 x _SMALL_READ bytes), so a peer
            # trickling a frame a byte per read makes no more than one view per 4 KiB held.
            parts[-1] = memoryview(parts[-1].tobytes() + data)
        else:
            parts.append(memoryview(data))
        self._held += len(data)
        frames: list[Frame | DataPair] = []
        while self._held >= _LENGTH.size:
            first = parts[0]
            if len(first) < min(_PREFIX, self._held):
                # A read ended inside a length or header: join the views that hold it.
                count, got = 1, len(first)
                while got < _PREFIX and count < len(parts):
                    got += len(parts[count])
                    count += 1
                first = memoryview(b"".join(parts[:count]))
                parts[:count] = [first]
            (size,) = _LENGTH.unpack_from(first)
            if size > self.max_frame_size:
                raise FrameError(f"declared frame length {size} exceeds {self.max_frame_size}")
            if size < HEADER_SIZE:
                raise FrameError(f"declared frame length {size} is shorter than the header")
            total = _LENGTH.size + size
            if self._held < total:
                break
            kind, channel = _HEADER.unpack_from(first, _LENGTH.size)
            # A bulk DATA payload, given as views of the reads it lies in (decode_body's DATA checks, inline)
            bulk = self.views and kind == DATA and channel and _MIN_VIEW <= size <= _MAX_DATA_SIZE
            if len(first) >= total:
                payload = first[_PREFIX:total] if bulk else bytes(first[_PREFIX:total])
                if len(first) == total:
                    del parts[0]
                else:
                    parts[0] = first[total:]
                if bulk:   # whole in one read: a view of it
                    self._held -= total
                    if self.data_pairs:
                        _add_pieces(frames, channel, [payload])
                    else:
                        frames.append(Data(channel, payload))
                    continue
            else:
                pieces = [first[_PREFIX:]] if len(first) > _PREFIX else []
                need = total - len(first)
                del parts[0]
                while need:
                    part = parts[0]
                    if len(part) <= need:
                        pieces.append(part)
                        need -= len(part)
                        del parts[0]
                    else:
                        pieces.append(part[:need])
                        parts[0] = part[need:]
                        need = 0
                if bulk and self.data_pairs:   # across reads: its pieces, views of those reads (no join)
                    self._held -= total
                    _add_pieces(frames, channel, pieces)
                    continue
                payload = b"".join(pieces)
            self._held -= total
            frame = decode_body(kind, channel, payload)
            frames.append((channel, frame.data) if self.data_pairs and type(frame) is Data else frame)
        return frames


    def _feed_fresh(self, data: bytes) -> list[Frame | DataPair]:
        """
        L{_feed} with nothing held: the frames that lie whole in C{data} are parsed
        in place (no views), and only an incomplete tail is kept.  A read of many
        small frames (a link under request/response load) is the common case: this
        path costs about half of the general one per frame.
        """
        frames: list[Frame | DataPair] = []
        end = len(data)
        offset = 0
        max_frame_size = self.max_frame_size
        pairs = self.data_pairs
        while True:
            left = end - offset
            if left >= _PREFIX:   # length, type and channel in one unpack
                size, kind, channel = _FRAME_PREFIX(data, offset)
            elif left >= _LENGTH_SIZE:   # (a length alone is checked as soon as it is in)
                (size,) = _LENGTH.unpack_from(data, offset)
            else:
                break
            if size > max_frame_size:
                raise FrameError(f"declared frame length {size} exceeds {max_frame_size}")
            if size < HEADER_SIZE:
                raise FrameError(f"declared frame length {size} is shorter than the header")
            total = _LENGTH_SIZE + size
            if left < total:
                break
            # (here left >= total >= _PREFIX: kind and channel were read)
            if kind == DATA and channel and HEADER_SIZE < size <= _MAX_DATA_SIZE:
                # _decode_body's checks for DATA, inline: one per message under request/response load
                payload = data[offset + _PREFIX:offset + total]
                frames.append((channel, payload) if pairs else Data(channel, payload))
            elif kind == DATAGRAM and channel and size <= _MAX_DATAGRAM_SIZE:
                # and for DATAGRAM: one per UDP datagram carried
                frames.append(Datagram(channel, data[offset + _PREFIX:offset + total]))
            else:
                frames.append(decode_body(kind, channel, data[offset + _PREFIX:offset + total]))
            offset += total
        if offset < end:
            self._parts.append(memoryview(data)[offset:] if offset else memoryview(data))
            self._held = end - offset
        return frames


def _add_pieces(frames: list, channel: int, pieces: list) -> None:
    # A bulk DATA payload as views (FrameDecoder's views and data_pairs): one view alone, or with
    # the pieces of the DATA of the same channel just before it, as one list of pieces.
    if frames:
        last = frames[-1]
        if type(last) is tuple and last[0] == channel and type(last[1]) is not bytes:
            held = last[1]
            if type(held) is list:
                held += pieces
            else:
                frames[-1] = (channel, [held, *pieces])
            return
    frames.append((channel, pieces[0] if len(pieces) == 1 else pieces))


def decode(data: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> Frame:
    """Parse exactly one complete encoded frame (length prefix included)."""
    decoder = FrameDecoder(max_frame_size)
    frames = decoder.feed(data)
    if len(frames) != 1 or decoder.buffered:
        raise FrameError("expected exactly one complete frame")
    return frames[0]
