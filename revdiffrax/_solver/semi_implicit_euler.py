from collections.abc import Callable
from typing import ClassVar, TypeAlias

import diffrax
import jax.tree_util as jtu
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF
from jaxtyping import ArrayLike, Float, PyTree

from .base import AbstractReversibleSolver


_SolverState: TypeAlias = None
Ya: TypeAlias = PyTree[Float[ArrayLike, "?*y"]]
Yb: TypeAlias = PyTree[Float[ArrayLike, "?*y"]]


class SemiImplicitEuler(AbstractReversibleSolver[_SolverState]):
    r"""Semi-implicit (symplectic) Euler method, with its exact backward step.

    Identical to
    [`diffrax.SemiImplicitEuler`](https://docs.kidger.site/diffrax/api/solvers/ode_solvers/#diffrax.SemiImplicitEuler)
    on the forward pass (it delegates to
    it). For `terms = (term_1, term_2)` and state $(a, b)$:

    $$a_{n+1} = a_n + f_1(t_n, b_n) \Delta t,\qquad
      b_{n+1} = b_n + f_2(t_n, a_{n+1}) \Delta t,$$

    undone by

    $$b_n = b_{n+1} - f_2(t_n, a_{n+1}) \Delta t,\qquad
      a_n = a_{n+1} - f_1(t_n, b_n) \Delta t.$$

    First order, symplectic; no error estimate, so fixed step sizes only.
    """

    term_structure: ClassVar = (diffrax.AbstractTerm, diffrax.AbstractTerm)
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = (
        diffrax.LocalLinearInterpolation
    )
    # `step` ignores `made_jump`.
    reversible_across_jumps: ClassVar[bool] = True

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args) -> _SolverState:
        return None

    def step(
        self,
        terms: tuple[diffrax.AbstractTerm, diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: tuple[Ya, Yb],
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[tuple[Ya, Yb], None, DenseInfo, _SolverState, diffrax.RESULTS]:
        return diffrax.SemiImplicitEuler().step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )

    def backward_step(
        self,
        terms: tuple[diffrax.AbstractTerm, diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: tuple[Ya, Yb],
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[tuple[Ya, Yb], DenseInfo, _SolverState, diffrax.RESULTS]:
        del solver_state, made_jump
        term_1, term_2 = terms
        y1_1, y1_2 = y1
        control1 = term_1.contr(t0, t1)
        control2 = term_2.contr(t0, t1)
        y0_2 = jtu.tree_map(
            lambda b, p: b - p, y1_2, term_2.vf_prod(t0, y1_1, args, control2)
        )
        y0_1 = jtu.tree_map(
            lambda a, p: a - p, y1_1, term_1.vf_prod(t0, y0_2, args, control1)
        )
        y0 = (y0_1, y0_2)
        dense_info = dict(y0=y0, y1=y1)
        return y0, dense_info, None, diffrax.RESULTS.successful

    def func(self, terms, t0: RealScalarLike, y0: tuple[Ya, Yb], args: Args) -> VF:
        return diffrax.SemiImplicitEuler().func(terms, t0, y0, args)


SemiImplicitEuler.__init__.__doc__ = """**Arguments:** None"""
