import abc
from typing import TypeVar

import diffrax
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, Y
from jaxtyping import PyTree


_SolverState = TypeVar("_SolverState")


class AbstractReversibleSolver(diffrax.AbstractSolver[_SolverState]):
    """Abstract base class for algebraically reversible solvers.

    A reversible solver is a normal [`diffrax.AbstractSolver`][] (so it can be passed
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
    """

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
        [`diffrax.RESULTS`][] code.
        """
