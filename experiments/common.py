"""Shared training harness for the McCallum & Foster experiments.

One `Problem` (data on a time grid, solver settings) is trained with one or more
adjoints. For every (adjoint, seed) run we record the training time (compilation
excluded), the compile time, the compiled temp memory of the jitted train step, the
process peak RSS and the loss curve; results go to JSON, PNG plots and a printed
table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from diffrax._local_interpolation import (  # noqa: E402
    ThirdOrderHermitePolynomialInterpolation,
)

import revdiffrax  # noqa: E402


ADJOINTS = ("reversible", "checkpoint", "direct", "backsolve")


# ---------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # Embedded estimate: RK4 minus the midpoint method (b = [0, 1, 0, 0]), which uses
    # the same stages. Only second order: this RK4 is meant for fixed steps.
    b_error=np.array([1 / 6, 1 / 3 - 1, 1 / 3, 1 / 6]),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classic fourth-order Runge--Kutta method (diffrax does not ship one).

    Has an embedded (second order, midpoint) error estimate, so it is meant for
    fixed step sizes. Third-order Hermite interpolation for dense output.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar[Callable[..., Any]] = (
        ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        del terms
        return 4


SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "rk4": RK4,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}


def make_solver(
    name: str, *, reversible: bool = True, coupling: float = 0.999
) -> diffrax.AbstractSolver:
    """The base solver `name`, wrapped in `revdiffrax.Reversible` if `reversible`."""
    key = name.lower()
    if key not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; choose one of {sorted(SOLVERS)}.")
    base = SOLVERS[key]()
    return revdiffrax.Reversible(base, coupling=coupling) if reversible else base


def reversible_adjoint_available() -> bool:
    return hasattr(revdiffrax, "ReversibleAdjoint")


def make_adjoint(name: str, checkpoints: int | None = None) -> diffrax.AbstractAdjoint:
    if name == "reversible":
        if not reversible_adjoint_available():
            raise RuntimeError(
                "`--adjoint reversible` needs `revdiffrax.ReversibleAdjoint`, which this "
                f"revdiffrax ({revdiffrax.__version__}) does not provide yet. Use "
                "`--adjoint checkpoint` (diffrax.RecursiveCheckpointAdjoint) meanwhile."
            )
        return revdiffrax.ReversibleAdjoint()
    if name == "checkpoint":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    if name == "direct":
        return diffrax.DirectAdjoint()
    if name == "backsolve":
        return diffrax.BacksolveAdjoint()
    raise ValueError(f"Unknown adjoint {name!r}; choose one of {list(ADJOINTS)}.")


def sqrt_checkpoints(num_steps: int) -> int:
    """floor(sqrt(2N)): the checkpoint count used by the published comparison."""
    return int(math.floor(math.sqrt(2 * num_steps)))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class VectorField(eqx.Module):
    """MLP vector field: one hidden layer, tanh. Time-dependent models see concat(t, y)."""

    mlp: eqx.nn.MLP
    time_dependent: bool = eqx.field(static=True)

    def __init__(self, dim: int, width: int, *, key, time_dependent: bool = False):
        in_size = dim + 1 if time_dependent else dim
        self.mlp = eqx.nn.MLP(
            in_size,
            dim,
            width,
            depth=1,
            activation=jnp.tanh,
            dtype=jnp.float64,
            key=key,
        )
        self.time_dependent = time_dependent

    def __call__(self, t, y):
        if self.time_dependent:
            y = jnp.concatenate([jnp.asarray(t, y.dtype)[None], y])
        return self.mlp(y)


def _vector_field(t, y, model):
    # The model travels as `args` (the documented revdiffrax usage), so every adjoint
    # sees the parameters as an explicit input of the solve.
    return model(t, y)


# ---------------------------------------------------------------------------
# Problem and solve
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    name: str
    title: str
    ts: np.ndarray  # save times; ts[0] = t0, ts[-1] = t1
    ys: np.ndarray  # data, shape (len(ts), dim)
    time_dependent: bool
    solver: str  # default base solver
    num_steps: int  # N: fixed steps, or nominal N (for floor(sqrt(2N))) if adaptive
    adaptive: bool = False
    rtol: float = 1e-6
    atol: float = 1e-6
    max_steps: int | None = None  # defaults to num_steps for fixed steps
    state_labels: Sequence[str] = ()
    data_source: str = ""
    iters: int = 1000  # default iterations

    @property
    def dim(self) -> int:
        return self.ys.shape[1]

    def solve(self, model, solver, adjoint, saveat=None):
        """Solve with `model` as vector field, saving every step (`SaveAt(steps=True)`).

        Every step is saved rather than using `SaveAt(ts=...)`: with diffrax 0.7.2,
        `RecursiveCheckpointAdjoint` gives wrong gradients (relative errors up to
        ~1e-2) with `SaveAt(ts=...)` for many checkpoint counts (including the
        default), while with `SaveAt(steps=True)` it matches `DirectAdjoint` to
        rounding error (see `python -m experiments.check_gradients`).
        """
        t0, t1 = float(self.ts[0]), float(self.ts[-1])
        if self.adaptive:
            controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol)
            dt0 = float(self.ts[1] - self.ts[0])
        else:
            controller = diffrax.ConstantStepSize()
            dt0 = (t1 - t0) / self.num_steps
        max_steps = self.max_steps or self.num_steps
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_vector_field),
            solver,
            t0,
            t1,
            dt0,
            jnp.asarray(self.ys[0]),
            args=model,
            saveat=saveat or diffrax.SaveAt(steps=True),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
        )

    def predict(self, model, solver, adjoint):
        """The model's trajectory at the data times `ts`, and the number of steps.

        Fixed steps land on `ts`, so the saved steps are the prediction. Adaptive
        steps are linearly interpolated onto `ts` (as in the published code), with
        the step times treated as constants (diffrax's PID controller does not
        differentiate through step sizes either).
        """
        if isinstance(adjoint, diffrax.BacksolveAdjoint):
            # BacksolveAdjoint does not support SaveAt(steps=True) (and is not
            # affected by the SaveAt(ts=...) checkpointing bug).
            saveat = diffrax.SaveAt(ts=jnp.asarray(self.ts))
            sol = self.solve(model, solver, adjoint, saveat)
            return sol.ys, sol.stats["num_accepted_steps"]
        sol = self.solve(model, solver, adjoint)
        y0 = jnp.asarray(self.ys[0])
        ts = jnp.concatenate([jnp.asarray(self.ts[:1]), sol.ts])
        ys = jnp.concatenate([y0[None], sol.ys])
        nsteps = sol.stats["num_accepted_steps"]
        if not self.adaptive:
            return ys, nsteps
        # Unused entries of the step buffer are inf: move them past t1 (keeping the
        # times sorted) with finite values, so they never enter the interpolation.
        finite = jnp.isfinite(ts)
        beyond = 2 * float(self.ts[-1]) - float(self.ts[0]) + 1.0
        ts = jax.lax.stop_gradient(jnp.where(finite, ts, beyond))
        ys = jnp.where(finite[:, None], ys, 0.0)
        query = jnp.asarray(self.ts)
        idx = jnp.clip(jnp.searchsorted(ts, query, side="right") - 1, 0, len(ts) - 2)
        left, right = ts[idx], ts[idx + 1]
        w = ((query - left) / (right - left))[:, None]
        return ys[idx] + w * (ys[idx + 1] - ys[idx]), nsteps


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


@dataclasses.dataclass
class RunConfig:
    adjoint: str
    solver: str
    checkpoints: int | None = None
    baseline_solver: str = "reversible"  # "reversible" or "base"
    coupling: float = 0.999
    iters: int = 100
    seed: int = 0
    lr: float = 1e-2
    weight_decay: float = 1e-5
    width: int = 10

    @property
    def reversible_solver(self) -> bool:
        return self.adjoint == "reversible" or self.baseline_solver == "reversible"

    @property
    def label(self) -> str:
        if self.adjoint == "checkpoint":
            name = f"checkpoint({self.checkpoints})"
        else:
            name = self.adjoint
        if not self.reversible_solver:
            name += " [base solver]"
        return name

    @property
    def solver_label(self) -> str:
        if self.reversible_solver:
            return f"Reversible({self.solver}, {self.coupling})"
        return self.solver


def _final_drift(problem: Problem, solver, static, params) -> float | None:
    """Relative error of the y0 rebuilt by the reversible backward pass, for one
    gradient of the trained model (not timed): how much reconstruction drift the
    gradient suffered. None if this revdiffrax cannot report it."""
    drifts: list = []
    try:
        adjoint = revdiffrax.ReversibleAdjoint(drift_callback=drifts.append)
    except TypeError:
        return None

    def loss(params):
        pred, _ = problem.predict(eqx.combine(params, static), solver, adjoint)
        return jnp.mean((pred - jnp.asarray(problem.ys)) ** 2)

    jax.block_until_ready(jax.jit(jax.grad(loss))(params))
    jax.effects_barrier()
    return float(np.max(np.asarray(drifts[-1]))) if drifts else None


def train(problem: Problem, cfg: RunConfig, *, progress: bool = True,
          measure_drift: bool = True) -> dict:
    """Train one model; returns a JSON-serialisable result dict."""
    from tqdm.auto import tqdm

    solver = make_solver(
        cfg.solver, reversible=cfg.reversible_solver, coupling=cfg.coupling
    )
    adjoint = make_adjoint(cfg.adjoint, cfg.checkpoints)
    model = VectorField(
        problem.dim, cfg.width, key=jr.PRNGKey(cfg.seed),
        time_dependent=problem.time_dependent,
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    opt_state = optim.init(params)
    ys_data = jnp.asarray(problem.ys)

    def loss_fn(params):
        pred, nsteps = problem.predict(eqx.combine(params, static), solver, adjoint)
        return jnp.mean((pred - ys_data) ** 2), nsteps

    def step(params, opt_state):
        (loss, nsteps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, nsteps

    # Compilation (excluded from the training time, reported separately).
    tic = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state).compile()
    compile_s = time.perf_counter() - tic
    temp_bytes = None
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            temp_bytes = int(analysis.temp_size_in_bytes)
    except Exception:  # memory_analysis is not implemented on every backend
        temp_bytes = None
    # Warm-up call (its result is discarded: training starts from the same params).
    tic = time.perf_counter()
    jax.block_until_ready(compiled(params, opt_state))
    warmup_s = time.perf_counter() - tic

    losses: list[float] = []
    steps: list[int] = []
    iter_times: list[float] = []
    bar = tqdm(
        range(cfg.iters),
        desc=f"{problem.name} {cfg.label} seed={cfg.seed}",
        disable=not progress,
        mininterval=0.5,
        file=sys.stderr,
    )
    tic = time.perf_counter()
    cpu_tic = time.process_time()
    last = tic
    for _ in bar:
        params, opt_state, loss, nsteps = compiled(params, opt_state)
        loss, nsteps = jax.device_get((loss, nsteps))  # waits for the step
        now = time.perf_counter()
        iter_times.append(now - last)
        last = now
        losses.append(float(loss))
        steps.append(int(nsteps))
        bar.set_postfix(loss=f"{float(loss):.4e}", refresh=False)
    train_s = time.perf_counter() - tic
    cpu_s = time.process_time() - cpu_tic
    bar.close()

    # Final model: loss and prediction from a plain forward solve (not timed).
    @jax.jit
    def predict(params):
        pred, _ = problem.predict(
            eqx.combine(params, static), solver, diffrax.RecursiveCheckpointAdjoint()
        )
        return pred, jnp.mean((pred - ys_data) ** 2)

    pred, final_loss = jax.device_get(predict(params))
    drift = _final_drift(problem, solver, static, params) if (
        cfg.adjoint == "reversible" and measure_drift) else None
    return dict(
        experiment=problem.name,
        adjoint=cfg.adjoint,
        label=cfg.label,
        checkpoints=cfg.checkpoints,
        solver=cfg.solver_label,
        base_solver=cfg.solver,
        coupling=cfg.coupling,
        seed=cfg.seed,
        iters=cfg.iters,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        width=cfg.width,
        train_time_s=train_s,
        time_per_iter_s=train_s / max(cfg.iters, 1),
        # Robust to other load on the machine (intermittent contention).
        median_iter_s=float(np.median(iter_times)) if iter_times else None,
        train_cpu_s=cpu_s,
        cpu_per_iter_s=cpu_s / max(cfg.iters, 1),
        compile_time_s=compile_s,
        warmup_call_s=warmup_s,
        temp_bytes=temp_bytes,
        peak_rss_mb=peak_rss_mb(),
        initial_loss=losses[0] if losses else None,
        final_loss=float(final_loss),
        min_loss=min(losses) if losses else None,
        mean_accepted_steps=float(np.mean(steps)) if steps else None,
        final_accepted_steps=steps[-1] if steps else None,
        reconstruction_drift=drift,
        losses=losses,
        iter_times=iter_times,
        prediction=np.asarray(pred).tolist(),
    )


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def machine_info() -> dict:
    dev = jax.devices()[0]
    return dict(
        platform=platform.platform(),
        python=platform.python_version(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        diffrax=diffrax.__version__,
        equinox=eqx.__version__,
        revdiffrax=revdiffrax.__version__,
        backend=jax.default_backend(),
        device=str(getattr(dev, "device_kind", dev)),
    )


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs))


def summarise(runs: Sequence[dict]) -> list[dict]:
    """Group runs by (label, solver): mean/std over seeds, in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["label"], r["solver"]), []).append(r)
    several_solvers = len({r["base_solver"] for r in runs}) > 1
    rows = []
    for (label, solver), rs in groups.items():
        row = dict(
            label=label,
            name=f"{label} / {rs[0]['base_solver']}" if several_solvers else label,
            adjoint=rs[0]["adjoint"], solver=solver, base_solver=rs[0]["base_solver"],
            checkpoints=rs[0]["checkpoints"], seeds=[r["seed"] for r in rs],
            iters=rs[0]["iters"],
        )
        for k in ("train_time_s", "time_per_iter_s", "median_iter_s", "cpu_per_iter_s",
                  "compile_time_s", "temp_bytes", "peak_rss_mb", "final_loss",
                  "mean_accepted_steps"):
            row[k], row[k + "_std"] = _mean_std([r.get(k) for r in rs])
        rows.append(row)
    return rows


