"""The REST request body and reply: MindSpore Serving's JSON in, JSON out.

`read_request` takes a predict request apart in MindSpore Serving's order
(PROTOCOL.md 2.3): the JSON syntax, the URL, every instance and every value; after
the servable/method lookup (the dataplane's), `method_inputs` checks each instance's
inputs against the method. Any
failure on the way fails the whole request (one top-level ``error_msg``); only
running the method fails single instances. `build_reply` turns the pipeline's
per-instance results into the reply object (PROTOCOL.md section 3).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import orjson

from ..errors import BadRequest, InstanceError
from ..register import MethodDef
from .codec import NonFiniteOutput, OutputError, ShapedText, decode_value, encode_value
from .prescan import PRESCAN_MIN_BYTES, scan_top_level
from .urls import PredictTarget, parse_predict_path

PARSE_FAILED = "Parser request failed, "


def read_request(
    path: str, body: bytes, check_count: Callable[[int], None] = lambda count: None
) -> tuple[PredictTarget, list[dict[str, Any]]]:
    """What a predict request names, and its instances, each a dict of decoded values,
    in MindSpore's order: the JSON syntax, then the URL, then every value.
    ``check_count(n)`` may refuse the number of instances before any is decoded;
    everything wrong raises `BadRequest`. The method's own input checks come after
    the lookup (`method_inputs`)."""
    if len(body) >= PRESCAN_MIN_BYTES:
        # Refuse what the body holds before building it (10^6 instances: seconds, GBs).
        top = scan_top_level(body)
        if top is not None:
            if top.keys.count("instances") > 1:
                raise _repeated("instances", top.keys.count("instances"))
            if top.instances:
                check_count(top.instances)
    request = _load_json(body)
    target = parse_predict_path(path)  # MindSpore checks the JSON syntax before the URL
    instances = parse_instances(request, check_count)
    _refuse_repeated_keys(body, request)
    return target, instances


def _repeated(key: str, times: int, where: str = "") -> BadRequest:
    return _parse_failed(f"key '{key}' expects to exist once, but actually {times} times", where)


# Keys as JSON text, kept for `_refuse_repeated_keys`: requests repeat the same few
# keys ("instances", the input names). Bounded: clients choose the keys.
_QUOTED: dict[str, bytes] = {}
_MAX_QUOTED = 1024
_MAX_QUOTED_LENGTH = 256


def _refuse_repeated_keys(body: bytes, request: dict[str, Any]) -> None:
    """A key given twice in one object (the parser keeps the last one silently):
    refused, naming the key. Cheap first: a key that occurs in the body no more often
    than the parsed objects hold it cannot be repeated; only a suspect body is parsed
    again, keeping every pair."""
    instances = request["instances"]
    objects = [instances] if type(instances) is dict else instances
    expected: dict[str, int] = dict.fromkeys(request, 1)
    for instance in objects:
        for key in instance:
            expected[key] = expected.get(key, 0) + 1
    for key, times in expected.items():
        quoted = _QUOTED.get(key)
        if quoted is None:
            quoted = orjson.dumps(key)
            if len(_QUOTED) < _MAX_QUOTED and len(key) <= _MAX_QUOTED_LENGTH:
                _QUOTED[key] = quoted
        if body.count(quoted) > times:
            _find_repeated_key(body)
            return


def _find_repeated_key(body: bytes) -> None:
    import json

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, int] = {}
        for key, _ in items:
            seen[key] = seen.get(key, 0) + 1
        for key, times in seen.items():
            if times > 1:
                raise _repeated(key, times)
        return dict(items)

    try:
        json.loads(body, object_pairs_hook=pairs)
    except ValueError:  # parsed by orjson already; the stricter library may differ on edge cases
        pass


def _load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Illegal JSON format. {exc}") from None


def _parse_failed(reason: str, where: str = "") -> BadRequest:
    return BadRequest(f"{PARSE_FAILED}{reason}{f' ({where})' if where else ''}")


def parse_instances(request: Any, check_count: Callable[[int], None] = lambda count: None) -> list[dict[str, Any]]:
    """Every instance of a parsed body, each a dict of decoded values (all of its
    keys, inputs of the method or not: MindSpore parses them all)."""
    if type(request) is not dict or "instances" not in request:
        raise _parse_failed("key 'instances' expects to exist once, but actually 0 times")
    instances = request["instances"]
    if type(instances) is dict:
        if not instances:
            raise _parse_failed("json object, value is empty")
        return [_parse_instance(instances, 0)]
    if type(instances) is not list or (instances and type(instances[0]) is not dict):
        raise _parse_failed("instances no key mode is not supported")
    if not instances:
        raise _parse_failed("instances value is array type, but no value")
    check_count(len(instances))
    parsed = []
    for index, instance in enumerate(instances):
        if type(instance) is not dict:
            raise _parse_failed("json array, instance is not object type", f"instance {index}")
        if not instance:
            raise _parse_failed("json array, instance is object type, but no value", f"instance {index}")
        parsed.append(_parse_instance(instance, index))
    return parsed


def _parse_instance(instance: dict[str, Any], index: int) -> dict[str, Any]:
    if "" in instance:  # the empty key sorts first, so its error comes first
        raise _parse_failed("string key is empty", f"instance {index}")
    try:
        return {name: decode_value(value) for name, value in instance.items()}
    except BadRequest:
        pass
    # MindSpore reads an instance's keys in sorted order: report the failure of the
    # first key in that order (found again here, off the hot path).
    for name in sorted(instance):
        try:
            decode_value(instance[name])
        except BadRequest as exc:
            raise _parse_failed(exc.message, f"instance {index}, input '{name}'") from None
    raise AssertionError("a value failed to decode once but not twice")  # pragma: no cover


def method_inputs(instances: list[dict[str, Any]], method: MethodDef, servable: str) -> list[list[Any]]:
    """Per instance, the method's inputs in order: the whole-request input checks
    that MindSpore makes after the lookup (a missing input, a str/bytes input whose
    shape is neither ``()`` nor ``(1,)``). Keys that are not inputs are left out."""
    names = method.input_names
    rows = []
    for index, instance in enumerate(instances):
        row = []
        for name in names:
            try:
                value = instance[name]
            except KeyError:
                raise BadRequest(
                    f"Cannot find input {name} in instance input , servable {servable}, method {method.name}"
                    f" (instance {index})"
                ) from None
            if type(value) is ShapedText:
                raise BadRequest(
                    f"Instances input {name} check failed, detail: Instance tensor check failed: bytes or string type"
                    f" input  shape can only be (1,) or empty, but given shape is {list(value.shape)}"
                    f" (instance {index})"
                )
            row.append(value)
        rows.append(row)
    return rows


def build_reply(method: MethodDef, results: Sequence[list[Any] | InstanceError]) -> tuple[int, dict]:
    encoded: list[dict | InstanceError] = []
    failed: list[InstanceError] = []
    names = method.output_names
    for result in results:
        if isinstance(result, InstanceError):
            encoded.append(result)
            failed.append(result)
            continue
        position = 0
        try:
            values = {}
            for position, (name, value) in enumerate(zip(names, result)):
                values[name] = encode_value(value)
            encoded.append(values)
            continue
        except NonFiniteOutput as exc:  # from the client's values, not a server fault
            error = InstanceError(f"{method.name} output cannot be sent: {exc}", status=400)
        except OutputError as exc:
            error = InstanceError(method.unsendable(position, exc), status=500)
        encoded.append(error)
        failed.append(error)

    if encoded and not failed:  # the usual reply: every instance's values as they are
        return 200, {"instances": encoded}
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
