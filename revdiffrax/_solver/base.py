import abc
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, Y
from jaxtyping import PyTree


_SolverState = TypeVar("_SolverState")


class AbstractReversibleSolver(diffrax.AbstractSolver[_SolverState]):
    """Abstract base class for algebraically reversible solvers.

    A reversible solver is a normal
    [`diffrax.AbstractSolver`](https://docs.kidger.site/diffrax/api/solvers/abstract_solvers/#diffrax.AbstractSolver)
    (so it can be passed
    to `diffrax.diffeqsolve` with any adjoint) that additionally knows how to undo
    its own step in closed form: given the output of

    ```python
    y1, _, dense_info, solver_state1, _ = solver.step(
        terms, t0, t1, y0, args, solver_state0, made_jump
    )
    ```

    the call

    ```python
    y0, dense_info, solver_state0, result = solver.backward_step(
        terms, t0, t1, y1, args, solver_state1, made_jump
    )
    ```

    reconstructs `y0` and `solver_state0` (up to floating point) and the same
    `dense_info`. This is what [`revdiffrax.ReversibleAdjoint`][] uses to
    backpropagate in O(1) memory: states are rebuilt on the backward pass instead of
    being stored on the forward pass.

    A multistep method also needs the time of the step before the one it undoes,
    which an O(1) state cannot remember on an arbitrary grid: it receives it through
    `at_previous_time`, as in `solver.at_previous_time(t_prev).backward_step(...)`,
    and its `backward_step` raises without it.

    Subclasses declare what the adjoint may rely on with two class variables,
    `reversible_on_any_grid` and `reversible_across_jumps`, and may override
    `backward_step_vjp` (or `backward_step_pullback`, which the adjoint calls) to
    share work between the reconstruction and the vector-Jacobian product, or to
    hold less memory.
    """

    # Whether `backward_step` is exact for any sequence of step times (given the
    # time before the step through `at_previous_time`, for a multistep method). If
    # not, `ReversibleAdjoint` only reverses it under `diffrax.ConstantStepSize`.
    reversible_on_any_grid: ClassVar[bool] = True
    # Whether `backward_step` also undoes a step made with `made_jump=True` after a
    # jump requested by `jump_ts`. If not (e.g. the step restarts part of the state
    # from y, which discards the old state and makes the step implicit in y),
    # `ReversibleAdjoint` stores the start of each step after a jump (at most
    # `len(jump_ts)`) and pulls that step back from it.
    reversible_across_jumps: ClassVar[bool] = False

    def at_previous_time(
        self, t_prev: RealScalarLike
    ) -> "AbstractReversibleSolver[_SolverState]":
        """The solver that undoes a step from `t0` to `t1` knowing `t_prev`, the start
        of the step before (`t_prev == t0` for the first step of a solve).

        One-step methods do not need it and return `self` (the default). A multistep
        method returns a copy that holds `t_prev` for its `backward_step`.
        [`revdiffrax.ReversibleAdjoint`][] calls this before every backward step.
        """
        del t_prev
        return self

    def detach_state_times(self, solver_state: _SolverState) -> _SolverState:
        """`solver_state` with the times it holds (e.g. the start of the previous
        step of a multistep method) made constants, for linearising `step` when the
        step times are not differentiated: a control such as a
        `VirtualBrownianTree` refuses tangents on its evaluation times. The default
        returns `solver_state` (a state without times)."""
        return solver_state

    def second_state(self, y: Y, solver_state: _SolverState) -> Y | None:
        """The second approximation of the solution that a two-state method carries
        in its solver state (e.g. $z$ of [`revdiffrax.Reversible`][]), or `None`
        (the default) for methods without one. The distance between the two is the
        method's parasitic mode, which [`revdiffrax.ReversibleAdjoint`][] reports as
        `sol.stats["parasitic_offset"]`.
        """
        del y, solver_state
        return None

    @abc.abstractmethod
    def backward_step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, DenseInfo, _SolverState, diffrax.RESULTS]:
        """Undo a single step of the solver.

        **Arguments:**

        - `terms`: the terms of the differential equation, as passed to `step`.
        - `t0`: the start of the interval that the *forward* step was made over.
        - `t1`: the end of the interval that the forward step was made over.
        - `y1`: the value of the solution at `t1` (the output of `step`).
        - `args`: extra arguments passed to the vector field.
        - `solver_state`: the solver state at `t1` (the output of `step`).
        - `made_jump`: the `made_jump` flag that was passed to the forward step.

        **Returns:**

        A 4-tuple `(y0, dense_info, solver_state0, result)`: the solution and solver
        state at `t0`, the dense information of the step over `[t0, t1]`, and a
        [`diffrax.RESULTS`](https://docs.kidger.site/diffrax/api/solution/) code.
        """

    def backward_step_vjp(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
        *,
        diff_times: bool,
        want_dense: bool,
    ) -> tuple[Y, DenseInfo, _SolverState, Callable]:
        """Undo a single step, and linearise the forward step it undid.

        **Arguments:** as for `backward_step`, plus

        - `diff_times`: whether the pullback should differentiate with respect to
            `t0` and `t1` (otherwise it returns `None` for them).
        - `want_dense`: whether the caller will pass a nonzero cotangent for the dense
            information (a solver may skip work when it will not).

        **Returns:**

        A 4-tuple `(y0, dense_info, solver_state0, pullback)`, where the first three
        are as for `backward_step` and `pullback(y1_bar, solver_state1_bar,
        dense_info_bar)` maps cotangents of the outputs `(y1, solver_state1,
        dense_info)` of `step(terms, t0, t1, y0, args, solver_state0, made_jump)` to
        those of its inputs, `(y0_bar, solver_state0_bar, (terms_bar, args_bar),
        (t0_bar, t1_bar))` (`None` where an input is not differentiable). All
        cotangents hold the inexact arrays of their primal, `None` elsewhere.

        The default implementation calls `backward_step` and then differentiates
        `step` at the reconstructed state, which evaluates the step twice; solvers
        whose reconstruction already evaluates what the VJP needs override it (see
        `revdiffrax.Reversible`).
        """
        del want_dense
        y0, _, solver_state0, _ = self.backward_step(
            terms, t0, t1, y1, args, solver_state, made_jump
        )
        dense_info, pullback = linearise_step(
            self, terms, t0, t1, y0, args, solver_state0, made_jump, diff_times
        )
        return y0, dense_info, solver_state0, pullback

    def backward_step_pullback(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
        cotangents: tuple[Y, PyTree, PyTree],
        dense_cotangent: Callable | None = None,
        *,
        diff_times: bool,
    ) -> tuple[Y, _SolverState, tuple, Any]:
        """Undo a single step and pull cotangents back through the forward step it
        undid, in one call: what [`revdiffrax.ReversibleAdjoint`][] calls.

        **Arguments:** as for `backward_step`, plus

        - `cotangents`: `(y1_bar, solver_state1_bar, params_bar)`, the cotangents of
            the step's outputs `y1` and `solver_state1`, and the cotangent of
            `(terms, args)` accumulated so far, to which the step's is added.
        - `dense_cotangent`: `None` when the step's dense information gets no
            cotangent; else a function `dense_info -> (dense_info_bar, aux)`, called
            once with the step's dense information.
        - `diff_times`: as for `backward_step_vjp`.

        **Returns:**

        A 4-tuple `(y0, solver_state0, bars, aux)`: the state before the step as for
        `backward_step`; `bars = (y0_bar, solver_state0_bar, params_bar, times_bar)`,
        the cotangents of the step's inputs (`params_bar` including the accumulated
        one passed in; `times_bar` that of `(t0, t1)`, or `None` unless
        `diff_times`); and what `dense_cotangent` returned as `aux` (else `None`).

        As the cotangents are known before the step is undone, a solver can apply
        each part of its pullback as soon as the part is evaluated, and hold fewer
        residuals at once (see [`revdiffrax.Reversible`][]). The default calls
        `backward_step_vjp`.
        """
        want_dense = dense_cotangent is not None
        y0, dense_info, solver_state0, pullback = self.backward_step_vjp(
            terms,
            t0,
            t1,
            y1,
            args,
            solver_state,
            made_jump,
            diff_times=diff_times,
            want_dense=want_dense,
        )
        bars, aux = apply_pullback(pullback, dense_info, cotangents, dense_cotangent)
        return y0, solver_state0, bars, aux


