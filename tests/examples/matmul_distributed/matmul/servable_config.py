"""Distributed matmul servable (MindSpore Serving's example/matmul_distributed, ported:
only the import lines differ)."""

from mserve.server import distributed
from mserve.server import register

model = distributed.declare_servable(rank_size=8, stage_size=1, with_batch_dim=False)


@register.register_method(output_names=["y"])
def predict(x):
    y = register.add_stage(model, x, outputs_count=1)
    return y
