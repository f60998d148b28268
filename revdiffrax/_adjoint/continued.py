"""Continued solves: `diffeqsolve(..., solver_state=..., controller_state=...)`.

A passed solver state is an input of the solve like `y0`, and receives its cotangent
(not pulled back through `solver.init`, which did not make it). Its first step is
pulled back from the known start `(y0, solver_state0)` rather than from a
reconstruction: a multistep solver could not rebuild the passed state without the
times of the solve it came from.

A passed controller state gets a zero cotangent: diffrax's controllers hold error
ratios and indices, which set each step size through a stop-gradiented factor.
"""

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
from jaxtyping import PyTree

from .._solver import AbstractReversibleSolver
from .._solver.base import apply_pullback, linearise_step


class KnownStart(eqx.Module):
    """Stands in for the solver on the first step of a continued solve: 'undoes' it
    by returning the known start, and pulls back through `solver.step` from there
    (the signature is that of `AbstractReversibleSolver.backward_step_pullback`)."""

    solver: AbstractReversibleSolver
    y0: PyTree
    solver_state0: PyTree

    def backward_step_pullback(
        self,
        terms,
        t0,
        t1,
        y1,
        args,
        solver_state,
        made_jump,
        cotangents: tuple,
        dense_cotangent: Callable | None = None,
        *,
        diff_times: bool,
    ) -> tuple[PyTree, PyTree, tuple, Any]:
        del y1, solver_state
        dense_info, pullback = linearise_step(
            self.solver,
            terms,
            t0,
            t1,
            self.y0,
            args,
            self.solver_state0,
            made_jump,
            diff_times,
        )
        bars, aux = apply_pullback(pullback, dense_info, cotangents, dense_cotangent)
        return self.y0, self.solver_state0, bars, aux


def check_controller_state(
    stepsize_controller: diffrax.AbstractStepSizeController,
    passed_controller_state: bool,
) -> None:
    if passed_controller_state and isinstance(stepsize_controller, diffrax.StepTo):
        raise NotImplementedError(
            "`ReversibleAdjoint` recomputes the step times of a `StepTo` solve from "
            "`StepTo.ts`, which a passed `controller_state` (an index into them) would "
            "shift. Continue with `StepTo(remaining_ts)` (starting at the new `t0`) "
            "and no `controller_state`."
        )
