"""`checkpoint_every=k`: the forward pass stores the array leaves of
`(y, solver_state)` after every k-th accepted step; the backward pass restarts its
reconstruction from them, so rounding accumulates over at most k steps.

Checkpoint `j` holds the state after accepted step `(j + 1) * k`.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from .._varying import while_loop
from .drift import relative_drift


outer_loop = jax.named_call(while_loop, name="outer-loop")


def num_checkpoints(checkpoint_every: int | None, max_steps: int) -> int:
    if checkpoint_every is None:
        return 0
    return max_steps // checkpoint_every


def _index(n: Int[Array, ""], every: int, checkpoints: PyTree[Array]) -> Int[Array, ""]:
    size = jtu.tree_leaves(checkpoints)[0].shape[0]
    return jnp.clip(n // every - 1, 0, size - 1)


def empty_checkpoints(template: PyTree, count: int) -> PyTree[Array]:
    """A buffer of `count` copies of the array leaves of `template`."""
    template = eqx.filter(template, eqx.is_array)
    return jtu.tree_map(lambda x: jnp.zeros((count,) + x.shape, x.dtype), template)


def write_checkpoint(state, new_state, ckpts: PyTree[Array], *, every: int):
    """After one iteration of diffrax's loop (`state` -> `new_state`): write a
    checkpoint if it accepted step `every`, `2 every`, ..."""
    n = new_state.num_accepted_steps
    # Rejected steps leave `num_accepted_steps` unchanged, so each checkpoint is
    # written once, by the step that reaches it.
    pred = (n > state.num_accepted_steps) & (n % every == 0)
    current = eqx.filter((new_state.y, new_state.solver_state), eqx.is_array)

    def write(ckpts_):
        index = _index(n, every, ckpts_)
        return jtu.tree_map(lambda b, x: b.at[index].set(x), ckpts_, current)

    # A `cond`, not a `where`: most steps make no checkpoint.
    return lax.cond(pred, write, lambda c: c, ckpts)


def _buffers(record: PyTree) -> PyTree[Array]:
    """The arrays of `record` that its update writes one element at a time (a
    record's `loop_buffers()`, if it has one), declared to equinox's while loop as
    buffers: under `jax.vmap` with a batched condition it then masks the written
    element, where it would otherwise `select` (so copy) the whole array on every
    step."""
    loop_buffers = getattr(record, "loop_buffers", None)
    return () if loop_buffers is None else loop_buffers()


def recording_outer_loop(
    cond_fun: Callable,
    body_fun: Callable,
    init_val,
    *,
    max_steps: int,
    buffers: Callable,
    recorders: list[tuple[PyTree, Callable]],
    out: list,
):
    """diffrax's outer while loop, additionally updating records after every
    iteration: each recorder is `(initial, update)`, with
    `update(state, new_state, record) -> record` (e.g. `write_checkpoint`). The final
    records are handed back through `out`, as diffrax's loop only returns its own
    state."""
    updates = [update for _, update in recorders]

    def cond(carry):
        return cond_fun(carry[0])

    def body(carry):
        state, records = carry
        new_state = body_fun(state)
        records = [f(state, new_state, r) for f, r in zip(updates, records)]
        return new_state, records

    final_state, records = outer_loop(
        cond,
        body,
        (init_val, [initial for initial, _ in recorders]),
        max_steps=max_steps,
        buffers=lambda carry: (buffers(carry[0]), [_buffers(r) for r in carry[1]]),
    )
    out.extend(records)
    return final_state


def restore_checkpoint(
    n: Int[Array, ""],
    num_steps: Int[Array, ""],
    y: PyTree,
    solver_state: PyTree,
    drift: Float[Array, ""],
    every: int,
    checkpoints: PyTree[Array],
    measured: tuple[bool, ...] | None = None,
) -> tuple[PyTree, PyTree, Float[Array, ""]]:
    """At a checkpoint, measure how far the reconstruction has drifted over the
    segment since the previous one (on the leaves `measured` marks), then continue
    from the stored state."""
    # The checkpoint at `num_steps` (if any) equals the final state; skip it.
    pred = (n >= every) & (n % every == 0) & (n < num_steps)
    current, static = eqx.partition((y, solver_state), eqx.is_array)

    def restore(operands):
        current_, drift_ = operands
        stored = jtu.tree_map(lambda b: b[_index(n, every, checkpoints)], checkpoints)
        drift_ = jnp.maximum(drift_, relative_drift(current_[0], stored[0], measured))
        return stored, drift_

    # A `cond`, not a `where`: most steps are not checkpoints.
    current, drift = lax.cond(pred, restore, lambda x: x, (current, drift))
    y, solver_state = eqx.combine(current, static)
    return y, solver_state, drift
