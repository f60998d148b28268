"""The backward driver: rebuild the solve from its last state, one step at a time,
pulling the cotangents back through each step as it is rebuilt."""

import dataclasses

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from .._solver import AbstractReversibleSolver
from .._varying import (
    make_varying,
    match_varying,
    varying_axes,
    varying_while_loop,
)
from .checkpoints import restore_checkpoint
from .continued import KnownStart
from .cotangents import (
    add,
    InputCotangents,
    materialise,
    output_cotangents,
    output_ts_cotangents,
    SavedOutputs,
    zero_cotangent,
)
from .drift import relative_drift, report_drift
from .events import add_saved_times, is_real, maybe_event_pullback
from .forward import DiffInputs, Residuals
from .jumps import jump_at
from .rerun import Rerun, Segment
from .saveat import replace_fns, replace_ts, subsaveats
from .step_times import clip_floor, controller_kind, StepTimes


class _Carry(eqx.Module):
    """The state of the backward loop, after undoing the steps after step n."""

    n: Int[Array, ""]
    y: PyTree  # y_n, rebuilt (or restored from a checkpoint)
    solver_state: PyTree  # the solver state at t_n
    y_bar: PyTree  # cotangent of y_n
    solver_state_bar: PyTree  # cotangent of the solver state at t_n
    grads: InputCotangents  # of (terms, args, t0, t1, dt0, ts), so far
    ts_left: list[Int[Array, ""]]  # per `SubSaveAt(ts)`: outputs not yet pulled back
    drift: Float[Array, ""]  # the largest reconstruction drift seen so far
    # With `step_times="recompute"`: the times of the segment holding step n - 1.
    segment: Segment | None = None


