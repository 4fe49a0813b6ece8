"""The control channel between a front-end thread and a device process.

One unix stream socket per front-end thread (`remote.DeviceClient` opens them
lazily), used strictly request -> reply, so a call costs one send and one receive on
each side and no thread hand-off in the front-end. Messages are small pickled tuples
behind a 4-byte length; arrays never travel here (they sit in the connection's
shared-memory buffer, `shm.py`), except as a fallback for outputs too big for it.
A file descriptor (the shared-memory buffer) rides along with a message as
``SCM_RIGHTS`` ancillary data, so no named segment has to be created or cleaned up.

`benchmarks/bench_channel.py` measures a round trip (about 30-60 µs on a busy
2-core machine, see README) against a pickled-array pipe.
"""

from __future__ import annotations

import pickle
import socket
import struct
from typing import Any

_LEN = struct.Struct("<I")
_RECV = 1 << 16
_MAX_FDS = 4


class ChannelClosed(ConnectionError):
    """The other side closed the channel (or died)."""


class Channel:
    """Length-prefixed pickled messages, with optional file descriptors, on a stream socket."""

    __slots__ = ("sock", "_buf", "_fds")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []

    def send(self, message: Any, fds: tuple[int, ...] = ()) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _LEN.pack(len(data)) + data
        if fds:
            sent = socket.send_fds(self.sock, [frame], list(fds))
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        else:
            self.sock.sendall(frame)

    def recv(self) -> Any:
        """The next message; `ChannelClosed` at end of stream; ``socket.timeout``
        when the socket's timeout passes first."""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (size,) = _LEN.unpack_from(buf)
                if len(buf) >= 4 + size:
                    message = pickle.loads(memoryview(buf)[4 : 4 + size])
                    del buf[: 4 + size]
                    return message
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _RECV, _MAX_FDS)
            if not data:
                for fd in fds:
                    _close_fd(fd)
                raise ChannelClosed("the other side closed the channel")
            buf += data
            self._fds.extend(fds)

    def take_fd(self) -> int:
        """A file descriptor that came with the messages received so far."""
        if not self._fds:
            raise ChannelClosed("expected a file descriptor with the message, none came")
        return self._fds.pop(0)

    def close(self) -> None:
        for fd in self._fds:
            _close_fd(fd)
        self._fds.clear()
        try:
            self.sock.close()
        except OSError:
            pass


def _close_fd(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
