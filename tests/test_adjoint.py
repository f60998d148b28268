"""Gradients of `ReversibleAdjoint` against `RecursiveCheckpointAdjoint` through the
same solver (float64), finite differences for time gradients, float32 behaviour,
memory, transformations and error messages."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
import revdiffrax
from helpers import (
    GRAD_RTOL,
    MULTISTEP_SOLVERS,
    RCA_ALL_STEPS,
    REVERSIBLE_SOLVERS,
    tree_rel_err,
)
from jaxtyping import Array, Float, PyTree


RCA = RCA_ALL_STEPS
REV = revdiffrax.ReversibleAdjoint()


def vf(t, y, args):
    return -args * y + jnp.sin(t) * y**2


Y0 = jnp.array([1.0, 0.5])
A = jnp.array(0.7)


class PyTreeField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        out = self.mlp(jnp.concatenate([jnp.reshape(t, (1,)), y["a"], y["b"]]))
        return {"a": out[:1] * args, "b": -y["b"] + jnp.sin(3 * out[1:])}


MLP_FIELD = PyTreeField(
    eqx.nn.MLP(3, 2, 8, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
)
PY0 = {"a": jnp.array([0.3]), "b": jnp.array([1.0])}
TS = jnp.array([0.0, 0.1, 0.37, 1.2, 1.9, 2.0])

SOLVERS = {
    **REVERSIBLE_SOLVERS,
    "Reversible(Tsit5, 0.9)": revdiffrax.Reversible(diffrax.Tsit5(), coupling=0.9),
    **MULTISTEP_SOLVERS,
}
ADAPTIVE = {k for k in SOLVERS if "Euler)" not in k and "Leapfrog" not in k}

SAVEATS = {
    "t1": diffrax.SaveAt(t1=True),
    "t0t1": diffrax.SaveAt(t0=True, t1=True),
    "ts": diffrax.SaveAt(ts=TS),
    "steps": diffrax.SaveAt(steps=True),
    "steps3": diffrax.SaveAt(steps=3, t0=True, t1=True),
    "fn+subs": diffrax.SaveAt(
        subs=[
            diffrax.SubSaveAt(ts=TS[1:4], fn=lambda t, y, a: y["a"] * t),
            diffrax.SubSaveAt(t0=True, t1=True, fn=lambda t, y, a: y["b"] ** 2),
        ]
    ),
}


def pytree_loss(params, y0, solver, saveat, controller, adjoint):
    field, a = params
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        0.0,
        2.0,
        None if isinstance(controller, diffrax.StepTo) else 0.05,
        y0,
        args=a,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=400,
    )
    leaves = jax.tree_util.tree_leaves(sol.ys)
    # Unused `steps` slots hold inf; they are not part of the loss. Each output
    # enters with its own weight, so that an error in one cannot cancel another's.
    return sum(
        (1 + 0.25 * i) * jnp.sum(jnp.where(jnp.isfinite(x), jnp.cos(x), 0.0))
        for i, x in enumerate(leaves)
    )


def _grads(solver, saveat, controller):
    p = (MLP_FIELD, jnp.array(0.8))
    g = eqx.filter_grad(pytree_loss)
    # Both adjoints in one compilation.
    config = (solver, saveat, controller)
    return eqx.filter_jit(lambda p, y0: both_adjoints(g, p, y0, *config))(p, PY0)


def simple_loss(y0, a, solver, saveat, controller, adjoint):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        solver,
        0.0,
        2.0,
        0.05,
        y0,
        args=a,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=400,
    )
    return jnp.sum(jnp.sin(sol.ys))


def assert_cases_agree(grads: dict[str, tuple[PyTree, PyTree]]) -> None:
    """Each case's `(ours, reference)` gradients agree to `GRAD_RTOL`; the message
    names every case that does not. (Cases compiled as one program are compared
    one by one.)"""
    errors = {name: tree_rel_err(ours, ref) for name, (ours, ref) in grads.items()}
    failed = {name: err for name, err in errors.items() if not err < GRAD_RTOL}
    assert not failed, f"relative error above {GRAD_RTOL}: {failed}"


def both_adjoints(grad, *args):
    """`(grad(*args, REV), grad(*args, RCA))`: the caller jits them as one
    program."""
    return grad(*args, REV), grad(*args, RCA)


# Two groups of solvers (low and high order), each compiled as one program.
EVERY_SOLVER_GROUPS = {
    "low order": [k for k in sorted(SOLVERS) if "Tsit5" not in k and "Dopri" not in k],
    "high order": [k for k in sorted(SOLVERS) if "Tsit5" in k or "Dopri" in k],
}


@pytest.mark.parametrize("group", list(EVERY_SOLVER_GROUPS))
def test_every_solver(group):
    # Adaptive solvers under a PID controller (accepted and rejected steps), the others
    # with constant steps. Constant steps through an adaptive base run the same step
    # and backward step (only the step times differ), and are checked on Bosh3 by
    # `test_other_controllers_pytree_mlp` and on Tsit5 by `test_time_gradients` and
    # `test_time_gradients_follow_diffrax_step_times`; running them here too doubled
    # this test's compile time. Every solver's gradients of a group (both adjoints)
    # are one jitted program, compared solver by solver: one compilation instead of
    # two per solver.
    saveat = diffrax.SaveAt(ts=TS, t1=True)

    def controller(name):
        if name in ADAPTIVE:
            return diffrax.PIDController(rtol=1e-4, atol=1e-6)
        return diffrax.ConstantStepSize()

    @jax.jit
    def grads(y0, a):
        g = jax.grad(simple_loss, argnums=(0, 1))
        return {
            name: both_adjoints(g, y0, a, SOLVERS[name], saveat, controller(name))
            for name in EVERY_SOLVER_GROUPS[group]
        }

    assert_cases_agree(grads(Y0, A))


def test_pid_really_rejects_steps():
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(MLP_FIELD),
        SOLVERS["Reversible(Bosh3)"],
        0.0,
        2.0,
        0.05,
        PY0,
        args=0.8,
        stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-6),
        adjoint=REV,
        max_steps=400,
    )
    assert int(sol.stats["num_rejected_steps"]) > 0


def _subs(saveat: diffrax.SaveAt) -> list[diffrax.SubSaveAt]:
    subs = saveat.subs
    return list(subs) if isinstance(subs, (list, tuple)) else [subs]


def test_saveat_modes_pytree_mlp_pid():
    # Every mode of `SAVEATS` as one `SubSaveAt` of a single solve: one compilation
    # per adjoint instead of one per mode (diffrax turns every `SaveAt` into
    # `SubSaveAt`s, so each mode takes the same path as on its own).
    every_mode = diffrax.SaveAt(
        subs=[sub for s in SAVEATS.values() for sub in _subs(s)]
    )
    controller = diffrax.PIDController(rtol=1e-5, atol=1e-7)
    g_rev, g_rca = _grads(SOLVERS["Reversible(Tsit5)"], every_mode, controller)
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL


def test_other_controllers_pytree_mlp():
    # Both controllers and both adjoints in one jitted program, compared controller
    # by controller.
    controllers = {
        "constant": diffrax.ConstantStepSize(),
        "stepto": diffrax.StepTo(jnp.linspace(0.0, 2.0, 23)),
    }
    solver, saveat = SOLVERS["Reversible(Bosh3)"], SAVEATS["ts"]

    @eqx.filter_jit
    def grads(p, y0):
        g = eqx.filter_grad(pytree_loss)
        return {
            name: both_adjoints(g, p, y0, solver, saveat, controller)
            for name, controller in controllers.items()
        }

    assert_cases_agree(grads((MLP_FIELD, jnp.array(0.8)), PY0))


def time_loss(t0, t1, ts, adjoint, controller):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        SOLVERS["Reversible(Tsit5)"],
        t0,
        t1,
        None if isinstance(controller, diffrax.StepTo) else 0.05,
        Y0,
        args=A,
        saveat=diffrax.SaveAt(ts=ts, t1=True),
        stepsize_controller=controller,
        adjoint=adjoint,
    )
    return jnp.sum(jnp.sin(sol.ys))


TIME_CONTROLLERS = {
    "constant": diffrax.ConstantStepSize(),
    "pid": diffrax.PIDController(rtol=1e-7, atol=1e-7),
    "stepto": diffrax.StepTo(jnp.linspace(0.0, 0.97, 13)),
}


def test_time_gradients():
    # The three controllers' solves are terms of one jitted loss, each with its own
    # (t0, t1, ts), so each controller's gradient is compared on its own: one
    # compilation per adjoint instead of two eager ones per controller.
    ts = jnp.array([0.2, 0.33, 0.61, 0.9])

    def total(times, adjoint):
        return sum(
            time_loss(*times[name], adjoint, controller)
            for name, controller in TIME_CONTROLLERS.items()
        )

    times = {name: (0.0, 0.97, ts) for name in TIME_CONTROLLERS}
    # Both adjoints in one compilation.
    g_revs, g_rcas = jax.jit(lambda x: both_adjoints(jax.grad(total), x))(times)
    for name, controller in TIME_CONTROLLERS.items():
        g_rev = g_revs[name]
        assert tree_rel_err(g_rev, g_rcas[name]) < GRAD_RTOL, name
        eps = 1e-6
        for i in range(len(ts)):
            plus = time_loss(0.0, 0.97, ts.at[i].add(eps), RCA, controller)
            minus = time_loss(0.0, 0.97, ts.at[i].add(-eps), RCA, controller)
            assert abs(g_rev[2][i] - (plus - minus) / (2 * eps)) < 1e-6, (name, i)
        if isinstance(controller, diffrax.ConstantStepSize):
            # 0.97 / 0.05 is not an integer, so the number of steps does not change.
            plus = time_loss(0.0, 0.97 + eps, ts, RCA, controller)
            minus = time_loss(0.0, 0.97 - eps, ts, RCA, controller)
            assert abs(g_rev[1] - (plus - minus) / (2 * eps)) < 1e-6


def test_t0_equals_t1():
    def loss(y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            SOLVERS["Reversible(Tsit5)"],
            0.5,
            0.5,
            0.05,
            y0,
            args=A,
            saveat=diffrax.SaveAt(ts=jnp.array([0.5, 0.5]), t0=True, t1=True),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    # Both adjoints in one compilation.
    g, g_rca = jax.jit(lambda y0: both_adjoints(jax.grad(loss), y0))(Y0)
    assert np.allclose(g, g_rca)
    assert np.allclose(g, 8 * Y0)


def test_backwards_in_time():
    def loss(y0, t1, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            SOLVERS["Reversible(Tsit5)"],
            1.0,
            t1,
            -0.05,
            y0,
            args=A,
            saveat=diffrax.SaveAt(ts=jnp.array([0.9, 0.5, 0.1]), t1=True),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    grad = jax.grad(loss, argnums=(0, 1))
    # Both adjoints in one compilation.
    g_rev, g_rca = jax.jit(lambda y0, t1: both_adjoints(grad, y0, t1))(Y0, -0.3)
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL


def _pid_loss(y0, adjoint):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        SOLVERS["Reversible(Tsit5)"],
        0.0,
        1.0,
        None,
        y0,
        args=A,
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        adjoint=adjoint,
    )
    return jnp.sum(sol.ys**2)


def test_jit_vmap_of_grad_and_grad_of_vmap():
    ys = jnp.stack([Y0, 2 * Y0, 0.1 * Y0])

    @jax.jit  # the three in one compilation
    def everything(ys):
        expected = jax.vmap(jax.grad(_pid_loss), in_axes=(0, None))(ys, RCA)
        vg = jax.vmap(jax.grad(_pid_loss), in_axes=(0, None))(ys, REV)
        gv = jax.grad(lambda y: jnp.sum(jax.vmap(_pid_loss, (0, None))(y, REV)))(ys)
        return expected, vg, gv

    expected, vg, gv = everything(ys)
    assert tree_rel_err(vg, expected) < GRAD_RTOL
    assert tree_rel_err(gv, expected) < GRAD_RTOL


def test_closure_over_traced_parameter():
    # The vector field closes over a value traced by `jax.jit`/`jax.grad`.
    def loss(a, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -a * y),
            SOLVERS["Reversible(Tsit5)"],
            0.0,
            1.0,
            0.1,
            Y0,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys)

    # Both adjoints in one compilation.
    g_rev, g_rca = jax.jit(lambda a: both_adjoints(jax.grad(loss), a))(A)
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL


SDE_DT = 0.05


class GridBrownianPath(diffrax.AbstractBrownianPath):
    """Brownian increments with space-time Levy area, drawn once per step of a fixed
    grid of step `dt` from `t0`: `evaluate(s, s + dt)` returns the increment of the
    step starting at `s` (the solves using it step on that grid).

    The same path on every call, as `VirtualBrownianTree` (the reversible backward
    pass evaluates each increment again), but a table look-up: a gradient through
    `VirtualBrownianTree` compiles about 2.6x as long (its evaluation, a loop, is
    inlined at every stage). `VirtualBrownianTree` itself is covered by the
    `ReversibleHeun` and `LeapfrogMidpoint` cases of `test_sde`, PyTree-shaped
    through `Reversible(Heun)` in `test_sde_general_noise_and_pytree_brownian_motion`,
    and by the other SDE tests."""

    w: PyTree[Float[Array, "steps ..."]]
    h: PyTree[Float[Array, "steps ..."]]
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    levy_area: type[diffrax.SpaceTimeLevyArea] = eqx.field(
        static=True, default=diffrax.SpaceTimeLevyArea
    )

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        del left
        if t1 is None:
            raise NotImplementedError("only increments over one grid step")
        steps = round((self.t1 - self.t0) / self.dt)
        step = jnp.round((t0 - self.t0) / self.dt).astype(jnp.int32)
        step = jnp.clip(step, 0, steps - 1)
        w = jax.tree_util.tree_map(lambda x: x[step], self.w)
        if use_levy:
            h = jax.tree_util.tree_map(lambda x: x[step], self.h)
            return diffrax.SpaceTimeLevyArea(dt=t1 - t0, W=w, H=h)
        return w


def _grid_brownian_path(key, shape=jax.ShapeDtypeStruct((2,), jnp.float64)):
    """A `GridBrownianPath` on [0, 1] with step `SDE_DT`, of `shape` (a PyTree of
    `jax.ShapeDtypeStruct`s, as `VirtualBrownianTree`'s)."""
    steps = round(1.0 / SDE_DT)
    leaves, treedef = jax.tree_util.tree_flatten(shape)
    keys = jax.random.split(key, 2 * len(leaves))

    def draw(keys, variance):
        return treedef.unflatten(
            [
                jnp.sqrt(variance) * jax.random.normal(k, (steps, *s.shape), s.dtype)
                for k, s in zip(keys, leaves)
            ]
        )

    w, h = draw(keys[::2], SDE_DT), draw(keys[1::2], SDE_DT / 12)
    return GridBrownianPath(w, h, 0.0, 1.0, SDE_DT)


def _sde_loss(y0, p, solver, adjoint, additive, tree=True):
    if tree:  # multistep solvers: Brownian increments are all they need
        bm = diffrax.VirtualBrownianTree(
            0.0,
            1.0,
            tol=1e-3,
            shape=(2,),
            # Cheaper to compile than the default threefry (see `GridBrownianPath`).
            key=jax.random.key(0, impl="unsafe_rbg"),
            levy_area=diffrax.BrownianIncrement,
        )
    else:
        bm = _grid_brownian_path(jax.random.PRNGKey(0))

    def diffusion(t, y, a):
        scale = jnp.ones_like(y) if additive else jnp.sin(y)
        return lx.DiagonalLinearOperator(0.3 * scale * a)

    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, a: -a * y), diffrax.ControlTerm(diffusion, bm)
    )
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        1.0,
        SDE_DT,
        y0,
        args=p,
        adjoint=adjoint,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0, 1, 6)),
    )
    return jnp.sum(sol.ys**2)


