"""The JAX model of the distributed matmul: MindSpore's Net (``-(x @ w)`` with a
(96, 16) weight of 0.5) with the weight split by columns over all devices, as the
example's ``strategy`` splits it over 8 devices. The weights file
(``matmul.safetensors``) is written by tests/test_distributed.py."""

from jax.sharding import PartitionSpec as P


def matmul(params, x):
    return -(x @ params["matmul_weight"])


function = matmul
input_specs = [((128, 96), "float32")]
sharding = {"mesh": "model", "params": {"matmul_weight": P(None, "model")}}
weights = "matmul.safetensors"
