"""The kserve SDK's v2 clients against a running server, as a script (used by
tests/test_v2_protocol.py): tritonclient.grpc and kserve both register the protobuf
names ``inference.*`` and so cannot be imported into one Python process.

    python kserve_v2_client.py REST_URL GRPC_TARGET DIGIT_4_PNG   # prints JSON results
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

X = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


def add_request(factor: float, request_id: str, binary: bool) -> InferRequest:
    x1, x2 = InferInput("x1", [2, 2], "FP32"), InferInput("x2", [2, 2], "FP32")
    x1.set_data_from_numpy(X, binary_data=False)
    x2.set_data_from_numpy(X * factor, binary_data=binary)
    return InferRequest(model_name="add.add_common", infer_inputs=[x1, x2], request_id=request_id)


def image_request(png: bytes) -> InferRequest:
    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    return InferRequest(model_name="lenet", infer_inputs=[image])


async def rest(url: str, png: bytes) -> dict:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    try:
        added = await client.infer(url, add_request(2, "k-1", binary=True), model_name="add.add_common")
        digit = await client.infer(url, image_request(png), model_name="lenet")
        ready_server = await client.is_server_ready(url)
        try:
            await client.infer(url, add_request(1, "k-2", binary=False), model_name="nope")
            error = None
        except Exception as exc:  # the SDK raises httpx's HTTPStatusError
            error = f"{getattr(getattr(exc, 'response', None), 'status_code', '?')} {exc}"
        return {
            "id": added.id, "y": added.outputs[0].as_numpy().tolist(),
            "digit": digit.outputs[0].as_numpy().tolist(),
            "live": await client.is_server_live(url), "ready": await client.is_model_ready(url, "lenet"),
            "server_ready": ready_server, "error": error,
        }
    finally:
        await client.close()


async def grpc(target: str, png: bytes) -> dict:
    client = InferenceGRPCClient(target, timeout=30)
    try:
        added = await client.infer(add_request(5, "kg-1", binary=True))
        digit = await client.infer(image_request(png))
        try:
            await client.infer(InferRequest(model_name="nope", infer_inputs=add_request(1, "x", True).inputs))
            error = None
        except Exception as exc:  # grpc.aio.AioRpcError
            error = f"{exc.code() if hasattr(exc, 'code') else '?'} {exc.details() if hasattr(exc, 'details') else exc}"
        return {
            "id": added.id, "y": added.outputs[0].as_numpy().tolist(),
            "digit": digit.outputs[0].as_numpy().tolist(), "outputs": [o.name for o in digit.outputs],
            "live": await client.is_server_live(), "ready": await client.is_model_ready("add.add_cast"),
            "server_ready": await client.is_server_ready(),
            "error": error,
        }
    finally:
        await client.close()


def main() -> None:
    url, target, png_path = sys.argv[1:4]
    with open(png_path, "rb") as f:
        png = f.read()
    print(json.dumps({"rest": asyncio.run(rest(url, png)), "grpc": asyncio.run(grpc(target, png))}))


if __name__ == "__main__":
    main()