# name: (solver, additive noise, Brownian motion a `VirtualBrownianTree` (else a
# `GridBrownianPath`)).
SDE_CASES = {
    # `Reversible(Heun)` through a (PyTree) `VirtualBrownianTree`:
    # `test_sde_general_noise_and_pytree_brownian_motion`.
    "Heun": (revdiffrax.Reversible(diffrax.Heun()), False, False),
    "Midpoint": (revdiffrax.Reversible(diffrax.Midpoint()), False, False),
    "SlowRK": (revdiffrax.Reversible(diffrax.SlowRK()), False, False),
    "SPaRK": (revdiffrax.Reversible(diffrax.SPaRK()), False, False),
    "ShARK": (revdiffrax.Reversible(diffrax.ShARK()), True, False),
    "ReversibleHeun": (revdiffrax.ReversibleHeun(), False, True),
    # A multistep state holding a time: linearised without differentiating it
    # (the tree refuses time tangents; `detach_state_times`).
    "LeapfrogMidpoint": (revdiffrax.LeapfrogMidpoint(), False, True),
}
# Two groups, each compiled as one program (both adjoints of every case).
SDE_GROUPS = {
    "tree": [k for k, case in SDE_CASES.items() if case[2]],
    "grid": [k for k, case in SDE_CASES.items() if not case[2]],
}


