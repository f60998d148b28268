"""Explicit Runge-Kutta steps for `Reversible`, unrolled, and their pullback one
stage at a time.

`Reversible` makes two base steps per step of the solve and two more on the backward
pass. For explicit Runge-Kutta bases and small states it evaluates them here rather
than through diffrax's stage loop: unrolled, XLA fuses a step into a few kernels
(`unroll_stages` says when; for larger states the fusion recomputes stages); and on
the backward pass, when one stage's residuals are large (neural vector fields), the
pullback runs one stage at a time (`_StagePullback`) so that only one stage's
residuals are alive at once.
"""

from collections.abc import Callable
from typing import TypeGuard

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._batching import vmap_size
from .._varying import varying_fori_loop


def _add(x, y):
    return jtu.tree_map(lambda xi, yi: xi + yi, x, y)


def is_plain_erk(solver: diffrax.AbstractSolver) -> TypeGuard[diffrax.AbstractERK]:
    """An explicit Runge-Kutta method with a plain Butcher tableau, whose stages
    `Reversible` unrolls (see `erk_step`) unless the user chose one of diffrax's
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


def add_cotangents(a, b):
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


def erk_step(tableau, terms, t0, t1, y0, args):
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
    # Applied to `terms` inside the differentiated stage, so that cotangents are
    # those of the user's terms (`StateSplit.wrap`); None for the identity.
    wrap: Callable | None = None

    def _stage(self, y, params, t, control):
        terms, args = params
        if self.wrap is not None:
            terms = self.wrap(terms)
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
        return k, y_bar, add_cotangents(params_bar, p_bar), times_bar

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


def pull_back_stages(
    tableau,
    terms,
    t0,
    t1,
    y0,
    args,
    increment_bar,
    acc,
    diff_times,
    dense_cotangent,
    wrap=None,
):
    """`Reversible._pull_back_base` for an explicit Runge-Kutta step, through
    `_StagePullback`. Without dense information the last stage is first evaluated in
    the loop; with it every stage is evaluated before, as the dense information's
    cotangent depends on all of them. `wrap` (if given) is applied to `terms` before
    they are evaluated."""
    dtype = jnp.result_type(*jtu.tree_leaves(y0))
    dense = dense_cotangent is not None
    num = _num_stages(tableau, dense)
    stage_terms = terms if wrap is None else wrap(terms)
    ts, control, ys, ks = _erk_stages(
        tableau, stage_terms, t0, t1, y0, args, num, evaluate_last=dense
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
        tableau, diff_times, terms, args, jnp.stack(ts), control, _stack(ys), wrap
    )
    k_last, y0_bar, params_bar, stage_times_bar = pullback(k_bars, y0_bar, params_bar)
    if increment is None:
        increment = _coeffs_dot(tableau.b_sol, ks + [k_last], dtype)
    times_bar = None
    if diff_times:
        _, vjp = eqx.filter_vjp(
            lambda t0_, t1_: _stage_times(tableau, stage_terms, t0_, t1_, num), t0, t1
        )
        t_bars, control_bar = stage_times_bar
        times_bar = vjp((list(t_bars), control_bar))
    return increment, (y0_bar, params_bar), times_bar, aux


# Above this many bytes of residuals per stage, the backward pass pulls back through
# an explicit Runge-Kutta step one stage at a time (`_StagePullback`), at the price
# of evaluating the stages once more. Below it, the residuals of a whole unrolled
# step are small, and re-evaluating would cost more time than they cost memory.
UNROLLED_RESIDUALS_LIMIT = 2**16


def _nbytes(tree) -> int:
    # PRNG key arrays (e.g. a `VirtualBrownianTree` built from `jax.random.key`)
    # have an extended dtype that numpy cannot size; they are not residuals.
    leaves = [
        x
        for x in jtu.tree_leaves(tree)
        if hasattr(x, "dtype") and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    ]
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def stage_residual_bytes(terms, t0, t1, y, args) -> int:
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


# States of at most this many elements (per solve) have the stages of `Reversible`'s
# explicit Runge-Kutta base steps unrolled (`erk_step`); larger ones use diffrax's
# stage loop. Unrolled, a small step is a few fused kernels, which is what sets its
# time. But XLA fuses the elementwise
# computation of a stage's input into every consumer of it, and a consumer that
# reads each element many times (a stencil's neighbours, a broadcast into a hidden
# layer) then recomputes the earlier stages per read: on the CPU a 64 x 64
# reaction-diffusion step took 3x, and its gradient 4x, diffrax's stage loop, whose
# stage values are materialised in the loop carry. At 256 elements the two were
# even (a Kuramoto network) or unrolling won (a 16 x 16 stencil); at 64 unrolling
# was 3x-14x faster (`results/scaling.md`, "The forward overhead").
UNROLL_MAX_ELEMENTS = 256


def unroll_stages(solver, u, choice=None) -> bool:
    """Whether `Reversible` makes a base step of `solver` from state `u` with its
    stages unrolled (`erk_step`) rather than by `solver.step`: only for plain
    explicit Runge-Kutta methods; then as `choice` says, or by default for states of
    at most `UNROLL_MAX_ELEMENTS` elements. The count is per solve (not times
    `vmap_size()`, which the forward pass does not know), so that the forward pass
    and the backward reconstruction make every base step the same way."""
    if not is_plain_erk(solver):
        return False
    if choice is not None:
        return choice
    size = sum(int(np.size(x)) for x in jtu.tree_leaves(u))
    return size <= UNROLL_MAX_ELEMENTS


def use_stage_pullback(solver, terms, t0, t1, u, args, choice=None) -> bool:
    """Whether the backward pass pulls back through a base step of `solver` one
    stage at a time (`_StagePullback`): only for explicit Runge-Kutta steps; then as
    `choice` says, or by default when their stages leave more than
    `UNROLLED_RESIDUALS_LIMIT` bytes of residuals, counted over all the solves that
    a `jax.vmap` pulls back at once (`vmap_size`: the shapes seen here are one
    solve's). Otherwise the whole step is differentiated by `jax.vjp` (unrolled for
    explicit Runge-Kutta steps, diffrax's own step otherwise)."""
    if not is_plain_erk(solver):
        return False
    if choice is not None:
        return choice
    per_solve = stage_residual_bytes(terms, t0, t1, u, args)
    return per_solve * vmap_size() > UNROLLED_RESIDUALS_LIMIT
