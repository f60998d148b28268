"""Time against compiled memory of every exact adjoint, per workload (issue 12).

For each workload of `benchmarks/workloads.py` (white dwarf, 64x16 MLP, neural CDE,
neural PDE, two-moons CNF with Midpoint, RK4 and Dopri5 bases) and each adjoint

- `diffrax.RecursiveCheckpointAdjoint(checkpoints=c)`, c in {2, 4, 8, 16,
  floor(sqrt(2N)), N} (`RCA(c)`),
- `diffrax.DirectAdjoint()` (`Direct`),
- `diffrax.BacksolveAdjoint()` (`Backsolve`: approximate gradients, never on the
  exact frontier),

all three differentiating the base solver itself (e.g. `diffrax.Midpoint()`), and

- `revdiffrax.ReversibleAdjoint(checkpoint_every=k, drift_tol=None)`, k in {None,
  100, 10} (`Reversible`, `Reversible(k=100)`, `Reversible(k=10)`), through
  `revdiffrax.Reversible(base)`,

the benchmark compiles `jax.jit(jax.grad(loss))`, reads its temporary memory
(`memory_analysis().temp_size_in_bytes`) and times it: the median of `--repeats`
samples after a warm-up call, every adjoint of a workload interleaved round-robin
(`experiments.harness.interleaved_times`), so that load changes on a shared machine
hit every adjoint alike; quote the ratios, measured side by side. A gradient faster
than 0.2 s is called back to back within a sample, as often as needed to take about
0.2 s, and the time per call reported. The forward solves
(the loss alone) through `Reversible(base)` and through `base` are timed in the same
round for the gradient/forward ratios. An adjoint whose compiled memory exceeds
`--max-memory` (default: 8 GiB or half the available memory, the smaller) is compiled
but not run, and its row says so; one that fails to compile says why.

The per-sample `jax.vmap` workloads (`CNF vmap Tsit5`, `CDE vmap Tsit5 PID`, issue
22) also have rows for both adjoints with their defaults, as a user writes them:
`RCA()` (`diffrax.RecursiveCheckpointAdjoint()` through the base) and
`Reversible()` (`revdiffrax.ReversibleAdjoint()`, drift and parasitic-mode checks
on, through `Reversible(base)`).

The exact Pareto frontier of a workload: the exact adjoints that no other exact
adjoint beats on both time and memory (at least as good on both, better on one). For
each workload the report says whether `Reversible` (checkpoint_every=None) is on it,
its memory over RCA(2)'s, and its speed-up over the fastest RCA whose memory is not
larger than its own.

Outputs, under `--out` (default `benchmarks/results/`, or `out/pareto-quick/` with
`--quick`): `pareto_<backend>_<workload>.json` per workload, the plot
`pareto_<workload>.png` (log-log time against memory, the frontier drawn; on a
non-CPU backend `pareto_<backend>_<workload>.png`) and `pareto_<backend>.md`, which
collects every workload result in that folder (so workloads measured by separate
runs, each with its command, end up in one report).

Run (from the repository root):

    python -m benchmarks.pareto --quick                 # smoke test, about a minute
    python -m benchmarks.pareto --only "white dwarf,64x16" --repeats 5
    python -m benchmarks.pareto --only CNF --repeats 3
    python -m benchmarks.pareto --memory-only           # compile only
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import revdiffrax
from benchmarks.workloads import Workload, workloads

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.harness import compile_timed, interleaved_times, tree_rel_error
from experiments.report import fmt_bytes, machine_info, markdown_table
from experiments.solvers import sqrt_checkpoints


REVERSIBLE = "Reversible"  # the label of ReversibleAdjoint(checkpoint_every=None)
DEFAULT_RCA = "RCA()"  # RecursiveCheckpointAdjoint(), diffrax's default adjoint
DEFAULT_REVERSIBLE = "Reversible()"  # ReversibleAdjoint(), its checks on
REFERENCE = "RCA(2)"  # the memory reference of issue 12
FWD_REV = "forward Reversible(base)"
FWD_BASE = "forward base"
# Calls shorter than this are repeated back to back within one timing sample.
MIN_SAMPLE_S = 0.2
# "Nearly the same memory": the tolerance of issue 12 (reversible <= 1.25x RCA(2)).
NEAR = 1.25


def adjoints(
    num_steps: int, defaults: bool = False
) -> dict[str, tuple[str, diffrax.AbstractAdjoint]]:
    """Label -> (kind, adjoint); kind is "checkpoint", "direct", "backsolve" or
    "reversible" (only the last goes through `revdiffrax.Reversible(base)`). With
    `defaults`, also `RCA()` and `Reversible()`: both adjoints with their defaults
    (for the per-sample `vmap` workloads, written as a user would)."""
    out: dict[str, tuple[str, diffrax.AbstractAdjoint]] = {}
    if defaults:
        out[DEFAULT_RCA] = ("checkpoint", diffrax.RecursiveCheckpointAdjoint())
        out[DEFAULT_REVERSIBLE] = ("reversible", revdiffrax.ReversibleAdjoint())
    counts = [2, 4, 8, 16, sqrt_checkpoints(num_steps), num_steps]
    for c in sorted(set(counts)):
        out[f"RCA({c})"] = (
            "checkpoint",
            diffrax.RecursiveCheckpointAdjoint(checkpoints=c),
        )
    out["Direct"] = ("direct", diffrax.DirectAdjoint())
    out["Backsolve"] = ("backsolve", diffrax.BacksolveAdjoint())
    for k in (None, 100, 10):
        label = REVERSIBLE if k is None else f"{REVERSIBLE}(k={k})"
        out[label] = (
            "reversible",
            revdiffrax.ReversibleAdjoint(checkpoint_every=k, drift_tol=None),
        )
    return out


def _solver(work: Workload, kind: str) -> diffrax.AbstractSolver:
    if kind != "reversible":
        return work.base
    return revdiffrax.Reversible(work.base, integrated=work.integrated)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_max_memory() -> int:
    limit = 8 * 2**30
    avail = _available_bytes()
    return limit if avail is None else min(limit, avail // 2)


def pareto_frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels of `points` (label -> (memory, time)) that no other point beats:
    at least as good on both, strictly better on one. Sorted by memory."""
    front = []
    for a, (ma, ta) in points.items():
        dominated = any(
            mb <= ma and tb <= ta and (mb < ma or tb < ta)
            for b, (mb, tb) in points.items()
            if b != a
        )
        if not dominated:
            front.append(a)
    return sorted(front, key=lambda k: (points[k][0], points[k][1]))


