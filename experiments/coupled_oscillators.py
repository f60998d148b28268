"""Two coupled linear oscillators from real motion-capture data (McCallum & Foster,
arXiv 2410.11648, Sec. 5; data of Schmidt & Lipson, Science 2009).

Data: ``real_double_linear_h_1.txt`` (header ``% x1 x2 v1 v2``; rows
``trial t x1 x2 v1 v2``). Published preprocessing: first 3 s, state = columns 3-6
divided by 100, linearly interpolated onto 500 evenly spaced times (4-d state).
The model is an autonomous MLP vector field (one hidden layer of width 10, tanh)
solved with a fixed-step explicit Runge--Kutta method (default Bosh3, one step per
data interval: N = 499 steps), trained on the MSE over the trajectory.

Without ``--data`` two coupled damped oscillators are simulated with parameters
comparable to the recording, written in the same text format to the output
directory, and read back through the same loader.

    python -m experiments.coupled_oscillators \\
        --data ../shared/data/real_double_linear_h_1.txt
    python -m experiments.coupled_oscillators --quick
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from .cli import run_experiment
from .data import load_motion_capture, OSCILLATOR_FORMAT, write_motion_capture
from .problem import Problem


# Simulated system, in the recording's raw units (tracker pixels, seconds): two unit
# masses on springs, each tied to its own equilibrium, coupled by a weaker spring,
# lightly damped. Frequencies and amplitudes match the recording (period ~2.8 s,
# positions of order 100, speeds of order 200).
OMEGA2 = 4.0  # k / m, 1/s^2
COUPLING2 = 1.0  # k_c / m, 1/s^2
DAMPING = 0.05  # c / m, 1/s
EQUILIBRIUM = (62.0, -62.0)
Y0 = (0.0, -143.0, -141.0, 40.0)  # x1, x2, v1, v2 (first row of the recording)
SAMPLE_DT = 1 / 30
DURATION = 16.5


def oscillator_vector_field(t: jax.Array, y: jax.Array, args: None) -> jax.Array:
    x1, x2, v1, v2 = y
    e1, e2 = EQUILIBRIUM
    d1, d2 = x1 - e1, x2 - e2
    a1 = -OMEGA2 * d1 - COUPLING2 * (d1 - d2) - DAMPING * v1
    a2 = -OMEGA2 * d2 - COUPLING2 * (d2 - d1) - DAMPING * v2
    return jnp.stack([v1, v2, a1, a2])


def simulate_oscillators(path: str) -> str:
    """Simulate the coupled oscillators and write them in the recording's format."""
    t = np.arange(1, int(DURATION / SAMPLE_DT) + 1) * SAMPLE_DT
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(oscillator_vector_field),
        diffrax.Tsit5(),
        0.0,
        float(t[-1]),
        1e-3,
        jnp.asarray(Y0),
        saveat=diffrax.SaveAt(ts=jnp.asarray(t)),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-8),
        max_steps=100_000,
    )
    xs = np.array(sol.ys)
    xs[:, :2] = np.round(xs[:, :2])  # the tracker reports whole-pixel positions
    return write_motion_capture(path, OSCILLATOR_FORMAT, [(t, xs)])


def build_problem(args: argparse.Namespace) -> Problem:
    n_points = 100 if args.quick else OSCILLATOR_FORMAT.n_points
    if args.data is None:
        path = simulate_oscillators(
            os.path.join(args.out, "simulated_double_linear.txt")
        )
        source = f"simulated coupled damped oscillators ({path})"
    else:
        path = args.data
        source = f"real data {os.path.basename(path)}"
    ts, ys = load_motion_capture(path, OSCILLATOR_FORMAT, n_points=n_points)
    return Problem(
        name="coupled_oscillators",
        title="Coupled oscillators",
        ts=ts,
        ys=ys,
        time_dependent=False,
        solver=args.solver,
        num_steps=len(ts) - 1,
        state_labels=("x1", "x2", "v1", "v2"),
        data_source=f"{source}; first {OSCILLATOR_FORMAT.t_max} s, /100, "
        f"{n_points} points",
        iters=1000,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    return run_experiment(
        argv,
        name="coupled_oscillators",
        description=__doc__.split("\n\n")[0],
        solver="bosh3",
        iters=1000,
        build_problem=build_problem,
    )


if __name__ == "__main__":
    main()
