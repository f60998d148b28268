"""Terminating events under `ReversibleAdjoint` (`revdiffrax/_adjoint/events.py`):
boolean conditions, real conditions located by a Newton root find, several
conditions at once, the event time as a differentiable output, and outputs saved
before the event. Gradients equal `RecursiveCheckpointAdjoint`'s through the same
solver; every case checks that the event fired before `t1` and that the gradients
are not zero."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest
import revdiffrax
from helpers import RCA_ALL_STEPS, tree_rel_err


RCA = RCA_ALL_STEPS
REV = revdiffrax.ReversibleAdjoint(drift_tol=1e-10)
EVENT_RTOL = 1e-8
T1 = 3.0
NEWTON = optx.Newton(rtol=1e-12, atol=1e-12)

PID = diffrax.PIDController(rtol=1e-6, atol=1e-8)
CONSTANT = diffrax.ConstantStepSize()


def _ball(t, y, args):
    g, drag = args
    return jnp.stack([y[1], -g - drag * y[1] * jnp.abs(y[1])])


def _ground(h):
    return lambda t, y, args, **kwargs: y[0] - h


def _below(h):
    return lambda t, y, args, **kwargs: y[0] < h


def _event(kind, h):
    if kind == "bool":
        return diffrax.Event(_below(h))
    if kind == "real":
        return diffrax.Event(_ground(h), root_finder=NEWTON)
    if kind == "several":
        # Never, the ground (the first to trigger) and a late clock.
        never = lambda t, y, args, **kwargs: y[1] - 50.0  # noqa: E731
        late = lambda t, y, args, **kwargs: t > 2.0  # noqa: E731
        return diffrax.Event((never, _ground(h), late), root_finder=NEWTON)
    if kind == "clock first":
        # A boolean condition triggers first, with a root finder: t* = t_N.
        clock = lambda t, y, args, **kwargs: t > 0.3  # noqa: E731
        return diffrax.Event({"ground": _ground(h), "clock": clock}, root_finder=NEWTON)
    raise ValueError(kind)


def _solve(y0, params, t1, h, *, solver, controller, kind, saveat, adjoint, dt0=0.05):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_ball),
        solver,
        0.0,
        t1,
        dt0,
        y0,
        args=params,
        event=_event(kind, h),
        stepsize_controller=controller,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=128,
    )


def _finite(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _loss(y0, params, t1, h, **kwargs):
    sol = _solve(y0, params, t1, h, **kwargs)
    assert sol.ts is not None and sol.ys is not None
    loss = jnp.sum(jnp.sin(_finite(sol.ys))) + jnp.sum(jnp.cos(3.0 * _finite(sol.ts)))
    return loss, (sol.ts, sol.result == diffrax.RESULTS.event_occurred)


Y0 = jnp.array([1.0, 0.5])
PARAMS = (jnp.array(9.8), jnp.array(0.3))
H = jnp.array(0.1)
SAVE_T1 = diffrax.SaveAt(t1=True)
# Two times before the event (near t = 0.5), one after it (never saved).
# `fn` depends on t, so the cotangent of t* also comes through it.
SAVE_TS = diffrax.SaveAt(
    t0=True,
    ts=jnp.array([0.1, 0.35, 2.0]),
    t1=True,
    fn=lambda t, y, args: y * jnp.cos(t + args[1]),
)


def _compare(cases):
    """Gradients with respect to (y0, (g, drag), t1, h) of both adjoints, for every
    case `name: (solver, controller, kind, adjoint)` of `cases`: each case's solve is
    a term of one jitted loss with its own copy of the inputs (one compilation per
    adjoint for all cases), so each case's gradient is compared on its own. Returns
    `name: (relative error, event time)`."""

    def total(inputs, reversible):
        loss, aux = 0.0, {}
        for name, (solver, controller, kind, rev) in cases.items():
            value, aux[name] = _loss(
                *inputs[name],
                solver=solver,
                controller=controller,
                kind=kind,
                saveat=SAVE_TS,
                adjoint=rev if reversible else RCA,
            )
            loss = loss + value
        return loss, aux

    grad = jax.jit(jax.grad(total, has_aux=True), static_argnums=1)
    inputs = {name: (Y0, PARAMS, T1, H) for name in cases}
    g_revs, aux_rev = grad(inputs, True)
    g_rcas, aux_rca = grad(inputs, False)
    out = {}
    for name in cases:
        (ts, fired), (ts_rca, _) = aux_rev[name], aux_rca[name]
        g_rev, g_rca = g_revs[name], g_rcas[name]
        assert bool(fired), name
        t_event = float(jnp.max(jnp.where(jnp.isfinite(ts), ts, -jnp.inf)))
        assert t_event < 0.6 * T1, name
        np.testing.assert_allclose(ts, ts_rca, rtol=1e-12)
        for g in jax.tree_util.tree_leaves(g_rca)[:3]:  # y0 and (g, drag)
            assert np.all(np.abs(np.asarray(g)) > 0), name
        out[name] = (tree_rel_err(g_rev, g_rca), t_event)
    return out


# (solver, controller, event kind, adjoint). The other reversible solvers
# (Reversible with Tsit5, Dopri5, Euler; SymmetricComposition; SemiImplicitEuler)
# were measured by the same comparison (each case costs 10-20 s of compilation).
CASES = {
    "Reversible(Bosh3)-PID-several": (
        revdiffrax.Reversible(diffrax.Bosh3()),
        PID,
        "several",
        REV,
    ),
    "Reversible(Midpoint)-constant-clock first": (
        revdiffrax.Reversible(diffrax.Midpoint()),
        CONSTANT,
        "clock first",
        REV,
    ),
    # A multistep method (`at_previous_time`) and the time-symmetric family.
    "LeapfrogMidpoint-constant-bool": (
        revdiffrax.LeapfrogMidpoint(),
        CONSTANT,
        "bool",
        REV,
    ),
    "AsynchronousLeapfrog-constant-real": (
        revdiffrax.AsynchronousLeapfrog(),
        CONSTANT,
        "real",
        REV,
    ),
    "ReversibleHeun-constant-real-checkpoints": (
        revdiffrax.ReversibleHeun(),
        CONSTANT,
        "real",
        revdiffrax.ReversibleAdjoint(drift_tol=1e-10, checkpoint_every=3),
    ),
}


def test_event_gradients_match_rca():
    for name, (err, t_event) in _compare(CASES).items():
        print(f"\nEVENT {name} t*={t_event:.6f} grad rel err {err:.2e}")
        assert err < EVENT_RTOL, name
        if CASES[name][2] == "clock first":
            assert 0.3 <= t_event < 0.36  # the end of the step at (or past) 0.3


def test_event_time_gradient_is_the_implicit_one():
    """Drag-free ball dropped from 1, loss t* + height(t*) (= t* + h at the event):
    t* = sqrt(2 (1 - h) / g), dt*/dg = -t* / (2 g) and dt*/dh = -1 / (g t*).
    Without an event before t1 the loss is t1 + 1 - g t1^2 / 2. Bosh3 and its
    cubic interpolation are exact on the parabola."""

    def loss(g, h, adjoint):
        sol = _solve(
            jnp.array([1.0, 0.0]),
            (g, jnp.array(0.0)),
            T1,
            h,
            solver=revdiffrax.Reversible(diffrax.Bosh3()),
            controller=CONSTANT,
            kind="real",
            saveat=SAVE_T1,
            adjoint=adjoint,
        )
        assert sol.ts is not None and sol.ys is not None
        return sol.ts[-1] + sol.ys[-1, 0], sol.ts[-1]

    grad = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2
    )
    g = jnp.array(9.8)
    for h in (jnp.array(0.2), jnp.array(-100.0)):
        ((_, t_rev), g_rev), ((_, t_rca), g_rca) = grad(g, h, REV), grad(g, h, RCA)
        if h > -1:
            exact = float(jnp.sqrt(2 * (1 - h) / g))
            assert abs(float(t_rev) - exact) < 1e-10
            expected = (-exact / (2 * g), 1 - 1 / (g * exact))
        else:
            assert float(t_rev) == float(t_rca) == T1  # no event
            expected = (-(T1**2) / 2, 0.0)
        np.testing.assert_allclose(g_rev, expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g_rca, expected, rtol=1e-9, atol=1e-12)


def test_time_inputs_after_an_early_stop():
    """Gradients with respect to y0, t1 and dt0 when a boolean event stops the
    solve early: constant steps place every step time by t0, t1 and dt0."""
    solver = revdiffrax.Reversible(diffrax.Midpoint())

    def loss(y0, t1, dt0, adjoint):
        return _loss(
            y0,
            PARAMS,
            t1,
            H,
            solver=solver,
            controller=CONSTANT,
            kind="bool",
            saveat=SAVE_TS,
            adjoint=adjoint,
            dt0=dt0,
        )

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    # t1 = inf: "until the event", steps t0 + n dt0.
    for t1 in (2.9, jnp.inf):
        g_rca, _ = grad(Y0, t1, 0.07, RCA)
        g_rev, (ts, fired) = grad(Y0, t1, 0.07, REV)
        assert bool(fired)
        assert float(jnp.max(jnp.where(jnp.isfinite(ts), ts, 0))) < 1.0
        nonzero = g_rca if t1 < jnp.inf else (g_rca[0], g_rca[2])
        assert all(float(jnp.max(jnp.abs(x))) > 0 for x in nonzero)
        err = tree_rel_err(g_rev, g_rca)
        print(f"\nEVENT time inputs, t1={t1}: grad rel err {err:.2e}")
        assert err < EVENT_RTOL


def test_unsupported_event_cases_raise():
    event = diffrax.Event(_ground(0.0), root_finder=NEWTON)
    with pytest.raises(NotImplementedError, match="SaveAt\\(steps"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(_ball),
            revdiffrax.Reversible(diffrax.Tsit5()),
            0.0,
            T1,
            0.05,
            Y0,
            args=PARAMS,
            event=event,
            saveat=diffrax.SaveAt(steps=True),
            adjoint=REV,
            max_steps=64,
        )
    bm = diffrax.VirtualBrownianTree(0.0, T1, 1e-3, (2,), key=jax.random.key(0))
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(_ball),
        diffrax.ControlTerm(lambda t, y, args: 0.1 * jnp.eye(2), bm),
    )
    with pytest.raises(NotImplementedError, match="RecursiveCheckpointAdjoint"):
        diffrax.diffeqsolve(
            terms,
            revdiffrax.ReversibleHeun(),
            0.0,
            T1,
            0.05,
            Y0,
            args=PARAMS,
            event=event,
            adjoint=REV,
            max_steps=64,
        )


def test_bouncing_ball_example_runs():
    from experiments import bouncing_ball

    result = bouncing_ball.main(["--iters", "1"])
    assert result["grad_rel_diff"] < EVENT_RTOL
    assert result["grad_reversible"] != 0
    assert 0.4 < result["t_event"] < 1.0
