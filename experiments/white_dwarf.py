"""Chandrasekhar's white dwarf equation (McCallum & Foster, arXiv 2410.11648, Sec. 5).

    y1' = y2,    y2' = -(y1^2 - C)^(3/2) - 2 y2 / x,    x = t + 0.5,  C = 0.001,

y(0) = (1, 0), t in [0, 5], 1,000 fixed steps (dt = 0.005). The training data is an
accurate solve of the true equation (Dopri8, rtol = atol = 1e-12) saved at the step
times. The model is a time-dependent MLP vector field (input concat(t, y), one hidden
layer of width 10, tanh), trained on the MSE over the whole saved trajectory.

    python -m experiments.white_dwarf                      # reversible vs checkpoint
    python -m experiments.white_dwarf --solver rk4 --adjoint checkpoint --checkpoints 8
    python -m experiments.white_dwarf --quick
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .cli import run_experiment
from .problem import Problem


C = 0.001
T1 = 5.0
NUM_STEPS = 1000


def white_dwarf_vector_field(t: jax.Array, y: jax.Array, args: float) -> jax.Array:
    c = args
    x = t + 0.5
    y1, y2 = y[0], y[1]
    # Clamp at 0: (y1^2 - C)^(3/2) is only defined while y1^2 >= C, which holds on
    # [0, 5] for the true solution.
    return jnp.stack([y2, -(jnp.maximum(y1**2 - c, 0.0) ** 1.5) - 2 * y2 / x])


def white_dwarf_data(ts: np.ndarray, c: float = C) -> np.ndarray:
    """Accurate solution of the white dwarf equation at `ts` (Dopri8, tol 1e-12)."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(white_dwarf_vector_field),
        diffrax.Dopri8(),
        float(ts[0]),
        float(ts[-1]),
        1e-3,
        jnp.array([1.0, 0.0]),
        args=c,
        saveat=diffrax.SaveAt(ts=jnp.asarray(ts)),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=100_000,
    )
    return np.asarray(sol.ys)


def build_problem(args: argparse.Namespace) -> Problem:
    """The white dwarf `Problem` (100 steps with `--quick`)."""
    if args.data is not None:
        print(
            "note: the white dwarf experiment generates its own data; --data is "
            "ignored",
            file=sys.stderr,
        )
    n = 100 if args.quick else NUM_STEPS
    ts = np.linspace(0.0, T1, n + 1)
    return Problem(
        name="white_dwarf",
        title="White dwarf",
        ts=ts,
        ys=white_dwarf_data(ts),
        time_dependent=True,
        solver=args.solver,
        num_steps=n,
        state_labels=("y1", "y2"),
        data_source=f"generated: Dopri8 rtol=atol=1e-12, C={C}, {n} steps on [0, {T1}]",
        iters=1000,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    return run_experiment(
        argv,
        name="white_dwarf",
        description=__doc__.split("\n\n")[0],
        solver="midpoint",
        iters=1000,
        build_problem=build_problem,
    )


if __name__ == "__main__":
    main()
