"""`mserve new NAME`: scaffold a servable that works straight away.

Templates:

* ``add``: a ``jax_export`` model (two float32 vectors added, free batch dimension)
  plus ``export_model.py``, the script that writes ``1/model.jaxexport``;
* ``jax-function``: a ``jax_function`` model (a small softmax classifier written in
  servable_config.py) plus ``make_weights.py``, the script that writes
  ``1/weights.npz``, and a Python post-processing stage.

Each template's script is also what the CLI runs to make the version folder's
artifact, so the artifact and the script the user edits never disagree. The folder is
built under a temporary name and renamed into place: nothing is ever overwritten and
a failure leaves nothing behind.
"""

from __future__ import annotations

import enum
import os
import runpy
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.markup import escape

from . import render
from .render import fail

EPILOG = """\
[bold]Examples[/]

  [dim]# ./demo: a jax.export model adding two vectors[/]
  mserve new demo
  [dim]# ./clf: a JAX function in servable_config.py + weights.npz[/]
  mserve new clf --template jax-function
  mserve new demo --dir ./servables && mserve start ./servables --servable demo
"""


class Template(str, enum.Enum):
    add = "add"
    jax_function = "jax-function"


@dataclass(frozen=True)
class Spec:
    files: dict[str, str]  # relative path -> text (with __NAME__ placeholders)
    generator: str  # the script (one of files) whose build(version_dir) makes the artifact
    invoke_args: str  # what to pass to `mserve invoke NAME:...`


# --------------------------------------------------------------------------- add

_ADD_CONFIG = '''\
"""Servable __NAME__: adds two float32 vectors (scaffolded by `mserve new`).

Layout:
    __NAME__/servable_config.py   this file: declares the model and the methods
    __NAME__/export_model.py      writes 1/model.jaxexport (edit the function, re-run it)
    __NAME__/1/model.jaxexport    version 1's model; add 2/, 3/ ... for new versions

Try it, from the folder that holds __NAME__/:
    mserve start --servable __NAME__
    mserve invoke __NAME__:add -i x1='[1.0, 2.0]' -i x2='[3.0, 4.0]'
"""

import numpy as np

from mserve import register

# The model file is looked up in every version folder (1/, 2/, ...).
# with_batch_dim=True: the model's first dimension is the batch, so one instance is
# a [2] vector and the server stacks concurrent instances into one model call.
# options={"max_batch_size": 32} caps that batch (32 is the default).
model = register.declare_model(model_file="model.jaxexport", model_format="jax_export", with_batch_dim=True)


def to_float32(x1, x2):
    """A Python stage: runs once per instance, numpy values in, numpy values out."""
    return np.asarray(x1, np.float32), np.asarray(x2, np.float32)


# A method. Its parameter names are the request's input names; output_names are the
# reply's. The body runs once at load time to record the stages; it does not compute.
# Call it at POST /model/__NAME__:add with {"instances": [{"x1": [...], "x2": [...]}]}.
@register.register_method(output_names=["y"])
def add(x1, x2):
    y = register.add_stage(model, x1, x2, outputs_count=1)
    return y


# The same model behind a Python pre-processing stage, so integer inputs work too.
# tag= names the stage in errors ("Preprocess Failed: ...").
@register.register_method(output_names=["y"])
def add_any(x1, x2):
    x1, x2 = register.add_stage(to_float32, x1, x2, outputs_count=2, tag="Preprocess")
    y = register.add_stage(model, x1, x2, outputs_count=1)
    return y
'''

_ADD_EXPORT = '''\
"""Write this servable's model artifact with jax.export.

    python export_model.py            # writes 1/model.jaxexport next to this file
    python export_model.py 2          # writes 2/model.jaxexport (a new version)

Change `model` or `INPUT_SPECS`, re-run, restart mserve. `mserve new` ran this
script to make version 1.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export


def model(x1, x2):
    return x1 + x2


# (shape, dtype) per input. "b" is a free batch dimension (with_batch_dim=True in
# servable_config.py); fixed sizes such as (2, 2) work too.
INPUT_SPECS = [("b, 2", jnp.float32), ("b, 2", jnp.float32)]


def build(version_dir: Path) -> Path:
    scope = export.SymbolicScope()
    specs = [
        jax.ShapeDtypeStruct(export.symbolic_shape(shape, scope=scope) if isinstance(shape, str) else shape, dtype)
        for shape, dtype in INPUT_SPECS
    ]
    # Exported for CPU and CUDA, so the same file serves on either.
    exported = export.export(jax.jit(model), platforms=("cpu", "cuda"))(*specs)
    out = Path(version_dir) / "model.jaxexport"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(exported.serialize())
    return out


if __name__ == "__main__":
    version = sys.argv[1] if len(sys.argv) > 1 else "1"
    print(build(Path(__file__).resolve().parent / version))
'''

# --------------------------------------------------------------------------- jax-function

