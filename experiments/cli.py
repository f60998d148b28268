"""The command line shared by the paper experiments (white dwarf, coupled
oscillators, double pendulum): parse the flags, build the `Problem`, train it with
every requested adjoint and seed, and write ``results.json``, plots and a table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from .problem import Problem
from .report import machine_info, make_plots, summarise, table_markdown
from .solvers import ADJOINTS, SOLVERS, sqrt_checkpoints
from .train import RunConfig, train


def make_parser(
    name: str, description: str, *, solver: str, iters: int
) -> argparse.ArgumentParser:
    """The flags of `python -m experiments.<name>`."""
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}", description=description
    )
    p.add_argument(
        "--adjoint",
        default=None,
        help="comma-separated list of reversible|checkpoint|direct|backsolve "
        "(default: reversible,checkpoint)",
    )
    p.add_argument(
        "--checkpoints",
        type=int,
        default=None,
        help="checkpoints for RecursiveCheckpointAdjoint "
        "(default floor(sqrt(2N)), N = number of steps)",
    )
    p.add_argument(
        "--solver",
        default=solver,
        help=f"base solver, one of {sorted(SOLVERS)} (default {solver})",
    )
    p.add_argument(
        "--baseline-solver",
        choices=("reversible", "base"),
        default="reversible",
        help="solver for the non-reversible adjoints: the same "
        "Reversible(base) solver (default: identical discrete model) "
        "or the plain base solver",
    )
    p.add_argument("--coupling", type=float, default=0.999)
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help=f"training iterations (default {iters}; quick: 5)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="model initialisation seeds (default: 0)",
    )
    p.add_argument(
        "--data", default=None, help="path to the data file (default: simulated data)"
    )
    p.add_argument("--out", default=None, help=f"output directory (default out/{name})")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run for smoke tests (few iterations, fewer steps)",
    )
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true")
    return p


def parse_adjoints(spec: str | None) -> list[str]:
    """The adjoints of `--adjoint` (default: reversible and checkpoint)."""
    if spec is None:
        return ["reversible", "checkpoint"]
    adjoints = [a.strip() for a in spec.split(",") if a.strip()]
    for a in adjoints:
        if a not in ADJOINTS:
            raise SystemExit(f"error: unknown adjoint {a!r}; choose from {ADJOINTS}")
    return adjoints


def _train_all(problem: Problem, args: argparse.Namespace) -> list[dict]:
    """One run per (adjoint, seed)."""
    checkpoints = args.checkpoints or sqrt_checkpoints(problem.num_steps)
    runs = []
    for adjoint in parse_adjoints(args.adjoint):
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
            runs.append(
                train(
                    problem,
                    cfg,
                    progress=not args.no_progress,
                    measure_drift=not args.quick,
                )
            )
    return runs


def _results(
    problem: Problem, args: argparse.Namespace, command: str, runs: list[dict]
) -> dict:
    return dict(
        experiment=problem.name,
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
        summary=summarise(runs),
        runs=runs,
    )


def run_experiment(
    argv: Sequence[str] | None,
    *,
    name: str,
    description: str,
    solver: str,
    iters: int,
    build_problem: Callable[[argparse.Namespace], Problem],
) -> dict:
    """Parse `argv`, train, write ``results.json`` and plots to ``--out``, print the
    table; returns the results (with the written files under "files")."""
    args = make_parser(name, description, solver=solver, iters=iters).parse_args(argv)
    args.out = args.out or os.path.join("out", name)
    os.makedirs(args.out, exist_ok=True)
    problem = build_problem(args)
    if args.iters is None:
        args.iters = 5 if args.quick else problem.iters
    runs = _train_all(problem, args)

    cli = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join([f"python -m experiments.{name}", *cli])
    result = _results(problem, args, command, runs)
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plots = [] if args.no_plots else make_plots(problem, runs, args.out)
    result["files"] = [json_path, *plots]

    print(
        f"\n{problem.title} ({problem.data_source}; N = {problem.num_steps} "
        f"{'nominal ' if problem.adaptive else ''}steps, {args.iters} iterations)"
    )
    print(table_markdown(result["summary"]))
    print(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in plots))
    return result
