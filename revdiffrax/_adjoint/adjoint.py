"""The public `ReversibleAdjoint` class: input checks, closure conversion, and the
call into the `custom_vjp` loop."""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.lax as lax
import jax.tree_util as jtu
from diffrax._adjoint import _only_transpose_ys  # pyright: ignore[reportPrivateUsage]

from .._varying import make_varying, varying_axes
from .auto_checkpoint import resolve_checkpoint_every
from .checks import check_inputs
from .closure import convert_args, convert_saveat, convert_terms
from .cotangents import save_states
from .events import convert_event, with_cond_fns
from .forward import DiffInputs
from .measured import measured_leaves
from .refusals import refuse_tangents
from .rerun import worth_recomputing
from .saveat import replace_fns, replace_ts, saveat_fns, saveat_ts
from .vjp import loop_reversible


def _is_none(x: Any) -> bool:
    return x is None


def _stop_gradient(tree: Any) -> Any:
    return jtu.tree_map(lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


_CONTROLLER_TANGENT_MESSAGE = (
    "`ReversibleAdjoint` does not differentiate the arrays of the step size "
    "controller (e.g. `StepTo(ts=...)`, `PIDController(jump_ts=..., step_ts=...)` "
    "computed from a differentiated input): its backward pass rebuilds the step "
    "times from them as constants, so the gradient would silently miss their "
    "dependence. Make them constants (`jax.lax.stop_gradient`, or build them from "
    "undifferentiated values), or use `adjoint=diffrax.RecursiveCheckpointAdjoint()`, "
    "which differentiates through the controller."
)


def _refuse_controller_tangents(tangents: Any) -> str | None:
    return _CONTROLLER_TANGENT_MESSAGE if jtu.tree_leaves(tangents) else None


def _constant_controller(controller):
    """The step size controller, refusing to be differentiated."""
    arrays, static = eqx.partition(controller, eqx.is_array)
    arrays = refuse_tangents(arrays, refuse=_refuse_controller_tangents)
    return eqx.combine(arrays, static)


def _convert_event(
    event, y0, args, terms, solver, t0, t1, dt0, saveat, stepsize_controller, max_steps
):
    """The event with its conditions closure-converted (`events.py`): the converted
    conditions travel in the inputs, the event the loop sees holds placeholders."""
    if event is None:
        return None, None
    event_fns = convert_event(
        event,
        y0=y0,
        args=args,
        terms=terms,
        solver=solver,
        t0=t0,
        t1=t1,
        dt0=dt0,
        saveat=saveat,
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
    )
    # The forward pass calls the converted conditions of `inputs`.
    return with_cond_fns(event, [None] * len(event_fns)), event_fns


def _differentiable_outputs(final_state):
    """Outputs are differentiable through `ys`, the times saved (`sol.ts`: the step
    times, `t0`, `t1`, `SaveAt.ts` or an event time), and for continuing a solve the
    final solver state (`SaveAt(solver_state=True)`); the backward pass starts from
    their cotangents."""
    out = eqx.tree_at(
        lambda s: s.solver_state,
        _only_transpose_ys(final_state),
        final_state.solver_state,
        is_leaf=_is_none,
    )
    return eqx.tree_at(
        lambda s: [x.ts for x in save_states(s.save_state)],
        out,
        [x.ts for x in save_states(final_state.save_state)],
    )


class ReversibleAdjoint(diffrax.AbstractAdjoint):
    r"""Backpropagate through
    [`diffrax.diffeqsolve`](https://docs.kidger.site/diffrax/api/diffeqsolve/) by
    reconstructing the forward solve backwards in time with an algebraically
    reversible solver.

    The forward pass keeps only the final state and what places the accepted step
    times: with constant steps or `StepTo` nothing (they are recomputed), with an
    adaptive controller either the times themselves (one scalar per step, in a
    buffer of length `max_steps`) or restart points from which the backward pass
    re-runs the controller (`step_times`). The backward pass rebuilds
    each earlier state from the later one with the solver's `backward_step` and
    pulls the cotangents back through that step. The gradient is the exact gradient
    of the discrete solve (as from
    [`diffrax.RecursiveCheckpointAdjoint`](https://docs.kidger.site/diffrax/api/adjoints/#diffrax.RecursiveCheckpointAdjoint))
    up to floating point, in O(1) memory (plus what places the step times) and O(N)
    time.

    For [`revdiffrax.Reversible`][] the reconstruction and the vector-Jacobian
    products share their base-solver evaluations: with cotangents
    $(\bar y, \bar z)$ of $(y_{n+1}, z_{n+1})$, one backward step is (see
    [the adjoint recurrence][the-adjoint-recurrence])

    $$\bar y \mathrel{-}= (\partial\Psi_{-h}/\partial y)^\top \bar z,\qquad
      \bar z \mathrel{+}= (1 - \lambda)\bar y + (\partial\Psi_h/\partial z)^\top \bar y,
      \qquad \bar y \leftarrow \lambda \bar y,$$

    with parameter cotangents accumulated alongside, so a gradient costs about two
    base steps and two VJPs per step on top of the forward pass.

    Supports gradients with respect to `y0`, `args`, the `terms` (e.g. a neural
    network vector field, also one closed over by a function inside a wrapper term
    or in `args`), `t0`, `t1`, `dt0` and `SaveAt(ts=...)`, with the saved times `sol.ts`
    differentiable outputs; all step size controllers (with rejected and clipped
    steps); `SaveAt(t0=..., t1=..., ts=..., steps=...,
    fn=...)`; `jax.jit` and `jax.vmap`; terminating events on ODEs
    (`event=diffrax.Event(...)`: boolean conditions, real-valued ones with a root
    finder, whose event time `sol.ts[-1]` is differentiated by the implicit function
    theorem, and several conditions at once; not on SDEs, nor with
    `SaveAt(steps=...)`).

    Second derivatives in forward-over-reverse mode: Hessian-vector products
    `jax.jvp(jax.grad(loss), (params,), (v,))` and `jax.hessian` (`jax.jacfwd` of
    `jax.jacrev`), with respect to `y0`, `args` and the terms' parameters, also in
    O(1) memory: under the outer `jax.jvp` the backward pass rebuilds the tangents of
    the states alongside the states (see [second
    derivatives][second-derivatives]). Reverse-over-reverse (`jax.grad` of
    `jax.grad`), second derivatives with respect to times (`t0`, `t1`, `dt0`,
    `SaveAt(ts=...)`) or through an `event` raise an error that names the supported
    route (forward-over-reverse, or `diffrax.DirectAdjoint`). Plain forward mode
    (`jax.jvp` of the solve) is not supported (JAX refuses it on a `custom_vjp`); use
    `diffrax.ForwardMode()`.

    The backward pass ends by rebuilding `y0`, which is also known exactly; the
    relative difference $\|\hat y_0 - y_0\|_2 / \|y_0\|_2$ measures how much rounding
    error the reconstruction accumulated, for free.

    Reconstruction amplifies rounding errors (by about `1/coupling` per step for
    [`revdiffrax.Reversible`][], more on chaotic problems), which matters in float32
    over long solves. `checkpoint_every=k` bounds this: the forward pass also stores
    the state `(y, solver_state)` after every k-th accepted step (O(max_steps / k)
    memory), and the backward pass restarts its reconstruction from each stored
    state, so rounding accumulates over at most k steps. The gradient is unchanged
    in exact arithmetic. The drift diagnostic then compares the reconstructed state
    with the stored one at every checkpoint, and reports the largest relative error
    over all segments.

    ??? cite "References"

        ```bibtex
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural ODEs},
            author={McCallum, Sam and Foster, James},
            journal={arXiv:2410.11648},
            year={2024}
        }

        @article{kidger2021efficient,
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            title={{E}fficient and {A}ccurate {G}radients for {N}eural {SDE}s},
            year={2021},
            journal={Advances in Neural Information Processing Systems}
        }
        ```
    """

    drift_tol: float | Literal["auto"] | None = eqx.field(default="auto", static=True)
    drift_callback: Callable[[jax.Array], Any] | None = eqx.field(
        default=None, static=True
    )
    checkpoint_every: int | Literal["auto"] | None = eqx.field(
        default=None, static=True
    )
    parasitic_tol: float | Literal["auto"] | None = eqx.field(
        default="auto", static=True
    )
    step_times: Literal["auto", "record", "recompute"] = eqx.field(
        default="auto", static=True
    )

    def __check_init__(self):
        tol = self.drift_tol
        if not (tol is None or tol == "auto" or isinstance(tol, (int, float))) or (
            isinstance(tol, bool)
        ):
            raise ValueError(
                '`drift_tol` must be a number (raise an error above it), "auto" (the '
                "default: warn above the square root of the machine epsilon) or None "
                f"(no check), got {tol!r}."
            )
        tol = self.parasitic_tol
        if not (tol is None or tol == "auto" or isinstance(tol, (int, float))) or (
            isinstance(tol, bool)
        ):
            raise ValueError(
                '`parasitic_tol` must be a number (raise an error above it), "auto" '
                "(the default: warn above 1e-3) or None (no check), got "
                f"{tol!r}."
            )
        if self.step_times not in ("auto", "record", "recompute"):
            raise ValueError(
                '`step_times` must be "auto" (the default), "record" (store every '
                'accepted step time of an adaptive solve) or "recompute" (re-run '
                "the forward solve in segments on the backward pass), got "
                f"{self.step_times!r}."
            )
        k = self.checkpoint_every
        if (
            k is not None
            and k != "auto"
            and (isinstance(k, bool) or not isinstance(k, int) or k < 1)
        ):
            raise ValueError(
                "`checkpoint_every` must be a positive int (store the solver state "
                'every that many accepted steps), "auto" (k from the coupling, the '
                f"dtype and the drift tolerance) or None, got {k!r}. "
                "`revdiffrax.choose_checkpoint_every` measures a good value."
            )

    def _resolved(self, y0, solver, max_steps, t0) -> "ReversibleAdjoint":
        """This adjoint with `checkpoint_every="auto"` resolved to a number (or
        None) from the horizon law, and `step_times="auto"` to `"record"` where
        recomputing could not save `AUTO_MIN_SAVING_BYTES`, at trace time."""
        adjoint = self
        if self.step_times == "auto" and not worth_recomputing(max_steps, t0):
            adjoint = dataclasses.replace(adjoint, step_times="record")
        if self.checkpoint_every != "auto":
            return adjoint
        k = resolve_checkpoint_every(
            y0=y0, solver=solver, max_steps=max_steps, drift_tol=self.drift_tol
        )
        return dataclasses.replace(adjoint, checkpoint_every=k)

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        stepsize_controller,
        event,
        saveat,
        t0,
        t1,
        dt0,
        max_steps,
        throw,
        init_state,
        passed_solver_state,
        passed_controller_state,
        progress_meter,
    ):
        del throw
        check_inputs(
            passed_controller_state=passed_controller_state,
            solver=solver,
            terms=terms,
            event=event,
            max_steps=max_steps,
            stepsize_controller=stepsize_controller,
            saveat=saveat,
        )
        # Inside `jax.shard_map` every input varies over the mesh axes any of them
        # does, so that loop carries keep their types (`_varying.py`); before the
        # closure conversion, which traces the vector fields with these types.
        axes = varying_axes((init_state, args, terms, saveat, stepsize_controller))
        diff = (init_state.y, args, terms, saveat, t0, t1, dt0)
        y0, args, terms, saveat, t0, t1, dt0 = make_varying(diff, axes)
        args = convert_args(args)  # e.g. `args=lambda y: model(y)`
        terms = convert_terms(terms, solver, t0, init_state.tnext, y0, args)
        saveat = convert_saveat(saveat, t0, y0, args)
        ts = saveat_ts(saveat)
        fns = saveat_fns(saveat)
        problem = (y0, args, terms, solver, t0, t1, dt0, saveat, stepsize_controller)
        event, event_fns = _convert_event(event, *problem, max_steps)
        # The leaves of the state that the drift and parasitic-mode checks measure.
        measured = measured_leaves(
            solver, terms, t0, y0, args, fns, has_event=event is not None
        )
        # A passed solver state is an input (`continued.py`); one made by
        # `solver.init` is re-traced on the backward pass.
        solver_state0 = init_state.solver_state if passed_solver_state else None
        inputs = DiffInputs(
            y0=y0,
            args=args,
            terms=terms,
            t0=t0,
            t1=t1,
            ts=ts,
            dt0=dt0,
            fns=fns,
            solver_state0=solver_state0,
            event_fns=event_fns,
        )
        inputs = make_varying(inputs, axes)  # e.g. the closed-over constants
        # Everything the loop depends on other than `inputs` is a constant; the
        # dependence of the initial solver state on (y0, args, terms, t0) is re-traced
        # on the backward pass through `solver.init`, and the differentiable copies of
        # `dt0` and `SaveAt.ts` travel in `inputs`. A passed controller state gets no
        # cotangent (`continued.py`).
        init_state = _stop_gradient(eqx.tree_at(lambda s: s.y, init_state, object()))
        final_state, aux_stats = loop_reversible(
            inputs,
            adjoint=self._resolved(y0, solver, max_steps, t0),
            solver=solver,
            stepsize_controller=_stop_gradient(
                _constant_controller(stepsize_controller)
            ),
            event=event,
            saveat=replace_fns(
                replace_ts(saveat, [lax.stop_gradient(x) for x in ts]),
                _stop_gradient(fns),
            ),
            dt0=None if dt0 is None else lax.stop_gradient(dt0),
            max_steps=max_steps,
            init_state=init_state,
            progress_meter=progress_meter,
            passed_state=passed_controller_state,
            measured=measured,
        )
        out = _differentiable_outputs(final_state)
        return out, aux_stats


