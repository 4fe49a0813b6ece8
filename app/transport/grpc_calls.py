"""The gRPC methods mserve serves, and what a servicer method sees of its call.

mserve's servicers (`PredictServicer`, `InferenceServicer`, `ReadinessHealth`) are
written against grpcio's servicer API, ``Method(request, context)``, so that one
servicer serves both gRPC servers: grpcio's (TLS, ``unix:`` addresses) and mserve's
own (`mserve.transport.grpc_h2`, plain TCP). `CallContext` is the part of
``grpc.ServicerContext`` they use, for the second one; `method_table` lists every
method with its message codecs.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2

from ..protocol import ms_service_pb2 as pb
from ..protocol import oip_v2_pb2 as v2_pb

OK = 0


class Aborted(Exception):
    """`CallContext.abort`: the call ends with ``code`` and ``details``."""

    def __init__(self, code: int, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def code_number(code: Any) -> int:
    """A ``grpc.StatusCode`` (or a number) as the number sent in ``grpc-status``."""
    return code.value[0] if isinstance(code, grpc.StatusCode) else int(code)


class CallContext:
    """One call as its servicer method sees it (grpcio's ``ServicerContext`` API)."""

    __slots__ = ("_metadata", "_peer", "deadline", "trailing", "code", "details", "cancelled", "done", "_callbacks")

    def __init__(self, metadata: tuple[tuple[str, Any], ...], peer: str, deadline: float | None):
        self._metadata = metadata
        self._peer = peer
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.trailing: tuple[tuple[str, Any], ...] = ()
        self.code = OK
        self.details = ""
        self.cancelled = False
        self.done = False
        self._callbacks: list[Callable[[], None]] = []

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = tuple(metadata)

    def set_code(self, code: Any) -> None:
        self.code = code_number(code)

    def set_details(self, details: str) -> None:
        self.details = details

    def abort(self, code: Any, details: str) -> None:
        raise Aborted(code_number(code), details)

    def abort_with_status(self, status: Any) -> None:
        raise Aborted(code_number(status.code), status.details)

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def is_active(self) -> bool:
        return not (self.cancelled or self.done)

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends (finished, cancelled, or its connection
        lost); False when it has already ended."""
        if self.cancelled or self.done:
            return False
        self._callbacks.append(callback)
        return True

    def end(self, cancelled: bool) -> None:
        """The call is over: run the callbacks once."""
        if self.cancelled or self.done:
            return
        self.cancelled, self.done = cancelled, not cancelled
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


def metadata_value(key: str, raw: bytes) -> Any:
    """A metadata value as grpcio gives it: bytes for ``-bin`` keys (base64 on the
    wire, padding optional), text otherwise."""
    if key.endswith("-bin"):
        return base64.b64decode(raw + b"=" * (-len(raw) % 4))
    return raw.decode("latin-1")


def metadata_wire(key: str, value: Any) -> bytes:
    if key.endswith("-bin"):
        return base64.b64encode(value if isinstance(value, bytes) else str(value).encode()).rstrip(b"=")
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


@dataclass(frozen=True)
class Method:
    """One gRPC method: its request decoder, its servicer call and its reply encoder.

    ``streaming``: the call answers through ``send_response_callback`` (grpcio's
    non-blocking server-streaming API, which the health service's Watch offers) and
    returns at once. ``inline_path``: for predicts, the request's predict path (what
    the inline policy learns costs by).
    """

    decode: Callable[[bytes], Any]
    call: Callable[..., Any]
    encode: Callable[[Any], bytes] = lambda reply: reply.SerializeToString()
    streaming: bool = False
    inline_path: Callable[[Any], str] | None = None


def method_table(predict: Any, inference: Any, health: Any) -> dict[str, Method]:
    """Every method served, by its HTTP/2 path."""
    table = {
        "/mindspore.serving.proto.MSService/Predict": Method(
            pb.PredictRequest.FromString, predict.Predict, inline_path=predict.path_of),
        "/grpc.health.v1.Health/Check": Method(health_pb2.HealthCheckRequest.FromString, health.Check),
        "/grpc.health.v1.Health/Watch": Method(health_pb2.HealthCheckRequest.FromString, health.Watch,
                                               streaming=True),
    }
    v2 = {
        "ServerLive": v2_pb.ServerLiveRequest, "ServerReady": v2_pb.ServerReadyRequest,
        "ModelReady": v2_pb.ModelReadyRequest, "ServerMetadata": v2_pb.ServerMetadataRequest,
        "ModelMetadata": v2_pb.ModelMetadataRequest, "ModelInfer": v2_pb.ModelInferRequest,
    }
    for name, message in v2.items():
        table[f"/inference.GRPCInferenceService/{name}"] = Method(message.FromString, getattr(inference, name))
    return table
