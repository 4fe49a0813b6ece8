"""One HTTP/2 connection of mserve's own gRPC server: frames in, calls out, replies back.

`H2Connection` is fed the bytes its socket received (`received`) and collects what
to send (`output`); `mserve.transport.grpc_h2` owns the socket and the event loop and
calls it from that loop's thread only, so the connection needs no lock. A request
whose message has arrived whole becomes a call: ``server.start_call`` runs it (on
the loop or in a thread) and the reply comes back through `reply` or, for a
streaming method, `send_message` and `finish`.

What a client may do to a connection is bounded: header blocks (64 KiB raw, the
decoded metadata ``MAX_METADATA_BYTES``), calls at once (``max_streams``, announced in
SETTINGS, more are refused with REFUSED_STREAM), a request message (the server's
``max_message``, checked on its length prefix before the body arrives), and unsent
output (the loop stops reading from a connection whose client does not read). A
broken frame ends the connection with a GOAWAY naming what was wrong; a bad call ends
that call with a gRPC status naming it.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import hpack

from ..protocol import http2 as h2
from .grpc_calls import CallContext, Method, metadata_value, metadata_wire

# What this server announces, and accepts, per connection.
MAX_FRAME = 1 << 20  # large messages arrive in fewer, larger frames
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_HEADER_BLOCK = 64 * 1024
MAX_METADATA_BYTES = 16 * 1024  # decoded, counted as HTTP/2 does (name + value + 32 per field)

# gRPC status codes used here.
UNKNOWN, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 2, 8, 12, 13, 14

_KEEP_HEADS = 64  # header blocks remembered per connection (see H2Connection._read_head)
_NOT_METADATA = {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"}
ACCEPT_ENCODING = "identity,deflate,gzip"
_OK_TRAILERS = h2.encode_headers([("grpc-status", "0")])
_REPLY_HEADERS = h2.encode_headers([
    (":status", "200"), ("content-type", "application/grpc"), ("grpc-accept-encoding", ACCEPT_ENCODING),
])


def _usual_request_id(context: CallContext | None) -> bytes | None:
    """The request id when it is a call's only trailing metadata (what the servicers set)."""
    if context is None or len(context.trailing) != 1:
        return None
    key, value = context.trailing[0]
    if key != "x-request-id" or not isinstance(value, str) or len(value) > 200:
        return None
    return value.encode("latin-1")


class RequestHead:
    """What a call's header block says: path, method, content type, compression,
    timeout (seconds), metadata (as grpcio gives it), size (as HTTP/2 counts it),
    and a problem (gRPC code, text) when the metadata cannot be read."""

    __slots__ = ("path", "method", "content_type", "encoding", "timeout", "metadata", "size", "problem")

    def __init__(self, fields: list[tuple[bytes, bytes]]):
        self.path = self.method = self.content_type = ""
        self.encoding = "identity"
        self.timeout: float | None = None
        self.problem: tuple[int, str] | None = None
        metadata = []
        size = 0
        for name, value in fields:
            size += len(name) + len(value) + 32
            if name[:1] == b":":
                if name == b":path":
                    self.path = value.decode("latin-1")
                elif name == b":method":
                    self.method = value.decode("latin-1")
                continue
            key = name.decode("latin-1")
            if key == "content-type":
                self.content_type = value.decode("latin-1")
            elif key == "grpc-timeout":
                self.timeout = h2.parse_timeout(value.decode("latin-1"))
            elif key == "grpc-encoding":
                self.encoding = value.decode("latin-1")
            if key not in _NOT_METADATA:
                try:
                    metadata.append((key, metadata_value(key, value)))
                except ValueError:
                    self.problem = (INTERNAL, f"metadata {key!r} is not valid base64")
        self.metadata = tuple(metadata)
        self.size = size


class Stream:
    """One call's state on its connection."""

    __slots__ = ("id", "method", "path", "context", "body", "encoding", "send_window", "pending", "trailers",
                 "headers_sent", "remote_done", "answered", "unacked")

    def __init__(self, stream_id: int, send_window: int):
        self.id = stream_id
        self.method: Method | None = None
        self.path = ""
        self.context: CallContext | None = None
        self.body = bytearray()
        self.encoding = "identity"
        self.send_window = send_window
        self.pending = bytearray()  # reply DATA payload waiting for flow-control window
        self.trailers: bytes | None = None  # sent once ``pending`` is out
        self.headers_sent = False
        self.remote_done = False  # the client's END_STREAM arrived
        self.answered = False  # a reply (or an error) has been queued: drop later input
        self.unacked = 0  # received DATA bytes not yet given back in a WINDOW_UPDATE


