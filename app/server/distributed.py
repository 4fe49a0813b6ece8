"""MindSpore Serving's ``mindspore_serving.server.distributed``: a servable whose model
spans the devices of several hosts (`mserve.distributed`, docs/distributed.md).

    from mserve.server import distributed

    distributed.declare_servable(rank_size, stage_size, ...)      # in servable_config.py
    distributed.start_servable(servable_directory, servable_name, rank_table_json_file, ...)  # main host
    distributed.startup_agents(distributed_address, model_files, ...)  # every host
"""

from ..distributed.mindspore_api import declare_servable, start_servable, startup_agents

__all__ = ["start_servable", "startup_agents", "declare_servable"]