def _reference(rows: Sequence[dict], row: dict) -> dict | None:
    """The reversible row with the same base solver as `row`."""
    return next((r for r in rows if r["adjoint"] == "reversible"
                 and r["base_solver"] == row["base_solver"]), None)


def table_markdown(rows: Sequence[dict]) -> str:
    """Markdown table; ratios are per iteration, relative to the reversible run with
    the same base solver."""
    has_ref = any(r["adjoint"] == "reversible" for r in rows)
    head = ("| adjoint | solver | seeds | iters | train time (s) | s / iter (mean) "
            "| s / iter (median) | CPU s / iter | compile (s) | temp memory "
            "| peak RSS (MiB) | final loss | mean steps |")
    if has_ref:
        head += (" time / reversible (mean) | time / reversible (median) "
                 "| final loss / reversible |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def pm(k, f, r=r):
            return f"{r[k]:{f}}" + (f" ± {r[k + '_std']:{f}}" if len(r["seeds"]) > 1
                                    else "")

        cells = [
            r["name"], r["solver"], str(len(r["seeds"])), str(r["iters"]),
            pm("train_time_s", ".2f"), pm("time_per_iter_s", ".4f"),
            pm("median_iter_s", ".4f"),
            f"{r['cpu_per_iter_s']:.4f}", f"{r['compile_time_s']:.1f}",
            fmt_bytes(r["temp_bytes"]), f"{r['peak_rss_mb']:.0f}",
            pm("final_loss", ".4e"), f"{r['mean_accepted_steps']:.0f}",
        ]
        if has_ref:
            ref = _reference(rows, r)
            if ref is None:
                cells += ["", "", ""]
            else:
                cells.append(f"{r['time_per_iter_s'] / ref['time_per_iter_s']:.2f}x")
                cells.append(f"{r['median_iter_s'] / ref['median_iter_s']:.2f}x")
                same = r["iters"] == ref["iters"]
                cells.append(f"{r['final_loss'] / ref['final_loss']:.3f}" if same
                             else "(fewer iters)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_plots(problem: Problem, runs: Sequence[dict], out_dir: str,
               prefix: str | None = None) -> list[str]:
    """Trajectory fit, loss curves, and time/memory bar chart. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = prefix or problem.name
    paths = []
    rows = summarise(runs)

    # Trajectory fit: data vs the model trained with the first adjoint (seed order).
    run = next((r for r in runs if r["adjoint"] == "reversible"), runs[0])
    pred = np.asarray(run["prediction"])
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(problem.state_labels) or [f"y{i + 1}" for i in range(problem.dim)]
    for i in range(problem.dim):
        (line,) = ax.plot(problem.ts, problem.ys[:, i], lw=2.5, alpha=0.4,
                          label=f"data {labels[i]}")
        ax.plot(problem.ts, pred[:, i], "--", color=line.get_color(), lw=1.2,
                label=f"model {labels[i]}")
    ax.set_xlabel("t")
    ax.set_title(f"{problem.title}: fit after {run['iters']} iterations "
                 f"({run['label']}, seed {run['seed']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = os.path.join(out_dir, f"{prefix}_trajectory.png")
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)

    # Loss curves (mean over seeds).
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[list[float]]] = {}
    several_solvers = len({r["base_solver"] for r in runs}) > 1
    for r in runs:
        key = f"{r['label']} / {r['base_solver']}" if several_solvers else r["label"]
        groups.setdefault(key, []).append(r["losses"])
    for label, ls in groups.items():
        n = min(len(x) for x in ls)
        if n == 0:
            continue
        ax.plot(np.arange(1, n + 1), np.mean([x[:n] for x in ls], 0), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("MSE loss")
    ax.set_title(f"{problem.title}: training loss", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, f"{prefix}_loss.png")
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)

    # Cost bar chart.
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    axes[0].bar(x, [1e3 * r["time_per_iter_s"] for r in rows],
                yerr=[1e3 * r["time_per_iter_s_std"] for r in rows], color="tab:blue")
    axes[0].set_ylabel("training time per iteration (ms)")
    axes[0].set_yscale("log")
    mem = [r["temp_bytes"] / 1024 if r["temp_bytes"] == r["temp_bytes"] else 0
           for r in rows]
    axes[1].bar(x, mem, color="tab:orange")
    axes[1].set_ylabel("compiled temp memory (KiB)")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    fig.suptitle(f"{problem.title}: cost per adjoint (compilation excluded)",
                 fontsize=9)
    fig.tight_layout()
    p = os.path.join(out_dir, f"{prefix}_cost.png")
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)
    return paths


def problem_from_result(result: dict) -> Problem:
    """A `Problem` carrying just what the plots need, rebuilt from a results JSON."""
    return Problem(
        name=result["experiment"],
        title=result["title"],
        ts=np.asarray(result["ts"]),
        ys=np.asarray(result["data"]),
        time_dependent=False,
        solver="",
        num_steps=result["num_steps"],
        adaptive=result["adaptive"],
        state_labels=result.get("state_labels", ()),
        data_source=result["data_source"],
    )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def make_parser(name: str, description: str, *, solver: str, iters: int
                ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}",
                                description=description)
    p.add_argument("--adjoint", default=None,
                   help="comma-separated list of reversible|checkpoint|direct|backsolve "
                        "(default: reversible,checkpoint)")
    p.add_argument("--checkpoints", type=int, default=None,
                   help="checkpoints for RecursiveCheckpointAdjoint "
                        "(default floor(sqrt(2N)), N = number of steps)")
    p.add_argument("--solver", default=solver,
                   help=f"base solver, one of {sorted(SOLVERS)} (default {solver})")
    p.add_argument("--baseline-solver", choices=("reversible", "base"),
                   default="reversible",
                   help="solver for the non-reversible adjoints: the same "
                        "Reversible(base) solver (default: identical discrete model) "
                        "or the plain base solver")
    p.add_argument("--coupling", type=float, default=0.999)
    p.add_argument("--iters", type=int, default=None,
                   help=f"training iterations (default {iters}; quick: 5)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="model initialisation seeds (default: 0)")
    p.add_argument("--data", default=None,
                   help="path to the data file (default: simulated data)")
    p.add_argument("--out", default=None, help=f"output directory (default out/{name})")
    p.add_argument("--quick", action="store_true",
                   help="tiny run for smoke tests (few iterations, fewer steps)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true")
    return p


def parse_adjoints(spec: str | None) -> list[str]:
    if spec is None:
        adjoints = ["reversible", "checkpoint"]
        if not reversible_adjoint_available():
            print("note: revdiffrax.ReversibleAdjoint is not available yet; running "
                  "checkpoint only", file=sys.stderr)
            adjoints = ["checkpoint"]
        return adjoints
    adjoints = [a.strip() for a in spec.split(",") if a.strip()]
    for a in adjoints:
        if a not in ADJOINTS:
            raise SystemExit(f"error: unknown adjoint {a!r}; choose from {ADJOINTS}")
    return adjoints


def run_experiment(
    argv: Sequence[str] | None,
    *,
    name: str,
    description: str,
    solver: str,
    iters: int,
    build_problem: Callable[[argparse.Namespace], Problem],
) -> dict:
    parser = make_parser(name, description, solver=solver, iters=iters)
    args = parser.parse_args(argv)
    out_dir = args.out or os.path.join("out", name)
    os.makedirs(out_dir, exist_ok=True)
    args.out = out_dir
    problem = build_problem(args)
    if args.iters is None:
        args.iters = 5 if args.quick else problem.iters
    adjoints = parse_adjoints(args.adjoint)
    checkpoints = args.checkpoints or sqrt_checkpoints(problem.num_steps)

    runs = []
    for adjoint in adjoints:
        for seed in args.seeds:
            cfg = RunConfig(
                adjoint=adjoint,
                solver=args.solver,
                checkpoints=checkpoints if adjoint == "checkpoint" else None,
                baseline_solver=args.baseline_solver,
                coupling=args.coupling,
                iters=args.iters,
                seed=seed,
                lr=args.lr,
                weight_decay=args.weight_decay,
                width=args.width,
            )
            runs.append(train(problem, cfg, progress=not args.no_progress,
                              measure_drift=not args.quick))

    rows = summarise(runs)
    cli = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join([f"python -m experiments.{name}", *cli])
    result = dict(
        experiment=name,
        title=problem.title,
        command=command,
        data_source=problem.data_source,
        num_steps=problem.num_steps,
        adaptive=problem.adaptive,
        quick=args.quick,
        machine=machine_info(),
        ts=np.asarray(problem.ts).tolist(),
        data=np.asarray(problem.ys).tolist(),
        state_labels=list(problem.state_labels),
        summary=rows,
        runs=runs,
    )
    json_path = os.path.join(out_dir, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plots = [] if args.no_plots else make_plots(problem, runs, out_dir)
    result["files"] = [json_path, *plots]

    print(f"\n{problem.title} ({problem.data_source}; N = {problem.num_steps} "
          f"{'nominal ' if problem.adaptive else ''}steps, {args.iters} iterations)")
    print(table_markdown(rows))
    print(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in plots))
    return result
