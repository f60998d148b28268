"""`ReversibleAdjoint(checkpoint_every="auto")`: k from the horizon law at trace
time."""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import revdiffrax
from helpers import RCA_ALL_STEPS, tree_rel_err
from revdiffrax._adjoint.auto_checkpoint import (
    auto_segment,
    resolve_checkpoint_every,
    rounding_growth,
    SAFETY,
)


@pytest.mark.parametrize(
    "coupling, dtype, expected",
    [
        (0.999, jnp.float32, 2563),
        (0.999, jnp.float64, 12606),
        (0.99, jnp.float32, 370),
        (0.9, jnp.float32, 46),
    ],
)
def test_auto_resolves_from_coupling_and_dtype(coupling, dtype, expected):
    solver = revdiffrax.Reversible(diffrax.Midpoint(), coupling=coupling)
    y0 = jnp.zeros(3, dtype)
    k = resolve_checkpoint_every(y0=y0, solver=solver, max_steps=10**6, drift_tol=None)
    assert k == expected
    # k is the largest segment the law admits: k passes, k + 1 does not.
    eps = float(np.finfo(dtype).eps)
    tol = math.sqrt(eps)
    assert SAFETY * eps * rounding_growth(coupling, k) <= tol
    assert SAFETY * eps * rounding_growth(coupling, k + 1) > tol


def test_auto_without_coupling_and_short_solves():
    y32 = jnp.zeros(2, jnp.float32)
    # ReversibleHeun has no coupling: the law with coupling 1, eps sqrt(k).
    k = resolve_checkpoint_every(
        y0=y32, solver=revdiffrax.ReversibleHeun(), max_steps=10**6, drift_tol=None
    )
    assert k == auto_segment(1.0, float(np.finfo(np.float32).eps), 2**-11.5)
    assert k == 83886
    # One segment covers the whole solve: no checkpoints.
    solver = revdiffrax.Reversible(diffrax.Midpoint())
    assert (
        resolve_checkpoint_every(y0=y32, solver=solver, max_steps=2000, drift_tol=None)
        is None
    )
    # A numeric drift_tol is the target: tighter tolerance, shorter segments.
    k_tight = resolve_checkpoint_every(
        y0=y32, solver=solver, max_steps=10**6, drift_tol=1e-5
    )
    assert k_tight == auto_segment(0.999, float(np.finfo(np.float32).eps), 1e-5)
    assert k_tight < 2563


def test_auto_rejects_bad_values():
    with pytest.raises(ValueError, match='"auto"'):
        revdiffrax.ReversibleAdjoint(checkpoint_every="always")  # pyright: ignore


def _decay_loss(solver, adjoint, dtype, n, dt):
    def field(t, y, a):
        return -a * y + 0.5 * jnp.sin(y)

    def loss(a, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(n * dt, dtype),
            jnp.asarray(dt, dtype),
            y0,
            args=a,
            adjoint=adjoint,
            max_steps=n,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    return loss


def test_auto_gradient_equals_rca_float64():
    # coupling 0.5 in float64: the reconstruction amplifies rounding by 2 per step
    # (2^100 over the solve); "auto" restarts it every k < 100 steps.
    solver = revdiffrax.Reversible(diffrax.Midpoint(), coupling=0.5)
    y0 = jnp.array([0.7, -0.2, 1.1])
    a = jnp.array([0.3, 0.1, 0.2])
    k = resolve_checkpoint_every(y0=y0, solver=solver, max_steps=100, drift_tol=None)
    assert k is not None and k < 100
    drifts = []
    auto = revdiffrax.ReversibleAdjoint(
        checkpoint_every="auto", drift_callback=drifts.append
    )
    rca = RCA_ALL_STEPS
    g_auto = jax.grad(_decay_loss(solver, auto, jnp.float64, 100, 0.05), (0, 1))(a, y0)
    g_rca = jax.grad(_decay_loss(solver, rca, jnp.float64, 100, 0.05), (0, 1))(a, y0)
    assert tree_rel_err(g_auto, g_rca) < 1e-9
    # Within the tolerance "auto" aims at, sqrt(eps).
    assert drifts and drifts[-1] < math.sqrt(np.finfo(np.float64).eps)


def test_auto_bounds_float32_drift():
    # coupling 0.9 in float32 over 600 steps: the reconstruction amplifies rounding
    # by 0.9^-600 ~ 1e27 without checkpoints; "auto" (k = 46) keeps it small.
    solver = revdiffrax.Reversible(diffrax.Midpoint(), coupling=0.9)
    y0 = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)
    a = jnp.full(8, 0.05, jnp.float32)

    def drift(every):
        drifts = []
        adjoint = revdiffrax.ReversibleAdjoint(
            checkpoint_every=every, drift_tol=None, drift_callback=drifts.append
        )
        jax.grad(_decay_loss(solver, adjoint, jnp.float32, 600, 0.01))(a, y0)
        return drifts[-1]

    plain, auto = drift(None), drift("auto")
    assert not plain < 1e-2  # large (or not finite) without checkpoints
    assert auto < math.sqrt(np.finfo(np.float32).eps)