# ----------------------------------------------------------------------------------
# Measurement


def measure(
    work: Workload,
    repeats: int,
    memory_only: bool,
    max_memory: int,
    min_sample_s: float = MIN_SAMPLE_S,
) -> dict:
    """Compile (and time) every adjoint on `work`; one JSON-able dict. Calls shorter
    than `min_sample_s` are repeated within one timing sample."""
    rows: dict[str, dict] = {}
    compiled: dict[str, Any] = {}
    params = None
    for label, (kind, adj) in adjoints(work.num_steps, work.default_rows).items():
        row = dict(
            label=label,
            kind=kind,
            exact=kind != "backsolve",
            solver=type(_solver(work, kind)).__name__
            + ("" if kind != "reversible" else f"({type(work.base).__name__})"),
            temp_bytes=None,
            compile_s=None,
            time_s=None,
            min_s=None,
            rel_err=None,
            skipped=None,
        )
        rows[label] = row
        loss, params = work.loss(_solver(work, kind), adj)
        try:
            fn, compile_s, temp = compile_timed(jax.grad(loss), params, work.data)
        except Exception as e:  # a combination diffrax/revdiffrax does not support
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row["skipped"] = f"does not compile: {type(e).__name__}: {msg[:160]}"
            print(f"  {label}: {row['skipped']}", flush=True)
            continue
        row["compile_s"], row["temp_bytes"] = compile_s, temp
        print(
            f"  {label}: compiled in {compile_s:.1f} s, temp {fmt_bytes(temp)}",
            flush=True,
        )
        if temp is not None and temp > max_memory:
            row["skipped"] = (
                f"not run: needs {fmt_bytes(temp)} > limit {fmt_bytes(max_memory)}"
            )
        else:
            compiled[label] = fn
    forwards = {}
    if not memory_only:
        for name, kind, adj in (
            (FWD_REV, "reversible", adjoints(work.num_steps)[REVERSIBLE][1]),
            (FWD_BASE, "checkpoint", diffrax.RecursiveCheckpointAdjoint()),
        ):
            loss, params = work.loss(_solver(work, kind), adj)
            forwards[name] = compile_timed(loss, params, work.data)[0]
        fns = {k: (f, (params, work.data)) for k, f in (compiled | forwards).items()}
        fns = {k: (lambda a, f=f: f(*a), x) for k, (f, x) in fns.items()}
        tic = time.perf_counter()
        times = interleaved_times(fns, repeats, min_sample_s=min_sample_s)
        print(f"  timed in {time.perf_counter() - tic:.0f} s", flush=True)
        for label in compiled:
            rows[label]["time_s"], rows[label]["min_s"] = times[label]
        forward_s = {k: times[k][0] for k in forwards}
        # Gradient errors against RCA(N) (the same solver, stored states): shows
        # that Backsolve is approximate and the others agree.
        ref_label = f"RCA({work.num_steps})"
        if ref_label in compiled:
            ref = compiled[ref_label](params, work.data)
            for label in ("Direct", "Backsolve"):
                if label in compiled:
                    grad = compiled[label](params, work.data)
                    rows[label]["rel_err"] = tree_rel_error(grad, ref)
    else:
        forward_s = {}
    return dict(
        name=work.name,
        slug=work.slug,
        description=work.description,
        num_steps=work.num_steps,
        base=type(work.base).__name__,
        dtype=jnp.dtype(work.dtype).name,
        repeats=repeats,
        memory_only=memory_only,
        rows=list(rows.values()),
        forward_s=forward_s,
    )


