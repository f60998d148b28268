"""Adjoints, tables, plots and the report of the experiments where memory binds
(`cnf`, `digits_odenet`, `uea_cde`); their training and timing loop is
`experiments.training_loop`.

The adjoints compared are `ReversibleAdjoint`, `RecursiveCheckpointAdjoint(c)` for
several c and `DirectAdjoint`, all through the same `Reversible(base)` solver (so
every exact adjoint follows the same training trajectory), and, marked
`[base solver]`, `RecursiveCheckpointAdjoint` through the plain base solver at the
same step size: what a diffrax user would otherwise run, at about half the cost per
step of `Reversible(base)`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TYPE_CHECKING

import diffrax
import jax
import numpy as np
import optax
from jaxtyping import PyTree

from .harness import peak_rss_mb
from .report import fmt_bytes, markdown_table
from .solvers import make_adjoint, sqrt_checkpoints


if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclasses.dataclass(frozen=True)
class AdjointSpec:
    """An adjoint of the comparison: `kind` is reversible, checkpoint or direct;
    `base`: through the plain base solver instead of `Reversible(base)`."""

    kind: str
    checkpoints: int | None = None
    base: bool = False

    @property
    def label(self) -> str:
        name = f"checkpoint({self.checkpoints})" if self.kind == "checkpoint" else None
        name = name or self.kind
        return name + (" [base solver]" if self.base else "")

    def make(self) -> diffrax.AbstractAdjoint:
        return make_adjoint(self.kind, self.checkpoints)


def optax_step(loss_fn: Callable, optim) -> Callable:
    """`step(params, opt_state, key, data) -> (params, opt_state, loss, metric)`: one
    optax update on `loss_fn(params, key, data) -> (loss, metric)`, the step
    function every experiment's `make_step(adjoint)` returns."""

    def step(params, opt_state, key, data):
        (loss, metric), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, key, data
        )
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, metric

    return step


def parse_adjoints(spec: str, num_steps: int) -> list[AdjointSpec]:
    """Adjoints from a comma list such as ``reversible,checkpoint:2,checkpoint:sqrt,
    checkpoint:N,direct,checkpoint:sqrt@base`` (sqrt = floor(sqrt(2N)), N = the
    number of steps; `@base`: through the plain base solver); duplicates (e.g.
    8 = floor(sqrt(2N))) are dropped."""
    specs: list[AdjointSpec] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        item, sep, where = item.partition("@")
        if sep and (where != "base" or item == "reversible"):
            raise SystemExit(
                f"error: bad adjoint {item + sep + where!r}; only checkpoint and "
                "direct can run through the plain base solver (<adjoint>@base)"
            )
        kind, _, count = item.partition(":")
        if kind == "checkpoint":
            named = {"sqrt": sqrt_checkpoints(num_steps), "N": num_steps}
            try:
                c = named[count] if count in named else int(count)
            except ValueError:
                raise SystemExit(f"error: bad checkpoint count in {item!r}") from None
            new = AdjointSpec("checkpoint", min(max(c, 1), num_steps), bool(sep))
        elif kind in ("reversible", "direct") and not count:
            new = AdjointSpec(kind, base=bool(sep))
        else:
            raise SystemExit(
                f"error: unknown adjoint {item!r}; use reversible, direct or "
                "checkpoint:<count|sqrt|N>, optionally followed by @base"
            )
        if new not in specs:
            specs.append(new)
    return specs


DEFAULT_ADJOINTS = (
    "reversible,checkpoint:2,checkpoint:8,checkpoint:sqrt,checkpoint:N,direct,"
    "checkpoint:sqrt@base"
)


