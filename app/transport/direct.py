"""Predict requests answered straight from the bytes one read brought in.

Waitress turns every request into a parser object (a header dict, a body buffer),
a task, a WSGI environ of some thirty entries, a ``start_response`` and a header
block built, sorted and re-encoded, before and after the app runs: for the add
servable that was more CPU than decoding, running and encoding the predict itself.
A keep-alive client of a small model sends its whole request in one segment, and
almost always the same plain shape of request. For that shape the HTTP channel
(`mserve.transport.http.ServingChannel`) skips all of it: `parse` reads the
request line and headers with one pass over the head, the app's
`mserve.transport.wsgi.MserveApp.direct_predict` answers, and `ReplyHead` builds
the response head that Waitress would have sent, byte for byte.

What qualifies, so that everything else keeps Waitress's parser and its errors:
``POST`` to a plain ASCII path (no percent escapes, no query) with ``HTTP/1.1``,
exactly one decimal ``Content-Length`` and the whole body in the same read, nothing
after it (pipelined requests), no ``Transfer-Encoding``, no ``Expect``, a
``Connection`` header at most saying ``keep-alive``, header names that are tokens,
no folded or bare-LF lines, and the head within the header limit. The channel adds
its own conditions (the inline policy allows the path, no request is queued on the
connection, the server is not shedding or stopping). Anything else returns None
and goes the usual way.
"""

from __future__ import annotations

import re
import time
from typing import NamedTuple

from waitress.utilities import build_http_date

# The whole head in one match: the request line, then header lines whose names are
# tokens and whose values hold no control bytes (tab aside), then the blank line.
_HEAD = re.compile(
    rb"POST (/[A-Za-z0-9._~:/@!$&'()*+,;=-]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\xff]*\r\n)*)\r\n"
)
_HEADER = re.compile(rb"([^:\r\n]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
_DIGITS = re.compile(rb"[0-9]{1,12}")


class SimplePost(NamedTuple):
    path: str
    body: bytes
    request_id: str | None  # the client's X-Request-ID, as sent (the app checks it)


def parse(data: bytes, max_header_bytes: int, max_body_bytes: int) -> SimplePost | None:
    """The request in ``data`` when it is exactly one simple POST (see the module
    docstring), else None."""
    head = _HEAD.match(data)
    if head is None or head.end() > max_header_bytes + 4:
        return None
    length = None
    request_id = None
    for name, value in _HEADER.findall(head.group(2)):
        key = name.lower()
        if key == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif key == b"x-request-id":
            if request_id is not None:
                return None  # Waitress would join the two
            request_id = value.decode("latin-1")
        elif key == b"connection":
            if value.lower() != b"keep-alive":
                return None
        elif key == b"transfer-encoding" or key == b"expect":
            return None
    if length is None or length > max_body_bytes or len(data) != head.end() + length:
        return None  # part of the body still to come, or another request behind it
    return SimplePost(head.group(1).decode("ascii"), data[head.end():], request_id)


class HttpDate:
    """Waitress's ``Date`` header value, made once per second rather than per reply."""

    def __init__(self):
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._text = build_http_date(second)
            self._second = second
        return self._text


class ReplyHead:
    """The head Waitress builds for a keep-alive HTTP/1.1 reply with an app's
    headers (``Content-Length`` among them): names capitalized per dash-separated
    word, ``Server`` and ``Date`` added, sorted by name."""

    def __init__(self, server_name: str):
        self.server_name = server_name
        self.date = HttpDate()
        self._names: dict[str, str] = {}  # the app's header names (a handful), capitalized

    def build(self, status_line: str, headers: list[tuple[str, str]]) -> bytes:
        names = self._names
        lines = [(names.get(name) or self._name(name), value) for name, value in headers]
        lines.append(("Server", self.server_name))
        lines.append(("Date", self.date.now()))
        lines.sort()  # the app's names are distinct, so sorting the pairs sorts by name
        return (f"HTTP/1.1 {status_line}\r\n" + "".join([f"{k}: {v}\r\n" for k, v in lines]) + "\r\n").encode(
            "latin-1")

    def _name(self, name: str) -> str:
        text = "-".join(part.capitalize() for part in name.split("-"))
        if len(self._names) < 256:
            self._names[name] = text
        return text