ReversibleAdjoint.__init__.__doc__ = r"""**Arguments:**

- `drift_tol`: what to do with the relative reconstruction error ("drift") of the
    backward pass, i.e. how far the rebuilt `y0` (and, with `checkpoint_every`, the
    rebuilt checkpointed states) are from the true ones. `"auto"` (default): issue
    a [`revdiffrax.DriftWarning`][], once per compilation, when the drift exceeds the
    square root of the machine epsilon of the state's dtype (3.5e-4 in float32,
    1.5e-8 in float64), i.e. when about half the digits are lost. A number: raise an
    error (via `equinox.error_if`, so also under `jax.jit`) when the drift exceeds it.
    `None`: no check. Both this check and `parasitic_tol`'s measure the components
    of the state that the gradient depends on: those a vector field reads (or the
    pullback of a `SaveAt.fn`); a component that nothing reads, like a continuous
    normalising flow's log-density, is left out, as its reconstruction cannot
    affect the gradient and measuring it would cost evaluations (its trace) that
    are otherwise skipped. (All components with an `event`, or if none is read.)
- `drift_callback`: if set, called on the host (via `jax.debug.callback`) with the
    relative reconstruction error of `y0` every time a gradient is computed, e.g.
    `drifts = []; ReversibleAdjoint(drift_callback=drifts.append)`. With
    `checkpoint_every`, this is the largest relative error of the reconstructed `y`
    over all segments between checkpoints (and `y0`).
- `checkpoint_every`: `None` (default) for pure O(1)-memory reconstruction, or a
    positive int k: store the solver state every k accepted steps on the forward
    pass and restart the reconstruction from it on the backward pass, so rounding
    errors accumulate over at most k steps. Costs `max_steps // k` stored states
    (allocated up front, like the step-time buffer) and no extra vector-field
    evaluations. See [`revdiffrax.choose_checkpoint_every`][] to pick k.
    `"auto"`: k from the horizon law at trace time, with no extra run: the
    largest k for which $10\,\varepsilon\sqrt{\sum_{j<k}\lambda^{-2j}}$ stays
    below the drift tolerance (the number `drift_tol`, else
    $\sqrt{\varepsilon}$), with $\varepsilon$ the machine epsilon of `y0`'s dtype
    and $\lambda$ the coupling of [`revdiffrax.Reversible`][] (1 for solvers
    without one); no checkpoints when k reaches `max_steps`, whose value sizes the
    storage. E.g. k = 2563 for the default coupling 0.999 in float32, 12,606 in
    float64, 370 for coupling 0.99 in float32. The law sees only the coupling: on
    dissipative or chaotic dynamics the reconstruction grows errors faster, so keep
    the drift check on (or measure k with
    [`revdiffrax.choose_checkpoint_every`][]). See
    [the horizon law][the-horizon-law].
- `step_times`: how the backward pass gets the accepted step times of an adaptive
    step size controller (e.g. `PIDController`), which cannot be run backwards.
    `"record"`: the forward pass records them, `max_steps` slots per solve
    (under `jax.vmap`, per sample), allocated up front. `"recompute"`: the forward
    pass stores, every k accepted steps, what diffrax's loop needs to restart
    there (the state, the solver and controller states, the times and step
    counts), the times of the last k steps and the low half of the bits of
    every step time (2 bytes a step in float32, 4 in float64), and the backward
    pass re-runs each segment of k steps but the last forward with diffrax's own
    loop before reversing it, restarting the reconstruction from the stored
    state as `checkpoint_every=k` does. A re-run is compiled apart from the
    forward pass, and XLA may round its multiply-adds differently there (fused
    multiply-adds); the embedded error estimate, which cancels to about 1e-7 of
    its terms, turns that last bit into step times about 1e-12 apart
    (`benchmarks/results/rerun_bitwise_cpu.md`). So each re-run time is snapped
    to the nearest float with the recorded low bits: the forward's time, bitwise,
    and the gradient equals that of `"record"`. Each re-run must reproduce the
    forward's steps (their count, snaps within a quarter of the window, and the
    sum of their times, exactly); a difference joins the drift that `drift_tol`
    checks. It stores `(max_steps // k) c + 2k` scalars and `max_steps` half
    scalars, c those of one restart point, against `max_steps` scalars; k is
    `checkpoint_every` if set, else $\lceil\sqrt{\text{max\_steps}\, c}\rceil$
    (about minimal), and it costs a forward solve of all but the last segment
    (with their rejected steps) in the backward pass: nothing for a solve of at
    most k steps. Not with an `event`, `jump_ts`, a continued solve (a passed
    solver or controller state), inside `jax.shard_map`, or when `t0`, `t1` or
    `dt0` are differentiated: there it raises an error. `"auto"` (the default):
    `"recompute"` where it is possible, stores less than the record and could
    save at least 64 KiB over the `jax.vmap` batch, else `"record"`. (A solve of
    more than k steps pays up to one more forward solve: one 2-d float64 solve of
    2,297 steps took 1.43x the recording gradient's time to save 8 KiB, so a
    solve on its own at `max_steps=4096` records; 32 float32 samples under `vmap`
    save 200 KiB.) Under `jax.vmap` a sample whose segment ends re-runs while the
    others wait, so samples with very different step counts over several
    segments pay more than one forward solve. Constant steps and `StepTo` record
    nothing either way.
- `parasitic_tol`: what to do with the relative distance
    $\\|y_N - z_N\\|_2 / \\|y_N\\|_2$ (over the components measured, see
    `drift_tol`) between the two states of a two-state solver
    ([`revdiffrax.Reversible`][], [`revdiffrax.ReversibleHeun`][]) at the end of the
    forward solve, reported as `sol.stats["parasitic_offset"]`. It measures how far
    the parasitic mode has taken the solution from the base solver's (on a
    dissipative problem with too large a coupling it grows geometrically; see
    [choosing the coupling][choosing-the-coupling]). `"auto"` (default): issue a
    [`revdiffrax.ParasiticModeWarning`][], once per compilation, above `1e-3` with
    constant steps; with an adaptive controller of tolerances `rtol`, `atol` over
    $N$ accepted steps, above $10 N (\text{rtol} + \text{atol}\sqrt{n} /
    \|y_N\|_2)$: ten times what the local errors the controller allowed can add
    up to, beyond which the mode must have grown. On an SDE (terms with a
    Brownian motion) `"auto"` only reports the offset: there the two states
    differ by the noise increments themselves. A number: raise an error above
    it. `None`: no check.
"""