class _Backward(eqx.Module):
    """What every backward step needs: the solve's inputs and what was recorded."""

    solver: AbstractReversibleSolver
    inputs: DiffInputs
    times: StepTimes
    outputs: SavedOutputs
    residuals: Residuals
    made_jump0: PyTree  # the `made_jump` flag of the first step
    checkpoint_every: int | None = eqx.field(static=True)
    diff_times: bool = eqx.field(static=True)
    # With `event=...` (`events.py`): whether each condition is real-valued.
    event_real: tuple[bool, ...] = eqx.field(default=(), static=True)
    # The leaves of the state whose drift is measured (`measured.py`; None: all).
    measured: tuple[bool, ...] | None = eqx.field(default=None, static=True)
    # With `step_times="recompute"` (`rerun.py`): re-runs the forward segments.
    rerun: Rerun | None = None

    def at_segment(self, segment: Segment | None) -> "_Backward":
        """This backward pass, reading the step times of `segment` (if any)."""
        if segment is None:
            return self
        times = self.times.on_segment(segment.start, segment.times)
        return eqx.tree_at(lambda b: b.times, self, times)

    def reverse_step(self, carry: _Carry, stand_in: KnownStart | None = None) -> _Carry:
        """Undo step m = n - 1 and pull the cotangents back through it (with
        `stand_in` in place of the solver, on the first step of a continued solve),
        first re-running its segment of the forward solve if it is not loaded."""
        if self.rerun is None or carry.segment is None:
            return self._reverse_step(carry, stand_in)
        segment, drift = self.rerun.enter(carry.n, carry.segment, carry.drift)
        carry = dataclasses.replace(carry, segment=segment, drift=drift)
        return self.at_segment(segment)._reverse_step(carry, stand_in)

    def _reverse_step(self, carry: _Carry, stand_in: KnownStart | None) -> _Carry:
        inputs, times = self.inputs, self.times
        n, m = carry.n, carry.n - 1
        y1, state1, drift = carry.y, carry.solver_state, carry.drift
        checkpoints, every = self.residuals.checkpoints, self.checkpoint_every
        if checkpoints is not None and every is not None:
            y1, state1, drift = restore_checkpoint(
                n,
                times.num_steps,
                y1,
                state1,
                drift,
                every,
                checkpoints,
                self.measured,
            )
        carry = eqx.tree_at(
            lambda c: (c.y, c.solver_state, c.drift),
            carry,
            (y1, state1, drift),
            is_leaf=lambda x: x is None,  # e.g. `SemiImplicitEuler`'s state
        )
        y0, state0, bars, aux, drift = self.pull_back_step(carry, stand_in)
        y0_bar, state0_bar, params_bar, times_bar = bars
        if aux is None:
            ts_left, grads = carry.ts_left, carry.grads.with_params(params_bar)
        else:
            ts_left, grads, args_bar = aux
            grads = grads.with_params(params_bar).add_args(args_bar)
        if self.diff_times:
            grads = grads.add_time(times, m, times_bar[0])
            grads = grads.add_time(times, n, times_bar[1])
        y0_bar, grads = self.outputs.at_step(
            times, m, y0, inputs.args, materialise(y0_bar, y0), grads
        )
        return _Carry(
            n=m,
            y=y0,
            solver_state=state0,
            y_bar=y0_bar,
            solver_state_bar=materialise(state0_bar, state0),
            grads=grads,
            ts_left=ts_left,
            drift=drift,
            segment=carry.segment,
        )

    def pull_back_step(self, carry: _Carry, stand_in: KnownStart | None):
        """`backward_step_pullback` of step m = n - 1 (from the start stored before
        it, if it followed a jump that `jumps.py` handles). Returns its
        `(y0, state0, bars, aux)` and the drift."""
        inputs, times = self.inputs, self.times
        m = carry.n - 1
        made_jump = jnp.where(m == 0, self.made_jump0, False)
        # A multistep solver also needs the start of the step before (t_0 first).
        solver = self.solver.at_previous_time(times[jnp.maximum(m - 1, 0)])
        if stand_in is not None:
            solver = stand_in
        dense_cotangent = self.dense_cotangent(carry, m)
        cotangents = (carry.y_bar, carry.solver_state_bar, carry.grads.params)

        def pull_back(solver_, made_jump_):
            y0, state0, bars, aux = solver_.backward_step_pullback(
                inputs.terms, times[m], times.end(m), carry.y, inputs.args,
                carry.solver_state, made_jump_, cotangents, dense_cotangent,
                diff_times=self.diff_times,
            )  # fmt: skip
            y0_bar, state0_bar, params_bar, times_bar = bars
            y0_bar, state0_bar = materialise((y0_bar, state0_bar), (y0, state0))
            return y0, state0, (y0_bar, state0_bar, params_bar, times_bar), aux

        jumps = self.residuals.jumps
        if jumps is None or jumps.states is None:
            return *pull_back(solver, made_jump), carry.drift
        is_jump, (y_j, state_j) = jump_at(jumps, m, (carry.y, carry.solver_state))

        def after_jump(_):
            y1, _, _, _, _ = self.solver.step(
                inputs.terms, times[m], times.end(m), y_j, inputs.args, state_j, True
            )
            drift = jnp.maximum(carry.drift, relative_drift(carry.y, y1, self.measured))
            return *pull_back(KnownStart(self.solver, y_j, state_j), True), drift

        def otherwise(_):
            return *pull_back(solver, made_jump), carry.drift

        return lax.cond(is_jump, after_jump, otherwise, None)

    def dense_cotangent(self, carry: _Carry, m: Int[Array, ""]):
        """For `backward_step_pullback`: `None` without `SaveAt(ts)`, else the
        function that pulls the outputs interpolated in step m back to the step's
        dense information (only then is the dense information computed and
        differentiated)."""
        has_ts = any(sub.ts is not None for sub in self.outputs.subs)
        event = self.residuals.event
        root = event is not None and event.t_event is not None
        if not (has_ts or root):
            return None
        times, args = self.times, self.inputs.args
        interpolation_cls = self.solver.interpolation_cls

        def dense_cotangent(dense_info):
            if has_ts:
                dense_info_bar, ts_left, grads, args_bar = self.outputs.in_step(
                    times,
                    m,
                    dense_info,
                    interpolation_cls,
                    args,
                    carry.ts_left,
                    carry.grads,
                )
            else:
                dense_info_bar, ts_left, grads, args_bar = (
                    zero_cotangent(dense_info),
                    carry.ts_left,
                    carry.grads,
                    zero_cotangent(args),
                )
            if root:
                ts_bars = self.outputs.ts_bars
                assert event is not None and ts_bars is not None
                is_last = (m == times.num_steps - 1) & event.root_happened()
                slots = self.outputs.t1_slots(times, event.ts_saved)
                d_bar, ta_bar, tb_bar, args_bar_, conds_bar, fns_bar = (
                    maybe_event_pullback(
                        is_last,
                        event,
                        self.inputs.event_fns,
                        list(self.event_real),
                        self.outputs,
                        slots,
                        ts_bars,
                        interpolation_cls,
                        dense_info,
                        times[m],
                        times.end(m),
                        args,
                    )
                )
                dense_info_bar = add(dense_info_bar, d_bar)
                args_bar = add(args_bar, args_bar_)
                grads = grads.add_time(times, m, ta_bar)
                grads = grads.add_time(times, m + 1, tb_bar)
                grads = grads.add_events(conds_bar)
                for j, fn_bar in fns_bar.items():
                    grads = grads.add_fn(j, fn_bar)
            return dense_info_bar, (ts_left, grads, args_bar)

        return dense_cotangent

    def initial_carry(self, solver_state_bar: PyTree) -> _Carry:
        """Start from y_N, with the cotangents of the outputs saved at t_N and of the
        final solver state (`SaveAt(solver_state=True)`)."""
        inputs, residuals = self.inputs, self.residuals
        grads = InputCotangents.zeros(
            (inputs.terms, inputs.args),
            inputs.t0,
            inputs.ts,
            inputs.fns,
            inputs.event_fns,
        )
        event = residuals.event
        ts_saved = None if event is None else event.ts_saved
        y_bar, grads = self.outputs.at_final_step(
            self.times,
            residuals.y,
            inputs.args,
            zero_cotangent(residuals.y),
            grads,
            ts_saved,
            False if event is None else event.root_happened(),
        )
        ts_left = [jnp.asarray(len(ts), dtype=jnp.int32) for ts in inputs.ts]
        if event is not None:
            ts_left = [jnp.asarray(k, dtype=jnp.int32) for k in event.ts_saved]
        if self.outputs.ts_bars is not None:
            slots = self.outputs.t1_slots(self.times, ts_saved)
            grads = add_saved_times(
                self.outputs, slots, self.outputs.ts_bars, event, self.times, grads
            )
        return _Carry(
            n=residuals.num_steps,
            y=residuals.y,
            solver_state=residuals.solver_state,
            y_bar=y_bar,
            solver_state_bar=materialise(solver_state_bar, residuals.solver_state),
            grads=grads,
            ts_left=ts_left,
            drift=relative_drift(inputs.y0, inputs.y0),  # zero, of the right dtype
        )

    def known_first_step(self, carry: _Carry, made_jump0) -> _Carry:
        """Pull back the first step of a continued solve from its known start
        (`KnownStart`), measuring the drift of the rebuilt y_1 against it."""
        inputs, times = self.inputs, self.times
        zero, one = jnp.asarray(0), jnp.asarray(1)
        solver = self.solver.at_previous_time(times[zero])
        y0, _, _, _ = solver.backward_step(
            inputs.terms,
            times[zero],
            times[one],
            carry.y,
            inputs.args,
            carry.solver_state,
            made_jump0,
        )
        drift = jnp.maximum(carry.drift, relative_drift(y0, inputs.y0, self.measured))
        stand_in = KnownStart(self.solver, inputs.y0, inputs.solver_state0)
        carry = self.reverse_step(carry, stand_in)
        return eqx.tree_at(lambda c: c.drift, carry, drift)

    def pull_back_init(self, carry: _Carry, tnext) -> tuple[PyTree, InputCotangents]:
        """The initial solver state is a function of y0 (e.g. z_0 = y_0): pull its
        cotangent back through `solver.init`."""
        inputs = self.inputs

        def init(y0, params, t0):
            terms, args = params
            state = self.solver.init(terms, t0, tnext, y0, args)
            # Inside `jax.shard_map`, a part of the state that does not depend on the
            # inputs (e.g. a zero first stage) is replicated; its cotangent, from the
            # loop, varies.
            return match_varying(state, carry.solver_state_bar)

        _, vjp = eqx.filter_vjp(init, inputs.y0, (inputs.terms, inputs.args), inputs.t0)
        y0_bar, params_bar, t0_bar = vjp(carry.solver_state_bar)
        grads = carry.grads.add_params(params_bar)
        grads = grads.add_time(self.times, jnp.asarray(0), t0_bar)
        return add(carry.y_bar, y0_bar), grads


