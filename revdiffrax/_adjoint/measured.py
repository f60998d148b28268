"""Which leaves of the state the drift and parasitic-mode checks measure: those that
the gradient depends on.

A leaf that no vector field reads, such as a continuous normalising flow's
log-density `(x, log p)` (or a running cost), is a quadrature: its reconstruction
on the backward pass feeds no vector-Jacobian product, so its error cannot reach
the gradient, and without the checks XLA removes it as dead code, together with
the evaluations that only it needs (the trace's Jacobian of a CNF). Measuring the
drift on it would bring them back: on the CNF workloads of `benchmarks/pareto.py`
that made the gradient's flop count grow by 10% (Midpoint) to 85% (Dopri5)
(issue 22). Its parasitic offset $y - z$ is driven by that of the leaves the vector
field reads, and measuring it would also keep alive, under `jax.grad` (which does
not compute the loss), the forward pass's evaluations of its vector field.

So both checks measure the leaves that the vector fields read, or whose values the
pullback of a `SaveAt.fn` reads (e.g. `fn=lambda t, y, args: y[1] ** 2`; the
default `fn`, the identity, reads none); all of them with an `event` (whose
conditions are not analysed), and all of them if that leaves none. "Reads" is
found on the traced program (`jax.make_jaxpr`): a leaf is read when some output
depends on it through any operation, which over-approximates (a leaf packed into
a larger array with the others counts as read).
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._varying import varying_axes


def _depends_on(
    fn: Callable[..., Any], leaves: Sequence[Any], extra: Sequence[Any] = ()
) -> list[bool]:
    """Whether some output of `fn(*leaves, *extra)` depends on each of the `leaves`
    (by the data flow of its traced program)."""
    jaxpr = jax.make_jaxpr(fn)(*leaves, *extra).jaxpr
    sources = {v: {i} for i, v in enumerate(jaxpr.invars)}

    def of(var) -> set:
        return set() if isinstance(var, jex.Literal) else sources.get(var, set())

    for eqn in jaxpr.eqns:
        inputs = set().union(*(of(v) for v in eqn.invars))
        for out in eqn.outvars:
            sources[out] = inputs
    used = set().union(*(of(v) for v in jaxpr.outvars))
    return [i in used for i in range(len(leaves))]


def measured_leaves(
    solver, terms, t0, y0: PyTree, args, fns: list, has_event: bool
) -> tuple[bool, ...] | None:
    """Per leaf of the state, whether the checks measure it (see the module's
    docstring); `None` for all of them."""
    if has_event or varying_axes((y0, args, terms)):
        # (Inside `jax.shard_map` the state's types would have to be traced too.)
        return None
    leaves, treedef = jtu.tree_flatten(y0)
    inexact = [eqx.is_inexact_array(x) for x in leaves]

    def field(*leaves_):
        return solver.func(terms, t0, jtu.tree_unflatten(treedef, leaves_), args)

    read = _depends_on(field, leaves)
    for fn in fns:
        # The cotangent of the saved output is an input of its own (None for its
        # leaves that are not floating-point), so that only the pullback's reads of
        # the state count.
        out = jax.eval_shape(lambda y, fn=fn: fn(t0, y, args), y0)
        out = jtu.tree_map(
            lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact) else None, out
        )
        out_leaves, out_def = jtu.tree_flatten(out)
        n = len(leaves)

        def pullback(*leaves_and_cotangent, fn=fn, out_def=out_def):
            y = jtu.tree_unflatten(treedef, leaves_and_cotangent[:n])
            cotangent = jtu.tree_unflatten(out_def, leaves_and_cotangent[n:])
            _, vjp = eqx.filter_vjp(lambda y_, f_, a_: f_(t0, y_, a_), y, fn, args)
            return vjp(cotangent)

        read_by_fn = _depends_on(pullback, leaves, out_leaves)
        read = [a or b for a, b in zip(read, read_by_fn)]
    measured = tuple(r and i for r, i in zip(read, inexact))
    if all(measured) or not any(measured):
        return None
    return measured


def select(y: PyTree, measured: tuple[bool, ...] | None) -> list:
    """The leaves of `y` that the checks measure."""
    leaves = jtu.tree_leaves(y)
    if measured is None:
        return leaves
    return [x for x, m in zip(leaves, measured) if m]
