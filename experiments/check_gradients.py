"""Cross-check the gradients of every adjoint on the experiments' problems.

On the white dwarf problem (100 steps by default), for each save mode, prints the
relative error max|g - g_direct| / max|g_direct| of the loss gradient for
`ReversibleAdjoint` and `RecursiveCheckpointAdjoint` with several checkpoint counts,
against `DirectAdjoint` (plain backpropagation through the solver).

With diffrax 0.7.2 (jax 0.10.2, equinox 0.13.8) this shows that
`RecursiveCheckpointAdjoint` gives wrong gradients (relative errors 1e-3 to 1e-2)
with `SaveAt(ts=...)` for many checkpoint counts (here 14, 50 and the default with
100 steps; 2 and 8 happen to be exact), while with `SaveAt(steps=True)` every count
matches `DirectAdjoint` to rounding error. This is why the experiments save every
step.

    python -m experiments.check_gradients
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from . import white_dwarf
from .harness import tree_rel_error
from .model import VectorField
from .problem import Problem
from .solvers import make_adjoint, make_solver


def _grad(
    problem: Problem,
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    params: PyTree,
    static: PyTree,
    saveat: str,
) -> PyTree:
    """The gradient of the MSE loss, saving every step ("steps") or at the data
    times ("ts")."""

    def loss(params):
        model = eqx.combine(params, static)
        if saveat == "steps":
            pred, _ = problem.predict(model, solver, adjoint)
        else:
            ts = diffrax.SaveAt(ts=jnp.asarray(problem.ts))
            pred = problem.solve(model, solver, adjoint, ts).ys
        return jnp.mean((pred - jnp.asarray(problem.ys)) ** 2)

    return jax.jit(jax.grad(loss))(params)


def _adjoints(checkpoints: Sequence[int]) -> list[tuple[str, diffrax.AbstractAdjoint]]:
    adjoints = [("reversible", make_adjoint("reversible"))]
    adjoints += [
        (f"checkpoint({c})", diffrax.RecursiveCheckpointAdjoint(c)) for c in checkpoints
    ]
    adjoints.append(("checkpoint(default)", diffrax.RecursiveCheckpointAdjoint()))
    return adjoints


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m experiments.check_gradients",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--steps", type=int, default=100, help="white dwarf steps")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[2, 8, 14, 50])
    args = p.parse_args(argv)
    ts = np.linspace(0.0, white_dwarf.T1, args.steps + 1)
    problem = Problem(
        name="white_dwarf",
        title="White dwarf",
        ts=ts,
        ys=white_dwarf.white_dwarf_data(ts),
        time_dependent=True,
        solver="midpoint",
        num_steps=args.steps,
    )
    model = VectorField(2, 10, key=jr.PRNGKey(0), time_dependent=True)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    solver = make_solver("midpoint")
    out: dict = {}
    for saveat in ("ts", "steps"):
        ref = _grad(problem, solver, diffrax.DirectAdjoint(), params, static, saveat)
        for name, adjoint in _adjoints(args.checkpoints):
            g = _grad(problem, solver, adjoint, params, static, saveat)
            err = tree_rel_error(g, ref)
            out[(saveat, name)] = err
            mode = "ts=..." if saveat == "ts" else "steps=True"
            print(
                f"SaveAt({mode}) {name:>20}: relative gradient error vs "
                f"DirectAdjoint {err:.1e}",
                flush=True,
            )
    return out


if __name__ == "__main__":
    main()
