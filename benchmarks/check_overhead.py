"""What the default checks of `ReversibleAdjoint` cost (issue 22): the gradient with
`ReversibleAdjoint()` (drift check and parasitic-mode check on, the defaults)
against `ReversibleAdjoint(drift_tol=None, parasitic_tol=None)`, through
`Reversible(base)`, on every workload of `benchmarks/workloads.py` (the Pareto
workloads).

Per workload: the median time of one jitted gradient for both, interleaved
round-robin (`experiments.harness.interleaved_times`, calls shorter than 0.2 s
repeated back to back within a sample), their ratio, and the difference of the
compiled gradients' flop counts (`cost_analysis()["flops"]`) and temp memory, which
do not depend on the load of the machine. Target: at most 5% (ratio <= 1.05).

Run (from the repository root):

    python -m benchmarks.check_overhead [--only 'white,SaveAt'] [--repeats 21]
    python -m benchmarks.check_overhead --quick      # the workloads' small sizes
    python -m benchmarks.check_overhead --clock cpu  # CPU time (a loaded machine)

(This replaces `benchmarks/drift_overhead.py`, which timed the drift check alone on
a `SaveAt(t1=True)` solve.)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import revdiffrax
from benchmarks.workloads import workloads

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.harness import interleaved_times
from experiments.report import fmt_bytes, machine_info, markdown_table


SETTINGS = {
    "defaults": revdiffrax.ReversibleAdjoint(),
    "no checks": revdiffrax.ReversibleAdjoint(drift_tol=None, parasitic_tol=None),
}


# `cpu`: this process's CPU time, XLA's worker threads included; unlike wall-clock
# time it does not count the time slices other processes take on a loaded machine.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _flops(compiled: Any) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return None if not cost else cost.get("flops")


def measure(work, repeats: int, clock: str = "wall") -> dict[str, Any]:
    """Compile both gradients of `work`, read their cost and time them."""
    solver = revdiffrax.Reversible(work.base, integrated=work.integrated)
    fns, flops, temps = {}, {}, {}
    for name, adjoint in SETTINGS.items():
        loss, params = work.loss(solver, adjoint)
        compiled = jax.jit(jax.grad(loss)).lower(params, work.data).compile()
        flops[name] = _flops(compiled)
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        fns[name] = (lambda x, f=compiled: f(*x), (params, work.data))
    times = interleaved_times(fns, repeats, min_sample_s=0.2, clock=CLOCKS[clock])
    on, off = times["defaults"][0], times["no checks"][0]
    extra = None
    if flops["defaults"] is not None and flops["no checks"] is not None:
        extra = flops["defaults"] - flops["no checks"]
    return dict(
        name=work.name,
        num_steps=work.num_steps,
        defaults_s=on,
        unchecked_s=off,
        ratio=on / off,
        extra_flops=extra,
        flops=flops["no checks"],
        extra_temp=temps["defaults"] - temps["no checks"],
    )


def table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "workload",
        "N",
        "defaults",
        "drift_tol=None, parasitic_tol=None",
        "ratio",
        "extra flops (of total)",
        "extra temp memory",
    )
    cells = []
    for r in rows:
        flops = "-"
        if r["extra_flops"] is not None:
            flops = f"{r['extra_flops']:+.0f} (of {r['flops']:.3g})"
        cells.append(
            (
                r["name"],
                r["num_steps"],
                f"{r['defaults_s'] * 1e3:.2f} ms",
                f"{r['unchecked_s'] * 1e3:.2f} ms",
                f"{r['ratio']:.3f}",
                flops,
                ("+" if r["extra_temp"] >= 0 else "-")
                + fmt_bytes(abs(r["extra_temp"])),
            )
        )
    return markdown_table(header, cells)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small sizes")
    parser.add_argument("--only", default=None, help="comma-separated name parts")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default="wall", help="what is timed"
    )
    options = parser.parse_args(list(argv) if argv is not None else None)
    makers = workloads(options.quick)
    if options.only:
        wanted = [w.strip().lower() for w in options.only.split(",") if w.strip()]
        makers = {
            k: v for k, v in makers.items() if any(w in k.lower() for w in wanted)
        }
    command = "python -m benchmarks.check_overhead " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(f"Command: `{command}`; machine: {machine_info()}\n", flush=True)
    rows = []
    for name, make in makers.items():
        tic = time.perf_counter()
        rows.append(measure(make(), options.repeats, options.clock))
        print(f"  {name}: {time.perf_counter() - tic:.0f} s", file=sys.stderr)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
