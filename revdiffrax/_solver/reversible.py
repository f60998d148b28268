from collections.abc import Callable
from typing import Any, ClassVar, TypeAlias, TypeGuard

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from diffrax._heuristics import is_sde
from diffrax._local_interpolation import AbstractLocalInterpolation
from diffrax._misc import linear_rescale
from equinox.internal import ω
from jax.core import Tracer
from jaxtyping import Array, PyTree

from .._varying import varying_fori_loop
from .base import AbstractReversibleSolver


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


def _is_plain_erk(solver: diffrax.AbstractSolver) -> TypeGuard[diffrax.AbstractERK]:
    """An explicit Runge-Kutta method with a plain Butcher tableau, whose stages
    `Reversible` unrolls (see `_erk_step`) unless the user chose one of diffrax's
    stage loops with `scan_kind`."""
    return (
        isinstance(solver, diffrax.AbstractERK)
        and isinstance(solver.tableau, diffrax.ButcherTableau)
        and not solver.tableau.implicit
        and solver.scan_kind is None
    )


def _coeffs_dot(coeffs, trees, dtype):
    """sum_i coeffs[i] * trees[i] over the nonzero coefficients (None if none is)."""
    out = None
    for c, tree in zip(coeffs, trees):
        if c != 0:
            term = jtu.tree_map(lambda x: jnp.asarray(c, dtype) * x, tree)
            out = term if out is None else _add(out, term)
    return out


def _add_cotangents(a, b):
    """a + b for two cotangents of the same primal, `None` being a zero."""
    return jtu.tree_map(
        lambda x, y: x if y is None else (y if x is None else x + y),
        a,
        b,
        is_leaf=lambda x: x is None,
    )


def _num_stages(tableau: diffrax.ButcherTableau, dense: bool) -> int:
    """The stages a step needs: all of them for the error estimate or the dense
    information, else up to the last one the increment uses (FSAL tableaus have one
    more, which only feeds the error estimate and the dense information)."""
    if dense:
        return tableau.num_stages
    return 1 + max(i for i, b in enumerate(tableau.b_sol) if b != 0)


def _stage_times(tableau, terms, t0, t1, num):
    """The times of the first `num` stages and the control of a step."""
    time_dtype = jnp.result_type(t0, t1)
    ts = [t0] + [t0 + jnp.asarray(c, time_dtype) * (t1 - t0) for c in tableau.c]
    return ts[:num], terms.contr(t0, t1)


def _erk_stages(tableau, terms, t0, t1, y0, args, num, evaluate_last=True):
    """The first `num` stages of an explicit Runge-Kutta step, unrolled: their
    times, the control, their inputs `ys` and their values `ks` (the last one only if
    `evaluate_last`)."""
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    ts, control = _stage_times(tableau, terms, t0, t1, num)
    ys, ks = [], []
    for i in range(num):
        incr = None if i == 0 else _coeffs_dot(tableau.a_lower[i - 1], ks, dtype)
        ys.append(y0 if incr is None else _add(y0, incr))
        if i < num - 1 or evaluate_last:
            ks.append(terms.vf_prod(ts[i], ys[i], args, control))
    return ts, control, ys, ks


def _erk_step(tableau, terms, t0, t1, y0, args):
    """One explicit Runge-Kutta step with the stages unrolled.

    Same method (tableau, error estimate, dense information `dict(y0, y1, k)`) as
    diffrax's `AbstractRungeKutta.step` with `made_jump=True`, which runs the stages
    in a while loop. Unrolled, XLA fuses each step into a few kernels, which matters
    because the reversible scheme makes two such steps, and two more on the backward
    pass, per step of the solve.
    """
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    _, _, _, ks = _erk_stages(tableau, terms, t0, t1, y0, args, tableau.num_stages)
    increment = _coeffs_dot(tableau.b_sol, ks, dtype)
    error = _coeffs_dot(tableau.b_error, ks, dtype)
    y1 = _add(y0, increment)
    k = jtu.tree_map(lambda *x: jnp.stack(x), *ks)
    return increment, error, dict(y0=y0, y1=y1, k=k)


def _stack(trees):
    return jtu.tree_map(lambda *x: jnp.stack(x), *trees)


