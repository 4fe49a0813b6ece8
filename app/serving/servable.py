"""Loading servable directories: ``NAME/servable_config.py`` plus version folders.

`load_servable` runs servable_config.py once (collecting its models and methods),
then loads each requested version folder's model files through the backends, checks
the stage wiring against the models, and warms them up. Every failure here is a
`ServableLoadError` raised at start-up with the file, servable and version in it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import register
from ..backends import BackendError, Device, find_backend, load_model, placement
from . import mindspore_modules
from .batching import Batcher, BatchObserver
from ..errors import NotFound, ServableLoadError
from .model_stage import InstanceError, ModelStage
from .names import SERVABLE_PACKAGE, servable_name_problem
from .progress import LoadProgress, report
from ..register import MethodDef, Model, ServableDefinition

log = logging.getLogger("mserve.serving.servable")


def list_versions(servable_dir: Path) -> list[int]:
    """Version numbers present as numbered folders, ascending. A folder ``0`` is no
    version (``0`` asks for the newest), as in MindSpore Serving."""
    return sorted(
        int(p.name) for p in servable_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name.isascii()
        and int(p.name) > 0
    )


def choose_versions(root: Path, name: str, has_models: bool, requested: Sequence[int]) -> list[int]:
    """The version numbers to load, as MindSpore Serving picks them: ``0`` is the
    newest version folder; a servable that declares no model needs no folder (``0``
    is then version 1). Raises `ServableLoadError` with MindSpore's texts."""
    folder = root / name
    if not has_models:
        return list(dict.fromkeys(1 if n == 0 else n for n in requested))
    present = list_versions(folder)
    if not present:
        raise ServableLoadError(
            f"There is no valid version directory of models while there are models declared in servable_config.py, "
            f"servable directory: {root}, servable name: {name} (no version folder 1/, 2/, ... in {folder})")
    wanted = []
    for number in requested:
        if number == 0:
            wanted.append(present[-1])
        elif number in present:
            wanted.append(number)
        else:
            raise ServableLoadError(
                f"Start servable failed: There is no specified version directory of models, specified version "
                f"number: {number}, servable directory: '{root}', servable name: '{name}' (version {number} not "
                f"found in {folder}; present: {', '.join(map(str, present))})")
    return list(dict.fromkeys(wanted))


def load_definition(servable_directory: str | Path, name: str) -> ServableDefinition:
    """Run ``servable_directory/name/servable_config.py`` and return what it declared.

    As MindSpore Serving does, the servable directory is on ``sys.path`` and the
    config is imported as ``name.servable_config``, a module of the package ``name``
    (the servable's folder), so helpers beside it import either way:
    ``from .helper import f`` or ``from name.helper import f``. The package is made
    afresh on every load, so loading a servable again (another directory with a
    servable of the same name, or a restart in the same process) never reuses the
    helpers of an earlier load.
    """
    root = Path(servable_directory)
    folder = root / name
    if not folder.is_dir():
        raise ServableLoadError(
            f"Check servable config failed, directory '{folder}' not exist, servable directory '{root}', servable "
            f"name '{name}'" + (f" (servable_config.py not found: there is no folder {name} in {root})" if root.is_dir()
                                else f" (the servable directory {root} does not exist)"))
    config = folder / "servable_config.py"
    if not config.is_file():
        raise ServableLoadError(
            f"Check servable config failed, file '{config}' not exist,  servable directory '{root}', servable name "
            f"'{name}' (servable_config.py not found)")
    definition = ServableDefinition(name)
    module_name = f"{name}.servable_config"
    mindspore_modules.install()  # MindSpore 2.0's dataset modules, for configs written for it
    with register.defining(definition):
        _fresh_package(root, name)
        if str(root) not in sys.path:
            sys.path.append(str(root))
        spec = importlib.util.spec_from_file_location(module_name, config)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ServableLoadError as exc:
            raise ServableLoadError(f"servable '{name}': {exc}{_where(exc, config)}") from exc
        except BaseException as exc:
            sys.modules.pop(module_name, None)
            raise ServableLoadError(
                f"servable '{name}': {config.name} raised {type(exc).__name__}: {exc}{_where(exc, config)}"
            ) from exc
    if not definition.methods:
        raise ServableLoadError(
            f"There is no method registered for servable '{name}': {config} registers none (use "
            f"@register.register_method)")
    return definition