def _run(bwd: _Backward, solver_state_bar: PyTree) -> _Carry:
    """The backward loop, from step N down to step 0."""
    continued = bwd.inputs.solver_state0 is not None
    if bwd.rerun is None:
        carry = bwd.initial_carry(solver_state_bar)
    else:
        segment, mismatch = bwd.rerun.last()
        carry = bwd.at_segment(segment).initial_carry(solver_state_bar)
        drift = jnp.maximum(carry.drift, mismatch.astype(carry.drift.dtype))
        carry = dataclasses.replace(carry, segment=segment, drift=drift)
    # A lambda, not the bound method: `lax.while_loop` hashes its body function.
    carry = varying_while_loop(
        lambda c: c.n > (1 if continued else 0),
        lambda c: bwd.reverse_step(c),
        carry,
    )
    if continued:
        carry = lax.cond(
            carry.n > 0,
            lambda c: bwd.known_first_step(c, bwd.made_jump0),
            lambda c: c,
            carry,
        )
    return carry


def _step_times(inputs: DiffInputs, residuals: Residuals, controller) -> StepTimes:
    jumps = residuals.jumps
    return StepTimes(
        t0=inputs.t0,
        t1=inputs.t1,
        t1_floor=clip_floor(inputs.t1),
        dt0=inputs.dt0,
        recorded=residuals.step_times,
        num_steps=residuals.num_steps,
        kind=controller_kind(controller),
        stepto_ts=getattr(controller, "ts", None),
        jump_end_steps=None if jumps is None else jumps.end_steps,
        jump_ends=None if jumps is None else jumps.ends,
        time_coefficients=residuals.time_coefficients,
        may_stop_early=residuals.event is not None,
    )


