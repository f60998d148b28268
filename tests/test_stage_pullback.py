"""The backward pass of `Reversible` over explicit Runge-Kutta bases, one stage at a
time (`revdiffrax._solver.erk._StagePullback`): exact gradients, when it is chosen,
and the compiled memory it saves."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
import revdiffrax
import revdiffrax._solver.erk as erk
from helpers import GRAD_RTOL, RCA_ALL_STEPS, tree_rel_err
from revdiffrax._batching import enclosing_vmap_size


def _vector_field(t, y, args):
    a, b = args
    return jnp.tanh(a @ y) * jnp.cos(t) + b


def _loss(args, y0, t0, t1, adjoint, solver, saveat, controller):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vector_field),
        solver,
        t0,
        t1,
        0.05,
        y0,
        args=args,
        saveat=saveat,
        adjoint=adjoint,
        stepsize_controller=controller,
        max_steps=256,
    )
    return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]


# Dense outputs (`SaveAt(t1, ts)`, constant steps) and none (`SaveAt(t1)`, PID).
_CASES = {
    "ts": (
        diffrax.SaveAt(t1=True, ts=jnp.linspace(0.1, 0.9, 4)),
        diffrax.ConstantStepSize(),
    ),
    "pid": (diffrax.SaveAt(t1=True), diffrax.PIDController(rtol=1e-5, atol=1e-5)),
}


@pytest.mark.parametrize(
    "base", [diffrax.Midpoint(), diffrax.Tsit5(), diffrax.Dopri5()]
)
def test_stage_pullback_gradients(base, monkeypatch):
    """Forced on a small problem (limit -1), the stage-at-a-time pullback gives the
    gradient of checkpointing through the same solver, times included: with dense
    outputs (`SaveAt(t1, ts)`, constant steps) and without (`SaveAt(t1)`, PID).
    Both cases are solves of one jitted loss, each with its own copy of the
    arguments (so each case's gradient is compared on its own): one compilation per
    adjoint instead of two eager ones per case."""
    monkeypatch.setattr(erk, "UNROLLED_RESIDUALS_LIMIT", -1)
    key_a, key_b = jr.split(jr.PRNGKey(0))
    args = (0.5 * jr.normal(key_a, (3, 3)), 0.1 * jr.normal(key_b, (3,)))
    y0 = jnp.array([1.0, 0.5, -0.3])
    solver = revdiffrax.Reversible(base)

    def both(primals, adjoint):
        return sum(
            _loss(*primals[case], adjoint, solver, *_CASES[case]) for case in _CASES
        )

    # t0 and t1 enter the gradient only where they are differentiated.
    primals = {case: (args, y0, 0.0, 1.0) for case in _CASES}
    grad = jax.jit(jax.grad(both), static_argnums=1)
    ours = grad(primals, revdiffrax.ReversibleAdjoint())
    ref = grad(primals, RCA_ALL_STEPS)
    for case in _CASES:
        assert tree_rel_err(ours[case], ref[case]) < GRAD_RTOL, case


def test_stage_pullback_chosen_for_large_residuals():
    """The stage pullback is chosen by the size of one stage's residuals: a batched
    MLP leaves hundreds of KiB, a 3-d linear field a few bytes."""
    mlp = eqx.nn.MLP(8, 8, 64, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    big = diffrax.ODETerm(lambda t, y, args: jax.vmap(args)(y))
    small = diffrax.ODETerm(lambda t, y, args: args @ y)
    solver = diffrax.Tsit5()
    t0, t1 = jnp.asarray(0.0), jnp.asarray(0.1)
    assert erk.use_stage_pullback(solver, big, t0, t1, jnp.zeros((256, 8)), mlp)
    assert not erk.use_stage_pullback(solver, small, t0, t1, jnp.ones(3), jnp.eye(3))
    # Not for bases that are not plain explicit Runge-Kutta methods, nor when the user
    # asked for diffrax's stage loop.
    scan = diffrax.Tsit5(scan_kind="lax")
    assert not erk.use_stage_pullback(scan, big, t0, t1, jnp.zeros((256, 8)), mlp)
    heun = diffrax.ReversibleHeun()
    assert not erk.use_stage_pullback(heun, big, t0, t1, jnp.zeros((256, 8)), mlp)
    # `Reversible(stage_pullback=...)` overrides the size rule.
    x = jnp.ones(3)
    assert erk.use_stage_pullback(solver, small, t0, t1, x, jnp.eye(3), True)
    assert not erk.use_stage_pullback(solver, big, t0, t1, x, mlp, False)


@pytest.mark.parametrize("base", [diffrax.Midpoint(), diffrax.Dopri5()])
def test_compiled_memory_within_checkpointing(base):
    """The compiled temp memory of a `ReversibleAdjoint` gradient on a batched MLP
    field is within 1.25x that of `RecursiveCheckpointAdjoint(checkpoints=2)` through
    the same solver (it was 1.9x with Midpoint, 6x with Dopri5, before the pullback
    was sequenced). Compile only: nothing is run."""
    mlp = eqx.nn.MLP(8, 8, 64, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    term = diffrax.ODETerm(lambda t, y, p: jax.vmap(eqx.combine(p, static))(y))
    y0 = jnp.ones((256, 8))
    solver = revdiffrax.Reversible(base)

    def temp_bytes(adjoint):
        def loss(p):
            sol = diffrax.diffeqsolve(
                term,
                solver,
                0.0,
                1.0,
                0.05,
                y0,
                args=p,
                adjoint=adjoint,
                max_steps=20,
            )
            return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp_bytes(revdiffrax.ReversibleAdjoint(drift_tol=None))
    ref = temp_bytes(diffrax.RecursiveCheckpointAdjoint(checkpoints=2))
    assert ours <= 1.25 * ref, (ours, ref)


def test_enclosing_vmap_size():
    """The backward pass reads the sizes of the `vmap`s around it from JAX's trace
    stack: their product, 1 outside `vmap`."""
    sizes = []

    def record(x):
        sizes.append(enclosing_vmap_size())
        return x

    record(jnp.zeros(2))
    jax.vmap(record)(jnp.zeros((3, 2)))
    jax.jit(jax.vmap(jax.vmap(record)))(jnp.zeros((3, 5, 2)))
    assert sizes == [1, 3, 15]


def test_stage_pullback_chosen_under_vmap():
    """diffrax's per-sample style: one small solve, `jax.vmap`ped over a batch of 256
    initial states. One sample's stage leaves far less than the limit, the batch's
    far more, and the decision counts the batch: with the defaults the compiled
    temp memory of the gradient is below `stage_pullback=False`'s, and below that of
    diffrax's default adjoint through the base solver (before: the default chose
    the whole-step pullback, and the drift check copied the per-sample cotangents,
    1.8x the memory of `RecursiveCheckpointAdjoint()` here, 3.6x on the issue's
    CNF). Compile only: nothing is run."""
    mlp = eqx.nn.MLP(4, 4, 32, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    term = diffrax.ODETerm(lambda t, y, p: eqx.combine(p, static)(y))
    y0s = jnp.ones((256, 4))
    t0, t1 = jnp.asarray(0.0), jnp.asarray(0.1)
    per_sample = erk.stage_residual_bytes(term, t0, t1, y0s[0], params)
    assert per_sample < erk.UNROLLED_RESIDUALS_LIMIT < 256 * per_sample

    def temp_bytes(adjoint, solver):
        def one(p, y0):
            sol = diffrax.diffeqsolve(
                term,
                solver,
                1.0,
                0.0,
                -0.1,
                y0,
                args=p,
                adjoint=adjoint,
                max_steps=16,
            )
            return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]

        def loss(p, y0s):
            return jnp.mean(jax.vmap(one, in_axes=(None, 0))(p, y0s))

        compiled = jax.jit(jax.grad(loss)).lower(params, y0s).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    adjoint = revdiffrax.ReversibleAdjoint()
    ours = temp_bytes(adjoint, revdiffrax.Reversible(diffrax.Tsit5()))
    whole_step = temp_bytes(
        adjoint, revdiffrax.Reversible(diffrax.Tsit5(), stage_pullback=False)
    )
    rca = temp_bytes(diffrax.RecursiveCheckpointAdjoint(), diffrax.Tsit5())
    assert ours < whole_step, (ours, whole_step)
    assert ours <= rca, (ours, rca)


def test_typed_prng_key_brownian_motion():
    """A `VirtualBrownianTree` built from a new-style typed key (`jax.random.key`)
    holds a key array, which sizing the stage residuals must skip (it raised
    `TypeError: Cannot interpret 'key<fry>' as a data type`)."""
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, 1e-3, (2,), key=jr.key(0))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, a: -a * y),
        diffrax.ControlTerm(lambda t, y, a: 0.1 * jnp.diag(y), bm),
    )

    def loss(a, adjoint, solver):
        sol = diffrax.diffeqsolve(
            terms, solver, 0.0, 1.0, 0.05, jnp.array([1.0, 2.0]), args=a,
            adjoint=adjoint, max_steps=64,
        )  # fmt: skip
        return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]

    solver = revdiffrax.Reversible(diffrax.Heun())
    a = jnp.asarray(0.7)
    grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))  # one compile each
    got = grad(a, revdiffrax.ReversibleAdjoint(), solver)
    want = grad(a, RCA_ALL_STEPS, solver)
    assert jnp.allclose(got, want, rtol=GRAD_RTOL, atol=0)
