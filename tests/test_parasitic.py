"""The parasitic y - z mode of `Reversible` is visible (issue 17).

On y' = -y + sin(3t) with h = 0.1, the default coupling 0.999 is unstable
(0.999 * e^{0.1} > 1 per step): over t in [0, 20] the mode grows by ~1e8 and the
solution ends off from Tsit5's by ~3x. With constant steps `ReversibleAdjoint` now
reports `sol.stats["parasitic_offset"]` and warns (or raises); with adaptive steps
the error estimate includes the mode's growth, so the controller shrinks the step
until the solution is right. Coupling 0.9 (0.9 * e^{0.1} < 1) is stable and quiet.
"""

import warnings

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import revdiffrax
from benchmarks.parasitic_mode import kalman


def _forcing(t, y, args):
    return -y + jnp.sin(3 * t)


def _solve(
    solver,
    adjoint,
    controller: diffrax.AbstractStepSizeController = diffrax.ConstantStepSize(),
    y0=None,
    t1=20.0,
) -> diffrax.Solution:
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_forcing),
        solver,
        0.0,
        t1,
        0.1,
        jnp.ones(1) if y0 is None else y0,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=4096,
    )


def _final(sol: diffrax.Solution) -> jax.Array:
    assert sol.ys is not None
    return sol.ys[-1]


def _parasitic_warnings(record) -> list:
    return [
        w for w in record if issubclass(w.category, revdiffrax.ParasiticModeWarning)
    ]


def _reference() -> np.ndarray:
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_forcing),
        diffrax.Dopri8(),
        0.0,
        20.0,
        0.1,
        jnp.ones(1),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=4096,
    )
    return np.asarray(_final(sol))


def test_constant_steps_unstable_coupling_warns_once():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sol = _solve(
            revdiffrax.Reversible(diffrax.Tsit5()), revdiffrax.ReversibleAdjoint()
        )
        _solve(revdiffrax.Reversible(diffrax.Tsit5()), revdiffrax.ReversibleAdjoint())
    (warning,) = _parasitic_warnings(record)  # once per compilation
    message = str(warning.message)
    assert "coupling" in message and "checkpoint_every" in message
    assert "parasitic_tol" in message
    # The warning is right: the solution is far from the base solver's.
    base = _solve(diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint())
    assert float(jnp.abs(_final(sol) - _final(base))[0]) > 0.1
    assert float(sol.stats["parasitic_offset"]) > 1.0


def test_stable_coupling_is_quiet_and_accurate():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sol = _solve(
            revdiffrax.Reversible(diffrax.Tsit5(), coupling=0.9),
            revdiffrax.ReversibleAdjoint(),
        )
    assert not _parasitic_warnings(record)
    assert float(sol.stats["parasitic_offset"]) < 1e-6
    base = _solve(diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint())
    assert float(jnp.abs(_final(sol) - _final(base))[0]) < 1e-8


def test_parasitic_tol_number_raises_and_none_is_silent():
    with pytest.raises(Exception, match="parasitic_tol=0.01"):
        sol = _solve(
            revdiffrax.Reversible(diffrax.Tsit5()),
            revdiffrax.ReversibleAdjoint(parasitic_tol=0.01),
        )
        jax.block_until_ready(sol.ys)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sol = _solve(
            revdiffrax.Reversible(diffrax.Tsit5()),
            revdiffrax.ReversibleAdjoint(parasitic_tol=None),
        )
    assert not _parasitic_warnings(record)
    assert float(sol.stats["parasitic_offset"]) > 1.0  # still reported
    with pytest.raises(ValueError, match="parasitic_tol"):
        revdiffrax.ReversibleAdjoint(parasitic_tol="always")  # pyright: ignore


def test_adaptive_steps_unstable_coupling_warns_or_is_controlled():
    """With the default error estimate (both base steps' local errors) the
    controller keeps ~100 steps, the mode grows and the solution is garbage: the
    offset is far above the tolerance-relative threshold, so it warns. With
    `parasitic_error=True` the controller shrinks the step towards -ln(coupling)
    (the edge of the stable strip) and the solution is right."""
    exact = _reference()
    controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sol = _solve(
            revdiffrax.Reversible(diffrax.Tsit5(), 0.99),
            revdiffrax.ReversibleAdjoint(),
            controller,
        )
    assert float(np.abs(_final(sol) - exact)[0]) > 1.0
    (warning,) = _parasitic_warnings(record)
    assert "parasitic_error=True" in str(warning.message)
    strict = revdiffrax.Reversible(diffrax.Tsit5(), 0.99, parasitic_error=True)
    adjoint = revdiffrax.ReversibleAdjoint(parasitic_tol=None)
    sol = _solve(strict, adjoint, controller)
    assert float(np.abs(_final(sol) - exact)[0]) < 1e-5
    # The default took ~100 steps; this one ends at h ~ -ln(0.99) = 0.01.
    assert int(sol.stats["num_accepted_steps"]) > 1000


def _damped(t, y, args):
    return jnp.stack([y[1], -y[0] - 0.6 * y[1]])


