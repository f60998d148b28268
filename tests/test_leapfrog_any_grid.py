"""`LeapfrogMidpoint` under `ReversibleAdjoint` on non-uniform grids: its backward
step takes the start of the previous step from the adjoint (`at_previous_time`), so
its gradients equal `RecursiveCheckpointAdjoint`'s through the same solver."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import revdiffrax
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err


RCA = RCA_ALL_STEPS
REV = revdiffrax.ReversibleAdjoint()
SAVE_TS = jnp.array([0.0, 0.25, 0.61, 1.3, 1.9])


def _vf(t, y, args):
    return -args * y + jnp.sin(t) * y**2


def _random_grid(seed: int, num: int = 60) -> jax.Array:
    # Step sizes varying by a factor of up to 9 between steps.
    dts = np.random.default_rng(seed).uniform(0.2, 1.8, num)
    return jnp.asarray(2.0 * np.concatenate([[0.0], np.cumsum(dts)]) / np.sum(dts))


def _loss(y0, a, t0, t1, save_ts, controller, dt0, adjoint):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vf),
        revdiffrax.LeapfrogMidpoint(),
        t0,
        t1,
        dt0,
        y0,
        args=a,
        saveat=diffrax.SaveAt(ts=save_ts, t1=True),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=200,
    )
    return jnp.sum(jnp.sin(sol.ys))


CASES = {
    "stepto-random": (diffrax.StepTo(_random_grid(0)), None),
    "stepto-graded": (diffrax.StepTo(2.0 * jnp.linspace(0.0, 1.0, 50) ** 1.5), None),
    # 2 / 0.07 is not an integer: a first step of 0.07, then 28 steps of ~0.0689.
    "constant-0.07": (diffrax.ConstantStepSize(), 0.07),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_equal_checkpointing(case):
    controller, dt0 = CASES[case]
    args = (jnp.array([1.0, 0.5]), jnp.array(0.7), 0.0, 2.0, SAVE_TS)
    # Time gradients (t0, t1) only where the grid depends on them.
    argnums = (0, 1, 2, 3, 4) if dt0 is not None else (0, 1, 4)
    grad = jax.jit(jax.grad(_loss, argnums=argnums), static_argnums=(6, 7))
    g_rev = grad(*args, controller, dt0, REV)
    g_rca = grad(*args, controller, dt0, RCA)
    err = tree_rel_err(g_rev, g_rca)
    print(f"\nLEAPFROG {case} grad rel err {err:.2e}")
    assert err < GRAD_RTOL


def test_wrong_previous_time_would_be_seen():
    # The test above can fail: the backward pass with the uniform-grid guess
    # t_{n-1} = 2 t_n - t_{n+1} (the old behaviour) is far off on a random grid.
    class UniformGuess(revdiffrax.LeapfrogMidpoint):
        def backward_step(self, terms, t0, t1, y1, args, solver_state, made_jump):
            guess = revdiffrax.LeapfrogMidpoint(t_prev=2 * t0 - t1)
            return guess.backward_step(terms, t0, t1, y1, args, solver_state, made_jump)

    def loss(y0, solver, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_vf),
            solver,
            0.0,
            2.0,
            None,
            y0,
            args=0.7,
            stepsize_controller=CASES["stepto-random"][0],
            adjoint=adjoint,
            max_steps=200,
        )
        return jnp.sum(sol.ys)

    y0 = jnp.array([1.0, 0.5])
    grad = eqx.filter_jit(jax.grad(loss))  # jitted: one program per gradient
    reference = grad(y0, revdiffrax.LeapfrogMidpoint(), RCA)
    wrong = grad(y0, UniformGuess(), revdiffrax.ReversibleAdjoint(None))
    assert tree_rel_err(wrong, reference) > 1e-4
