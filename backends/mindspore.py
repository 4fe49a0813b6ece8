"""``model_format="MindIR"`` through MindSpore (``pip install 'mserve[mindspore]'``).

Registered through mserve's own ``mserve.backends`` entry point, exactly as a third
party's plugin would be; this module imports nothing from MindSpore until a model
loads, so finding backends stays cheap when the extra is not installed.

A MindIR file is loaded with ``mindspore.load(file, dec_key=..., dec_mode=...)`` and
run by ``nn.GraphCell`` on the CPU, a GPU or an Ascend NPU (``device_type="Ascend"``).
Input and output dtypes and shapes come from the file's own graph (a ``-1``
dimension is free, e.g. a batch exported with ``Tensor(shape=[None, 4], ...)``).
Several files are several graphs of one model (``Model.call(subgraph=i)``); the
instance's main graph is the first.

MindSpore binds a process to one device (``mindspore.set_device``), so on a GPU or
an Ascend NPU one process serves one device id; on the CPU any number of instances
share it. Its graph executor is process-wide, so calls into MindSpore are serialized
here (its kernels still use all cores).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import Backend, Device, LoadRequest, TensorSpec

_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
# One lock for every call into MindSpore in this process (see the module docstring).
_ms_lock = threading.Lock()
_bound: list[Device] = []  # the device this process was bound to, once bound


def _dtype(code: int, where: str) -> np.dtype:
    from mindspore.train.mind_ir_pb2 import TensorProto

    name = TensorProto.DataType.Name(code)
    table = {
        "FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "FLOAT64": np.float64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "BOOL": np.bool_, "COMPLEX64": np.complex64, "COMPLEX128": np.complex128,
    }
    if name not in table:
        raise ValueError(f"{where} has dtype {name}, which mserve cannot carry in a request")
    return np.dtype(table[name])


def read_signature(path: Path, dec_key: bytes | None, dec_mode: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the MindIR graph declares them."""
    proto = _read_proto(path, dec_key, dec_mode)

    def specs(items: Any, kind: str) -> list[TensorSpec]:
        out = []
        for i, item in enumerate(items):
            if not item.tensor:
                raise ValueError(f"{path}: {kind} {i} ({item.name}) is not a tensor")
            tensor = item.tensor[0]
            shape = tuple(None if d < 0 else int(d) for d in tensor.dims)
            out.append(TensorSpec(_dtype(tensor.data_type, f"{path}: {kind} {i}"), shape))
        return out

    return specs(proto.graph.input, "input"), specs(proto.graph.output, "output")


def exported_by(path: Path, dec_key: bytes | None, dec_mode: str) -> str:
    """The MindSpore version that exported the file (its ``model_version``), or ""."""
    try:
        return str(_read_proto(path, dec_key, dec_mode).model_version)
    except ValueError:
        return ""


def _read_proto(path: Path, dec_key: bytes | None, dec_mode: str) -> Any:
    from mindspore.train.mind_ir_pb2 import ModelProto

    if dec_key is None:
        raw = path.read_bytes()
    else:
        from mindspore._c_expression import _decrypt  # what mindspore.load_checkpoint uses

        raw = _decrypt(str(path), dec_key, len(dec_key), dec_mode)
        if raw is None:
            raise ValueError(f"{path}: decrypting with the given dec_key and dec_mode ({dec_mode}) failed")
    proto = ModelProto()
    try:
        proto.ParseFromString(raw)
    except Exception as exc:
        hint = "" if dec_key else " (an encrypted MindIR needs dec_key and dec_mode)"
        raise ValueError(f"{path} is not a MindIR file{hint}: {exc}") from None
    return proto


def load_failure(path: Path, reason: str, exported: str, installed: str, step: str = "mindspore.load") -> str:
    """Why ``mindspore.load`` refused a file, and what to do. MindSpore 2.10 cannot
    read some graphs that MindSpore 2.0 exported (those with side-effect nodes, such as
    a Parameter's Load/UpdateState/Depend: ``Got null AbstractBasePtr ... Depend``); no
    load option changes that, so the way out is a new export. MindSpore reports it at
    the graph's first run (``step``), which warm-up does while the model loads."""
    text = f"{step}({path.name}) failed: {reason}"
    if exported and exported.split(".")[:2] != installed.split(".")[:2]:
        text += (
            f". The file was exported by MindSpore {exported}; the installed MindSpore {installed} cannot load this "
            f"graph, and no load option changes that. Export the model again with MindSpore {installed} "
            f"(mindspore.export(net, *inputs, file_format='MINDIR') from the model's code), or export it to JAX "
            f"(model_format='jax_export')"
        )
    return text


