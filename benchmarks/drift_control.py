"""Drift control: gradient error, memory and time of
`revdiffrax.ReversibleAdjoint(checkpoint_every=k)` in float32 and float64.

For coupling in {0.9, 0.99, 0.999} and k in {None, 10, 100, 1000}, on

(a) the double pendulum model of `experiments/double_pendulum.py` (MLP vector field,
    width 10, adaptive `Reversible(Bosh3())` with PIDController(1e-6, 1e-6), loss on
    the data at 500 times over 2 s; the MLP is first trained for `--pretrain`
    iterations so that it has learnt the (chaotic) dynamics);
(b) the decaying linear system y' = -y, y in R^8, 1,000 steps of
    `Reversible(Midpoint())` over [0, 10];
(c) the medium neural ODE of `benchmarks/adjoints.py` (16-d state, batch of 64 in y,
    MLP width 64 depth 2, `Reversible(Tsit5())`, 1,000 steps over [0, 1]);

prints, per case, the relative gradient error (2-norm over all parameters and y0)
against `diffrax.RecursiveCheckpointAdjoint` through the same solver in float64,
the largest per-segment reconstruction drift, the compiled temporary memory and the
median gradient time; and RecursiveCheckpointAdjoint's own float32 error. The k
that `revdiffrax.choose_checkpoint_every`'s rule picks (the largest k with drift
<= 100 eps) is marked, and checked against the target: error within 10x of the
float32 error of the stored-state adjoints (RecursiveCheckpointAdjoint and, because
diffrax 0.7.2's RecursiveCheckpointAdjoint can be wrong with `SaveAt(ts=...)`,
DirectAdjoint), time within 1.2x of k=None.

    python benchmarks/drift_control.py [--data ../shared/data/real_double_pend_h_1.txt]
        [--cases abc] [--repeats 5] [--quick]
"""

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import revdiffrax

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.data import load_motion_capture, PENDULUM_FORMAT
from experiments.double_pendulum import simulate_pendulum
from experiments.harness import compile_timed, interleaved_times, tree_rel_error
from experiments.problem import interpolate_steps
from experiments.report import markdown_table
from jaxtyping import PyTree

# The rule of `revdiffrax.choose_checkpoint_every`, applied to the drifts measured
# here (which also measures gradient errors, so it compiles its own gradients).
from revdiffrax._checkpoint_choice import _default_drift_tol, _pick


COUPLINGS = (0.9, 0.99, 0.999)
KS = (None, 10, 100, 1000)


def cast(tree: PyTree, dtype: jnp.dtype) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree
    )


class Case(eqx.Module):
    """`loss(params, data, solver, adjoint)`: gradients are taken with respect to
    `params`; `data` (times, observations) is cast to the same dtype but not
    differentiated; `base()` makes the base solver."""

    name: str = eqx.field(static=True)
    loss: Callable = eqx.field(static=True)
    base: Callable[[], diffrax.AbstractSolver] = eqx.field(static=True)
    params: PyTree
    data: PyTree


# ---------------------------------------------------------------------------
# (a) double pendulum
# ---------------------------------------------------------------------------


def _pendulum_data(
    data_path: str | None, n_points: int, t_max: float
) -> tuple[tuple[jax.Array, jax.Array], str]:
    """(times, observations) of the double pendulum, and where they come from."""
    if data_path is None:
        tmp = tempfile.mkdtemp()
        data_path = simulate_pendulum(os.path.join(tmp, "simulated_double_pend.txt"))
        source = "simulated"
    else:
        source = os.path.basename(data_path)
    ts, ys = load_motion_capture(
        data_path, PENDULUM_FORMAT, t_max=t_max, n_points=n_points
    )
    return (jnp.asarray(ts), jnp.asarray(ys)), source


