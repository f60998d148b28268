"""Defects found by random differential testing against
`diffrax.RecursiveCheckpointAdjoint` (RCA) through the same solver (issue 22), each
compared with RCA in float64:

- the saved times `sol.ts` (at t0, t1, the steps and `SaveAt.ts`) carried no
  cotangent unless there was an event: d/dt1 of `sum(sol.ys**2) + sum(sol.ts)` was
  off by exactly the 1 that `sol.ts` contributes;
- t0/t1/dt0 gradients under a `PIDController` whose steps are clipped (`dtmin`,
  `dtmax`, `jump_ts`, `step_ts`) assumed unclipped steps: off by up to 97%;
- an SDE with `SaveAt(ts)` differentiated with respect to `ts` crashed (the
  Brownian motion refuses tangents on its times, and the step times were
  differentiated although `ts` do not move them);
- a vector field closed over a model inside `ControlTerm(...).to_ode()` (or another
  wrapper term, a callable control, `UnderdampedLangevinDriftTerm`'s `grad_f`, or a
  function passed as `args`) crashed with JAX's `CustomVJPException`;
- under `jax.vmap` of per-sample solves, a loss of both `sol.ys` and `sol.ts` with
  `SaveAt.ts` differentiated counted the saved times' cotangent once per sample
  (an unbatched output of the `custom_vjp`: `_adjoint/batched_outputs.py`).
  diffrax 0.7.2's RCA has the same defect, so that test compares with
  `DirectAdjoint` and finite differences.
"""

import functools as ft

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import revdiffrax
from helpers import GRAD_RTOL, leafwise_rel_err, RCA_ALL_STEPS


Y0 = jnp.array([1.0, 0.5])


def _vf(t, y, args):
    return -args * y + jnp.sin(3 * t)


def _assert_close(ours, ref, case=None):
    # Relative to the largest entry: a component of a gradient can be zero up to
    # rounding (e.g. d/d(dt0) of a constant-step solve).
    scale = max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(ref))
    assert leafwise_rel_err(ours, ref, scale) < GRAD_RTOL, case


def _grads_per_adjoint(loss, primals, adjoints):
    """The gradient of `loss(primals, adjoint)` with respect to `primals`, for every
    adjoint of `adjoints`: one jitted program per adjoint (one program holding the
    solves of several adjoints compiled no faster)."""
    grad = eqx.filter_jit(eqx.filter_grad(loss))
    return [grad(primals, adjoint) for adjoint in adjoints]


# --- 1. `sol.ts` is a differentiable output ---------------------------------------

TS = jnp.array([0.2, 0.7, 1.1])
CONTROLLERS = {
    "constant": diffrax.ConstantStepSize(),
    "pid": diffrax.PIDController(rtol=1e-4, atol=1e-6),
    "stepto": diffrax.StepTo(ts=jnp.array([0.0, 0.3, 0.9, 1.3])),
}


def _saved_times_loss(times, ts, controller, adjoint):
    t0, t1, dt0 = times
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vf),
        revdiffrax.Reversible(diffrax.Tsit5()),
        t0,
        t1,
        None if isinstance(controller, diffrax.StepTo) else dt0,
        Y0,
        args=0.7,
        saveat=diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(t0=True, t1=True),
                diffrax.SubSaveAt(steps=True),
                diffrax.SubSaveAt(ts=ts),
            ]
        ),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=32,
    )
    loss = 0.0
    for ys, sts in zip(sol.ys, sol.ts):
        finite = jnp.isfinite(sts)  # (the unused `steps` slots are inf)
        weights = jnp.arange(1, sts.shape[0] + 1)
        loss = loss + jnp.sum(jnp.where(finite[:, None], ys, 0) ** 2)
        loss = loss + jnp.sum(jnp.where(finite, weights * sts, 0))
    return loss


def test_saved_times_are_differentiable():
    # The three controllers' solves are terms of one jitted loss, each with its own
    # times, so each controller's gradient is compared on its own: one compilation
    # per adjoint instead of one per adjoint and controller.
    times = (jnp.asarray(0.0), jnp.asarray(1.3), jnp.asarray(0.1))

    @eqx.filter_jit
    def grad(adjoint):
        def total(primals):
            return sum(
                _saved_times_loss(*primals[name], c, adjoint)
                for name, c in CONTROLLERS.items()
            )

        return jax.grad(total)({name: (times, TS) for name in CONTROLLERS})

    ref = grad(RCA_ALL_STEPS)
    ours = grad(revdiffrax.ReversibleAdjoint())
    for name in CONTROLLERS:
        _assert_close(ours[name], ref[name])


