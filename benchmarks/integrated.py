"""Integrated state components on the two-moons CNF: `Reversible(base)` against
`Reversible(base, integrated=(False, True))` (the log-density declared integrated).

For each base (Midpoint, RK4, Dopri5) prints a markdown table of: the trace
evaluations per step that run, in the forward solve and in the gradient (values and
vector-Jacobian products, counted on the host by `jax.pure_callback`s on the trace's
value and cotangent, which XLA removes with the trace's computation where it is
unused: `jax.grad` needs no trace values, only their VJPs); the compiled temp
memory and the median time of one gradient (interleaved); and the loss.

Run: `python -m benchmarks.integrated [--quick] [--repeats R]`.
"""

import argparse
import dataclasses
import statistics
import time

import diffrax
import equinox as eqx
import jax
import revdiffrax
from benchmarks import workloads
from experiments.report import fmt_bytes, machine_info, markdown_table
from experiments.solvers import RK4


_CALLS = {"value": 0, "vjp": 0}


def _counter(kind: str):
    def count(x):
        _CALLS[kind] += 1
        return x

    return count


def _tick(kind: str, x: jax.Array) -> jax.Array:
    """The identity, counting its executions on the host. A `pure_callback`, so XLA
    removes it with the computation of `x` when `x` is not used."""
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.pure_callback(_counter(kind), shape, x, vmap_method="expand_dims")


@jax.custom_vjp
def _mark(x: jax.Array) -> jax.Array:
    """The identity on the trace's value, counting the evaluations of the value and
    of its vector-Jacobian product that run."""
    return _tick("value", x)


def _mark_fwd(x):
    return _tick("value", x), None


def _mark_bwd(_, cotangent):
    return (_tick("vjp", cotangent),)


_mark.defvjp(_mark_fwd, _mark_bwd)


class _Counted(eqx.Module):
    """The CNF, counting the evaluations of its trace."""

    cnf: workloads.CNF

    def __call__(self, t, y):
        dx, dlogp = self.cnf(t, y)
        return dx, _mark(dlogp)


def _evaluations_per_step(fn, args, num_steps: int) -> tuple[float, float]:
    """(values, VJPs) of the trace per step, in one call of `fn`."""
    _CALLS.update(value=0, vjp=0)
    jax.block_until_ready(fn(*args))
    jax.effects_barrier()
    return _CALLS["value"] / num_steps, _CALLS["vjp"] / num_steps


def measure(work, repeats: int) -> list[list[str]]:
    base = work.base
    solvers = {
        "coupled (default)": revdiffrax.Reversible(base),
        "integrated": revdiffrax.Reversible(base, integrated=(False, True)),
    }
    counted = dataclasses.replace(work, model=_Counted(work.model))
    adjoint = revdiffrax.ReversibleAdjoint(drift_tol=None)
    rows, grads = [], {}
    for label, solver in solvers.items():
        loss, params = counted.loss(solver, adjoint)
        fwd = jax.jit(loss)
        evals = [
            _evaluations_per_step(f, (params, work.data), work.num_steps)
            for f in (fwd, jax.jit(jax.grad(loss)))
        ]
        loss, params = work.loss(solver, adjoint)
        grad = jax.jit(jax.grad(loss)).lower(params, work.data).compile()
        grads[label] = (grad, params)
        temp = grad.memory_analysis().temp_size_in_bytes  # pyright: ignore
        value = float(jax.jit(loss)(params, work.data))
        (fwd_values, _), (grad_values, grad_vjps) = evals
        counts = [f"{fwd_values:g}", f"{grad_values:g} + {grad_vjps:g}"]
        rows.append([label, *counts, fmt_bytes(temp)])
        rows[-1].append(f"{value:.6f}")
    times = _interleaved(grads, work.data, repeats)
    for row in rows:
        row.insert(4, f"{times[row[0]]:.3g} s")
    return rows


def _interleaved(grads: dict, data, repeats: int) -> dict[str, float]:
    for fn, params in grads.values():
        jax.block_until_ready(fn(params, data))
    samples: dict[str, list[float]] = {k: [] for k in grads}
    for _ in range(repeats):
        for k, (fn, params) in grads.items():
            tic = time.perf_counter()
            jax.block_until_ready(fn(params, data))
            samples[k].append(time.perf_counter() - tic)
    return {k: statistics.median(v) for k, v in samples.items()}


HEADER = [
    "log-density",
    "trace evaluations / step: forward",
    "gradient: values + VJPs",
    "grad temp memory",
    "grad time (median)",
    "loss",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="bases whose name has this")
    args = parser.parse_args(argv)
    print(f"Machine: {machine_info()}\n")
    for base in (diffrax.Midpoint(), RK4(), diffrax.Dopri5()):
        if (
            args.only is not None
            and args.only.lower() not in type(base).__name__.lower()
        ):
            continue
        work = workloads.cnf(base, args.quick)
        print(f"## {work.name}, N={work.num_steps}\n\n{work.description}\n")
        print(markdown_table(HEADER, measure(work, args.repeats)), flush=True)
        print()


if __name__ == "__main__":
    main()
