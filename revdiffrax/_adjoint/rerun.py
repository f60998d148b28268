r"""`step_times="recompute"`: the accepted step times of an adaptive solve,
recomputed on the backward pass instead of recorded on the forward pass.

A step size controller like `PIDController` cannot be run backwards, so with
`step_times="record"` the forward pass records every accepted step time, in a
buffer of `max_steps` slots (per solve: under `jax.vmap`, per sample). Instead,
the forward pass can store, every k accepted steps, what diffrax's loop needs to
restart there: the state `(y, solver_state)` (the checkpoints of
`checkpoint_every=k`, `checkpoints.py`) and the rest of diffrax's loop state that
moves, `(controller_state, tprev, tnext, num_steps, num_rejected_steps)`, plus the
start of the step before; and the times of the last k accepted steps (t_n in slot
(n - 1) mod k). The backward pass reverses the solve one segment of k steps at a
time: the last segment with those times, every earlier one after re-running it
forward from its restart point with diffrax's own loop, recording only its k step
times. It reconstructs and pulls back through the steps of a segment as usual,
restarting the reconstruction from the checkpoint at the segment's end.

Memory per solve: `max_steps // k` restart points of $c$ scalars each, 2k times
and the low halves of `max_steps` times, against `max_steps` times;
k = $\lceil\sqrt{\text{max\_steps}\, c}\rceil$ (about $2\sqrt{\text{max\_steps}\,
c}$ besides the low halves). Cost: a forward solve of all but the last segment
(with their rejected steps) in the backward pass: none when a solve takes at most
k steps, as one does with a `max_steps` far above its needs.

The re-run is compiled apart from the forward solve, and XLA may fuse the step
into other kernels there, rounding differently (fused multiply-adds): the error
estimate, which cancels, then differs in its 7th digit, and the step times by
about 1e-12 (`benchmarks/results/rerun_bitwise_cpu.md`). So the forward pass also
records the low half of the bits of every accepted step time (2 bytes a step in
float32, 4 in float64, against 4 and 8 for the time): the re-run gives the high
bits, and each time is snapped to the nearest one (in units in the last place)
with the recorded low bits, which is the forward's time whenever the re-run is
within a quarter of that window of it (2^14 ulps in float32, 2^30 in float64).
The gradient is then that of the forward solve, bitwise as with "record".
Each re-run checks this: the same number of accepted steps, every snap within a
quarter window, and the same sum of the snapped times (summed in the forward's
order, so exactly equal) as the forward's (one scalar per segment). Any
difference (its relative size, `inf` for a different count or a snap out of
range) joins the drift of the reconstruction, whose check (`drift_tol`) reports
it; in a borderline case the re-run could accept a step the forward rejected.
"""

import math
from typing import Any

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._integrate import loop as diffrax_loop, SaveState
from jaxtyping import Array, Float, Int, PyTree, Real, UInt

from .._batching import enclosing_vmap_size
from .checkpoints import outer_loop


def _ordered(t: Float[Array, "*n"]) -> Int[Array, "*n"]:
    """The bits of `t` as a signed integer that is monotone in `t` (consecutive
    floats are consecutive integers, across zero too)."""
    itype = jnp.dtype(f"int{8 * t.dtype.itemsize}")
    i = lax.bitcast_convert_type(t, itype)
    return jnp.where(i >= 0, i, jnp.iinfo(itype).min - i)


def _from_ordered(o: Int[Array, "*n"], dtype) -> Float[Array, "*n"]:
    i = jnp.where(o >= 0, o, jnp.iinfo(o.dtype).min - o)
    return lax.bitcast_convert_type(i, dtype)


def _window(dtype) -> int:
    """2 ** (half the bits of `dtype`)."""
    return 1 << (4 * jnp.dtype(dtype).itemsize)


def low_bits(t: Float[Array, "*n"]) -> UInt[Array, "*n"]:
    """The low half of the bits of `_ordered(t)` (`uint16` for float32)."""
    udtype = jnp.dtype(f"uint{4 * t.dtype.itemsize}")
    return (_ordered(t) & (_window(t.dtype) - 1)).astype(udtype)


