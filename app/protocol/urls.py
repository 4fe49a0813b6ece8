"""Parsing predict URLs: ``/model/{servable}[/version/{N}]:{method}``.

The ``version/{N}`` pair may also come first (``/version/1/model/add:add_common``).
Errors keep MindSpore Serving's wording (PROTOCOL.md section 1).
"""

from __future__ import annotations

from typing import NamedTuple

from ..errors import BadRequest

# MindSpore Serving reads the version as a long and refuses >= UINT32_MAX.
_MAX_VERSION = 2**32 - 2


class PredictTarget(NamedTuple):
    servable: str
    version: int  # 0: the newest loaded version
    method: str


# Parsed paths, kept: clients call a few paths over and over, and parsing one costs
# several µs of a small model's predict. Bounded in count (emptied when full) and in
# length, since any client can send any path; only paths that parse are kept.
_PARSED: dict[str, PredictTarget] = {}
_MAX_PARSED = 1024
_MAX_PARSED_LENGTH = 256


def parse_predict_path(path: str) -> PredictTarget:
    target = _PARSED.get(path)
    if target is None:
        target = _parse(path)
        if len(path) <= _MAX_PARSED_LENGTH:
            if len(_PARSED) >= _MAX_PARSED:
                _PARSED.clear()
            _PARSED[path] = target
    return target


def _parse(path: str) -> PredictTarget:
    parts = path.strip("/").split("/")
    if "model" not in parts[::2]:
        raise BadRequest("please check url, the keyword:[model] must contain.")
    head, sep, method = parts[-1].partition(":")
    if not sep or not method:
        raise BadRequest("please check url, the keyword:[service method] must contain.")
    parts[-1] = head
    if len(parts) % 2:
        # A key without its value, as in /model/add/version:add_common.
        if parts[-1] == "version":
            _parse_version("")
        if parts[-1] == "model":
            raise BadRequest("please check url, the keyword:[model] must contain.")
        raise BadRequest(f"please check url, expected /model/{{servable}}[/version/{{N}}]:{{method}}, got {path}")
    servable, version = None, 0
    for key, value in zip(parts[::2], parts[1::2]):
        if key == "model" and servable is None:
            servable = value
        elif key == "version":
            version = _parse_version(value)
        else:
            raise BadRequest(f"please check url, the keyword:[{key}] is not supported")
    if not servable:
        raise BadRequest("please check url, the keyword:[model] must contain.")
    return PredictTarget(servable, version, method)


def _parse_version(text: str) -> int:
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit() or not digits.isascii():
        raise BadRequest(f"please check url, the keyword:[version] value invalid, request version number {text}")
    number = int(text)
    if number < 0 or number > _MAX_VERSION:
        raise BadRequest(f"please check url, version number range failed, request version number {text}")
    return number