def test_saved_t1_gradient_issue_example():
    # The issue's example: d/dt1 was -0.27067 (RCA 0.72933, central FD 0.72926).
    def loss(t1, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y),
            revdiffrax.Reversible(diffrax.Tsit5()),
            0.0,
            t1,
            0.1,
            jnp.array([1.0, 0.3]),
            saveat=diffrax.SaveAt(t1=True),
            adjoint=adjoint,
            max_steps=32,
        )
        return jnp.sum(sol.ys**2) + jnp.sum(sol.ts)

    t1 = jnp.asarray(0.62)
    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compilation per adjoint
    ref = grad(t1, RCA_ALL_STEPS)
    ours = grad(t1, revdiffrax.ReversibleAdjoint())
    assert abs(float(ours) - float(ref)) < GRAD_RTOL * abs(float(ref))


# --- 2. clipped adaptive steps ------------------------------------------------------

CLIPPED = {
    "dtmax": diffrax.PIDController(rtol=1e-6, atol=1e-8, dtmax=0.05),
    "dtmin": diffrax.PIDController(rtol=1e-9, atol=1e-10, dtmin=0.05, force_dtmin=True),
    "jump_ts": diffrax.PIDController(rtol=1e-6, atol=1e-8, jump_ts=[0.37, 0.81]),
    "step_ts": diffrax.PIDController(rtol=1e-6, atol=1e-8, step_ts=[0.37, 0.81]),
    "dtmax+jump_ts": diffrax.PIDController(
        rtol=1e-6, atol=1e-8, dtmax=0.05, jump_ts=[0.37, 0.81]
    ),
}


def _clipped_loss(times, controller, adjoint):
    t0, t1, dt0 = times
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_vf),
        revdiffrax.Reversible(diffrax.Tsit5()),
        t0,
        t1,
        dt0,
        Y0,
        args=0.7,
        saveat=diffrax.SaveAt(ts=jnp.array([0.5, 0.9, 1.2])),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=128,
    )
    return jnp.sum(sol.ys**2)


CLIPPED_DT0 = {
    "dtmax": 0.1,
    "dtmin": 0.1,
    "jump_ts": None,
    "step_ts": 0.1,
    "dtmax+jump_ts": 0.1,
}


def test_clipped_step_time_gradients():
    # Every controller's solve is a term of one jitted loss, each with its own
    # times, so each controller's gradient is compared on its own: one compilation
    # per adjoint instead of one per adjoint and controller.
    def times(dt0):
        dt0 = None if dt0 is None else jnp.asarray(dt0)
        return (jnp.asarray(0.0), jnp.asarray(1.3), dt0)

    @eqx.filter_jit
    def grad(adjoint):
        def total(primals):
            return sum(
                _clipped_loss(primals[name], c, adjoint) for name, c in CLIPPED.items()
            )

        return jax.grad(total)({name: times(CLIPPED_DT0[name]) for name in CLIPPED})

    ref = grad(RCA_ALL_STEPS)
    ours = grad(revdiffrax.ReversibleAdjoint())
    for name in CLIPPED:
        _assert_close(ours[name], ref[name])


def test_store_rejected_steps_refused_only_when_times_are_differentiated():
    c = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=1e-6, atol=1e-8), store_rejected_steps=4
    )
    times = (jnp.asarray(0.0), jnp.asarray(1.3), jnp.asarray(0.1))
    adjoint = revdiffrax.ReversibleAdjoint()
    with pytest.raises(NotImplementedError, match="RecursiveCheckpointAdjoint"):
        jax.grad(_clipped_loss)(times, c, adjoint)
    # Without the time inputs differentiated, it is not refused.
    args_grad = jax.grad(
        lambda a: jnp.sum(
            diffrax.diffeqsolve(
                diffrax.ODETerm(_vf),
                revdiffrax.Reversible(diffrax.Tsit5()),
                0.0,
                1.3,
                0.1,
                Y0,
                args=a,
                stepsize_controller=c,
                adjoint=adjoint,
                max_steps=128,
            ).ys
            ** 2
        )
    )(0.7)
    assert np.isfinite(float(args_grad))


# --- 3. SDEs with differentiated `SaveAt(ts)` -----------------------------------