# ----------------------------------------------------------------------------------
# Verdicts


def analyse(result: dict) -> dict:
    """The frontier and the verdicts of one workload result (adds them to it)."""
    rows = {r["label"]: r for r in result["rows"]}
    rev, ref = rows.get(REVERSIBLE), rows.get(REFERENCE)
    lines = []
    if rev is None or rev["temp_bytes"] is None:
        lines.append(f"{REVERSIBLE} was not measured.")
        result["frontier"], result["verdict"] = [], lines
        return result
    mem_rev = rev["temp_bytes"]
    if ref is not None and ref["temp_bytes"]:
        lines.append(
            f"memory {REVERSIBLE} / {REFERENCE}: "
            f"{mem_rev / ref['temp_bytes']:.2f}x ({fmt_bytes(mem_rev)} vs "
            f"{fmt_bytes(ref['temp_bytes'])})"
        )
    if result["memory_only"]:
        exact = {
            k: r["temp_bytes"]
            for k, r in rows.items()
            if r["exact"] and r["temp_bytes"] is not None
        }
        smallest = min(exact, key=exact.get)
        lines.append(
            f"frontier: not computed (--memory-only); smallest exact memory: "
            f"{smallest} ({fmt_bytes(exact[smallest])})"
        )
        result["frontier"], result["verdict"] = [], lines
        return result
    points = {
        k: (r["temp_bytes"], r["time_s"])
        for k, r in rows.items()
        if r["exact"] and r["time_s"] is not None and r["temp_bytes"] is not None
    }
    front = pareto_frontier(points)
    result["frontier"] = front
    for k, r in rows.items():
        r["on_frontier"] = k in front
    if REVERSIBLE in front:
        lines.append(f"{REVERSIBLE} is on the exact frontier: yes")
    elif REVERSIBLE in points:
        m, t = points[REVERSIBLE]
        beaten = [
            k
            for k, (mb, tb) in points.items()
            if k != REVERSIBLE and mb <= m and tb <= t
        ]
        lines.append(
            f"{REVERSIBLE} is on the exact frontier: NO (beaten on both time and "
            f"memory by {', '.join(beaten)})"
        )
    else:
        lines.append(f"{REVERSIBLE} is on the exact frontier: not timed")
    if rev["time_s"] is not None:
        fits = {
            k: r["time_s"]
            for k, r in rows.items()
            if r["kind"] == "checkpoint"
            and r["time_s"] is not None
            and r["temp_bytes"] <= mem_rev
        }
        if fits:
            best = min(fits, key=fits.get)
            lines.append(
                f"speed-up of {REVERSIBLE} over the fastest RCA with memory <= its "
                f"own ({best}: {fits[best]:.3g} s, "
                f"{fmt_bytes(rows[best]['temp_bytes'])}): "
                f"{fits[best] / rev['time_s']:.2f}x"
            )
        else:
            lines.append(
                f"speed-up of {REVERSIBLE} over the fastest RCA with memory <= its "
                f"own: none (every RCA needs more memory than {fmt_bytes(mem_rev)})"
            )
        near = {
            k: r["time_s"]
            for k, r in rows.items()
            if r["exact"]
            and r["time_s"] is not None
            and r["temp_bytes"] <= NEAR * mem_rev
        }
        best = min(near, key=near.get)
        if best == REVERSIBLE:
            lines.append(
                f"fastest exact adjoint within {NEAR}x {REVERSIBLE}'s memory: "
                f"{REVERSIBLE} itself"
            )
        else:
            lines.append(
                f"fastest exact adjoint within {NEAR}x {REVERSIBLE}'s memory: {best} "
                f"({fmt_bytes(rows[best]['temp_bytes'])}, {near[best]:.3g} s), "
                f"{rev['time_s'] / near[best]:.2f}x faster than {REVERSIBLE}"
            )
        fwd = result["forward_s"].get(FWD_REV)
        if fwd:
            lines.append(
                f"{REVERSIBLE} gradient / forward time: {rev['time_s'] / fwd:.2f} "
                f"({rev['time_s']:.3g} s / {fwd:.3g} s)"
            )
    result["verdict"] = lines
    return result