def _fresh_package(root: Path, name: str) -> None:
    """Make ``sys.modules[name]`` the package of the folder ``root/name`` (running
    its ``__init__.py`` if it has one), dropping an earlier load's package and its
    modules; refuse a name that another module already has."""
    problem = servable_name_problem(name)
    if problem is not None:
        raise ServableLoadError(problem)
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]
    folder = root / name
    init = folder / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    else:  # a namespace package, as Python makes for a folder without __init__.py
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
    assert spec is not None
    package = importlib.util.module_from_spec(spec)
    setattr(package, SERVABLE_PACKAGE, True)
    sys.modules[name] = package
    if init.is_file():
        assert spec.loader is not None
        try:
            spec.loader.exec_module(package)
        except BaseException as exc:
            del sys.modules[name]
            raise ServableLoadError(f"servable '{name}': {init} raised {type(exc).__name__}: {exc}") from exc


def _where(exc: BaseException, config: Path) -> str:
    """`` (at path:line)`` for the deepest frame of servable_config.py in the traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == config]
    if not frames and isinstance(exc, SyntaxError) and exc.lineno:
        return f" (at {config}:{exc.lineno})"
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


@dataclass
class BatchSettings:
    """How model stages with a batch dimension are batched.

    ``max_batch_size`` and ``batch_sizes`` (the buckets) apply to artifacts whose
    batch dimension is free; a model's ``options`` may set its own. With
    ``cross_request=False`` each request's instances are still batched together,
    just never with other requests'.
    """

    max_batch_size: int = 32
    batch_sizes: Sequence[int] | None = None
    max_batch_delay_ms: float = 2.0
    cross_request: bool = True
    observer: BatchObserver | None = None


class ModelCallError(RuntimeError):
    """`Model.call` inside a Python stage failed on a row the model refused; the
    stage's error keeps the model's message and status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class LoadedVersion:
    """One version folder of a servable, its models loaded and warm."""

    name: str
    version: int
    definition: ServableDefinition
    stages: dict[int, ModelStage]  # Model.index -> stage
    batchers: dict[int, Batcher] = field(default_factory=dict)
    stage_pool: ThreadPoolExecutor | None = None  # for per-instance Python stages
    backends: dict[int, tuple[str, str]] = field(default_factory=dict)  # Model.index -> (backend, device type)
    # Graphs after the first of a model of several files, for Model.call(subgraph=i):
    # (Model.index, i) -> a stage over runtime.subgraphs[i] of every instance.
    subgraph_stages: dict[tuple[int, int], ModelStage] = field(default_factory=dict)

    def subgraph_count(self, model: Model) -> int:
        return 1 + sum(1 for index, _ in self.subgraph_stages if index == model.index)

    @property
    def methods(self) -> dict[str, MethodDef]:
        return self.definition.methods

    def model_stage(self, model: Model) -> ModelStage:
        return self.stages[model.index]

    def run_model(
        self, model: Model, rows: list[tuple], deadline: float, announced: int = 0
    ) -> list[tuple | InstanceError]:
        """Rows through the model: via its cross-request batcher when it has one
        (``announced``: the rows this request told the batcher to expect)."""
        batcher = self.batchers.get(model.index)
        if batcher is not None:
            return batcher.run(rows, deadline, announced)
        stage = self.stages[model.index]
        if stage.remote:  # the model lives in a device process (mserve.devices.remote)
            return stage.call(rows, deadline, 0, batched=False)  # type: ignore[attr-defined]
        return stage.run(rows)

    def call_model(self, model: Model, args: tuple, deadline: float, subgraph: int = 0) -> Any:
        """``Model.call`` from inside a Python stage, with MindSpore Serving's results:
        ``call(x1, x2)`` gives one instance's outputs (the array itself when the
        model has one output, else a tuple); ``call([[x1, x2], ...])`` (a list or
        tuple of instances) gives a tuple with one tuple of outputs per instance.
        ``subgraph`` > 0 runs that graph of a model of several files (unbatched
        across requests: only the first graph serves add_stage and has a batcher)."""
        many = len(args) == 1 and isinstance(args[0], (tuple, list))
        rows = [tuple(instance) for instance in args[0]] if many else [tuple(args)]
        name = f"Model({model.model_key}{f', subgraph={subgraph}' if subgraph else ''}).call()"
        stage = self.stages[model.index] if not subgraph else self.subgraph_stages.get((model.index, subgraph))
        if stage is None:
            raise RuntimeError(
                f"{name} failed: The model does not have subgraph of index {subgraph}, the subgraph count of the "
                f"model is {self.subgraph_count(model)}"
            )
        if not rows:
            raise RuntimeError(f"{name} failed: Input instances count is 0")
        expected = len(stage.inputs)
        for i, row in enumerate(rows):
            if len(row) != expected:
                raise RuntimeError(
                    f"{name} failed: The inputs count {len(row)} of instance {i} is not equal to the inputs count "
                    f"{expected} of the model"
                )
        if not subgraph:
            results = self.run_model(model, rows, deadline)
        elif stage.remote:  # the graph lives in a device process (mserve.devices.remote)
            results = stage.call(rows, deadline, 0, batched=False)  # type: ignore[attr-defined]
        else:
            results = stage.run(rows)
        for r in results:
            if isinstance(r, InstanceError):
                raise ModelCallError(f"{name} failed: {r.message}", r.status)
        if many:
            return tuple(tuple(r) for r in results)
        outputs = results[0]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    @property
    def compile_count(self) -> int:
        return sum(s.compile_count for s in self.stages.values())

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.stop()
        if self.stage_pool is not None:
            self.stage_pool.shutdown(wait=False, cancel_futures=True)
        _release(stage.runtimes for stage in self.stages.values())