@pytest.mark.parametrize(
    "solver, stepto",
    [
        (revdiffrax.Reversible(diffrax.Heun()), False),
        (revdiffrax.ReversibleHeun(), True),
    ],
    ids=["Reversible(Heun)-constant", "ReversibleHeun-stepto"],
)
def test_sde_saveat_ts_gradient(solver, stepto):
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(2,), key=jax.random.PRNGKey(0)
    )
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(lambda t, y, args: -args * y),
        diffrax.ControlTerm(lambda t, y, args: 0.3 * jnp.diag(y), bm),
    )
    if stepto:
        controller, dt0 = diffrax.StepTo(ts=jnp.linspace(0.0, 1.0, 13)), None
    else:
        controller, dt0 = diffrax.ConstantStepSize(), 0.1

    @eqx.filter_jit
    def grad(ts, args, adjoint):
        def loss(ts, args):
            sol = diffrax.diffeqsolve(
                terms,
                solver,
                0.0,
                1.0,
                dt0,
                Y0,
                args=args,
                saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=controller,
                adjoint=adjoint,
                max_steps=32,
            )
            return jnp.sum(sol.ys**2) + jnp.sum(sol.ts**2)

        return jax.grad(loss, argnums=(0, 1))(ts, args)

    ts, args = jnp.array([0.22, 0.51, 0.9]), jnp.asarray(0.7)
    ref = grad(ts, args, RCA_ALL_STEPS)
    ours = grad(ts, args, revdiffrax.ReversibleAdjoint())
    _assert_close(ours, ref)


# --- 4. closures inside wrapper terms -------------------------------------------


def _closure_terms(kind, model, scale):
    ts = jnp.linspace(0.0, 1.0, 11)
    path = diffrax.LinearInterpolation(ts, jnp.stack([ts, jnp.sin(3 * ts)], -1))

    def vf(t, y, args):
        return scale * model(y).reshape(2, 2)

    if kind == "to_ode":
        return diffrax.ControlTerm(vf, path).to_ode()
    if kind == "multi_to_ode":
        drift = diffrax.ODETerm(lambda t, y, args: -scale * y)
        return diffrax.MultiTerm(drift, diffrax.ControlTerm(vf, path).to_ode())
    if kind == "callable_control":
        # A control given as a function of (t0, t1), closed over `scale`.
        control = lambda t0, t1: scale * jnp.stack([t1 - t0, jnp.sin(t1) - jnp.sin(t0)])
        return diffrax.ControlTerm(vf, control)
    assert kind == "weakly_diagonal"
    with pytest.warns(UserWarning, match="deprecated"):
        term = diffrax.WeaklyDiagonalControlTerm(
            lambda t, y, args: scale * model(y)[:2], path
        )
    return term.to_ode()


CLOSURE_KINDS = ("to_ode", "multi_to_ode", "callable_control", "weakly_diagonal")


def test_closure_inside_wrapper_terms():
    # Every kind's solve is a term of one jitted loss, each with its own (model,
    # scale), so each kind's gradient is compared on its own: one compilation per
    # adjoint.
    model = eqx.nn.MLP(2, 4, 8, 1, key=jax.random.PRNGKey(1))

    def loss(model, scale, kind, adjoint):
        sol = diffrax.diffeqsolve(
            _closure_terms(kind, model, scale),
            revdiffrax.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.1,
            Y0,
            adjoint=adjoint,
            max_steps=16,
        )
        return jnp.sum(sol.ys**2)

    def total(primals, adjoint):
        return sum(loss(*primals[kind], kind, adjoint) for kind in CLOSURE_KINDS)

    primals = {kind: (model, jnp.asarray(0.8)) for kind in CLOSURE_KINDS}
    ref, ours = _grads_per_adjoint(
        total,
        primals,
        (RCA_ALL_STEPS, revdiffrax.ReversibleAdjoint()),
    )
    for kind in CLOSURE_KINDS:
        _assert_close(ours[kind], ref[kind], kind)


def test_function_in_args_closed_over_parameters():
    # `args` holding a function of the state that closes over the parameters: a
    # lambda and a `functools.partial`, each with its own `p` in one jitted loss.
    def model(p, y):
        return p * jnp.tanh(y)

    def loss(p, kind, adjoint):
        f = (lambda y: model(p, y)) if kind == "lambda" else ft.partial(model, p)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -args(y)),
            revdiffrax.Reversible(diffrax.Heun()),
            0.0,
            1.0,
            0.1,
            Y0,
            args=f,
            adjoint=adjoint,
            max_steps=16,
        )
        return jnp.sum(sol.ys**2)

    kinds = ("lambda", "partial")

    def total(primals, adjoint):
        return sum(loss(primals[kind], kind, adjoint) for kind in kinds)

    primals = {kind: jnp.array([0.7, 1.1]) for kind in kinds}
    ref, ours = _grads_per_adjoint(
        total,
        primals,
        (RCA_ALL_STEPS, revdiffrax.ReversibleAdjoint()),
    )
    for kind in kinds:
        _assert_close(ours[kind], ref[kind], kind)


