"""The RESTful client of example add_sub pipeline"""

import json

import numpy as np
import requests


def is_float_equal(left, right):
    """Check whether two float numbers are equal"""
    return (np.abs(left - right) < 0.0001).all()


def run_add_sub_only_model(address):
    """invoke servable add_sub method add_sub_only_model: x1+x2-x3"""
    x1 = np.asarray([[30, 30], [20, 20]]).astype(np.float32)
    x2 = np.asarray([[20, 20], [20, 20]]).astype(np.float32)
    x3 = np.asarray([[10, 10], [10, 10]]).astype(np.float32)
    instances = [{"x1": x1.tolist(), "x2": x2.tolist(), "x3": x3.tolist()}]
    result = requests.post(f"http://{address}/model/add_sub:add_sub_only_model",
                           data=json.dumps({"instances": instances}))
    result = json.loads(result.text)
    assert len(result["instances"]) == len(instances)
    assert is_float_equal(np.array(result["instances"][0]["y"]), x1 + x2 - x3)
    return result


def run_add_sub_complex(address):
    """invoke servable add_sub method add_sub_complex: x1+x2+1-x3+1 (int x1, x2 are cast)"""
    x1 = np.asarray([[30, 30], [20, 20]]).astype(np.int32)
    x2 = np.asarray([[20, 20], [20, 20]]).astype(np.int32)
    x3 = np.asarray([[10, 10], [10, 10]]).astype(np.float32)
    instances = [{"x1": x1.tolist(), "x2": x2.tolist(), "x3": x3.tolist()}]
    result = requests.post(f"http://{address}/model/add_sub:add_sub_complex",
                           data=json.dumps({"instances": instances}))
    result = json.loads(result.text)
    assert len(result["instances"]) == len(instances)
    assert is_float_equal(np.array(result["instances"][0]["y"]), x1 + x2 + 1 - x3 + 1)
    return result
