"""`jump_ts` under `ReversibleAdjoint`: steps end just before a jump and the next
starts just after it (the recorded end is used), and solvers that restart their
state after a jump (`reversible_across_jumps = False`) have their step after each jump
pulled back from a stored start. Gradients equal `RecursiveCheckpointAdjoint`'s."""

import diffrax
import jax
import jax.numpy as jnp
import pytest
import revdiffrax
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err


RCA = RCA_ALL_STEPS
# A tight drift tolerance: the drift is also measured at each stored start.
REV = revdiffrax.ReversibleAdjoint(drift_tol=1e-10)

SOLVERS = {
    "ReversibleHeun": revdiffrax.ReversibleHeun(),
    "AsynchronousLeapfrog": revdiffrax.AsynchronousLeapfrog(),
    "Reversible(Tsit5)": revdiffrax.Reversible(diffrax.Tsit5()),
}


def _vf(t, y, args):
    # Forcing that switches on at the first jump, so that evaluating the vector
    # field on the wrong side of a jump changes the result.
    return -args * y + jnp.sin(t) * y**2 + jnp.where(t > 0.5, 0.3, 0.0)


def _loss(y0, a, t1, solver, adjoint):
    controller = diffrax.PIDController(
        rtol=1e-4, atol=1e-6, jump_ts=jnp.array([0.5, 0.8])
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vf),
        solver,
        0.0,
        t1,
        0.05,
        y0,
        args=a,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 7), t1=True),
        adjoint=adjoint,
        max_steps=200,
    )
    return jnp.sum(jnp.sin(sol.ys))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_gradients_across_jumps(name):
    grad = jax.jit(jax.grad(_loss, argnums=(0, 1, 2)), static_argnums=(3, 4))
    args = (jnp.array([1.0, 0.5]), jnp.array(0.7), 1.0, SOLVERS[name])
    err = tree_rel_err(grad(*args, REV), grad(*args, RCA))
    print(f"\nJUMPS {name} grad rel err {err:.2e}")
    assert err < GRAD_RTOL