def _pendulum_loss(mlp, data, solver, adjoint):
    ts, ys = data
    dtype = ts.dtype
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, m: m(y)),
        solver,
        ts[0],
        ts[-1],
        ts[1] - ts[0],
        ys[0],
        args=mlp,
        saveat=diffrax.SaveAt(steps=True),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
        adjoint=adjoint,
        max_steps=2000,
    )
    # Linear interpolation of the steps onto the data times (as in the experiment;
    # `SaveAt(ts=...)` would hit a diffrax 0.7.2 checkpointing bug in the reference).
    pred = interpolate_steps(sol, ys[0], ts)
    return jnp.mean((pred - ys) ** 2).astype(dtype)


def _pretrain(mlp: eqx.nn.MLP, data, iters: int) -> eqx.nn.MLP:
    """`iters` Adam steps on the pendulum data with `ReversibleAdjoint`."""
    solver = revdiffrax.Reversible(diffrax.Bosh3())
    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(mlp, eqx.is_array))

    @eqx.filter_jit
    def step(mlp, state):
        g = eqx.filter_grad(
            lambda m: _pendulum_loss(m, data, solver, revdiffrax.ReversibleAdjoint())
        )(mlp)
        updates, state = opt.update(g, state, eqx.filter(mlp, eqx.is_array))
        return eqx.apply_updates(mlp, updates), state

    for _ in range(iters):
        mlp, state = step(mlp, state)
    return mlp


def pendulum_case(
    data_path: str | None, n_points: int, t_max: float, pretrain: int
) -> Case:
    data, source = _pendulum_data(data_path, n_points, t_max)
    mlp = eqx.nn.MLP(4, 4, 10, 1, activation=jnp.tanh, key=jr.PRNGKey(0))
    if pretrain > 0:
        mlp = _pretrain(mlp, data, pretrain)
        solver = revdiffrax.Reversible(diffrax.Bosh3())
        rca = diffrax.RecursiveCheckpointAdjoint()
        final = float(_pendulum_loss(mlp, data, solver, rca))
        print(
            f"(a) pendulum ({source} data): pretrained {pretrain} iterations, "
            f"loss {final:.3e}\n"
        )
    return Case(
        "(a) double pendulum, adaptive Bosh3", _pendulum_loss, diffrax.Bosh3, mlp, data
    )


# ---------------------------------------------------------------------------
# (b) decaying linear system
# ---------------------------------------------------------------------------


def decay_case(num_steps: int) -> Case:
    def loss(params, data, solver, adjoint):
        del data
        y0, a = params
        dtype = y0.dtype
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: -a * y),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(10.0, dtype),
            jnp.asarray(10.0 / num_steps, dtype),
            y0,
            args=a,
            saveat=diffrax.SaveAt(ts=jnp.linspace(1.0, 10.0, 10).astype(dtype)),
            adjoint=adjoint,
            max_steps=num_steps,
        )
        # exp(-10) ~ 4.5e-5: rescale so that late outputs matter.
        weights = jnp.exp(jnp.linspace(1.0, 10.0, 10)).astype(dtype)
        return jnp.sum(weights[:, None] * sol.ys**2)

    params = (jnp.linspace(-1.0, 1.0, 8) + 0.1, jnp.asarray(1.0))
    return Case(
        f"(b) y' = -y, {num_steps} steps, Midpoint",
        loss,
        diffrax.Midpoint,
        params,
        None,
    )


# ---------------------------------------------------------------------------
# (c) medium neural ODE
# ---------------------------------------------------------------------------


