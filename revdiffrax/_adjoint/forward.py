"""Forward recording: run diffrax's loop, and also record the accepted step times
(and, with `checkpoint_every`, the checkpoints) that the backward pass needs."""

import functools as ft
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._integrate import SaveState
from jaxtyping import Array, Float, Int, PyTree

from .._varying import make_varying, match_varying, varying_axes, while_loop
from .checkpoints import (
    empty_checkpoints,
    num_checkpoints,
    outer_loop,
    recording_outer_loop,
    write_checkpoint,
)
from .cotangents import save_states
from .events import EventRecord, with_cond_fns
from .jumps import empty_jump_records, JumpRecords, record_jump
from .parasitic import auto_parasitic_threshold, check_parasitic, parasitic_offset
from .rerun import recompute_every, RestartRecord
from .saveat import replace_fns, replace_ts, subsaveats
from .step_times import first_end, needs_recording, StepClips, TimeCoefficients


inner_loop = jax.named_call(while_loop, name="inner-loop")


class DiffInputs(eqx.Module):
    """The inputs of the solve that receive cotangents."""

    y0: PyTree
    args: PyTree
    terms: PyTree
    t0: Any
    t1: Any
    ts: list[Array]  # the `ts` of each `SubSaveAt` that has them
    # Only differentiable: the loop uses a stop-gradiented copy, and the cotangent
    # comes from the dependence of the step times on it (`StepTimes`).
    dt0: Any
    # The `fn` of each `SubSaveAt`, closure-converted: what they close over (e.g. a
    # parameter of a learned observation function) receives cotangents.
    fns: list
    # A `solver_state` passed to `diffeqsolve` (else None: made by `solver.init`).
    solver_state0: PyTree = None
    # The closure-converted conditions of an `event` (`events.py`), else None.
    event_fns: list | None = None


class Residuals(eqx.Module):
    """What the forward pass keeps for the backward pass: O(1) states, plus one time
    per step and `max_steps // k` checkpoints."""

    y: PyTree  # y_N
    solver_state: PyTree  # the solver state at t_N
    # t_1, ..., t_N, then inf; only for adaptive step sizes (`needs_recording`).
    step_times: Float[Array, " max_steps"] | None
    num_steps: Int[Array, ""]  # N
    checkpoints: PyTree[Array] | None
    jumps: JumpRecords | None  # the solver states discarded by jumps (`jumps.py`)
    # d t_{n+1} / d(t0, t1, dt0) per accepted step (`TimeCoefficients`), when times
    # are differentiated under an adaptive controller.
    time_coefficients: Float[Array, "max_steps 3"] | None = None
    event: EventRecord | None = None  # with `event=...` (`events.py`)
    # With `step_times="recompute"` (`rerun.py`), in place of `step_times`.
    restarts: RestartRecord | None = None


def _record_nothing(t, y, args):
    # Used with `SubSaveAt(steps=True)` so that diffrax records the accepted step
    # times (one scalar per step) and nothing else.
    del t, y, args
    return None


def _is_none(x: Any) -> bool:
    return x is None


def _record_state(init_state, size: int) -> SaveState:
    return SaveState(
        saveat_ts_index=0,
        ts=jnp.full(size, jnp.inf, dtype=jnp.result_type(init_state.tprev)),
        ys=None,
        save_index=0,
    )


def _with_recordings(init_state, saveat: diffrax.SaveAt, sizes: list[int]):
    """Add save states that record times only: one time per accepted step
    (`size = max_steps`, `SubSaveAt(steps=True)`) or the final time (`size = 1`,
    `SubSaveAt(t1=True)`: the event time with a root finder)."""
    records = tuple(_record_state(init_state, size) for size in sizes)
    subs = tuple(
        diffrax.SubSaveAt(steps=True, fn=_record_nothing)
        if size > 1
        else diffrax.SubSaveAt(t1=True, fn=_record_nothing)
        for size in sizes
    )
    init_state = eqx.tree_at(
        lambda s: s.save_state,
        init_state,
        (init_state.save_state, records),
        is_leaf=_is_none,
    )
    return init_state, diffrax.SaveAt(subs=(saveat.subs, subs))