def _vm_hwm_mb() -> float | None:
    """The process's resident-memory high-water mark (Linux), in MiB."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark of this process; False
    where that is not possible (then `current_peak_rss_mb` is the process peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_peak_rss_mb() -> float:
    """Peak RSS since the last `reset_peak_rss` (or of the whole process)."""
    hwm = _vm_hwm_mb()
    return peak_rss_mb() if hwm is None else hwm


# step(params, opt_state, key, data) -> (params, opt_state, loss, metric)
Step = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[Any, Any, Any, Any]]


# ---------------------------------------------------------------------------
# Tables, CSV and plots
# ---------------------------------------------------------------------------

CSV_KEYS = (
    "group",
    "label",
    "kind",
    "checkpoints",
    "base_solver",
    "iters",
    "trained",
    "final_loss",
    "eval_metric",
    "median_iter_s",
    "mean_iter_s",
    "first_call_s",
    "compile_s",
    "temp_bytes",
    "peak_rss_mb",
    "loss_rel_diff",
)


def _fmt(x: float | None, f: str) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{f}}"
    )


def table_rows(records: Sequence[dict], metric: str) -> list[list[str]]:
    """One markdown row per adjoint: ratios are against the reversible record."""
    ref = next((r for r in records if r["kind"] == "reversible"), None)
    rows = []
    for r in records:
        t, temp = r.get("median_iter_s"), r.get("temp_bytes")
        t_ratio = mem_ratio = "n/a"
        if ref is not None and t is not None and ref.get("median_iter_s"):
            t_ratio = f"{t / ref['median_iter_s']:.2f}x"
        if ref is not None and temp is not None and ref.get("temp_bytes"):
            mem_ratio = f"{temp / ref['temp_bytes']:.2f}x"
        ev = r.get("eval", {}).get(metric)
        rows.append(
            [
                r["label"],
                str(r["iters"]) if r["ran"] else "0 (compiled only)",
                _fmt(r.get("final_loss"), ".4f"),
                _fmt(ev, ".4f") if r.get("trained") else "",
                _fmt(r.get("loss_rel_diff"), ".1e"),
                _fmt(t, ".3f"),
                t_ratio,
                _fmt(r["compile_s"], ".1f"),
                fmt_bytes(temp),
                mem_ratio,
                _fmt(r.get("peak_rss_mb"), ".0f"),
            ]
        )
    return rows


def table_markdown(records: Sequence[dict], metric: str, loss_name: str) -> str:
    header = [
        "adjoint",
        "iters run",
        f"final train {loss_name}",
        metric,
        "max rel. loss diff vs reversible",
        "s / iter (median)",
        "time / reversible",
        "compile (s)",
        "compiled temp memory",
        "temp / reversible",
        "peak RSS (MiB)",
    ]
    return markdown_table(header, table_rows(records, metric))


def write_csv(path: str, groups: dict[str, Sequence[dict]], metric: str) -> None:
    """One line per (group, adjoint): `groups` maps a group name (a solver, a step
    count) to its records."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for group, records in groups.items():
            for r in records:
                w.writerow(
                    dict(r, group=group, eval_metric=r.get("eval", {}).get(metric))
                )


