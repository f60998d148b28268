"""Continued solves: `solver_state`, `controller_state` and `made_jump` passed to
`diffeqsolve` (e.g. from `SaveAt(solver_state=True, ...)` of an earlier solve) get
the cotangents `RecursiveCheckpointAdjoint` gives them, through the same solver."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import revdiffrax
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err


RCA = RCA_ALL_STEPS
# A tight drift tolerance: the drift is also measured at the known start.
REV = revdiffrax.ReversibleAdjoint(drift_tol=1e-8)
TERM = diffrax.ODETerm(lambda t, y, a: -a * y + jnp.sin(t) * y**2)
KEEP = diffrax.SaveAt(t1=True, solver_state=True, controller_state=True, made_jump=True)

# (solver, controller, dt0). A coupling of 0.9 makes z differ from y, so that pulling
# the state's cotangent back through `solver.init` (the old behaviour) is wrong.
CASES = {
    "Reversible(Midpoint, 0.9)-pid": (
        revdiffrax.Reversible(diffrax.Midpoint(), coupling=0.9),
        diffrax.PIDController(rtol=1e-3, atol=1e-5),
        0.1,
    ),
    "ReversibleHeun-constant": (
        revdiffrax.ReversibleHeun(),
        diffrax.ConstantStepSize(),
        0.07,
    ),
    "LeapfrogMidpoint-constant": (
        revdiffrax.LeapfrogMidpoint(),
        diffrax.ConstantStepSize(),
        0.07,
    ),
    "AsynchronousLeapfrog-constant": (
        revdiffrax.AsynchronousLeapfrog(),
        diffrax.ConstantStepSize(),
        0.07,
    ),
}


def _chained(y0, a, solver, controller, dt0, adjoint):
    kw = dict(args=a, stepsize_controller=controller, adjoint=adjoint, max_steps=100)
    first = diffrax.diffeqsolve(TERM, solver, 0.0, 1.0, dt0, y0, saveat=KEEP, **kw)
    second = diffrax.diffeqsolve(
        TERM,
        solver,
        1.0,
        2.0,
        dt0,
        first.ys[-1],
        solver_state=first.solver_state,
        controller_state=first.controller_state,
        made_jump=first.made_jump,
        saveat=diffrax.SaveAt(ts=jnp.array([1.0, 1.3, 2.0])),
        **kw,
    )
    return jnp.sum(jnp.sin(second.ys))


@pytest.mark.parametrize("case", sorted(CASES))
def test_chained_solves(case):
    solver, controller, dt0 = CASES[case]
    grad = jax.jit(jax.grad(_chained, argnums=(0, 1)), static_argnums=(2, 3, 4, 5))
    y0, a = jnp.array([1.0, 0.5]), jnp.array(0.7)
    err = tree_rel_err(
        grad(y0, a, solver, controller, dt0, REV),
        grad(y0, a, solver, controller, dt0, RCA),
    )
    print(f"\nCONTINUED {case} grad rel err {err:.2e}")
    assert err < GRAD_RTOL


def test_gradient_with_respect_to_a_passed_state():
    # The passed state is not what `solver.init(y0)` would make: its gradient is
    # that of the state itself, not of y0.
    solver = revdiffrax.Reversible(diffrax.Tsit5())

    def loss(z, y0, adjoint):
        state = solver.init(TERM, 0.0, 0.1, z, 0.7)
        sol = diffrax.diffeqsolve(
            TERM, solver, 0.0, 1.0, 0.1, y0, args=0.7, solver_state=state,
            adjoint=adjoint,
        )  # fmt: skip
        return jnp.sum(sol.ys**2)

    z, y0 = jnp.array([1.3, 0.2]), jnp.array([1.0, 0.5])
    grad = eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))  # jitted: one program
    g_rev, g_rca = grad(z, y0, REV), grad(z, y0, RCA)
    # Pulled back through `solver.init` instead (the old behaviour), it was zero.
    assert float(jnp.max(jnp.abs(g_rca[0]))) > 0.1
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL


def test_step_to_controller_state_is_refused():
    controller = diffrax.StepTo(jnp.linspace(0.0, 1.0, 6))
    state = controller.init(TERM, 0.0, 1.0, jnp.ones(2), None, 0.7, None, 2)[1]
    with pytest.raises(NotImplementedError, match=r"StepTo\(remaining_ts\)"):
        diffrax.diffeqsolve(
            TERM, revdiffrax.ReversibleHeun(), 0.0, 1.0, None, jnp.ones(2),
            args=0.7, stepsize_controller=controller, controller_state=state,
            adjoint=REV,
        )  # fmt: skip