@pytest.mark.parametrize("group", list(SDE_GROUPS))
def test_sde(group):
    @jax.jit
    def grads(y0, a):
        g = jax.grad(_sde_loss, argnums=(0, 1))
        return {
            name: (
                g(y0, a, SDE_CASES[name][0], REV, *SDE_CASES[name][1:]),
                g(y0, a, SDE_CASES[name][0], RCA, *SDE_CASES[name][1:]),
            )
            for name in SDE_GROUPS[group]
        }

    assert_cases_agree(grads(Y0, A))


def _cde_loss(xs, p, ts, interpolation, adjoint):
    if interpolation == "linear":
        path = diffrax.LinearInterpolation(ts, xs)
    else:
        coeffs = diffrax.backward_hermite_coefficients(ts, xs)
        path = diffrax.CubicInterpolation(ts, coeffs)
    term = diffrax.ControlTerm(
        lambda t, y, a: jnp.tanh(a * jnp.outer(y, jnp.ones(2))), path
    )
    sol = diffrax.diffeqsolve(
        term,
        SOLVERS["Reversible(Tsit5)"],
        0.0,
        1.0,
        0.02,
        jnp.array([0.5, 1.0]),
        args=p,
        adjoint=adjoint,
    )
    return jnp.sum(sol.ys**2)


