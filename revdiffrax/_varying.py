"""Inside `jax.shard_map` (with its default `check_vma=True`) every value has a type
that says over which manual mesh axes it varies. A loop carry must keep its type,
so a carry that starts invariant (e.g. a buffer of zeros, or a time) but becomes
varying in the loop body (because it is computed from a sharded `y0`) is refused:
"while_loop body function carry input and carry output must have equal types".

`ReversibleAdjoint` therefore marks every input of the solve, and every loop carry
it or diffrax builds, as varying over all the axes that any input varies over.
Outside `shard_map`, or for a solve whose inputs are all replicated, that set is
empty and nothing changes. Casting an input from invariant to varying is JAX's
`pvary`, whose transpose is `psum`: the cotangent of a replicated input (e.g. the
weights of a neural vector field, replicated over a data-parallel mesh) is summed
over the devices by JAX's own autodiff, outside the `custom_vjp`.
"""

from collections.abc import Callable, Hashable

import equinox as eqx
import jax
import jax.lax as lax
import jax.tree_util as jtu
from equinox.internal._loop.common import (  # pyright: ignore[reportMissingImports]
    common_rewrite,
)
from jaxtyping import PyTree


def _varying(x) -> frozenset[Hashable]:
    """The manual mesh axes over which the array (or `jax.ShapeDtypeStruct`) `x`
    varies; empty where JAX does not track them (outside `shard_map`, with
    `check_vma=False`, or before JAX 0.6)."""
    if not isinstance(x, jax.ShapeDtypeStruct):
        typeof = getattr(jax, "typeof", None) or jax.core.get_aval  # pyright: ignore
        x = typeof(x)
    vma = getattr(x, "vma", None)  # JAX 0.6 to 0.9
    if vma is None:  # JAX >= 0.10
        vma = getattr(getattr(x, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def varying_axes(tree: PyTree) -> frozenset[Hashable]:
    """The union of the manual mesh axes over which the array leaves of `tree`
    vary."""
    axes = frozenset()
    for leaf in jtu.tree_leaves(tree):
        if eqx.is_array(leaf):
            axes = axes | _varying(leaf)
    return axes


def _cast(leaf, axes: tuple[Hashable, ...]):
    pcast = getattr(lax, "pcast", None)
    if pcast is not None:
        return pcast(leaf, axes, to="varying")
    return lax.pvary(leaf, axes)  # pyright: ignore[reportAttributeAccessIssue]


def make_varying(tree: PyTree, axes: frozenset[Hashable]) -> PyTree:
    """Mark every array leaf of `tree` as varying over `axes` (a no-op cast: the
    values are unchanged)."""
    if not axes:
        return tree

    def cast(leaf):
        if not eqx.is_array(leaf):
            return leaf
        missing = axes - _varying(leaf)
        return _cast(leaf, tuple(missing)) if missing else leaf

    return jtu.tree_map(cast, tree)


def while_loop(
    cond_fun: Callable,
    body_fun: Callable,
    init_val: PyTree,
    *,
    max_steps: int | None,
    buffers: Callable | None,
    checkpoints: int | None = None,
) -> PyTree:
    """`equinox.internal.while_loop(..., kind="lax")` (diffrax's loop, with its
    efficient buffer writes under `vmap`), made to work inside `jax.shard_map`.

    Two of its parts are typed for a replicated loop:

    - it carries `(step, pred, prev_pred, val)`, with `prev_pred = True` created as
      a replicated constant, which the body replaces by the varying `pred`
      (`varying_while_loop` marks it as varying on entry);
    - under `vmap`, every carry leaf `x` leaving the body is `select(pred, x, old)`,
      typed as `x` but varying as soon as `pred` does (when the batch elements of
      different devices need different numbers of steps). So every leaf of `val` is
      marked as varying over the axes that any of them varies over, on entry and on
      leaving `body_fun`; with a predicate that varies, this is also the true type
      of every leaf, as the number of steps taken varies.

    `checkpoints` (which diffrax passes to its inner loop) only matters for
    equinox's checkpointed loops, and is ignored.
    """
    del checkpoints
    axes = varying_axes(init_val)
    init_val = make_varying(init_val, axes)

    def body(val):
        return make_varying(body_fun(val), axes)

    cond, body, init, _ = common_rewrite(
        cond_fun, body, init_val, max_steps, buffers, makes_false_steps=False
    )
    _, _, _, final_val = varying_while_loop(cond, body, init)
    return final_val


def match_varying(tree: PyTree, like: PyTree) -> PyTree:
    """Mark each array leaf of `tree` as varying over the axes its counterpart in
    `like` varies over (`tree` and `like` have the same structure)."""

    def cast(leaf, like_leaf):
        if not eqx.is_array(leaf) or like_leaf is None:
            return leaf
        missing = _varying(like_leaf) - _varying(leaf)
        return _cast(leaf, tuple(missing)) if missing else leaf

    return jtu.tree_map(cast, tree, like)


def _carry_types(body_fun: Callable, init_val: PyTree) -> PyTree:
    """The least cast of `init_val` that the body does not make more varying: mark
    each leaf as varying wherever the body's output for it varies, and repeat (a
    leaf made varying can make others vary on the next step) until nothing
    changes. Each round traces the body once, abstractly."""
    dynamic, static = eqx.partition(init_val, eqx.is_array)

    def body(dynamic_):
        return eqx.filter(body_fun(eqx.combine(dynamic_, static)), eqx.is_array)

    while True:
        cast = match_varying(dynamic, jax.eval_shape(body, dynamic))
        old, new = jtu.tree_leaves(dynamic), jtu.tree_leaves(cast)
        if all(_varying(a) == _varying(b) for a, b in zip(old, new)):
            return eqx.combine(cast, static)
        dynamic = cast


def varying_while_loop(cond_fun: Callable, body_fun: Callable, init_val: PyTree):
    """`lax.while_loop` inside `jax.shard_map`: a carry leaf that starts invariant
    but that the body makes varying (e.g. a buffer of zeros that the body writes
    the sharded solution to) is marked as varying on entry; one that starts
    varying but that the body returns as an invariant constant (e.g. diffrax's
    `made_jump=False`) is marked as varying on exit. Outside `shard_map` this is
    `lax.while_loop`."""
    if not varying_axes(init_val):
        return lax.while_loop(cond_fun, body_fun, init_val)
    init_val = _carry_types(body_fun, init_val)

    def body(val):
        return match_varying(body_fun(val), val)

    return lax.while_loop(cond_fun, body, init_val)


def varying_fori_loop(
    lower: int, upper: int, body_fun: Callable, init_val: PyTree
) -> PyTree:
    """`lax.fori_loop`, with the carry typed as in `varying_while_loop`."""
    if not varying_axes(init_val):
        return lax.fori_loop(lower, upper, body_fun, init_val)
    init_val = _carry_types(lambda val: body_fun(lower, val), init_val)

    def body(i, val):
        return match_varying(body_fun(i, val), val)

    return lax.fori_loop(lower, upper, body, init_val)


def varying_scan(
    f: Callable, init: PyTree, xs: PyTree, reverse: bool = False
) -> tuple[PyTree, PyTree]:
    """`lax.scan`, with the carry typed as in `varying_while_loop`."""
    if not varying_axes(init):
        return lax.scan(f, init, xs, reverse=reverse)
    x0 = jtu.tree_map(lambda x: x[0], xs)
    init = _carry_types(lambda carry: f(carry, x0)[0], init)

    def body(carry, x):
        new, y = f(carry, x)
        return match_varying(new, carry), y

    return lax.scan(body, init, xs, reverse=reverse)