def _bind(device: Device) -> None:
    """Point this process's MindSpore at ``device`` (once; MindSpore cannot move)."""
    import mindspore as ms

    if _bound:
        current = _bound[0]
        if current.type != device.type or (device.type != "cpu" and current.id != device.id):
            raise ValueError(
                f"MindSpore in this process already runs on {current}; it binds a process to one device, so "
                f"{device} needs its own server process (start one per device id)"
            )
        return
    target = _TARGETS[device.type or "cpu"]
    try:
        ms.set_device(target, device.id if device.type != "cpu" else None)
    except Exception as exc:  # no such device, a CPU-only build asked for Ascend, ...
        # Code in this process may have run MindSpore already (a servable_config.py
        # that builds a net): then the device is fixed, and fine if it is this one.
        same = str(ms.get_context("device_target")) == target and (
            device.type == "cpu" or int(ms.get_context("device_id")) == device.id
        )
        if not same:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"MindSpore cannot use {target} device {device.id}: {reason}") from None
    _bound.append(device)


class MindIRGraph:
    """One MindIR graph loaded by ``mindspore.load`` and run by ``nn.GraphCell``."""

    def __init__(self, path: Path, device: Device, dec_key: bytes | None, dec_mode: str):
        import mindspore as ms
        from mindspore import nn

        self.path = path
        self.devices = [device]
        self.inputs, self.outputs = read_signature(path, dec_key, dec_mode)
        kwargs = {} if dec_key is None else {"dec_key": dec_key, "dec_mode": dec_mode}
        with _ms_lock:
            try:
                self._cell = nn.GraphCell(ms.load(str(path), **kwargs))
            except (RuntimeError, ValueError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ValueError(
                    load_failure(path, reason, exported_by(path, dec_key, dec_mode), ms.__version__)
                ) from None
        self._exported = exported_by(path, dec_key, dec_mode)
        self._shapes: set[tuple[tuple[int, ...], ...]] = set()

    @property
    def compile_count(self) -> int:
        return len(self._shapes)

    def predict(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        from mindspore import Tensor

        tensors = [Tensor.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        with _ms_lock:
            try:
                out = self._cell(*tensors)
            except RuntimeError as exc:
                import mindspore as ms

                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RuntimeError(
                    load_failure(self.path, reason, self._exported, ms.__version__, "running the MindIR graph")
                ) from None
            results = [t.asnumpy() for t in (out if isinstance(out, (tuple, list)) else (out,))]
        self._shapes.add(tuple(a.shape for a in arrays))
        return results

    def warm_up(self, shapes: Sequence[Sequence[tuple[int, ...]]]) -> None:
        """Run each shape once: MindSpore compiles a graph on its first call."""
        for one in shapes:
            self.predict([np.zeros(s, spec.dtype) for s, spec in zip(one, self.inputs)])

    def close(self) -> None:
        self._cell = None


class MindIRModel(MindIRGraph):
    """A MindIR model instance: its first file is the main graph; every file is one
    entry of ``subgraphs`` (``Model.call(subgraph=i)``)."""

    def __init__(self, files: list[Path], device: Device, dec_key: bytes | None, dec_mode: str):
        super().__init__(files[0], device, dec_key, dec_mode)
        self.subgraphs: list[MindIRGraph] = [self] + [MindIRGraph(f, device, dec_key, dec_mode) for f in files[1:]]

    def close(self) -> None:
        for graph in self.subgraphs[1:]:
            graph.close()
        super().close()


def load(request: LoadRequest) -> MindIRModel:
    if request.config_file is not None:
        raise ValueError(
            f"config_file ({request.config_file}) configures MindSpore Lite; this backend runs MindIR through "
            f"mindspore.load + nn.GraphCell, which has no such file: remove config_file"
        )
    if request.context:
        raise ValueError(f"context {request.context!r} is not applied by the MindSpore backend: remove it")
    _bind(request.device)
    return MindIRModel(list(request.files), request.device, request.dec_key, request.dec_mode)


def _default_device_type() -> str:
    import mindspore as ms

    return str(ms.get_context("device_target")).lower()


backend = Backend(
    "mindspore", ("MindIR",), ("cpu", "gpu", "ascend"), load,
    can_decrypt=True, requires="mindspore", install="pip install 'mserve[mindspore]'",
    default_device_type=_default_device_type, description="MindIR files through mindspore.load + nn.GraphCell",
)
