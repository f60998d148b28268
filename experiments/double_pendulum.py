"""Chaotic double pendulum from real motion-capture data (McCallum & Foster,
arXiv 2410.11648, Sec. 5; data of Schmidt & Lipson, Science 2009).

Data: ``real_double_pend_h_1.txt`` (header ``% o1 o2 w1 w2``; rows
``trial t theta1 theta2 omega1 omega2 omega1 omega2 a1 a2``). Published
preprocessing: trial 0, first 2 s, state = columns 3-6 divided by 10, linearly
interpolated onto 500 evenly spaced times. The model is an autonomous MLP vector
field (one hidden layer of width 10, tanh) solved with adaptive Bogacki--Shampine
3(2) (``PIDController(rtol=1e-6, atol=1e-6)``), trained on the MSE at the 500 times.

Without ``--data`` a double pendulum (two point masses on light rods of realistic
size) is simulated from its Lagrangian equations of motion, written in the same text
format to the output directory, and read back through the same loader.

    python -m experiments.double_pendulum --data ../shared/data/real_double_pend_h_1.txt
    python -m experiments.double_pendulum --quick
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
from .data import load_motion_capture, PENDULUM_FORMAT, write_motion_capture
from .problem import Problem


G = 9.81  # m/s^2
L1, L2 = 0.18, 0.18  # arm lengths, m (slow mode period ~1.1 s, as in the recording)
M1, M2 = 0.10, 0.10  # masses, kg
SAMPLE_DT = 0.01  # 100 Hz, as the recording
DURATION = 8.0
# Initial states (theta1, theta2, omega1, omega2) of two trials; the first is the
# first row of the recording.
TRIALS_Y0 = ((-1.1336, -1.3008, -0.5385, -6.1551), (1.2, 0.4, 0.0, 2.0))
# The network needs at most a few hundred steps; max_steps leaves room for the
# model to stiffen during training (published runs took ~430 steps per solve).
MAX_STEPS = 2000


def pendulum_accelerations(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Angular accelerations of the double pendulum (angles from the downward
    vertical), from the Euler--Lagrange equations

        (m1 + m2) l1 th1'' + m2 l2 th2'' cos(d) + m2 l2 w2^2 sin(d)
            + (m1 + m2) g sin(th1) = 0,
        l2 th2'' + l1 th1'' cos(d) - l1 w1^2 sin(d) + g sin(th2) = 0,
        d = th1 - th2.
    """
    th1, th2, w1, w2 = y[0], y[1], y[2], y[3]
    d = th1 - th2
    a11, a12 = (M1 + M2) * L1, M2 * L2 * jnp.cos(d)
    a21, a22 = L1 * jnp.cos(d), L2
    b1 = -M2 * L2 * w2**2 * jnp.sin(d) - (M1 + M2) * G * jnp.sin(th1)
    b2 = L1 * w1**2 * jnp.sin(d) - G * jnp.sin(th2)
    det = a11 * a22 - a12 * a21
    return (b1 * a22 - a12 * b2) / det, (a11 * b2 - a21 * b1) / det


def pendulum_vector_field(t: jax.Array, y: jax.Array, args: None) -> jax.Array:
    al1, al2 = pendulum_accelerations(y)
    return jnp.stack([y[2], y[3], al1, al2])


def simulate_pendulum(path: str) -> str:
    """Simulate two trials of the double pendulum; write them in the recording's
    format (trial t theta1 theta2 omega1 omega2 omega1 omega2 a1 a2)."""
    t = np.arange(int(round(DURATION / SAMPLE_DT)) + 1) * SAMPLE_DT
    trials = []
    for y0 in TRIALS_Y0:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(pendulum_vector_field),
            diffrax.Tsit5(),
            0.0,
            float(t[-1]),
            1e-3,
            jnp.asarray(y0),
            saveat=diffrax.SaveAt(ts=jnp.asarray(t)),
            stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10),
            max_steps=100_000,
        )
        ys = np.asarray(sol.ys)
        acc = np.stack(jax.vmap(pendulum_accelerations)(jnp.asarray(ys)), 1)
        trials.append((t, np.concatenate([ys, ys[:, 2:4], acc], 1)))
    return write_motion_capture(path, PENDULUM_FORMAT, trials)


def build_problem(args: argparse.Namespace) -> Problem:
    n_points = 100 if args.quick else PENDULUM_FORMAT.n_points
    t_max = 1.0 if args.quick else PENDULUM_FORMAT.t_max
    if args.data is None:
        path = simulate_pendulum(os.path.join(args.out, "simulated_double_pend.txt"))
        source = f"simulated double pendulum ({path})"
    else:
        path = args.data
        source = f"real data {os.path.basename(path)}"
    ts, ys = load_motion_capture(path, PENDULUM_FORMAT, t_max=t_max, n_points=n_points)
    return Problem(
        name="double_pendulum",
        title="Double pendulum",
        ts=ts,
        ys=ys,
        time_dependent=False,
        solver=args.solver,
        # Adaptive: N is nominal (one step per data interval), used for the
        # floor(sqrt(2N)) checkpoint count; the accepted steps are recorded.
        num_steps=len(ts) - 1,
        adaptive=True,
        rtol=1e-6,
        atol=1e-6,
        max_steps=MAX_STEPS,
        state_labels=("theta1", "theta2", "omega1", "omega2"),
        data_source=f"{source}; trial 0, first {t_max} s, /10, {n_points} points",
        iters=1000,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    return run_experiment(
        argv,
        name="double_pendulum",
        description=__doc__.split("\n\n")[0],
        solver="bosh3",
        iters=1000,
        build_problem=build_problem,
    )


if __name__ == "__main__":
    main()