def linearise_step(
    solver: diffrax.AbstractSolver,
    terms: PyTree[diffrax.AbstractTerm],
    t0: RealScalarLike,
    t1: RealScalarLike,
    y0: Y,
    args: Args,
    solver_state0: PyTree,
    made_jump: BoolScalarLike,
    diff_times: bool,
) -> tuple[DenseInfo, Callable]:
    """`solver.step` from `(y0, solver_state0)` under `jax.vjp`: returns the step's
    dense information and `pullback(y1_bar, solver_state1_bar, dense_info_bar)`, as
    in `AbstractReversibleSolver.backward_step_vjp`."""

    def step(y, state, params, times):
        _terms, _args = params
        # Times are differentiated only on request: e.g. a `VirtualBrownianTree`
        # refuses to be differentiated in time.
        _t0, _t1 = times if diff_times else (t0, t1)
        if not diff_times and isinstance(solver, AbstractReversibleSolver):
            state = solver.detach_state_times(state)
        _y1, _, _dense_info, _state1, _ = solver.step(
            _terms, _t0, _t1, y, _args, state, made_jump
        )
        return _y1, _state1, _dense_info

    times = (t0, t1) if diff_times else None
    (_, _, dense_info), vjp = eqx.filter_vjp(
        step, y0, solver_state0, (terms, args), times
    )

    def pullback(y1_bar, solver_state1_bar, dense_info_bar):
        cotangent = (y1_bar, solver_state1_bar, dense_info_bar)
        return vjp(eqx.filter(cotangent, eqx.is_inexact_array))

    return dense_info, pullback


def apply_pullback(
    pullback: Callable,
    dense_info: DenseInfo,
    cotangents: tuple[Y, PyTree, PyTree],
    dense_cotangent: Callable | None,
) -> tuple[tuple, Any]:
    """Apply a `backward_step_vjp` pullback to the cotangents of
    `backward_step_pullback`; returns its `(bars, aux)`."""
    if dense_cotangent is None:
        dense_info_bar = jtu.tree_map(
            jnp.zeros_like, eqx.filter(dense_info, eqx.is_inexact_array)
        )
        aux = None
    else:
        dense_info_bar, aux = dense_cotangent(dense_info)
    y1_bar, solver_state1_bar, params_bar = cotangents
    y0_bar, solver_state0_bar, step_params_bar, times_bar = pullback(
        y1_bar, solver_state1_bar, dense_info_bar
    )
    params_bar = jtu.tree_map(
        lambda a, b: a if b is None else (b if a is None else a + b),
        params_bar,
        step_params_bar,
        is_leaf=lambda x: x is None,
    )
    return (y0_bar, solver_state0_bar, params_bar, times_bar), aux
