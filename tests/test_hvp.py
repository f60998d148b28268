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


# `SaveAt(t1)` and `SaveAt(steps)` as two `SubSaveAt`s of one solve: one compilation
# instead of two (diffrax turns every `SaveAt` into `SubSaveAt`s, so each mode takes
# the same path as on its own).
T1_AND_STEPS = diffrax.SaveAt(
    subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(steps=True)]
)


def check_hvps(loss, params, tangent, cases):
    """For each case `name: (config, adjoint)`, the gradient of `loss(params,
    adjoint, *config)` and its derivative along `tangent` against `DirectAdjoint`'s.
    Every case and both adjoints are one jitted program (one compilation instead of
    two per case), compared case by case; the message names every failing case."""

    @jax.jit
    def run(p, v):
        return {
            name: (hvp(loss, p, v, adjoint, *config), hvp(loss, p, v, DIRECT, *config))
            for name, (config, adjoint) in cases.items()
        }

    failed = []
    for name, ((grad, product), (grad_ref, product_ref)) in run(
        params, tangent
    ).items():
        grad_err = tree_rel_err(grad, grad_ref)
        product_err = tree_rel_err(product, product_ref)
        if not max(grad_err, product_err) < GRAD_RTOL:
            failed.append((name, grad_err, product_err))
        # Not a trivially passing comparison: the product depends on every input.
        for leaf in jax.tree_util.tree_leaves(product):
            if not float(jnp.max(jnp.abs(leaf))) > 1e-6:
                failed.append((name, "a zero product leaf"))
    assert not failed, failed


def check_hvp(loss, params, tangent, *config, adjoint=REV):
    check_hvps(loss, params, tangent, {"": (config, adjoint)})


# Two groups (the composition, of 4 ALF steps per step, is the largest program),
# each compiled as one program.
CONSTANT_STEP_GROUPS = {
    "one-step": [k for k in sorted(SOLVERS) if "Composition" not in k],
    "composition": [k for k in sorted(SOLVERS) if "Composition" in k],
}


@pytest.mark.parametrize("group", list(CONSTANT_STEP_GROUPS))
def test_hvp_every_solver_constant_steps(group):
    config = (diffrax.ConstantStepSize(), SAVEATS["ts"])
    cases = {
        name: ((SOLVERS[name], *config), REV) for name in CONSTANT_STEP_GROUPS[group]
    }
    if group == "one-step":
        # The other outputs under constant steps.
        midpoint = (SOLVERS["Reversible(Midpoint)"], config[0], T1_AND_STEPS)
        cases["Reversible(Midpoint), t1+steps"] = (midpoint, REV)
    check_hvps(ode_loss, PARAMS, TANGENT, cases)


def test_hvp_adaptive_steps():
    cases = {
        "Reversible(Tsit5), ts": ("Reversible(Tsit5)", SAVEATS["ts"], 1e-8),
        "Reversible(Midpoint), t1+steps": ("Reversible(Midpoint)", T1_AND_STEPS, 1e-3),
        "SymmetricComposition(ALF, 4), ts": (
            "SymmetricComposition(ALF, 4)",
            SAVEATS["ts"],
            1e-4,
        ),
    }
    cases = {
        case: ((SOLVERS[name], pid(rtol), saveat), REV)
        for case, (name, saveat, rtol) in cases.items()
    }
    # `ReversibleAdjoint(checkpoint_every=...)`.
    heun = revdiffrax.Reversible(diffrax.Heun(), coupling=0.9)
    cases["Reversible(Heun, 0.9), checkpoint_every=3"] = (
        (heun, pid(1e-3), SAVEATS["ts"]),
        revdiffrax.ReversibleAdjoint(checkpoint_every=3),
    )
    check_hvps(ode_loss, PARAMS, TANGENT, cases)


def test_hvp_sde():
    params = (jnp.array([0.8, -0.5]), jnp.array(0.7))
    tangent = (jnp.array([0.3, 1.0]), jnp.array(-0.6))
    # The solvers need increments only: the cheaper Brownian motion to compile.
    key = jr.key(2, impl="unsafe_rbg")
    solvers = {
        "Reversible(Heun)": revdiffrax.Reversible(diffrax.Heun()),
        "ReversibleHeun": revdiffrax.ReversibleHeun(),
    }
    cases = {
        name: ((solver, diffrax.BrownianIncrement, key), REV)
        for name, solver in solvers.items()
    }
    check_hvps(sde_loss, params, tangent, cases)


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

    def products(params, tangents, adjoint):
        def one(p, v):
            saveat = SAVEATS["ts"]
            return hvp(ode_loss, p, v, adjoint, solver, controller, saveat, 64)[1]

        return jax.vmap(one)(params, tangents)

    # Both adjoints in one jitted program: one compilation instead of two.
    both = jax.jit(lambda p, v: (products(p, v, REV), products(p, v, DIRECT)))
    ours, reference = both(params, tangents)
    assert tree_rel_err(ours, reference) < GRAD_RTOL


def test_hessian_of_small_parameter_vector():
    """`jax.hessian` (`jacfwd` of `jacrev`) in (y0, args) of a PyTree-free loss."""
    mlp = eqx.combine(PARAMS, STATIC)[2]

    def loss(theta, adjoint):
        params = (theta[:2], theta[2], eqx.filter(mlp, eqx.is_inexact_array))
        return ode_loss(params, adjoint, SOLVERS["ReversibleHeun"],
                        diffrax.ConstantStepSize(), SAVEATS["t1"])  # fmt: skip

    theta = jnp.array([0.6, -0.4, 0.5])
    hessian = jax.hessian(loss)
    # Both adjoints in one jitted program: one compilation instead of two.
    ours, reference = jax.jit(lambda x: (hessian(x, REV), hessian(x, DIRECT)))(theta)
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
