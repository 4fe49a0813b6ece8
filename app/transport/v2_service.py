"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService``.

Served by `mserve.transport.grpc.GrpcTransport` beside MindSpore's ``MSService`` on the
same server and port, through the same `Dataplane` (admission, limits, deadline,
pipeline): ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and
ModelInfer. The method handlers are registered by service name, because the
messages (`mserve.protocol.oip_v2_pb2`) live in mserve's own protobuf package (see
``oip_v2.proto``); on the wire the paths are ``/inference.GRPCInferenceService/...``.

Failures are gRPC status codes with the message: INVALID_ARGUMENT (bad input),
NOT_FOUND (unknown model or version), UNAVAILABLE (loading, over capacity, stopping),
DEADLINE_EXCEEDED (the request timeout), RESOURCE_EXHAUSTED (too many instances),
INTERNAL. Each infer gets a request id (``x-request-id`` metadata, sent back as
trailing metadata), an access-log record and the request metrics, as ``MSService``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import grpc

from ..errors import ServingError
from ..ops.access_log import access_log, current_request_id, log_request, request_id
from ..ops.metrics import RequestMetrics
from ..protocol import oip_v2_pb2 as pb
from ..protocol import v2_grpc
from ..protocol.v2_tensors import OutputError
from ..serving import v2_models
from ..serving.dataplane import LOADING_MESSAGE, Dataplane
from ..serving.reload import RequestEpochs
from ..ops.openapi import mserve_version
from .memory import RELEASE_AFTER_BYTES, release_memory
from .v2_routes import EXTENSIONS, SERVER_NAME

log = logging.getLogger("mserve.transport.v2_service")

SERVICE_NAME = "inference.GRPCInferenceService"
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(status: int) -> grpc.StatusCode:
    """The gRPC status code of an outcome's HTTP status."""
    return _CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


class InferenceServicer:
    """The six RPCs over one `Dataplane`; ``readiness`` is the server's (``GET /ready``)."""

    def __init__(self, dataplane: Dataplane, readiness: Callable[[], tuple[bool, str]], epochs: RequestEpochs):
        self.inference = v2_models.V2Inference(dataplane)
        self.dataplane = dataplane
        self.readiness = readiness
        self.epochs = epochs
        self.metrics = RequestMetrics(dataplane.registry.servables)
        self.version = mserve_version()

    def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.readiness()[0])

    def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            v2_models.lookup(self.dataplane.registry, request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=EXTENSIONS)

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            described = v2_models.metadata(self.dataplane.registry, request.name, request.version)
        except ServingError as exc:
            if exc.status == 404 and self.dataplane.loading():
                context.abort(grpc.StatusCode.UNAVAILABLE, LOADING_MESSAGE)
            context.abort(status_code(exc.status), exc.message)
        reply = pb.ModelMetadataResponse(name=described["name"], versions=described["versions"],
                                         platform=described["platform"])
        for spec in described["inputs"]:
            v2_grpc.tensor_metadata(reply.inputs, spec)
        for spec in described["outputs"]:
            v2_grpc.tensor_metadata(reply.outputs, spec)
        return reply

    def ModelInfer(self, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        given = next((value for key, value in context.invocation_metadata() if key == "x-request-id"), None)
        rid = request_id({"HTTP_X_REQUEST_ID": given} if given else {})
        token = current_request_id.set(rid)
        where = f"/v2/models/{request.model_name}" + (f"/versions/{request.model_version}" if request.model_version
                                                        else "") + "/infer"
        label = where
        try:
            status, message, reply = 200, "", None
            try:
                target = self.inference.target(request.model_name, request.model_version)
                shown = f"/version/{target.version}" if target.version else ""
                label = f"/model/{target.servable}{shown}:{target.method}"
            except ServingError:
                pass  # answered by infer below, with the loading-aware status
            try:
                inputs = v2_grpc.decode_inputs(request)
            except ServingError as exc:
                status, message = exc.status, exc.message
            else:
                epoch = self.epochs.enter()
                try:
                    outcome = self.inference.infer(request.model_name, request.model_version, inputs,
                                                   where=f"gRPC {where}")
                finally:
                    self.epochs.leave(epoch)
                if outcome.error is not None:
                    status, message = outcome.status, outcome.error
                else:
                    reply, status, message = self._reply(request, outcome.reply)
            context.set_trailing_metadata((("x-request-id", rid),))
            elapsed = time.perf_counter() - started
            self.metrics.observe(label, status, elapsed)
            size = request.ByteSize()
            if access_log.isEnabledFor(logging.INFO):
                peer = {"REMOTE_ADDR": context.peer(), "CONTENT_LENGTH": size}
                log_request("gRPC", where, status, elapsed, rid, peer, reply.ByteSize() if reply is not None else 0)
            if size >= RELEASE_AFTER_BYTES:  # as MSService/Predict: hand a big request's memory back
                release_memory(collect=status >= 400)
            if reply is None:
                context.abort(status_code(status), message)
            return reply
        finally:
            current_request_id.reset(token)

    def _reply(self, request: Any, inferred: v2_models.Inferred) -> tuple[Any, int, str]:
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version=str(inferred.version),
                                      id=request.id)
        try:
            v2_grpc.fill_response(reply, inferred.outputs, v2_grpc.requested_outputs(request, inferred.outputs))
        except ServingError as exc:
            return None, exc.status, exc.message
        except OutputError as exc:
            return None, 500, str(exc)
        return reply, 200, ""


def add_inference_service(server: Any, servicer: InferenceServicer) -> None:
    """Register ``inference.GRPCInferenceService`` on a grpcio server."""
    rpcs = {
        "ServerLive": (pb.ServerLiveRequest, servicer.ServerLive),
        "ServerReady": (pb.ServerReadyRequest, servicer.ServerReady),
        "ModelReady": (pb.ModelReadyRequest, servicer.ModelReady),
        "ServerMetadata": (pb.ServerMetadataRequest, servicer.ServerMetadata),
        "ModelMetadata": (pb.ModelMetadataRequest, servicer.ModelMetadata),
        "ModelInfer": (pb.ModelInferRequest, servicer.ModelInfer),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=message.FromString, response_serializer=lambda reply: reply.SerializeToString()
        )
        for name, (message, call) in rpcs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