def save_figure(fig: Figure, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_cost(groups: dict[str, Sequence[dict]], title: str, path: str) -> str:
    """Time per iteration and compiled temp memory per adjoint, one bar group per
    `groups` entry (e.g. per base solver)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for rs in groups.values() for r in rs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(labels))
    for i, (group, records) in enumerate(groups.items()):
        by = {r["label"]: r for r in records}
        t = [1e3 * (by.get(lab, {}).get("median_iter_s") or np.nan) for lab in labels]
        m = [(by.get(lab, {}).get("temp_bytes") or np.nan) / 2**20 for lab in labels]
        axes[0].bar(x + i * width, t, width, label=group)
        axes[1].bar(x + i * width, m, width, label=group)
    axes[0].set_ylabel("time per training iteration (ms)")
    axes[1].set_ylabel("compiled temp memory (MiB)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xticks(x + 0.4 - width / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_losses(
    groups: dict[str, Sequence[dict]], title: str, ylabel: str, path: str
) -> str:
    """Training loss curves of every run (solid: trained, dotted: timing runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group, records in groups.items():
        for r in records:
            if not r.get("losses"):
                continue
            style = "-" if r["trained"] else ":"
            name = f"{r['label']}" + (f" / {group}" if len(groups) > 1 else "")
            xs = np.arange(1, len(r["losses"]) + 1)
            ax.plot(
                xs, r["losses"], style, marker="" if r["trained"] else ".", label=name
            )
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def summary_line(records: Sequence[dict]) -> str:
    """Whether reversible uses less temp memory than every checkpoint configuration
    that is faster than it, and its memory ratio to DirectAdjoint."""
    ref = next((r for r in records if r["kind"] == "reversible"), None)
    if ref is None or ref.get("temp_bytes") is None:
        return "No reversible run to compare with."
    faster = [
        r
        for r in records
        if r["kind"] == "checkpoint"
        and r.get("median_iter_s") is not None
        and ref.get("median_iter_s") is not None
        and r["median_iter_s"] < ref["median_iter_s"]
    ]
    less = [
        r
        for r in faster
        if r["temp_bytes"] is not None and r["temp_bytes"] < ref["temp_bytes"]
    ]
    parts = []
    if not faster:
        parts.append("no checkpoint configuration was faster than reversible")
    else:
        names = ", ".join(r["label"] for r in faster)
        verdict = "met" if not less else "not met"
        parts.append(
            f"faster than reversible: {names}; reversible uses less temp memory than "
            f"all of them: {verdict}"
        )
    for r in records:
        if r.get("base_solver") and r.get("median_iter_s") and ref.get("median_iter_s"):
            parts.append(
                f"reversible takes {ref['median_iter_s'] / r['median_iter_s']:.2f}x "
                f"the time per iteration of {r['label']}"
            )
    direct = next((r for r in records if r["kind"] == "direct"), None)
    if direct is not None and direct.get("temp_bytes"):
        parts.append(
            f"DirectAdjoint / reversible temp memory: "
            f"{direct['temp_bytes'] / ref['temp_bytes']:.1f}x"
        )
    return "; ".join(parts) + "."


def write_text(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------
# The command line and report shared by the three experiments
# ---------------------------------------------------------------------------


def add_common_flags(p: argparse.ArgumentParser, name: str) -> None:
    """--adjoints, --train, --compile-only, iterations, seed, memory limit, output."""
    p.add_argument(
        "--adjoints",
        default=None,
        help=f"comma list (default {DEFAULT_ADJOINTS}); checkpoint:sqrt is "
        "floor(sqrt(2N)) checkpoints, checkpoint:N one per step",
    )
    p.add_argument(
        "--train",
        default="reversible,checkpoint:sqrt",
        help="adjoints trained for --iters (default reversible,checkpoint:sqrt); the "
        "others run --time-iters iterations",
    )
    p.add_argument(
        "--compile-only",
        default="",
        help="adjoints that are compiled (memory) but not run, e.g. checkpoint:2",
    )
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.add_argument(
        "--time-iters", type=int, default=None, help="iterations of the other adjoints"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-run-mib",
        type=float,
        default=4096,
        help="compile but do not run steps needing more temp memory (MiB)",
    )
    p.add_argument("--out", default=os.path.join("out", name))
    p.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true")


def fill_defaults(args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Set every flag left at None from `quick` or `full`."""
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def base_result(
    name: str, argv: Sequence[str] | None, args: argparse.Namespace, keys: Sequence[str]
) -> dict:
    """The command, configuration, machine and date of a run."""
    from .report import machine_info

    cli = list(argv) if argv is not None else sys.argv[1:]
    return dict(
        experiment=name,
        command=" ".join([f"python -m experiments.{name}", *cli]),
        config={k: getattr(args, k) for k in keys},
        machine=machine_info(),
        date=datetime.date.today().isoformat(),
        plots=[],
    )


def _base_solver_bullet(tables: dict[str, Sequence[dict]]) -> list[str]:
    """The note on the `[base solver]` rows, if there are any."""
    if not any(r.get("base_solver") for rs in tables.values() for r in rs):
        return []
    return [
        "- Rows marked *[base solver]* run `RecursiveCheckpointAdjoint` (or "
        "`DirectAdjoint`) through the plain base solver at the same step size, not "
        "through `Reversible(base)`: the comparison a diffrax user would make. A "
        "`Reversible(base)` step costs about two base steps, so these rows are "
        "faster per iteration than the same adjoint through `Reversible(base)`; "
        "they solve a different (equally accurate) discrete model, so their losses "
        "differ slightly from the reversible run's."
    ]


def report_markdown(
    result: dict,
    title: str,
    bullets: Sequence[str],
    metric: str,
    loss_name: str,
    metric_doc: str,
) -> str:
    """The markdown report: command, setting, one table per group, plots."""
    cfg, m, s = result["config"], result["machine"], result["settings"]
    lines = [f"# {title}", "", "Command:", "", "```", result["command"], "```", ""]
    lines += [f"- {b}" for b in bullets]
    lines += [
        f"- Iterations: {', '.join(s['train'])} train for {cfg['iters']} iterations; "
        f"the other adjoints run {cfg['time_iters']} iterations from the same "
        "initialisation and minibatches, for timing and to check that their losses "
        "equal the reversible run's"
        + (
            f"; compiled only: {', '.join(s['compile_only'])}"
            if s["compile_only"]
            else ""
        )
        + f". A step whose compiled temp memory exceeds {cfg['max_run_mib']:g} MiB "
        "is compiled but not run.",
        *_base_solver_bullet(result["tables"]),
        f"- Machine: {m['platform']}, {m['cpu_count']} CPUs, shared with other jobs "
        f"(times are noisy), backend {m['backend']}; python {m['python']}, jax "
        f"{m['jax']}, diffrax {m['diffrax']}, equinox {m['equinox']}.",
        f"- Date: {result['date']}; wall time {result['wall_s'] / 60:.1f} min.",
        "",
        f"Columns: *final train {loss_name}*: loss of the last iteration run; "
        f"*{metric}*: {metric_doc}; *max rel. loss diff*: largest relative "
        "difference between the run's per-iteration losses and the reversible run's "
        "(same minibatches); *s / iter*: median over the iterations after the first "
        "(compilation and the first call excluded); *compiled temp memory*: "
        "`jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes` "
        "of the training step; *peak RSS*: the process's resident high-water mark "
        "while that adjoint compiled and ran (reset through `/proc/self/clear_refs` "
        "before each; includes the Python process, about 0.5 GiB).",
        "",
    ]
    for group, records in result["tables"].items():
        lines += [f"## {group}", "", table_markdown(records, metric, loss_name), ""]
        lines += ["- " + summary_line(records), ""]
    lines += [
        f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in result["plots"]
    ]
    return "\n".join(lines) + "\n"


def finish(result: dict, out: str, metric: str, loss_name: str, md: str) -> dict:
    """Write `<name>.json`, `.csv` and `.md` to `out` and print the tables."""
    name = result["experiment"]
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_csv(os.path.join(out, f"{name}.csv"), result["tables"], metric)
    path = write_text(os.path.join(out, f"{name}.md"), md)
    for group, records in result["tables"].items():
        print(f"\n{group}\n" + table_markdown(records, metric, loss_name))
        print(summary_line(records))
    print(f"\nwrote {path}")
    result["files"] = [path, *result["plots"]]
    return result
