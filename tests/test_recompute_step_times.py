"""`ReversibleAdjoint(step_times="recompute")` (and "auto"): the step
times of an adaptive solve re-run on the backward pass in segments, from restart
points stored every k accepted steps, instead of a record of `max_steps` times
(issue 22: per-sample solves under `jax.vmap`)."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
import revdiffrax
from helpers import RCA_ALL_STEPS, tree_rel_err
from revdiffrax._adjoint import rerun


T1 = 10.0
CONTROLLER = diffrax.PIDController(rtol=1e-5, atol=1e-7)


def _pendulum(t, y, args):
    return jnp.stack([y[1], -args[0] * jnp.sin(y[0]) - args[1] * y[1]])


def _loss(
    y0, args, *, solver, adjoint, saveat, max_steps=256, event=None, t1=T1,
    controller=CONTROLLER,
):  # fmt: skip
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulum),
        solver,
        0.0,
        t1,
        0.3,
        y0,
        args=args,
        adjoint=adjoint,
        stepsize_controller=controller,
        saveat=saveat,
        max_steps=max_steps,
        event=event,
    )
    ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0)  # (`SaveAt(steps)` pads inf)
    return jnp.sum(ys**2 * jnp.arange(1, 3)), sol.stats


def _grad(adjoint, solver, saveat, y0, args, **kwargs):
    def loss(y0_, args_):
        return _loss(
            y0_, args_, solver=solver, adjoint=adjoint, saveat=saveat, **kwargs
        )

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(y0, args)


class _CountReruns:
    """Counts (at trace time) the backward passes that re-run segments."""

    def __init__(self, monkeypatch):
        self.count = 0
        last = rerun.Rerun.last

        def counted(self_):
            self.count += 1
            return last(self_)

        monkeypatch.setattr(rerun.Rerun, "last", counted)


Y0 = jnp.array([1.0, 0.2])
ARGS = jnp.array([2.0, 0.1])
SAVEATS = {
    "t1": diffrax.SaveAt(t1=True),
    "ts": diffrax.SaveAt(ts=jnp.linspace(0.5, T1, 7)),
}


def _all_outputs(t1):
    """`SaveAt(t1)`, `SaveAt(ts)` and `SaveAt(steps)` at once."""
    ts = jnp.linspace(0.1, 0.95 * t1, 5)
    subs = (
        diffrax.SubSaveAt(t1=True),
        diffrax.SubSaveAt(ts=ts),
        diffrax.SubSaveAt(steps=True),
    )
    return diffrax.SaveAt(subs=subs)


def _sum_all(ys):
    return sum(jnp.sum(jnp.where(jnp.isfinite(y), y, 0) ** 2) for y in ys)


# (solver, checkpoint_every, t1, controller, max_steps): 40 accepted steps (and 15
# rejected) in segments of 7; 65 (and 10) in segments of k from `max_steps = 96`.
CASES = {
    "Reversible(Tsit5), k=7": (
        revdiffrax.Reversible(diffrax.Tsit5()), 7, T1, CONTROLLER, 64
    ),
    "ReversibleHeun, k from max_steps": (
        revdiffrax.ReversibleHeun(), None, 2.0,
        diffrax.PIDController(rtol=1e-3, atol=1e-5), 96,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_rca(case, monkeypatch):
    """Several segments, a partial last one, rejected steps, `SaveAt(t1, ts,
    steps)`: the gradients with respect to y0 and args of RCA through the same
    solver."""
    solver, every, t1, controller, max_steps = CASES[case]
    saveat = _all_outputs(t1)

    def grad(adjoint):
        def loss(y0, args):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(_pendulum), solver, 0.0, t1, 0.3, y0, args=args,
                adjoint=adjoint, stepsize_controller=controller, saveat=saveat,
                max_steps=max_steps,
            )  # fmt: skip
            return _sum_all(sol.ys), sol.stats

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(Y0, ARGS)

    counter = _CountReruns(monkeypatch)
    adjoint = revdiffrax.ReversibleAdjoint(
        step_times="recompute", checkpoint_every=every
    )
    grads, stats = grad(adjoint)
    expected, rca_stats = grad(RCA_ALL_STEPS)
    assert counter.count == 1
    assert stats["num_rejected_steps"] > 0
    k = every or rerun.recompute_every(
        adjoint, controller, _Shapes(solver, controller), max_steps,
        event=None, diff_times=False, axes=frozenset(), continued=False,
    )  # fmt: skip
    assert k is not None and stats["num_accepted_steps"] > k
    assert stats["num_accepted_steps"] % k != 0  # a partial last segment
    assert stats["num_accepted_steps"] == rca_stats["num_accepted_steps"]
    assert tree_rel_err(grads, expected) < 1e-9


class _Shapes:
    """The loop state fields that `recompute_every` sizes, for a solver."""

    def __init__(self, solver, controller):
        terms = diffrax.ODETerm(_pendulum)
        self.y = Y0
        self.solver_state = solver.init(terms, 0.0, 0.3, Y0, ARGS)
        order = solver.error_order(terms)
        _, self.controller_state = controller.init(
            terms, 0.0, T1, Y0, 0.3, ARGS, solver.func, order
        )
        self.tprev = self.tnext = jnp.asarray(0.0)
        self.num_steps = self.num_rejected_steps = 0


def test_vmap_gradients_equal_rca(monkeypatch):
    """Per-sample solves under `jax.vmap`, whose segments start at different
    backward iterations (the samples take different numbers of steps)."""
    solver = revdiffrax.Reversible(diffrax.Tsit5())
    y0s = jnp.array([[1.0, 0.2], [2.5, -0.3], [0.1, 0.0]])
    saveat = SAVEATS["ts"]

    def grads(adjoint):
        def loss(y0, args):
            return _loss(y0, args, solver=solver, adjoint=adjoint, saveat=saveat)[0]

        grad = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None))
        return jax.jit(grad)(y0s, ARGS)

    counter = _CountReruns(monkeypatch)
    got = grads(
        # `drift_tol`: every sample's re-runs must also match its forward pass.
        revdiffrax.ReversibleAdjoint(
            step_times="recompute", checkpoint_every=5, drift_tol=1e-6
        )
    )
    assert counter.count >= 1
    expected = grads(RCA_ALL_STEPS)
    assert tree_rel_err(got, expected) < 1e-9


def test_auto_records_out_of_scope(monkeypatch):
    """ "auto" (the default) recomputes where that can save 64 KiB
    (`max_steps=65536` for one float64 solve; not 4096, 16 KiB, where one more
    forward solve would buy too little), records the step times with an event (out
    of scope), and an explicit "recompute" there, or with a differentiated `t1`, is
    refused by name (all at trace time)."""
    solver = revdiffrax.Reversible(diffrax.Tsit5())
    event = diffrax.Event(lambda t, y, args, **kw: y[0] < -0.5)
    counter = _CountReruns(monkeypatch)
    saveat = SAVEATS["t1"]

    def trace(adjoint, **kwargs):
        def loss(y0, args):
            return _loss(
                y0, args, solver=solver, adjoint=adjoint, saveat=saveat, **kwargs
            )

        return jax.eval_shape(jax.grad(loss, has_aux=True), Y0, ARGS)

    auto = revdiffrax.ReversibleAdjoint(step_times="auto")
    assert revdiffrax.ReversibleAdjoint().step_times == "auto"
    trace(auto, max_steps=65536)
    assert counter.count == 1  # ("auto" recomputes without the event)
    trace(auto, max_steps=4096)  # (at most 16 KiB to save)
    assert counter.count == 1
    trace(auto, event=event, max_steps=65536)
    assert counter.count == 1
    explicit = revdiffrax.ReversibleAdjoint(step_times="recompute")
    with pytest.raises(ValueError, match='step_times="record"'):
        trace(explicit, event=event)

    def loss_t1(t1):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_pendulum), solver, 0.0, t1, 0.3, Y0, args=ARGS,
            adjoint=explicit, stepsize_controller=CONTROLLER, max_steps=256,
        )  # fmt: skip
        return jnp.sum(sol.ys)

    with pytest.raises(ValueError, match="differentiated"):
        jax.eval_shape(jax.grad(loss_t1), T1)
    with pytest.raises(ValueError, match="step_times"):
        revdiffrax.ReversibleAdjoint(step_times="never")  # pyright: ignore


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_snap_recovers_times_from_their_low_bits(dtype):
    """`rerun.snap` returns the float with the recorded low bits nearest to an
    approximation up to a quarter window away (2^14 units in the last place in
    float32), on both sides of zero, and says how far it moved."""
    key1, key2 = jax.random.split(jax.random.key(0))
    scales = 10.0 ** jnp.arange(-3, 3).repeat(34)[:200]
    special = jnp.array([0.0, 1e-30, -1e-30, 1.0, -1.0], dtype)
    exact = jnp.concatenate([jax.random.normal(key1, (200,), dtype) * scales, special])
    ulps = jax.random.randint(key2, exact.shape, -(2**14), 2**14 + 1)
    ordered = rerun._ordered(exact)
    approx = rerun._from_ordered(ordered + ulps.astype(ordered.dtype), exact.dtype)
    snapped, moved = rerun.snap(approx, rerun.low_bits(exact))
    assert snapped.dtype == exact.dtype
    assert jnp.array_equal(snapped, exact) and jnp.array_equal(moved, -ulps)


def test_rerun_times_are_snapped_to_the_forwards(monkeypatch):
    """A re-run whose step times differ slightly from the forward's (here: made
    to start each segment with a step 1e-9 longer; XLA's differing fused
    multiply-adds do the same at 1e-12) gives the forward's times bitwise after
    snapping: the gradient equals "record"'s to rounding, and no mismatch is
    reported (without snapping: both about 1e-9)."""
    solver = revdiffrax.Reversible(diffrax.Tsit5())
    saveat = SAVEATS["ts"]
    record = _grad(
        revdiffrax.ReversibleAdjoint(step_times="record"), solver, saveat, Y0, ARGS
    )
    restart_state, load = rerun.Rerun._restart_state, rerun.Rerun.load

    def perturbed(self, a):
        state, before = restart_state(self, a)
        dt = state.tnext - state.tprev
        return eqx.tree_at(
            lambda s: s.tnext, state, state.tprev + dt * (1 + 1e-9)
        ), before

    mismatches = []

    def logged(self, a, target):
        segment, mismatch = load(self, a, target)
        jax.debug.callback(mismatches.append, mismatch)
        return segment, mismatch

    monkeypatch.setattr(rerun.Rerun, "_restart_state", perturbed)
    monkeypatch.setattr(rerun.Rerun, "load", logged)
    adjoint = revdiffrax.ReversibleAdjoint(step_times="recompute", checkpoint_every=7)
    recomputed = _grad(adjoint, solver, saveat, Y0, ARGS)
    assert len(mismatches) > 3 and all(m == 0 for m in mismatches)
    assert tree_rel_err(recomputed[0], record[0]) < 1e-13


def test_mismatched_rerun_is_reported(monkeypatch):
    """A re-run that does not end where the forward pass did (here: made to start
    its first step elsewhere) is reported by the drift check, not silently
    used."""
    restart_state = rerun.Rerun._restart_state

    def perturbed(self, a):
        state, before = restart_state(self, a)
        return eqx.tree_at(lambda s: s.tnext, state, state.tnext * 1.37), before

    monkeypatch.setattr(rerun.Rerun, "_restart_state", perturbed)
    drifts = []
    adjoint = revdiffrax.ReversibleAdjoint(
        step_times="recompute",
        checkpoint_every=7,  # (the last segment's times are recorded, not re-run)
        drift_tol=None,
        drift_callback=drifts.append,
    )
    solver = revdiffrax.Reversible(diffrax.Tsit5())
    jax.block_until_ready(_grad(adjoint, solver, SAVEATS["t1"], Y0, ARGS))
    assert len(drifts) == 1 and not drifts[0] < 1e-3


# Four times diffrax's default: the record grows like `max_steps`, "auto"'s restart
# points like its square root, and its record of the times' low halves like half
# of it, so the difference shows above the rest of the gradient's memory.
MAX_STEPS = 16384


def _neural_ode_memory(step_times: str, monkeypatch) -> int:
    """Compiled temp memory of a vmapped neural-ODE gradient (batch 16, float32,
    `max_steps=MAX_STEPS`)."""
    mlp = eqx.nn.MLP(2, 2, 16, 2, activation=jax.nn.softplus, key=jax.random.key(0))
    mlp = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, mlp
    )
    adjoint = revdiffrax.ReversibleAdjoint(step_times=step_times)  # pyright: ignore
    ts = jnp.linspace(0.0, 1.0, 10, dtype=jnp.float32)

    def loss(model, y0s):
        def one(y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, m: m(y)),
                revdiffrax.Reversible(diffrax.Tsit5()),
                ts[0], ts[-1], ts[1], y0, args=model,
                stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-6),
                saveat=diffrax.SaveAt(ts=ts), adjoint=adjoint, max_steps=MAX_STEPS,
            ).ys  # fmt: skip

        return jnp.mean(jax.vmap(one)(y0s) ** 2)

    y0s = jnp.ones((16, 2), jnp.float32)
    params, static = eqx.partition(mlp, eqx.is_array)
    grad = jax.jit(jax.grad(lambda p, y: loss(eqx.combine(p, static), y)))
    counter = _CountReruns(monkeypatch)
    compiled = grad.lower(params, y0s).compile()
    assert counter.count == (0 if step_times == "record" else 1)
    return compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore


def test_recompute_lowers_vmap_memory(monkeypatch):
    """Without the record of `max_steps` times per sample, "auto" (which recomputes
    here) needs less compiled temp memory than "record"."""
    record = _neural_ode_memory("record", monkeypatch)
    auto = _neural_ode_memory("auto", monkeypatch)
    # The record alone: 16384 float32 times for each of 16 samples, 1 MiB, of
    # which "auto" keeps the low halves of the bits (512 KiB).
    assert auto < record - 384 * 1024
