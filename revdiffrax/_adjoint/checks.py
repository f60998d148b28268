"""Input checks of `ReversibleAdjoint`: what it refuses, each with the fix.

Solver capabilities are read from the solvers themselves (class variables of
`AbstractReversibleSolver`), not from their types.
"""

import diffrax
from diffrax._heuristics import is_unsafe_sde
from jaxtyping import PyTree

from .._solver import AbstractReversibleSolver
from .continued import check_controller_state
from .events import check_event
from .saveat import subsaveats


def check_solver(solver: diffrax.AbstractSolver) -> None:
    if not isinstance(solver, AbstractReversibleSolver):
        name = type(solver).__name__
        raise ValueError(
            f"`ReversibleAdjoint` needs a reversible solver, got `{name}`. Wrap it: "
            f"`revdiffrax.Reversible(diffrax.{name}())`, or use one of "
            "`revdiffrax.ReversibleHeun()`, `revdiffrax.LeapfrogMidpoint()`, "
            "`revdiffrax.SemiImplicitEuler()`, `revdiffrax.AsynchronousLeapfrog()`, "
            "`revdiffrax.SymmetricComposition(revdiffrax.AsynchronousLeapfrog())`."
        )


def check_max_steps(max_steps: int | None) -> None:
    if max_steps is None:
        raise ValueError(
            "`ReversibleAdjoint` sizes what it keeps of the step times (a record "
            "of, or restart points every k of, at most `max_steps` accepted steps) "
            "from `max_steps`, so it needs a finite bound: pass e.g. "
            "`diffeqsolve(..., max_steps=4096)`."
        )


def check_brownian_motion(terms: PyTree[diffrax.AbstractTerm]) -> None:
    if is_unsafe_sde(terms):
        raise ValueError(
            "`ReversibleAdjoint` re-evaluates the Brownian motion on the backward "
            "pass, which `diffrax.UnsafeBrownianPath` cannot do. Use "
            "`diffrax.VirtualBrownianTree(t0, t1, tol, shape, key)` instead."
        )


def check_step_times(
    solver: AbstractReversibleSolver,
    stepsize_controller: diffrax.AbstractStepSizeController,
) -> None:
    name = type(solver).__name__
    if not solver.reversible_on_any_grid and not isinstance(
        stepsize_controller, diffrax.ConstantStepSize
    ):
        raise ValueError(
            f"`{name}` can only be reversed on a uniform grid: use "
            "`stepsize_controller=diffrax.ConstantStepSize()` with a `dt0` that "
            "divides `t1 - t0`."
        )


def check_saveat(saveat: diffrax.SaveAt) -> None:
    if saveat.dense:
        raise NotImplementedError(
            "`ReversibleAdjoint` does not support `SaveAt(dense=True)`, which would "
            "store every step and defeat the O(1) memory of reversible "
            "backpropagation. Save at the times you need instead: "
            "`SaveAt(ts=...)` or `SaveAt(steps=True)`."
        )
    for sub in subsaveats(saveat):
        if sub.ts is not None and sub.steps != 0:
            raise NotImplementedError(
                "`ReversibleAdjoint` does not support a single `SubSaveAt` with both "
                "`ts` and `steps`: use two, e.g. "
                "`SaveAt(subs=[SubSaveAt(ts=ts), SubSaveAt(steps=True)])`."
            )


def check_inputs(
    *,
    solver,
    terms,
    event,
    max_steps,
    stepsize_controller,
    saveat,
    passed_controller_state: bool = False,
) -> None:
    """Raise a clear error for every input `ReversibleAdjoint` cannot handle."""
    check_controller_state(stepsize_controller, passed_controller_state)
    check_solver(solver)
    check_max_steps(max_steps)
    check_event(event, terms, saveat)
    check_brownian_motion(terms)
    check_step_times(solver, stepsize_controller)
    check_saveat(saveat)
