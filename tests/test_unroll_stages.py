"""How `Reversible` makes the base steps of an explicit Runge-Kutta method: unrolled
for small states, by diffrax's stage loop for larger ones (`unroll_stages`); exact
gradients either way, and the size rule."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
import revdiffrax
import revdiffrax._solver.erk as erk
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err


def _vector_field(t, y, args):
    a, b = args
    return jnp.tanh(a @ y) * jnp.cos(t) + b


def _loss(args, y0, adjoint, solver, saveat, controller):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vector_field),
        solver,
        0.0,
        1.0,
        0.05,
        y0,
        args=args,
        saveat=saveat,
        adjoint=adjoint,
        stepsize_controller=controller,
        max_steps=256,
    )
    return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]


@pytest.mark.parametrize(
    "base, unroll, case",
    [
        (diffrax.Midpoint(), True, "t1"),
        (diffrax.Midpoint(), False, "t1"),
        (diffrax.Tsit5(), False, "pid"),  # FSAL, adaptive, dense output
    ],
)
def test_unroll_stages_gradients(base, unroll, case):
    """Either way of making the base steps gives the gradient of checkpointing
    through the same solver (dense output included)."""
    key_a, key_b = jr.split(jr.PRNGKey(0))
    args = (0.5 * jr.normal(key_a, (3, 3)), 0.1 * jr.normal(key_b, (3,)))
    y0 = jnp.array([1.0, 0.5, -0.3])
    if case == "pid":
        saveat = diffrax.SaveAt(ts=jnp.linspace(0.1, 0.9, 4))
        controller = diffrax.PIDController(rtol=1e-5, atol=1e-5)
    else:
        saveat = diffrax.SaveAt(t1=True)
        controller = diffrax.ConstantStepSize()
    solver = revdiffrax.Reversible(base, unroll_stages=unroll)
    grad = eqx.filter_jit(jax.grad(_loss, argnums=(0, 1)))  # jitted: one program
    ours = grad(args, y0, revdiffrax.ReversibleAdjoint(), solver, saveat, controller)
    ref = grad(args, y0, RCA_ALL_STEPS, solver, saveat, controller)
    assert tree_rel_err(ours, ref) < GRAD_RTOL


def test_unroll_stages_chosen_by_state_size():
    """Unrolled up to `UNROLL_MAX_ELEMENTS` elements per solve, diffrax's stage loop
    beyond; never for bases that are not plain explicit Runge-Kutta methods; the
    `unroll_stages` argument overrides the size rule."""
    small = jnp.zeros(3)
    large = {"u": jnp.zeros((16, 16)), "v": jnp.zeros(1)}  # 257 elements
    midpoint = diffrax.Midpoint()
    assert erk.unroll_stages(midpoint, small)
    assert erk.unroll_stages(midpoint, jnp.zeros(erk.UNROLL_MAX_ELEMENTS))
    assert not erk.unroll_stages(midpoint, large)
    assert not erk.unroll_stages(diffrax.Midpoint(scan_kind="bounded"), small)
    assert not erk.unroll_stages(diffrax.ReversibleHeun(), small)
    assert erk.unroll_stages(midpoint, large, True)
    assert not erk.unroll_stages(midpoint, small, False)


def test_unrolled_and_loop_solves_agree():
    """On a state above the size rule (a 5-point stencil on a 20 x 20 grid, where
    unrolling recomputes stages per read), the default stage loop and the forced
    unrolled steps give the same solution to rounding."""

    def field(t, u, args):
        lap = sum(jnp.roll(u, s, a) for s in (1, -1) for a in (0, 1)) - 4 * u
        return args * lap + u - u**3

    u0 = 0.3 * jr.normal(jr.PRNGKey(1), (20, 20))

    def solve(unroll):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            revdiffrax.Reversible(diffrax.Midpoint(), 0.5, unroll_stages=unroll),
            0.0,
            1.0,
            0.05,
            u0,
            args=0.2,
        ).ys

    assert not erk.unroll_stages(diffrax.Midpoint(), u0)
    assert jnp.allclose(solve(None), solve(True), rtol=1e-12, atol=1e-12)
