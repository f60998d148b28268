"""Forward accuracy of `Reversible(Tsit5(), coupling)` on Lotka-Volterra.

The coupled scheme is only stable in a strip |Re(h a)| < -ln(coupling) around the
imaginary axis; outside it the parasitic y - z mode grows, and the base solver's
error estimate does not see it. This prints the error at t=10 (against Dopri8 with
rtol=atol=1e-12) and the step count with `PIDController(rtol=1e-6, atol=1e-6)`.

Run: `python benchmarks/coupling_accuracy.py`.
"""

import diffrax
import jax
import jax.numpy as jnp
import revdiffrax

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.harness import tree_rel_error
from experiments.report import markdown_table


def lotka_volterra(t: jax.Array, y: jax.Array, args: None) -> jax.Array:
    prey, predator = y
    return jnp.stack([1.5 * prey - prey * predator, -3.0 * predator + prey * predator])


def solve(solver: diffrax.AbstractSolver, rtol: float) -> tuple[jax.Array, int]:
    """The state at t=10 and the number of accepted steps."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lotka_volterra),
        solver,
        0.0,
        10.0,
        0.01,
        jnp.array([5.0, 1.0]),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol),
        max_steps=100_000,
    )
    return sol.ys[-1], int(sol.stats["num_accepted_steps"])


def main() -> None:
    exact, _ = solve(diffrax.Dopri8(), 1e-12)
    y, n = solve(diffrax.Tsit5(), 1e-6)
    rows = [("Tsit5", "-", f"{tree_rel_error(y, exact, norm='2'):.1e}", n)]
    for coupling in (0.999, 0.99, 0.9, 0.5):
        y, n = solve(revdiffrax.Reversible(diffrax.Tsit5(), coupling=coupling), 1e-6)
        err = tree_rel_error(y, exact, norm="2")
        rows.append(("Reversible(Tsit5)", coupling, f"{err:.1e}", n))
    header = ("solver", "coupling", "relative error at t=10", "accepted steps")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