def medium_case(num_steps: int, batch: int) -> Case:
    dim = 16
    mlp = eqx.nn.MLP(dim + 1, dim, 64, 2, activation=jnp.tanh, key=jr.PRNGKey(1))
    y0 = jr.normal(jr.PRNGKey(2), (batch, dim))

    def loss(params, data, solver, adjoint):
        del data
        mlp, y0 = params
        dtype = y0.dtype

        def field(t, y, mlp):
            tt = jnp.broadcast_to(jnp.asarray(t, dtype), y.shape[:-1] + (1,))
            return jax.vmap(mlp)(jnp.concatenate([tt, y], -1))

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            jnp.asarray(0.0, dtype),
            jnp.asarray(1.0, dtype),
            jnp.asarray(1.0 / num_steps, dtype),
            y0,
            args=mlp,
            adjoint=adjoint,
            max_steps=num_steps,
        )
        return jnp.mean(sol.ys**2)

    return Case(
        f"(c) medium neural ODE (16-d, batch {batch}), {num_steps} steps, Tsit5",
        loss,
        diffrax.Tsit5,
        (mlp, y0),
        None,
    )


# ---------------------------------------------------------------------------


def compile_grad(
    case: Case, dtype: jnp.dtype, coupling: float, adjoint: diffrax.AbstractAdjoint
) -> tuple[jax.stages.Compiled, PyTree, int]:
    """The compiled gradient (with respect to the params' float arrays) of one
    adjoint, its input and its compiled temporary memory."""
    params = cast(case.params, dtype)
    data = cast(case.data, dtype)
    solver = revdiffrax.Reversible(case.base(), coupling=coupling)
    diff, static = eqx.partition(params, eqx.is_inexact_array)

    def grad(d):
        def loss(d_):
            return case.loss(eqx.combine(d_, static), data, solver, adjoint)

        return jax.grad(loss)(d)

    compiled, _, mem = compile_timed(grad, diff)
    return compiled, diff, mem


def _stored_state_errors(
    case: Case, coupling: float, ref: PyTree, fns: dict
) -> tuple[float, float]:
    """float32 errors of RecursiveCheckpointAdjoint (also timed: added to `fns`)
    and DirectAdjoint against the float64 reference."""
    fn, x, _ = compile_grad(
        case, jnp.float32, coupling, diffrax.RecursiveCheckpointAdjoint()
    )
    fns["rca"] = (fn, x)
    rca_err = tree_rel_error(fn(x), ref, norm="2")
    # diffrax 0.7.2's RecursiveCheckpointAdjoint can be wrong with
    # `SaveAt(ts=...)` (see README); DirectAdjoint is the second opinion.
    fn, x, _ = compile_grad(case, jnp.float32, coupling, diffrax.DirectAdjoint())
    return rca_err, tree_rel_error(fn(x), ref, norm="2")


def _reversible_runs(
    case: Case, dtype: jnp.dtype, coupling: float, ref: PyTree, ks, fns: dict
) -> dict:
    """k -> [error, largest segment drift, temp memory] of ReversibleAdjoint
    (compiled gradients added to `fns` for timing)."""
    results = {}
    for k in ks:
        drifts = []
        adjoint = revdiffrax.ReversibleAdjoint(
            checkpoint_every=k, drift_callback=drifts.append
        )
        fn, x, mem = compile_grad(case, dtype, coupling, adjoint)
        g = fn(x)
        jax.effects_barrier()
        drift = max(float(np.max(np.asarray(d))) for d in drifts)
        results[k] = [tree_rel_error(g, ref, norm="2"), drift, mem]
        fns[k] = (fn, x)
    return results


def _summary_row(coupling, chosen, results, rca_err, direct_err, rca_time) -> tuple:
    """The float32 target: the rule's k against the stored-state adjoints."""
    err, _, _, t, t_min = results[chosen]
    t_none, t_none_min = results[None][3:]
    # The float32 error of a correct stored-state adjoint.
    baseline = min(rca_err, direct_err)
    met = err <= 10 * baseline and t <= 1.2 * t_none
    return (
        coupling,
        str(chosen),
        f"{err:.1e}",
        f"{rca_err:.1e}",
        f"{direct_err:.1e}",
        f"{err / max(baseline, 1e-300):.2f}",
        f"{t / t_none:.2f}",
        f"{t_min / t_none_min:.2f}",
        f"{1e3 * rca_time:.2f}",
        "met" if met else "NOT met",
    )


