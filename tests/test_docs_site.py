"""The documentation site builds in strict mode: a broken link or anchor, a page that
fails to render, or a Python object the API reference cannot find fails the suite
(the `docs` extra, part of `test`, brings MkDocs, Material and mkdocstrings)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from support import REPO


def test_the_documentation_site_builds_strict(tmp_path):
    assert importlib.util.find_spec("mkdocs") is not None, "install the docs extra: pip install -e '.[docs]'"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    pages = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")}
    assert {"cli", "migrating", "https", "python-reference"} <= pages
    reference = (tmp_path / "site" / "python-reference" / "index.html").read_text()
    assert "ServableStartConfig" in reference and "start_restful_server" in reference


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The check above can fail: a page linking to a missing page breaks the build."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [nowhere](missing.md).\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nstrict: true\n")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode != 0 and "missing.md" in done.stdout + done.stderr
