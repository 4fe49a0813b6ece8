"""`mserve.client`: MindSpore Serving's Python gRPC client, for mserve and MindSpore servers.

    from mserve.client import Client          # was: from mindspore_serving.client import Client

    client = Client("127.0.0.1:5500", "add", "add_common")
    result = client.infer([{"x1": x1, "x2": x2}, ...])   # [{"y": array}, ...]

Same names, parameters, checks and results as ``mindspore_serving.client`` 2.0.2, so
client code changes only its import line:

* ``Client(address, servable_name, method_name, version_number=0, ssl_config=None)``;
  ``address`` is ``host:port`` or ``unix:PATH``; messages up to 512 MB each way.
  mserve addition: ``timeout=None`` (seconds per call; a late call is a
  ``Grpc Error, (4, 'deadline exceeded'), ...``).
* ``infer(instances)``: a dict or a list/tuple of dicts of numpy arrays, numpy
  scalars, Python bool/int/float, str or bytes. Returns a list with one dict per
  instance (output name -> numpy array, ``str`` or ``bytes``), ``{"error": text}``
  in place of a failed instance; one ``{"error": text}`` when the whole request
  failed; ``{"error": "Grpc Error, (14, 'unavailable'), {details}"}`` (the
  ``grpc.StatusCode`` value, as MindSpore prints it) when the call itself failed (no
  server, TLS refused, message too large).
* ``infer_async(instances)`` returns an object whose ``result()`` gives the same.
* ``SSLConfig(certificate=None, private_key=None, custom_ca=None)``: PEM files;
  ``custom_ca`` verifies the server (gRPC's default roots when None), a certificate
  and key make it mutual TLS.

Deliberate differences, each where MindSpore's client fails: a failed call is
logged (``mserve.client``) instead of printed to stdout; numpy bool scalars are
accepted; with numpy 2 (no ``np.bool``) it works; ``infer_async(...).result()``
returns the ``{"error": "Grpc Error, ..."}`` dict where MindSpore's raises the
``grpc.RpcError``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from .protocol import grpc_codec
from .protocol import ms_service_pb2 as pb
from .protocol import ms_service_pb2_grpc as pb_grpc

__all__ = ["Client", "SSLConfig"]

log = logging.getLogger("mserve.client")

_MAX_MESSAGE = 512 * 1024 * 1024  # MindSpore's client limit, both directions


def _check_str(arg_name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise RuntimeError(f"Parameter '{arg_name}' should be str, but actually {type(value)}")
    if not value:
        raise RuntimeError(f"Parameter '{arg_name}' should not be empty str")


def _check_version(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"Parameter 'version_number' should be int, but actually {type(value)}")
    if value < 0:
        raise RuntimeError("Parameter 'version_number' should be >= 0")


class SSLConfig:
    """TLS for the client's channel: ``custom_ca`` (PEM) verifies the server; a
    ``certificate`` and ``private_key`` (PEM) identify the client (mutual TLS)."""

    def __init__(self, certificate: str | None = None, private_key: str | None = None, custom_ca: str | None = None):
        if certificate is not None:
            _check_str("certificate", certificate)
        if private_key is not None:
            _check_str("private_key", private_key)
        if custom_ca is not None:
            _check_str("custom_ca", custom_ca)
        self.certificate = certificate
        self.private_key = private_key
        self.custom_ca = custom_ca


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def _call_error(error: grpc.RpcError) -> dict[str, str]:
    code = error.code()
    log.warning("gRPC call failed: %s (%s)", error.details(), code.name)
    # MindSpore's client formats grpc.StatusCode.value, the tuple (14, 'unavailable').
    return {"error": f"Grpc Error, {code.value}, {error.details()}"}


class Client:
    """Calls one method of one servable over gRPC; see the module docstring."""

    def __init__(
        self,
        address: str,
        servable_name: str,
        method_name: str,
        version_number: int = 0,
        ssl_config: SSLConfig | None = None,
        timeout: float | None = None,
    ):
        _check_str("address", address)
        _check_str("servable_name", servable_name)
        _check_str("method_name", method_name)
        _check_version(version_number)
        self.address = address
        self.servable_name = servable_name
        self.method_name = method_name
        self.version_number = version_number
        self.timeout = timeout  # mserve addition: seconds per call (None: wait as long as it takes)
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ]
        if ssl_config is not None:
            if not isinstance(ssl_config, SSLConfig):
                raise RuntimeError("The type of ssl_config should be type of SSLConfig")
            certificate = _read(ssl_config.certificate)
            private_key = _read(ssl_config.private_key)
            if (certificate is None) != (private_key is None):
                raise RuntimeError("The certificate and private_key should be passed at the same time")
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ssl_config.custom_ca), private_key=private_key, certificate_chain=certificate
            )
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.MSServiceStub(self.channel)

    def infer(self, instances: dict | list | tuple) -> list[dict[str, Any]] | dict[str, str]:
        """Send ``instances`` and wait for the results (see the module docstring)."""
        request = self._create_request(instances)
        try:
            return _parse_reply(self.stub.Predict(request, timeout=self.timeout))
        except grpc.RpcError as error:
            return _call_error(error)

    def infer_async(self, instances: dict | list | tuple) -> "ClientGrpcAsyncResult":
        """Send ``instances``; ``.result()`` on the returned object waits for the results."""
        request = self._create_request(instances)
        return ClientGrpcAsyncResult(self.stub.Predict.future(request, timeout=self.timeout))

    def close(self) -> None:
        """Close the channel (MindSpore's client leaves it to garbage collection)."""
        self.channel.close()

    def _create_request(self, instances: dict | list | tuple) -> Any:
        if not isinstance(instances, (tuple, list)):
            instances = (instances,)
        request = pb.PredictRequest()
        request.servable_spec.name = self.servable_name
        request.servable_spec.method_name = self.method_name
        request.servable_spec.version_number = self.version_number
        for item in instances:
            if not isinstance(item, dict):
                raise RuntimeError("instance should be a map")
            instance = request.instances.add()
            for name, value in item.items():
                grpc_codec.encode_value(value, instance.items[name])
        return request


def _parse_reply(reply: Any) -> list[dict[str, Any]] | dict[str, str]:
    """A PredictReply as MindSpore's client returns it."""
    errors = reply.error_msg
    if len(errors) == 1 and errors[0].error_code != 0:
        return {"error": bytes.decode(errors[0].error_msg)}
    count = len(reply.instances)
    if len(errors) not in (0, count):
        raise RuntimeError(f"error msg result size {len(errors)} not be 0, 1 or length of instances {count}")
    results: list[dict[str, Any]] = []
    for i, instance in enumerate(reply.instances):
        if not errors or errors[i].error_code == 0:
            results.append({name: grpc_codec.decode_tensor_value(t) for name, t in instance.items.items()})
        else:
            results.append({"error": bytes.decode(errors[i].error_msg)})
    return results


class ClientGrpcAsyncResult:
    """What `Client.infer_async` returns; ``result()`` waits for the reply."""

    def __init__(self, result_future: Any):
        self.result_future = result_future

    def result(self) -> list[dict[str, Any]] | dict[str, str]:
        try:
            return _parse_reply(self.result_future.result())
        except grpc.RpcError as error:
            return _call_error(error)