def _fix_recorded_steps(step_times, final_state):
    """With a root-finding event, diffrax replaces the time saved after the last
    step by the event time (and may save it once more after it): put back t_N,
    which is still `final_state.tprev`."""
    n = final_state.num_accepted_steps
    index = jnp.arange(step_times.shape[0])
    return jnp.where(
        index < n - 1,
        step_times,
        jnp.where(index == n - 1, final_state.tprev, jnp.inf),
    )


def count_jumps(stepsize_controller) -> int:
    """The number of jumps requested by `jump_ts`."""
    jump_ts = getattr(stepsize_controller, "jump_ts", None)
    return 0 if jump_ts is None else len(jump_ts)


def _outer_loop(
    init_state,
    *,
    every: int | None,
    max_steps: int,
    num_jumps: int,
    jump_states: bool,
    out: dict,
    axes: frozenset,
    times: tuple | None = None,
    restarts: bool = False,
):
    """diffrax's outer loop, recording checkpoints (every `every` accepted steps;
    with `restarts`, also the rest of the loop state: `rerun.py`), the solver
    states discarded by jumps and (given `times`: `(t1, clips, first)`) the
    dependence of the step times on `(t0, t1, dt0)`, into `out`."""
    recorders, names = [], []
    if times is not None:
        t1, clips, first = times
        names.append("time_coefficients")
        recorders.append(
            (
                TimeCoefficients.start(first, max_steps),
                lambda state, new, c: c.update(state, new, t1, clips),
            )
        )
    count = num_checkpoints(every, max_steps)
    if count > 0 and every is not None:
        template = (init_state.y, init_state.solver_state)
        names.append("checkpoints")
        recorders.append(
            (
                empty_checkpoints(template, count),
                ft.partial(write_checkpoint, every=every),
            )
        )
        if restarts:
            names.append("restarts")
            recorders.append(
                (
                    RestartRecord.empty(init_state, count, every, max_steps),
                    lambda state, new, r: r.write(state, new),
                )
            )
    if num_jumps > 0:
        names.append("jumps")
        template = (init_state.y, init_state.solver_state)
        time_dtype = jnp.result_type(init_state.tnext)
        jump_records = empty_jump_records(template, num_jumps, jump_states, time_dtype)
        recorders.append((jump_records, record_jump))
    if not recorders:
        return outer_loop
    recorders = [(make_varying(initial, axes), f) for initial, f in recorders]
    records: list = []

    def loop(*args, **kwargs):
        final_state = recording_outer_loop(
            *args, recorders=recorders, out=records, **kwargs
        )
        out.update(zip(names, records))
        return final_state

    return loop


def _with_inputs(init_state, inputs: DiffInputs, solver, reinit: bool):
    """diffrax's initial state, with the differentiable inputs in it.

    `reinit`: remake the initial solver state from the inputs with `solver.init`
    (e.g. z_0 = y_0), so that it carries their tangents under an outer `jax.jvp`
    (forward-over-reverse); the copy the loop was given is stop-gradiented."""
    init_state = eqx.tree_at(lambda s: s.y, init_state, inputs.y0)
    init_state = eqx.tree_at(lambda s: s.tprev, init_state, inputs.t0)
    state0 = inputs.solver_state0
    if state0 is None and reinit:
        state0 = solver.init(
            inputs.terms, inputs.t0, init_state.tnext, inputs.y0, inputs.args
        )
        state0 = match_varying(state0, init_state.solver_state)
    if state0 is not None:
        init_state = eqx.tree_at(
            lambda s: s.solver_state, init_state, state0, is_leaf=_is_none
        )
    return init_state


