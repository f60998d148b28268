"""Gradients with respect to `t0`, `t1` and `dt0` under an adaptive controller when
an attempted step clipped to `t1` is rejected.

The controller proposes the next step from the attempted one, so after such a
rejection every later step time depends on `t1`. `ReversibleAdjoint` used to assume
that only the last step time does, and on this pendulum (t1 = 2.4070...) its
d/d(dt0) was off by 20% and d/dt1 by 8e-5, relative, silently. The dependence is
now tracked on the forward pass (`TimeCoefficients`).
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import revdiffrax
from helpers import GRAD_RTOL, RCA_ALL_STEPS


T1 = 1.0 + 5.0 * 56 / 199  # found by a sweep of 200 values of t1 in [1, 6]


def _pendulum(t, y, args):
    return jnp.stack([y[1], -args * jnp.sin(y[0])])


def _loss(times, adjoint):
    t0, t1, dt0 = times
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulum),
        revdiffrax.Reversible(diffrax.Tsit5()),
        t0,
        t1,
        dt0,
        jnp.array([1.0, 0.0]),
        args=3.0,
        stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-4),
        adjoint=adjoint,
        max_steps=1000,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys[-1] ** 2), sol.stats


@eqx.filter_jit
def _grad_times(times, adjoint):
    return jax.grad(lambda x: _loss(x, adjoint)[0])(times)


def _grad(adjoint, t1=T1):
    times = (jnp.asarray(0.0), jnp.asarray(t1), jnp.asarray(0.05))
    return np.array([float(g) for g in _grad_times(times, adjoint)])


def test_rejected_step_at_t1_case_has_a_rejection_at_the_end():
    # The case is what it claims: the solve rejects steps.
    _, stats = _loss((0.0, T1, 0.05), diffrax.RecursiveCheckpointAdjoint())
    assert int(stats["num_rejected_steps"]) > 0


def test_time_gradients_match_checkpointing_after_rejection_at_t1():
    expected = _grad(RCA_ALL_STEPS)
    got = _grad(revdiffrax.ReversibleAdjoint())
    np.testing.assert_allclose(got, expected, rtol=GRAD_RTOL, atol=0)
    # checkpoint_every takes the same path.
    got = _grad(revdiffrax.ReversibleAdjoint(checkpoint_every=5))
    np.testing.assert_allclose(got, expected, rtol=GRAD_RTOL, atol=0)


def test_time_gradients_match_checkpointing_over_a_sweep():
    for t1 in np.linspace(2.3, 2.5, 9):
        expected = _grad(RCA_ALL_STEPS, t1)
        got = _grad(revdiffrax.ReversibleAdjoint(), t1)
        np.testing.assert_allclose(got, expected, rtol=GRAD_RTOL, atol=0)
