"""`Reversible(base, stage_pullback=...)` on the two-moons CNF: the time and compiled
temp memory of one gradient with the stage-at-a-time pullback (the default for this
model: one stage's residuals exceed 64 KiB) and with the whole unrolled step, next
to `RecursiveCheckpointAdjoint` with 8, floor(sqrt(2N)) and N checkpoints and the
two forward solves.

The stage-at-a-time pullback holds one stage's residuals instead of all of them, and
pays one more evaluation of every stage but the last on the backward pass. This
script measures that trade on the workload where it matters (`benchmarks/pareto.py`
times only the default).

Usage: `python -m benchmarks.stage_pullback [--base Midpoint] [--repeats 5]`.
"""

import argparse
import math

import diffrax
import jax
import revdiffrax
from benchmarks.workloads import cnf
from experiments.harness import compile_timed, interleaved_times


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", default="Midpoint", help="a diffrax solver class")
    parser.add_argument("--repeats", type=int, default=5)
    cli = parser.parse_args()
    base = getattr(diffrax, cli.base)()
    work = cnf(base, quick=False)
    n = work.num_steps
    rev_adjoint = revdiffrax.ReversibleAdjoint(drift_tol=None, parasitic_tol=None)
    candidates: dict[str, tuple[diffrax.AbstractSolver, diffrax.AbstractAdjoint]] = {
        "Reversible, stage_pullback=None (default: True here)": (
            revdiffrax.Reversible(base),
            rev_adjoint,
        ),
        "Reversible, stage_pullback=False": (
            revdiffrax.Reversible(base, stage_pullback=False),
            rev_adjoint,
        ),
    }
    for c in sorted({8, math.floor(math.sqrt(2 * n)), n}):
        candidates[f"RCA({c})"] = (base, diffrax.RecursiveCheckpointAdjoint(c))
    memory, fns = {}, {}
    for name, (solver, adjoint) in candidates.items():
        loss, params = work.loss(solver, adjoint)
        grad, _, memory[name] = compile_timed(jax.grad(loss), params, work.data)
        fns[name] = (lambda p, g=grad: g(p, work.data), params)
    for name, solver in (
        (f"forward, Reversible({cli.base})", revdiffrax.Reversible(base)),
        (f"forward, {cli.base}", base),
    ):
        loss, params = work.loss(solver, diffrax.RecursiveCheckpointAdjoint())
        fns[name] = (lambda p, f=jax.jit(loss): f(p, work.data), params)
    times = interleaved_times(fns, cli.repeats)
    print(f"{work.name} (N={n}), median of {cli.repeats} interleaved calls\n")
    print("| computation | temp memory | time (median) | min |")
    print("|---|---|---|---|")
    for name, (median, least) in times.items():
        mem = f"{memory[name] / 2**20:.1f} MiB" if memory.get(name) else ""
        print(f"| {name} | {mem} | {median:.2f} s | {least:.2f} s |")


if __name__ == "__main__":
    main()
