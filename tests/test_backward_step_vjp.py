"""`AbstractReversibleSolver.backward_step_vjp`: the fused version of `Reversible`
equals the generic default (reconstruct, then differentiate `step`), and both equal
`jax.vjp` of `step` at the true earlier state."""

import functools as ft

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import pytest
import revdiffrax
from helpers import tree_rel_err


def _vector_field(t, y, args):
    a, b = args
    return jnp.tanh(a @ y) * jnp.cos(t) + b


def _setup(solver):
    key_a, key_b, key_y = jr.split(jr.PRNGKey(0), 3)
    args = (0.5 * jr.normal(key_a, (3, 3)), 0.1 * jr.normal(key_b, (3,)))
    term = diffrax.ODETerm(_vector_field)
    y0 = jr.normal(key_y, (3,))
    t0, t1 = jnp.asarray(0.3), jnp.asarray(0.45)
    state0 = solver.init(term, t0, t1, y0, args)
    # Take one step first so that the solver state is not the initial one.
    y0, _, _, state0, _ = solver.step(
        term, jnp.asarray(0.2), t0, y0, args, state0, False
    )
    return term, args, t0, t1, y0, state0


def _cotangents(y1, state1, dense_info):
    leaves, treedef = jtu.tree_flatten(
        eqx.filter((y1, state1, dense_info), eqx.is_inexact_array)
    )
    keys = jr.split(jr.PRNGKey(1), len(leaves))
    bars = [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jtu.tree_unflatten(treedef, bars)


@pytest.mark.parametrize("base", [diffrax.Midpoint(), diffrax.Tsit5()], ids=repr)
@pytest.mark.parametrize("diff_times", [False, True])
def test_fused_equals_generic_equals_step_vjp(base, diff_times):
    solver = revdiffrax.Reversible(base, coupling=0.9)
    term, args, t0, t1, y0, state0 = _setup(solver)
    y1, _, dense_info, state1, _ = solver.step(term, t0, t1, y0, args, state0, False)
    bars = _cotangents(y1, state1, dense_info)

    def step(y, state, params, times):
        y1_, _, dense_, state1_, _ = solver.step(
            params[0], times[0], times[1], y, params[1], state, False
        )
        return y1_, state1_, dense_

    _, vjp = eqx.filter_vjp(step, y0, state0, (term, args), (t0, t1))
    expected = vjp(bars)
    generic = ft.partial(revdiffrax.AbstractReversibleSolver.backward_step_vjp, solver)
    for backward_step_vjp in (solver.backward_step_vjp, generic):
        y0_rec, _, state0_rec, pullback = backward_step_vjp(
            term,
            t0,
            t1,
            y1,
            args,
            state1,
            False,
            diff_times=diff_times,
            want_dense=True,
        )
        assert tree_rel_err(y0_rec, y0) < 1e-12
        assert tree_rel_err(state0_rec, state0) < 1e-12
        y0_bar, state0_bar, params_bar, times_bar = pullback(*bars)
        assert tree_rel_err(y0_bar, expected[0]) < 1e-12
        assert tree_rel_err(state0_bar, expected[1]) < 1e-12
        assert tree_rel_err(params_bar, expected[2]) < 1e-12
        if diff_times:
            assert tree_rel_err(times_bar, expected[3]) < 1e-12
        else:
            assert times_bar is None


def test_capabilities_are_declared():
    assert revdiffrax.Reversible(diffrax.Euler()).reversible_across_jumps
    assert not revdiffrax.ReversibleHeun().reversible_across_jumps
    assert revdiffrax.LeapfrogMidpoint().reversible_on_any_grid
    assert revdiffrax.LeapfrogMidpoint().reversible_across_jumps
    assert revdiffrax.AsynchronousLeapfrog().reversible_on_any_grid
