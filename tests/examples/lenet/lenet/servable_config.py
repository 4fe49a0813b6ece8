"""Lenet config python file (MindSpore Serving's example/lenet, ported; with the two
``Model.call`` patterns of MindSpore's documentation)"""

from mserve import register

from .image_ops import preprocess_eager  # a helper beside servable_config.py, imported relatively
from lenet.image_ops import postprocess_top1  # ... or through the servable's package name

lenet_model = register.declare_model(model_file="lenet.jaxexport", model_format="jax_export")


def call_lenet_model(image):
    """One instance at a time: Model.call returns the model's only output itself."""
    image = preprocess_eager(image)
    score = lenet_model.call(image)  # for only one instance
    return postprocess_top1(score)


def call_lenet_model_batch(instances):
    """Up to batch_size instances at a time: one tuple of outputs per instance."""
    input_instances = []
    for instance in instances:
        image = instance[0]  # only one input
        image = preprocess_eager(image)
        input_instances.append([image])
    output_instances = lenet_model.call(input_instances)  # for multiply instances
    for instance in output_instances:
        score = instance[0]  # only one output for each instance
        index = postprocess_top1(score)
        yield index


@register.register_method(output_names=["label"])
def classify_top1(image):
    """Define method `classify_top1` for servable `lenet`: a pipeline."""
    x = register.add_stage(preprocess_eager, image, outputs_count=1)
    x = register.add_stage(lenet_model, x, outputs_count=1)
    x = register.add_stage(postprocess_top1, x, outputs_count=1)
    return x


@register.register_method(output_names=["label"])
def classify_top1_v1(image):
    """Without pipeline, call the model with one instance a time."""
    label = register.add_stage(call_lenet_model, image, outputs_count=1)
    return label


@register.register_method(output_names=["label"])
def classify_top1_v2(image):
    """Without pipeline, call the model with up to 32 instances a time."""
    label = register.add_stage(call_lenet_model_batch, image, outputs_count=1, batch_size=32)
    return label