def _unpack_recordings(final_state, record: bool, record_root: bool, sizes: list):
    """Split our recordings (step times, event time) off the user's save state."""
    step_times = t_event = None
    if sizes:
        user_save_state, record_states = final_state.save_state
        final_state = eqx.tree_at(
            lambda s: s.save_state, final_state, user_save_state, is_leaf=_is_none
        )
        if record:
            step_times = record_states[0].ts
            if record_root:
                step_times = _fix_recorded_steps(step_times, final_state)
        if record_root:
            t_event = record_states[-1].ts[0]
    return final_state, step_times, t_event


def _event_record(final_state, event, t_event, user_subs) -> EventRecord | None:
    if event is None:
        return None
    return EventRecord(
        mask=jtu.tree_leaves(final_state.event_mask),
        t_event=t_event,
        ts_saved=[
            jnp.asarray(s.saveat_ts_index)
            for s, sub in zip(save_states(final_state.save_state), user_subs)
            if sub.ts is not None
        ],
    )


def _is_brownian(x: Any) -> bool:
    return isinstance(x, diffrax.AbstractBrownianPath)


def _drives_brownian_motion(terms: PyTree) -> bool:
    """Whether `terms` contain a Brownian motion (an SDE)."""
    return any(_is_brownian(x) for x in jtu.tree_leaves(terms, is_leaf=_is_brownian))


def _check_parasitic_mode(
    final_state, aux_stats: dict, solver, controller, parasitic_tol, measured, terms
):
    """`sol.stats["parasitic_offset"]` and its check (`parasitic.py`), for solvers
    with a second state, on the leaves `measured` marks (`measured.py`).

    `"auto"` does not check SDEs: there the two states differ by the Brownian
    increments themselves (e.g. `ReversibleHeun`'s), by an amount no tolerance of
    the solve bounds, so a fixed threshold alarmed on diffrax's own examples (its
    neural SDE with `ReversibleHeun`). The offset is still reported, and a number
    still raises."""
    offset = parasitic_offset(solver, final_state.y, final_state.solver_state, measured)
    if offset is None:
        return final_state, aux_stats
    if parasitic_tol == "auto" and _drives_brownian_motion(terms):
        return final_state, {**aux_stats, "parasitic_offset": offset}
    threshold = auto_parasitic_threshold(
        controller, final_state.y, final_state.num_accepted_steps, measured
    )
    # Both the outputs and the stat depend on the check, whichever is used.
    save_state, offset = check_parasitic(
        (final_state.save_state, offset), offset, parasitic_tol, threshold
    )
    final_state = eqx.tree_at(
        lambda s: s.save_state, final_state, save_state, is_leaf=_is_none
    )
    return final_state, {**aux_stats, "parasitic_offset": offset}


def _time_coefficients(inputs: DiffInputs, init_state, loop_kwargs, passed_state):
    """`(t1, clips, first)` for `TimeCoefficients`: the clips of the controller and
    the coefficients of the first step's end."""
    controller = loop_kwargs["stepsize_controller"]
    solver = loop_kwargs["solver"]
    clips = StepClips.of(controller)  # (refuses a controller it cannot follow)

    def controller_init(t0, t1, dt0):
        terms = inputs.terms
        order = solver.error_order(terms)
        y0, args = inputs.y0, inputs.args
        tnext, _ = controller.init(terms, t0, t1, y0, dt0, args, solver.func, order)
        return tnext

    first = first_end(
        controller,
        init_state.tnext,
        inputs.t0,
        inputs.t1,
        inputs.dt0,
        None if passed_state else controller_init,
    )
    return inputs.t1, clips, first


def _varying_save_state(init_state, axes: frozenset):
    """Inside `jax.shard_map`: diffrax's loop chooses with a `lax.cond` between
    saving the (varying) solution and keeping its buffers, whose branches must have
    equal types, so the save buffers (and our records) start as varying as the
    inputs. (The loop carries' other types are found by `varying_while_loop`.)"""
    return eqx.tree_at(
        lambda s: s.save_state,
        init_state,
        make_varying(init_state.save_state, axes),
        is_leaf=_is_none,
    )


