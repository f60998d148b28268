from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from diffrax._heuristics import is_sde
from diffrax._local_interpolation import ThirdOrderHermitePolynomialInterpolation
from jaxtyping import PyTree

from .._varying import varying_scan
from .asynchronous_leapfrog import AsynchronousLeapfrog
from .base import AbstractReversibleSolver
from .reversible_heun import ReversibleHeun


# The solver state of the base solver (v for AsynchronousLeapfrog, (yhat, f(yhat))
# for ReversibleHeun), at the end of the composed step.
_SolverState: TypeAlias = Any


# Order 4: the triple jump (Creutz & Gocksch 1989, Suzuki 1990, Yoshida 1990),
# gamma_1 = gamma_3 = 1 / (2 - 2^(1/3)), gamma_2 = 1 - 2 gamma_1.
_G1 = 1 / (2 - 2 ** (1 / 3))
_TRIPLE_JUMP = np.array([_G1, 1 - 2 * _G1, _G1])

# Order 6: Kahan & Li's 9-stage composition "s9odr6a" (Hairer, Lubich & Wanner,
# Geometric Numerical Integration, 2nd ed., eq. V.3.11), the most accurate of the
# standard order-6 compositions for its cost.
_KL = np.array(
    [
        0.39216144400731413928,
        0.33259913678935943860,
        -0.70624617255763935981,
        0.08221359629355080023,
        0.79854399093482996340,
    ]
)
_KAHAN_LI = np.concatenate([_KL, _KL[-2::-1]])


def _fractions(order: int) -> np.ndarray:
    """Sub-step sizes, as fractions of the step, of the composition of the base."""
    if order == 4:
        return _TRIPLE_JUMP
    # Order 6 composes the doubled base Phi_{h/2} o Phi_{h/2}; see the docstring.
    return np.repeat(_KAHAN_LI / 2, 2)


def _stage_fit_weights() -> np.ndarray:
    """Weights W such that, for the triple jump, the cubic

        y(s) = y0 + s D + s (1 - s) (a + b s),   D = y1 - y0,  s in [0, 1],

    has y'(s_j) = d_j at the midpoints s_j of the three sub-steps, where
    d_j = Delta_j / gamma_j is the j-th sub-step increment per unit fraction:
    (a, b) = W @ (d - D). The three equations are consistent (the triple jump
    integrates quadratics exactly), so the fit is exact.
    """
    ends = np.concatenate([[0.0], np.cumsum(_TRIPLE_JUMP)])
    mids = 0.5 * (ends[:-1] + ends[1:])
    a_mat = np.stack([1 - 2 * mids, 2 * mids - 3 * mids**2], axis=1)
    return np.linalg.pinv(a_mat)


_STAGE_FIT = _stage_fit_weights()


def _add(x, y):
    return jtu.tree_map(lambda a, b: a + b, x, y)


def _sub(x, y):
    return jtu.tree_map(lambda a, b: a - b, x, y)


def _lincomb(coeffs, trees):
    """sum_j coeffs[j] * trees[j], leafwise."""
    return jtu.tree_map(
        lambda *xs: sum(float(c) * x for c, x in zip(coeffs, xs)), *trees
    )


def _combine_results(results):
    out = results[0]
    for r in results[1:]:
        out = diffrax.RESULTS.where(out == diffrax.RESULTS.successful, r, out)
    return out


def _check_base(solver) -> None:
    fix = (
        "Use `revdiffrax.AsynchronousLeapfrog()` (damping=1) or "
        "`revdiffrax.ReversibleHeun()` as the base"
    )
    if isinstance(solver, AsynchronousLeapfrog):
        if solver.damping != 1:
            raise ValueError(
                "`SymmetricComposition` needs a time-symmetric base solver, but "
                f"`AsynchronousLeapfrog(damping={solver.damping})` is damped, which "
                "breaks time symmetry (and makes it first order). Use "
                "`revdiffrax.AsynchronousLeapfrog()` (damping=1) as the base."
            )
        return
    if isinstance(solver, ReversibleHeun):
        return
    if isinstance(solver, diffrax.ReversibleHeun):
        raise ValueError(
            "`SymmetricComposition` needs the base's exact backward step: use "
            "`revdiffrax.ReversibleHeun()` instead of `diffrax.ReversibleHeun()`."
        )
    name = type(solver).__name__
    if isinstance(solver, SymmetricComposition):
        why = "is already a composition (of order > 2)"
    elif isinstance(solver, AbstractReversibleSolver):
        why = "is reversible but not a time-symmetric one-step method of order 2"
    else:
        why = "is not an algebraically reversible, time-symmetric solver"
    raise ValueError(
        "`SymmetricComposition` raises the order of a time-symmetric, second-order, "
        f"reversible one-step solver, and `{name}` {why}. {fix}; to make an "
        "explicit diffrax solver reversible instead, use "
        f"`revdiffrax.Reversible(diffrax.{name}())`."
    )


