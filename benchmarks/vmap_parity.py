"""Per-sample solves under `jax.vmap` (issue 22): `ReversibleAdjoint()` against
diffrax's default adjoint, both with their defaults, on the three workloads of
`benchmarks/workloads.py` written in diffrax's example style (`CNF vmap Tsit5`,
`CDE vmap Tsit5 PID`, `SDE GAN vmap ReversibleHeun`).

For each workload: the compiled temp memory of one training-step gradient
(`jax.jit(jax.grad(loss))`, deterministic) of

- `RCA()`: `diffrax.RecursiveCheckpointAdjoint()` through the base solver,
- `RCA(2)`, `RCA(8)`: `RecursiveCheckpointAdjoint(checkpoints=2 / 8)` through it,
- `Reversible()`: `revdiffrax.ReversibleAdjoint()` through `Reversible(base)`,
- `Reversible(sp=False)`: the same with `Reversible(base, stage_pullback=False)`
  (the whole-step pullback, which the default chose under `vmap` before issue 22);
- for an adaptive controller, `Reversible(record)`: `ReversibleAdjoint(
  step_times="record")`, which records the accepted step times (`max_steps` slots
  per sample) where the default recomputes them on the backward pass;
- for the SDE GAN, whose base `diffrax.ReversibleHeun` is reversible itself:
  `Reversible()` is `ReversibleAdjoint()` through `revdiffrax.ReversibleHeun()`,
  and `Reversible(Heun())` (through `revdiffrax.Reversible(diffrax.Heun())`) is
  compared with `RCA() through Heun()`;

then the median time of `RCA()`, `Reversible()` (and `Reversible(record)`),
interleaved (A, B, A, B, ...) after a warm-up, their ratio, and for adaptive
workloads the mean number of steps per sample (`sol.stats["num_steps"]`) of the
base solver and of `Reversible(base)`.

    python -m benchmarks.vmap_parity --repeats 7
    python -m benchmarks.vmap_parity --only sde --repeats 5
    python -m benchmarks.vmap_parity --quick          # smoke test
"""

from __future__ import annotations

import argparse
import shlex
import sys

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import revdiffrax
from benchmarks.workloads import (
    cde_vmap,
    cde_vmap_solve,
    cnf_vmap,
    sde_gan_vmap,
    Workload,
)

# Importing `experiments` switches on float64 (the workloads are float32 throughout).
from experiments.harness import compile_timed, interleaved_times
from experiments.report import fmt_bytes, machine_info, markdown_table


def variants(work: Workload) -> dict:
    """Label -> (solver, adjoint)."""
    rca = diffrax.RecursiveCheckpointAdjoint
    base = work.base
    out = {
        "RCA()": (base, rca()),
        "RCA(2)": (base, rca(checkpoints=2)),
        "RCA(8)": (base, rca(checkpoints=8)),
    }
    if work.reversible is not None:
        # A base that is reversible itself (diffrax.ReversibleHeun): its revdiffrax
        # counterpart, and `Reversible(Heun())` against `RCA()` through `Heun()`.
        out["Reversible()"] = (work.reversible, revdiffrax.ReversibleAdjoint())
        out["RCA() through Heun()"] = (diffrax.Heun(), rca())
        out["Reversible(Heun())"] = (
            revdiffrax.Reversible(diffrax.Heun()),
            revdiffrax.ReversibleAdjoint(),
        )
        return out
    out["Reversible()"] = (revdiffrax.Reversible(base), revdiffrax.ReversibleAdjoint())
    out["Reversible(sp=False)"] = (
        revdiffrax.Reversible(base, stage_pullback=False),
        revdiffrax.ReversibleAdjoint(),
    )
    if "PID" in work.name:
        # An adaptive controller: the default recomputes the step times on the
        # backward pass; this row records them (the default before).
        out["Reversible(record)"] = (
            revdiffrax.Reversible(base),
            revdiffrax.ReversibleAdjoint(step_times="record"),
        )
    return out


