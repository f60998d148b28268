"""`ReversibleAdjoint(checkpoint_every=k)`: the checkpointed-reversible hybrid."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import revdiffrax
from helpers import tree_rel_err


def _mlp_loss(solver, controller, saveat_kind):
    """A non-chaotic neural ODE with a PyTree state, adaptive steps and any SaveAt."""
    ts = jnp.array([0.13, 0.4, 0.41, 0.9, 1.5])
    if saveat_kind == "ts":
        saveat = diffrax.SaveAt(ts=ts)
    elif saveat_kind == "steps":
        saveat = diffrax.SaveAt(steps=True)
    else:
        saveat = diffrax.SaveAt(
            subs=[diffrax.SubSaveAt(ts=ts), diffrax.SubSaveAt(steps=3, t1=True)]
        )

    def vector_field(t, y, model):
        out = model(jnp.concatenate([y["a"], y["b"]]))
        return {"a": out[:2] - 0.3 * y["a"], "b": jnp.tanh(out[2:]) - 0.1 * y["b"]}

    def loss(model, y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            solver,
            0.0,
            1.5,
            0.05,
            y0,
            args=model,
            saveat=saveat,
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=256,
        )
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(sol.ys))

    return loss


_y0 = {"a": jnp.array([0.5, -0.3]), "b": jnp.array([0.2])}


@pytest.mark.parametrize(
    "solver, controller, saveat_kind",
    [
        (
            revdiffrax.Reversible(diffrax.Tsit5(), coupling=0.9),
            diffrax.PIDController(rtol=1e-6, atol=1e-6),
            "ts",
        ),
        (revdiffrax.Reversible(diffrax.Bosh3()), diffrax.ConstantStepSize(), "subs"),
        (
            revdiffrax.ReversibleHeun(),
            diffrax.PIDController(rtol=1e-4, atol=1e-4),
            "steps",
        ),
    ],
)
def test_every_k_gives_the_same_gradient_float64(solver, controller, saveat_kind):
    model = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    loss = _mlp_loss(solver, controller, saveat_kind)

    @eqx.filter_jit
    def grads(adjoints):
        # One solve per adjoint, each with its own copy of (model, y0): one
        # compilation for several adjoints, each gradient on its own.
        def total(copies):
            return sum(loss(m, y0, a) for (m, y0), a in zip(copies, adjoints))

        return eqx.filter_grad(total)([(model, _y0)] * len(adjoints))

    # (`k=None` itself is checked against RecursiveCheckpointAdjoint in
    # test_adjoint.py.)
    (reference,) = grads((revdiffrax.ReversibleAdjoint(),))
    ks = (1, 7)
    outs = grads(tuple(revdiffrax.ReversibleAdjoint(checkpoint_every=k) for k in ks))
    for k, out in zip(ks, outs):
        assert tree_rel_err(out, reference) < 1e-10, k


def test_semi_implicit_euler_tuple_state():
    """A solver whose state and terms are tuples (Hamiltonian split)."""

    def loss(params, adjoint):
        terms = (
            diffrax.ODETerm(lambda t, p, a: p / a[1]),
            diffrax.ODETerm(lambda t, q, a: -a[0] * jnp.sin(q)),
        )
        sol = diffrax.diffeqsolve(
            terms,
            revdiffrax.SemiImplicitEuler(),
            0.0,
            3.0,
            0.01,
            (jnp.array([1.0]), jnp.array([0.0])),
            args=params,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.5, 3.0, 6)),
            adjoint=adjoint,
            max_steps=300,
        )
        return jnp.sum(sol.ys[0] ** 2) + jnp.sum(sol.ys[1])

    params = (jnp.array(2.0), jnp.array(1.3))
    ref = jax.jit(jax.grad(loss), static_argnums=1)(
        params, diffrax.RecursiveCheckpointAdjoint()
    )
    for k in (7, 100):
        out = jax.jit(jax.grad(loss), static_argnums=1)(
            params, revdiffrax.ReversibleAdjoint(checkpoint_every=k)
        )
        assert tree_rel_err(out, ref) < 1e-10


def test_sde_and_vmap_with_different_step_counts():
    """Checkpoints live at different indices for different batch elements; an SDE's
    Brownian path is re-evaluated, never stored."""
    # A PRNG cheaper to compile than the default threefry (the tree's evaluations
    # dominate the compile time).
    key = jr.key(3, impl="unsafe_rbg")
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=key)

    def loss(y0, theta, adjoint):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: -a * y),
            diffrax.ControlTerm(lambda t, y, a: 0.2 * jnp.diag(jnp.cos(y)), bm),
        )
        sol = diffrax.diffeqsolve(
            terms,
            revdiffrax.Reversible(diffrax.Heun(), coupling=0.99),
            0.0,
            1.0,
            None,
            y0,
            args=theta,
            saveat=diffrax.SaveAt(ts=jnp.array([0.3, 0.7, 1.0])),
            stepsize_controller=diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, 41)),
            adjoint=adjoint,
            max_steps=64,
        )
        return jnp.sum(sol.ys**2)

    y0s = jnp.array([[1.0, 0.5], [-0.2, 2.0], [0.3, 0.3]])
    thetas = jnp.array([0.5, 1.0, 2.0])

    def batched(adjoint):
        g = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, 0, None))
        return jax.jit(g, static_argnums=2)(y0s, thetas, adjoint)

    ref = batched(diffrax.RecursiveCheckpointAdjoint())
    out = batched(revdiffrax.ReversibleAdjoint(checkpoint_every=6))
    assert tree_rel_err(out, ref) < 1e-10

    # Adaptive steps under vmap: each element takes its own number of steps.
    def ode_loss(y0, theta, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -a * y * (1 + y**2)),
            revdiffrax.Reversible(diffrax.Bosh3()),
            0.0,
            2.0,
            0.1,
            y0,
            args=theta,
            stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-7),
            adjoint=adjoint,
            max_steps=512,
        )
        return jnp.sum(sol.ys**2), sol.stats["num_accepted_steps"]

    def batched_ode(adjoint):
        g = jax.vmap(
            jax.grad(ode_loss, argnums=(0, 1), has_aux=True), in_axes=(0, 0, None)
        )
        return jax.jit(g, static_argnums=2)(y0s, thetas, adjoint)

    ref, steps = batched_ode(diffrax.RecursiveCheckpointAdjoint())
    assert len(set(np.asarray(steps).ravel().tolist())) > 1
    out, _ = batched_ode(revdiffrax.ReversibleAdjoint(checkpoint_every=5))
    assert tree_rel_err(out, ref) < 1e-10


def _decay_loss(dtype, coupling, n_steps):
    """y' = -y over `n_steps` steps with `Reversible(Midpoint)`: every step amplifies
    reconstruction errors by about 1/coupling."""

    def loss(theta, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -a * y),
            revdiffrax.Reversible(diffrax.Midpoint(), coupling=coupling),
            jnp.asarray(0.0, dtype),
            jnp.asarray(5.0, dtype),
            jnp.asarray(5.0 / n_steps, dtype),
            jnp.array([1.0, -2.0], dtype),
            args=theta,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0.5, 5.0, 10).astype(dtype)),
            adjoint=adjoint,
            max_steps=n_steps,
        )
        return jnp.sum(sol.ys**2)

    return loss


def test_float32_drift_is_reduced():
    n_steps = 400
    theta32 = jnp.asarray(1.0, jnp.float32)
    loss32 = _decay_loss(jnp.float32, 0.95, n_steps)
    loss64 = _decay_loss(jnp.float64, 0.95, n_steps)
    reference = jax.jit(jax.grad(loss64), static_argnums=1)(
        jnp.asarray(1.0), diffrax.RecursiveCheckpointAdjoint()
    )
    grad32 = jax.jit(jax.grad(loss32), static_argnums=1)

    def run(k):
        drifts = []
        adjoint = revdiffrax.ReversibleAdjoint(
            checkpoint_every=k, drift_callback=drifts.append
        )
        g = grad32(theta32, adjoint)
        jax.effects_barrier()
        assert g.dtype == jnp.float32
        error = abs(float(g) - float(reference)) / abs(float(reference))
        return error, float(drifts[-1])

    rca_error = abs(
        float(grad32(theta32, diffrax.RecursiveCheckpointAdjoint())) - float(reference)
    ) / abs(float(reference))
    error_none, drift_none = run(None)
    error_10, drift_10 = run(10)
    # 0.95^-400 ~ 8e8: pure reconstruction loses every digit of float32.
    assert error_none > 1e-2
    assert drift_none > 1e-2
    # Ten steps amplify by 0.95^-10 ~ 1.7 only.
    assert error_10 < error_none / 1e3
    assert drift_10 < 1e-5
    assert error_10 < 10 * max(rca_error, 1e-7)


def test_memory_grows_like_n_over_k():
    width = 512

    def temp_bytes(n_steps, k):
        def loss(y0):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, a: -y),
                revdiffrax.Reversible(diffrax.Euler()),
                0.0,
                1.0,
                1.0 / n_steps,
                y0,
                adjoint=revdiffrax.ReversibleAdjoint(checkpoint_every=k),
                max_steps=n_steps,
            )
            return jnp.sum(sol.ys)

        lowered = jax.jit(jax.grad(loss)).lower(jnp.ones(width))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    # Each checkpoint holds (y, z): 2 * width float64s.
    per_checkpoint = 2 * width * 8
    base = {n: temp_bytes(n, None) for n in (400, 1600)}
    for n in (400, 1600):
        for k in (4, 40):
            extra = temp_bytes(n, k) - base[n]
            expected = (n // k) * per_checkpoint
            assert abs(extra - expected) < 0.1 * expected + 16 * per_checkpoint, (
                n,
                k,
                extra,
                expected,
            )
    # Pure reconstruction: the only O(N) part is the 8-byte step-time buffer.
    assert base[1600] - base[400] < 1200 * 8 + per_checkpoint


def test_drift_is_reported_per_segment_and_tol_raises():
    loss = _decay_loss(jnp.float64, 0.9, 300)
    theta = jnp.asarray(1.0)
    drifts = []
    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compilation per adjoint
    for k in (None, 150, 30):
        adjoint = revdiffrax.ReversibleAdjoint(
            checkpoint_every=k, drift_callback=drifts.append
        )
        grad(theta, adjoint)
    jax.effects_barrier()
    d_none, d_150, d_30 = (float(d) for d in drifts)
    # Drift grows like coupling^-(segment length).
    assert d_none > 1e6 * d_30
    assert d_150 > 100 * d_30
    assert d_30 < 1e-12

    with pytest.raises(Exception, match="checkpoint_every"):
        jax.block_until_ready(
            jax.grad(loss)(theta, revdiffrax.ReversibleAdjoint(drift_tol=1e-8))
        )
    # The same tolerance is met once checkpoints bound the drift.
    g = grad(theta, revdiffrax.ReversibleAdjoint(drift_tol=1e-8, checkpoint_every=30))
    assert jnp.isfinite(g)

    # An overflowing reconstruction (0.5^-400 in float32) gives a NaN drift, which
    # must raise too.
    loss_nan = _decay_loss(jnp.float32, 0.5, 400)
    with pytest.raises(Exception, match="drift_tol"):
        jax.block_until_ready(
            jax.grad(loss_nan)(
                jnp.asarray(1.0, jnp.float32),
                revdiffrax.ReversibleAdjoint(drift_tol=1e-3),
            )
        )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_checkpoint_every(bad):
    with pytest.raises(ValueError, match="positive int"):
        revdiffrax.ReversibleAdjoint(checkpoint_every=bad)


def test_choose_checkpoint_every(capsys):
    loss = _decay_loss(jnp.float32, 0.9, 500)

    def user_loss(adjoint, theta):
        return loss(theta, adjoint)

    k, rows = revdiffrax.choose_checkpoint_every(
        user_loss, jnp.asarray(1.0, jnp.float32), candidates=(None, 100, 10)
    )
    printed = capsys.readouterr().out
    assert "chosen" in printed
    by_k = {row.checkpoint_every: row for row in rows}
    # 0.9^-100 ~ 4e4 is too much for float32; 0.9^-10 ~ 2.9 is fine.
    assert by_k[None].drift > 1e-2
    assert by_k[100].drift > 100 * by_k[10].drift
    assert k == 10
    assert all(row.seconds > 0 for row in rows)
    assert by_k[10].temp_bytes >= by_k[None].temp_bytes

    # In float64 a long segment is fine: the least memory wins.
    loss64 = _decay_loss(jnp.float64, 0.999, 200)
    k64, _ = revdiffrax.choose_checkpoint_every(
        lambda adjoint, theta: loss64(theta, adjoint),
        jnp.asarray(1.0),
        candidates=(10, None, 100),
        verbose=False,
    )
    assert k64 is None