def _check_order(order) -> int:
    if isinstance(order, bool) or order not in (4, 6):
        raise ValueError(
            f"`SymmetricComposition(solver, order=...)` supports order 4 (triple "
            f"jump) and order 6 (Kahan-Li), got order={order!r}."
        )
    return int(order)


class SymmetricComposition(
    AbstractReversibleSolver[_SolverState], diffrax.AbstractAdaptiveSolver
):
    r"""Symmetric composition of a time-symmetric reversible solver, to order 4 or 6.

    Let $\Phi_h$ be one step of a *time-symmetric* second-order reversible solver on
    its extended state (e.g. $(y, v)$ for [`revdiffrax.AsynchronousLeapfrog`][]):
    $\Phi_{-h} = \Phi_h^{-1}$. A composed step of size $h$ is

    $$\Psi_h = \Phi_{\gamma_s h} \circ \dots \circ \Phi_{\gamma_1 h},
      \qquad \textstyle\sum_i \gamma_i = 1,\quad \gamma_{s+1-i} = \gamma_i,$$

    again time-symmetric, so it is undone by applying the base's backward steps in
    reverse order. Some $\gamma_i$ are negative: those sub-steps go backwards in time.

    - `order=4`: the triple jump, $\gamma = (\gamma_1, 1 - 2\gamma_1, \gamma_1)$,
      $\gamma_1 = 1/(2 - 2^{1/3})$: three base steps.
    - `order=6`: Kahan and Li's nine-stage coefficients `s9odr6a`, applied to the
      *doubled* base $\Phi_{\gamma h/2} \circ \Phi_{\gamma h/2}$: eighteen base
      steps (plus three for the error estimate).

    Why the doubling: the accepted base methods are symmetric but, at $h = 0$, they
    are not the identity; they reflect their auxiliary variable ($v \mapsto 2f(y) -
    v$ for the leapfrog, $\hat y \mapsto 2y - \hat y$ for reversible Heun). Classical
    composition theory needs a near-identity symmetric map. The triple jump of
    $\Phi$ itself nevertheless reaches order 4 in $y$ (the auxiliary variable starts
    on its invariant manifold, $v_0 = f(y_0)$ or $\hat y_0 = y_0$), but odd
    compositions stop there
    (measured: order 4 with Yoshida's or Kahan-Li's order-6 coefficients). The
    doubled base $\Phi_{h/2}\circ\Phi_{h/2}$ is a near-identity symmetric
    second-order method for an extended ODE whose $y$ component is exactly
    $y' = f(t, y)$, so the usual theory applies and order 6 is reached.

    Error estimate (for
    [`diffrax.PIDController`](https://docs.kidger.site/diffrax/api/stepsize_controller/#diffrax.PIDController)):
    the difference with an
    embedded method of order $p - 2$. For `order=4` it is free: the midpoint rule
    through the central sub-step, $y_0 + \Delta_2 / \gamma_2$ (with $\Delta_2$ the
    central sub-step's increment), local order 3 (`error_order` is 3). For
    `order=6` it is the order-4 triple jump from the same start, local order 5
    (`error_order` is 5). Both are conservative: the controller holds the *embedded*
    method's local error at the tolerance, so the achieved error is usually well
    below it.

    Dense output: cubic Hermite interpolation of $y_0, y_1$. For `order=4` the
    slopes are those of the cubic whose derivative passes through the three
    sub-steps' mean slopes (local interpolation error $O(h^3)$); for `order=6` they
    are the base's own approximations of $f$ at $t_0$ and $t_1$ ($v$, or
    $f(\hat y)$), which the doubled composition keeps accurate to sixth order
    (local interpolation error $O(h^4)$).

    Accepted bases: [`revdiffrax.AsynchronousLeapfrog`][] with `damping=1` and
    [`revdiffrax.ReversibleHeun`][]. Like their base, the compositions are linearly
    stable only *on* the imaginary axis ($|h\lambda| \le 2.85$ for `order=4`,
    $2.53$ for `order=6`; unstable for every $h\lambda$ with negative real part),
    so they suit conservative and oscillatory problems, not dissipative ones (use
    [`revdiffrax.Reversible`][] there). With fixed steps their energy error on
    Hamiltonian problems stays bounded over long times; step sizes chosen by
    [`diffrax.PIDController`](https://docs.kidger.site/diffrax/api/stepsize_controller/#diffrax.PIDController)
    are not time-symmetric, so with adaptive steps a
    slow energy drift returns. Prefer the leapfrog base: on the Kepler problem the
    parasitic mode of reversible Heun ($\hat y - y$) was measured to grow, and the
    energy error with it, at step sizes where the leapfrog's stays bounded.

    ??? cite "References"

        ```bibtex
        @article{yoshida1990construction,
            title={Construction of higher order symplectic integrators},
            author={Yoshida, Haruo},
            journal={Physics Letters A},
            volume={150},
            number={5--7},
            pages={262--268},
            year={1990}
        }

        @article{kahan1997composition,
            title={Composition constants for raising the orders of unconventional
                   schemes for ordinary differential equations},
            author={Kahan, William and Li, Ren-Cang},
            journal={Mathematics of Computation},
            volume={66},
            number={219},
            pages={1089--1099},
            year={1997}
        }

        @book{hairer2006geometric,
            title={Geometric Numerical Integration: Structure-Preserving Algorithms
                   for Ordinary Differential Equations},
            author={Hairer, Ernst and Lubich, Christian and Wanner, Gerhard},
            edition={2},
            publisher={Springer},
            year={2006}
        }

        @article{maslovskaya2024adaptive,
            title={Adaptive higher order reversible integrators for memory efficient
                   deep learning},
            author={Maslovskaya, Sofya and Ober-Bl{\"o}baum, Sina and Offen,
                    Christian and Singh, Pranav and Wembe, Boris},
            journal={arXiv:2410.09537},
            year={2024}
        }
        ```
    """

    solver: AbstractReversibleSolver
    composition_order: int = eqx.field(static=True)

    interpolation_cls: ClassVar[
        Callable[..., ThirdOrderHermitePolynomialInterpolation]
    ] = ThirdOrderHermitePolynomialInterpolation

    def __init__(self, solver: AbstractReversibleSolver, order: int = 4):
        _check_base(solver)
        self.solver = solver
        self.composition_order = _check_order(order)

    @property
    def term_structure(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.term_structure

    @property
    def term_compatible_contr_kwargs(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.composition_order

    def error_order(self, terms):
        return None if is_sde(terms) else self.composition_order - 1

    def init(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        return self.solver.init(terms, t0, t1, y0, args)

    @staticmethod
    def _times(t0, t1, fractions):
        """Sub-step boundaries t0 = tau_0, ..., tau_s = t1."""
        ends = np.cumsum(fractions)
        times = [t0]
        for c in ends[:-1]:
            times.append(t0 + float(c) * (t1 - t0))
        times.append(t1)
        return times

    @staticmethod
    def _sub_times(t0, t1, fractions, j):
        """Boundaries of sub-step j (a traced index), as in `_times`."""
        ends = jnp.asarray(np.cumsum(fractions), dtype=jnp.result_type(t0, t1))
        last = len(fractions) - 1
        ta = jnp.where(j == 0, t0, t0 + ends[jnp.maximum(j - 1, 0)] * (t1 - t0))
        tb = jnp.where(j == last, t1, t0 + ends[j] * (t1 - t0))
        return ta, tb

    def _forward(self, terms, t0, t1, y0, args, state, made_jump, fractions):
        """Compose base steps, unrolled; returns (y1, state1, increments, result)."""
        times = self._times(t0, t1, fractions)
        y, increments, results = y0, [], []
        for j in range(len(fractions)):
            y_next, _, _, state, result = self.solver.step(
                terms,
                times[j],
                times[j + 1],
                y,
                args,
                state,
                made_jump if j == 0 else False,
            )
            increments.append(_sub(y_next, y))
            results.append(result)
            y = y_next
        return y, state, increments, _combine_results(results)

    def _forward_scan(self, terms, t0, t1, y0, args, state, made_jump, fractions):
        """Compose base steps: the first one unrolled (it sees `made_jump`), the
        others in a `lax.scan`, which keeps compilation fast for many sub-steps.
        Returns (y1, state1, result)."""
        times = self._times(t0, t1, fractions)
        y, _, _, state, result = self.solver.step(
            terms, times[0], times[1], y0, args, state, made_jump
        )

        def body(carry, j):
            y, state, result = carry
            ta, tb = self._sub_times(t0, t1, fractions, j)
            y, _, _, state, r = self.solver.step(terms, ta, tb, y, args, state, False)
            return (y, state, _combine_results([result, r])), None

        steps = jnp.arange(1, len(fractions))
        (y, state, result), _ = varying_scan(body, (y, state, result), steps)
        return y, state, result

    def _backward_scan(self, terms, t0, t1, y1, args, state, made_jump, fractions):
        """Undo `_forward_scan`: backward steps in reverse order."""

        def body(carry, j):
            y, state, result = carry
            ta, tb = self._sub_times(t0, t1, fractions, j)
            y, _, state, r = self.solver.backward_step(
                terms, ta, tb, y, args, state, False
            )
            return (y, state, _combine_results([result, r])), None

        steps = jnp.arange(1, len(fractions))
        init = (y1, state, diffrax.RESULTS.successful)
        (y, state, result), _ = varying_scan(body, init, steps, reverse=True)
        times = self._times(t0, t1, fractions)
        y, _, state, r = self.solver.backward_step(
            terms, times[0], times[1], y, args, state, made_jump
        )
        return y, state, _combine_results([result, r])

    def _slope(self, terms, t0, t1, state):
        """The base's approximation of f(t, y), times the step's control."""
        if isinstance(self.solver, AsynchronousLeapfrog):
            vf = state
        else:  # ReversibleHeun: (yhat, f(yhat))
            vf = state[1]
        return terms.prod(vf, terms.contr(t0, t1))

    def _dense_info(self, terms, t0, t1, y0, y1, state0, state1, increments):
        if self.composition_order == 6:
            k0 = self._slope(terms, t0, t1, state0)
            k1 = self._slope(terms, t0, t1, state1)
        else:
            delta = _sub(y1, y0)
            slopes = [
                jtu.tree_map(lambda x, g=float(g): x / g, inc)
                for g, inc in zip(_TRIPLE_JUMP, increments)
            ]
            rel = [_sub(d, delta) for d in slopes]
            a = _lincomb(_STAGE_FIT[0], rel)
            b = _lincomb(_STAGE_FIT[1], rel)
            # y(s) = y0 + s D + s (1 - s)(a + b s): y'(0) = D + a, y'(1) = D - a - b.
            k0 = _add(delta, a)
            k1 = jtu.tree_map(lambda d, a_, b_: d - a_ - b_, delta, a, b)
        return dict(y0=y0, y1=y1, k0=k0, k1=k1)

    def step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y, DenseInfo, _SolverState, diffrax.RESULTS]:
        fractions = _fractions(self.composition_order)
        if self.composition_order == 4:
            y1, state1, increments, result = self._forward(
                terms, t0, t1, y0, args, solver_state, made_jump, fractions
            )
            # Minus the midpoint rule through the central sub-step: y0 + Delta_2/g_2.
            g2 = float(_TRIPLE_JUMP[1])
            y_error = jtu.tree_map(
                lambda a, c, d: a + c + (1 - 1 / g2) * d,
                increments[0],
                increments[2],
                increments[1],
            )
        else:
            y1, state1, result = self._forward_scan(
                terms, t0, t1, y0, args, solver_state, made_jump, fractions
            )
            increments = None
            # Minus the order-4 triple jump from the same start.
            y4, _, _, result4 = self._forward(
                terms, t0, t1, y0, args, solver_state, made_jump, _TRIPLE_JUMP
            )
            y_error = _sub(y1, y4)
            result = _combine_results([result, result4])
        dense_info = self._dense_info(
            terms, t0, t1, y0, y1, solver_state, state1, increments
        )
        return y1, y_error, dense_info, state1, result

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
        fractions = _fractions(self.composition_order)
        if self.composition_order == 6:
            y0, state0, result = self._backward_scan(
                terms, t0, t1, y1, args, solver_state, made_jump, fractions
            )
            increments = None
        else:
            times = self._times(t0, t1, fractions)
            y, state0, increments, results = y1, solver_state, [], []
            for j in reversed(range(len(fractions))):
                y_prev, _, state0, r = self.solver.backward_step(
                    terms,
                    times[j],
                    times[j + 1],
                    y,
                    args,
                    state0,
                    made_jump if j == 0 else False,
                )
                increments.append(_sub(y, y_prev))
                results.append(r)
                y = y_prev
            y0, increments, result = y, increments[::-1], _combine_results(results)
        dense_info = self._dense_info(
            terms, t0, t1, y0, y1, state0, solver_state, increments
        )
        return y0, dense_info, state0, result

    def func(
        self, terms: PyTree[diffrax.AbstractTerm], t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return self.solver.func(terms, t0, y0, args)


SymmetricComposition.__init__.__doc__ = r"""**Arguments:**

- `solver`: the time-symmetric second-order base:
    `revdiffrax.AsynchronousLeapfrog()` (with `damping=1`) or
    `revdiffrax.ReversibleHeun()`.
- `order`: `4` (triple jump, three base steps per step; the default) or `6`
    (Kahan-Li on the doubled base, eighteen base steps plus three for the error
    estimate).
"""