def run_case(
    case: Case, repeats: int, couplings: Sequence[float], ks: Sequence[int | None]
) -> tuple[list[tuple], list[tuple]]:
    """Table rows (every coupling, dtype and k) and float32 summary rows."""
    rows = []
    summary = []
    for coupling in couplings:
        fn, x, _ = compile_grad(
            case, jnp.float64, coupling, diffrax.RecursiveCheckpointAdjoint()
        )
        ref = fn(x)
        for dtype in (jnp.float32, jnp.float64):
            fns = {}
            rca_err = direct_err = None
            if dtype == jnp.float32:
                rca_err, direct_err = _stored_state_errors(case, coupling, ref, fns)
            results = _reversible_runs(case, dtype, coupling, ref, ks, fns)
            times = interleaved_times(fns, repeats)
            for k in ks:
                results[k].extend(times[k])
            # The rule of `revdiffrax.choose_checkpoint_every`.
            tol = _default_drift_tol(cast(case.params, dtype))
            chosen, _ = _pick({k: results[k][1] for k in ks}, tol)
            for k in ks:
                err, drift, mem, t, t_min = results[k]
                rows.append(
                    (
                        coupling,
                        jnp.dtype(dtype).name,
                        "None" if k is None else str(k),
                        f"{err:.1e}",
                        f"{drift:.1e}",
                        f"{mem / 2**20:.3f}",
                        f"{1e3 * t:.2f}",
                        f"{1e3 * t_min:.2f}",
                        "yes" if k == chosen else "",
                        "" if rca_err is None else f"{rca_err:.1e}",
                        "" if direct_err is None else f"{direct_err:.1e}",
                    )
                )
            if dtype == jnp.float32:
                summary.append(
                    _summary_row(
                        coupling, chosen, results, rca_err, direct_err, times["rca"][0]
                    )
                )
    return rows, summary


TABLE_HEADER = (
    "coupling",
    "dtype",
    "k",
    "grad rel. error",
    "max segment drift",
    "temp MiB",
    "grad ms (median)",
    "grad ms (min)",
    "rule's k",
    "RCA f32 error",
    "Direct f32 error",
)
SUMMARY_HEADER = (
    "coupling",
    "rule's k",
    "error",
    "RCA f32 error",
    "Direct f32 error",
    "error / best",
    "time / time(k=None), median",
    "same, min",
    "RCA f32 ms",
    "target",
)


def make_cases(args: argparse.Namespace) -> list[Case]:
    """The cases selected by `--cases`, small with `--quick`."""
    cases = []
    if "a" in args.cases:
        if args.quick:
            cases.append(pendulum_case(args.data, 50, 0.5, 0))
        else:
            cases.append(pendulum_case(args.data, 500, 2.0, args.pretrain))
    if "b" in args.cases:
        cases.append(decay_case(100 if args.quick else 1000))
    if "c" in args.cases:
        cases.append(medium_case(100, 4) if args.quick else medium_case(1000, 64))
    return cases


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="real_double_pend_h_1.txt")
    parser.add_argument("--cases", default="abc")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args(argv)

    cases = make_cases(args)
    couplings, ks = ((0.9,), (None, 10)) if args.quick else (COUPLINGS, KS)
    print(
        f"# Drift control benchmark\n\nMachine: {platform.machine()}, "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}); "
        f"jax {jax.__version__}, diffrax {diffrax.__version__}; median of "
        f"{args.repeats} after a warm-up call.\n"
    )
    for case in cases:
        start = time.perf_counter()
        rows, summary = run_case(case, args.repeats, couplings, ks)
        print(f"## {case.name}\n")
        print(markdown_table(TABLE_HEADER, rows))
        print(
            "\nfloat32 target (error <= 10x the float32 error of the stored-state "
            "adjoints, the better of RCA and Direct; time <= 1.2x k=None):\n"
        )
        print(markdown_table(SUMMARY_HEADER, summary))
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