def test_adaptive_steps_harmless_mode_costs_no_steps_and_is_quiet():
    """A damped oscillator under `PIDController(rtol=1e-3, atol=1e-6)` (about 11
    steps of h ~ 1, where the default coupling lets the mode grow by ~1.5x per
    step but the solution decays faster): the solution is as accurate as the base
    solver's, so the reversible solver takes about its steps and does not warn.
    Before issue 22: 246 accepted steps (the round-trip defect in the estimate) and
    a warning (offset 5e-2 > 1e-3)."""
    controller = diffrax.PIDController(rtol=1e-3, atol=1e-6)

    def solve(solver, adjoint):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_damped),
            solver,
            0.0,
            10.0,
            0.1,
            jnp.array([1.0, 0.0]),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=4096,
        )

    base = solve(diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sol = solve(
            revdiffrax.Reversible(diffrax.Tsit5()), revdiffrax.ReversibleAdjoint()
        )
        jax.block_until_ready(sol.ys)
    assert not _parasitic_warnings(record)
    steps, base_steps = (int(s.stats["num_accepted_steps"]) for s in (sol, base))
    assert steps <= 1.5 * base_steps
    # Within the tolerance of the solution's scale (|y0| = 1), as the base solver.
    assert float(jnp.max(jnp.abs(_final(sol) - _final(base)))) < 2e-3
    # The offset is far from negligible; what the threshold asks is whether it is
    # more than the allowed local errors add up to (10 N (rtol + ...)).
    assert 1e-3 < float(sol.stats["parasitic_offset"]) < 10 * steps * 1e-3


def test_kalman_filter_default_coupling_warns():
    """diffrax's Kalman-filter example (constant step 0.01, Dopri5, 500 steps): the
    default coupling ends a relative ~2 from Dopri5 and warns; 0.9 does not."""
    problem = kalman(jnp.float64)
    results = {}
    for coupling in (0.999, 0.9):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(problem.vector_field),
                revdiffrax.Reversible(problem.base, coupling),
                problem.t0,
                problem.t1,
                problem.dt0,
                problem.y0,
                adjoint=revdiffrax.ReversibleAdjoint(),
                max_steps=1024,
            )
        results[coupling] = (len(_parasitic_warnings(record)), sol.stats)
    assert results[0.999][0] == 1 and float(results[0.999][1]["parasitic_offset"]) > 1
    assert results[0.9][0] == 0 and float(results[0.9][1]["parasitic_offset"]) < 1e-6


def test_vmap_reports_per_element_and_warns_once():
    # A state shape of its own: the warning is issued once per trace of the solve,
    # and a solve traced by an earlier test has already warned.
    y0s = jnp.array([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5]])
    solver = revdiffrax.Reversible(diffrax.Tsit5())

    def final(y0):
        sol = _solve(solver, revdiffrax.ReversibleAdjoint(), y0=y0)
        return sol.stats["parasitic_offset"]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        offsets = jax.jit(jax.vmap(final))(y0s)
    assert offsets.shape == (3,) and bool(jnp.all(offsets > 1.0))
    assert len(_parasitic_warnings(record)) == 1


def test_reversible_heun_reports_its_second_state():
    # ReversibleHeun is stable only on the imaginary axis: on this dissipative
    # problem its y - yhat mode grows too (to ~4e-2 by t = 1), and is reported.
    with pytest.warns(revdiffrax.ParasiticModeWarning):
        sol = _solve(
            revdiffrax.ReversibleHeun(), revdiffrax.ReversibleAdjoint(), t1=1.0
        )
    assert float(sol.stats["parasitic_offset"]) > 1e-3
    # Solvers without a second state report nothing.
    sol = _solve(revdiffrax.LeapfrogMidpoint(), revdiffrax.ReversibleAdjoint(), t1=1.0)
    assert "parasitic_offset" not in sol.stats


def _sde_solve(adjoint):
    """diffrax's neural SDE example in miniature: `ReversibleHeun`, constant steps,
    noise of the size of the drift."""
    bm = diffrax.VirtualBrownianTree(
        0.0, 4.0, tol=1e-3, shape=(2,), key=jax.random.key(0, impl="unsafe_rbg")
    )
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -y),
        diffrax.ControlTerm(
            lambda t, y, args: lx.DiagonalLinearOperator(jnp.ones_like(y)), bm
        ),
    )
    return diffrax.diffeqsolve(
        terms,
        revdiffrax.ReversibleHeun(),
        0.0,
        4.0,
        0.1,
        jnp.array([1.0, -0.5]),
        adjoint=adjoint,
    )


def test_sde_offset_reported_not_alarmed():
    # The two states of reversible Heun differ by the Brownian increments: far
    # above the constant-step threshold, and harmless.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sol = _sde_solve(revdiffrax.ReversibleAdjoint())
    assert not _parasitic_warnings(record)
    assert float(sol.stats["parasitic_offset"]) > 1e-2
    with pytest.raises(Exception, match="parasitic_tol=0.001"):
        _sde_solve(revdiffrax.ReversibleAdjoint(parasitic_tol=1e-3))