def test_cde_gradient_flows_to_data():
    ts = jnp.sort(jax.random.uniform(jax.random.PRNGKey(1), (20,)))
    ts = ts.at[0].set(0.0).at[-1].set(1.0)
    xs = jnp.stack([ts, jnp.sin(6 * ts)], -1)

    @jax.jit  # both interpolations and both adjoints in one compilation
    def grads(xs, p, ts):
        grad = jax.grad(_cde_loss, argnums=(0, 1))
        return {
            kind: both_adjoints(grad, xs, p, ts, kind) for kind in ("linear", "cubic")
        }

    results = grads(xs, jnp.array(0.7), ts)
    assert_cases_agree(results)
    for kind, (g_rev, _) in results.items():
        assert float(jnp.max(jnp.abs(g_rev[0]))) > 0, kind


def test_sde_general_noise_and_pytree_brownian_motion():
    key1, key2 = jax.random.split(jax.random.PRNGKey(4))
    shape = {
        "w": jax.ShapeDtypeStruct((3,), jnp.float64),
        "v": jax.ShapeDtypeStruct((), jnp.float64),
    }
    # A PRNG cheaper to compile than the default threefry (see `GridBrownianPath`).
    tree_key = jax.random.key(4, impl="unsafe_rbg")
    tree = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=shape, key=tree_key)
    grid = _grid_brownian_path(key1, shape)
    mix = jax.random.normal(key2, (2, 3))

    def diffusion(t, y, a):
        # General (non-diagonal, non-commutative) noise from a PyTree Brownian motion.
        return {"w": a * jnp.tanh(mix * y[:, None]), "v": a * jnp.cos(y)}

    def prod(g, dw):
        return g["w"] @ dw["w"] + g["v"] * dw["v"]

    class Term(diffrax.ControlTerm):
        def prod(self, vf, control):
            return prod(vf, control)

    def loss(y0, p, solver, adjoint, bm):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda t, y, a: -a * y), Term(diffusion, bm)
        )
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            0.0,
            1.0,
            SDE_DT,
            y0,
            args=p,
            adjoint=adjoint,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0, 1, 4)),
        )
        return jnp.sum(sol.ys**2)

    # The PyTree `VirtualBrownianTree` through one solver; the other on the cheaper
    # grid path of the same shape (see `GridBrownianPath`). Both solvers and both
    # adjoints in one jitted program.
    cases = {
        "Reversible(Heun), tree": (revdiffrax.Reversible(diffrax.Heun()), tree),
        "ReversibleHeun, grid": (revdiffrax.ReversibleHeun(), grid),
    }

    @eqx.filter_jit
    def grads(y0, a, cases):
        g = jax.grad(loss, argnums=(0, 1))
        return {
            name: (g(y0, a, solver, REV, bm), g(y0, a, solver, RCA, bm))
            for name, (solver, bm) in cases.items()
        }

    assert_cases_agree(grads(Y0, A, cases))


