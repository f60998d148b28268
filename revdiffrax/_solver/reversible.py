from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from diffrax._heuristics import is_sde
from diffrax._local_interpolation import AbstractLocalInterpolation
from diffrax._misc import linear_rescale
from equinox.internal import ω
from jax.core import Tracer
from jaxtyping import Array, PyTree

from .base import AbstractReversibleSolver
from .erk import (
    add_cotangents as _add_cotangents,
    erk_step as _erk_step,
    is_plain_erk as _is_plain_erk,
    pull_back_stages as _pull_back_stages,
    unroll_stages as _unroll_stages,
    use_stage_pullback as _use_stage_pullback,
)
from .integrated import check_integrated, split_state, StateSplit


_BaseState: TypeAlias = Any
# (z, base solver state). The base state is the one returned by `base.init` and is
# never advanced: every base step is made with `made_jump=True` (see `_base_step`).
_SolverState: TypeAlias = tuple[Y, _BaseState]


def _axpy(a, x, y):
    """a * x + y, leafwise."""
    return jtu.tree_map(lambda xi, yi: a * xi + yi, x, y)


def _sub(x, y):
    return jtu.tree_map(lambda xi, yi: xi - yi, x, y)


def _add(x, y):
    return jtu.tree_map(lambda xi, yi: xi + yi, x, y)


class _ReversibleInterpolation(AbstractLocalInterpolation):
    """Dense output of one reversible step, interpolating y (not z).

    The base solver's interpolant `b(t)` goes from `z0` at `t0` to `z0 + Psi_h(z0)`
    at `t1`. Shifting it by the constant `y0 - z0`, plus a linear correction for the
    coupling term, gives an interpolant of `y` with `y(t0) = y0` and `y(t1) = y1`:

        y(t) = b(t) + (y0 - z0) + s(t) * (1 - lambda) * (z0 - y0),
        s(t) = (t - t0) / (t1 - t0).

    As `y - z = O(h^p)` this keeps the accuracy of the base interpolant.
    """

    t0: RealScalarLike  # pyright: ignore[reportIncompatibleVariableOverride]
    t1: RealScalarLike  # pyright: ignore[reportIncompatibleVariableOverride]
    base: AbstractLocalInterpolation
    offset: Y
    drift: Y

    def evaluate(
        self, t0: RealScalarLike, t1: RealScalarLike | None = None, left: bool = True
    ) -> PyTree[Array]:
        del left
        if t1 is not None:
            return _sub(self.evaluate(t1), self.evaluate(t0))
        with jax.numpy_dtype_promotion("standard"):
            # `linear_rescale` guards the zero-length steps that diffrax takes for
            # batch elements that have already finished under `jax.vmap`.
            s = linear_rescale(self.t0, t0, self.t1)
            b = self.base.evaluate(t0)
            return jtu.tree_map(
                lambda bi, oi, di: (bi + oi + s * di).astype(bi.dtype),
                b,
                self.offset,
                self.drift,
            )


class _InterpolationFactory(eqx.Module):
    # A hashable stand-in for `functools.partial(_ReversibleInterpolation, ...)`:
    # diffrax calls `solver.interpolation_cls(t0=..., t1=..., **dense_info)`.
    base_cls: Callable[..., AbstractLocalInterpolation] = eqx.field(static=True)

    def __call__(self, *, t0, t1, base, offset, drift):
        return _ReversibleInterpolation(
            t0=t0,
            t1=t1,
            base=self.base_cls(t0=t0, t1=t1, **base),
            offset=offset,
            drift=drift,
        )


def _merge_times_bar(times_bar_a, times_bar_b):
    """The cotangent of (t_n, t_{n+1}) from those of A (from t_n to t_{n+1}) and B
    (from t_{n+1} to t_n)."""
    if times_bar_a is None:
        return None
    return (times_bar_a[0] + times_bar_b[1], times_bar_a[1] + times_bar_b[0])