def _release(groups: Any) -> None:
    """Let the runtimes free their device memory (those that can say so)."""
    for runtimes in groups:
        for runtime in runtimes:
            close = getattr(runtime, "close", None)
            if close is None:
                continue
            try:
                close()
            except Exception:  # releasing must not stop the others from releasing
                log.exception("releasing %r failed", runtime)


def _load_instances(
    what: str, model: Model, files: list[Path], devices: Sequence[Any], servable_folder: Path,
    dec_key: bytes | None, dec_mode: str, starting: Callable[[str, list[Device]], None] = lambda b, d: None,
) -> tuple[list[Any], tuple[str, str]]:
    """A model's instances, from the backend that serves its format on the devices'
    type: one per device, or one spanning them all when the model declares a
    sharding. Returns them with (backend name, device type). ``starting(backend,
    devices)`` is told once the backend and device type are chosen (progress)."""
    wanted = [d if isinstance(d, Device) else Device(None, int(d)) for d in devices]
    if not wanted:
        raise ServableLoadError(f"{what}: no device to load it on (device_ids is empty)")
    try:
        backend, kind = find_backend(model.model_format, wanted[0].type)
        chosen = [Device(kind, d.id) for d in wanted]
        groups = placement(backend, model.options, chosen)
    except BackendError as exc:
        raise ServableLoadError(f"{what}: {exc}") from None
    starting(backend.name, chosen)
    config_file = getattr(model, "config_file", None)  # register.Model gains it with issue 9
    runtimes: list[Any] = []
    try:
        for group in groups:
            runtimes.append(load_model(
                model.model_format, files, model.options, group, backend=backend,
                config_file=None if config_file is None else servable_folder / config_file,
                context=getattr(model, "context", None), dec_key=dec_key, dec_mode=dec_mode,
            ))
    except Exception as exc:
        _release([runtimes])
        if isinstance(exc, ServableLoadError):
            raise
        raise ServableLoadError(f"{what}: loading on {backend.name} ({kind}) failed: {exc}") from exc
    return runtimes, (backend.name, kind)