_FN_CONFIG = '''\
"""Servable __NAME__: a small classifier written as a JAX function (scaffolded by `mserve new`).

Layout:
    __NAME__/servable_config.py   this file: the JAX function, the model, the methods
    __NAME__/make_weights.py      writes 1/weights.npz (replace with your trained weights)
    __NAME__/1/weights.npz        version 1's weights; add 2/, 3/ ... for new versions

Try it, from the folder that holds __NAME__/:
    mserve start --servable __NAME__
    mserve invoke __NAME__:predict -i x='[1.0, 2.0, 3.0, 4.0]'
"""

import jax
import numpy as np

from mserve import register


def forward(params, x):
    """The model: any JAX function f(params, *inputs).

    params is the version folder's weights file as a dict (name -> array), kept on the
    device. x is a batch of instances: shape [b, 4].
    """
    return jax.nn.softmax(x @ params["w"] + params["b"])


# model_format="jax_function": mserve exports `forward` with input_specs at load time,
# so shape or dtype mistakes show up at start, not on the first request.
# input_specs: (shape, dtype) per input, "b" = the free batch dimension.
model = register.declare_model(
    model_file="weights.npz",
    model_format="jax_function",
    with_batch_dim=True,
    options={"function": forward, "input_specs": [("b, 4", "float32")]},
)


def top_class(probs):
    """A Python stage after the model: once per instance, numpy in, value out."""
    return np.int32(np.argmax(probs))


# Call it at POST /model/__NAME__:predict with {"instances": [{"x": [1.0, 2.0, 3.0, 4.0]}]}.
@register.register_method(output_names=["probs", "label"])
def predict(x):
    probs = register.add_stage(model, x, outputs_count=1)
    label = register.add_stage(top_class, probs, outputs_count=1, tag="Postprocess")
    return probs, label
'''

_FN_WEIGHTS = '''\
"""Write this servable's weights: 1/weights.npz with w [4, 3] and b [3] (float32).

    python make_weights.py            # writes 1/weights.npz next to this file
    python make_weights.py 2          # writes 2/weights.npz (a new version)

Replace the random values with trained ones (.npz or .safetensors, names matching
what `forward` in servable_config.py reads). `mserve new` ran this script to make
version 1.
"""

import sys
from pathlib import Path

import numpy as np


def build(version_dir: Path) -> Path:
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "b": np.zeros(3, np.float32),
    }
    out = Path(version_dir) / "weights.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **weights)
    return out


if __name__ == "__main__":
    version = sys.argv[1] if len(sys.argv) > 1 else "1"
    print(build(Path(__file__).resolve().parent / version))
'''

_README = """\
# __NAME__

A servable scaffolded by `mserve new` (template: __TEMPLATE__). From the folder that holds `__NAME__/`:

    mserve start --servable __NAME__
    mserve invoke __NAME__:__INVOKE__

See servable_config.py for how it is put together.
"""

TEMPLATES: dict[Template, Spec] = {
    Template.add: Spec(
        {"servable_config.py": _ADD_CONFIG, "export_model.py": _ADD_EXPORT, "README.md": _README},
        "export_model.py",
        "add -i x1='[1.0, 2.0]' -i x2='[3.0, 4.0]'",
    ),
    Template.jax_function: Spec(
        {"servable_config.py": _FN_CONFIG, "make_weights.py": _FN_WEIGHTS, "README.md": _README},
        "make_weights.py",
        "predict -i x='[1.0, 2.0, 3.0, 4.0]'",
    ),
}

def scaffold(name: str, parent: Path, template: Template) -> Path:
    """Create ``parent/name``; returns it. Refuses an existing path."""
    # The loader's own rule, with what a server process has imported by the time it
    # loads servables (the template's model is made with JAX below anyway).
    import jax  # noqa: F401

    from mserve import server  # noqa: F401
    from mserve.serving.names import servable_name_problem

    problem = servable_name_problem(name)
    if problem is not None:
        fail(problem)
    if not parent.is_dir():
        fail(f"--dir {parent} is not a directory")
    target = parent / name
    if target.exists() or target.is_symlink():
        fail(f"{target} already exists; mserve new never overwrites (pick another name or --dir)")
    spec = TEMPLATES[template]
    building = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".mserve-new", dir=parent))
    try:
        for rel, text in spec.files.items():
            content = (
                text.replace("__NAME__", name)
                .replace("__TEMPLATE__", template.value)
                .replace("__INVOKE__", spec.invoke_args)
            )
            (building / rel).write_text(content)
        _run_generator(building / spec.generator, building / "1")
        if target.exists() or target.is_symlink():
            fail(f"{target} appeared while scaffolding; not overwriting it")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(building, 0o777 & ~mask)  # mkdtemp made it private
        os.rename(building, target)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return target


def _run_generator(script: Path, version_dir: Path) -> None:
    """Run ``build(version_dir)`` from the template's own script (no .pyc left behind)."""
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        namespace = runpy.run_path(str(script), run_name="mserve_scaffold")
        namespace["build"](version_dir)
    finally:
        sys.dont_write_bytecode = dont_write


def new(
    name: str = typer.Argument(..., help="Servable name (also its folder name and URL name)."),
    directory: Path = typer.Option(Path("."), "--dir", "-d", help="Where to create NAME/."),
    template: Template = typer.Option(Template.add, "--template", "-t", help="What to start from."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Create a servable folder with a working model, ready for mserve start.

    Writes NAME/servable_config.py (commented), the script that makes the model, and version folder 1/ with the artifact made on the spot. Never overwrites.
    """
    with render.reported(debug, unexpected_code=1):
        target = scaffold(name, directory.expanduser(), template)
        spec = TEMPLATES[template]
        console = render.out()
        console.print(f"[green]created[/] {escape(str(target))}/ (template {template.value})", soft_wrap=True)
        for path in sorted(p for p in target.rglob("*") if p.is_file()):
            console.print(f"  {escape(str(path))}", soft_wrap=True)
        here = directory.expanduser().resolve() == Path.cwd().resolve()
        start_cmd = f"mserve start --servable {name}" if here else f"mserve start {shlex.quote(str(directory))} --servable {name}"
        console.print("\nTry it:", soft_wrap=True)
        console.print(f"  {escape(start_cmd)}", soft_wrap=True)
        console.print(f"  {escape(f'mserve invoke {name}:{spec.invoke_args}')}", soft_wrap=True)