def snap(
    approx: Float[Array, " k"], low: UInt[Array, " k"]
) -> tuple[Float[Array, " k"], Int[Array, " k"]]:
    """The floats nearest to `approx` (in units in the last place) whose
    `low_bits` are `low`, and how many units each moved."""
    o = _ordered(approx)
    window = _window(approx.dtype)
    moved = (low.astype(o.dtype) - o) & (window - 1)
    moved = jnp.where(moved >= window // 2, moved - window, moved)
    return _from_ordered(o + moved, approx.dtype), moved


def _size(tree: PyTree) -> int:
    """The number of scalars in the array leaves of `tree`."""
    return sum(math.prod(jnp.shape(x)) for x in jtu.tree_leaves(tree))


def _restart_fields(state) -> tuple:
    """The parts of diffrax's loop state, besides `(y, solver_state)`, that a
    restart needs (`made_jump` and `result` stay the initial state's: no jumps)."""
    return (
        state.controller_state,
        state.tprev,
        state.tnext,
        state.num_steps,
        state.num_rejected_steps,
    )


def _out_of_scope(controller, *, event, diff_times, axes, continued) -> str | None:
    """Why the step times cannot be recomputed here (None if they can)."""
    jump_ts = getattr(controller, "jump_ts", None)
    if event is not None:
        return "with an `event` (the solve stops where the event is found)"
    if diff_times:
        return (
            "when `t0`, `t1` or `dt0` are differentiated (the dependence of every "
            "step time on them is recorded with the times)"
        )
    if jump_ts is not None:
        return "with `jump_ts`"
    if axes:
        return "inside `jax.shard_map`"
    if continued:
        return "for a continued solve (a passed solver or controller state)"
    return None


def recompute_every(
    adjoint,
    controller,
    init_state,
    max_steps: int,
    *,
    event,
    diff_times: bool,
    axes: frozenset,
    continued: bool,
) -> int | None:
    """The segment length k of `step_times="recompute"`, or None to record the
    step times (`"record"`, or `"auto"` where recomputing stores no less or is out
    of scope). Raises for an explicit `"recompute"` out of scope."""
    mode = adjoint.step_times
    if mode == "record" or not _is_adaptive(controller):
        return None
    reason = _out_of_scope(
        controller, event=event, diff_times=diff_times, axes=axes, continued=continued
    )
    if reason is not None:
        if mode == "recompute":
            raise ValueError(
                '`ReversibleAdjoint(step_times="recompute")` cannot recompute the '
                f'step times {reason}. Use `step_times="record"` (or the default '
                '`"auto"`, which records them here).'
            )
        return None
    restart = _size(_restart_fields(init_state)) + 1  # (+ the step before)
    every = adjoint.checkpoint_every
    if every is None:
        restart += _size((init_state.y, init_state.solver_state))
        every = max(1, min(max_steps, math.ceil(math.sqrt(max_steps * restart))))
    # (+ the low halves of the times' bits: `max_steps / 2` times' worth)
    stored = (max_steps // every) * restart + 2 * every + 2 + max_steps / 2
    if mode == "auto" and stored >= max_steps:
        return None
    return every


# What `"auto"` must be able to save, over the `jax.vmap` batch, to recompute the
# step times: a solve of more than k steps pays up to one more forward solve.
AUTO_MIN_SAVING_BYTES = 64 * 1024


def worth_recomputing(max_steps: int, t0: Any) -> bool:
    """Whether recomputing the step times could save `AUTO_MIN_SAVING_BYTES`: at
    most half of the record (the low halves of the bits stay) in every solve of the
    enclosing `jax.vmap`s. Read in `ReversibleAdjoint.loop`, where the `vmap`s are
    on JAX's trace stack (the `custom_vjp`'s forward pass is traced with one
    sample's shapes). E.g. a solve on its own at `max_steps=4096` could save 16 KiB
    of float64 times, for up to 1.4x its gradient's time (one more forward solve):
    it records; 32 samples of a float32 neural ODE under `vmap`, 256 KiB."""
    itemsize = jnp.dtype(jnp.result_type(t0)).itemsize
    return max_steps * itemsize // 2 * enclosing_vmap_size() >= AUTO_MIN_SAVING_BYTES


def _is_adaptive(controller) -> bool:
    return not isinstance(controller, (diffrax.ConstantStepSize, diffrax.StepTo))


class RestartRecord(eqx.Module):
    """Written by the forward pass: restart point j, after accepted step
    `(j + 1) k`, holds `_restart_fields` (each leaf as an array), the start of
    the step before, and the sum of the step times t_{jk+1}, ..., t_{(j+1)k} of
    the segment it ends (which the re-run of the segment must reproduce)."""

    fields: PyTree[Array]  # each leaf with a leading axis of `max_steps // k`
    before: Float[Array, " count"]
    sums: Float[Array, " count"]
    running: Float[Array, ""]  # the sum of the times since the last restart point
    # The times of the last segment: t_n in slot (n - 1) mod k, so that it needs
    # no re-run (nor, with a single segment, does any).
    last: Float[Array, " k"]
    # `low_bits` of every accepted step time, t_n in slot n - 1.
    low: UInt[Array, " max_steps"]
    every: int = eqx.field(static=True)  # k
    max_steps: int = eqx.field(static=True)

    @classmethod
    def empty(
        cls, init_state, count: int, every: int, max_steps: int
    ) -> "RestartRecord":
        leaves = [jnp.asarray(x) for x in jtu.tree_leaves(_restart_fields(init_state))]
        fields = [jnp.zeros((count,) + x.shape, x.dtype) for x in leaves]
        dtype = jnp.result_type(init_state.tprev)
        zeros = jnp.zeros(count, dtype)
        last = jnp.zeros(every, dtype)
        low = low_bits(jnp.zeros(max_steps, dtype))
        return cls(
            fields, zeros, zeros, jnp.zeros((), dtype), last, low, every, max_steps
        )

    def loop_buffers(self) -> UInt[Array, " max_steps"]:
        """What `write` updates one element at a time (`checkpoints._buffers`)."""
        return self.low

    def write(self, state, new_state) -> "RestartRecord":
        """After one iteration of diffrax's loop (as `write_checkpoint`)."""
        every = self.every
        n = new_state.num_accepted_steps
        accepted = n > state.num_accepted_steps
        dtype = self.before.dtype
        t_n = new_state.tprev.astype(dtype)
        t = jnp.where(accepted, t_n, 0)
        # Out of range (so dropped) unless the step was accepted.
        slot = jnp.where(accepted, (n - 1) % every, every)
        last = self.last.at[slot].set(t_n, mode="drop")
        at = jnp.clip(n - 1, 0, self.max_steps - 1)
        low = eqxi.buffer_at_set(self.low, at, low_bits(t_n), pred=accepted)
        index = jnp.clip(n // every - 1, 0, self.before.shape[0] - 1)
        leaves = jtu.tree_leaves(_restart_fields(new_state))

        def write(restart):
            fields, before, sums, running = restart
            fields = [
                b.at[index].set(jnp.asarray(x, b.dtype)) for b, x in zip(fields, leaves)
            ]
            before = before.at[index].set(state.tprev.astype(dtype))
            return fields, before, sums.at[index].set(running), jnp.zeros((), dtype)

        # A `cond`, not a `where`: most steps write nothing. Only the restart
        # points go through it: under `jax.vmap` it becomes a `select` of its
        # operands, which would copy the record of `max_steps` low halves.
        restart = (self.fields, self.before, self.sums, self.running + t)
        restart = lax.cond(accepted & (n % every == 0), write, lambda r: r, restart)
        fields, before, sums, running = restart
        return eqx.tree_at(
            lambda r: (r.fields, r.before, r.sums, r.running, r.last, r.low),
            self,
            (fields, before, sums, running, last, low),
        )


class Segment(eqx.Module):
    """The step times of the segment being reversed: t_{a-1}, t_a, ..., t_{a+k}
    (then `inf`), for the segment starting at accepted step a."""

    start: Int[Array, ""]
    times: Float[Array, " k+2"]


def _stop_gradient(tree: PyTree) -> PyTree:
    # The re-run only places the step times, which carry no tangents.
    return jtu.tree_map(lax.stop_gradient, tree)


def _record_nothing(t, y, args):
    del t, y, args
    return None


class Rerun(eqx.Module):
    """What the backward pass needs to re-run a segment of the forward solve."""

    solver: Any
    controller: Any
    terms: PyTree
    args: PyTree
    t0: Real[Array, ""]
    t1: Real[Array, ""]
    dt0: Any
    y0: PyTree
    init_state: Any  # diffrax's initial loop state (y replaced: `y0`)
    checkpoints: PyTree[Array]  # (y, solver_state), as `checkpoint_every` stores
    restarts: RestartRecord
    num_steps: Int[Array, ""]  # N

    @property
    def every(self) -> int:
        return self.restarts.every

    def _restart_state(self, a: Int[Array, ""]):
        """diffrax's loop state after accepted step a (a multiple of k), with a
        save state that records the next k step times."""
        init = self.init_state
        j = jnp.clip(a // self.every - 1, 0, self.restarts.before.shape[0] - 1)
        at_start = a == 0

        def pick(initial, stored):
            return jnp.where(at_start, initial, stored[j])

        current, static = eqx.partition((self.y0, init.solver_state), eqx.is_array)
        y, solver_state = eqx.combine(
            _stop_gradient(jtu.tree_map(pick, current, self.checkpoints)), static
        )
        fields0 = _restart_fields(init)
        leaves = [
            pick(jnp.asarray(x, b.dtype), b)
            for x, b in zip(jtu.tree_leaves(fields0), self.restarts.fields)
        ]
        fields = jtu.tree_unflatten(jtu.tree_structure(fields0), _stop_gradient(leaves))
        controller_state, tprev, tnext, num_steps, num_rejected = fields
        save_state = SaveState(
            saveat_ts_index=0,
            ts=jnp.full(self.every, jnp.inf, dtype=self.restarts.before.dtype),
            ys=None,
            save_index=0,
        )
        state = eqx.tree_at(
            lambda s: (
                s.y, s.solver_state, s.controller_state, s.tprev, s.tnext,
                s.num_steps, s.num_accepted_steps, s.num_rejected_steps,
                s.save_state, s.progress_meter_state,
            ),
            init,
            (
                y, solver_state, controller_state, tprev, tnext,
                num_steps, a.astype(num_steps.dtype), num_rejected,
                save_state, None,
            ),
            is_leaf=lambda x: x is None,
        )  # fmt: skip
        before = pick(self.t0, self.restarts.before)
        return state, before

    def load(self, a: Int[Array, ""], target: Int[Array, ""]):
        """Re-run accepted steps a, ..., target - 1. Returns their `Segment` and
        the mismatch of the re-run's end with the forward's (0 if none)."""
        state, before = self._restart_state(a)

        def outer_while_loop(cond_fun, body_fun, init_val, **kwargs):
            def cond(s):
                return cond_fun(s) & (s.num_accepted_steps < target)

            return outer_loop(cond, body_fun, init_val, **kwargs)

        final, _ = diffrax_loop(
            solver=self.solver,
            stepsize_controller=self.controller,
            event=None,
            saveat=diffrax.SaveAt(
                subs=diffrax.SubSaveAt(steps=True, fn=_record_nothing)
            ),
            t0=self.t0,
            t1=self.t1,
            dt0=self.dt0,
            max_steps=self.restarts.max_steps,
            terms=self.terms,
            args=self.args,
            init_state=state,
            inner_while_loop=outer_loop,
            outer_while_loop=outer_while_loop,
            progress_meter=diffrax.NoProgressMeter(),
        )
        dtype = self.restarts.before.dtype
        times, mismatch = self._snapped(final, a, target)
        times = jnp.concatenate([jnp.stack([before, state.tprev]).astype(dtype), times])
        segment = Segment(jnp.asarray(a, jnp.int32), lax.stop_gradient(times))
        return segment, mismatch

    def _snapped(
        self, final, a: Int[Array, ""], target: Int[Array, ""]
    ) -> tuple[Float[Array, " k"], Float[Array, ""]]:
        """The re-run's times t_{a+1}, ..., t_target (then `inf`), snapped to the
        recorded low bits, and how far the re-run differs from the forward pass:
        the relative difference of the sums of the segment's times, `inf` for a
        different count of accepted steps or a snap of over a quarter window."""
        k = self.every
        approx = final.save_state.ts.astype(self.restarts.before.dtype)
        valid = jnp.arange(k) < target - a
        low = self.restarts.low.at[a + jnp.arange(k)].get(mode="fill", fill_value=0)
        snapped, moved = snap(jnp.where(valid, approx, 0), low)
        times = jnp.where(valid, snapped, approx)
        in_window = jnp.all(jnp.abs(moved) <= _window(times.dtype) // 4, where=valid)
        j = jnp.clip(target // k - 1, 0, self.restarts.sums.shape[0] - 1)
        # A full segment's sum was stored at its end; the last one's is running.
        expected = jnp.where(
            target % k == 0, self.restarts.sums[j], self.restarts.running
        )
        # Summed in the forward pass's order, so that equal times give equal sums.
        addends = jnp.where(valid, times, 0)
        total = lax.fori_loop(
            0, k, lambda i, s: s + addends[i], jnp.zeros_like(expected)
        )
        scale = jnp.sum(jnp.abs(addends))
        error = jnp.abs(total - expected) / jnp.where(scale == 0, 1, scale)
        same = (final.num_accepted_steps == target) & in_window
        return times, jnp.where(same, error, jnp.inf)

    def last(self) -> tuple[Segment, Float[Array, ""]]:
        """The segment holding the last step, recorded by the forward pass (no
        mismatch)."""
        n = self.num_steps
        a = jnp.where(n > 0, ((n - 1) // self.every) * self.every, 0)
        state, before = self._restart_state(a)
        dtype = self.restarts.before.dtype
        times = jnp.concatenate(
            [jnp.stack([before, state.tprev]).astype(dtype), self.restarts.last]
        )
        segment = Segment(jnp.asarray(a, jnp.int32), lax.stop_gradient(times))
        return segment, jnp.zeros((), dtype)

    def enter(
        self, n: Int[Array, ""], segment: Segment, drift: Float[Array, ""]
    ) -> tuple[Segment, Float[Array, ""]]:
        """Before undoing step n - 1: load its segment if it is not `segment`."""
        # (Under `jax.vmap`, a sample that is done, n = 0, keeps going with the
        # others, and must not re-run anything.)
        need = (n > 0) & (n - 1 < segment.start)
        k = self.every

        def load(operands):
            segment_, drift_ = operands
            # Under `jax.vmap`, the samples that keep their segment re-run nothing.
            a = jnp.where(need, ((n - 1) // k) * k, 0)
            target = jnp.where(need, jnp.minimum(a + k, self.num_steps), 0)
            new, mismatch = self.load(a, target)
            segment_ = jtu.tree_map(lambda x, y: jnp.where(need, x, y), new, segment_)
            mismatch = jnp.where(need, mismatch, 0).astype(drift_.dtype)
            return segment_, jnp.maximum(drift_, mismatch)

        # Not a per-sample `cond` (which `vmap` turns into a `select`, running the
        # re-run on every step): only when some sample enters a new segment.
        return lax.cond(eqxi.unvmap_any(need), load, lambda x: x, (segment, drift))
