"""Reporting: machine information, per-adjoint summary tables and plots."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any, TYPE_CHECKING

import diffrax
import equinox as eqx
import jax
import numpy as np
import revdiffrax

from .problem import Problem


if TYPE_CHECKING:
    from matplotlib.figure import Figure


_SUMMARY_KEYS = (
    "train_time_s",
    "time_per_iter_s",
    "median_iter_s",
    "cpu_per_iter_s",
    "compile_time_s",
    "temp_bytes",
    "peak_rss_mb",
    "final_loss",
    "mean_accepted_steps",
)


def machine_info() -> dict:
    """Platform, CPU count, library versions and the JAX device."""
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
    """A byte count in B, KiB, MiB or GiB; "n/a" for None or NaN."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _mean_std(xs: Sequence[float | None]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs))


def _name(run: dict, several_solvers: bool) -> str:
    return f"{run['label']} / {run['base_solver']}" if several_solvers else run["label"]


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
            name=_name(rs[0], several_solvers),
            adjoint=rs[0]["adjoint"],
            solver=solver,
            base_solver=rs[0]["base_solver"],
            checkpoints=rs[0]["checkpoints"],
            seeds=[r["seed"] for r in rs],
            iters=rs[0]["iters"],
        )
        for k in _SUMMARY_KEYS:
            row[k], row[k + "_std"] = _mean_std([r.get(k) for r in rs])
        rows.append(row)
    return rows


def _reference(rows: Sequence[dict], row: dict) -> dict | None:
    """The reversible row with the same base solver as `row`."""
    return next(
        (
            r
            for r in rows
            if r["adjoint"] == "reversible" and r["base_solver"] == row["base_solver"]
        ),
        None,
    )


def _cells(row: dict) -> list[str]:
    def pm(k: str, f: str) -> str:
        several = len(row["seeds"]) > 1
        return f"{row[k]:{f}}" + (f" ± {row[k + '_std']:{f}}" if several else "")

    return [
        row["name"],
        row["solver"],
        str(len(row["seeds"])),
        str(row["iters"]),
        pm("train_time_s", ".2f"),
        pm("time_per_iter_s", ".4f"),
        pm("median_iter_s", ".4f"),
        f"{row['cpu_per_iter_s']:.4f}",
        f"{row['compile_time_s']:.1f}",
        fmt_bytes(row["temp_bytes"]),
        f"{row['peak_rss_mb']:.0f}",
        pm("final_loss", ".4e"),
        f"{row['mean_accepted_steps']:.0f}",
    ]


def _ratio_cells(row: dict, ref: dict | None) -> list[str]:
    if ref is None:
        return ["", "", ""]
    same = row["iters"] == ref["iters"]
    return [
        f"{row['time_per_iter_s'] / ref['time_per_iter_s']:.2f}x",
        f"{row['median_iter_s'] / ref['median_iter_s']:.2f}x",
        f"{row['final_loss'] / ref['final_loss']:.3f}" if same else "(fewer iters)",
    ]


def table_markdown(rows: Sequence[dict]) -> str:
    """Markdown table; ratios are per iteration, relative to the reversible run with
    the same base solver."""
    has_ref = any(r["adjoint"] == "reversible" for r in rows)
    head = (
        "| adjoint | solver | seeds | iters | train time (s) | s / iter (mean) "
        "| s / iter (median) | CPU s / iter | compile (s) | temp memory "
        "| peak RSS (MiB) | final loss | mean steps |"
    )
    if has_ref:
        head += (
            " time / reversible (mean) | time / reversible (median) "
            "| final loss / reversible |"
        )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = _cells(r)
        if has_ref:
            cells += _ratio_cells(r, _reference(rows, r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _save(fig: Figure, out_dir: str, filename: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_trajectory(
    problem: Problem, runs: Sequence[dict], out_dir: str, prefix: str
) -> str:
    """Data against the model trained with the reversible adjoint (else the first)."""
    import matplotlib.pyplot as plt

    run = next((r for r in runs if r["adjoint"] == "reversible"), runs[0])
    pred = np.asarray(run["prediction"])
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(problem.state_labels) or [f"y{i + 1}" for i in range(problem.dim)]
    for i in range(problem.dim):
        (line,) = ax.plot(
            problem.ts, problem.ys[:, i], lw=2.5, alpha=0.4, label=f"data {labels[i]}"
        )
        ax.plot(
            problem.ts,
            pred[:, i],
            "--",
            color=line.get_color(),
            lw=1.2,
            label=f"model {labels[i]}",
        )
    ax.set_xlabel("t")
    ax.set_title(
        f"{problem.title}: fit after {run['iters']} iterations "
        f"({run['label']}, seed {run['seed']})",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out_dir, f"{prefix}_trajectory.png")


def plot_losses(
    problem: Problem, runs: Sequence[dict], out_dir: str, prefix: str
) -> str:
    """Training loss curves, mean over seeds."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[list[float]]] = {}
    several_solvers = len({r["base_solver"] for r in runs}) > 1
    for r in runs:
        groups.setdefault(_name(r, several_solvers), []).append(r["losses"])
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
    return _save(fig, out_dir, f"{prefix}_loss.png")


def plot_cost(problem: Problem, runs: Sequence[dict], out_dir: str, prefix: str) -> str:
    """Time per iteration and compiled temp memory per adjoint."""
    import matplotlib.pyplot as plt

    rows = summarise(runs)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    x = np.arange(len(rows))
    axes[0].bar(
        x,
        [1e3 * r["time_per_iter_s"] for r in rows],
        yerr=[1e3 * r["time_per_iter_s_std"] for r in rows],
        color="tab:blue",
    )
    axes[0].set_ylabel("training time per iteration (ms)")
    axes[0].set_yscale("log")
    mem = [
        r["temp_bytes"] / 1024 if r["temp_bytes"] == r["temp_bytes"] else 0
        for r in rows
    ]
    axes[1].bar(x, mem, color="tab:orange")
    axes[1].set_ylabel("compiled temp memory (KiB)")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(
            [r["name"] for r in rows], rotation=30, ha="right", fontsize=7
        )
    fig.suptitle(
        f"{problem.title}: cost per adjoint (compilation excluded)", fontsize=9
    )
    return _save(fig, out_dir, f"{prefix}_cost.png")


def make_plots(
    problem: Problem, runs: Sequence[dict], out_dir: str, prefix: str | None = None
) -> list[str]:
    """Trajectory fit, loss curves, and time/memory bar chart. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    prefix = prefix or problem.name
    return [
        plot(problem, runs, out_dir, prefix)
        for plot in (plot_trajectory, plot_losses, plot_cost)
    ]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: the header, a separator and one line per row (`str` of
    every cell)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