def _rerun(inputs, residuals, restarts, solver, controller, init_state) -> Rerun:
    return Rerun(
        solver=solver,
        controller=controller,
        terms=inputs.terms,
        args=inputs.args,
        t0=inputs.t0,
        t1=inputs.t1,
        dt0=inputs.dt0,
        y0=inputs.y0,
        init_state=init_state,
        checkpoints=residuals.checkpoints,
        restarts=restarts,
        num_steps=residuals.num_steps,
    )


def _event_fields(residuals, inputs) -> dict:
    if residuals.event is None:
        return {}
    t, y = inputs.t0, inputs.y0
    real = tuple(is_real(fn, t, y, inputs.args) for fn in inputs.event_fns)
    return dict(event_real=real)


def backward(
    residuals: Residuals,
    grad_final_state,
    perturbed: DiffInputs,
    inputs: DiffInputs,
    *,
    adjoint,
    solver,
    stepsize_controller,
    saveat,
    init_state,
    measured: tuple[bool, ...] | None = None,
) -> DiffInputs:
    """The cotangents of the differentiable inputs, from those of the outputs.
    `measured`: the leaves of the state whose drift is measured (`measured.py`)."""
    saveat = replace_fns(replace_ts(saveat, inputs.ts), inputs.fns)
    # Inside `jax.shard_map` the inputs vary over the mesh (`ReversibleAdjoint.loop`
    # made them); what the backward pass combines with them does too, so that every
    # vector-Jacobian product below is taken per device, in the inputs' type.
    axes = varying_axes(inputs)
    residuals, grad_final_state, init_state = make_varying(
        (residuals, grad_final_state, init_state), axes
    )
    times = _step_times(inputs, residuals, stepsize_controller)
    # The step times are differentiated only when d/dt0, d/dt1 or d/d(dt0) is
    # wanted: `SaveAt.ts` do not move them (the outputs at `ts` are pulled back
    # through the interpolation alone, `SavedOutputs.in_step`). Not differentiating
    # the steps otherwise matters for SDEs, whose Brownian motion refuses tangents
    # on its evaluation times (as it does under `RecursiveCheckpointAdjoint`).
    diff_times = any(jtu.tree_leaves((perturbed.t0, perturbed.t1, perturbed.dt0)))
    restarts = residuals.restarts
    bwd = _Backward(
        solver=solver,
        inputs=inputs,
        times=times,
        outputs=SavedOutputs(
            subs=subsaveats(saveat),
            bars=output_cotangents(grad_final_state, init_state),
            # The cotangents of the saved times (`sol.ts`): they reach `SaveAt.ts`
            # and, through the step times, (t0, t1, dt0); with an event, the event
            # time also the state.
            ts_bars=output_ts_cotangents(grad_final_state, init_state)
            if diff_times
            or any(jtu.tree_leaves(perturbed.ts))
            or residuals.event is not None
            else None,
        ),
        residuals=residuals,
        made_jump0=init_state.made_jump,
        checkpoint_every=adjoint.checkpoint_every
        if restarts is None
        else restarts.every,
        diff_times=diff_times,
        measured=measured,
        rerun=None
        if restarts is None
        else _rerun(
            inputs, residuals, restarts, solver, stepsize_controller, init_state
        ),
        **_event_fields(residuals, inputs),
    )
    final_bar = None if grad_final_state is None else grad_final_state.solver_state
    carry = _run(bwd, final_bar)
    bwd = bwd.at_segment(carry.segment)
    times = bwd.times
    y_bar, grads = bwd.outputs.at_start(
        times, inputs.y0, inputs.args, carry.ts_left, carry.y_bar, carry.grads
    )
    solver_state0_bar = None
    if inputs.solver_state0 is None:
        carry = eqx.tree_at(lambda c: (c.y_bar, c.grads), carry, (y_bar, grads))
        y_bar, grads = bwd.pull_back_init(carry, init_state.tnext)
    else:
        solver_state0_bar = carry.solver_state_bar
    # Measured on the leaves whose reconstruction the gradient depends on: on
    # others (a CNF's log-density) it would keep alive their reconstruction, and
    # the evaluations only it needs, which XLA otherwise removes (`measured.py`).
    drift = jnp.maximum(carry.drift, relative_drift(carry.y, inputs.y0, measured))
    terms_bar, args_bar = grads.params
    dt0_bar = None
    if eqx.is_inexact_array(inputs.dt0):
        dt0_bar = grads.dt0.astype(jnp.result_type(inputs.dt0))
    cotangents = DiffInputs(
        y0=y_bar,
        args=args_bar,
        terms=terms_bar,
        t0=grads.t0,
        t1=grads.t1,
        ts=grads.ts,
        dt0=dt0_bar,
        fns=grads.fns,
        solver_state0=solver_state0_bar,
        event_fns=grads.events,
    )
    cotangents = _only_perturbed(cotangents, perturbed)
    return report_drift(cotangents, drift, adjoint.drift_tol, adjoint.drift_callback)


def _only_perturbed(cotangents: DiffInputs, perturbed: DiffInputs) -> DiffInputs:
    """`None` (a zero) in place of the cotangents of the inputs that are not
    differentiated. The drift check makes every cotangent it is given depend on it,
    so that it runs whichever are used; given one that nothing reads, it would keep
    alive work that JAX otherwise removes: e.g. the cotangent of 1,000 `SaveAt(ts)`
    times, updated on every backward step (issue 22: a 3x slower gradient)."""

    def keep(cotangent, is_perturbed):
        return cotangent if is_perturbed else None

    return jtu.tree_map(keep, cotangents, perturbed, is_leaf=lambda x: x is None)
