"""The REST request body and reply: MindSpore Serving's JSON in, JSON out.

`parse_instances` reads the body's ``instances``, `decode_instance` turns one
instance into the method's input values (codec.py), and `build_reply` turns the
pipeline's per-instance results into the reply object (PROTOCOL.md sections 2 and 3).
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from ..errors import BadRequest, InstanceError
from ..register import MethodDef
from .codec import OutputError, decode_value, encode_value


def parse_instances(body: bytes) -> list[Any]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Illegal JSON format. {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("Illegal JSON format. The request body must be a JSON object with the key 'instances'")
    if "instances" not in request:
        raise BadRequest("Parser request failed, key 'instances' expects to exist once, but actually 0 times")
    instances = request["instances"]
    if isinstance(instances, dict):
        return [instances]
    if not isinstance(instances, list):
        raise BadRequest("Parser request failed, instances value should be an array or an object")
    if not instances:
        raise BadRequest("Parser request failed, instances value is array type, but no value")
    return instances


def _instance_error(cause: str, where: str) -> InstanceError:
    """An instance's error: ``cause`` plus where it happened. Instances failing with
    the same cause count as one cause (a single top-level error_msg)."""
    return InstanceError(f"{cause} ({where})", cause=cause)


def decode_instance(instance: Any, index: int, method: MethodDef, servable: str) -> list[Any] | InstanceError:
    if not isinstance(instance, dict):
        return _instance_error("Parser request failed, instance is not a JSON object", f"instance {index}")
    values = []
    for name in method.input_names:
        if name not in instance:
            return _instance_error(
                f"Cannot find input {name} in instance input , servable {servable}, method {method.name}",
                f"instance {index}",
            )
        try:
            values.append(decode_value(instance[name]))
        except BadRequest as exc:
            return _instance_error(f"Parser request failed, {exc.message}", f"instance {index}, input '{name}'")
    return values


def build_reply(method: MethodDef, results: Sequence[list[Any] | InstanceError]) -> tuple[int, dict]:
    encoded: list[dict | InstanceError] = []
    for result in results:
        if isinstance(result, InstanceError):
            encoded.append(result)
            continue
        try:
            encoded.append({name: encode_value(v) for name, v in zip(method.output_names, result)})
        except OutputError as exc:
            encoded.append(InstanceError(f"{method.name} output cannot be sent: {exc}", status=500))

    failed = [e for e in encoded if isinstance(e, InstanceError)]
    if len(failed) < len(encoded):
        return 200, {"instances": [_instance_body(e) for e in encoded]}
    statuses = {e.status for e in failed}
    status = statuses.pop() if len(statuses) == 1 else max(e.status for e in failed)
    causes = {e.cause for e in failed}
    if len(causes) == 1:
        # One shared cause: report it once, without one instance's position.
        return status, {"error_msg": causes.pop() if len(failed) > 1 else failed[0].message}
    return status, {"instances": [_instance_body(e) for e in encoded]}


def _instance_body(item: dict | InstanceError) -> dict:
    return {"error_msg": item.message} if isinstance(item, InstanceError) else item
