"""Cross-check the gradients of every adjoint on the experiments' problems.

On the white dwarf problem (100 steps by default), for each save mode, prints the relative error
max|g - g_direct| / max|g_direct| of the loss gradient for `ReversibleAdjoint` and
`RecursiveCheckpointAdjoint` with several checkpoint counts, against
`DirectAdjoint` (plain backpropagation through the solver).

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

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

from . import common, white_dwarf  # noqa: E402


def _grad(problem, solver, adjoint, params, static, saveat):
    def loss(params):
        model = eqx.combine(params, static)
        if saveat == "steps":
            pred, _ = problem.predict(model, solver, adjoint)
        else:
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(common._vector_field), solver, float(problem.ts[0]),
                float(problem.ts[-1]),
                float(problem.ts[-1] - problem.ts[0]) / problem.num_steps,
                jnp.asarray(problem.ys[0]), args=model,
                saveat=diffrax.SaveAt(ts=jnp.asarray(problem.ts)), adjoint=adjoint,
                max_steps=problem.num_steps,
            )
            pred = sol.ys
        return jnp.mean((pred - jnp.asarray(problem.ys)) ** 2)

    g = jax.jit(jax.grad(loss))(params)
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g)])


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.check_gradients",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100, help="white dwarf steps")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[2, 8, 14, 50])
    args = p.parse_args(argv)
    ts = np.linspace(0.0, white_dwarf.T1, args.steps + 1)
    problem = common.Problem(
        name="white_dwarf", title="White dwarf", ts=ts,
        ys=white_dwarf.white_dwarf_data(ts), time_dependent=True, solver="midpoint",
        num_steps=args.steps,
    )
    model = common.VectorField(2, 10, key=jr.PRNGKey(0), time_dependent=True)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    solver = common.make_solver("midpoint")
    out: dict = {}
    for saveat in ("ts", "steps"):
        ref = _grad(problem, solver, diffrax.DirectAdjoint(), params, static, saveat)
        adjoints = [(f"checkpoint({c})", diffrax.RecursiveCheckpointAdjoint(c))
                    for c in args.checkpoints]
        adjoints.append(("checkpoint(default)", diffrax.RecursiveCheckpointAdjoint()))
        if common.reversible_adjoint_available():
            adjoints.insert(0, ("reversible", common.make_adjoint("reversible")))
        for name, adjoint in adjoints:
            g = _grad(problem, solver, adjoint, params, static, saveat)
            err = float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref)))
            out[(saveat, name)] = err
            print(f"SaveAt({'ts=...' if saveat == 'ts' else 'steps=True'}) "
                  f"{name:>20}: relative gradient error vs DirectAdjoint {err:.1e}",
                  flush=True)
    return out


if __name__ == "__main__":
    main()
