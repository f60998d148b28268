"""Run the published comparison grid and write ``results/<experiment>.md``.

For each experiment: ``ReversibleAdjoint`` against ``RecursiveCheckpointAdjoint``
with 2, 4, 8, 16 and floor(sqrt(2N)) checkpoints, over the given seeds. Every
(configuration, seed) runs in its own process (``python -m experiments.<name>``),
so the peak RSS of each run is its own. The markdown report states the exact
command, the machine, the iterations, and whether the target (reversible at least
2.5x faster than floor(sqrt(2N)) checkpoints, final loss within 10%) was met.

    python -m experiments.run_grid --iters 200 --seeds 0 \\
        --oscillator-data ../shared/data/real_double_linear_h_1.txt \\
        --pendulum-data ../shared/data/real_double_pend_h_1.txt
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from .problem import problem_from_result
from .report import machine_info, make_plots, summarise, table_markdown
from .solvers import sqrt_checkpoints


EXPERIMENTS = ("white_dwarf", "coupled_oscillators", "double_pendulum")
TITLES = {
    "white_dwarf": "White dwarf (Chandrasekhar) equation",
    "coupled_oscillators": "Coupled oscillators",
    "double_pendulum": "Chaotic double pendulum",
}
# Nominal number of steps N of each experiment (full size): fixed steps for the
# first two; one step per data interval for the adaptive pendulum.
NUM_STEPS = {"white_dwarf": 1000, "coupled_oscillators": 499, "double_pendulum": 499}
NUM_STEPS_QUICK = {"white_dwarf": 100, "coupled_oscillators": 99, "double_pendulum": 99}
TARGET_SPEEDUP = 2.5
TARGET_LOSS_TOL = 0.10


def _configs(exp: str, args) -> list[tuple[str, list[str], int | None]]:
    """(tag, flags, iters) of every run of one experiment (per seed)."""
    n = (NUM_STEPS_QUICK if args.quick else NUM_STEPS)[exp]
    sq = sqrt_checkpoints(n)
    cks = sorted({int(c) if c != "sqrt" else sq for c in args.checkpoints})
    reduced = set() if args.reduced_iters is None else set(args.reduced_checkpoints)
    configs = [("reversible", ["--adjoint", "reversible"], args.iters)]
    for c in cks:
        configs.append(
            (
                f"checkpoint{c}",
                ["--adjoint", "checkpoint", "--checkpoints", str(c)],
                args.reduced_iters if c in reduced else args.iters,
            )
        )
    if args.base_solver_baseline:
        configs.append(
            (
                f"checkpoint{sq}_base",
                [
                    "--adjoint",
                    "checkpoint",
                    "--checkpoints",
                    str(sq),
                    "--baseline-solver",
                    "base",
                ],
                args.iters,
            )
        )
    for extra in args.extra:
        configs.append((extra, ["--adjoint", extra], args.iters))
    if exp == "white_dwarf":
        for solver in args.extra_solvers:
            configs.append(
                (
                    f"reversible_{solver}",
                    ["--adjoint", "reversible", "--solver", solver],
                    args.extra_solver_iters or args.iters,
                )
            )
            configs.append(
                (
                    f"checkpoint{sq}_{solver}",
                    [
                        "--adjoint",
                        "checkpoint",
                        "--checkpoints",
                        str(sq),
                        "--solver",
                        solver,
                    ],
                    args.extra_solver_iters or args.iters,
                )
            )
    return configs


def run_one(
    exp: str, tag: str, flags: list[str], iters: int | None, seed: int, args
) -> dict:
    out = os.path.join(args.out, exp, f"{tag}_seed{seed}")
    cmd = [
        sys.executable,
        "-m",
        f"experiments.{exp}",
        *flags,
        "--seeds",
        str(seed),
        "--out",
        out,
        "--no-plots",
        "--no-progress",
    ]
    if iters is not None:
        cmd += ["--iters", str(iters)]
    if args.quick:
        cmd.append("--quick")
    data = {
        "coupled_oscillators": args.oscillator_data,
        "double_pendulum": args.pendulum_data,
    }.get(exp)
    if data:
        cmd += ["--data", data]
    print("$ " + shlex.join(cmd), flush=True)
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"{exp} {tag} seed {seed} failed (exit {proc.returncode})")
    with open(os.path.join(out, "results.json")) as f:
        result = json.load(f)
    run = result["runs"][0]
    print(
        f"  {run['label']}: train {run['train_time_s']:.2f} s (median "
        f"{1e3 * run['median_iter_s']:.1f} ms/iter), compile "
        f"{run['compile_time_s']:.1f} s, final loss {run['final_loss']:.4e}, "
        f"wall {time.perf_counter() - tic:.0f} s",
        flush=True,
    )
    return result


def _verdicts(rows: list[dict], sq: int) -> list[str]:
    out = []
    for rev in (r for r in rows if r["adjoint"] == "reversible"):
        ck = next(
            (
                r
                for r in rows
                if r["label"] == f"checkpoint({sq})"
                and r["base_solver"] == rev["base_solver"]
            ),
            None,
        )
        if ck is None:
            continue
        speedup = ck["median_iter_s"] / rev["median_iter_s"]
        mean_speedup = ck["time_per_iter_s"] / rev["time_per_iter_s"]
        cpu_speedup = ck["cpu_per_iter_s"] / rev["cpu_per_iter_s"]
        loss_rel = abs(rev["final_loss"] - ck["final_loss"]) / ck["final_loss"]
        ok_t, ok_l = speedup >= TARGET_SPEEDUP, loss_rel <= TARGET_LOSS_TOL
        out.append(
            f"- {rev['base_solver']}: target (reversible >= {TARGET_SPEEDUP}x faster "
            f"than checkpoint({sq}) = floor(sqrt(2N)), same final loss within "
            f"{TARGET_LOSS_TOL:.0%}): speedup **{speedup:.2f}x** (median time per "
            f"iteration; {mean_speedup:.2f}x by total training time, "
            f"{cpu_speedup:.2f}x by CPU time) -> {'met' if ok_t else '**NOT met**'}; "
            f"final-loss difference **{loss_rel:.2%}** -> "
            f"{'met' if ok_l else '**NOT met**'}."
        )
    return out or ["- Target not evaluated (no reversible / floor(sqrt(2N)) pair)."]


def _drift_lines(runs: list[dict]) -> list[str]:
    drifts = [
        (r["base_solver"], r["seed"], r.get("reconstruction_drift"))
        for r in runs
        if r["adjoint"] == "reversible"
    ]
    drifts = [d for d in drifts if d[2] is not None]
    if not drifts:
        return []
    worst = max(d[2] for d in drifts)
    return [
        f"- Reconstruction drift of the reversible backward pass (relative error of "
        f"the rebuilt y0, one gradient of each trained model): at most "
        f"{worst:.1e}."
    ]


CSV_KEYS = (
    "label",
    "adjoint",
    "checkpoints",
    "solver",
    "seed",
    "iters",
    "train_time_s",
    "time_per_iter_s",
    "median_iter_s",
    "cpu_per_iter_s",
    "compile_time_s",
    "warmup_call_s",
    "temp_bytes",
    "peak_rss_mb",
    "initial_loss",
    "final_loss",
    "min_loss",
    "mean_accepted_steps",
    "final_accepted_steps",
    "reconstruction_drift",
)

METHOD_NOTE = (
    "Training time excludes compilation (reported separately: `lower().compile()` "
    "of the jitted train step; one warm-up call is also excluded). Temp memory is "
    "`compiled.memory_analysis().temp_size_in_bytes` of the jitted train step; "
    "peak RSS is the whole process (each run is its own process). Final loss is "
    "the MSE of the trained model. Time ratios are per training iteration, "
    "relative to the reversible run with the same base solver. The machine was "
    "shared with other jobs, so besides the mean (total training time / "
    "iterations) the table gives the median wall-clock time of one iteration "
    "and the process CPU time per iteration, both less sensitive to other load; "
    "the target is judged on the median."
)


def _intro(exp: str, runs: list[dict], command: str) -> list[str]:
    """Title, iterations and command of the report."""
    iters = max(r["iters"] for r in runs)
    fewer = sorted({r["label"] for r in runs if r["iters"] < iters})
    seeds = sorted({r["seed"] for r in runs})
    return [
        f"# {TITLES.get(exp, exp)}: reversible vs recursive checkpointing",
        "",
        f"Reduced reproduction of McCallum & Foster (arXiv 2410.11648): **{iters} "
        f"training iterations** per run (published: 1,000-10,000), seeds {seeds}."
        + (
            f" To fit the time budget, {', '.join(fewer)} ran fewer iterations (see "
            f"the iters column): compare those by time per iteration, which is "
            f"constant for fixed steps."
            if fewer
            else ""
        ),
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
    ]


def _setup(first: dict, runs: list[dict], wall_s: float) -> list[str]:
    """Data, steps, model, solver, machine and date of the report."""
    n = first["num_steps"]
    machine = machine_info()
    steps_note = (
        f"adaptive steps (PID rtol=atol=1e-6); N = {n} is nominal (one step per data "
        f"interval), the accepted steps per solve are in the 'mean steps' column"
        if first["adaptive"]
        else f"N = {n} fixed steps"
    )
    return [
        f"- Data: {first['data_source']}",
        f"- Steps: {steps_note}; floor(sqrt(2N)) = {sqrt_checkpoints(n)} checkpoints.",
        "- Model: MLP vector field, one hidden layer of width 10, tanh; "
        "optax.adamw(1e-2, weight_decay=1e-5), full batch, MSE over the saved "
        "trajectory; float64.",
        f"- Solver: {runs[0]['solver']} for every adjoint (same discrete model) "
        f"unless marked [base solver].",
        f"- Machine: {machine['platform']}, {machine['cpu_count']} CPUs, backend "
        f"{machine['backend']} ({machine['device']}); python {machine['python']}, "
        f"jax {machine['jax']}, diffrax {machine['diffrax']}, equinox "
        f"{machine['equinox']}, revdiffrax {machine['revdiffrax']}.",
        f"- Date: {datetime.date.today().isoformat()}; wall time of this grid "
        f"{wall_s / 60:.1f} min.",
        "",
    ]


def _write_csv(path: str, runs: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(r)


def write_report(
    exp: str, results: list[dict], args: argparse.Namespace, command: str, wall_s: float
) -> str:
    """Write ``<results>/<exp>.md`` (with plots) and ``<exp>.csv``; returns the
    markdown path."""
    runs = [r for res in results for r in res["runs"]]
    rows = summarise(runs)
    first = results[0]
    sq = sqrt_checkpoints(first["num_steps"])
    os.makedirs(args.results, exist_ok=True)
    plots = make_plots(problem_from_result(first), runs, args.results, prefix=exp)
    lines = [
        *_intro(exp, runs, command),
        *_setup(first, runs, wall_s),
        METHOD_NOTE,
        "",
        table_markdown(rows),
        "",
        *_verdicts(rows, sq),
        *_drift_lines(runs),
        "",
        *[f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots],
        "",
    ]
    md = os.path.join(args.results, f"{exp}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    csv_path = os.path.join(args.results, f"{exp}.csv")
    _write_csv(csv_path, runs)
    print(
        f"\n## {exp}\n" + table_markdown(rows) + "\n" + "\n".join(_verdicts(rows, sq))
    )
    print(f"wrote {md}, {csv_path}, " + ", ".join(plots), flush=True)
    return md


def make_parser() -> argparse.ArgumentParser:
    """The flags of `python -m experiments.run_grid`."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.run_grid", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS
    )
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="training iterations per run (default: each experiment's)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--checkpoints",
        nargs="+",
        default=["2", "4", "8", "16", "sqrt"],
        help="checkpoint counts; 'sqrt' = floor(sqrt(2N))",
    )
    p.add_argument(
        "--reduced-iters",
        type=int,
        default=None,
        help="iterations for the --reduced-checkpoints runs (default: same "
        "as --iters); time per iteration stays comparable",
    )
    p.add_argument(
        "--reduced-checkpoints",
        type=int,
        nargs="+",
        default=[2],
        help="checkpoint counts that run --reduced-iters (default: 2)",
    )
    p.add_argument(
        "--extra-solvers",
        nargs="*",
        default=[],
        help="white dwarf only: also compare reversible vs "
        "checkpoint(floor(sqrt(2N))) with these base solvers "
        "(e.g. euler ralston rk4)",
    )
    p.add_argument("--extra-solver-iters", type=int, default=None)
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        choices=("direct", "backsolve"),
        help="extra adjoints to include (e.g. direct, for memory context)",
    )
    p.add_argument(
        "--base-solver-baseline",
        action="store_true",
        help="also run checkpoint(floor(sqrt(2N))) with the plain base "
        "solver (half the vector-field evaluations per step)",
    )
    p.add_argument(
        "--oscillator-data",
        default=None,
        help="real_double_linear_h_1.txt (default: simulated data)",
    )
    p.add_argument(
        "--pendulum-data",
        default=None,
        help="real_double_pend_h_1.txt (default: simulated data)",
    )
    p.add_argument("--out", default=os.path.join("out", "grid"), help="per-run outputs")
    p.add_argument("--results", default="results", help="where the reports go")
    p.add_argument("--quick", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    cli = list(argv) if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "-m", "experiments.run_grid", *cli])
    for exp in args.experiments:
        tic = time.perf_counter()
        results = [
            run_one(exp, tag, flags, iters, seed, args)
            for tag, flags, iters in _configs(exp, args)
            for seed in args.seeds
        ]
        write_report(exp, results, args, command, time.perf_counter() - tic)


if __name__ == "__main__":
    main()
