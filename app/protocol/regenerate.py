"""Regenerate the committed gRPC stubs from ``ms_service.proto`` (a developer tool).

    python -m mserve.protocol.regenerate          # rewrites ms_service_pb2*.py here
    python -m mserve.protocol.regenerate --check  # exit 1 if the committed ones differ

Needs grpcio-tools (``pip install -e '.[dev]'``); the server and client need only
grpcio and protobuf. The stubs are committed rather than built at install time so
that installing mserve needs no code generator. protoc runs on a copy of the .proto
placed at ``mserve/protocol/``, so the generated ``*_pb2_grpc.py`` imports
``mserve.protocol.ms_service_pb2`` (the installed package name), not a top-level
module.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "ms_service.proto"
OUTPUTS = ("ms_service_pb2.py", "ms_service_pb2_grpc.py")


def generate(out_dir: Path) -> dict[str, bytes]:
    """Run protoc (grpcio-tools) on ms_service.proto; the generated files' contents."""
    from grpc_tools import protoc  # only the developer tool needs it

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "mserve" / "protocol"
        package.mkdir(parents=True)
        shutil.copy(PROTO, package / PROTO.name)
        args = ["protoc", f"-I{tmp}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                f"mserve/protocol/{PROTO.name}"]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
    generated = Path(out_dir) / "mserve" / "protocol"
    return {name: (generated / name).read_bytes() for name in OUTPUTS}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as out:
        fresh = generate(Path(out))
    stale = [name for name, data in fresh.items() if not (HERE / name).is_file() or (HERE / name).read_bytes() != data]
    if check:
        for name in stale:
            print(f"{HERE / name} does not match {PROTO.name}: run python -m mserve.protocol.regenerate")
        return 1 if stale else 0
    for name in stale:
        (HERE / name).write_bytes(fresh[name])
        print(f"wrote {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
