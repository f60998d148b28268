"""Hessian-vector products through `ReversibleAdjoint` (forward-over-reverse:
`jax.jvp` of `jax.grad`, and `jax.hessian`) against `diffrax.DirectAdjoint` through
the same solver, in float64; and the refusal of what stays unsupported."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
import revdiffrax
from benchmarks.hvp_problems import (
    ALF,
    cde_loss,
    hvp,
    ode_loss,
    PARAMS,
    pid,
    SAVEATS,
    sde_loss,
    STATIC,
    TANGENT,
)
from helpers import GRAD_RTOL, tree_rel_err


DIRECT = diffrax.DirectAdjoint()
REV = revdiffrax.ReversibleAdjoint()

SOLVERS = {
    "Reversible(Euler)": revdiffrax.Reversible(diffrax.Euler()),
    "Reversible(Midpoint)": revdiffrax.Reversible(diffrax.Midpoint()),
    "Reversible(Tsit5)": revdiffrax.Reversible(diffrax.Tsit5()),
    "ReversibleHeun": revdiffrax.ReversibleHeun(),
    "LeapfrogMidpoint": revdiffrax.LeapfrogMidpoint(),
    "AsynchronousLeapfrog": ALF,
    "SymmetricComposition(ALF, 4)": revdiffrax.SymmetricComposition(ALF, order=4),
}


def check_hvp(loss, params, tangent, *args, adjoint=REV):
    grad, product = hvp(loss, params, tangent, adjoint, *args)
    grad_ref, product_ref = hvp(loss, params, tangent, DIRECT, *args)
    assert tree_rel_err(grad, grad_ref) < GRAD_RTOL
    assert tree_rel_err(product, product_ref) < GRAD_RTOL
    # Not a trivially passing comparison: the product depends on every input.
    for leaf in jax.tree_util.tree_leaves(product):
        assert float(jnp.max(jnp.abs(leaf))) > 1e-6


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_hvp_every_solver_constant_steps(name):
    check_hvp(
        ode_loss, PARAMS, TANGENT, SOLVERS[name], diffrax.ConstantStepSize(),
        SAVEATS["ts"],
    )  # fmt: skip


# `SaveAt(t1)` and `SaveAt(steps)` as two `SubSaveAt`s of one solve: one compilation
# instead of two (diffrax turns every `SaveAt` into `SubSaveAt`s, so each mode takes
# the same path as on its own).
T1_AND_STEPS = diffrax.SaveAt(
    subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(steps=True)]
)


@pytest.mark.parametrize(
    "name, saveat, rtol",
    [
        ("Reversible(Tsit5)", "ts", 1e-8),
        ("Reversible(Midpoint)", "t1+steps", 1e-3),
        ("SymmetricComposition(ALF, 4)", "ts", 1e-4),
    ],
)
def test_hvp_adaptive_steps(name, saveat, rtol):
    saveat = T1_AND_STEPS if saveat == "t1+steps" else SAVEATS[saveat]
    check_hvp(ode_loss, PARAMS, TANGENT, SOLVERS[name], pid(rtol), saveat)


def test_hvp_constant_steps_saveat():
    check_hvp(
        ode_loss, PARAMS, TANGENT, SOLVERS["Reversible(Midpoint)"],
        diffrax.ConstantStepSize(), T1_AND_STEPS,
    )  # fmt: skip


def test_hvp_checkpoint_every():
    solver = revdiffrax.Reversible(diffrax.Heun(), coupling=0.9)
    adjoint = revdiffrax.ReversibleAdjoint(checkpoint_every=3)
    check_hvp(
        ode_loss, PARAMS, TANGENT, solver, pid(1e-3), SAVEATS["ts"], adjoint=adjoint
    )


@pytest.mark.parametrize(
    "solver",
    [revdiffrax.Reversible(diffrax.Heun()), revdiffrax.ReversibleHeun()],
    ids=["Reversible(Heun)", "ReversibleHeun"],
)
def test_hvp_sde(solver):
    params = (jnp.array([0.8, -0.5]), jnp.array(0.7))
    tangent = (jnp.array([0.3, 1.0]), jnp.array(-0.6))
    # The solvers need increments only: the cheaper Brownian motion to compile.
    key = jr.key(2, impl="unsafe_rbg")
    check_hvp(sde_loss, params, tangent, solver, diffrax.BrownianIncrement, key)


def test_hvp_cde_data_and_args():
    ts = jnp.linspace(0.0, 1.0, 6)
    xs = jnp.stack([ts, jnp.sin(6 * ts)], -1)
    tangent = (jr.normal(jr.PRNGKey(3), xs.shape), jnp.array(1.0))
    check_hvp(cde_loss, (xs, jnp.array(0.7)), tangent, SOLVERS["Reversible(Midpoint)"])


def test_hvp_under_vmap():
    """A batch of tangents and a batch of parameters."""
    solver, controller = SOLVERS["Reversible(Midpoint)"], pid(1e-3)
    tangents = jax.tree_util.tree_map(lambda x: jnp.stack([x, -2 * x, x**2]), TANGENT)
    params = jax.tree_util.tree_map(lambda x: jnp.stack([x, x, 1.1 * x]), PARAMS)

    def products(adjoint):
        def one(p, v):
            saveat = SAVEATS["ts"]
            return hvp(ode_loss, p, v, adjoint, solver, controller, saveat, 64)[1]

        return jax.vmap(one)(params, tangents)

    assert tree_rel_err(products(REV), products(DIRECT)) < GRAD_RTOL


def test_hessian_of_small_parameter_vector():
    """`jax.hessian` (`jacfwd` of `jacrev`) in (y0, args) of a PyTree-free loss."""
    mlp = eqx.combine(PARAMS, STATIC)[2]

    def loss(theta, adjoint):
        params = (theta[:2], theta[2], eqx.filter(mlp, eqx.is_inexact_array))
        return ode_loss(params, adjoint, SOLVERS["ReversibleHeun"],
                        diffrax.ConstantStepSize(), SAVEATS["t1"])  # fmt: skip

    theta = jnp.array([0.6, -0.4, 0.5])
    ours = jax.jit(jax.hessian(loss), static_argnums=1)(theta, REV)
    reference = jax.jit(jax.hessian(loss), static_argnums=1)(theta, DIRECT)
    assert ours.shape == (3, 3)
    assert tree_rel_err(ours, reference) < GRAD_RTOL
    assert float(jnp.max(jnp.abs(ours - ours.T))) < 1e-12


def _time_loss(times, adjoint):
    t1, dt0, ts = times
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: -a * y), SOLVERS["Reversible(Midpoint)"],
        0.0, t1, dt0, jnp.array([1.0, 2.0]), args=0.5, adjoint=adjoint,
        saveat=diffrax.SaveAt(ts=ts), max_steps=16,
    )  # fmt: skip
    assert sol.ys is not None
    return jnp.sum(sol.ys**2)


@pytest.mark.parametrize("which", ["t1", "dt0", "ts"])
def test_time_tangents_are_refused(which):
    times = (jnp.array(1.0), jnp.array(0.1), jnp.array([0.2, 0.5]))
    index = ["t1", "dt0", "ts"].index(which)
    tangent = tuple(jnp.ones_like(x) if i == index else jnp.zeros_like(x)
                    for i, x in enumerate(times))  # fmt: skip
    grad = jax.grad(_time_loss)
    # The product would be wrong, not merely unsupported: refused at trace time.
    with pytest.raises(NotImplementedError, match=r"t0.*t1.*dt0.*DirectAdjoint"):
        jax.jvp(lambda x: grad(x, REV), (times,), (tangent,))


def test_events_are_refused():
    def loss(y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -y), SOLVERS["Reversible(Midpoint)"],
            0.0, 5.0, 0.1, y0, adjoint=adjoint, max_steps=64,
            event=diffrax.Event(lambda t, y, a, **kwargs: y[0] < 0.5),
        )  # fmt: skip
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    y0 = jnp.array([1.0, 2.0])
    grad = jax.grad(loss)
    with pytest.raises(NotImplementedError, match=r"event.*DirectAdjoint"):
        jax.jvp(lambda y: grad(y, REV), (y0,), (y0,))


def test_accuracy_benchmark_quick(tmp_path):
    """`benchmarks/hvp_accuracy.py` (the accuracy table of issue 23) in its quick
    mode: one family, one configuration."""
    from benchmarks import hvp_accuracy

    (result,) = hvp_accuracy.main(["--quick", "--out", str(tmp_path)])
    assert result.status == "ok"
    assert max(result.norm, result.leafwise, result.grad) < GRAD_RTOL
    report = (tmp_path / f"hvp_accuracy_{jax.default_backend()}.md").read_text()
    assert "| Reversible(Midpoint) | 1 |" in report
