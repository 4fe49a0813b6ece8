"""What a big JSON body holds, found before it is parsed.

Parsing a body builds a Python object for every value: 10^6 small instances cost
over a gigabyte and seconds before the instance limit could refuse them. For a body
of at least `PRESCAN_MIN_BYTES`, `scan_top_level` walks its bytes with numpy,
without building anything, in chunks (its memory: a few times `_CHUNK`): it finds the
top-level keys (so a repeated ``"instances"`` is caught too) and counts the
instances (the objects directly inside the ``"instances"`` array). Characters
inside strings, escaped quotes included, are told apart from the structure by the
parity of the unescaped quotes before them.

The scan trusts the body to be JSON only as far as counting goes: a body it cannot
make sense of reports nothing, and the parser then gives the real error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRESCAN_MIN_BYTES = 1 << 20  # smaller bodies parse in milliseconds: no scan
_CHUNK = 1 << 20

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("{"), ord("[")]] = 1
_OPEN[[ord("}"), ord("]")]] = -1
_STRUCTURE = np.zeros(256, bool)
_STRUCTURE[[ord(c) for c in "{}[],:"]] = True


@dataclass
class TopLevel:
    """The top-level keys in order (repeats included) and, when ``"instances"`` is an
    array, how many objects it holds directly."""

    keys: list[str] = field(default_factory=list)
    instances: int | None = None


def _unescaped_quotes(chunk: np.ndarray, quotes: np.ndarray, escaped_start: bool) -> np.ndarray:
    """The positions in ``quotes`` not preceded by an odd run of backslashes."""
    if not len(quotes):
        return quotes
    backslash = chunk == _BACKSLASH
    if not backslash.any() and not escaped_start:
        return quotes
    positions = np.arange(len(chunk), dtype=np.int64)
    last_other = np.maximum.accumulate(np.where(backslash, -1, positions))
    before = quotes - 1
    run = np.where(before >= 0, before - last_other[np.maximum(before, 0)], 0)
    # a run that reaches back to the chunk's start continues the previous chunk's run
    run = run + np.where((before >= 0) & (last_other[np.maximum(before, 0)] < 0), int(escaped_start), 0)
    run = np.where(before < 0, int(escaped_start), run)
    return quotes[run % 2 == 0]


def scan_top_level(body: bytes) -> TopLevel | None:
    """The top level of a JSON object body, or None when it is not one."""
    data = np.frombuffer(body, np.uint8)
    first = len(body) - len(body.lstrip(b" \t\r\n"))
    if first == len(body) or body[first] != ord("{"):
        return None
    found = TopLevel()
    inside = False  # inside a string at the chunk's start
    escaped = False  # an odd run of backslashes ended the previous chunk
    depth = 0
    counting = False  # in the array value of a top-level "instances" key
    count = 0
    for offset in range(0, len(data), _CHUNK):
        chunk = data[offset: offset + _CHUNK]
        quotes = _unescaped_quotes(chunk, np.flatnonzero(chunk == _QUOTE), escaped)
        trailing = len(chunk) - len(chunk.tobytes().rstrip(b"\\"))
        escaped = trailing % 2 == 1
        marks = np.zeros(len(chunk), np.uint8)
        marks[quotes[quotes + 1 < len(chunk)] + 1] = 1
        string = (np.cumsum(marks, dtype=np.uint8) + inside) & 1  # quotes before each byte, odd: in a string
        string[quotes] = 1  # the quotes themselves are not structure
        positions = np.flatnonzero(_STRUCTURE[chunk] & (string == 0))
        inside = bool((len(quotes) + inside) & 1)
        chars = chunk[positions]
        steps = _OPEN[chars].astype(np.int32)
        depths = depth + np.cumsum(steps) - steps  # the depth before each character
        depth += int(steps.sum())
        top = (depths == 1) & ((chars == ord(":")) | (chars == ord(",")))
        events, kinds = positions[top], chars[top]
        objects = positions[(depths == 2) & (chars == ord("{"))]  # objects directly inside a top-level array
        mark = 0  # objects before this position are accounted for
        for pos, kind in zip(events.tolist(), kinds.tolist()):
            if counting:
                count += int(np.searchsorted(objects, pos)) - mark
            mark = int(np.searchsorted(objects, pos))
            if kind == ord(":"):
                key = _key_before(body, offset + pos)
                if key is None:
                    return None
                found.keys.append(key)
                counting = key == "instances" and _value_is_array(body, offset + pos)
                if counting:
                    count = 0
            else:
                counting = False
        if counting:
            count += len(objects) - mark
        if found.keys and "instances" in found.keys:
            found.instances = count
    return found


def _key_before(body: bytes, colon: int) -> str | None:
    end = body.rfind(b'"', 0, colon)
    begin = body.rfind(b'"', 0, end)
    while begin > 0 and body[begin - 1] == _BACKSLASH:  # an escaped quote inside the key
        begin = body.rfind(b'"', 0, begin)
    if begin < 0 or end <= begin:
        return None
    return body[begin + 1: end].decode("utf-8", "replace")


def _value_is_array(body: bytes, colon: int) -> bool:
    return body[colon + 1: colon + 64].lstrip(b" \t\r\n")[:1] == b"["