# ----------------------------------------------------------------------------------
# Report


TABLE_HEADER = [
    "adjoint",
    "solver",
    "temp memory",
    "memory / RCA(2)",
    "grad time (median)",
    "min",
    "time / Reversible",
    "grad rel. err vs RCA(N)",
    "exact frontier",
    "note",
]


def table(result: dict) -> str:
    rows = {r["label"]: r for r in result["rows"]}
    ref_mem = (rows.get(REFERENCE) or {}).get("temp_bytes")
    rev_t = (rows.get(REVERSIBLE) or {}).get("time_s")
    out = []
    for r in result["rows"]:
        mem, t = r["temp_bytes"], r["time_s"]
        if not r["exact"]:
            frontier = "approximate"
        elif result["memory_only"]:
            frontier = ""
        else:
            frontier = "**yes**" if r.get("on_frontier") else "no"
        out.append(
            [
                f"**{r['label']}**" if r["label"] == REVERSIBLE else r["label"],
                r["solver"],
                fmt_bytes(mem),
                f"{mem / ref_mem:.2f}x" if mem is not None and ref_mem else "",
                f"{t:.3g} s" if t is not None else "",
                f"{r['min_s']:.3g} s" if r["min_s"] is not None else "",
                f"{t / rev_t:.2f}x" if t is not None and rev_t else "",
                f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "",
                frontier,
                r["skipped"] or ("approximate gradient" if not r["exact"] else ""),
            ]
        )
    return markdown_table(TABLE_HEADER, out)


