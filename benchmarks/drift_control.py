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
import math
import os
import platform
import statistics
import tempfile
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import revdiffrax  # noqa: E402

# The rule of `revdiffrax.choose_checkpoint_every`, applied to the drifts measured
# here (which also measures gradient errors, so it compiles its own gradients).
from revdiffrax._checkpoint_choice import _default_drift_tol, _pick  # noqa: E402


COUPLINGS = (0.9, 0.99, 0.999)
KS = (None, 10, 100, 1000)


def cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree
    )


def rel_error(g, ref):
    g = jax.tree_util.tree_leaves(g)
    ref = jax.tree_util.tree_leaves(ref)
    num = math.sqrt(
        sum(float(jnp.sum((a.astype(jnp.float64) - b) ** 2)) for a, b in zip(g, ref))
    )
    den = math.sqrt(sum(float(jnp.sum(b**2)) for b in ref))
    return num / den


class Case(eqx.Module):
    """`loss(params, data, solver, adjoint)`: gradients are taken with respect to
    `params`; `data` (times, observations) is cast to the same dtype but not
    differentiated; `base()` makes the base solver."""

    name: str = eqx.field(static=True)
    loss: object = eqx.field(static=True)
    base: object = eqx.field(static=True)
    params: object
    data: object


# ---------------------------------------------------------------------------
# (a) double pendulum
# ---------------------------------------------------------------------------


def pendulum_case(data_path, n_points, t_max, pretrain):
    from experiments.data import PENDULUM_FORMAT, load_motion_capture
    from experiments.double_pendulum import simulate_pendulum

    if data_path is None:
        tmp = tempfile.mkdtemp()
        data_path = simulate_pendulum(os.path.join(tmp, "simulated_double_pend.txt"))
        source = "simulated"
    else:
        source = os.path.basename(data_path)
    ts, ys = load_motion_capture(
        data_path, PENDULUM_FORMAT, t_max=t_max, n_points=n_points
    )
    mlp = eqx.nn.MLP(4, 4, 10, 1, activation=jnp.tanh, key=jr.PRNGKey(0))

    def loss(mlp, data, solver, adjoint):
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
        # Linear interpolation of the steps onto the data times (as in the
        # experiment; `SaveAt(ts=...)` would hit a diffrax 0.7.2 checkpointing bug
        # in the reference).
        step_ts = jnp.concatenate([ts[:1], sol.ts])
        step_ys = jnp.concatenate([ys[:1], sol.ys])
        finite = jnp.isfinite(step_ts)
        step_ts = jax.lax.stop_gradient(jnp.where(finite, step_ts, 2 * ts[-1] + 1))
        step_ys = jnp.where(finite[:, None], step_ys, 0)
        idx = jnp.clip(
            jnp.searchsorted(step_ts, ts, side="right") - 1, 0, len(step_ts) - 2
        )
        w = ((ts - step_ts[idx]) / (step_ts[idx + 1] - step_ts[idx]))[:, None]
        pred = step_ys[idx] + w * (step_ys[idx + 1] - step_ys[idx])
        return jnp.mean((pred - ys) ** 2).astype(dtype)

    data = (jnp.asarray(ts), jnp.asarray(ys))
    if pretrain > 0:
        solver = revdiffrax.Reversible(diffrax.Bosh3())
        opt = optax.adam(1e-2)
        state = opt.init(eqx.filter(mlp, eqx.is_array))

        @eqx.filter_jit
        def step(mlp, state):
            g = eqx.filter_grad(
                lambda m: loss(m, data, solver, revdiffrax.ReversibleAdjoint())
            )(mlp)
            updates, state = opt.update(g, state, eqx.filter(mlp, eqx.is_array))
            return eqx.apply_updates(mlp, updates), state

        for _ in range(pretrain):
            mlp, state = step(mlp, state)
        final = float(loss(mlp, data, solver, diffrax.RecursiveCheckpointAdjoint()))
        print(
            f"(a) pendulum ({source} data): pretrained {pretrain} iterations, "
            f"loss {final:.3e}\n"
        )
    return Case("(a) double pendulum, adaptive Bosh3", loss, diffrax.Bosh3, mlp, data)


# ---------------------------------------------------------------------------
# (b) decaying linear system
# ---------------------------------------------------------------------------


def decay_case(num_steps):
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


def medium_case(num_steps, batch):
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


def compile_grad(case, dtype, coupling, adjoint):
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

    compiled = jax.jit(grad).lower(diff).compile()
    mem = compiled.memory_analysis().temp_size_in_bytes
    return compiled, diff, mem


def interleaved_times(fns, repeats):
    """Median times of `fns` (name -> (compiled, input)), timed round-robin so that
    load changes on a shared machine hit every candidate alike."""
    for fn, x in fns.values():
        jax.block_until_ready(fn(x))  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, x) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def run_case(case, repeats, couplings, ks):
    rows = []
    summary = []
    for coupling in couplings:
        fn, x, _ = compile_grad(
            case, jnp.float64, coupling, diffrax.RecursiveCheckpointAdjoint()
        )
        ref = fn(x)
        for dtype in (jnp.float32, jnp.float64):
            name = jnp.dtype(dtype).name
            fns = {}
            if dtype == jnp.float32:
                fn, x, _ = compile_grad(
                    case, dtype, coupling, diffrax.RecursiveCheckpointAdjoint()
                )
                fns["rca"] = (fn, x)
                rca_err = rel_error(fn(x), ref)
                # diffrax 0.7.2's RecursiveCheckpointAdjoint can be wrong with
                # `SaveAt(ts=...)` (see README); DirectAdjoint is the second opinion.
                fn, x, _ = compile_grad(case, dtype, coupling, diffrax.DirectAdjoint())
                direct_err = rel_error(fn(x), ref)
            else:
                rca_err = direct_err = None
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
                results[k] = [rel_error(g, ref), drift, mem]
                fns[k] = (fn, x)
            times = interleaved_times(fns, repeats)
            rca_time = times["rca"][0] if "rca" in times else None
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
                        name,
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
                err, _, _, t, t_min = results[chosen]
                t_none, t_none_min = results[None][3:]
                # The float32 error of a correct stored-state adjoint.
                baseline = min(rca_err, direct_err)
                met = err <= 10 * baseline and t <= 1.2 * t_none
                summary.append(
                    (
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
                )
    return rows, summary


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="real_double_pend_h_1.txt")
    parser.add_argument("--cases", default="abc")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pretrain", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args(argv)

    couplings = COUPLINGS
    ks = KS
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
    if args.quick:
        couplings, ks = (0.9,), (None, 10)

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
        print(
            table(
                (
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
                ),
                rows,
            )
        )
        print(
            "\nfloat32 target (error <= 10x the float32 error of the stored-state "
            "adjoints, the better of RCA and Direct; time <= 1.2x k=None):\n"
        )
        print(
            table(
                (
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
                ),
                summary,
            )
        )
        print(f"\n({time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
