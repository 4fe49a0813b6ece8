"""Every shell example in README.md and docs/*.md, run against a real server: docs
that drift from the code fail here.

What counts as an example: every fenced block tagged ``console``/``shell-session``
(commands are the ``$ `` lines, continued by a trailing backslash; the lines after a
command are its output) and ``bash``/``sh``/``shell``/``zsh`` (every line is a
command; a here-document runs whole). One test per block, in document order, all
blocks of one document in ONE directory that starts as a checkout of the repository
(its top-level files and folders, linked) with ``.venv`` being this interpreter's
virtualenv, so a block sees exactly what the document's earlier blocks created (the
HTTPS page's certificates come from its own trustme block) and nothing else: no
files are made for the docs, and the virtualenv is NOT on ``PATH`` (a bare
``mserve`` fails as it would for a reader who never activated it).

How a block runs:

* ``mserve start ...`` in a block starts that block's server in the background (on a
  free port; ``--host 0.0.0.0`` becomes 127.0.0.1), waits until it serves, runs the
  block's remaining commands against it, and must exit 0 on SIGTERM. Blocks without
  one run against a shared ``mserve start`` (the bundled servables), exactly what the
  README's first steps start. Ports 5500/5501 in commands become the server's ports,
  and ``MSERVE_URL`` points at it.
* A command must exit 0, and when its shown output is JSON the output must be that
  JSON. A command whose shown output starts with ``error:`` or ``curl: (`` must fail,
  with output matching the shown lines (``...`` matches anything). Other shown output
  (tables, logs) is not compared.
* Nothing is skipped silently: a block that needs what a machine may lack carries a
  marker line just before its fence, ``<!-- readme-test: needs docker -->`` (or
  ``gpu``; skipped with the reason when absent) or ``<!-- readme-test: skip REASON
  -->``; an unknown marker fails, and so does a block that looks like a shell example
  (``$ `` lines) but is not tagged as one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import REPO, free_port
from test_cli import Started

README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").rglob("*.md"))]  # pages in subfolders too
CONSOLE = {"console", "shell-session"}
SCRIPT = {"bash", "sh", "shell", "zsh"}
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->", re.S)
START = re.compile(r"(^|[\s/])mserve start\b")
FAILURE_OUTPUT = ("error:", "curl: (")
VENV_BIN = Path(sys.executable).parent


@dataclass
class Command:
    text: str
    line: int
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    line: int
    heading: str
    lang: str
    body: list[str]
    marker: str | None
    doc: str = "README.md"
    commands: list[Command] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc} line {self.line}"


def parse(text: str, doc: str = "README.md") -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    heading = "top"
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^```\s*([\w-]*)", line)
        if not fence:
            i += 1
            continue
        start, lang = i + 1, fence.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        marker = None
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        if k >= 0 and lines[k].rstrip().endswith("-->"):
            opening = k
            while opening > 0 and "<!--" not in lines[opening]:
                opening -= 1
            found = MARKER.search("\n".join(lines[opening:k + 1]))
            marker = found.group(1) if found else None
        block = Block(start, heading, lang, lines[i + 1:j], marker, doc)
        block.commands = _commands(block)
        blocks.append(block)
        i = j + 1
    return blocks


def _commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    lines = block.body
    i = 0
    while i < len(lines):
        raw = lines[i]
        if block.lang in CONSOLE:
            if not raw.startswith("$ "):
                if commands and raw.strip():
                    commands[-1].output.append(raw)
                i += 1
                continue
            raw = raw[2:]
        elif block.lang in SCRIPT:
            if not raw.strip() or raw.lstrip().startswith("#"):
                i += 1
                continue
        else:
            return []
        text, first = raw, block.line + i + 1
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text += "\n" + lines[i]
        heredoc = HEREDOC.search(text)
        if heredoc:  # the document's lines up to its terminator belong to this command
            while i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
                if lines[i].strip() == heredoc.group(1):
                    break
        commands.append(Command(text, first))
        i += 1
    return commands


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


BLOCKS = [block for doc in DOCUMENTS for block in parse(doc.read_text(), _relative(doc))]


def _engine_answers(tool: str) -> bool:
    path = shutil.which(tool)
    return bool(path) and subprocess.run([path, "info"], capture_output=True, timeout=30).returncode == 0


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0


NEEDS = {"docker": lambda: _engine_answers("docker"), "gpu": _gpu_present}


def _param(block: Block):
    name = block.doc.removesuffix(".md").replace("/", "-")
    ident = f"{name}-L{block.line}-" + re.sub(r"[^a-z0-9]+", "-", block.heading.lower()).strip("-")[:40]
    marks = [pytest.mark.timeout(900)]
    if block.marker is not None:
        verb, _, rest = block.marker.partition(" ")
        if verb == "skip":
            marks.append(pytest.mark.skip(reason=f"{block.where}: {rest or 'marked skip'}"))
        elif verb == "needs" and rest in NEEDS:
            if not NEEDS[rest]():
                marks.append(pytest.mark.skip(reason=f"{block.where} needs {rest}, absent here"))
    return pytest.param(block, id=ident, marks=marks)


SHELL_BLOCKS = [b for b in BLOCKS if b.lang in CONSOLE | SCRIPT]


def test_the_docs_have_shell_examples_and_every_one_is_collected():
    assert len([b for b in SHELL_BLOCKS if b.doc == "README.md"]) >= 8
    for block in BLOCKS:
        if block.lang not in CONSOLE | SCRIPT:
            looks_like_shell = any(line.startswith("$ ") for line in block.body)
            assert not looks_like_shell, f"{block.where}: $ commands in a ```{block.lang} block; tag it console"
    for block in SHELL_BLOCKS:
        if block.marker is not None:
            verb, _, rest = block.marker.partition(" ")
            assert verb == "skip" and rest or verb == "needs" and rest in NEEDS, (
                f"{block.where}: unknown marker {block.marker!r} (skip REASON, needs docker|gpu)")


def test_commands_in_the_docs_use_the_virtualenv_they_install():
    """The README's install never activates the virtualenv, so a bare ``mserve`` or
    ``python`` is ``command not found`` (or another Python) for a reader."""
    bare = re.compile(r"(^|[|;&]\s*)(mserve|python|pip)\b")
    for block in SHELL_BLOCKS:
        for command in block.commands:
            assert not bare.search(command.text.lstrip()), (
                f"{block.doc} line {command.line}: {command.text.splitlines()[0]!r} needs the virtualenv's "
                f"path (.venv/bin/...)")


def test_the_readme_says_where_to_curl_right_after_the_serve_command():
    text = README.read_text()
    serve = text.index(".venv/bin/mserve start")
    then = text.index("Then, from another terminal")
    tests = text.index("python -m pytest")
    assert serve < then < tests, "README: serve, then 'Then, from another terminal' and curl, then the test command"
    first_curl = text.index("curl ", serve)
    assert then < first_curl < tests


def test_ci_runs_the_readme_test_command_verbatim():
    readme_command = next(c.text for b in SHELL_BLOCKS if b.doc == "README.md"
                          for c in b.commands if "pytest" in c.text)
    ci = (REPO / ".ci" / "run").read_text()
    assert readme_command in ci.splitlines(), f".ci/run does not run the README's test command: {readme_command}"


def test_the_container_port_is_published_the_same_way_everywhere():
    """The Dockerfile's own usage line, the README and the deployment page publish the
    port alike, and the Dockerfile and the README warn that /models must be mounted."""
    publish = re.compile(r"docker run [^\n]*?(-p \S+)")
    dockerfile = (REPO / "Dockerfile").read_text()
    found = {name: publish.findall(text) for name, text in [
        ("Dockerfile", dockerfile), ("README.md", README.read_text()),
        ("docs/deployment.md", (REPO / "docs" / "deployment.md").read_text())]}
    assert all(found.values()) and len({p for ps in found.values() for p in ps}) == 1, found
    for text in (dockerfile, README.read_text()):
        assert "code 2" in text and "no servables in /models" in text


def test_the_readme_stays_short():
    lines = README.read_text().count("\n")
    assert lines <= 400, f"README.md has {lines} lines; move detail into a page under docs/"


# User docs talk to users: no design history, no issue numbers, no links that leave the
# repository (a reader of a clone or of the built site has only what ships).
HISTORY = re.compile(r"\b(issue \d+|issue's|the issue|until issue|shared/|used to be|no longer)\b", re.I)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_relative)
def test_user_docs_hold_no_history_and_no_outside_links(doc: Path):
    text = doc.read_text()
    for number, line in enumerate(text.splitlines(), 1):
        found = HISTORY.search(line)
        assert not found, f"{_relative(doc)} line {number}: design history or project talk: {found.group(0)!r}"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert not target.startswith(("http://", "https://", "mailto:", "../", "/")), (
            f"{_relative(doc)} links outside the repository: {target}")
        path = target.split("#", 1)[0]
        if path:
            assert (doc.parent / path).exists(), f"{_relative(doc)} links to a missing file: {target}"


def test_docs_protocol_covers_the_shared_protocol():
    """docs/protocol.md is the repository's own protocol: the project's PROTOCOL.md,
    corrected where the real MindSpore Serving 2.0.2 answered otherwise (the real
    server wins). It may differ in wording, never in what it covers: every section of
    the shared document must be there, so a section added there is not forgotten here."""
    copy = REPO / "docs" / "protocol.md"
    assert copy.is_file()
    shared = next((p / "shared" / "PROTOCOL.md" for p in REPO.parents if (p / "shared" / "PROTOCOL.md").is_file()),
                  None)
    if shared is None:
        pytest.skip("no shared/PROTOCOL.md above the repository to compare docs/protocol.md with")

    def headings(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.startswith("#")]

    missing = [h for h in headings(shared.read_text()) if h not in headings(copy.read_text())]
    assert not missing, f"docs/protocol.md lacks these sections of {shared}: {missing}"


# --------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """One directory per document, made on its first block and kept for the rest: a
    checkout of the repository (its entries linked) plus whatever the document's
    blocks create, in order."""
    made: dict[str, Path] = {}

    def workspace(doc: str) -> Path:
        if doc not in made:
            root = tmp_path_factory.mktemp("docs_" + re.sub(r"\W+", "_", doc))
            for entry in REPO.iterdir():
                if entry.name not in {".git", ".venv", "site"} and not entry.name.startswith(".pytest"):
                    (root / entry.name).symlink_to(entry)
            (root / ".venv").symlink_to(VENV_BIN.parent)
            made[doc] = root
        return made[doc]

    return workspace


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """``mserve start``: the bundled servables, as the README's first steps serve them."""
    started = Started([], tmp_path_factory.mktemp("readme_default"), free_port())
    try:
        started.wait_ready(timeout=300)
    except BaseException:
        started.proc.kill()
        raise
    yield started
    assert started.stop() == 0, started.stderr