def section(result: dict) -> str:
    what = (
        "compiled memory only"
        if result["memory_only"]
        else (f"median of {result['repeats']} interleaved calls after a warm-up")
    )
    parts = [
        f"## {result['name']}\n",
        f"{result['description']}, N={result['num_steps']} steps; {what}.\n",
        f"Command: `{result['command']}` ({result['date']}).\n",
        table(result) + "\n",
    ]
    if result["forward_s"]:
        parts.append(
            "Forward (loss only) time: "
            + ", ".join(f"{k}: {v:.3g} s" for k, v in result["forward_s"].items())
            + ".\n"
        )
    if result["frontier"]:
        parts.append("Exact frontier (by memory): " + ", ".join(result["frontier"]))
        parts.append("")
    parts += [f"- {line}" for line in result["verdict"]]
    return "\n".join(parts) + "\n"


def _short(label: str) -> str:
    return label.replace(REVERSIBLE, "Rev")


def _label_offsets(
    points: list[tuple[float, float, str]],
    size: tuple[float, float] = (460, 300),
    char: float = 5.5,
    height: float = 10,
    log_x: bool = True,
) -> list[tuple[int, int]]:
    """Text offsets (points) for labels right of log-log markers, chosen greedily so
    that the labels' boxes (about 5.5 pt per character, 10 pt high, on a plot about
    460 x 300 pt) do not overlap."""
    if not points:
        return []
    lx = [math.log10(x) if log_x else x for x, _, _ in points]
    ly = [math.log10(y) for _, y, _ in points]
    sx = (max(lx) - min(lx)) or 1.0
    sy = (max(ly) - min(ly)) or 1.0
    placed: list[tuple[float, float, float, float]] = []
    out = []
    candidates = [4, -12, 14, -22, 24, -32, 34, -42]
    for (x, y, text), px, py in zip(points, lx, ly):
        px = (px - min(lx)) / sx * size[0]
        py = (py - min(ly)) / sy * size[1]
        width = char * len(text)
        for dy in candidates:
            box = (px + 6, px + 6 + width, py + dy, py + dy + height)
            if not any(
                box[0] < b[1] and b[0] < box[1] and box[2] < b[3] and b[2] < box[3]
                for b in placed
            ):
                break
        placed.append(box)
        out.append((6, dy))
    return out


def _zoom_inset(ax, shown, front, scale, style) -> bool:
    """Where most adjoints need nearly the same memory (within 1.25x of the least)
    and others far more, a linear-memory inset of that cluster, lower right."""
    from matplotlib.ticker import FuncFormatter

    least = min((r["temp_bytes"] for r in shown), default=0)
    cluster = [r for r in shown if r["temp_bytes"] <= NEAR * least]
    if len(cluster) < 4 or max(r["temp_bytes"] for r in shown) < 4 * least:
        return False
    sub = ax.inset_axes([0.5, 0.07, 0.47, 0.42])
    offsets = _label_offsets(
        [(r["temp_bytes"] / scale, r["time_s"], _short(r["label"])) for r in cluster],
        size=(230, 120),
        char=3.5,
        height=7,
        log_x=False,
    )
    for r, offset in zip(cluster, offsets):
        x, y = r["temp_bytes"] / scale, r["time_s"]
        sub.scatter(x, y, s=30, zorder=3, **style[r["kind"]])
        sub.annotate(
            _short(r["label"]),
            (x, y),
            textcoords="offset points",
            xytext=(4, offset[1] * 0.7),
            fontsize=6,
            color=style[r["kind"]]["color"] if r["kind"] != "backsolve" else "0.35",
        )
    names = {r["label"] for r in cluster}
    xs = [
        r["temp_bytes"] / scale
        for r in shown
        if r["label"] in front and r["label"] in names
    ]
    ys = [r["time_s"] for r in shown if r["label"] in front and r["label"] in names]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    sub.step(
        [xs[i] for i in order],
        [ys[i] for i in order],
        where="post",
        color="k",
        lw=1,
        ls="--",
        alpha=0.6,
    )
    sub.set_yscale("log")
    sub.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    sub.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    sub.tick_params(labelsize=6)
    sub.set_title("zoom, linear memory axis", fontsize=6)
    sub.grid(True, which="both", alpha=0.25)
    x0, x1 = sub.get_xlim()
    sub.set_xlim(x0, x1 + 0.35 * (x1 - x0))
    return True


