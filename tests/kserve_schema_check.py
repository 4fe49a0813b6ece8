"""Check KServe resources against the kserve SDK's model classes, as a script (used
by tests/test_deploy.py): importing kserve registers the protobuf names
``inference.*``, which tritonclient.grpc (imported by other tests) registers too, so
it runs in a process of its own.

    python kserve_schema_check.py FILE.yaml KIND [FILE.yaml KIND ...]

The classes are generated from KServe's CRD schemas: every field must be one the
class knows, of the type it declares, with the required ones present. Prints one JSON
object: {"problems": [...], "summary": {...}}.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import kubernetes.client.models as kubernetes_models
import yaml
from kserve import models as kserve_models

_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float)}


class SchemaError(Exception):
    pass


def build(data: Any, type_name: str, where: str) -> Any:
    """``data`` as the SDK class ``type_name``; `SchemaError` naming a field it does not know."""
    # kserve's classes write list[X] and dict(str, X); kubernetes' List[X] and Dict[str, X].
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            raise SchemaError(f"{where}: expected a list")
        return [build(item, type_name[5:-1], f"{where}[{i}]") for i, item in enumerate(data)]
    if type_name.startswith(("dict(", "Dict[")):
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected a mapping")
        inner = type_name[5:-1].split(", ", 1)[1]
        return {key: build(value, inner, f"{where}.{key}") for key, value in data.items()}
    if type_name == "object":
        return data
    if type_name in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[type_name]) or (type_name != "bool" and isinstance(data, bool)):
            raise SchemaError(f"{where}: expected {type_name}, got {data!r}")
        return data
    cls = getattr(kserve_models, type_name, None) or getattr(kubernetes_models, type_name)
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: expected a {type_name} mapping")
    fields = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SchemaError(f"{where}: {type_name} has no field(s) {unknown}")
    try:
        return cls(**{fields[k]: build(v, cls.openapi_types[fields[k]], f"{where}.{k}") for k, v in data.items()})
    except ValueError as exc:  # the classes' own checks: required fields, enums
        raise SchemaError(f"{where}: {exc}") from None


def main(argv: list[str]) -> None:
    problems, summary = [], {}
    for path, kind in zip(argv[::2], argv[1::2]):
        with open(path) as f:
            data = yaml.safe_load(f)
        try:
            built = build(data, kind, kind)
        except SchemaError as exc:
            problems.append(f"{path}: {exc}")
            continue
        spec = built.spec
        if kind.endswith("ServingRuntime"):
            summary[kind] = {"name": built.metadata.name, "formats": [f.name for f in spec.supported_model_formats],
                             "protocols": spec.protocol_versions}
        else:
            model = spec.predictor.model
            summary[kind] = {"runtime": model.runtime, "format": model.model_format.name,
                             "protocol": model.protocol_version}
    print(json.dumps({"problems": problems, "summary": summary}))


if __name__ == "__main__":
    main(sys.argv[1:])
