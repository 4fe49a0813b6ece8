"""The agent of this machine for the distributed matmul example. MindSpore's script
lists one MindIR file and one group config per device; a JAX model is one model
file and its weights, for all devices of the machine."""

from mserve.server import distributed


def start_agents():
    model_files = ["matmul/1/jax_model.py", "matmul/1/matmul.safetensors"]
    distributed.startup_agents(distributed_address="127.0.0.1:6200", model_files=model_files)


if __name__ == "__main__":
    start_agents()