class _StagePullback(eqx.Module):
    """Pulls a cotangent back through the stages of one explicit Runge-Kutta step,
    one stage at a time: a loop over the stages, latest first, evaluates each under
    `jax.vjp` and applies its pullback at once.

    The residuals of one stage of a neural vector field are usually far larger than
    the state, so holding those of every stage (as `jax.vjp` of the unrolled step
    does) dominates the memory of the backward pass. Inside a loop iteration XLA holds
    one stage's. A loop is needed: unrolled re-evaluations can be scheduled early by
    XLA, and `lax.optimization_barrier` does not prevent it (XLA's CPU backend
    removes barriers before scheduling). The cost is one more evaluation of each stage
    but the last (which the loop evaluates first, for the increment).
    """

    tableau: diffrax.ButcherTableau = eqx.field(static=True)
    diff_times: bool = eqx.field(static=True)
    terms: PyTree
    args: PyTree
    ts: Array  # the stage times, stacked
    control: PyTree
    ys: PyTree  # the stage inputs, stacked

    def _stage(self, y, params, t, control):
        terms, args = params
        return terms.vf_prod(t, y, args, control)

    def _pull_back_stage(self, i, k_bar, params_bar, times_bar):
        y = jtu.tree_map(lambda x: x[i], self.ys)
        params = (self.terms, self.args)
        if self.diff_times:
            k, vjp = eqx.filter_vjp(self._stage, y, params, self.ts[i], self.control)
            y_bar, p_bar, t_bar, control_bar = vjp(k_bar)
            t_bars, control_bars = times_bar
            times_bar = (t_bars.at[i].add(t_bar), _add(control_bars, control_bar))
        else:

            def stage(y_, params_):
                return self._stage(y_, params_, self.ts[i], self.control)

            k, vjp = eqx.filter_vjp(stage, y, params)
            y_bar, p_bar = vjp(k_bar)
        return k, y_bar, _add_cotangents(params_bar, p_bar), times_bar

    def __call__(self, k_bars, y0_bar, params_bar):
        """Pull back `k_bars`, the cotangents of the stage values (stacked), adding to
        `y0_bar` and `params_bar`. Returns the value of the last stage, `y0_bar`,
        `params_bar` and the cotangents of the stage times and the control (`None`
        unless `diff_times`)."""
        num = self.ts.shape[0]
        dtype = jnp.result_type(*jtu.tree_leaves(self.ys))
        a = np.zeros((num, num))
        for i in range(1, num):
            a[i, :i] = self.tableau.a_lower[i - 1][:i]
        a = jnp.asarray(a, dtype)
        times_bar = None
        if self.diff_times:
            control_bar = jtu.tree_map(
                jnp.zeros_like, eqx.filter(self.control, eqx.is_inexact_array)
            )
            times_bar = (jnp.zeros_like(self.ts), control_bar)
        k_last = jtu.tree_map(lambda x: jnp.zeros_like(x[0]), self.ys)

        def body(j, carry):
            k_bars, k_last, y0_bar, params_bar, times_bar = carry
            i = num - 1 - j
            k_bar = jtu.tree_map(lambda x: x[i], k_bars)
            k, y_bar, params_bar, times_bar = self._pull_back_stage(
                i, k_bar, params_bar, times_bar
            )
            # Stage i's input is y0 + sum_{l < i} a[i, l] k_l.
            k_bars = jtu.tree_map(
                lambda kb, yb: kb + a[i].reshape((-1,) + (1,) * yb.ndim) * yb,
                k_bars,
                y_bar,
            )
            k_last = jtu.tree_map(lambda x, y: jnp.where(j == 0, y, x), k_last, k)
            return k_bars, k_last, _add(y0_bar, y_bar), params_bar, times_bar

        carry = (k_bars, k_last, y0_bar, params_bar, times_bar)
        _, k_last, y0_bar, params_bar, times_bar = varying_fori_loop(
            0, num, body, carry
        )
        return k_last, y0_bar, params_bar, times_bar