def load_version(
    servable_directory: Path,
    definition: ServableDefinition,
    version: int,
    devices: Sequence[Any],
    batching: BatchSettings | None = None,
    num_parallel_workers: int = 0,
    dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM",
) -> LoadedVersion:
    batching = batching or BatchSettings()
    name = definition.name
    folder = Path(servable_directory) / name / str(version)
    stages: dict[int, ModelStage] = {}
    used: dict[int, tuple[str, str]] = {}
    subgraphs: dict[tuple[int, int], ModelStage] = {}
    for model in definition.models:
        files = [folder / f for f in model.model_files]
        for f in files:
            if not f.is_file():
                _release(stage.runtimes for stage in stages.values())
                raise ServableLoadError(
                    f"Load model failed, servable directory: '{servable_directory}', servable name: '{name}', model "
                    f"file: '{', '.join(model.model_files)}', version number {version} (model file {f} not found)")
        try:
            def starting(backend: str, chosen: list[Device], model_file: str = model.model_files[0]) -> None:
                report(LoadProgress(name, version, "loading", model_file, backend, tuple(map(str, chosen))))

            runtimes, used[model.index] = _load_instances(
                f"servable '{name}' version {version}: model {', '.join(model.model_files)} ({model.model_format})",
                model, files, devices, Path(servable_directory) / name, dec_key, dec_mode, starting,
            )
        except BaseException:
            _release(stage.runtimes for stage in stages.values())
            raise
        limits = (model.options.get("max_batch_size", batching.max_batch_size),
                  model.options.get("batch_sizes", batching.batch_sizes))
        stages[model.index] = ModelStage(model, runtimes, *limits)
        for i in range(1, min(len(getattr(r, "subgraphs", ())) for r in runtimes)):
            subgraphs[(model.index, i)] = ModelStage(model, [r.subgraphs[i] for r in runtimes], *limits)
        log.info(
            "servable %s version %d: model %s on backend %s, device(s) %s",
            name, version, ", ".join(model.model_files), used[model.index][0],
            ", ".join("+".join(map(str, getattr(r, "devices", ()))) or "?" for r in runtimes),
        )
    try:
        _check_wiring(definition, stages)
        _check_batch_dims(name, stages)
        for stage in stages.values():
            stage.name_inputs(list(definition.methods.values()))
        for stage in [*stages.values(), *subgraphs.values()]:
            model_file = stage.model.model_files[0]

            def on_bucket(k: int, n: int, size: int | None, model_file: str = model_file) -> None:
                report(LoadProgress(name, version, "compiling", model_file, step=k, total=n, batch_size=size))

            try:
                stage.warm_up(on_bucket)
            except Exception as exc:
                raise ServableLoadError(
                    f"servable '{name}' version {version}: warming up {model_file} failed: {exc}"
                ) from exc
    except BaseException:
        _release(stage.runtimes for stage in stages.values())
        raise
    batchers = {}
    if batching.cross_request:
        for index, stage in stages.items():
            if stage.model.with_batch_dim:
                delay_ms = stage.model.options.get("max_batch_delay_ms", batching.max_batch_delay_ms)
                batchers[index] = Batcher(stage, delay_ms / 1000.0, batching.observer)
    pool = None
    if num_parallel_workers > 0:
        pool = ThreadPoolExecutor(num_parallel_workers, thread_name_prefix=f"mserve-{name}-stage")
    log.info(
        "servable %s version %d ready: %d model(s), %d program(s) compiled",
        name, version, len(stages), sum(s.compile_count for s in stages.values()),
    )
    report(LoadProgress(name, version, "ready"))
    return LoadedVersion(name, version, definition, stages, batchers, pool, used, subgraphs)


def _check_batch_dims(name: str, stages: dict[int, ModelStage]) -> None:
    """A model declared ``with_batch_dim=True`` must have the batch as the leading
    dimension of every batched input and of every output (instances are stacked into
    it and split out of it); otherwise requests would fail, so refuse it at load."""
    for ms in stages.values():
        model = ms.model
        what = f"servable '{name}': model {model.model_files[0]}"
        bad = [i for i in model.without_batch_dim_inputs if not 0 <= i < len(ms.inputs)]
        if bad:
            raise ServableLoadError(
                f"{what}: without_batch_dim_inputs {bad} out of range, the model has {len(ms.inputs)} inputs"
            )
        if not model.with_batch_dim:
            continue
        batch = ms.fixed_batch  # None: a symbolic batch dimension
        specs = [("input", i, s) for i, s in enumerate(ms.inputs) if ms.batched_inputs[i]]
        specs += [("output", i, s) for i, s in enumerate(ms.outputs)]
        for kind, i, spec in specs:
            if spec.shape is not None and (not spec.shape or spec.shape[0] != batch):
                raise ServableLoadError(
                    f"{what} is declared with_batch_dim=True, but its {kind} {i} ({spec.describe()}) does not lead "
                    f"with the batch dimension ({'symbolic' if batch is None else batch}); declare the model with "
                    f"with_batch_dim=False, or list inputs without it in without_batch_dim_inputs"
                )