def _rewrite(text: str, port: int, health_port: int) -> str:
    text = re.sub(r"\b5500\b", str(port), text)
    text = re.sub(r"\b5501\b", str(health_port), text)
    return text.replace("--host 0.0.0.0", "--host 127.0.0.1")


def _env(port: int) -> dict[str, str]:
    """The reader's shell: the virtualenv neither activated nor on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    env.update(NO_COLOR="1", MSERVE_URL=f"http://127.0.0.1:{port}")
    venv_bins = {str(VENV_BIN), str(VENV_BIN.resolve())}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in venv_bins)
    return env


class BlockServer:
    """A block's own ``mserve start``, in the background."""

    def __init__(self, command: str, cwd: Path, port: int, env: dict[str, str]):
        words = shlex.split(command, comments=True)
        if "--port" not in words:
            words += ["--port", str(port)]
        self.out, self.err = cwd / f"start-{port}.out", cwd / f"start-{port}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            # shlex.join leaves VAR=value prefixes unquoted, so bash still reads them as assignments.
            self.proc = subprocess.Popen(["bash", "-c", shlex.join(words)], cwd=cwd, stdout=out, stderr=err, env=env,
                                         start_new_session=True)

    def wait_serving(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while "serving on" not in self.out.read_text():
            assert self.proc.poll() is None, f"mserve start exited {self.proc.returncode}:\n{self.err.read_text()}"
            assert time.monotonic() < deadline, f"mserve start not serving after {timeout}s:\n{self.err.read_text()}"
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _pattern(shown: str) -> re.Pattern:
    parts = [re.escape(part) for part in " ".join(shown.split()).split("...")]
    return re.compile(".*".join(parts), re.S)


def _check(command: Command, done: subprocess.CompletedProcess, where: str) -> None:
    shown = [line for line in command.output if line.strip()]
    text = done.stdout + done.stderr
    if shown and shown[0].lstrip().startswith(FAILURE_OUTPUT):
        assert done.returncode != 0, f"{where}: expected to fail, but exited 0:\n{text}"
        flat = " ".join(text.split())
        for line in shown:
            assert _pattern(line).search(flat), f"{where}: output does not match {line!r}:\n{text}"
        return
    assert done.returncode == 0, f"{where}: exited {done.returncode}:\n{text}"
    if shown:
        try:
            expected = json.loads("\n".join(shown))
        except json.JSONDecodeError:
            return  # a table, a log line, an elided document: not compared
        try:
            actual = json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"{where}: expected JSON output {expected}, got:\n{text}")
        assert actual == expected, f"{where}: output differs"