def _freeze(integrated: PyTree[bool] | None) -> Any:
    if integrated is None or isinstance(integrated, _Frozen):
        return integrated
    leaves, treedef = jtu.tree_flatten(integrated)
    return _Frozen(treedef, tuple(leaves))


class _Frozen(eqx.Module):
    """A PyTree of bools, flattened so that it is hashable."""

    treedef: Any = eqx.field(static=True)
    leaves: tuple[Any, ...] = eqx.field(static=True)

    def thaw(self) -> PyTree[bool]:
        return jtu.tree_unflatten(self.treedef, self.leaves)


def _check_base_solver(solver: diffrax.AbstractSolver) -> None:
    name = type(solver).__name__
    hint = repr(solver) if isinstance(solver, Reversible) else f"revdiffrax.{name}()"
    if isinstance(solver, AbstractReversibleSolver) or isinstance(
        solver,
        (diffrax.ReversibleHeun, diffrax.LeapfrogMidpoint, diffrax.SemiImplicitEuler),
    ):
        raise ValueError(
            f"`{name}` is already reversible (or multistep), so it cannot be wrapped "
            "by `revdiffrax.Reversible`. Use it directly with "
            f"`revdiffrax.ReversibleAdjoint()`: pass `{hint}` as the solver."
        )
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        raise ValueError(
            f"`revdiffrax.Reversible` needs an explicit solver, but `{name}` is "
            "implicit: its backward step would need a nonlinear solve and would not "
            "be algebraically reversible. Use an explicit solver instead, e.g. "
            "`revdiffrax.Reversible(diffrax.Tsit5())`."
        )
    if isinstance(solver, diffrax.AbstractItoSolver) and not isinstance(
        solver, (diffrax.AbstractStratonovichSolver, diffrax.Euler)
    ):
        raise ValueError(
            f"`{name}` converges to the Ito solution of an SDE, but the reversible "
            "scheme steps backwards in time, which is only consistent for "
            "Stratonovich SDEs. Use a Stratonovich solver, e.g. "
            "`revdiffrax.Reversible(diffrax.Heun())` or "
            "`revdiffrax.Reversible(diffrax.ShARK())`."
        )
    if isinstance(solver, diffrax.AbstractFosterLangevinSRK):
        raise ValueError(
            f"`{name}` carries Langevin-specific state between steps and is not "
            "supported by `revdiffrax.Reversible`. Use a general Stratonovich SDE "
            "solver instead, e.g. `revdiffrax.Reversible(diffrax.ShARK())`."
        )


