"""Refusing derivatives that the reversible backward pass cannot carry.

`refuse_tangents(tree, refuse=...)` is the identity on `tree`. Its derivative rule
(a `custom_jvp`, so it also fires under `jax.grad`, which linearises first) hands
the tangents of `tree` to `refuse`, and raises `NotImplementedError` with the
message `refuse` returns, if any: a derivative that would silently be dropped or
wrong becomes a clear error that names the supported route instead.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import equinox as eqx


_Tree = TypeVar("_Tree")


@eqx.filter_custom_jvp
def refuse_tangents(tree: _Tree, *, refuse: Callable[[Any], str | None]) -> _Tree:
    """The identity on `tree`.

    **Arguments:**

    - `tree`: any PyTree; its arrays are the ones whose tangents are inspected.
    - `refuse`: called with the PyTree of tangents of `tree`'s arrays (symbolic
        zeros left out) when `tree` is differentiated; returns `None` to let them
        through, or the error message to raise.
    """
    del refuse
    return tree


@refuse_tangents.def_jvp
def _refuse_tangents_jvp(primals, tangents, *, refuse):
    (tree,), (tree_dot,) = primals, tangents
    message = refuse(tree_dot)
    if message is not None:
        raise NotImplementedError(message)
    return tree, tree_dot
