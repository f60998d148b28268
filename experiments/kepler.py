"""Learning the Kepler (two-body) problem with a Hamiltonian neural ODE.

The state is y = (q, p) in R^4 (relative position and momentum, units with
G M = 1). The model is a separable Hamiltonian H(q, p) = |p|^2 / 2 + V(|q|) with a
learned central potential V (an MLP R -> R of the radius, two hidden layers of
width 32, tanh), i.e. the neural ODE

    q' = p,    p' = -grad V(|q|),

whose exact flow conserves the learned energy. The training data are exact Kepler
orbits (from Kepler's equation, no numerical solve) with eccentricities 0.2, 0.4,
0.6, rotated by 0, 120 and 240 degrees, semi-major axis 1, sampled at 48 times per
period. Training uses segments of a quarter period starting at every 4th data time
of each orbit (36 segments, solved in one `jax.vmap`); the loss is the MSE of
(q, p) at the data times, the model being saved there with `SaveAt(ts=...)`, i.e.
through each solver's dense output.

The same model is trained with three reversible solvers, all with
`revdiffrax.ReversibleAdjoint()` and `PIDController(rtol, atol)`:

- `SymmetricComposition(AsynchronousLeapfrog(), order=4)` (time-symmetric family),
- `Reversible(Tsit5())` and `Reversible(Midpoint())` (McCallum-Foster, coupling
  0.999).

Reported per solver: the test error of the learned orbit (an unseen orbit, e=0.5
rotated by 60 degrees, over 5 periods, the learned model solved accurately with
Tsit5 at rtol=atol=1e-10), the drift of the learned energy along that orbit over
50 periods when solved with the training solver at the training tolerance (the
exact flow conserves it, so this is the solver's contribution), the true energy
error over the same run, the median training time per iteration (compilation and
one warm-up call excluded), the compile time, the compiled temp memory of the train
step, and the mean number of accepted steps per solve.

    python -m experiments.kepler                         # full run, results/kepler.md
    python -m experiments.kepler --quick --out /tmp/kepler
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import revdiffrax

from .harness import compile_step, peak_rss_mb, timed_training
from .report import fmt_bytes, machine_info


if TYPE_CHECKING:
    from matplotlib.figure import Figure


PERIOD = 2 * math.pi
TRAIN_ORBITS = ((0.2, 0.0), (0.4, 2 * math.pi / 3), (0.6, 4 * math.pi / 3))
TEST_ORBIT = (0.5, math.pi / 3)

SOLVERS = {
    "sc4": (
        "SymmetricComposition(AsynchronousLeapfrog(), 4)",
        lambda: revdiffrax.SymmetricComposition(
            revdiffrax.AsynchronousLeapfrog(), order=4
        ),
    ),
    "rev-tsit5": (
        "Reversible(Tsit5())",
        lambda: revdiffrax.Reversible(diffrax.Tsit5()),
    ),
    "rev-midpoint": (
        "Reversible(Midpoint())",
        lambda: revdiffrax.Reversible(diffrax.Midpoint()),
    ),
}
# Vector-field evaluations per fixed step: 3 leapfrog sub-steps; two base steps of
# 6 (Tsit5 without its FSAL stage, which fixed steps do not need) or 2 stages.
EVALS_PER_STEP = {"sc4": 3, "rev-tsit5": 12, "rev-midpoint": 4}
FIXED_EVALS_PER_PERIOD = 600


# ---------------------------------------------------------------------------
# Data: exact Kepler orbits
# ---------------------------------------------------------------------------


def kepler_orbit(e: float, angle: float, ts: np.ndarray) -> np.ndarray:
    """Exact orbit with eccentricity e, semi-major axis 1, pericentre at t = 0 in the
    direction `angle`: solves Kepler's equation E - e sin E = t by Newton."""
    ts = np.asarray(ts, dtype=np.float64)
    E = ts.copy()
    for _ in range(60):
        E = E - (E - e * np.sin(E) - ts) / (1 - e * np.cos(E))
    b = math.sqrt(1 - e**2)
    dE = 1 / (1 - e * np.cos(E))
    q = np.stack([np.cos(E) - e, b * np.sin(E)], axis=-1)
    p = np.stack([-np.sin(E) * dE, b * np.cos(E) * dE], axis=-1)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return np.concatenate([q @ rot.T, p @ rot.T], axis=-1)