class Reversible(
    AbstractReversibleSolver[_SolverState],
    diffrax.AbstractAdaptiveSolver,
    diffrax.AbstractStratonovichSolver,
):
    r"""The McCallum-Foster reversible method: makes any explicit single-step solver
    algebraically reversible, keeping its order of convergence.

    Writing the base solver's step as an increment
    $\Psi_h(t, u) = \text{step}(t \to t + h, u) - u$, the method carries two states
    $y_n$ (the solution) and $z_n$ (with $z_0 = y_0$), and a coupling
    $\lambda \in (0, 1]$:

    $$y_{n+1} = \lambda y_n + (1 - \lambda) z_n + \Psi_h(t_n, z_n),$$

    $$z_{n+1} = z_n - \Psi_{-h}(t_{n+1}, y_{n+1}).$$

    The step is inverted exactly by

    $$z_n = z_{n+1} + \Psi_{-h}(t_{n+1}, y_{n+1}),$$

    $$y_n = \big(y_{n+1} - (1 - \lambda) z_n - \Psi_h(t_n, z_n)\big) / \lambda.$$

    Each step costs two base steps. The error estimate adds the base solver's
    estimates for both, so adaptive step size controllers work; dense output
    interpolates $y$. For $y' = ay$ one step multiplies $(y, z)$ by a matrix with
    determinant $\lambda$: smaller $\lambda$ widens the stability region away from the
    imaginary axis, at the price of amplifying rounding errors during reconstruction
    by about $1/\lambda$ per step.

    For SDEs the base solver must converge to the Stratonovich solution (Ito-only
    solvers are refused), so `Reversible` is marked as a Stratonovich solver; the
    Brownian motion must be re-evaluable (e.g. `diffrax.VirtualBrownianTree`).

    ??? cite "Reference"

        ```bibtex
        @article{mccallum2024efficient,
            title={Efficient, Accurate and Stable Gradients for Neural ODEs},
            author={McCallum, Sam and Foster, James},
            journal={arXiv:2410.11648},
            year={2024}
        }
        ```
    """

    solver: diffrax.AbstractSolver
    coupling: float = 0.999
    # `None`, or the flattened `integrated` PyTree as `(treedef, leaves)`: static, and
    # hashable whatever the state's containers (see `_freeze`).
    integrated: Any = eqx.field(default=None, static=True, converter=_freeze)
    stage_pullback: bool | None = eqx.field(default=None, static=True)
    unroll_stages: bool | None = eqx.field(default=None, static=True)
    parasitic_error: bool = eqx.field(default=False, static=True)

    # Every base step is made with `made_jump=True`, so jumps change nothing.
    reversible_across_jumps: ClassVar[bool] = True

    interpolation_cls: ClassVar[Any] = property(  # pyright: ignore
        lambda self: _InterpolationFactory(self.solver.interpolation_cls)
    )

    def __check_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise ValueError(
                "`revdiffrax.Reversible(solver, coupling)` expects a diffrax solver as "
                f"its first argument, e.g. `diffrax.Tsit5()`; got {self.solver!r}."
            )
        _check_base_solver(self.solver)
        coupling = self.coupling
        if not isinstance(coupling, Tracer):
            try:
                value = float(coupling)
            except TypeError as e:
                raise ValueError(
                    f"`coupling` must be a real number in (0, 1], got {coupling!r}."
                ) from e
            if not (0 < value <= 1):
                raise ValueError(
                    f"`coupling` must lie in (0, 1], got {coupling}. Values close to 1 "
                    "(the default 0.999) keep the backward reconstruction accurate; "
                    "smaller values widen the stability region."
                )

    @property
    def term_structure(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.term_structure

    @property
    def term_compatible_contr_kwargs(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        if is_sde(terms) and isinstance(self.solver, diffrax.Euler):
            raise ValueError(
                "`diffrax.Euler` converges to the Ito solution of an SDE, but the "
                "reversible scheme steps backwards in time, which is only consistent "
                "for Stratonovich SDEs. Use a Stratonovich solver, e.g. "
                "`revdiffrax.Reversible(diffrax.Heun())`."
            )
        split = self._split(y0)
        check_integrated(split, terms, t0, y0, args)
        base_state = self.solver.init(terms, t0, t1, y0, args)
        if split.any and not _is_plain_erk(self.solver) and jtu.tree_leaves(base_state):
            raise ValueError(
                "`Reversible(integrated=...)` needs a base solver without state, e.g. "
                "an explicit Runge-Kutta method with the default `scan_kind=None`; got "
                f"{self.solver!r}."
            )
        return split.full(split.dynamic(y0)), base_state

    def _split(self, y: Y) -> StateSplit:
        """The dynamic and integrated leaves of a state `y`."""
        integrated = None if self.integrated is None else self.integrated.thaw()
        return split_state(integrated, y)

    def _backward_increment(self, terms, t1, t0, y1, args, base_state):
        """B = Psi_{-h}(t_{n+1}, y_{n+1}), made on the dynamic leaves only (zero on the
        integrated ones, which z does not carry)."""
        psi_y, _, result = self._backward_increment_and_error(
            terms, t1, t0, y1, args, base_state
        )
        return psi_y, result

    def _backward_increment_and_error(self, terms, t1, t0, y1, args, base_state):
        """B and the base solver's error estimate for it (zero on the integrated
        leaves; None for solvers without one)."""
        split = self._split(y1)
        psi_y, error, _, result = self._base_step(
            split.wrap(terms), t1, t0, split.dynamic(y1), args, base_state
        )
        error = None if error is None else split.full(error)
        return split.full(psi_y), error, result

    def _base_step(self, terms, t0, t1, u, args, base_state):
        # `made_jump=True` makes FSAL solvers re-evaluate their first stage: successive
        # base steps start from different points (z_n, then y_{n+1}), so a stage
        # carried over from the previous base step would be wrong. This leaves the
        # user's solver object untouched. Explicit Runge-Kutta steps of small states
        # are unrolled (`erk_step`), larger ones use diffrax's stage loop (see
        # `unroll_stages`).
        if _is_plain_erk(self.solver) and (
            # Integrated leaves need the unrolled step: the base state (FSAL) has
            # the full state's structure, the step only the dynamic leaves.
            self.integrated is not None
            or _unroll_stages(self.solver, u, self.unroll_stages)
        ):
            increment, error, dense_info = _erk_step(
                self.solver.tableau, terms, t0, t1, u, args
            )
            return increment, error, dense_info, diffrax.RESULTS.successful
        u1, error, dense_info, _, result = self.solver.step(
            terms, t0, t1, u, args, base_state, True
        )
        return _sub(u1, u), error, dense_info, result

    def _dense_info(self, y0, z0, base_dense_info):
        offset = _sub(y0, z0)
        lam = self._split(y0).coupling(self.coupling)
        drift = jtu.tree_map(lambda l, o: -(1 - l) * o, lam, offset)
        return dict(base=base_dense_info, offset=offset, drift=drift)

    def step(
        self,
        terms: PyTree[diffrax.AbstractTerm],
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y | None, DenseInfo, _SolverState, diffrax.RESULTS]:
        del made_jump
        lam = self._split(y0).coupling(self.coupling)
        z0, base_state = solver_state
        psi_z, error, base_dense_info, result1 = self._base_step(
            terms, t0, t1, z0, args, base_state
        )
        y1 = jtu.tree_map(
            lambda l, y, z, p: l * y + (1 - l) * z + p, lam, y0, z0, psi_z
        )
        psi_y, error_b, result2 = self._backward_increment_and_error(
            terms, t1, t0, y1, args, base_state
        )
        z1 = _sub(z0, psi_y)
        dense_info = self._dense_info(y0, z0, base_dense_info)
        result = diffrax.RESULTS.where(
            result1 == diffrax.RESULTS.successful, result2, result1
        )
        if self.parasitic_error:
            error = self._with_round_trip_defect(error, y0, psi_z, psi_y)
        else:
            error = self._with_backward_error(error, error_b)
        return y1, error, dense_info, (z1, base_state), result

    def _with_backward_error(self, error, error_b):
        r"""The error estimate of a step: the base solver's estimates for both of its
        base steps, $|e_A| + |e_B|$.

        $y_{n+1}$ takes the error of A $= \Psi_h(t_n, z_n)$, and $z_{n+1}$ that of
        B $= \Psi_{-h}(t_{n+1}, y_{n+1})$; controlling both keeps both states within
        the tolerance of the base solver's solution, so that their difference (the
        parasitic offset) only accumulates local errors of the size the controller
        allows, where the mode does not grow. The mode's growth (a dissipative
        problem, a coupling too close to 1) is not part of it: see
        `parasitic_error=True` and `ReversibleAdjoint(parasitic_tol=...)`. Costs
        nothing: B's estimate comes with its evaluation."""
        if error is None or error_b is None:
            return error
        return jtu.tree_map(lambda a, b: jnp.abs(a) + jnp.abs(b), error, error_b)

    def _with_round_trip_defect(self, error, y0, psi_z, psi_y):
        r"""Add the round-trip defect $g_n = \Psi_h(t_n, z_n) + \Psi_{-h}(t_{n+1},
        y_{n+1})$ of the step's two base steps to the base solver's error estimate
        (`parasitic_error=True`).

        With $d_n = y_n - z_n$, $g_n = d_{n+1} - \lambda d_n
        \approx \Phi_{-h}(\Phi_h(z_n)) - z_n - \lambda h J d_n$ ($J$ the Jacobian):
        the base method's own forward-backward defect, $O(h^{p+1})$, plus $h J d_n$,
        which is also about the amount by which $y_{n+1}$ differs from a base step
        from $y_n$. For an eigenvalue $a$ of $J$ the mode is multiplied by about
        $\lambda e^{-ha}$ per step, so it grows geometrically on any dissipative mode
        with $h\,|\mathrm{Re}\,a| > -\ln\lambda$; this estimate makes the controller
        shorten the step until it stops growing and $y$ follows the base solver step
        by step. The price: it also counts a mode that stays bounded, and on a
        trained neural ODE (issue 22) it took up to 4x the base solver's steps."""
        if error is None:
            return None
        split = self._split(y0)
        defect = split.full(split.dynamic((psi_z**ω + psi_y**ω).ω))
        return jtu.tree_map(lambda e, g: jnp.abs(e) + jnp.abs(g), error, defect)

    def second_state(self, y: Y, solver_state: _SolverState) -> Y:
        # z, with the integrated leaves (which z does not carry) taken from y.
        return self._split(y).merge(solver_state[0], y)

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
        del made_jump
        z1, base_state = solver_state
        psi_y, result1 = self._backward_increment(terms, t1, t0, y1, args, base_state)
        z0 = _add(z1, psi_y)
        psi_z, _, base_dense_info, result2 = self._base_step(
            terms, t0, t1, z0, args, base_state
        )
        y0 = self._reconstruct_y0(y1, z0, psi_z)
        dense_info = self._dense_info(y0, z0, base_dense_info)
        result = diffrax.RESULTS.where(
            result1 == diffrax.RESULTS.successful, result2, result1
        )
        return y0, dense_info, (z0, base_state), result

    def _increment_fn(
        self, ta, tb, base_state, diff_times: bool, dense: bool, wrap=None
    ):
        """The base step from `ta` to `tb` as a function of `(u, (terms, args),
        times)`, to differentiate (`times` is `(ta, tb)` if `diff_times`, else
        ignored): its increment, and its dense information if `dense`. `wrap`, if
        given, is applied to the terms first (`StateSplit.wrap`)."""

        def increment(u, params, times):
            terms, args = params
            terms = terms if wrap is None else wrap(terms)
            _ta, _tb = times if diff_times else (ta, tb)
            psi, _, dense_info, _ = self._base_step(
                terms, _ta, _tb, u, args, base_state
            )
            return psi, (dense_info if dense else None)

        return increment

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
        r"""Undo a step and linearise it, sharing the base-step evaluations.

        The two base steps that rebuild $(y_n, z_n)$ from $(y_{n+1}, z_{n+1})$,
        $B = \Psi_{-h}(t_{n+1}, y_{n+1})$ and $A = \Psi_h(t_n, z_n)$, are exactly the
        ones whose VJPs the adjoint recurrence needs, so each is evaluated once, under
        `jax.vjp`, and their primal outputs are the reconstruction. The pullback is

        $$\bar y \mathrel{-}= (\partial B/\partial y)^\top \bar z,\qquad
          \bar z \mathrel{+}= (1 - \lambda)\bar y + (\partial A/\partial z)^\top
          \bar y,\qquad \bar y \leftarrow \lambda \bar y,$$

        plus the dense information's cotangent. See `backward_step_vjp` of
        [`revdiffrax.AbstractReversibleSolver`][] for the arguments and returns.
        `ReversibleAdjoint` uses `backward_step_pullback` instead, which holds less
        memory.
        """
        del made_jump, want_dense
        z1, base_state = solver_state
        params = (terms, args)
        split = self._split(y1)
        backward = self._increment_fn(t1, t0, base_state, diff_times, False, split.wrap)
        forward = self._increment_fn(t0, t1, base_state, diff_times, dense=True)
        # B: the backward base step of y_{n+1}, which gives z_n = z_{n+1} + B.
        (psi_y, _), vjp_b = eqx.filter_vjp(
            backward, split.dynamic(y1), params, (t1, t0) if diff_times else None
        )
        z0 = _add(z1, split.full(psi_y))
        # A: the forward base step of z_n, which gives y_n.
        (psi_z, base_dense_info), vjp_a = eqx.filter_vjp(
            forward, z0, params, (t0, t1) if diff_times else None
        )
        y0 = self._reconstruct_y0(y1, z0, psi_z)
        dense_info = self._dense_info(y0, z0, base_dense_info)

        def pullback(y1_bar, solver_state1_bar, dense_info_bar):
            z1_bar, base_state_bar = solver_state1_bar
            y_bar_b, params_bar_b, times_bar_b = vjp_b(
                (split.dynamic((-ω(z1_bar)).ω), None)
            )
            y1_bar = _add(y1_bar, split.full(y_bar_b))
            y0_bar, z0_bar, d = self._coupling_pullback(y1_bar, z1_bar, dense_info_bar)
            if d is None:
                base_bar = jtu.tree_map(
                    jnp.zeros_like, eqx.filter(base_dense_info, eqx.is_inexact_array)
                )
            else:
                base_bar = dense_info_bar["base"]
                y0_bar, z0_bar = _add(y0_bar, d), _sub(z0_bar, d)
            z_bar_a, params_bar_a, times_bar_a = vjp_a((y1_bar, base_bar))
            return (
                y0_bar,
                (_add(z0_bar, z_bar_a), base_state_bar),
                _add_cotangents(params_bar_a, params_bar_b),
                _merge_times_bar(times_bar_a, times_bar_b),
            )

        return y0, dense_info, (z0, base_state), pullback

    def _coupling_pullback(self, y1_bar, z1_bar, dense_info_bar):
        """The cotangents of (y_n, z_n) through the coupling, given those of y_{n+1}
        (after B's pullback) and z_{n+1}, not counting A: y_{n+1} = lam y_n +
        (1 - lam) z_n + A(z_n). Also `d`, the cotangent that the dense information
        (through `offset = y_n - z_n` and `drift`) adds to y_n and takes from z_n."""
        lam = self._split(y1_bar).coupling(self.coupling)
        y0_bar = (ω(lam) * ω(y1_bar)).ω
        z0_bar = (ω(z1_bar) + (1 - ω(lam)) * ω(y1_bar)).ω
        d = None
        if dense_info_bar is not None:
            offset_bar = ω(dense_info_bar["offset"])
            d = (offset_bar - (1 - ω(lam)) * ω(dense_info_bar["drift"])).ω
        return y0_bar, z0_bar, d

    def _pull_back_base(
        self,
        ta,
        tb,
        u,
        params,
        base_state,
        increment_bar,
        acc,
        diff_times: bool,
        dense_cotangent: Callable | None = None,
        wrap: Callable | None = None,
    ):
        """Evaluate the base step from `ta` to `tb` at `u` and pull `increment_bar`
        back through it, adding to the cotangents `acc = (u_bar, params_bar)`. With
        `dense_cotangent(increment, dense_info) -> (dense_info_bar, aux)`, also pull
        back the cotangent of its dense information. `wrap`, if given, is applied to
        the terms before they are evaluated (`StateSplit.wrap`). Returns the
        increment, the updated `acc`, the cotangent of `(ta, tb)` (if `diff_times`)
        and `aux`."""
        terms, args = params
        step_terms = terms if wrap is None else wrap(terms)
        if _use_stage_pullback(
            self.solver, step_terms, ta, tb, u, args, self.stage_pullback
        ):
            tableau = self.solver.tableau  # pyright: ignore[reportAttributeAccessIssue]
            return _pull_back_stages(
                tableau,
                terms,
                ta,
                tb,
                u,
                args,
                increment_bar,
                acc,
                diff_times,
                dense_cotangent,
                wrap,
            )
        dense = dense_cotangent is not None
        fn = self._increment_fn(ta, tb, base_state, diff_times, dense, wrap)
        times = (ta, tb) if diff_times else None
        (increment, dense_info), vjp = eqx.filter_vjp(fn, u, params, times)
        dense_info_bar, aux = None, None
        if dense_cotangent is not None:
            dense_info_bar, aux = dense_cotangent(increment, dense_info)
        u_bar, params_bar, times_bar = vjp((increment_bar, dense_info_bar))
        u_acc, params_acc = acc
        acc = (_add(u_acc, u_bar), _add_cotangents(params_acc, params_bar))
        return increment, acc, times_bar, aux

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
        r"""Undo a step and pull the cotangents back through it, one base step at a
        time.

        B = $\Psi_{-h}(t_{n+1}, y_{n+1})$ gives $z_n = z_{n+1} + B$; as
        $z_{n+1} = z_n - B$, its pullback needs only the cotangent of $z_{n+1}$, so it
        is applied before A = $\Psi_h(t_n, z_n)$ is evaluated, and A's pullback
        follows at once. Each base step is evaluated once; the residuals of the two are
        never held together, and for explicit Runge-Kutta bases whose stages leave
        large residuals (neural vector fields), only one stage's at a time (see
        `_StagePullback`). See `backward_step_pullback` of
        [`revdiffrax.AbstractReversibleSolver`][] for the arguments and returns.
        """
        del made_jump
        z1, base_state = solver_state
        y1_bar, (z1_bar, base_state_bar), params_bar = cotangents
        params = (terms, args)
        split = self._split(y1)
        # B, whose cotangent is -z1_bar, on the dynamic leaves.
        psi_y, (y1_dynamic_bar, params_bar), times_bar_b, _ = self._pull_back_base(
            t1,
            t0,
            split.dynamic(y1),
            params,
            base_state,
            split.dynamic((-ω(z1_bar)).ω),
            (split.dynamic(y1_bar), params_bar),
            diff_times,
            wrap=split.wrap,
        )
        y1_bar = split.merge(y1_dynamic_bar, y1_bar)
        z0 = _add(z1, split.full(psi_y))
        # A, whose cotangent is that of y_{n+1}.
        y0_bar, z0_bar, _ = self._coupling_pullback(y1_bar, z1_bar, None)
        psi_z, (z0_bar, params_bar), times_bar_a, aux = self._pull_back_base(
            t0,
            t1,
            z0,
            params,
            base_state,
            y1_bar,
            (z0_bar, params_bar),
            diff_times,
            self._base_dense_cotangent(y1, z0, dense_cotangent),
        )
        y0 = self._reconstruct_y0(y1, z0, psi_z)
        if aux is not None:
            aux, dense_info_bar = aux
            _, _, d = self._coupling_pullback(y1_bar, z1_bar, dense_info_bar)
            y0_bar, z0_bar = _add(y0_bar, d), _sub(z0_bar, d)
        times_bar = _merge_times_bar(times_bar_a, times_bar_b)
        bars = (y0_bar, (z0_bar, base_state_bar), params_bar, times_bar)
        return y0, (z0, base_state), bars, aux

    def _base_dense_cotangent(self, y1, z0, dense_cotangent):
        """`dense_cotangent` (of the step's dense information) as a function of A's
        increment and dense information, for `_pull_back_base`."""
        if dense_cotangent is None:
            return None

        def base_dense_cotangent(psi_z, base_dense_info):
            y0 = self._reconstruct_y0(y1, z0, psi_z)
            dense_info = self._dense_info(y0, z0, base_dense_info)
            dense_info_bar, aux = dense_cotangent(dense_info)
            return dense_info_bar["base"], (aux, dense_info_bar)

        return base_dense_cotangent

    def _reconstruct_y0(self, y1, z0, psi_z):
        lam = self._split(y1).coupling(self.coupling)
        return jtu.tree_map(
            lambda l, y, z, p: (y - (1 - l) * z - p) / l, lam, y1, z0, psi_z
        )

    def func(
        self, terms: PyTree[diffrax.AbstractTerm], t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return self.solver.func(terms, t0, y0, args)


Reversible.__init__.__doc__ = """**Arguments:**

- `solver`: an explicit single-step diffrax solver, e.g. `diffrax.Tsit5()`. For SDEs
    it must converge to the Stratonovich solution (e.g. `diffrax.Heun()`,
    `diffrax.ShARK()`).
- `coupling`: the coupling parameter $\\lambda \\in (0, 1]$. Defaults to `0.999`.
- `integrated`: `None` (the default), or a PyTree of bools with the structure of the
    state (or a prefix of it) marking *integrated components*: leaves $q$ with
    $dq/dt = g(t, x)$ that nothing reads, like a CNF's log-density or a running cost,
    e.g. `integrated=(False, True)` for a state `(x, logp)`. They are advanced by the
    forward base step alone, $q_{n+1} = q_n + \\Psi^q_h(t_n, z_n)$, and undone by
    subtraction: no coupling, no second state, and the backward base step skips
    their vector field (one evaluation of $g$ per step instead of two). ODEs only;
    a vector field that reads a declared component is refused.
- `parasitic_error`: what the error estimate that adaptive controllers see covers.
    `False` (the default): the base solver's estimates for both base steps of the
    step, $\\Psi_h(t_n, z_n)$ (which $y_{n+1}$ takes) and $\\Psi_{-h}(t_{n+1},
    y_{n+1})$ (which $z_{n+1}$ takes), added: both states stay within the
    tolerance, and the step sizes are about the base solver's. `True`: the first
    of them plus the round-trip defect $\\Psi_h(t_n, z_n) + \\Psi_{-h}(t_{n+1},
    y_{n+1})$, which also grows with the parasitic mode $y - z$ where the coupling
    is too close to 1 for a dissipative problem (see
    [choosing the coupling][choosing-the-coupling]): the controller then shortens
    the step until the mode stops growing and $y$ follows the base solver step by
    step, at the price of many more steps also where the mode is harmless (up to
    4x on a trained neural ODE). Where the mode grows unseen,
    `ReversibleAdjoint`'s `parasitic_tol` check warns.
- `stage_pullback`: how `ReversibleAdjoint` pulls back through an explicit
    Runge-Kutta base step: `True` one stage at a time (the least memory: one stage's
    residuals, for one more evaluation of each stage), `False` through the whole
    unrolled step (faster, all stages' residuals at once), `None` (the default)
    chooses `True` when one stage's residuals exceed 64 KiB, counted over all the
    solves that a `jax.vmap` of the solve pulls back at once (diffrax's
    per-sample style: a stage of one sample is small, but XLA holds the whole
    batch's).
- `unroll_stages`: how the base steps of an explicit Runge-Kutta method (with the
    default `scan_kind=None`) are made, forward and in the reconstruction: `True`
    with their stages unrolled (a few fused kernels per step: fastest for small
    states), `False` by diffrax's stage loop, `None` (the default) unrolled for
    states of at most 256 elements per solve. With `integrated` components the
    steps are always unrolled. Unrolled, XLA fuses the computation of
    a stage's input into each of its consumers, and a consumer that reads an element
    many times (a stencil, a broadcast into a hidden layer) then recomputes the
    earlier stages per read: up to 3x the time of the stage loop for a forward solve
    and 4x for a gradient on the CPU.
"""
