"""`ReversibleAdjoint(checkpoint_every=k)`: the checkpointed-reversible hybrid."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import revdiffrax
from helpers import RCA_ALL_STEPS, tree_rel_err


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


def _grads_per_adjoint(loss, primals, adjoints):
    """The gradient of `loss(primals, adjoint)` with respect to `primals`, for every
    adjoint of `adjoints`, in one jitted program: each adjoint's solve gets its own
    copy of `primals`, so each gradient is that adjoint's alone (one compilation
    instead of one per adjoint)."""

    @eqx.filter_jit
    def grads(copies):
        def total(copies):
            return sum(loss(c, a) for c, a in zip(copies, adjoints, strict=True))

        return eqx.filter_grad(total)(copies)

    return grads([primals] * len(adjoints))


# (solver, controller, SaveAt kind)
EVERY_K_CASES = {
    "Reversible(Tsit5, 0.9)-PID-ts": (
        revdiffrax.Reversible(diffrax.Tsit5(), coupling=0.9),
        diffrax.PIDController(rtol=1e-6, atol=1e-6),
        "ts",
    ),
    "Reversible(Bosh3)-constant-subs": (
        revdiffrax.Reversible(diffrax.Bosh3()),
        diffrax.ConstantStepSize(),
        "subs",
    ),
    "ReversibleHeun-PID-steps": (
        revdiffrax.ReversibleHeun(),
        diffrax.PIDController(rtol=1e-4, atol=1e-4),
        "steps",
    ),
}


def test_every_k_gives_the_same_gradient_float64():
    """k = 1 and k = 7 give the gradient of k = None (pure reconstruction). Every
    case's and every k's solve is a term of one jitted loss with its own copy of
    (model, y0): one compilation, each gradient compared on its own."""
    model = eqx.nn.MLP(3, 3, 8, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    losses = {name: _mlp_loss(*case) for name, case in EVERY_K_CASES.items()}

    def total(primals, adjoint):
        return sum(loss(*primals[name], adjoint) for name, loss in losses.items())

    # (`k=None` itself is checked against RecursiveCheckpointAdjoint in
    # test_adjoint.py.)
    ks = (None, 1, 7)
    adjoints = tuple(revdiffrax.ReversibleAdjoint(checkpoint_every=k) for k in ks)
    primals = {name: (model, _y0) for name in EVERY_K_CASES}
    reference, *outs = _grads_per_adjoint(total, primals, adjoints)
    for k, out in zip(ks[1:], outs):
        for name in EVERY_K_CASES:
            assert tree_rel_err(out[name], reference[name]) < 1e-10, (name, k)


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
    ks = (7, 100)
    adjoints = (RCA_ALL_STEPS,) + tuple(
        revdiffrax.ReversibleAdjoint(checkpoint_every=k) for k in ks
    )
    ref, *outs = _grads_per_adjoint(loss, params, adjoints)  # one compilation
    for k, out in zip(ks, outs):
        assert tree_rel_err(out, ref) < 1e-10, k


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

    ref = batched(RCA_ALL_STEPS)
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

    ref, steps = batched_ode(RCA_ALL_STEPS)
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
    loss32 = _decay_loss(jnp.float32, 0.95, n_steps)
    loss64 = _decay_loss(jnp.float64, 0.95, n_steps)
    rca = RCA_ALL_STEPS
    drifts = {"k=None": [], "k=10": []}
    # The float64 reference and the float32 gradients, each solve with its own
    # theta, in one jitted program.
    cases = {"reference": (loss64, rca), "rca": (loss32, rca)}
    for name, k in (("k=None", None), ("k=10", 10)):
        adjoint = revdiffrax.ReversibleAdjoint(
            checkpoint_every=k, drift_callback=drifts[name].append
        )
        cases[name] = (loss32, adjoint)

    def total(thetas, _):
        return sum(loss(thetas[name], a) for name, (loss, a) in cases.items())

    thetas = {name: jnp.asarray(1.0, jnp.float32) for name in cases}
    thetas["reference"] = jnp.asarray(1.0)
    (grads,) = _grads_per_adjoint(total, thetas, (None,))
    jax.effects_barrier()
    reference = float(grads["reference"])

    def error(name):
        assert grads[name].dtype == jnp.float32
        return abs(float(grads[name]) - reference) / abs(reference)

    rca_error = error("rca")
    error_none, drift_none = error("k=None"), float(drifts["k=None"][-1])
    error_10, drift_10 = error("k=10"), float(drifts["k=10"][-1])
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
    drifts = {k: [] for k in (None, 150, 30)}
    # k = 30 also with the tolerance that k = None fails below: the same tolerance
    # is met once checkpoints bound the drift (it raises otherwise).
    adjoints = tuple(
        revdiffrax.ReversibleAdjoint(
            checkpoint_every=k,
            drift_callback=d.append,
            drift_tol=1e-8 if k == 30 else "auto",
        )
        for k, d in drifts.items()
    )
    grads = _grads_per_adjoint(loss, theta, adjoints)  # one compilation
    jax.effects_barrier()
    assert all(jnp.isfinite(g) for g in grads)
    d_none, d_150, d_30 = (float(d[-1]) for d in drifts.values())
    # Drift grows like coupling^-(segment length).
    assert d_none > 1e6 * d_30
    assert d_150 > 100 * d_30
    assert d_30 < 1e-12

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    with pytest.raises(Exception, match="checkpoint_every"):
        jax.block_until_ready(grad(theta, revdiffrax.ReversibleAdjoint(drift_tol=1e-8)))

    # An overflowing reconstruction (0.5^-400 in float32) gives a NaN drift, which
    # must raise too.
    loss_nan = _decay_loss(jnp.float32, 0.5, 400)
    with pytest.raises(Exception, match="drift_tol"):
        jax.block_until_ready(
            jax.jit(jax.grad(loss_nan), static_argnums=1)(
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
