"""`mserve agent`: run one host's part of a distributed servable.

Imports nothing heavy: the agent only talks to the main host and starts this host's
JAX process when told to (`mserve.distributed.agent`).
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Optional

import typer

from . import render

EPILOG = """\
[bold]Examples[/]

  [dim]# on the main host[/]
  mserve start ./servables --servable mlp --distributed-address 0.0.0.0:6200 --hosts 2
  [dim]# on each of the 2 hosts (host 0 also runs JAX's coordinator; 10.0.0.1 is the main host)[/]
  mserve agent --distributed-address 10.0.0.1:6200 --host-index 0
  mserve agent --distributed-address 10.0.0.1:6200 --host-index 1

[bold]Exit codes[/]: 0 stopped by SIGINT/SIGTERM, 1 no main host answered for --wait-main seconds, 2 refused by the
main host (a host index a running agent holds, another jax version) or bad options.
"""


def agent(
    distributed_address: str = typer.Option(
        ..., metavar="HOST:PORT", help="The main host's --distributed-address, as reachable from here."
    ),
    host_index: int = typer.Option(..., metavar="I", help="This host's place in the group, 0 to N-1."),
    coordinator_port: int = typer.Option(
        0, metavar="PORT", help="Host 0 only: the port of JAX's coordinator, which the other hosts dial (0: a free one)."
    ),
    agent_ip: Optional[str] = typer.Option(
        None, metavar="IP", help="Host 0 only: the address other hosts reach this host at.  \\[default: as the main "
        "host sees it]", show_default=False,
    ),
    servable_directory: Optional[str] = typer.Option(
        None, metavar="DIR", help="Where the servables are on this host.  \\[default: the main host's path]",
        show_default=False,
    ),
    wait_main: float = typer.Option(
        300.0, metavar="SECONDS", help="How long to wait for the main host (at start, or after losing it) before "
        "giving up with exit code 1; 0: no limit.",
    ),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Join a distributed servable: register with the main host, keep beating, run this host's JAX process.

    Start one agent per host, before or after the main host: it waits for the main host and reconnects when it restarts.
    """
    with render.reported(debug, unexpected_code=1):
        from mserve.distributed.agent import Agent, AgentRefused, AgentSettings, MainHostUnreachable

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            runner = Agent(AgentSettings(distributed_address, host_index, coordinator_port, agent_ip,
                                         servable_directory, wait_main=wait_main))
        except ValueError as exc:
            render.fail(str(exc), code=2)

        def on_signal(signum: int, frame: Any) -> None:
            runner.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            runner.run()
        except AgentRefused as exc:
            render.fail(f"the main host at {distributed_address} refused this agent: {exc}", code=2)
        except MainHostUnreachable as exc:
            render.fail(str(exc), code=1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        render.note("agent stopped")
