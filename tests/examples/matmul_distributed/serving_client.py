"""gRPC client of the distributed matmul example."""
import numpy as np
from mserve.client import Client


def run_matmul():
    client = Client("localhost:5500", "matmul", "predict")
    instance = {"x": np.ones((128, 96), np.float32)}
    result = client.infer(instance)
    print("result:\n", result)
    assert len(result) == 1
    assert "y" in result[0]


if __name__ == "__main__":
    run_matmul()