def _check_wiring(definition: ServableDefinition, stages: dict[int, ModelStage]) -> None:
    for method in definition.methods.values():
        for stage in method.stages:
            if not isinstance(stage.target, Model):
                continue
            ms = stages[stage.target.index]
            what = f"servable '{definition.name}' method '{method.name}': model {stage.target.model_files[0]}"
            if len(stage.inputs) != len(ms.inputs):
                raise ServableLoadError(
                    f"The inputs count {len(stage.inputs)} in register_method not equal to the count {len(ms.inputs)} "
                    f"defined in model ({what} takes {len(ms.inputs)} inputs but add_stage wires {len(stage.inputs)})")
            if len(stage.outputs) != len(ms.outputs):
                raise ServableLoadError(
                    f"The outputs count {len(stage.outputs)} in register_method not equal to the count "
                    f"{len(ms.outputs)} defined in model ({what} has {len(ms.outputs)} outputs but add_stage says "
                    f"outputs_count={len(stage.outputs)})"
                )
            if stage.batch_size is not None:
                raise ServableLoadError(f"{what}: batch_size applies to Python stages only")


@dataclass
class Servable:
    """All loaded versions of one servable."""

    name: str
    directory: Path
    definition: ServableDefinition
    versions: dict[int, LoadedVersion] = field(default_factory=dict)

    @property
    def latest(self) -> int:
        return max(self.versions)


class ServableRegistry:
    """Name -> versions, as the request path sees them. Lookups take no lock:
    the dicts are replaced, never mutated in place, when versions come and go."""

    def __init__(self) -> None:
        self._servables: dict[str, Servable] = {}
        self._lock = threading.Lock()

    def add(self, servable: Servable, loaded: LoadedVersion) -> None:
        with self._lock:
            current = self._servables.get(servable.name)
            if current is None:
                current = Servable(servable.name, servable.directory, servable.definition)
            versions = dict(current.versions)
            versions[loaded.version] = loaded
            updated = Servable(current.name, current.directory, current.definition, versions)
            self._servables = {**self._servables, servable.name: updated}

    def remove(self, name: str, version: int) -> LoadedVersion | None:
        """Stop routing to a version; returns it so the caller can close it once its
        in-flight requests are done."""
        with self._lock:
            current = self._servables.get(name)
            if current is None or version not in current.versions:
                return None
            versions = {v: lv for v, lv in current.versions.items() if v != version}
            servables = dict(self._servables)
            if versions:
                servables[name] = Servable(current.name, current.directory, current.definition, versions)
            else:
                del servables[name]
            self._servables = servables
            return current.versions[version]

    def clear(self) -> None:
        """Unload everything (stops the batchers' device threads)."""
        with self._lock:
            servables, self._servables = self._servables, {}
        for servable in servables.values():
            for loaded in servable.versions.values():
                loaded.close()

    def servables(self) -> dict[str, Servable]:
        return self._servables

    def lookup(self, name: str, version: int, method: str) -> tuple[LoadedVersion, MethodDef]:
        """The version (0 = newest) and method a request names, or `NotFound` in
        MindSpore Serving's words, followed by what is served and the nearest name."""
        servable = self._servables.get(name)
        if servable is None:
            raise NotFound(f"{_head(name, version, method)}, servable is not available{self.servable_hint(name)}")
        if version and version not in servable.versions:
            served = ", ".join(map(str, sorted(servable.versions)))
            raise NotFound(
                f"{_head(name, version, method)}, servable is not available; servable {name} serves version(s) {served}"
            )
        loaded = servable.versions[version or servable.latest]
        found = loaded.methods.get(method)
        if found is None:
            hint = _nearest(method, list(loaded.methods), f"; servable {name} has method(s) ")
            raise NotFound(f"{_head(name, version, method)}, method is not available{hint}")
        return loaded, found

    def servable_hint(self, name: str) -> str:
        """``; served: add, lenet; did you mean 'add'?`` for an unknown servable."""
        served = sorted(self._servables)
        if not served:
            return "; no servable is loaded"
        return _nearest(name, served, "; served: ")


def _head(name: str, version: int, method: str) -> str:
    """The start of a lookup's `NotFound` (made only when one is raised)."""
    shown = f" version({version}) " if version else ""
    return f"Request servable({clip(name)}) method({clip(method)}) {shown}"


# Client-supplied names are echoed in errors only this long: a URL may be megabytes.
_ECHO_LIMIT = 64
_LIST_LIMIT = 20


def clip(text: str, limit: int = _ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (``...`` marks the cut)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _nearest(wanted: str, names: list[str], intro: str) -> str:
    """``{intro}a, b, c; did you mean 'b'?`` (the list bounded, the guess by difflib)."""
    import difflib

    shown = ", ".join(names[:_LIST_LIMIT]) + (f", ... ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")
    close = difflib.get_close_matches(wanted[:256], names, n=1, cutoff=0.6)
    return f"{intro}{shown}" + (f"; did you mean '{close[0]}'?" if close else "")