def segments(
    orbits: np.ndarray, length: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training segments: `length` data intervals starting at every `stride`-th data
    time of each (periodic, one-period) orbit, wrapping around the period.

    Returns initial conditions (S, 4) and targets (S, length + 1, 4)."""
    num = orbits.shape[1] - 1  # the last time is one period: same point as the first
    starts = np.arange(0, num, stride)
    idx = (starts[:, None] + np.arange(length + 1)[None, :]) % num
    targets = np.concatenate([orbit[idx] for orbit in orbits])
    return targets[:, 0], targets


def true_energy(y: jax.Array) -> jax.Array:
    """The Kepler Hamiltonian |p|^2 / 2 - 1 / |q| (G M = 1)."""
    q, p = y[..., :2], y[..., 2:]
    return 0.5 * jnp.sum(p**2, axis=-1) - 1 / jnp.sqrt(jnp.sum(q**2, axis=-1))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class Potential(eqx.Module):
    """Learned central potential V(q) = MLP(|q|); the model is q' = p,
    p' = -grad V(q)."""

    mlp: eqx.nn.MLP

    def __init__(self, width: int, depth: int = 2, *, key: jax.Array):
        self.mlp = eqx.nn.MLP(
            1,
            "scalar",
            width,
            depth=depth,
            activation=jnp.tanh,
            dtype=jnp.float64,
            key=key,
        )

    def __call__(self, q: jax.Array) -> jax.Array:
        return self.mlp(jnp.sqrt(jnp.sum(q**2))[None])

    def energy(self, y: jax.Array) -> jax.Array:
        return 0.5 * jnp.sum(y[2:] ** 2) + self(y[:2])


def vector_field(t: jax.Array, y: jax.Array, model: Potential) -> jax.Array:
    """q' = p, p' = -grad V(q)."""
    del t
    q, p = y[:2], y[2:]
    return jnp.concatenate([p, -jax.grad(model)(q)])


def solve(
    model: Potential,
    solver: diffrax.AbstractSolver,
    y0: jax.Array,
    ts: np.ndarray,
    *,
    rtol: float,
    atol: float,
    adjoint: diffrax.AbstractAdjoint,
    max_steps: int,
    throw: bool = True,
) -> diffrax.Solution:
    """Solve from t = 0 to ts[-1], saving at the (NumPy) times `ts`."""
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        0.0,
        float(ts[-1]),
        0.05,
        y0,
        args=model,
        saveat=diffrax.SaveAt(ts=jnp.asarray(ts)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        adjoint=adjoint,
        max_steps=max_steps,
        throw=throw,
    )


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------


def train_one(
    key: str, args: argparse.Namespace, data: np.ndarray, ts: np.ndarray
) -> dict:
    """Train on all segments of `data` (saved at the times `ts`, from 0)."""
    label, make = SOLVERS[key]
    solver = make()
    adjoint = revdiffrax.ReversibleAdjoint()
    model = Potential(args.width, args.depth, key=jr.PRNGKey(args.seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    schedule = optax.cosine_decay_schedule(args.lr, args.iters, alpha=0.05)
    optim = optax.adam(schedule)
    opt_state = optim.init(params)
    ys_data = jnp.asarray(data)

    def loss_fn(params):
        m = eqx.combine(params, static)

        def one(y0):
            sol = solve(
                m,
                solver,
                y0,
                ts,
                rtol=args.rtol,
                atol=args.atol,
                adjoint=adjoint,
                max_steps=args.max_steps,
            )
            return sol.ys, sol.stats["num_accepted_steps"]

        pred, steps = jax.vmap(one)(ys_data[:, 0])
        return jnp.mean((pred - ys_data) ** 2), jnp.mean(steps)

    def step(params, opt_state):
        (loss, steps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, steps

    compiled = compile_step(step, params, opt_state)
    params, opt_state, log = timed_training(
        compiled.fn,
        params,
        opt_state,
        args.iters,
        desc=f"kepler {label}",
        progress=not args.no_progress,
        loss_format=".3e",
    )
    model = eqx.combine(params, static)
    return dict(
        key=key,
        solver=label,
        iters=args.iters,
        rtol=args.rtol,
        atol=args.atol,
        losses=log.losses,
        final_loss=log.losses[-1],
        mean_steps=float(np.mean(log.aux)),
        median_iter_s=float(np.median(log.iter_times)),
        mean_iter_s=float(np.mean(log.iter_times)),
        cpu_per_iter_s=log.cpu_s / args.iters,
        compile_s=compiled.compile_s,
        warmup_s=compiled.warmup_s,
        temp_bytes=compiled.temp_bytes,
        peak_rss_mb=peak_rss_mb(),
        **evaluate(model, solver, args, EVALS_PER_STEP[key]),
    )


def fixed_step_energy_drift(
    model: Potential,
    solver: diffrax.AbstractSolver,
    y0: jax.Array,
    periods: int,
    steps_per_period: int,
) -> np.ndarray:
    """|H_learned - H_learned(0)| after every step of a fixed-step solve."""
    n = periods * steps_per_period
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        0.0,
        periods * PERIOD,
        PERIOD / steps_per_period,
        y0,
        args=model,
        saveat=diffrax.SaveAt(steps=True, fn=lambda t, y, m: m.energy(y)),
        max_steps=n + 8,
        throw=False,
    )
    h = np.asarray(sol.ys)[:n]
    return np.abs(h - float(model.energy(y0)))


def _fixed_step_drift(
    model: Potential,
    solver: diffrax.AbstractSolver,
    y0: jax.Array,
    args: argparse.Namespace,
    evals: int,
) -> dict:
    """Learned-energy drift with fixed steps, at equal cost for every solver."""
    spp = FIXED_EVALS_PER_PERIOD // evals
    d = fixed_step_energy_drift(model, solver, y0, args.energy_periods, spp)
    d = np.where(np.isfinite(d), d, np.inf)
    k = len(d) // 10
    return dict(
        fixed_steps_per_period=spp,
        fixed_energy_drift=d[:: max(spp // 20, 1)].tolist(),
        # in periods: entry i of d is after step i + 1
        fixed_ts=((np.arange(len(d)) + 1) / spp)[:: max(spp // 20, 1)].tolist(),
        fixed_energy_drift_first=float(np.max(d[:k])),
        fixed_energy_drift_last=float(np.max(d[-k:])),
    )


def _orbit_rel_error(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """RMS position error over the first k saved times / RMS radius."""
    err = np.sum((pred[:k, :2] - true[:k, :2]) ** 2, axis=-1)
    return float(np.sqrt(np.mean(err) / np.mean(np.sum(true[:k, :2] ** 2, -1))))


def _energy_report(model: Potential, sol: diffrax.Solution) -> dict:
    """Learned-energy drift and true energy error along the long adaptive run."""
    ys = np.asarray(sol.ys)
    finite = bool(np.all(np.isfinite(ys)))
    learned_h = np.asarray(jax.vmap(model.energy)(jnp.asarray(ys)))
    h_true = np.asarray(true_energy(jnp.asarray(ys)))
    drift = np.abs(learned_h - learned_h[0])
    n = len(drift) // 10
    inf = float("inf")
    return dict(
        learned_energy_drift=drift.tolist(),
        learned_energy_drift_first=float(np.max(drift[:n])) if finite else inf,
        learned_energy_drift_last=float(np.max(drift[-n:])) if finite else inf,
        true_energy_error_last=float(np.max(np.abs(h_true[-n:] + 0.5)))
        if finite
        else inf,
        long_steps=int(sol.stats["num_accepted_steps"]),
        long_solve_ok=bool(sol.result == diffrax.RESULTS.successful),
    )


def evaluate(
    model: Potential,
    solver: diffrax.AbstractSolver,
    args: argparse.Namespace,
    evals_per_step: int,
) -> dict:
    """Test error of the learned orbit and long-horizon energy behaviour."""
    e, angle = TEST_ORBIT
    y0 = jnp.asarray(kepler_orbit(e, angle, np.zeros(1))[0])
    adjoint = diffrax.RecursiveCheckpointAdjoint()

    # Fixed steps, equal cost for every solver (not in --quick: one more compile).
    fixed = {}
    if not args.quick:
        fixed = _fixed_step_drift(model, solver, y0, args, evals_per_step)

    # The training solver at the training tolerance, over a long horizon.
    long_periods = args.energy_periods
    ts_long = np.linspace(0.0, long_periods * PERIOD, 20 * long_periods + 1)
    sol = solve(
        model,
        solver,
        y0,
        ts_long,
        rtol=args.rtol,
        atol=args.atol,
        adjoint=adjoint,
        max_steps=args.eval_max_steps,
        throw=False,
    )

    # The learned vector field on the test orbit, solved accurately (--quick: the
    # run above, saving a compilation).
    ts = np.linspace(0.0, args.test_periods * PERIOD, 20 * args.test_periods + 1)
    true = kepler_orbit(e, angle, ts)
    if args.quick and args.test_periods == long_periods:
        pred = np.asarray(sol.ys)
    else:
        accurate = solve(
            model,
            diffrax.Tsit5(),
            y0,
            ts,
            rtol=1e-10,
            atol=1e-10,
            adjoint=adjoint,
            max_steps=100_000,
            throw=False,
        )
        pred = np.asarray(accurate.ys)
    return dict(
        test_pos_rel_error=_orbit_rel_error(pred, true, len(ts)),
        test_pos_rel_error_1=_orbit_rel_error(pred, true, 21),
        test_prediction=pred[:, :2].tolist(),
        test_truth=true[:, :2].tolist(),
        test_ts=ts.tolist(),
        long_ts=ts_long.tolist(),
        **_energy_report(model, sol),
        **fixed,
    )


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def table_markdown(runs: Sequence[dict]) -> str:
    """One row per solver: accuracy, energy behaviour and cost."""
    head = (
        "| solver | iters | final loss | test orbit rel. error, 1 / all periods "
        "| learned-energy drift (adaptive), first / last 10% "
        "| true energy error (adaptive), last 10% "
        f"| learned-energy drift (fixed steps, {FIXED_EVALS_PER_PERIOD} "
        "f-evals/period), first / last 10% "
        "| s / iter (median) | CPU s / iter "
        "| compile (s) | temp memory | mean accepted steps / solve |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        lines.append(
            f"| {r['solver']} | {r['iters']} | {r['final_loss']:.3e} "
            f"| {r['test_pos_rel_error_1']:.2e} / {r['test_pos_rel_error']:.2e} "
            f"| {r['learned_energy_drift_first']:.1e} / "
            f"{r['learned_energy_drift_last']:.1e} "
            f"| {r['true_energy_error_last']:.1e} "
            + (
                f"| {r['fixed_energy_drift_first']:.1e} / "
                f"{r['fixed_energy_drift_last']:.1e} "
                f"({r['fixed_steps_per_period']} steps/period) "
                if "fixed_energy_drift_first" in r
                else "| not run (--quick) "
            )
            + f"| {r['median_iter_s']:.4f} "
            f"| {r['cpu_per_iter_s']:.4f} | {r['compile_s']:.1f} "
            f"| {fmt_bytes(r['temp_bytes'])} | {r['mean_steps']:.0f} |"
        )
    return "\n".join(lines)


def summary_lines(runs: Sequence[dict]) -> str:
    """Computed one-line comparisons (relative to the first solver)."""
    if len(runs) < 2:
        return ""
    ref = runs[0]
    lines = []
    losses = [r["final_loss"] for r in runs]
    spread = (max(losses) - min(losses)) / min(losses)
    lines.append(f"- Final losses agree to {100 * spread:.2f}% across solvers.")
    for r in runs[1:]:
        lines.append(
            f"- {r['solver']}: median time per iteration "
            f"{r['median_iter_s'] / ref['median_iter_s']:.2f}x that of "
            f"{ref['solver']}; temp memory "
            f"{(r['temp_bytes'] or 0) / max(ref['temp_bytes'] or 1, 1):.2f}x."
        )
    return "\n".join(lines)


def _save(fig: Figure, paths: list[str], path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)


def _plot_orbits(runs: Sequence[dict], data: np.ndarray) -> Figure:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        truth = np.asarray(r["test_truth"])
        pred = np.asarray(r["test_prediction"])
        for orbit in data:
            ax.plot(orbit[:, 0], orbit[:, 1], ".", ms=2, color="0.6")
        ax.plot(truth[:, 0], truth[:, 1], lw=2.5, alpha=0.4, label="true (test orbit)")
        ax.plot(pred[:, 0], pred[:, 1], "--", lw=1, label="learned, 5 periods")
        ax.plot([0], [0], "k*")
        ax.set_aspect("equal")
        ax.set_title(
            f"{r['solver']}\nrel. error {r['test_pos_rel_error']:.2e}", fontsize=8
        )
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Kepler: learned orbits (grey: training data)", fontsize=9)
    return fig


def _plot_losses(runs: Sequence[dict]) -> Figure:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=r["solver"])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE loss")
    ax.set_title("Kepler: training loss (ReversibleAdjoint, PIDController)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _plot_energy(runs: Sequence[dict]) -> Figure:
    import matplotlib.pyplot as plt

    fixed = all("fixed_energy_drift" in r for r in runs)
    fig, axes = plt.subplots(
        1, 2 if fixed else 1, figsize=(11 if fixed else 6, 4), squeeze=False
    )
    ax = axes[0, 0]
    for r in runs:
        t = np.asarray(r["long_ts"]) / PERIOD
        d = np.maximum(np.asarray(r["learned_energy_drift"]), 1e-17)
        ax.plot(t, d, lw=0.8, label=r["solver"])
    ax.set_title("adaptive: training solver and tolerance", fontsize=8)
    if fixed:
        ax = axes[0, 1]
        for r in runs:
            d = np.maximum(np.asarray(r["fixed_energy_drift"]), 1e-17)
            label = f"{r['solver']}, {r['fixed_steps_per_period']} steps/period"
            ax.plot(r["fixed_ts"], d, lw=0.8, label=label)
        ax.set_title(
            f"fixed steps, {FIXED_EVALS_PER_PERIOD} vector-field evaluations "
            "per period for every solver",
            fontsize=8,
        )
    for ax in axes[0]:
        ax.set_yscale("log")
        ax.set_xlabel("time (periods)")
        ax.set_ylabel("|H_learned(t) - H_learned(0)|")
        ax.legend(fontsize=7)
    fig.suptitle(
        "Kepler: error in the learned energy (a conserved quantity of the "
        "learned ODE) along the test orbit",
        fontsize=9,
    )
    return fig


def _plot_cost(runs: Sequence[dict]) -> Figure:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [
        r["solver"].replace("(AsynchronousLeapfrog(), 4)", "(ALF, 4)") for r in runs
    ]
    x = np.arange(len(runs))
    axes[0].bar(x, [1e3 * r["median_iter_s"] for r in runs], color="tab:blue")
    axes[0].set_ylabel("training time per iteration (ms, median)")
    axes[1].bar(x, [(r["temp_bytes"] or 0) / 1024 for r in runs], color="tab:orange")
    axes[1].set_ylabel("compiled temp memory (KiB)")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    fig.suptitle(
        "Kepler: cost per solver (ReversibleAdjoint, compilation excluded)", fontsize=9
    )
    return fig


def make_plots(runs: Sequence[dict], out_dir: str, data: np.ndarray) -> list[str]:
    """Learned orbits, loss curves, energy drift and cost. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    paths: list[str] = []
    _save(_plot_orbits(runs, data), paths, os.path.join(out_dir, "kepler_orbits.png"))
    _save(_plot_losses(runs), paths, os.path.join(out_dir, "kepler_loss.png"))
    _save(_plot_energy(runs), paths, os.path.join(out_dir, "kepler_energy.png"))
    _save(_plot_cost(runs), paths, os.path.join(out_dir, "kepler_cost.png"))
    return paths


def write_markdown(result: dict, path: str) -> None:
    """The ``kepler.md`` page: setup, column definitions, table and plots."""
    m = result["machine"]
    a = result["args"]
    text = f"""# Kepler problem: learning a Hamiltonian with three reversible solvers

Command:

```
{result["command"]}
```

- Data: exact Kepler orbits (Kepler's equation), eccentricities 0.2 / 0.4 / 0.6
  rotated by 0 / 120 / 240 degrees, semi-major axis 1, {a["num_times"]} times per
  period. Training segments: {a["segment"]} data intervals, starting every
  {a["stride"]} data times around each orbit. Test orbit: e = 0.5 rotated by 60
  degrees (not in the training set), {a["test_periods"]} periods.
- Model: separable Hamiltonian |p|^2/2 + V(|q|), V an MLP of the radius
  ({a["depth"]} hidden layers of width {a["width"]}, tanh), i.e. q' = p,
  p' = -grad V(|q|); Adam, learning rate {a["lr"]} with cosine decay to 5%,
  {a["iters"]} iterations, full batch (all segments, `jax.vmap`), MSE of (q, p) at
  the data times through `SaveAt(ts=...)`; float64; seed {a["seed"]}.
- Every solver: `revdiffrax.ReversibleAdjoint()`,
  `PIDController(rtol={a["rtol"]}, atol={a["atol"]})`, `max_steps={a["max_steps"]}`.
- Machine: {m["platform"]}, {m["cpu_count"]} CPUs, backend {m["backend"]}
  ({m["device"]});
  python {m["python"]}, jax {m["jax"]}, diffrax {m["diffrax"]}, equinox {m["equinox"]}.
  The machine was shared with other jobs: the median time per iteration is the
  robust figure.
- Wall time of this run: {result["wall_s"] / 60:.1f} min.

Columns: *test orbit rel. error*: RMS position error of the learned model (solved
with Tsit5 at rtol=atol=1e-10) on the test orbit over its first period and over all
{a["test_periods"]} periods, relative to the RMS radius. *Learned-energy drift
(adaptive)*: the learned Hamiltonian is a conserved quantity of the learned ODE, so
its change along the test orbit, solved with the *training* solver and tolerance
over {a["energy_periods"]} periods, is the solver's error (max over the first and
the last 10% of the run). *True energy
error*: |H_true + 1/2| over the last 10% of the same run (model plus solver error).
*Fixed steps*: the same learned-energy drift with `ConstantStepSize` and
{FIXED_EVALS_PER_PERIOD} vector-field evaluations per period for every solver (3 per
step for the composition, 12 for Reversible(Tsit5), 4 for Reversible(Midpoint)).
*Temp memory*: `compiled.memory_analysis().temp_size_in_bytes` of the jitted train
step. Times exclude compilation and one warm-up call.

{table_markdown(result["runs"])}

{summary_lines(result["runs"])}

![orbits](kepler_orbits.png)
![loss](kepler_loss.png)
![energy](kepler_energy.png)
![cost](kepler_cost.png)
"""
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The flags of `python -m experiments.kepler` (None: a default set by
    `_fill_defaults`, which depends on `--quick`)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.kepler", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--solvers",
        default=None,
        help=f"comma-separated subset of {list(SOLVERS)} (default: all; "
        "quick: sc4,rev-midpoint, one of each family, to keep the "
        "smoke test short)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="training iterations (default 600; quick: 3)",
    )
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument(
        "--lr",
        type=float,
        default=3e-2,
        help="initial Adam learning rate, cosine decay to 5%% of it",
    )
    p.add_argument("--width", type=int, default=32)
    p.add_argument(
        "--depth",
        type=int,
        default=2,
        help="hidden layers of the potential (default 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    _add_data_flags(p)
    p.add_argument("--out", default=None, help="output directory (default out/kepler)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 3 iterations, rtol=atol=1e-4, 12 data times, "
        "one-period evaluation, two solvers",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Data, segment and evaluation flags (default None: set by `_fill_defaults`)."""
    p.add_argument(
        "--num-times",
        type=int,
        default=None,
        help="data times per orbit (default 48; quick: 12)",
    )
    p.add_argument(
        "--segment",
        type=int,
        default=None,
        help="training segment length in data intervals (default 12, a "
        "quarter period; quick: 3)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="data intervals between segment starts (default 4; quick: 3)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="max_steps of each training solve (default 4096; quick 1024)",
    )
    p.add_argument(
        "--test-periods",
        type=int,
        default=None,
        help="test orbit length in periods (default 5; quick: 1)",
    )
    p.add_argument(
        "--energy-periods",
        type=int,
        default=None,
        help="energy run length in periods (default 50; quick: 1)",
    )


# Defaults of the flags left at None: (full run, --quick).
_DEFAULTS = dict(
    iters=(600, 3),
    num_times=(48, 12),
    segment=(12, 3),
    stride=(4, 3),
    max_steps=(4096, 1024),
    test_periods=(5, 1),
    energy_periods=(50, 1),
    solvers=(",".join(SOLVERS), "sc4,rev-midpoint"),
)


def _fill_defaults(args: argparse.Namespace) -> list[str]:
    """Fill in the defaults that depend on `--quick`; returns the solver keys."""
    for name, (full, quick) in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.quick and args.rtol == 1e-6 and args.atol == 1e-6:
        args.rtol = args.atol = 1e-4
    args.eval_max_steps = 400 * args.energy_periods * 20
    keys = [k.strip() for k in args.solvers.split(",") if k.strip()]
    for k in keys:
        if k not in SOLVERS:
            raise SystemExit(
                f"error: unknown solver {k!r}; choose from {list(SOLVERS)}"
            )
    return keys


def _write_outputs(
    result: dict, args: argparse.Namespace, out_dir: str, orbits: np.ndarray
) -> list[str]:
    """``kepler.json``, the plots (unless `--no-plots`) and ``kepler.md``."""
    json_path = os.path.join(out_dir, "kepler.json")
    with open(json_path, "w") as f:
        json.dump(result, f)
    files = [json_path]
    if not args.no_plots:
        files += make_plots(result["runs"], out_dir, orbits)
    md_path = os.path.join(out_dir, "kepler.md")
    write_markdown(result, md_path)
    files.append(md_path)
    return files


def main(argv: Sequence[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    keys = _fill_defaults(args)
    out_dir = args.out or os.path.join("out", "kepler")
    os.makedirs(out_dir, exist_ok=True)

    ts = np.linspace(0.0, PERIOD, args.num_times + 1)
    orbits = np.stack([kepler_orbit(e, a, ts) for e, a in TRAIN_ORBITS])
    _, data = segments(orbits, args.segment, args.stride)
    seg_ts = ts[: args.segment + 1]

    wall = time.perf_counter()
    runs = [train_one(k, args, data, seg_ts) for k in keys]
    wall = time.perf_counter() - wall

    cli = list(argv) if argv is not None else sys.argv[1:]
    arg_dict = {k: v for k, v in vars(args).items() if k != "solvers"}
    result = dict(
        experiment="kepler",
        command=" ".join(["python -m experiments.kepler", *cli]),
        machine=machine_info(),
        args=arg_dict,
        wall_s=wall,
        quick=args.quick,
        runs=runs,
    )
    result["files"] = _write_outputs(result, args, out_dir, orbits)
    print(table_markdown(runs))
    print("".join(f"\nwrote {p}" for p in result["files"]))
    return result


if __name__ == "__main__":
    main()