def plot(result: dict, path: str) -> str:
    """Log-log time against memory, one labelled point per adjoint, the exact
    frontier as a staircase, approximate adjoints hollow grey crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "checkpoint": dict(marker="o", color="tab:blue"),
        "direct": dict(marker="s", color="tab:orange"),
        "reversible": dict(marker="D", color="tab:red"),
        "backsolve": dict(marker="x", color="0.5"),
    }
    names = {
        "checkpoint": "RecursiveCheckpointAdjoint(c)",
        "direct": "DirectAdjoint",
        "reversible": "revdiffrax ReversibleAdjoint(k)",
        "backsolve": "BacksolveAdjoint (approximate)",
    }
    fig, ax = plt.subplots(figsize=(7.5, 5))
    shown = [r for r in result["rows"] if r["time_s"] is not None and r["temp_bytes"]]
    big = max((r["temp_bytes"] for r in shown), default=0) >= 2**20
    unit, scale = ("MiB", 2**20) if big else ("KiB", 2**10)
    offsets = _label_offsets(
        [(r["temp_bytes"] / scale, r["time_s"], _short(r["label"])) for r in shown]
    )
    seen = set()
    for r, offset in zip(shown, offsets):
        x, y = r["temp_bytes"] / scale, r["time_s"]
        kind = r["kind"]
        ax.scatter(
            x,
            y,
            s=55 if kind != "backsolve" else 70,
            zorder=3,
            label=names[kind] if kind not in seen else None,
            **style[kind],
        )
        seen.add(kind)
        ax.annotate(
            _short(r["label"]),
            (x, y),
            textcoords="offset points",
            xytext=offset,
            fontsize=8,
            color=style[kind]["color"] if kind != "backsolve" else "0.35",
        )
    rows = {r["label"]: r for r in result["rows"]}
    front = result.get("frontier") or []
    if len(front) >= 1:
        xs = [rows[k]["temp_bytes"] / scale for k in front]
        ys = [rows[k]["time_s"] for k in front]
        ax.step(
            xs,
            ys,
            where="post",
            color="k",
            lw=1,
            ls="--",
            alpha=0.6,
            zorder=2,
            label="exact Pareto frontier",
        )
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="k", lw=1, zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    def major(v, _):
        return f"{v:g}"

    def minor(v, _):
        lead = f"{v:.0e}"[0]
        return f"{v:g}" if lead in "25" else ""

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(major))
        axis.set_minor_formatter(FuncFormatter(minor))
    ax.set_xlabel(f"compiled temp memory of the gradient ({unit})")
    ax.set_ylabel("gradient time, median (s)")
    skipped = [r["label"] for r in result["rows"] if r["time_s"] is None]
    title = f"{result['name']}, N={result['num_steps']}: {result['description']}"
    title = "\n".join(textwrap.wrap(title, 110))
    if skipped:
        title += f"\nnot shown (see table): {', '.join(skipped)}"
    ax.set_title(title, fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    inset = _zoom_inset(ax, shown, front, scale, style)
    ax.legend(fontsize=8, loc="upper right" if inset else "best")
    # Room for the labels on the right and top.
    x0, x1 = ax.get_xlim()
    ax.set_xlim(x0, x1 * 1.6)
    y0, y1 = ax.get_ylim()
    ax.set_ylim(y0, y1 * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: str, backend: str) -> str:
    """`pareto_<backend>.md` from every `pareto_<backend>_*.json` in `out_dir`, in
    the order of `workloads`."""
    results = []
    for p in glob.glob(os.path.join(out_dir, f"pareto_{backend}_*.json")):
        with open(p) as f:
            results.append(json.load(f))
    order = list(workloads(quick=False))
    results.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else 99)
    machine = results[0]["machine"] if results else machine_info()
    lines = [
        f"# Pareto benchmark of the adjoints ({backend})\n",
        "Compiled temp memory (`memory_analysis().temp_size_in_bytes`) and time of "
        "one jitted gradient per adjoint, `benchmarks/pareto.py` (its docstring "
        "describes the method). RCA, Direct and Backsolve differentiate the base "
        "solver, `Reversible(k)` is `revdiffrax.ReversibleAdjoint(checkpoint_every="
        "k, drift_tol=None)` through `revdiffrax.Reversible(base)`. Times are "
        "medians of calls interleaved round-robin on a shared machine: compare "
        "them within a workload, as ratios.\n",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()) + ".\n",
        "## Verdicts\n",
    ]
    missing = [name for name in order if name not in {r["name"] for r in results}]
    if missing:
        lines.append(f"Not measured (no result here): {', '.join(missing)}.\n")
    for r in results:
        lines.append(f"**{r['name']}** (N={r['num_steps']}):\n")
        lines += [f"- {v}" for v in r["verdict"]]
        lines.append("")
    lines += [section(r) for r in results]
    path = os.path.join(out_dir, f"pareto_{backend}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------


def _plot_path(out_dir: str, backend: str, slug: str) -> str:
    prefix = "pareto" if backend == "cpu" else f"pareto_{backend}"
    return os.path.join(out_dir, f"{prefix}_{slug}.png")


def replot(out_dir: str, backend: str) -> dict:
    """Re-analyse the saved results, redraw their plots and rewrite the report."""
    results = {}
    for p in sorted(glob.glob(os.path.join(out_dir, f"pareto_{backend}_*.json"))):
        with open(p) as f:
            result = analyse(json.load(f))
        if not result["memory_only"]:
            result["plot"] = plot(result, _plot_path(out_dir, backend, result["slug"]))
        with open(p, "w") as f:
            json.dump(result, f, indent=1)
        results[result["name"]] = result
    report = write_report(out_dir, backend)
    print(f"report: {report}")
    return dict(results=results, report=report)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke)")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated workloads (a case-insensitive part of the name is "
        "enough), e.g. 'white,64x16' or 'CNF'",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-only", action="store_true", help="compile only")
    parser.add_argument(
        "--max-memory",
        type=float,
        default=None,
        help="GiB; adjoints needing more compiled temp memory are not run "
        "(default: 8 GiB or half the available memory, the smaller)",
    )
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="measure nothing: redraw the plots and the report from the JSON files "
        "in --out",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    out_dir = str(
        args.out
        or (os.path.join("out", "pareto-quick") if args.quick else "benchmarks/results")
    )
    os.makedirs(out_dir, exist_ok=True)
    max_memory = (
        int(args.max_memory * 2**30) if args.max_memory else default_max_memory()
    )
    backend = jax.default_backend()
    if args.replot:
        return replot(out_dir, backend)
    machine = machine_info()
    command = "python -m benchmarks.pareto " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    makers = workloads(args.quick)
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        makers = {
            k: v for k, v in makers.items() if any(w in k.lower() for w in wanted)
        }
        if not makers:
            names = list(workloads(False))
            parser.error(f"--only {args.only!r} matches none of {names}")
    print(
        f"# Pareto benchmark ({backend}), {'quick, ' if args.quick else ''}"
        f"repeats {args.repeats}, run limit {fmt_bytes(max_memory)}\n",
        flush=True,
    )
    results = {}
    for name, make in makers.items():
        work = make()
        print(f"{name} (N={work.num_steps}): {work.description}", flush=True)
        tic = time.perf_counter()
        # `--quick` times each call once: its times only show that the rows run.
        min_sample_s = 0.0 if args.quick else MIN_SAMPLE_S
        result = measure(work, args.repeats, args.memory_only, max_memory, min_sample_s)
        result.update(
            command=command,
            machine=machine,
            quick=args.quick,
            date=datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"
            ),
            wall_s=time.perf_counter() - tic,
        )
        analyse(result)
        if not args.memory_only:
            result["plot"] = plot(result, _plot_path(out_dir, backend, work.slug))
        json_path = os.path.join(out_dir, f"pareto_{backend}_{work.slug}.json")
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
        print("\n" + section(result), flush=True)
        results[name] = result
    report = write_report(out_dir, backend)
    print(f"report: {report}")
    return dict(results=results, report=report)


if __name__ == "__main__":
    main()
