"""The training, timing and reporting loop shared by the experiments where memory
binds (`cnf`, `digits_odenet`, `uea_cde`), as `benchmarks/` shares
`experiments.harness`.

An experiment describes itself once, as an `AdjointExperiment`: its flags, its
quick and full defaults, and a `setup(args)` that builds the data, the model and one
`Group` per table (a loss built from a solver and an adjoint, and optionally an
evaluation of the trained parameters). `run(argv, experiment)` then does the rest,
identically for the three:

1. every adjoint of `--adjoints` (`adjoint_table.parse_adjoints`) gets the same
   training step (`adjoint_table.optax_step`), compiled with its compile time and
   compiled temp memory recorded (`harness.compile_timed`), and is run from the same
   initialisation and minibatch keys by `harness.timed_training` (the one training
   loop of the experiments): the adjoints of `--train` for `--iters` iterations,
   the others for `--time-iters` (their losses are compared with the reversible
   run's: exact gradients give the same training trajectory). A step whose temp
   memory exceeds `--max-run-mib`, or that is listed in `--compile-only`, is
   compiled but not run. The peak RSS is measured per adjoint, in one process, by
   resetting the kernel's high-water mark (`/proc/self/clear_refs`) before each
   compilation. Adjoints written `<adjoint>@base` (e.g. `checkpoint:sqrt@base`)
   run through the plain base solver instead of `Reversible(base)`, at the same
   step size: what a diffrax user without revdiffrax would run;
2. the command, configuration and machine, one table per group, the CSV, the JSON
   and the cost and loss plots are written by `adjoint_table`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import jax
import numpy as np
from jaxtyping import PyTree

from . import adjoint_table as at
from .harness import compile_timed, timed_training


# loss(params, key, data) -> (loss, metric)
Loss = Callable[[PyTree, jax.Array, PyTree], tuple[Any, Any]]


@dataclasses.dataclass
class Group:
    """One table of the report: one model and loss, every adjoint.

    `loss(solver, adjoint)` returns the minibatch loss `loss(params, key, data) ->
    (loss, metric)`; `solver` is the `Reversible(base)` solver every adjoint uses
    and `base_solver` the plain base solver of the adjoints marked `@base`.
    `evaluate(params, solver)` (held-out accuracy, NLL, ...) is recorded for the
    trained runs."""

    loss: Callable[[diffrax.AbstractSolver, diffrax.AbstractAdjoint], Loss]
    solver: diffrax.AbstractSolver
    base_solver: diffrax.AbstractSolver
    num_steps: int
    evaluate: Callable[[PyTree, diffrax.AbstractSolver], dict] | None = None

    def solver_for(self, spec: at.AdjointSpec) -> diffrax.AbstractSolver:
        return self.base_solver if spec.base else self.solver

    def make_step(self, spec: at.AdjointSpec, optim) -> at.Step:
        """The training step of `spec`: one optax update through its solver."""
        return at.optax_step(self.loss(self.solver_for(spec), spec.make()), optim)


@dataclasses.dataclass
class Setup:
    """What an experiment's `setup(args)` builds: the initial parameters and
    optimiser, the training data (passed whole to every step), the tables, the
    plot title, configuration entries known only after loading the data (written
    to the report) and anything else the experiment's `extras` needs (not
    written)."""

    params: PyTree
    optim: Any  # an optax.GradientTransformation
    data: PyTree
    groups: dict[str, Group]
    title: str
    config: dict = dataclasses.field(default_factory=dict)
    private: dict = dataclasses.field(default_factory=dict)

    @property
    def opt_state(self) -> PyTree:
        return self.optim.init(self.params)


@dataclasses.dataclass(frozen=True)
class AdjointExperiment:
    """An experiment of the shared loop.

    `metric` names the evaluation reported per trained run ("NLL", "test
    accuracy"), `loss_name` the training loss ("NLL", "loss") and `loss_ylabel`
    its axis label. `extras(args, setup, result, trained)`, called after training
    with the trained parameters by label, may add measurements to `result` and
    plots to `result["plots"]` (respecting `args.no_plots`)."""

    name: str
    make_parser: Callable[[], argparse.ArgumentParser]
    quick: dict
    full: dict
    config_keys: tuple[str, ...]
    setup: Callable[[argparse.Namespace], Setup]
    write_markdown: Callable[[dict], str]
    metric: str
    loss_name: str
    loss_ylabel: str
    extras: Callable[[argparse.Namespace, Setup, dict, dict], None] | None = None


# ---------------------------------------------------------------------------
# Measuring one adjoint, and every adjoint of a group
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """How long each adjoint runs."""

    iters: int  # iterations of the adjoints in `train`
    time_iters: int  # iterations of the others (timing and loss agreement)
    train: Sequence[str]  # labels of the adjoints trained for `iters`
    max_run_bytes: float  # compiled temp memory above which a step is not run
    progress: bool = True
    compile_only: Sequence[str] = ()  # labels of adjoints compiled but not run


def settings_from_args(args: argparse.Namespace, num_steps: int) -> Settings:
    """The `Settings` of `adjoint_table.add_common_flags`' flags for a solve of
    `num_steps`."""
    return Settings(
        iters=args.iters,
        time_iters=args.time_iters,
        train=[s.label for s in at.parse_adjoints(args.train, num_steps)],
        max_run_bytes=args.max_run_mib * 2**20,
        progress=not args.no_progress,
        compile_only=[s.label for s in at.parse_adjoints(args.compile_only, num_steps)],
    )


def measure_adjoint(
    step: at.Step,
    spec: at.AdjointSpec,
    params: PyTree,
    opt_state: PyTree,
    keys: jax.Array,
    data: PyTree,
    s: Settings,
    desc: str,
) -> tuple[dict, PyTree | None]:
    """Compile and run one adjoint's training step; returns the record and the
    trained params (None when the step was not run).

    The first call is timed separately (it includes the one-off work of the first
    execution); the time per iteration is the median over the others."""
    at.reset_peak_rss()
    compiled, compile_s, temp = compile_timed(step, params, opt_state, keys[0], data)
    iters = s.iters if spec.label in s.train else s.time_iters
    run = spec.label not in s.compile_only and (temp is None or temp <= s.max_run_bytes)
    record: dict[str, Any] = dict(
        label=spec.label,
        kind=spec.kind,
        checkpoints=spec.checkpoints,
        base_solver=spec.base,
        compile_s=compile_s,
        temp_bytes=temp,
        ran=run,
        iters=iters if run else 0,
        trained=run and spec.label in s.train,
    )
    if not run:
        record["peak_rss_mb"] = at.current_peak_rss_mb()
        return record, None
    params, _, log = timed_training(
        compiled,
        params,
        opt_state,
        iters,
        desc=desc,
        step_args=lambda i: (keys[i], data),
        progress=s.progress,
        loss_format=".4f",
    )
    times = log.iter_times
    steady = times[1:] or times
    record.update(
        first_call_s=times[0] if times else None,
        median_iter_s=statistics.median(steady) if steady else None,
        mean_iter_s=float(np.mean(steady)) if steady else None,
        losses=log.losses,
        metrics=log.aux,
        iter_times=times,
        final_loss=log.losses[-1] if log.losses else None,
        peak_rss_mb=at.current_peak_rss_mb(),
    )
    return record, params


def compare_adjoints(
    group: Group,
    specs: Sequence[at.AdjointSpec],
    params: PyTree,
    optim,
    key: jax.Array,
    data: PyTree,
    s: Settings,
    *,
    desc: str,
) -> tuple[list[dict], dict[str, PyTree]]:
    """`measure_adjoint` for every spec from the same `params` and minibatch keys;
    returns the records and the trained params by label. `group.evaluate` is added
    to the records of the trained runs. Each record also gets `loss_rel_diff`, the
    largest relative difference between its losses and the reversible run's over
    their common iterations."""
    keys = jax.random.split(key, max(s.iters, s.time_iters, 1))
    opt_state = optim.init(params)
    records, trained_params = [], {}
    for spec in specs:
        rec, trained = measure_adjoint(
            group.make_step(spec, optim),
            spec,
            params,
            opt_state,
            keys,
            data,
            s,
            f"{desc} {spec.label}",
        )
        if trained is not None and rec["trained"]:
            if group.evaluate is not None:
                rec["eval"] = group.evaluate(trained, group.solver_for(spec))
            trained_params[spec.label] = trained
        records.append(rec)
    _add_loss_agreement(records)
    return records, trained_params


def _add_loss_agreement(records: list[dict]) -> None:
    ref = next((r for r in records if r["kind"] == "reversible"), None)
    for r in records:
        r["loss_rel_diff"] = None
        if ref is None or r is ref or not r.get("losses") or not ref.get("losses"):
            continue
        n = min(len(r["losses"]), len(ref["losses"]))
        a, b = np.asarray(r["losses"][:n]), np.asarray(ref["losses"][:n])
        r["loss_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(b)))


# ---------------------------------------------------------------------------
# The whole experiment
# ---------------------------------------------------------------------------


def run(argv: Sequence[str] | None, exp: AdjointExperiment) -> dict:
    """Parse `argv`, train and measure every adjoint of every group, write
    `<name>.json`, `.csv`, `.md` and the plots to `--out` and print the tables;
    returns the result (with the written files under "files")."""
    args = exp.make_parser().parse_args(argv)
    at.fill_defaults(args, exp.quick, exp.full)
    os.makedirs(args.out, exist_ok=True)
    tic = time.perf_counter()
    setup = exp.setup(args)
    tables, trained, settings = {}, {}, []
    for name, group in setup.groups.items():
        settings.append(settings_from_args(args, group.num_steps))
        tables[name], trained[name] = compare_adjoints(
            group,
            at.parse_adjoints(args.adjoints, group.num_steps),
            setup.params,
            setup.optim,
            jax.random.PRNGKey(args.seed + 1),
            setup.data,
            settings[-1],
            desc=f"{exp.name} {name}",
        )
    result = at.base_result(exp.name, argv, args, exp.config_keys)
    result["config"].update(setup.config)
    # (the groups share N in every experiment, hence the labels of --train)
    result.update(tables=tables, settings=dataclasses.asdict(settings[0]))
    if not args.no_plots:
        result["plots"] = [
            at.plot_cost(
                tables,
                f"{setup.title}: cost per adjoint",
                os.path.join(args.out, f"{exp.name}_cost.png"),
            ),
            at.plot_losses(
                tables,
                f"{setup.title}: training {exp.loss_name}",
                exp.loss_ylabel,
                os.path.join(args.out, f"{exp.name}_loss.png"),
            ),
        ]
    if exp.extras is not None:
        exp.extras(args, setup, result, trained)
    result["wall_s"] = time.perf_counter() - tic
    return at.finish(
        result, args.out, exp.metric, exp.loss_name, exp.write_markdown(result)
    )