class H2Connection:
    """HTTP/2 server side of one socket (see the module docstring)."""

    def __init__(self, server: Any, peer: str, max_streams: int, max_message: int):
        self.server = server
        self.peer = peer
        self.fileno = -1  # the socket's, set by the transport (which owns the socket)
        self.max_streams = max_streams
        self.max_message = max_message
        self.inbox = bytearray()
        self.output = bytearray()
        self.preface_seen = False
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_METADATA_BYTES * 4  # hard stop; the call limit is below
        self.heads: dict[bytes, tuple[Any, RequestHead]] = {}
        self.blocked: set[int] = set()  # streams whose reply waits for flow-control window
        self.streams: dict[int, Stream] = {}
        self.last_stream = 0
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_window = h2.DEFAULT_WINDOW  # the client's initial stream window
        self.peer_frame = h2.DEFAULT_FRAME_SIZE
        self.unacked = CONNECTION_WINDOW - h2.DEFAULT_WINDOW  # given back with the server preface
        self.block_stream = 0  # a header block continues on this stream (CONTINUATION)
        self.block: list[bytes] = []
        self.block_flags = 0
        self.going_away = False
        self.last_active = time.monotonic()
        self.output.extend(h2.settings_frame({
            h2.MAX_CONCURRENT_STREAMS: max_streams, h2.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.MAX_FRAME_SIZE: MAX_FRAME, h2.MAX_HEADER_LIST_SIZE: MAX_METADATA_BYTES, h2.ENABLE_PUSH: 0,
        }))
        self.output.extend(h2.window_update(0, self.unacked))
        self.unacked = 0

    # ------------------------------------------------------------ input

    def received(self, data: bytes) -> None:
        """Handle what the socket read; `h2.ProtocolViolation` ends the connection."""
        self.last_active = time.monotonic()
        inbox = self.inbox
        if not inbox and self.preface_seen:
            # The usual case: whole frames in one read, parsed from the bytes as they came.
            used = self._frames(data, 0)
            if used < len(data):
                inbox += data[used:]
            return
        inbox += data
        at = 0
        if not self.preface_seen:
            if len(inbox) < len(h2.PREFACE):
                if not h2.PREFACE.startswith(bytes(inbox)):
                    raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface (is this a "
                                               "gRPC client? HTTP/1.1 and TLS clients go to other ports)")
                return
            if inbox[: len(h2.PREFACE)] != h2.PREFACE:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface (is this a gRPC "
                                           "client? HTTP/1.1 and TLS clients go to other ports)")
            self.preface_seen = True
            at = len(h2.PREFACE)
        del inbox[: self._frames(inbox, at)]

    def _frames(self, buffer: bytes | bytearray, at: int) -> int:
        """Handle the whole frames in ``buffer`` from ``at``; returns where the rest begins."""
        size = len(buffer)
        read_head, handle = h2.read_head, self._frame
        while size - at >= 9:
            length, kind, flags, stream = read_head(buffer, at)
            if length > MAX_FRAME:
                raise h2.ProtocolViolation(h2.FRAME_SIZE_ERROR, f"frame of {length} bytes, over {MAX_FRAME}")
            end = at + 9 + length
            if end > size:
                break
            handle(kind, flags, stream, bytes(buffer[at + 9: end]))
            at = end
        return at

    def _frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if self.block_stream and (kind != h2.CONTINUATION or stream != self.block_stream):
            raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "a header block was interrupted by another frame")
        if kind == h2.DATA:
            self._data(flags, stream, payload)
        elif kind == h2.HEADERS:
            if not stream or not stream % 2:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream}")
            payload = h2.strip_padding(flags, payload)
            if flags & h2.PRIORITY_FLAG:
                payload = payload[5:]
            self.block, self.block_flags = [payload], flags
            if flags & h2.END_HEADERS:
                self._header_block(stream)
            else:
                self.block_stream = stream
        elif kind == h2.CONTINUATION:
            if stream != self.block_stream or not stream:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "CONTINUATION without a header block")
            self.block.append(payload)
            if sum(map(len, self.block)) > MAX_HEADER_BLOCK:
                raise h2.ProtocolViolation(h2.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
            if flags & h2.END_HEADERS:
                self.block_stream = 0
                self._header_block(stream)
        elif kind == h2.SETTINGS:
            self._settings(flags, stream, payload)
        elif kind == h2.WINDOW_UPDATE:
            self._window_update(stream, payload)
        elif kind == h2.PING:
            if stream or len(payload) != 8:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "malformed PING")
            if not flags & h2.ACK:
                self.output += h2.frame(h2.PING, h2.ACK, 0, payload)
        elif kind == h2.RST_STREAM:
            call = self.streams.pop(stream, None)
            if call is not None and call.context is not None:
                call.context.end(cancelled=True)
        elif kind == h2.PUSH_PROMISE:
            raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY, GOAWAY (the client closes the connection itself) and unknown frame
        # types carry nothing a gRPC server needs.

    def _settings(self, flags: int, stream: int, payload: bytes) -> None:
        if stream:
            raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2.ACK:
            return
        for key, value in h2.parse_settings(payload):
            if key == h2.INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise h2.ProtocolViolation(h2.FLOW_CONTROL_ERROR, f"initial window {value} too large")
                delta, self.peer_window = value - self.peer_window, value
                for call in self.streams.values():
                    call.send_window += delta
            elif key == h2.MAX_FRAME_SIZE:
                if not h2.DEFAULT_FRAME_SIZE <= value <= 0xFFFFFF:
                    raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, f"max frame size {value} out of range")
                self.peer_frame = value
        self.output += h2.frame(h2.SETTINGS, h2.ACK, 0)
        self._send_pending()

    def _window_update(self, stream: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.ProtocolViolation(h2.FRAME_SIZE_ERROR, "WINDOW_UPDATE of the wrong size")
        increment = h2.read_u32(payload)
        if not stream:
            if not increment:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > h2.MAX_WINDOW:
                raise h2.ProtocolViolation(h2.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            call = self.streams.get(stream)
            if call is None:
                return
            call.send_window += increment
            if not increment or call.send_window > h2.MAX_WINDOW:
                self._reset(call, h2.FLOW_CONTROL_ERROR)
                return
        self._send_pending()

    def _data(self, flags: int, stream: int, payload: bytes) -> None:
        if not stream:
            raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, "DATA on stream 0")
        self.unacked += len(payload)  # every DATA frame counts against the connection's window
        if self.unacked >= CONNECTION_WINDOW // 2:
            self.output += h2.window_update(0, self.unacked)
            self.unacked = 0
        call = self.streams.get(stream)
        if call is None:
            if stream > self.last_stream:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, f"DATA on idle stream {stream}")
            return  # a call already reset or answered: drop the rest
        if call.remote_done:
            self._reset(call, h2.STREAM_CLOSED)
            return
        data = h2.strip_padding(flags, payload) if flags & h2.PADDED else payload
        if not call.answered:
            if flags & h2.END_STREAM and not call.body:  # the usual small call: all of it in one frame
                call.remote_done = True
                self._start(call, data)
                return
            call.body += data
            if len(call.body) >= 5 and not self._message_fits(call, call.body):
                return
        if flags & h2.END_STREAM:
            call.remote_done = True
            if not call.answered:
                self._start(call)
            return
        call.unacked += len(payload)
        if call.unacked >= STREAM_WINDOW // 2:
            self.output += h2.window_update(stream, call.unacked)
            call.unacked = 0

    def _message_fits(self, call: Stream, body: bytes | bytearray) -> bool:
        """Refuse a request message over ``max_message`` from its length prefix."""
        _, size = h2.read_message_prefix(body)
        if size <= self.max_message:
            return True
        self.fail(call, RESOURCE_EXHAUSTED, f"Received message larger than max ({size} vs. {self.max_message})")
        return False

    def _header_block(self, stream: int) -> None:
        block = b"".join(self.block) if len(self.block) > 1 else self.block[0]
        self.block = []
        if len(block) > MAX_HEADER_BLOCK:
            raise h2.ProtocolViolation(h2.ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes")
        head = self._read_head(block)  # always: it keeps the client's HPACK table
        end_stream = bool(self.block_flags & h2.END_STREAM)
        call = self.streams.get(stream)
        if call is not None:  # the client's trailers
            if not end_stream:
                raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, f"second header block on stream {stream} without "
                                           "END_STREAM")
            call.remote_done = True
            if not call.answered:
                self._start(call)
            return
        if stream <= self.last_stream:
            raise h2.ProtocolViolation(h2.PROTOCOL_ERROR, f"HEADERS on closed stream {stream}")
        self.last_stream = stream
        if self.going_away or len(self.streams) >= self.max_streams:
            self.output += h2.rst_stream(stream, h2.REFUSED_STREAM)  # the client may retry it elsewhere
            return
        call = Stream(stream, self.peer_window)
        call.remote_done = end_stream
        self.streams[stream] = call
        self._open(call, head)
        if end_stream and not call.answered:
            self._start(call)

    def _read_head(self, block: bytes) -> RequestHead:
        """Decode a header block. A client repeats the same few bytes for every call
        once its headers are in the HPACK table (grpc-core indexes even its
        ``grpc-timeout``), so a block that changed nothing in the table is kept with
        what it said, and the same bytes against the same table say the same again."""
        table = self.decoder.header_table
        entries = table.dynamic_entries
        # The table's state: its newest entry (a new tuple at every insertion; held
        # here, so its identity cannot be reused), its length and its size limit.
        state = (entries[0] if entries else None, len(entries), table.maxsize)
        known = self.heads.get(block)
        if known is not None and known[0][0] is state[0] and known[0][1:] == state[1:]:
            return known[1]
        try:
            fields = self.decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise h2.ProtocolViolation(h2.COMPRESSION_ERROR, f"header block does not decode: {exc}") from None
        head = RequestHead(fields)
        after = (entries[0] if entries else None, len(entries), table.maxsize)
        if after[0] is state[0] and after[1:] == state[1:]:
            if len(self.heads) >= _KEEP_HEADS:
                self.heads.clear()
            self.heads[block] = (state, head)
        return head

    def _open(self, call: Stream, head: RequestHead) -> None:
        """Start a call from its headers; a call that cannot run is answered here."""
        call.path = head.path
        call.encoding = head.encoding
        deadline = None if head.timeout is None else time.monotonic() + head.timeout
        call.context = CallContext(head.metadata, self.peer, deadline)
        if head.problem:
            self.fail(call, *head.problem)
        elif head.size > MAX_METADATA_BYTES:
            self.fail(call, RESOURCE_EXHAUSTED, f"request metadata of {head.size} bytes, over the limit of "
                      f"{MAX_METADATA_BYTES}")
        elif head.method != "POST":
            self.fail(call, UNIMPLEMENTED, f"HTTP method {head.method!r}: gRPC calls are POST")
        elif not head.content_type.startswith("application/grpc"):
            self.fail(call, UNKNOWN, f"content-type {head.content_type!r}: gRPC calls send application/grpc")
        elif call.encoding not in ("identity", "gzip", "deflate"):
            self.fail(call, UNIMPLEMENTED, f"message compression {call.encoding!r} is not supported (this "
                      f"server accepts {ACCEPT_ENCODING})")
        else:
            call.method = self.server.methods.get(call.path)
            if call.method is None:
                self.fail(call, UNIMPLEMENTED, "Method not found!")

    def _start(self, call: Stream, body: bytes | bytearray | None = None) -> None:
        """The request has arrived whole (``body``, else what was gathered): check its
        one message and start the call."""
        if body is None:
            body = call.body
        if len(body) < 5:
            self.fail(call, INTERNAL, "the call carried no request message" if not body else
                      "the request message was cut short")
            return
        if not self._message_fits(call, body):
            return
        compressed, size = h2.read_message_prefix(body)
        if len(body) != 5 + size:
            self.fail(call, INTERNAL, "the request message was cut short" if len(body) < 5 + size else
                      "more than one request message for a unary method")
            return
        message = body[5:] if isinstance(body, bytes) else bytes(memoryview(body)[5:])
        call.body = bytearray()
        if compressed:
            if call.encoding == "identity":
                self.fail(call, INTERNAL, "a compressed message without a grpc-encoding")
                return
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if call.encoding == "gzip" else zlib.MAX_WBITS)
            try:
                message = inflater.decompress(message, self.max_message + 1)
            except zlib.error as exc:
                self.fail(call, INTERNAL, f"the {call.encoding} message does not decompress: {exc}")
                return
            if len(message) > self.max_message:
                self.fail(call, RESOURCE_EXHAUSTED,
                          f"Received message larger than max (over {self.max_message} once decompressed)")
                return
        call.answered = True
        self.server.start_call(self, call, message)

    # ------------------------------------------------------------ output

    def reply(self, call: Stream, message: bytes | None, code: int, details: str) -> None:
        """Send a unary call's answer: the reply message (None on an error) and its status."""
        if self.streams.get(call.id) is not call:
            return  # cancelled, or the connection is closing
        rid = _usual_request_id(call.context)
        if message is not None and not code and rid is not None and not call.headers_sent:
            size = len(message) + 5
            if size <= min(call.send_window, self.send_window, self.peer_frame):
                # The usual answer: headers, the reply and the trailers, in one piece of output.
                call.send_window -= size
                self.send_window -= size
                stream = call.id
                self.output += (h2.frame(h2.HEADERS, h2.END_HEADERS, stream, _REPLY_HEADERS)
                                + h2.frame(h2.DATA, 0, stream, h2.message_prefix(len(message)) + message)
                                + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream,
                                           _OK_TRAILERS + h2.literal_field(b"x-request-id", rid)))
                call.headers_sent = True
                self._close_stream(call)
                return
        if message is not None:
            self.send_message(call, message)
        self.finish(call, code, details)

    def send_message(self, call: Stream, message: bytes) -> None:
        if self.streams.get(call.id) is not call:
            return
        if not call.headers_sent:
            call.headers_sent = True
            self.output += h2.header_frames(call.id, _REPLY_HEADERS, False, self.peer_frame)
        size = len(message) + 5
        if not call.pending and size <= min(call.send_window, self.send_window, self.peer_frame):
            # The usual reply: one DATA frame, sent at once.
            call.send_window -= size
            self.send_window -= size
            self.output += h2.frame(h2.DATA, 0, call.id, h2.message_prefix(len(message)) + message)
            return
        call.pending += h2.message_prefix(len(message))
        call.pending += message
        self.blocked.add(call.id)
        self._send_data(call)

    def finish(self, call: Stream, code: int, details: str) -> None:
        """End a call with its status (trailers; "trailers-only" when nothing was sent)."""
        if self.streams.get(call.id) is not call:
            return
        context = call.context
        rid = _usual_request_id(context)
        if call.headers_sent and not code and rid is not None:  # the usual end: status 0 and the request id
            call.trailers = h2.header_frames(call.id, _OK_TRAILERS + h2.literal_field(b"x-request-id", rid), True,
                                             self.peer_frame)
            self._send_data(call)
            return
        fields: list[tuple[str, str | bytes]] = []
        if not call.headers_sent:
            fields += [(":status", "200"), ("content-type", "application/grpc"),
                       ("grpc-accept-encoding", ACCEPT_ENCODING)]
        fields.append(("grpc-status", str(code)))
        if details:
            fields.append(("grpc-message", h2.encode_grpc_message(details)))
        if context is not None:
            for key, value in context.trailing:
                fields.append((key.lower(), metadata_wire(key, value)))
        call.headers_sent = True
        call.trailers = h2.header_frames(call.id, h2.encode_headers(fields), True, self.peer_frame)
        self._send_data(call)

    def fail(self, call: Stream, code: int, details: str) -> None:
        """Answer a call that will not run with ``code``; stop its upload if unfinished."""
        call.answered = True
        call.body = bytearray()
        self.finish(call, code, details)

    def _send_data(self, call: Stream) -> None:
        """Send what flow control allows of ``call``'s reply, then its trailers."""
        pending = call.pending
        while pending:
            room = min(call.send_window, self.send_window, self.peer_frame)
            if room <= 0:
                return
            piece = bytes(pending[:room])
            del pending[:room]
            call.send_window -= len(piece)
            self.send_window -= len(piece)
            self.output += h2.frame(h2.DATA, 0, call.id, piece)
        if call.trailers is not None:
            self.output += call.trailers
            call.trailers = None
            self._close_stream(call)

    def _send_pending(self) -> None:
        """More window: send what waited for it."""
        if not self.blocked:
            return
        for stream in list(self.blocked):
            call = self.streams.get(stream)
            if call is None:
                self.blocked.discard(stream)
                continue
            self._send_data(call)
            if not call.pending:
                self.blocked.discard(stream)

    def _close_stream(self, call: Stream) -> None:
        del self.streams[call.id]
        self.blocked.discard(call.id)
        if not call.remote_done:
            self.output += h2.rst_stream(call.id, h2.NO_ERROR)  # answered early: stop sending the request
        if call.context is not None:
            call.context.end(cancelled=False)

    def _reset(self, call: Stream, code: int) -> None:
        self.streams.pop(call.id, None)
        self.blocked.discard(call.id)
        self.output += h2.rst_stream(call.id, code)
        if call.context is not None:
            call.context.end(cancelled=True)

    # ------------------------------------------------------------ the connection's end

    def go_away(self, code: int = h2.NO_ERROR, debug: str = "") -> None:
        """Refuse new calls (the ones already received still finish)."""
        if not self.going_away:
            self.going_away = True
            self.output += h2.goaway(self.last_stream, code, debug.encode("utf-8", "replace")[:512])

    def idle(self) -> bool:
        return not self.streams

    def closed(self) -> None:
        """The socket is gone: every call still open is cancelled."""
        calls, self.streams = list(self.streams.values()), {}
        for call in calls:
            if call.context is not None:
                call.context.end(cancelled=True)
