"""Integrated state components, `Reversible(base, integrated=...)`: exact gradients,
exact reversal, the same forward solution as the base solver for them, fewer
evaluations of their vector field, and clear errors for declarations the vector
field contradicts."""

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
import revdiffrax
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err


def _field(t, y, args):
    """dx/dt depends on x only; dq/dt (a running cost) on x only."""
    x, q = y
    a, b = args
    dx = jnp.tanh(a @ x) * jnp.cos(t) + b
    return dx, jnp.sum(jnp.sin(x) ** 2) * (1 + t)


def _problem():
    key_a, key_b = jr.split(jr.PRNGKey(0))
    args = (0.5 * jr.normal(key_a, (3, 3)), 0.1 * jr.normal(key_b, (3,)))
    return args, (jnp.array([1.0, 0.5, -0.3]), jnp.array(0.2))


def _solve(args, y0, solver, adjoint, saveat, controller, field=_field):
    # None: diffrax's defaults.
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
    saveat = diffrax.SaveAt(t1=True) if saveat is None else saveat
    controller = diffrax.ConstantStepSize() if controller is None else controller
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
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


def _loss(args, y0, solver, adjoint, saveat, controller):
    x, q = _solve(args, y0, solver, adjoint, saveat, controller).ys  # pyright: ignore
    return jnp.sum(x**2) + jnp.sum(q**2)


# (base, SaveAt, controller): final value, dense output (`ts`), adaptive steps.
GRADIENT_CASES = {
    "Midpoint-t1": (diffrax.Midpoint(), None, None),
    "Tsit5-ts": (diffrax.Tsit5(), diffrax.SaveAt(ts=jnp.linspace(0.1, 0.9, 4)), None),
    "Tsit5-pid": (
        diffrax.Tsit5(),
        None,
        diffrax.PIDController(rtol=1e-5, atol=1e-5),
    ),
    "Euler-t1": (diffrax.Euler(), None, None),
}


def test_gradients_equal_checkpointing():
    """Through the same solver, `ReversibleAdjoint` gives checkpointing's gradient
    with respect to the parameters and both components of y0. Every case's solve is
    a term of one jitted loss, with its own copy of the inputs, so that each case's
    gradient is compared on its own: one compilation per adjoint."""
    args, y0 = _problem()

    def total(inputs, adjoint):
        return sum(
            _loss(
                *inputs[name],
                revdiffrax.Reversible(base, integrated=(False, True)),
                adjoint,
                saveat,
                controller,
            )
            for name, (base, saveat, controller) in GRADIENT_CASES.items()
        )

    inputs = {name: (args, y0) for name in GRADIENT_CASES}
    grad = jax.jit(jax.grad(total), static_argnums=1)
    ours = grad(inputs, revdiffrax.ReversibleAdjoint())
    ref = grad(inputs, RCA_ALL_STEPS)
    for name in GRADIENT_CASES:
        assert tree_rel_err(ours[name], ref[name]) < GRAD_RTOL, name


def test_stage_pullback_gradients(monkeypatch):
    """The same with the stage-at-a-time pullback (forced), where the backward base
    step evaluates the dynamic stages only."""
    import revdiffrax._solver.erk as erk

    monkeypatch.setattr(erk, "UNROLLED_RESIDUALS_LIMIT", -1)
    args, y0 = _problem()
    solver = revdiffrax.Reversible(diffrax.Dopri5(), integrated=(False, True))
    saveat = diffrax.SaveAt(ts=jnp.linspace(0.1, 0.9, 4))
    controller = diffrax.ConstantStepSize()

    def loss(args, y0, adjoint):
        return _loss(args, y0, solver, adjoint, saveat, controller)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    ours = grad(args, y0, revdiffrax.ReversibleAdjoint())
    ref = grad(args, y0, RCA_ALL_STEPS)
    assert tree_rel_err(ours, ref) < GRAD_RTOL


def test_forward_and_reversal():
    """The integrated component is q_n + the base increment from z_n (no coupling),
    so the dynamic component is as without `integrated`; one step undone by
    `backward_step` returns the state exactly (rounding only)."""
    args, y0 = _problem()
    base = diffrax.Tsit5()
    coupled = _solve(args, y0, revdiffrax.Reversible(base), None, None, None)
    split = revdiffrax.Reversible(base, integrated=(False, True))
    ours = _solve(args, y0, split, None, None, None)
    plain = _solve(args, y0, base, None, None, None)
    assert jnp.allclose(ours.ys[0], coupled.ys[0], rtol=0, atol=1e-14)  # pyright: ignore
    # 20 steps of Tsit5 at h = 0.05: q agrees with the base solver's to its accuracy.
    assert abs(float(ours.ys[1][0] - plain.ys[1][0])) < 1e-7  # pyright: ignore

    term = diffrax.ODETerm(_field)
    state = split.init(term, 0.0, 0.1, y0, args)
    assert float(state[0][1]) == 0.0  # z does not carry q
    y1, _, _, state1, _ = split.step(term, 0.0, 0.1, y0, args, state, False)
    back, _, state0, _ = split.backward_step(term, 0.0, 0.1, y1, args, state1, False)
    assert tree_rel_err(back, y0) < 1e-15
    assert tree_rel_err(state0[0][0], state[0][0]) < 1e-15


def _expensive_field(t, y, args):
    """q's derivative costs far more than x's (like a CNF's exact trace)."""
    x, q = y
    a, _ = args
    h = jnp.tanh(x[:, None] * jnp.tile(a, (1, 40)))  # (3, 120)
    return -x + 0.1 * jnp.tanh(a @ x), jnp.sum(jnp.tanh(h.T @ h))


def test_integrated_vector_field_evaluated_once():
    """XLA's compiled flop count of the forward solve drops when q is integrated:
    its vector field runs in the forward base step only (once, not twice)."""
    args, y0 = _problem()

    def flops(solver):
        def final(a):
            return _solve(a, y0, solver, None, None, None, field=_expensive_field).ys

        cost = jax.jit(final).lower(args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    coupled = flops(revdiffrax.Reversible(diffrax.Midpoint()))
    split = flops(revdiffrax.Reversible(diffrax.Midpoint(), integrated=(False, True)))
    assert split < 0.6 * coupled, (split, coupled)


def test_refused_when_the_field_reads_an_integrated_component():
    args, y0 = _problem()

    def reads_q(t, y, args):
        x, q = y
        return -x * q, jnp.sum(x**2)

    solver = revdiffrax.Reversible(diffrax.Midpoint(), integrated=(False, True))
    with pytest.raises(ValueError, match="vector field reads them"):
        _solve(args, y0, solver, None, None, None, field=reads_q)


def test_bad_declarations_refused():
    args, y0 = _problem()
    with pytest.raises(ValueError, match="prefix"):
        solver = revdiffrax.Reversible(diffrax.Midpoint(), integrated=(False,))
        _solve(args, y0, solver, None, None, None)
    with pytest.raises(ValueError, match="some must be dynamic"):
        solver = revdiffrax.Reversible(diffrax.Midpoint(), integrated=True)
        _solve(args, y0, solver, None, None, None)
    with pytest.raises(ValueError, match="scan_kind"):
        base = diffrax.Tsit5(scan_kind="lax")
        solver = revdiffrax.Reversible(base, integrated=(False, True))
        _solve(args, y0, solver, None, None, None)
