"""The mserve command line (Typer + rich)."""
