"""The RESTful client of example add"""

import json

import numpy as np
import requests


def post_restful(address, servable_name, method_name, json_instances, version_number=None):
    """construct and post restful request"""
    instances_map = {"instances": json_instances}
    post_payload = json.dumps(instances_map)
    if version_number is not None:
        request_url = f"http://{address}/model/{servable_name}/version/{version_number}:{method_name}"
        result = requests.post(request_url, data=post_payload)
    else:
        request_url = f"http://{address}/model/{servable_name}:{method_name}"
        result = requests.post(request_url, data=post_payload)
    result = json.loads(result.text)
    return result


def run_add_restful(address):
    """run restful request: invoke servable add method add_common"""
    instances = []
    x1 = np.asarray([[1.1, 2.2], [3.3, 4.4]]).astype(np.float32)
    x2 = np.asarray([[5.5, 6.6], [7.7, 8.8]]).astype(np.float32)
    instances.append({"x1": x1.tolist(), "x2": x2.tolist()})
    return post_restful(address, "add", "add_common", instances)


def run_add_cast_restful(address):
    """run restful request: invoke servable add method add_cast with int inputs"""
    instances = []
    for i in range(3):
        x1 = np.full((2, 2), i, np.int32)
        x2 = np.ones((2, 2), np.int32)
        instances.append({"x1": x1.tolist(), "x2": x2.tolist()})
    return post_restful(address, "add", "add_cast", instances, version_number=1)