def test_semi_implicit_euler():
    def loss(y0, adjoint):
        terms = (
            diffrax.ODETerm(lambda t, v, a: v),
            diffrax.ODETerm(lambda t, x, a: -jnp.sin(x)),
        )
        sol = diffrax.diffeqsolve(
            terms,
            revdiffrax.SemiImplicitEuler(),
            0.0,
            2.0,
            0.05,
            y0,
            adjoint=adjoint,
            saveat=diffrax.SaveAt(ts=jnp.linspace(0, 2, 5)),
        )
        return jnp.sum(sol.ys[0] ** 2 + sol.ys[1])

    y0 = (jnp.array([0.3]), jnp.array([1.0]))
    # Both adjoints in one compilation.
    g_rev, g_rca = jax.jit(lambda y0: both_adjoints(jax.grad(loss), y0))(y0)
    assert tree_rel_err(g_rev, g_rca) < GRAD_RTOL


def test_float32_tolerance():
    # In float32 the reconstruction rounds at ~1e-7 per step and is amplified by
    # about 1/coupling per step; 100 steps keep the gradient within 1e-4.
    field = eqx.nn.MLP(3, 2, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(3))
    field = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, field
    )

    def loss(m, y0, adjoint, dtype):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(
                lambda t, y, a: m(jnp.concatenate([jnp.reshape(t, (1,)), y]))
            ),
            SOLVERS["Reversible(Tsit5)"],
            jnp.asarray(0.0, dtype),
            jnp.asarray(1.0, dtype),
            jnp.asarray(0.01, dtype),
            y0,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    y32 = jnp.array([1.0, -0.5], dtype=jnp.float32)
    m64 = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, field
    )

    @eqx.filter_jit  # the three gradients in one compilation
    def grads(m64, y64, m32, y32):
        grad = eqx.filter_grad(loss)
        return (
            grad(m64, y64, RCA, jnp.float64),
            grad(m32, y32, REV, jnp.float32),
            grad(m32, y32, RCA, jnp.float32),
        )

    ref, g_rev, g_rca = grads(m64, y32.astype(jnp.float64), field, y32)
    assert jax.tree_util.tree_leaves(g_rev)[0].dtype == jnp.float32
    assert tree_rel_err(g_rev, ref) < 1e-4
    assert tree_rel_err(g_rev, ref) < 100 * max(tree_rel_err(g_rca, ref), 1e-7)


