"""Regenerate ``1/tensor_add.jaxexport``: a 2x2 float32 add, exported with jax.export.

    python servables/add/export_add.py

Exported for both CPU and CUDA so the same artifact serves on either.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export


def tensor_add(x1, x2):
    return x1 + x2


def main() -> None:
    spec = jax.ShapeDtypeStruct((2, 2), jnp.float32)
    exported = export.export(jax.jit(tensor_add), platforms=("cpu", "cuda"))(spec, spec)
    out = Path(__file__).resolve().parent / "1" / "tensor_add.jaxexport"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(exported.serialize())
    print(f"wrote {out} ({out.stat().st_size} bytes): {exported.in_avals} -> {exported.out_avals}")


if __name__ == "__main__":
    main()
