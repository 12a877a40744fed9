"""The ``Transform`` abstraction (optax-style) and ``chain``.

A transform is a pair of pure functions:

* ``init(params) -> state``
* ``update(grads, state, params, ctx) -> (updates, state)``

``updates`` are *added* to the parameters (``apply_updates``), so an optimizer returns
``-lr * direction``. ``ctx`` is a dict of read-only extras (e.g. the broadcast model) that a
local correction may need. Every transform is pure tensor code: it runs one client at a time
or under ``torch.func.vmap`` over many, and never keeps state on ``self``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from atoll.tree import Tree


class Transform(NamedTuple):
    init: Callable[[Tree], Any]
    update: Callable[[Tree, Any, Tree, dict], tuple[Tree, Any]]
    # What the transform is, as plain data: ("sgd", lr, momentum, dampening, nesterov,
    # weight_decay), ("proximal", mu), ("decay", weight_decay), ("chain", (spec, ...)),
    # ("identity",); () for others. A runtime's fast path reads this, never the closures.
    spec: tuple = ()


def apply_updates(params: Tree, updates: Tree) -> Tree:
    return {k: params[k] + updates[k] for k in params}


def chain(*transforms: Transform) -> Transform:
    """Compose transforms: the updates of one are the gradients of the next."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params, ctx):
        new_state = []
        for t, s in zip(transforms, state):
            grads, s = t.update(grads, s, params, ctx)
            new_state.append(s)
        return grads, tuple(new_state)

    return Transform(init, update, ("chain", tuple(t.spec for t in transforms)))


def identity() -> Transform:
    return Transform(lambda params: (), lambda g, s, p, ctx: (g, s), ("identity",))
