"""HTTP/2 as a gRPC server speaks it: frames, settings, reply headers, message framing.

`mserve.transport.grpc_h2` serves gRPC on its own event loop instead of grpcio's
server (whose thread hand-offs cost more CPU per call than a small model's whole
predict). This module is the wire format it needs, and nothing else (RFC 9113, RFC
7541, and gRPC's "PROTOCOL-HTTP2"):

* the frame header (9 bytes) and `frame` to build one;
* the SETTINGS parameters, read (`parse_settings`) and written;
* the header blocks a server sends: `encode_headers` writes HPACK literal fields that
  never touch the dynamic table, so replies need no encoder state (the request side is
  decoded with the ``hpack`` package, which keeps the client's dynamic table);
* gRPC's length-prefixed messages, ``grpc-timeout`` and ``grpc-message`` encoding.
"""

from __future__ import annotations

import struct
from urllib.parse import quote

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes (RST_STREAM, GOAWAY).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x5, 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

# SETTINGS parameters.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_WINDOW = 2**31 - 1

_HEAD = struct.Struct(">HBBBI")  # length (24 bits: 16 + 8), type, flags, stream id (31 bits)
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")
_MESSAGE_PREFIX = struct.Struct(">BI")


class ProtocolViolation(Exception):
    """The peer broke the protocol: the connection ends with a GOAWAY carrying ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: the 9-byte header, then ``payload``."""
    size = len(payload)
    return _HEAD.pack(size >> 8, size & 0xFF, kind, flags, stream) + payload


def read_head(buffer: bytes | bytearray | memoryview, at: int) -> tuple[int, int, int, int]:
    """The header of the frame at ``at``: length, type, flags, stream id."""
    high, low, kind, flags, stream = _HEAD.unpack_from(buffer, at)
    return (high << 8) | low, kind, flags, stream & 0x7FFF_FFFF


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(key, value) for key, value in values.items()))


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ProtocolViolation(FRAME_SIZE_ERROR, f"SETTINGS payload of {len(payload)} bytes, not a multiple of 6")
    return [_SETTING.unpack_from(payload, at) for at in range(0, len(payload), 6)]


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, _U32.pack(increment))


def read_u32(payload: bytes) -> int:
    return _U32.unpack_from(payload)[0] & 0x7FFF_FFFF


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, _U32.pack(code))


def goaway(last_stream: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream, code) + debug)


def strip_padding(flags: int, payload: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (PADDED flag)."""
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1: len(payload) - payload[0]]


# ---------------------------------------------------------------- header blocks


_SMALL = [bytes((n,)) for n in range(256)]


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's integer representation (RFC 7541 5.1) with ``first``'s high bits set."""
    if value < 127 and prefix_bits == 7:
        return _SMALL[value | first]
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal_field(name: bytes, value: bytes) -> bytes:
    """"Literal Header Field without Indexing, New Name" (RFC 7541 6.2.2), no Huffman."""
    return b"\x00" + _integer(len(name), 7, 0) + name + _integer(len(value), 7, 0) + value


STATUS_200 = b"\x88"  # ":status: 200", static table entry 8


def encode_headers(fields: list[tuple[str, str | bytes]]) -> bytes:
    """A header block of literal fields (names lower-case, as HTTP/2 requires)."""
    out = []
    for name, value in fields:
        if name == ":status" and value == "200":
            out.append(STATUS_200)
            continue
        out.append(literal_field(name.encode("ascii"), value if isinstance(value, bytes) else value.encode("latin-1")))
    return b"".join(out)


def header_frames(stream: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """HEADERS (and CONTINUATION frames when ``block`` is longer than ``max_frame``)."""
    first, rest = block[:max_frame], block[max_frame:]
    flags = END_STREAM if end_stream else 0
    if not rest:
        return frame(HEADERS, flags | END_HEADERS, stream, first)
    out = [frame(HEADERS, flags, stream, first)]
    while rest:
        piece, rest = rest[:max_frame], rest[max_frame:]
        out.append(frame(CONTINUATION, 0 if rest else END_HEADERS, stream, piece))
    return b"".join(out)


# ---------------------------------------------------------------- gRPC on top


def message_prefix(size: int, compressed: bool = False) -> bytes:
    """gRPC's 5-byte message prefix: compressed flag, big-endian length."""
    return _MESSAGE_PREFIX.pack(1 if compressed else 0, size)


def read_message_prefix(buffer: bytes | bytearray, at: int = 0) -> tuple[bool, int]:
    compressed, size = _MESSAGE_PREFIX.unpack_from(buffer, at)
    return compressed == 1, size


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float | None:
    """``grpc-timeout`` (at most 8 digits and a unit) in seconds; None if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
MAX_MESSAGE_BYTES = 4096  # clients bound trailing metadata (8 KiB by default): keep room for the rest


def encode_grpc_message(text: str) -> str:
    """``grpc-message``: percent-encoded UTF-8, cut to `MAX_MESSAGE_BYTES` (the full text
    goes to the server log)."""
    encoded = quote(text, safe=_MESSAGE_SAFE)
    if len(encoded) > MAX_MESSAGE_BYTES:
        cut = encoded[: MAX_MESSAGE_BYTES - 3]
        cut = cut[: cut.rfind("%")] if "%" in cut[-2:] else cut  # never split an escape
        encoded = cut + "..."
    return encoded
