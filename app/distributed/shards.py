"""A sharded ``jax_function`` model on a mesh that spans processes (and hosts).

After ``jax.distributed.initialize``, ``jax.devices()`` lists the devices of every
process of the group; the model's ``options["sharding"]`` (`mserve.backends.jax_sharding`)
lays its weights over all of them. Each process builds its part of every weight with
``jax.make_array_from_callback``, which asks only for the slices of this process's
devices, and reads just those slices from the weights file: a ``.safetensors`` file
is read slice by slice (memory for this host's shards only); an ``.npz`` array is read
whole, sliced, and let go one weight at a time.

Every process runs the same compiled program on the same batch (SPMD); the outputs
are replicated, so each process holds the whole answer and the main host takes it
from process 0.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ..backends.jax_function import parse_input_specs
from ..backends.jax_runtime import specs_from_avals
from ..backends.jax_sharding import MeshLayout


class WeightSlices:
    """Reads slices of named weights from a ``.safetensors`` or ``.npz`` file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors import safe_open

            self._file = safe_open(str(self.path), framework="numpy")
            self._npz = None
        elif suffix == ".npz":
            self._file = None
            self._npz = np.load(self.path, allow_pickle=False)
        else:
            raise ValueError(f"{self.path}: a distributed model's weights must be .safetensors or .npz")
        self._whole: tuple[str, np.ndarray] | None = None  # the one .npz array held while its shards are made

    def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        if self._file is not None:
            found = {}
            for name in self._file.keys():
                piece = self._file.get_slice(name)
                shape = tuple(piece.get_shape())
                dtype = piece[tuple(slice(0, 0) for _ in shape)].dtype if shape else self._file.get_tensor(name).dtype
                found[name] = jax.ShapeDtypeStruct(shape, dtype)
            return found
        found = {}
        for name in self._npz.files:
            with self._npz.zip.open(name + ".npy") as raw:
                version = np.lib.format.read_magic(raw)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _order, dtype = reader(raw)
            found[name] = jax.ShapeDtypeStruct(tuple(shape), dtype)
        return found

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if self._file is not None:
            piece = self._file.get_slice(name)
            return np.ascontiguousarray(piece[index] if index else piece[:])
        if self._whole is None or self._whole[0] != name:
            self._whole = (name, self._npz[name])
        return np.ascontiguousarray(self._whole[1][index])

    def close(self) -> None:
        """Let the file go: a .safetensors file is memory-mapped, and the pages read
        would otherwise stay in this process's resident memory."""
        self._whole = None
        self._file = None
        if self._npz is not None:
            self._npz.close()
            self._npz = None


def file_digest(path: Path) -> str:
    """sha256 of a file, so hosts can tell they serve the same model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_specs(options: Mapping[str, Any], weights: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[list, list]:
    """The model's input and output `TensorSpec`s, traced from the function with the
    weights' shapes only (the main host never reads the weights)."""
    fn = options.get("function")
    if not callable(fn):
        raise ValueError("jax_function needs options['function'], a callable f(params, *inputs)")
    specs = parse_input_specs(dict(options))
    try:
        exported = jax.export.export(jax.jit(fn))(dict(weights), *specs)
    except Exception as exc:
        raise ValueError(f"tracing {getattr(fn, '__name__', fn)} with input_specs failed: {exc}") from exc
    n_params = len(jax.tree.leaves(dict(weights)))
    return specs_from_avals(exported.in_avals[n_params:]), specs_from_avals(exported.out_avals)


class GlobalProgram:
    """The model on every device of the group, holding only this process's shards."""

    def __init__(self, options: Mapping[str, Any], weights_file: Path, devices: Sequence[jax.Device] | None = None):
        if "sharding" not in options:
            raise ValueError("a distributed model declares options['sharding'] (mesh and weight layout)")
        self.weights = WeightSlices(weights_file)
        shapes = self.weights.shapes()
        self.inputs, self.outputs = model_specs(options, shapes)
        devices = list(devices or jax.devices())
        self.layout = MeshLayout.from_options(options["sharding"], devices, shapes, len(self.inputs))
        self.params = {}
        for name, shape in shapes.items():
            self.params[name] = jax.make_array_from_callback(
                shape.shape, self.layout.param_shardings[name], lambda index, name=name: self.weights.read(name, index)
            )
        self.weights.close()
        replicated = NamedSharding(self.layout.mesh, PartitionSpec())
        self._jitted = jax.jit(
            options["function"], in_shardings=(self.layout.param_shardings, *self.layout.input_shardings),
            out_shardings=replicated,
        )
        self.shapes_compiled: set[tuple] = set()
        self.batches = 0  # batches run, warm-up included

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One batch: every process of the group calls this with the same arrays."""
        placed = [
            jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index])
            for a, sharding in zip(arrays, self.layout.input_shardings)
        ]
        self.shapes_compiled.add(tuple(a.shape for a in arrays))
        out = self._jitted(self.params, *placed)
        self.batches += 1
        return [np.asarray(leaf) for leaf in jax.tree.leaves(out)]

    def shard_report(self) -> dict[str, Any]:
        """What this process holds: per weight, its global shape and the shapes of the
        slices on this process's devices; and the process's resident memory."""
        held = {}
        total = 0
        for name, array in self.params.items():
            pieces = [list(s.data.shape) for s in array.addressable_shards]
            total += sum(int(s.data.nbytes) for s in array.addressable_shards)
            held[name] = {"shape": list(array.shape), "shards": pieces}
        return {"weights": held, "bytes": total, "rss_bytes": resident_bytes(), "batches": self.batches,
                "pid": os.getpid(), "devices": [f"{d.platform}:{d.id}" for d in jax.local_devices()]}


def resident_bytes() -> int:
    """This process's resident set size (Linux), 0 where unknown."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
