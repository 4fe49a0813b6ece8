"""The rules of MindSpore Serving's deprecated ``call_*`` method API.

Servable configs written before MindSpore Serving 1.5 build a method from
``call_preprocess[_pipeline]``, ``call_servable`` and ``call_postprocess[_pipeline]``
instead of ``add_stage``. Those calls do not say how many outputs they have: MindSpore
reads it from the method's source, from the assignment each call sits in
(``x1, x2 = register.call_preprocess(f, x1, x2)`` -> 2 outputs), and it allows them
only once each, in pipeline order, in a straight-line method body. `LegacyCalls` does
the same for one method being registered; `mserve.register` calls it.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, Callable

CALL_SERVABLE = "call_servable"
STAGE_CALLS = ("call_preprocess", "call_postprocess")
PIPELINE_CALLS = ("call_preprocess_pipeline", "call_postprocess_pipeline")


def _complex_statement(fn: Callable[..., Any], node: ast.AST, first_line: int) -> str:
    """MindSpore's description of the statement that makes a method too complex."""
    lines = inspect.getsource(fn).split("\n")
    end = getattr(node, "end_lineno", None) or node.lineno
    code = "".join(lines[i - 1] + "\n" for i in range(node.lineno, end + 1))
    start, stop = node.lineno + first_line, end + first_line
    where = f"{start}~{stop}" if start != stop else f"{start}"
    return f"line {where} in {fn.__name__}, code: \n" + code


def parse_method(fn: Callable[..., Any]) -> dict[str, tuple[int, int]]:
    """``{call name: (inputs count, outputs count)}`` for each deprecated call in the
    body of ``fn``; empty when it uses none. Raises MindSpore's errors for bodies it
    cannot read that way."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        _, first_line = inspect.findsource(fn)
    except (OSError, TypeError):
        return {}  # no source (built at run time): only add_stage can be used there
    tree = ast.parse(source)
    body = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if body is None:
        return {}
    meta: dict[str, tuple[int, int]] = {}
    other: ast.AST | None = None
    for node in body.body:
        if isinstance(node, (ast.Return, ast.Expr)):
            continue
        if not isinstance(node, ast.Assign):
            other = other or node
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name):
            outputs = 1
        elif isinstance(target, ast.Tuple):
            outputs = len(target.elts)
        else:
            continue
        call = node.value
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name is None:
            other = other or node
            continue
        inputs = len(call.args)
        if name in STAGE_CALLS or name in PIPELINE_CALLS:
            inputs -= 1  # the first argument is the function
        elif name != CALL_SERVABLE:
            other = other or node
            continue
        if inputs <= 0:
            raise RuntimeError(f"Invalid '{name}' invoke args")
        meta[name] = (inputs, outputs)
    if meta and other is not None:
        names = ";".join(meta)
        raise RuntimeError(
            f"Failed to parse method '{fn.__name__}', complex statements such as conditions and loops are not "
            f"supported in register_method when the interface '{names}' is used, use 'add_stage' to replace "
            f"'{names}', code {type(other)}: {_complex_statement(fn, other, first_line)}")
    if meta and CALL_SERVABLE not in meta:
        raise RuntimeError(f"Not find the invoke of '{CALL_SERVABLE}'")
    return meta


class LegacyCalls:
    """The deprecated calls of one method being registered: their output counts (from
    its source) and MindSpore's order rules (preprocess, servable, postprocess, each
    at most once)."""

    def __init__(self, fn: Callable[..., Any]):
        self.method = fn.__name__
        self.meta = parse_method(fn)
        self.preprocess = self.servable = self.postprocess = False

    def outputs_count(self, call: str) -> int:
        if call not in self.meta:
            raise RuntimeError(
                f"Failed to parse method '{self.method}', complex statements such as conditions and loops are not "
                f"supported in register_method when the interface '{call}' is used, use 'add_stage' to replace "
                f"'{call}'")
        return self.meta[call][1]

    def _fail(self, text: str) -> RuntimeError:
        return RuntimeError(f"Check failed in method '{self.method}', {text}")

    def before_preprocess(self, call: str) -> int:
        if self.preprocess:
            raise self._fail("call_preprocess or call_preprocess_pipeline should not be invoked more than once")
        if self.servable:
            raise self._fail(f"call_servable should be invoked after {call}")
        if self.postprocess:
            raise self._fail(f"call_postprocess or call_postprocess_pipeline should be invoked after {call}")
        self.preprocess = True
        return self.outputs_count(call)

    def before_servable(self) -> int:
        if self.servable:
            raise self._fail("call_servable should not be invoked more than once")
        if self.postprocess:
            raise self._fail("call_postprocess or call_postprocess_pipeline should be invoked after call_servable")
        self.servable = True
        return self.outputs_count(CALL_SERVABLE)

    def before_postprocess(self, call: str) -> int:
        if self.postprocess:
            raise self._fail("call_postprocess or call_postprocess_pipeline should not be invoked more than once")
        self.postprocess = True
        return self.outputs_count(call)

    def check_stage_count(self, stages: int) -> None:
        """After the body ran: every call the source shows must have run once."""
        if self.meta and stages != len(self.meta):
            raise RuntimeError(
                f"Failed to parse method {self.method}, the number of stages obtained through the AST {len(self.meta)} "
                f"is inconsistent with the running result {stages}. Condition and loop statements are not supported "
                f"in methods currently.")
