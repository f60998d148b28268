"""Which speed-up is which: `ReversibleAdjoint` against `RecursiveCheckpointAdjoint`
through `Reversible(base)` (the paper's comparison: the same discrete model) and
through the plain base solver at the same step size (what a diffrax user would
otherwise run, about half the cost per step), on the training steps of `cnf`,
`digits_odenet` and `uea_cde`.

Each training step is built by the experiment's own `setup` (`experiments.
training_loop`), compiled (compiled temp memory recorded), and the three steps are
timed round-robin from the same inputs (`harness.interleaved_times`), so that load
on a shared machine hits them alike; medians and minima are reported.

    python -m experiments.base_solver_speedups --out results
    python -m experiments.base_solver_speedups --quick --out /tmp/speedups
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import jax

from . import adjoint_table as at, cnf, digits_odenet, uea_cde
from .harness import compile_timed, interleaved_times
from .report import machine_info


# name -> (module, its flags: the committed results' sizes)
EXPERIMENTS = {
    "neural CDE, JapaneseVowels, Midpoint, N = 56, batch 64": (
        uea_cde,
        ["--batch", "64"],
    ),
    "CNF two moons, width 64, batch 128, Midpoint, N = 100": (
        cnf,
        ["--solvers", "midpoint"],
    ),
    "ODE-Net on digits, Midpoint, N = 20, batch 32": (digits_odenet, ["--batch", "32"]),
}
ADJOINTS = "reversible,checkpoint:sqrt,checkpoint:sqrt@base"


def measure(module, flags: Sequence[str], repeats: int, quick: bool) -> list[dict]:
    """Compile the training step of each adjoint of `ADJOINTS` and time them
    round-robin; one row per adjoint."""
    exp = module.EXPERIMENT
    args = exp.make_parser().parse_args([*flags, *(["--quick"] if quick else [])])
    at.fill_defaults(args, exp.quick, exp.full)
    setup = exp.setup(args)
    group = next(iter(setup.groups.values()))
    opt_state = setup.optim.init(setup.params)
    inputs = (setup.params, opt_state, jax.random.PRNGKey(1), setup.data)
    rows, fns = [], {}
    for spec in at.parse_adjoints(ADJOINTS, group.num_steps):
        compiled, compile_s, temp = compile_timed(
            group.make_step(spec, setup.optim), *inputs
        )
        fns[spec.label] = (lambda x, c=compiled: c(*x), inputs)
        rows.append(dict(label=spec.label, temp_bytes=temp, compile_s=compile_s))
    times = interleaved_times(fns, repeats)
    for row in rows:
        row["median_s"], row["min_s"] = times[row["label"]]
    return rows


def write_markdown(tables: dict[str, list[dict]], command: str, wall_s: float) -> str:
    m = machine_info()
    lines = [
        "# Reversible against checkpointing through `Reversible(base)` and through "
        "the plain base solver",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "- One training step (gradient and `optax.adamw` update) of each experiment, "
        "at the size of its committed results, compiled once per adjoint and timed "
        "round-robin from the same inputs (median and minimum of the repeats, after a "
        "warm-up call): so the ratios are side by side, whatever the load.",
        "- *through Reversible(base)*: `RecursiveCheckpointAdjoint(floor(sqrt(2N)))` "
        "on the same `Reversible(base, 0.999)` solve as `ReversibleAdjoint`: the "
        "paper's comparison and the experiments' headline speed-ups (the same "
        "discrete model, hence the same losses). *through the plain base solver*: "
        "the same adjoint on the base solver at the same step size, what a diffrax "
        "user would otherwise run; a `Reversible(base)` step costs about two base "
        "steps.",
        f"- Machine: {m['platform']}, {m['cpu_count']} CPUs, shared with other jobs, "
        f"backend {m['backend']}; python {m['python']}, jax {m['jax']}, diffrax "
        f"{m['diffrax']}, equinox {m['equinox']}. Wall time {wall_s / 60:.1f} min.",
        "",
    ]
    header = [
        "adjoint",
        "s / step (median)",
        "s / step (min)",
        "reversible speed-up (median)",
        "reversible speed-up (min)",
        "compiled temp memory",
    ]
    for name, rows in tables.items():
        ref = rows[0]
        body = [
            [
                r["label"],
                f"{r['median_s']:.4f}",
                f"{r['min_s']:.4f}",
                f"{r['median_s'] / ref['median_s']:.2f}x",
                f"{r['min_s'] / ref['min_s']:.2f}x",
                at.fmt_bytes(r["temp_bytes"]),
            ]
            for r in rows
        ]
        lines += [f"## {name}", "", at.markdown_table(header, body), ""]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m experiments.base_solver_speedups",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--only", default=None, help="experiments whose name has this")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--out", default=os.path.join("out", "base_solver_speedups"))
    args = p.parse_args(argv)
    tic = time.perf_counter()
    tables = {}
    cli = list(argv) if argv is not None else []
    command = " ".join(["python -m experiments.base_solver_speedups", *cli])
    path = os.path.join(args.out, "base_solver_speedups.md")
    md = ""
    for name, (module, flags) in EXPERIMENTS.items():
        if args.only is None or args.only in name:
            tables[name] = measure(module, flags, args.repeats, args.quick)
            # Written after each experiment, so that a long run leaves its tables.
            md = write_markdown(tables, command, time.perf_counter() - tic)
            at.write_text(path, md)
            print(f"\n{name}", tables[name], flush=True)
    print(md + f"\nwrote {path}")
    return dict(tables=tables, files=[path])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