def test_drift_diagnostics():
    drifts = []
    jax.grad(_pid_loss)(Y0, revdiffrax.ReversibleAdjoint(drift_callback=drifts.append))
    assert len(drifts) == 1 and 0 <= float(drifts[0]) < 1e-12
    with pytest.raises(Exception, match="drift_tol"):
        jax.block_until_ready(
            jax.grad(_pid_loss)(Y0, revdiffrax.ReversibleAdjoint(drift_tol=-1.0))
        )


def test_memory_flat_in_number_of_steps():
    field = eqx.nn.MLP(5, 4, 16, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(field, eqx.is_inexact_array)
    y0 = jnp.ones((8, 4))

    def temp_bytes(n, adjoint):
        def loss(p):
            m = eqx.combine(p, static)
            f = lambda t, y, a: jax.vmap(lambda yi: m(jnp.concatenate([t[None], yi])))(
                y
            )  # noqa: E731
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(f),
                SOLVERS["Reversible(Tsit5)"],
                0.0,
                1.0,
                1.0 / n,
                y0,
                adjoint=adjoint,
                max_steps=n,
            )
            return jnp.sum(sol.ys**2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(50, REV), temp_bytes(5000, REV)
    step_time_buffer = (5000 - 50) * 8
    assert large - step_time_buffer <= 1.1 * small
    # Storing every step (DirectAdjoint) grows with N.
    assert temp_bytes(5000, diffrax.DirectAdjoint()) > 5 * large


def test_progress_meter_and_throw():
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        SOLVERS["Reversible(Tsit5)"],
        0.0,
        1.0,
        0.1,
        Y0,
        args=A,
        adjoint=REV,
        progress_meter=diffrax.TextProgressMeter(minimum_increase=0.5),
    )
    assert sol.ys.shape == (1, 2)
    with pytest.raises(Exception, match="max_steps"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            SOLVERS["Reversible(Tsit5)"],
            0.0,
            1.0,
            0.01,
            Y0,
            args=A,
            adjoint=REV,
            max_steps=10,
        )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        SOLVERS["Reversible(Tsit5)"],
        0.0,
        1.0,
        0.01,
        Y0,
        args=A,
        adjoint=REV,
        max_steps=10,
        throw=False,
    )
    assert sol.result == diffrax.RESULTS.max_steps_reached


