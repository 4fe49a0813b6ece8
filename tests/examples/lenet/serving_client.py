"""RESTful client for lenet"""

import base64
import json
import os

import requests


def read_images(image_dir):
    """Read the images of a directory, in name order"""
    images_buffer = []
    image_files = sorted(os.path.join(image_dir, name) for name in os.listdir(image_dir) if name.endswith(".png"))
    for image_file in image_files:
        with open(image_file, "rb") as fp:
            images_buffer.append(fp.read())
    return images_buffer, image_files


def run_restful_classify_top1(address, image_dir, method_name="classify_top1"):
    """RESTful Client for servable lenet and method classify_top1"""
    instances = []
    images_buffer, image_files = read_images(image_dir)
    for image in images_buffer:
        base64_data = base64.b64encode(image).decode()
        instances.append({"image": {"b64": base64_data}})
    instances_map = {"instances": instances}
    post_payload = json.dumps(instances_map)
    servable_name = "lenet"
    result = requests.post(f"http://{address}/model/{servable_name}:{method_name}", data=post_payload)
    result = json.loads(result.text)
    return [(file, item["label"]) for item, file in zip(result["instances"], image_files)]