def _pull_back_stages(
    tableau, terms, t0, t1, y0, args, increment_bar, acc, diff_times, dense_cotangent
):
    """`Reversible._pull_back_base` for an explicit Runge-Kutta step, through
    `_StagePullback`. Without dense information the last stage is first evaluated in
    the loop; with it every stage is evaluated before, as the dense information's
    cotangent depends on all of them."""
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    dense = dense_cotangent is not None
    num = _num_stages(tableau, dense)
    ts, control, ys, ks = _erk_stages(
        tableau, terms, t0, t1, y0, args, num, evaluate_last=dense
    )
    y0_bar, params_bar = acc
    increment, aux, k_bars = None, None, None
    if dense_cotangent is not None:
        increment = _coeffs_dot(tableau.b_sol, ks, dtype)
        dense_info = dict(y0=y0, y1=_add(y0, increment), k=_stack(ks))
        dense_info_bar, aux = dense_cotangent(increment, dense_info)
        # y1 = y0 + increment
        increment_bar = _add(increment_bar, dense_info_bar["y1"])
        y0_bar = _add(y0_bar, _add(dense_info_bar["y0"], dense_info_bar["y1"]))
        k_bars = dense_info_bar["k"]
    # The increment is sum_i b_i k_i.
    b = jnp.asarray(np.asarray(tableau.b_sol[:num]), dtype)
    b_k_bars = jtu.tree_map(
        lambda g: b.reshape((-1,) + (1,) * jnp.ndim(g)) * g, increment_bar
    )
    k_bars = b_k_bars if k_bars is None else _add(k_bars, b_k_bars)
    pullback = _StagePullback(
        tableau, diff_times, terms, args, jnp.stack(ts), control, _stack(ys)
    )
    k_last, y0_bar, params_bar, stage_times_bar = pullback(k_bars, y0_bar, params_bar)
    if increment is None:
        increment = _coeffs_dot(tableau.b_sol, ks + [k_last], dtype)
    times_bar = None
    if diff_times:
        _, vjp = eqx.filter_vjp(
            lambda t0_, t1_: _stage_times(tableau, terms, t0_, t1_, num), t0, t1
        )
        t_bars, control_bar = stage_times_bar
        times_bar = vjp((list(t_bars), control_bar))
    return increment, (y0_bar, params_bar), times_bar, aux


# Above this many bytes of residuals per stage, the backward pass pulls back through
# an explicit Runge-Kutta step one stage at a time (`_StagePullback`), at the price
# of evaluating the stages once more. Below it, the residuals of a whole unrolled
# step are small, and re-evaluating would cost more time than they cost memory.
_UNROLLED_RESIDUALS_LIMIT = 2**16


def _nbytes(tree) -> int:
    leaves = [x for x in jtu.tree_leaves(tree) if hasattr(x, "dtype")]
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def _stage_residual_bytes(terms, t0, t1, y, args) -> int:
    """What `jax.vjp` keeps from one evaluation of the vector field, beyond its
    inputs (from shapes only: nothing is evaluated)."""

    def linearise(y_, params):
        terms_, args_ = params

        def stage(y__, params_):
            return params_[0].vf_prod(t0, y__, params_[1], params_[0].contr(t0, t1))

        return eqx.filter_vjp(stage, y_, (terms_, args_))[1]

    vjp = eqx.filter_eval_shape(linearise, y, (terms, args))
    inputs = eqx.filter((y, terms, args), eqx.is_array)
    return max(_nbytes(vjp) - _nbytes(inputs), 0)


