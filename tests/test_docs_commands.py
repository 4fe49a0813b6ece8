"""Every shell example of the pages under docs/, run against a real server exactly as
tests/test_readme.py runs the README's (the rules and the machinery are there). A
module of its own so that the README's and the pages' examples run side by side on
two test workers."""

from __future__ import annotations

import pytest

from test_readme import SHELL_BLOCKS, Block, _param, default_server, run_block, workspaces  # noqa: F401


@pytest.mark.parametrize("block", [_param(b) for b in SHELL_BLOCKS if b.doc != "README.md"])
def test_docs_example(block: Block, workspaces, request):  # noqa: F811
    assert block.doc.startswith("docs/"), block.where  # the README's blocks run in tests/test_readme.py
    run_block(block, workspaces, request)
