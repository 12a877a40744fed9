"""Codecs by name, so a config can write them: ``build_codec(spec)``.

A spec is one of

* a string in call syntax, ``+`` chaining: ``"error_feedback(top_k(0.01)+stochastic_quantize(4))"``,
  ``"cast(bfloat16)"``, ``"count_sketch(5, 20000, k=1000)"``, ``"identity"``. Arguments are
  Python literals; a bare word is a string (``float16``) unless it names a codec; a call or a
  ``+`` expression inside an argument is a codec (``error_feedback``'s ``inner``).
* a table ``{"name": "top_k", "fraction": 0.01}`` (other keys are keyword arguments; an argument
  may itself be a spec);
* a list of specs: their chain;
* a ``Codec``: returned as it is.

Unknown names, bad arguments and malformed strings raise ``ValueError`` naming the codec and,
for a misspelt name, the closest known one.
"""
from __future__ import annotations

import ast
import difflib
import inspect
from typing import Any, Callable

from atoll.codecs.base import Codec, chain, identity
from atoll.codecs.clip import clip_l1, clip_l2, clip_linf
from atoll.codecs.feedback import error_feedback
from atoll.codecs.intrinsic import dithered_quantize
from atoll.codecs.momentum import worker_momentum
from atoll.codecs.noise import gaussian_noise, laplace_noise
from atoll.codecs.quantize import cast, stochastic_quantize
from atoll.codecs.sketch import count_sketch
from atoll.codecs.sparsify import rand_k, top_k
from atoll.parse_lock import PARSE

CODECS: dict[str, Callable[..., Codec]] = {
    f.__name__: f for f in (identity, cast, stochastic_quantize, top_k, rand_k, count_sketch,
                            error_feedback, clip_l1, clip_l2, clip_linf, gaussian_noise, laplace_noise,
                            dithered_quantize, worker_momentum)
}


def build_codec(spec: Any) -> Codec:
    """The codec described by ``spec`` (see the module docstring)."""
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        try:
            with PARSE:
                tree = ast.parse(spec.strip(), mode="eval").body
        except SyntaxError as exc:
            raise ValueError(f"codec spec {spec!r} is not valid: {exc.msg}") from None
        return _from_ast(tree, spec)
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"codec table {spec!r} has no 'name' key")
        kwargs = {k: _arg(v) for k, v in spec.items() if k != "name"}
        return _call(spec["name"], [], kwargs)
    if isinstance(spec, (list, tuple)):
        return chain(*(build_codec(s) for s in spec))
    raise ValueError(f"a codec spec must be a string, a table or a list, got {type(spec).__name__}")


def _arg(value: Any) -> Any:
    """A table's argument: nested tables and lists are codecs, anything else a value."""
    return build_codec(value) if isinstance(value, (dict, list)) else value


def _from_ast(node: ast.AST, spec: str) -> Codec:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return chain(*(_from_ast(n, spec) for n in _terms(node)))
    if isinstance(node, ast.Name):
        return _call(node.id, [], {})
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = [_value(a, spec) for a in node.args]
        kwargs = {kw.arg: _value(kw.value, spec) for kw in node.keywords if kw.arg}
        if len(kwargs) != len(node.keywords):
            raise ValueError(f"codec spec {spec!r}: **kwargs are not allowed")
        return _call(node.func.id, args, kwargs)
    raise ValueError(f"codec spec {spec!r}: expected name(args) terms joined by '+', "
                     f"got {ast.unparse(node)!r}")


def _terms(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left) + _terms(node.right)
    return [node]


def _value(node: ast.AST, spec: str) -> Any:
    if isinstance(node, ast.Name) and node.id not in CODECS:
        return node.id  # a bare word: a string such as float16
    if isinstance(node, (ast.Call, ast.Name)) or (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)):
        return _from_ast(node, spec)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"codec spec {spec!r}: argument {ast.unparse(node)!r} is not a literal") from None


def _call(name: Any, args: list, kwargs: dict) -> Codec:
    factory = CODECS.get(name) if isinstance(name, str) else None
    if factory is None:
        close = difflib.get_close_matches(str(name), CODECS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown codec {name!r}{hint}; known codecs: {', '.join(sorted(CODECS))}")
    sig = inspect.signature(factory)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        shown = str(sig.replace(return_annotation=inspect.Signature.empty)).replace("'", "")
        raise ValueError(f"codec {name}{shown}: {exc}") from None
    return factory(*args, **kwargs)
