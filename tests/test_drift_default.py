"""The drift check is on by default: a float32 Lotka-Volterra solve to t1=140 whose
reversible gradient is garbage (the backward pass rebuilds y0 with a relative error
of ~1e-1) now warns, once per compilation; `drift_tol=None` silences it, a number
raises, and an accurate (float64) gradient stays silent."""

import warnings

import diffrax
import jax
import jax.numpy as jnp
import pytest
import revdiffrax
from helpers import RCA_ALL_STEPS


def _vector_field(t, y, args):
    a, b, c, d = args
    prey, predator = y
    return jnp.stack(
        [a * prey - b * prey * predator, -c * predator + d * prey * predator]
    )


def _loss(args, adjoint, dtype):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vector_field),
        # Blind to the parasitic mode (the default estimate since issue 22: the base
        # solver's, for both base steps), as in the reported case: ~90 steps. With
        # `parasitic_error=True` the controller takes ~5500 steps here, beyond
        # `max_steps`.
        revdiffrax.Reversible(diffrax.Tsit5(), parasitic_error=False),
        # Times of the state's dtype: the suite runs with float64 enabled, and float64
        # times would promote the whole solve to float64.
        jnp.asarray(0.0, dtype),
        jnp.asarray(140.0, dtype),
        jnp.asarray(0.1, dtype),
        jnp.array([10.0, 10.0], dtype),
        args=args,
        stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
        adjoint=adjoint,
        max_steps=4096,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys[-1])


def _grad(adjoint, dtype=jnp.float32):
    args = jnp.array([0.1, 0.02, 0.4, 0.02], dtype)
    return jax.jit(jax.grad(_loss), static_argnums=(1, 2))(args, adjoint, dtype)


def _drift_warnings(record):
    return [w for w in record if issubclass(w.category, revdiffrax.DriftWarning)]


def test_float32_garbage_gradient_warns_by_default():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        grad = _grad(revdiffrax.ReversibleAdjoint())
        _grad(revdiffrax.ReversibleAdjoint())  # same compilation: no second warning
    (warning,) = _drift_warnings(record)
    message = str(warning.message)
    assert "above 3.5e-04" in message and "float32" in message
    assert "checkpoint_every" in message and "choose_checkpoint_every" in message
    # The warning is right: the gradient is far from checkpointing's.
    expected = _grad(RCA_ALL_STEPS)  # jitted: one compile
    assert jnp.max(jnp.abs(grad - expected)) > 0.1 * jnp.max(jnp.abs(expected))


def test_drift_tol_none_is_silent_and_a_number_raises():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _grad(revdiffrax.ReversibleAdjoint(drift_tol=None))
    assert not _drift_warnings(record)
    with pytest.raises(Exception, match="drift_tol=0.001"):
        jax.block_until_ready(_grad(revdiffrax.ReversibleAdjoint(drift_tol=1e-3)))


def test_accurate_gradient_is_silent():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _grad(revdiffrax.ReversibleAdjoint(), jnp.float64)
    assert not _drift_warnings(record)


@pytest.mark.parametrize("tol", ["warn", True, "1e-3"])
def test_bad_drift_tol_is_refused(tol):
    with pytest.raises(ValueError, match="drift_tol"):
        revdiffrax.ReversibleAdjoint(drift_tol=tol)


def _with_running_cost(t, y, args):
    x, _ = y
    return _vector_field(t, x, args), x[0]


def test_warns_beside_a_component_that_nothing_reads():
    # The checks measure the components that the vector field reads (`measured.py`):
    # beside a running cost, which nothing reads, the drift of the state is caught.
    def loss(args):
        dtype = jnp.float32
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_with_running_cost),
            revdiffrax.Reversible(diffrax.Tsit5(), parasitic_error=False),
            jnp.asarray(0.0, dtype),
            jnp.asarray(140.0, dtype),
            jnp.asarray(0.1, dtype),
            (jnp.array([10.0, 10.0], dtype), jnp.zeros((), dtype)),
            args=args,
            stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-5),
            adjoint=revdiffrax.ReversibleAdjoint(),
            max_steps=4096,
        )
        x, cost = sol.ys  # pyright: ignore[reportGeneralTypeIssues]
        return jnp.sum(x[-1]) + cost[-1]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        jax.block_until_ready(
            jax.jit(jax.grad(loss))(jnp.array([0.1, 0.02, 0.4, 0.02], jnp.float32))
        )
    assert len(_drift_warnings(record)) == 1
