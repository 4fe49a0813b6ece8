"""MindSpore Serving's distributed API (``mindspore_serving.server.distributed``) in
mserve's terms: `declare_servable`, `start_servable`, `startup_agents`.

How MindSpore's notions map (docs/distributed.md):

* ``rank_size``: the devices of the whole group (every device of every host); the
  group refuses to serve with another count. ``stage_size`` must be 1 and
  ``enable_pipeline_infer`` False: mserve runs one SPMD program, no pipeline stages.
* The per-device MindIR files become one model file per servable version: a Python
  file (``jax_model.py``) with the JAX function, its input specs, its sharding and
  the name of its weights file (`model_module`).
* The rank table: its ``server_list`` gives the hosts (one agent each, whatever their
  number of devices) and, per host, its address and first rank, so agents started
  with ``agent_ip``/``rank_start`` (or from a listed address) find their place.
  Device ids and device IPs are HCCL's and have no meaning for JAX.
* ``startup_agents`` starts this host's agent (one JAX process for all its devices);
  ``agent_start_port`` is the port of JAX's coordinator on the first host.
  ``group_config_files`` (the layout is the model file's ``sharding``) and
  ``dec_key`` (JAX models are not encrypted) are refused with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Sequence

from ..errors import ServableLoadError

DEFAULT_MODEL_FILE = "jax_model.py"


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuntimeError(f"Parameter '{name}' should be int, but actually {type(value)}")
    if value < minimum:
        raise RuntimeError(f"Parameter '{name}' should be >= {minimum}, but actually {value}")
    return value


def declare_servable(
    rank_size: int,
    stage_size: int,
    with_batch_dim: bool = True,
    without_batch_dim_inputs: int | Sequence[int] | None = None,
    enable_pipeline_infer: bool = False,
    model_file: str = DEFAULT_MODEL_FILE,
) -> Any:
    """Declare the servable's model as spanning ``rank_size`` devices over several
    hosts; returns the `Model` for ``add_stage``/``Model.call``. mserve addition:
    ``model_file``, the model file in each version folder (`model_module`)."""
    from .. import register
    from .runtime import ensure_refusal_registered

    try:
        _int("rank_size", rank_size, 1)
        _int("stage_size", stage_size, 1)
    except RuntimeError as exc:
        raise ServableLoadError(str(exc)) from None
    if stage_size != 1:
        raise ServableLoadError(
            f"stage_size={stage_size}: mserve runs a distributed model as one SPMD program over all devices, "
            f"without pipeline stages; declare stage_size=1"
        )
    if enable_pipeline_infer:
        raise ServableLoadError("enable_pipeline_infer=True: mserve has no pipeline stages; leave it False")
    ensure_refusal_registered()
    return register.declare_model(
        model_file=model_file, model_format="jax_distributed", with_batch_dim=with_batch_dim,
        options={"rank_size": rank_size}, without_batch_dim_inputs=without_batch_dim_inputs,
    )


class RankTable:
    """The hosts of MindSpore's rank table: addresses, first ranks, device count."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            servers = data["server_list"]
            self.host_ips = [str(s["server_id"]) for s in servers]
            ranks = [[int(d["rank_id"]) for d in s["device"]] for s in servers]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"rank table {path} cannot be read as MindSpore's rank table: {exc}") from None
        if not servers or not all(ranks):
            raise RuntimeError(f"rank table {path} lists no server with devices")
        self.rank_starts = [min(r) for r in ranks]
        self.devices = sum(len(r) for r in ranks)

    @property
    def hosts(self) -> int:
        return len(self.host_ips)


def start_servable(
    servable_directory: str,
    servable_name: str,
    rank_table_json_file: str,
    version_number: int = 1,
    distributed_address: str = "0.0.0.0:6200",
    wait_agents_time_in_seconds: int = 0,
) -> None:
    """Load a distributed servable on this (main) host and wait for its hosts'
    agents (up to ``wait_agents_time_in_seconds``, 0: no limit); then start the
    RESTful/gRPC servers as for any servable. Raises RuntimeError on failure."""
    from .. import server
    from .coordinator import GroupSettings
    from .serving import serve_over_hosts

    for name, value in (("servable_directory", servable_directory), ("servable_name", servable_name),
                        ("rank_table_json_file", rank_table_json_file), ("distributed_address", distributed_address)):
        if not isinstance(value, str):
            raise RuntimeError(f"Parameter '{name}' should be str, but actually {type(value)}")
    _int("version_number", version_number, 0)
    _int("wait_agents_time_in_seconds", wait_agents_time_in_seconds, 0)
    table = RankTable(server.script_relative(rank_table_json_file))
    try:
        # the device process that loads the servable starts the group (single-process mode: this one)
        serve_over_hosts(server.default_runtime(), GroupSettings(
            distributed_address, table.hosts, wait_agents=float(wait_agents_time_in_seconds),
            host_ips=table.host_ips, rank_starts=table.rank_starts,
        ))
    except (OSError, ValueError) as exc:
        raise RuntimeError(str(exc)) from None
    server.start_servables(server.ServableStartConfig(servable_directory, servable_name,
                                                      version_number=version_number or 1))


def startup_agents(
    distributed_address: str,
    model_files: str | Sequence[str],
    group_config_files: str | Sequence[str] | None = None,
    agent_start_port: int = 7000,
    agent_ip: str | None = None,
    rank_start: int | None = None,
    dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM",
) -> None:
    """Run this host's agent until SIGINT/SIGTERM: it registers with the main host at
    ``distributed_address`` and runs this host's JAX process with ``model_files``
    (the model file and its weights file, checked against the main host's)."""
    from .. import server
    from .agent import Agent, AgentSettings

    if not isinstance(distributed_address, str):
        raise RuntimeError(f"Parameter 'distributed_address' should be str, but actually {type(distributed_address)}")
    files = [model_files] if isinstance(model_files, str) else list(model_files)
    if not files or not all(isinstance(f, str) for f in files):
        raise RuntimeError("Parameter 'model_files' should be a str or a list of str")
    files = [server.script_relative(f) for f in files]
    for file in files:  # MindSpore's words for it
        if not os.access(file, os.R_OK) or not Path(file).is_file():
            raise RuntimeError(f"Cannot access model file '{os.path.realpath(file)}'")
    if not any(f.endswith(".py") for f in files):
        raise RuntimeError(
            f"model_files {files}: mserve's distributed model is a Python model file ({DEFAULT_MODEL_FILE}, defining "
            f"function, input_specs, sharding, weights) and its weights file, not per-device MindIR files"
        )
    if group_config_files is not None:
        raise RuntimeError("group_config_files: a JAX model's layout is the 'sharding' of its model file; remove them")
    if dec_key is not None:
        raise RuntimeError("dec_key: mserve's distributed JAX models are not encrypted; remove dec_key and dec_mode")
    _int("agent_start_port", agent_start_port, 1)
    if (agent_ip is None) != (rank_start is None):
        raise RuntimeError("Parameter 'agent_ip' and parameter 'rank_start' must have values at the same time, "
                           f"or both None at the same time. agent_ip: {agent_ip}, rank_start: {rank_start}")
    if rank_start is not None:
        _int("rank_start", rank_start, 0)
    if not logging.getLogger().handlers:  # a plain script: say what the agent does, as MindSpore's agents log
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = Agent(AgentSettings(
        distributed_address, None, coordinator_port=agent_start_port, agent_ip=agent_ip, rank_start=rank_start,
        model_files=tuple(files),
    ))
    previous = {sig: signal.signal(sig, lambda signum, frame: agent.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