def _solve(solver=SOLVERS["Reversible(Tsit5)"], **kwargs):
    kw = dict(args=A, adjoint=REV)
    kw.update(kwargs)
    return diffrax.diffeqsolve(diffrax.ODETerm(vf), solver, 0.0, 1.0, 0.1, Y0, **kw)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"revdiffrax.Reversible\(diffrax.Tsit5\(\)\)"):
        _solve(diffrax.Tsit5())
    with pytest.raises(ValueError, match="max_steps=4096"):
        _solve(max_steps=None)
    with pytest.raises(NotImplementedError, match="SaveAt\\(steps"):
        _solve(
            event=diffrax.Event(lambda t, y, args, **kw: t > 0.5),
            saveat=diffrax.SaveAt(steps=True),
        )
    with pytest.raises(NotImplementedError, match="SaveAt\\(ts=...\\)"):
        _solve(saveat=diffrax.SaveAt(dense=True))

    class UniformGridOnly(revdiffrax.ReversibleHeun):
        reversible_on_any_grid = False

    with pytest.raises(ValueError, match="ConstantStepSize"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            UniformGridOnly(),
            0.0,
            1.0,
            None,
            Y0,
            args=A,
            adjoint=REV,
            stepsize_controller=diffrax.StepTo(jnp.linspace(0, 1, 5)),
        )
    bm = diffrax.UnsafeBrownianPath(shape=(2,), key=jax.random.PRNGKey(0))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(vf),
        diffrax.ControlTerm(lambda t, y, a: lx.DiagonalLinearOperator(y), bm),
    )
    with pytest.raises(ValueError, match="VirtualBrownianTree"):
        diffrax.diffeqsolve(
            terms,
            revdiffrax.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.1,
            Y0,
            args=A,
            adjoint=REV,
        )