def test_closure_in_underdamped_langevin_grad_f():
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(2,), key=jax.random.PRNGKey(0)
    )
    diffusion = diffrax.UnderdampedLangevinDiffusionTerm(1.0, 1.0, bm)

    @eqx.filter_jit
    def grad(p, adjoint):
        def loss(p):
            drift = diffrax.UnderdampedLangevinDriftTerm(1.0, 1.0, lambda x, a: p * x)
            sol = diffrax.diffeqsolve(
                diffrax.MultiTerm(drift, diffusion),
                revdiffrax.Reversible(diffrax.Heun()),
                0.0,
                1.0,
                0.1,
                (Y0, jnp.array([0.0, 0.1])),
                adjoint=adjoint,
                max_steps=16,
            )
            return jnp.sum(sol.ys[0] ** 2)

        return jax.grad(loss)(p)

    p = jnp.array([0.7, 1.1])
    ref = grad(p, RCA_ALL_STEPS)
    ours = grad(p, revdiffrax.ReversibleAdjoint())
    _assert_close(ours, ref)


def _stepto_loss(t1, adjoint, traced_grid):
    grid = jnp.linspace(0.0, 1.0, 11)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: -y + jnp.sin(t)),
        revdiffrax.Reversible(diffrax.Heun()),
        0.0,
        t1,
        None,
        jnp.array([1.0]),
        stepsize_controller=diffrax.StepTo(ts=t1 * grid if traced_grid else grid),
        adjoint=adjoint,
        max_steps=16,
    )
    return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]


def test_differentiated_controller_arrays_refused():
    """A `StepTo` grid built from a differentiated `t1` (found by `benchmarks.fuzz`):
    RCA differentiates through the grid (0.198208, as central differences), the
    reversible backward pass took it as a constant and returned 0.195409 silently.
    Now refused, naming the fix; a constant grid is unaffected."""
    t1 = jnp.asarray(1.0)
    with pytest.raises(NotImplementedError, match="RecursiveCheckpointAdjoint"):
        jax.grad(_stepto_loss)(t1, revdiffrax.ReversibleAdjoint(), True)
    grad = jax.jit(jax.grad(_stepto_loss), static_argnums=(1, 2))
    got = grad(t1, revdiffrax.ReversibleAdjoint(), False)
    want = grad(t1, RCA_ALL_STEPS, False)
    np.testing.assert_allclose(got, want, rtol=GRAD_RTOL)


def _vmapped_ys_and_ts_loss(ts, y0, adjoint, solver):
    def one(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t)),
            solver,
            0.0,
            1.0,
            0.25,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2) + jnp.sum(jnp.sin(3 * sol.ts))

    return jnp.sum(jax.vmap(one)(y0))


# The parasitic-mode check happened to batch the outputs; without it, or with a
# solver it does not apply to, the saved times counted twice.
VMAP_CASES = {
    "Reversible(Midpoint),parasitic_tol=None": (
        revdiffrax.Reversible(diffrax.Midpoint()),
        revdiffrax.ReversibleAdjoint(parasitic_tol=None),
    ),
    "LeapfrogMidpoint": (revdiffrax.LeapfrogMidpoint(), revdiffrax.ReversibleAdjoint()),
}


def test_vmapped_saved_times_counted_once():
    # Both cases' solves are terms of one jitted loss (per adjoint: ours, then
    # DirectAdjoint), each with its own `ts`, so each case is compared on its own.
    ts, y0 = jnp.array([0.6, 0.9]), jnp.array([1.0, 2.0])

    def losses(ts_by_case, direct):
        return {
            name: _vmapped_ys_and_ts_loss(
                ts_by_case[name],
                y0,
                diffrax.DirectAdjoint() if direct else adjoint,
                solver,
            )
            for name, (solver, adjoint) in VMAP_CASES.items()
        }

    def total(ts_by_case, direct):
        return sum(losses(ts_by_case, direct).values())

    primals = {name: ts for name in VMAP_CASES}
    ours, direct = _grads_per_adjoint(total, primals, (False, True))
    # The reference itself, by central differences (one compilation for every case
    # and every shifted `ts`).
    jit_losses = jax.jit(losses, static_argnums=1)
    eps = 1e-6
    fd = {name: [] for name in VMAP_CASES}
    for i in range(len(ts)):
        plus = jit_losses({name: ts.at[i].add(eps) for name in VMAP_CASES}, False)
        minus = jit_losses({name: ts.at[i].add(-eps) for name in VMAP_CASES}, False)
        for name in VMAP_CASES:
            fd[name].append((plus[name] - minus[name]) / (2 * eps))
    for name in VMAP_CASES:
        _assert_close(ours[name], direct[name], name)
        np.testing.assert_allclose(
            direct[name], jnp.stack(fd[name]), rtol=1e-7, err_msg=name
        )
