"""The ``mserve`` command: a Typer app that wires up the subcommands.

    mserve start | list | invoke | encode | new | agent | completion, mserve --version

Only Typer and rich are imported here and in the command modules at import time;
JAX, Flask and numpy are imported inside the commands that need them, so ``mserve
--help`` and shell completion stay fast.
"""

from __future__ import annotations

import enum
from typing import Optional

import typer

from . import agent as agent_cmd
from . import encode as encode_cmd
from . import invoke as invoke_cmd
from . import scaffold
from . import start as start_cmd

HELP = """\
Serve JAX models over MindSpore Serving's RESTful protocol.

[bold]Quick start[/]

  [dim]# serve the bundled servables on 127.0.0.1:5500[/]
  mserve start
  [dim]# in another shell: what is served, then call it[/]
  mserve list
  mserve invoke add:add_common -i x1='[[1.0,2.0],[3.0,4.0]]' -i x2='[[5.0,6.0],[7.0,8.0]]'
  [dim]# your own servable[/]
  mserve new demo && mserve start --servable demo
"""

COMPLETION_EPILOG = """\
[bold]Examples[/]

  mserve completion bash > ~/.local/share/bash-completion/completions/mserve
  mserve completion zsh > "${fpath[1]}/_mserve"
  mserve completion fish > ~/.config/fish/completions/mserve.fish
"""

app = typer.Typer(
    name="mserve",
    help=HELP,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from mserve import __version__

        typer.echo(f"mserve {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Show the mserve version and exit."
    ),
) -> None:
    """Serve JAX models over MindSpore Serving's RESTful protocol."""


app.command("start", epilog=start_cmd.START_EPILOG)(start_cmd.start)
app.command("list", epilog=start_cmd.LIST_EPILOG)(start_cmd.list_servables)
app.command("invoke", epilog=invoke_cmd.EPILOG)(invoke_cmd.invoke)
app.command("encode", epilog=encode_cmd.EPILOG)(encode_cmd.encode)
app.command("new", epilog=scaffold.EPILOG)(scaffold.new)
app.command("agent", epilog=agent_cmd.EPILOG)(agent_cmd.agent)


class Shell(str, enum.Enum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"
    powershell = "powershell"


@app.command("completion", epilog=COMPLETION_EPILOG)
def completion(shell: Shell = typer.Argument(..., help="The shell to print the script for.")) -> None:
    """Print the shell completion script for SHELL (save it where your shell reads it).

    Same script as --show-completion, for a shell named explicitly (--install-completion installs it for the current shell).
    """
    from typer._completion_shared import get_completion_script

    typer.echo(get_completion_script(prog_name="mserve", complete_var="_MSERVE_COMPLETE", shell=shell.value))


def main() -> None:
    app(prog_name="mserve")


if __name__ == "__main__":
    main()