def test_forward_mode_is_refused():
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda y: _pid_loss(y, REV), (Y0,), (Y0,))


def test_dense_saveat_ts_against_direct_adjoint():
    # With one save time per step, diffrax 0.7.2's RecursiveCheckpointAdjoint is off
    # by up to 1e-2 for most checkpoint counts (`python -m
    # experiments.check_gradients`); DirectAdjoint stores everything and is the
    # reference here.
    ts = jnp.linspace(0.0, 2.0, 41)

    def loss(y0, a, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            SOLVERS["Reversible(Midpoint)"],
            0.0,
            2.0,
            0.05,
            y0,
            args=a,
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=adjoint,
            max_steps=40,
        )
        return jnp.mean((sol.ys - 0.5) ** 2)

    g = jax.grad(loss, argnums=(0, 1))
    # Both adjoints in one compilation.
    g_rev, g_direct = jax.jit(lambda *x: (g(*x, REV), g(*x, diffrax.DirectAdjoint())))(
        Y0, A
    )
    assert tree_rel_err(g_rev, g_direct) < GRAD_RTOL


FOLLOW_CASES = {
    # dt0 does not divide t1 - t0: diffrax takes a first step of dt0, then splits
    # the rest of the interval uniformly.
    "ReversibleHeun": (revdiffrax.ReversibleHeun(), diffrax.ConstantStepSize(), "c"),
    "AsynchronousLeapfrog": (
        revdiffrax.AsynchronousLeapfrog(),
        diffrax.ConstantStepSize(),
        "c",
    ),
    "Reversible(Tsit5)": (
        revdiffrax.Reversible(diffrax.Tsit5()),
        diffrax.ConstantStepSize(),
        "c",
    ),
    # A dt0 computed from (t0, t1) scales every adaptive step.
    "Reversible(Tsit5), PID, traced dt0": (
        revdiffrax.Reversible(diffrax.Tsit5()),
        diffrax.PIDController(rtol=1e-5, atol=1e-5),
        "traced",
    ),
}


def _follow_loss(t0, t1, theta, solver, controller, dt0_kind, adjoint):
    dt0 = 0.07 if dt0_kind == "c" else (t1 - t0) / 20
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: -a * y * jnp.cos(t)),
        solver,
        t0,
        t1,
        dt0,
        jnp.array([1.0, 2.0]),
        args=theta,
        stepsize_controller=controller,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.3, 1.0, 4), t1=True),
        adjoint=adjoint,
        max_steps=500,
    )
    return jnp.sum(sol.ys**2)


def test_time_gradients_follow_diffrax_step_times():
    # Every case and both adjoints in one jitted program, compared case by case.
    @jax.jit
    def grads(t0, t1, theta):
        grad = jax.grad(_follow_loss, argnums=(0, 1, 2))
        return {
            name: both_adjoints(grad, t0, t1, theta, *case)
            for name, case in FOLLOW_CASES.items()
        }

    for name, (ours, reference) in grads(0.1, 1.0, 0.7).items():
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert abs(float(a) - float(b)) < GRAD_RTOL * (1 + abs(float(b))), (name, i)
