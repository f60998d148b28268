r"""Jumps (`jump_ts`) for solvers whose step after a jump cannot be undone.

After a jump, diffrax calls `step(..., made_jump=True)`, and a solver such as
`ReversibleHeun` restarts part of its state from the current solution
($f_n = f(t_n, y_n)$ instead of $f(t_n, \hat y_n)$), which makes the step implicit in
$y_n$ (and discards the old $f_n$): no closed-form backward step exists. So the
forward pass stores $(y_n, \text{solver state})$ before each step made with
`made_jump=True`, at most `len(jump_ts)` of them, and the backward pass pulls that
step back from the stored start (as for the first step of a continued solve).
"""

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree


class JumpRecords(eqx.Module):
    """What jumps leave behind, in the order of the jumps: each step that ends at a
    jump ends at `prevbefore(jump)`, not where the next step starts (after it), so
    its end is recorded; and the start of the step made after it."""

    ends: Float[Array, " jumps"]  # the end of each step that ends at a jump
    end_steps: Int[Array, " jumps"]  # the index m of that step, or -1
    steps: Int[Array, " jumps"]  # the index m of each step made after a jump, or -1
    # The array leaves of (y, solver state) before that step; None for solvers
    # that are `reversible_across_jumps`.
    states: PyTree[Array] | None
    count: Int[Array, ""]  # how many steps after jumps were recorded
    end_count: Int[Array, ""]  # how many ends were recorded


def empty_jump_records(
    template: PyTree, num_jumps: int, with_states: bool, time_dtype
) -> JumpRecords:
    """Room for `num_jumps` jumps; with copies of the array leaves of `template`,
    the pair `(y, solver_state)`, if `with_states`."""
    states = None
    if with_states:
        template = eqx.filter(template, eqx.is_array)
        states = jtu.tree_map(
            lambda x: jnp.zeros((num_jumps,) + x.shape, x.dtype), template
        )
    minus_one = jnp.full(num_jumps, -1, dtype=jnp.int32)
    zero = jnp.asarray(0)
    ends = jnp.zeros(num_jumps, time_dtype)
    return JumpRecords(ends, minus_one, minus_one, states, zero, zero)


def _write(buffer, count, value):
    return buffer.at[jnp.minimum(count, buffer.shape[0] - 1)].set(value)


def record_jump(state, new_state, records: JumpRecords) -> JumpRecords:
    """After one iteration of diffrax's loop (`state` -> `new_state`): record the
    end of an accepted step that ends at a jump, and the start of an accepted step
    made with `made_jump=True`."""
    accepted = new_state.num_accepted_steps > state.num_accepted_steps
    m = state.num_accepted_steps

    def write_end(r):
        ends = _write(r.ends, r.end_count, state.tnext)
        end_steps = _write(r.end_steps, r.end_count, m)
        return eqx.tree_at(
            lambda x: (x.ends, x.end_steps, x.end_count),
            r,
            (ends, end_steps, r.end_count + 1),
        )

    def write_start(r):
        current = eqx.filter((state.y, state.solver_state), eqx.is_array)
        states = r.states
        if states is not None:
            states = jtu.tree_map(lambda b, x: _write(b, r.count, x), states, current)
        steps = _write(r.steps, r.count, m)
        return eqx.tree_at(
            lambda x: (x.steps, x.states, x.count),
            r,
            (steps, states, r.count + 1),
            is_leaf=lambda x: x is None,
        )

    # `cond`s, not `where`s: most steps are not next to a jump.
    ends_at_jump = accepted & jnp.asarray(new_state.made_jump)
    records = lax.cond(ends_at_jump, write_end, lambda r: r, records)
    after_jump = accepted & jnp.asarray(state.made_jump)
    return lax.cond(after_jump, write_start, lambda r: r, records)


def jump_at(
    records: JumpRecords, m: Int[Array, ""], like: PyTree
) -> tuple[Bool[Array, ""], PyTree]:
    """Whether step m was made after a jump, and the `(y, solver_state)` it started
    from (garbage if not), with the static parts of `like`."""
    assert records.states is not None
    hit = records.steps == m
    stored = jtu.tree_map(lambda b: b[jnp.argmax(hit)], records.states)
    static = eqx.filter(like, eqx.is_array, inverse=True)
    return jnp.any(hit), eqx.combine(stored, static)
