from collections.abc import Callable
from typing import ClassVar, TypeAlias

import diffrax
import jax.tree_util as jtu
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from jaxtyping import PyTree

from .base import AbstractReversibleSolver


# (yhat, vf(t, yhat)): the auxiliary state of reversible Heun and its vector field.
_SolverState: TypeAlias = tuple[PyTree, PyTree]


class ReversibleHeun(
    AbstractReversibleSolver[_SolverState],
    diffrax.AbstractAdaptiveSolver,
    diffrax.AbstractStratonovichSolver,
):
    r"""Reversible Heun method, with its exact backward step.

    Identical to
    [`diffrax.ReversibleHeun`](https://docs.kidger.site/diffrax/api/solvers/ode_solvers/#diffrax.ReversibleHeun)
    on the forward pass (it delegates to it).
    With auxiliary state $\hat y$ and $f_n = f(t_n, \hat y_n)$, a step is

    $$\hat y_{n+1} = 2 y_n - \hat y_n + f_n \Delta t,\qquad
      f_{n+1} = f(t_{n+1}, \hat y_{n+1}),\qquad
      y_{n+1} = y_n + \tfrac12 (f_n + f_{n+1}) \Delta t,$$

    and it is undone by

    $$\hat y_n = 2 y_{n+1} - \hat y_{n+1} - f_{n+1} \Delta t,\qquad
      f_n = f(t_n, \hat y_n),\qquad
      y_n = y_{n+1} - \tfrac12 (f_n + f_{n+1}) \Delta t.$$

    Second order for ODEs, strong order 0.5 (1 for additive noise) for Stratonovich
    SDEs; one vector field evaluation per step. Stable only near the imaginary axis.

    `backward_step` assumes that no jump happened at `t0` other than at the start of
    the solve (where $\hat y_0 = y_0$): after a jump, `step` uses $f(t_n, y_n)$,
    which makes it implicit in $y_n$. With `jump_ts`,
    [`revdiffrax.ReversibleAdjoint`][] stores the start of each step made after a
    jump instead (at most `len(jump_ts)` states).

    ??? cite "Reference"

        ```bibtex
        @article{kidger2021efficient,
            author={Kidger, Patrick and Foster, James and Li, Xuechen and Lyons, Terry},
            title={{E}fficient and {A}ccurate {G}radients for {N}eural {SDE}s},
            year={2021},
            journal={Advances in Neural Information Processing Systems}
        }
        ```
    """

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = (
        diffrax.LocalLinearInterpolation
    )

    def order(self, terms):
        return 2

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args) -> _SolverState:
        return diffrax.ReversibleHeun().init(terms, t0, t1, y0, args)

    def step(
        self,
        terms: diffrax.AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y, DenseInfo, _SolverState, diffrax.RESULTS]:
        return diffrax.ReversibleHeun().step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )

    def second_state(self, y: Y, solver_state: _SolverState) -> Y:
        return solver_state[0]  # yhat

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
        yhat1, vf1 = solver_state
        control = terms.contr(t0, t1)
        yhat0 = jtu.tree_map(
            lambda y, yh, p: 2 * y - yh - p, y1, yhat1, terms.prod(vf1, control)
        )
        vf0 = terms.vf(t0, yhat0, args)
        incr = terms.prod(jtu.tree_map(lambda a, b: a + b, vf0, vf1), control)
        y0 = jtu.tree_map(lambda y, p: y - 0.5 * p, y1, incr)
        dense_info = dict(y0=y0, y1=y1)
        return y0, dense_info, (yhat0, vf0), diffrax.RESULTS.successful

    def func(
        self, terms: diffrax.AbstractTerm, t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return terms.vf(t0, y0, args)


ReversibleHeun.__init__.__doc__ = """**Arguments:** None"""
