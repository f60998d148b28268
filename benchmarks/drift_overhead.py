"""Overhead of the default drift check (`ReversibleAdjoint(drift_tol="auto")`)
against no check (`drift_tol=None`), on a tiny problem where a gradient takes about a
millisecond, so any fixed cost would show.

Run: `python benchmarks/drift_overhead.py [--repeats 21]`. Prints a markdown table of
the median and minimum time of one jitted gradient, measured interleaved.
"""

import argparse
import statistics
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import revdiffrax


def _loss(model, adjoint, num_steps):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, m: m(y)),
        revdiffrax.Reversible(diffrax.Midpoint()),
        0.0,
        1.0,
        1.0 / num_steps,
        jnp.array([1.0, 0.5]),
        args=model,
        adjoint=adjoint,
        max_steps=num_steps,
    )
    assert sol.ys is not None
    return jnp.sum(sol.ys[-1] ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--steps", type=int, default=100)
    cli = parser.parse_args()
    model = eqx.nn.MLP(2, 2, 10, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    settings = {"None": None, '"auto"': "auto", "1.0 (error_if)": 1.0}
    grads = {name: eqx.filter_jit(eqx.filter_grad(_loss)) for name in settings}
    times = {name: [] for name in settings}
    for name, tol in settings.items():  # compile
        adjoint = revdiffrax.ReversibleAdjoint(drift_tol=tol)
        jax.block_until_ready(grads[name](model, adjoint, cli.steps))
    for _ in range(cli.repeats):
        for name, tol in settings.items():
            adjoint = revdiffrax.ReversibleAdjoint(drift_tol=tol)
            start = time.perf_counter()
            jax.block_until_ready(grads[name](model, adjoint, cli.steps))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["None"])
    bits = 32 + 32 * jax.config.jax_enable_x64
    print(f"N={cli.steps} Midpoint steps, MLP 10x1, float{bits}")
    print("| drift_tol | median | min | median vs None |")
    print("|---|---|---|---|")
    for name in settings:
        med, low = statistics.median(times[name]), min(times[name])
        print(
            f"| {name} | {med * 1e3:.3f} ms | {low * 1e3:.3f} ms | {med / base:.3f}x |"
        )


if __name__ == "__main__":
    main()
