"""The parasitic y - z mode of `Reversible` on dissipative problems (issue 17).

Two problems where the default coupling 0.999 goes wrong:

- *forcing*: y' = -y + sin(3t), y(0) = 1, t in [0, 20], Tsit5 base;
- *Kalman*: the continuous-time Kalman filter of diffrax's `kalman_filter` example
  (damped oscillator model, noisy measurements linearly interpolated, state
  (x, P) with P the 2x2 covariance, P0 = 10 I), t in [0, 5), Dopri5 base.

For each coupling, with `ConstantStepSize` (h = 0.1 and 0.01): the relative
2-norm distance of the final state from the base solver's through the same steps,
and `sol.stats["parasitic_offset"]` (the relative distance between y and z at the
end, which `ReversibleAdjoint` warns about above 1e-3). With
`PIDController(rtol=1e-6, atol=1e-6)`: accepted steps and the distance from a
reference solution (Dopri8, rtol = atol = 1e-12), with the round-trip defect in the
error estimate (`Reversible(..., parasitic_error=True)`) and without it (the default
since issue 22: the base solver's estimates of both base steps), the offset, and
whether the default check warns (above `10 N (rtol + atol sqrt(n) / |y_N|)`).

Run: `python -m benchmarks.parasitic_mode [--dtype float32]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import revdiffrax

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.harness import tree_rel_error
from experiments.report import markdown_table
from revdiffrax._adjoint.parasitic import auto_parasitic_threshold


COUPLINGS = (0.999, 0.99, 0.9)


@dataclasses.dataclass
class Problem:
    name: str
    vector_field: Callable[[Any, Any, Any], Any]
    base: diffrax.AbstractSolver
    t0: float
    t1: float
    dt0: float
    y0: Any


def forcing(dtype: Any) -> Problem:
    def vector_field(t, y, args):
        return -y + jnp.sin(3 * t)

    return Problem(
        "forcing", vector_field, diffrax.Tsit5(), 0.0, 20.0, 0.1, jnp.ones(1, dtype)
    )


def kalman(dtype: Any) -> Problem:
    """diffrax's Kalman-filter example: model damping 0.7, data from damping 0.3
    with unit measurement noise, Q = 0.01 I, R = 1, P0 = 10 I."""

    def oscillator(damping: float) -> jax.Array:
        return jnp.array([[0.0, 1.0], [-1.0, -2 * damping]], dtype)

    observe = jnp.array([[0.0, 1.0]], dtype)
    ts = jnp.arange(0, 5.0, 0.01).astype(dtype)
    true_system = oscillator(0.3)
    xs = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, x, args: true_system @ x),
        diffrax.Dopri5(),
        ts[0],
        ts[-1],
        0.01,
        jnp.array([1.0, 0.0], dtype),
        saveat=diffrax.SaveAt(ts=ts),
    ).ys
    assert xs is not None
    measured = xs @ observe.T + jr.normal(jr.PRNGKey(1), (len(ts), 1), dtype)
    measurement = diffrax.LinearInterpolation(ts=ts, ys=measured)
    model = oscillator(0.7)
    noise = 0.01 * jnp.eye(2, dtype=dtype)

    def vector_field(t, state, args):
        x, cov = state
        gain = cov @ observe.T  # R = 1
        dcov = model @ cov + cov @ model.T + noise - gain @ observe @ cov
        dx = model @ x + gain @ (measurement.evaluate(t) - observe @ x)
        return dx, dcov

    y0 = (jnp.zeros(2, dtype), 10.0 * jnp.eye(2, dtype=dtype))
    return Problem(
        "Kalman", vector_field, diffrax.Dopri5(), 0.0, float(ts[-1]), 0.01, y0
    )


def solve(problem: Problem, solver, controller, dt0: float, dtype: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", revdiffrax.ParasiticModeWarning)
        return diffrax.diffeqsolve(
            diffrax.ODETerm(problem.vector_field),
            solver,
            jnp.asarray(problem.t0, dtype),
            jnp.asarray(problem.t1, dtype),
            jnp.asarray(dt0, dtype),
            problem.y0,
            stepsize_controller=controller,
            adjoint=revdiffrax.ReversibleAdjoint()
            if isinstance(solver, revdiffrax.Reversible)
            else diffrax.RecursiveCheckpointAdjoint(),
            max_steps=200_000,
        )


def final(sol) -> Any:
    return jax.tree_util.tree_map(lambda x: x[-1], sol.ys)


def constant_step_rows(problem: Problem, dtype: Any) -> list[tuple]:
    rows = []
    for dt0 in (problem.dt0, problem.dt0 / 10):
        control = diffrax.ConstantStepSize()
        base = final(solve(problem, problem.base, control, dt0, dtype))
        for coupling in COUPLINGS:
            solver = revdiffrax.Reversible(problem.base, coupling)
            sol = solve(problem, solver, control, dt0, dtype)
            offset = float(sol.stats["parasitic_offset"])
            rows.append(
                (
                    problem.name,
                    dt0,
                    coupling,
                    f"{tree_rel_error(final(sol), base, norm='2'):.1e}",
                    f"{offset:.1e}",
                    "yes" if offset > 1e-3 else "no",
                )
            )
    return rows


def adaptive_rows(problem: Problem, dtype: Any) -> list[tuple]:
    reference = final(
        solve(
            problem,
            diffrax.Dopri8(),
            diffrax.PIDController(rtol=1e-12, atol=1e-12),
            problem.dt0,
            jnp.float64,
        )
    )
    control = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    base = solve(problem, problem.base, control, problem.dt0, dtype)
    rows: list[tuple] = [
        (
            problem.name,
            type(problem.base).__name__,
            "-",
            "-",
            int(base.stats["num_accepted_steps"]),
            f"{tree_rel_error(final(base), reference, norm='2'):.1e}",
            "-",
            "-",
        )
    ]
    for coupling in COUPLINGS:
        for parasitic_error in (False, True):
            solver = revdiffrax.Reversible(
                problem.base, coupling, parasitic_error=parasitic_error
            )
            sol = solve(problem, solver, control, problem.dt0, dtype)
            threshold = auto_parasitic_threshold(
                control, final(sol), sol.stats["num_accepted_steps"]
            )
            warns = float(sol.stats["parasitic_offset"]) > float(threshold)
            rows.append(
                (
                    problem.name,
                    f"Reversible({type(problem.base).__name__})",
                    coupling,
                    "yes" if parasitic_error else "no",
                    int(sol.stats["num_accepted_steps"]),
                    f"{tree_rel_error(final(sol), reference, norm='2'):.1e}",
                    f"{float(sol.stats['parasitic_offset']):.1e}",
                    "yes" if warns else "no",
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    options = parser.parse_args()
    dtype = jnp.dtype(options.dtype)
    problems = (forcing(dtype), kalman(dtype))
    print(f"## Constant steps ({options.dtype})\n")
    header = (
        "problem",
        "h",
        "coupling",
        "final state vs base solver (rel.)",
        "parasitic_offset",
        "warns",
    )
    rows = [row for p in problems for row in constant_step_rows(p, dtype)]
    print(markdown_table(header, rows))
    print(f"\n## PIDController(rtol=1e-6, atol=1e-6) ({options.dtype})\n")
    header = (
        "problem",
        "solver",
        "coupling",
        "round-trip defect in error estimate (`parasitic_error`)",
        "accepted steps",
        "final state vs reference (rel.)",
        "parasitic_offset",
        "warns (default `parasitic_tol`)",
    )
    rows = [row for p in problems for row in adaptive_rows(p, dtype)]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