@pytest.mark.parametrize("block", [_param(b) for b in SHELL_BLOCKS if b.doc == "README.md"])
def test_readme_example(block: Block, workspaces, request):
    run_block(block, workspaces, request)


def run_block(block: Block, workspaces, request) -> None:
    """Run one block's commands in its document's workspace (tests/test_docs_commands.py
    runs docs/*.md's blocks with this too)."""
    assert block.commands, f"{block.where}: a shell block without commands"
    cwd = workspaces(block.doc)
    own_server = any(START.search(c.text) for c in block.commands)
    if own_server:
        port, health_port = free_port(), free_port()
    else:
        port, health_port = request.getfixturevalue("default_server").port, free_port()
    env = _env(port)
    server: BlockServer | None = None
    try:
        for command in block.commands:
            text = _rewrite(command.text, port, health_port)
            where = f"{block.doc} line {command.line} ({command.text.splitlines()[0].strip()})"
            if START.search(command.text):
                assert server is None, f"{where}: one mserve start per block"
                server = BlockServer(text, cwd, port, env)
                server.wait_serving()
                continue
            done = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
            _check(command, done, where)
    finally:
        if server is not None:
            code = server.stop()
            assert code == 0, f"{block.where}: mserve start exited {code}:\n{server.err.read_text()}"