def _merge_times_bar(times_bar_a, times_bar_b):
    """The cotangent of (t_n, t_{n+1}) from those of A (from t_n to t_{n+1}) and B
    (from t_{n+1} to t_n)."""
    if times_bar_a is None:
        return None
    return (times_bar_a[0] + times_bar_b[1], times_bar_a[1] + times_bar_b[0])


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

    Each step costs two base steps. The error estimate is the base solver's estimate
    for $\Psi_h(t_n, z_n)$, so adaptive step size controllers work; dense output
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
        return y0, self.solver.init(terms, t0, t1, y0, args)

    def _base_step(self, terms, t0, t1, u, args, base_state):
        # `made_jump=True` makes FSAL solvers re-evaluate their first stage: successive
        # base steps start from different points (z_n, then y_{n+1}), so a stage
        # carried over from the previous base step would be wrong. This leaves the
        # user's solver object untouched.
        if _is_plain_erk(self.solver):
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
        drift = jtu.tree_map(lambda o: -(1 - self.coupling) * o, offset)
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
        lam = self.coupling
        z0, base_state = solver_state
        psi_z, error, base_dense_info, result1 = self._base_step(
            terms, t0, t1, z0, args, base_state
        )
        y1 = _add(_axpy(lam, y0, jtu.tree_map(lambda z: (1 - lam) * z, z0)), psi_z)
        psi_y, _, _, result2 = self._base_step(terms, t1, t0, y1, args, base_state)
        z1 = _sub(z0, psi_y)
        dense_info = self._dense_info(y0, z0, base_dense_info)
        result = diffrax.RESULTS.where(
            result1 == diffrax.RESULTS.successful, result2, result1
        )
        return y1, error, dense_info, (z1, base_state), result

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
        psi_y, _, _, result1 = self._base_step(terms, t1, t0, y1, args, base_state)
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

    def _increment_fn(self, ta, tb, base_state, diff_times: bool, dense: bool):
        """The base step from `ta` to `tb` as a function of `(u, (terms, args),
        times)`, to differentiate (`times` is `(ta, tb)` if `diff_times`, else
        ignored): its increment, and its dense information if `dense`."""

        def increment(u, params, times):
            terms, args = params
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
        backward = self._increment_fn(t1, t0, base_state, diff_times, dense=False)
        forward = self._increment_fn(t0, t1, base_state, diff_times, dense=True)
        # B: the backward base step of y_{n+1}, which gives z_n = z_{n+1} + B.
        (psi_y, _), vjp_b = eqx.filter_vjp(
            backward, y1, params, (t1, t0) if diff_times else None
        )
        z0 = _add(z1, psi_y)
        # A: the forward base step of z_n, which gives y_n.
        (psi_z, base_dense_info), vjp_a = eqx.filter_vjp(
            forward, z0, params, (t0, t1) if diff_times else None
        )
        y0 = self._reconstruct_y0(y1, z0, psi_z)
        dense_info = self._dense_info(y0, z0, base_dense_info)

        def pullback(y1_bar, solver_state1_bar, dense_info_bar):
            z1_bar, base_state_bar = solver_state1_bar
            y_bar_b, params_bar_b, times_bar_b = vjp_b(((-ω(z1_bar)).ω, None))
            y1_bar = _add(y1_bar, y_bar_b)
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
        lam = self.coupling
        y0_bar = (lam * ω(y1_bar)).ω
        z0_bar = (ω(z1_bar) + (1 - lam) * ω(y1_bar)).ω
        d = None
        if dense_info_bar is not None:
            offset_bar = ω(dense_info_bar["offset"])
            d = (offset_bar - (1 - lam) * ω(dense_info_bar["drift"])).ω
        return y0_bar, z0_bar, d

    def _vjp_kind(self, terms, t0, t1, u, args) -> str:
        """How the backward pass differentiates a base step: "stages"
        (`_StagePullback`, one stage's residuals at a time) for explicit Runge-Kutta
        steps whose stages leave large residuals, else "whole" (`jax.vjp` of the
        whole step: unrolled for explicit Runge-Kutta steps, diffrax's own step
        otherwise)."""
        if not _is_plain_erk(self.solver):
            return "whole"
        residuals = _stage_residual_bytes(terms, t0, t1, u, args)
        return "stages" if residuals > _UNROLLED_RESIDUALS_LIMIT else "whole"

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
    ):
        """Evaluate the base step from `ta` to `tb` at `u` and pull `increment_bar`
        back through it, adding to the cotangents `acc = (u_bar, params_bar)`. With
        `dense_cotangent(increment, dense_info) -> (dense_info_bar, aux)`, also pull
        back the cotangent of its dense information. Returns the increment, the
        updated `acc`, the cotangent of `(ta, tb)` (if `diff_times`) and `aux`."""
        terms, args = params
        if self._vjp_kind(terms, ta, tb, u, args) == "stages":
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
            )
        dense = dense_cotangent is not None
        fn = self._increment_fn(ta, tb, base_state, diff_times, dense)
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
        # B, whose cotangent is -z1_bar.
        psi_y, (y1_bar, params_bar), times_bar_b, _ = self._pull_back_base(
            t1,
            t0,
            y1,
            params,
            base_state,
            (-ω(z1_bar)).ω,
            (y1_bar, params_bar),
            diff_times,
        )
        z0 = _add(z1, psi_y)
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
        lam = self.coupling
        return jtu.tree_map(
            lambda y, z, p: (y - (1 - lam) * z - p) / lam, y1, z0, psi_z
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
"""