def _residuals(final_state, step_times, out: dict, event_record) -> Residuals:
    coefficients = out.get("time_coefficients")
    restarts = out.get("restarts")
    return Residuals(
        y=final_state.y,
        solver_state=final_state.solver_state,
        step_times=step_times,
        num_steps=final_state.num_accepted_steps,
        checkpoints=out.get("checkpoints"),
        jumps=out.get("jumps"),
        time_coefficients=None if coefficients is None else coefficients.ends,
        event=event_record,
        restarts=restarts,
    )


def forward(
    inputs: DiffInputs,
    *,
    adjoint,
    init_state,
    saveat: diffrax.SaveAt,
    max_steps: int,
    with_checkpoints: bool,
    diff_times: bool = False,
    passed_state: bool = False,
    measured: tuple[bool, ...] | None = None,
    **loop_kwargs,
) -> tuple[tuple[Any, Any], Residuals]:
    """Run the solve. Returns diffrax's `(final_state, aux_stats)` and the
    residuals of the backward pass. `diff_times`: whether `t0`, `t1` or `dt0` will
    be differentiated; `passed_state`: whether a controller state was passed to
    `diffeqsolve`; `measured`: the leaves of the state that the parasitic-mode
    check measures (`measured.py`; None: all)."""
    saveat = replace_fns(replace_ts(saveat, inputs.ts), inputs.fns)
    init_state = _with_inputs(
        init_state, inputs, loop_kwargs["solver"], reinit=with_checkpoints
    )
    user_subs = subsaveats(saveat)
    event = loop_kwargs.get("event")
    if event is not None:
        assert inputs.event_fns is not None
        loop_kwargs["event"] = with_cond_fns(event, inputs.event_fns)
    axes = varying_axes(inputs)
    # The step times of an adaptive controller: recorded, or recomputed on the
    # backward pass from restart points every `rerun_every` steps (`rerun.py`).
    # Only the backward pass needs them.
    rerun_every = None
    if with_checkpoints:
        continued = passed_state or inputs.solver_state0 is not None
        rerun_every = recompute_every(
            adjoint, loop_kwargs["stepsize_controller"], init_state, max_steps,
            event=event, diff_times=diff_times, axes=axes, continued=continued,
        )  # fmt: skip
    record = needs_recording(loop_kwargs["stepsize_controller"])
    record = record and with_checkpoints and rerun_every is None
    record_root = event is not None and event.root_finder is not None
    sizes = ([max_steps] if record else []) + ([1] if record_root else [])
    if sizes:
        init_state, saveat = _with_recordings(init_state, saveat, sizes)
    init_state = _varying_save_state(init_state, axes)
    out = {}
    num_jumps = count_jumps(loop_kwargs["stepsize_controller"])
    outer_while_loop = _outer_loop(
        init_state,
        every=(rerun_every or adjoint.checkpoint_every) if with_checkpoints else None,
        max_steps=max_steps,
        num_jumps=num_jumps if with_checkpoints else 0,
        jump_states=not loop_kwargs["solver"].reversible_across_jumps,
        out=out,
        axes=axes,
        times=_time_coefficients(inputs, init_state, loop_kwargs, passed_state)
        if record and diff_times
        else None,
        restarts=rerun_every is not None,
    )
    final_state, aux_stats = adjoint._loop(
        args=inputs.args,
        terms=inputs.terms,
        saveat=saveat,
        init_state=init_state,
        max_steps=max_steps,
        t0=inputs.t0,
        t1=inputs.t1,
        inner_while_loop=inner_loop,
        outer_while_loop=outer_while_loop,
        **loop_kwargs,
    )
    final_state, step_times, t_event = _unpack_recordings(
        final_state, record, record_root, sizes
    )
    event_record = _event_record(final_state, event, t_event, user_subs)
    if not record_root:  # (with a root, y is at the event, z at the step's end)
        final_state, aux_stats = _check_parasitic_mode(
            final_state,
            aux_stats,
            loop_kwargs["solver"],
            loop_kwargs["stepsize_controller"],
            adjoint.parasitic_tol,
            measured,
            inputs.terms,
        )
    residuals = _residuals(final_state, step_times, out, event_record)
    return (final_state, aux_stats), residuals
