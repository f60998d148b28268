from collections.abc import Callable
from typing import ClassVar, TypeAlias

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from jaxtyping import PyTree

from .base import AbstractReversibleSolver


# (t_{n-1}, y_{n-1}, t_start): the previous point of the two-step recurrence, plus
# the start of the solve (where the recurrence is started with an Euler step).
_SolverState: TypeAlias = tuple[RealScalarLike, PyTree, RealScalarLike]


def _is_none(x) -> bool:
    return x is None


class LeapfrogMidpoint(AbstractReversibleSolver[_SolverState]):
    r"""Leapfrog/midpoint method, with its exact backward step.

    Same numerics as
    [`diffrax.LeapfrogMidpoint`](https://docs.kidger.site/diffrax/api/solvers/ode_solvers/#diffrax.LeapfrogMidpoint):
    the two-step recurrence

    $$y_{n+1} = y_{n-1} + f(t_n, y_n)\,(t_{n+1} - t_{n-1}),$$

    started with an Euler step ($t_{-1} = t_0$, $y_{-1} = y_0$), which is undone by
    $y_{n-1} = y_{n+1} - f(t_n, y_n)(t_{n+1} - t_{n-1})$. Second order, one vector
    field evaluation per step, stable only on the imaginary axis.

    As for any multistep method, undoing a step needs $t_{n-1}$, which an O(1) state
    cannot remember on an arbitrary grid: `backward_step` takes it from
    `at_previous_time`, as in `solver.at_previous_time(t_prev).backward_step(...)`,
    and raises without it. [`revdiffrax.ReversibleAdjoint`][] passes it (it knows
    every step time), so any grid works: `StepTo`, `PIDController` (whose steps are
    all accepted, as there is no error estimate; e.g. with `step_ts`) or a
    `ConstantStepSize` whose `dt0` does not divide `t1 - t0`. The forward step
    ignores `made_jump` (as diffrax's does), so `jump_ts` changes only the grid.

    ??? cite "Reference"

        ```bibtex
        @article{shampine2009stability,
            title={Stability of the leapfrog/midpoint method},
            author={L. F. Shampine},
            journal={Applied Mathematics and Computation},
            volume={208},
            number={1},
            pages={293-298},
            year={2009},
        }
        ```
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = (
        diffrax.LocalLinearInterpolation
    )
    # t_{n-1}, the start of the step before the one to undo: set by
    # `at_previous_time`, for `backward_step` only.
    t_prev: RealScalarLike | None = None

    # Exact on any grid given t_{n-1}; `step` ignores `made_jump`.
    reversible_on_any_grid: ClassVar[bool] = True
    reversible_across_jumps: ClassVar[bool] = True

    def at_previous_time(self, t_prev: RealScalarLike) -> "LeapfrogMidpoint":
        return eqx.tree_at(lambda s: s.t_prev, self, t_prev, is_leaf=_is_none)

    def order(self, terms):
        return 2

    def detach_state_times(self, solver_state: _SolverState) -> _SolverState:
        tm1, ym1, t_start = solver_state
        return lax.stop_gradient(tm1), ym1, lax.stop_gradient(t_start)

    def init(self, terms, t0, t1, y0, args) -> _SolverState:
        del terms, t1, args
        return t0, y0, t0

    def step(
        self,
        terms: diffrax.AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, None, DenseInfo, _SolverState, diffrax.RESULTS]:
        del made_jump
        tm1, ym1, t_start = solver_state
        control = terms.contr(tm1, t1)
        y1 = jtu.tree_map(lambda a, b: a + b, ym1, terms.vf_prod(t0, y0, args, control))
        dense_info = dict(y0=y0, y1=y1)
        return y1, None, dense_info, (t0, y0, t_start), diffrax.RESULTS.successful

    def backward_step(
        self,
        terms: diffrax.AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, DenseInfo, _SolverState, diffrax.RESULTS]:
        del made_jump
        if self.t_prev is None:
            raise ValueError(
                "`LeapfrogMidpoint.backward_step` needs the start t_{n-1} of the step "
                "before the one it undoes, which its state does not hold: call "
                "`solver.at_previous_time(t_prev).backward_step(...)` (`t_prev = t0` "
                "on the first step). `revdiffrax.ReversibleAdjoint` does this."
            )
        _, y0, t_start = solver_state
        first = t0 == t_start
        # On the first step the recurrence was started from (t0, y0) itself.
        tm1 = jnp.where(first, t0, self.t_prev)
        control = terms.contr(tm1, t1)
        ym1 = jtu.tree_map(lambda a, b: a - b, y1, terms.vf_prod(t0, y0, args, control))
        ym1 = jtu.tree_map(lambda a, b: jnp.where(first, b, a), ym1, y0)
        dense_info = dict(y0=y0, y1=y1)
        return y0, dense_info, (tm1, ym1, t_start), diffrax.RESULTS.successful

    def func(
        self, terms: diffrax.AbstractTerm, t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return terms.vf(t0, y0, args)


LeapfrogMidpoint.__init__.__doc__ = """**Arguments:**

- `t_prev`: leave it unset. `at_previous_time(t_prev)` returns a copy with the start
    of the step before the one `backward_step` undoes.
"""