TIMED = ("RCA()", "Reversible()", "Reversible(record)")
# The memory reference of a row where it is not `RCA()` through the base.
REFERENCE = {"Reversible(Heun())": "RCA() through Heun()"}


def mean_steps(work: Workload, solver: diffrax.AbstractSolver) -> float | None:
    """Mean accepted-plus-rejected steps per sample of the CDE's forward solves."""
    if work.name != "CDE vmap Tsit5 PID":
        return None
    ts, coeffs, _ = work.data

    @eqx.filter_jit
    def steps(model):
        def one(t, c):
            adjoint = diffrax.RecursiveCheckpointAdjoint()
            sol = cde_vmap_solve(model, t, c, solver, adjoint, work.num_steps)
            return sol.stats["num_steps"]

        return jax.vmap(one)(ts, coeffs)

    return float(jnp.mean(steps(work.model)))


def measure(work: Workload, repeats: int, labels: list[str] | None) -> list[list]:
    rows, fns = [], {}
    for label, (solver, adjoint) in variants(work).items():
        if labels is not None and label not in labels and label not in TIMED:
            continue
        loss, params = work.loss(solver, adjoint)
        fn, compile_s, temp = compile_timed(jax.grad(loss), params, work.data)
        print(f"  {label}: temp {fmt_bytes(temp)}, compiled in {compile_s:.0f} s")
        rows.append([label, temp])
        if label in TIMED:
            fns[label] = (lambda a, f=fn: f(*a), (params, work.data))
    times = interleaved_times(fns, repeats)
    mems = dict(rows)
    ref_t = times["RCA()"][0]
    out = []
    for label, temp in rows:
        t = times.get(label, (None,))[0]
        ref = mems[REFERENCE.get(label, "RCA()")]
        out.append(
            [
                label,
                fmt_bytes(temp),
                f"{temp / ref:.2f}x",
                "" if t is None else f"{t * 1e3:.1f} ms",
                "" if t is None else f"{t / ref_t:.2f}x",
            ]
        )
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--labels",
        help="comma-separated variants to compile besides the timed RCA() and "
        "Reversible() (default: all)",
    )
    parser.add_argument(
        "--only",
        default="cnf,cde,sde",
        help="comma-separated workloads among cnf, cde, sde (default: all)",
    )
    args = parser.parse_args(argv)
    info = machine_info()
    command = "python -m benchmarks.vmap_parity " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    parts = [
        f"Command: `{command}`; {info['processor']}, {info['cpu_count']} CPUs, "
        f"jax {info['jax']}, {jax.default_backend()}.\n"
    ]
    makers = {"cnf": cnf_vmap, "cde": cde_vmap, "sde": sde_gan_vmap}
    for name in args.only.split(","):
        make = makers[name.strip()]
        work = make(args.quick)
        print(f"{work.name}: {work.description}", flush=True)
        labels = None if args.labels is None else args.labels.split(",")
        table = measure(work, args.repeats, labels)
        header = ["adjoint", "temp memory", "/ RCA()*", "time (median)", "/ RCA()"]
        parts.append(f"### {work.name}\n\n{work.description}.\n")
        parts.append(markdown_table(header, table) + "\n")
        parts.append(
            "*: `Reversible(Heun())` against `RCA() through Heun()`, every other "
            "row against `RCA()` through the base.\n"
            if work.reversible is not None
            else ""
        )
        print(parts[-1], flush=True)
        base_steps = mean_steps(work, work.base)
        if base_steps is not None:
            rev_steps = mean_steps(work, revdiffrax.Reversible(work.base))
            parts.append(
                f"Mean steps per sample: {work.base.__class__.__name__} "
                f"{base_steps:.1f}, Reversible({work.base.__class__.__name__}) "
                f"{rev_steps:.1f}.\n"
            )
    report = "\n".join(parts)
    print(report)
    return report


if __name__ == "__main__":
    main()
