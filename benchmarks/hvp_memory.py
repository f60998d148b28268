"""Hessian-vector products (forward-over-reverse: `jax.jvp` of `jax.grad`) through
`ReversibleAdjoint`: compiled temp memory against the number of steps N, and the
cost of a product relative to a gradient (issue 23, item 2).

The loss is the squared final state of a batched neural ODE (batch 256 inside the
state, 8-d, MLP width 64 depth 2, tanh, float32, t in [0, 1], N constant steps,
`Reversible(Midpoint())`); the product is taken with respect to the MLP's weights
along a random direction. For each adjoint and N, the product is compiled and
`memory_analysis().temp_size_in_bytes` read (nothing is run):

- `ReversibleAdjoint()`: the state tangents are rebuilt backwards alongside the
  states, so its memory should not grow with N (constant steps record no step
  times).
- `diffrax.DirectAdjoint()`: differentiates the stored forward solve; grows with N.
- `diffrax.RecursiveCheckpointAdjoint(checkpoints=2)`: forward-over-reverse through
  its checkpointed `custom_vjp`, if JAX can (the table says if not).

Then, for `ReversibleAdjoint` at N=100, the wall time of one product against one
gradient (both jitted, interleaved, median of `--repeats` after a warm-up).

Usage: `python -m benchmarks.hvp_memory [--quick] [--out DIR]` (prints a markdown
table; writes `hvp_memory_<backend>.md` and a plot `hvp_memory_<backend>.png` to
`--out`, default `benchmarks/results`). `--quick`: a small model and N in (10, 100),
for the smoke test.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import revdiffrax


FULL = dict(batch=256, dim=8, width=64, depth=2, steps=(100, 1_000, 10_000))
QUICK = dict(batch=4, dim=2, width=4, depth=1, steps=(10, 100))

ADJOINTS = {
    "Reversible": lambda: revdiffrax.ReversibleAdjoint(drift_tol=None),
    "Direct": diffrax.DirectAdjoint,
    "RCA(2)": lambda: diffrax.RecursiveCheckpointAdjoint(checkpoints=2),
}


def problem(size: dict, steps: int, adjoint):
    """The loss of the MLP's weights, those weights and a tangent direction."""
    key_model, key_tangent = jr.split(jr.PRNGKey(0))
    mlp = eqx.nn.MLP(
        size["dim"],
        size["dim"],
        size["width"],
        size["depth"],
        activation=jnp.tanh,
        key=key_model,
        dtype=jnp.float32,
    )
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jr.split(key_tangent, len(leaves))
    tangent = jax.tree_util.tree_unflatten(
        treedef, [jr.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
    y0 = jnp.ones((size["batch"], size["dim"]), jnp.float32)

    def field(t, y, p):
        return jax.vmap(eqx.combine(p, static))(y)

    def loss(p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            revdiffrax.Reversible(diffrax.Midpoint()),
            0.0,
            1.0,
            1.0 / steps,
            y0,
            args=p,
            adjoint=adjoint,
            max_steps=steps,
        )
        assert sol.ys is not None
        return jnp.sum(sol.ys**2)

    return loss, params, tangent


def hvp_fn(loss):
    grad = jax.grad(loss)
    return jax.jit(lambda p, v: jax.jvp(grad, (p,), (v,))[1])


def temp_bytes(size: dict, steps: int, name: str) -> int | str:
    """Compiled temp memory of one product, or why it could not be compiled."""
    loss, params, tangent = problem(size, steps, ADJOINTS[name]())
    try:
        compiled = hvp_fn(loss).lower(params, tangent).compile()
    except Exception as e:  # e.g. JAX cannot take the JVP of a custom_vjp
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore[reportOptionalMemberAccess]


def time_ratio(size: dict, steps: int, repeats: int) -> tuple[float, float, float]:
    """Median wall times of one gradient and one product (ReversibleAdjoint),
    interleaved after a warm-up, and their ratio."""
    loss, params, tangent = problem(size, steps, ADJOINTS["Reversible"]())
    grad = jax.jit(jax.grad(loss))
    product = hvp_fn(loss)
    jax.block_until_ready((grad(params), product(params, tangent)))
    grad_times, product_times = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(grad(params))
        grad_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(product(params, tangent))
        product_times.append(time.perf_counter() - t)
    g, p = statistics.median(grad_times), statistics.median(product_times)
    return g, p, p / g


def _mib(x: int | str) -> str:
    return f"{x / 2**20:.3f} MiB" if isinstance(x, int) else f"({x})"


def plot(rows: dict, steps: tuple, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in rows.items():
        points = [(n, v) for n, v in zip(steps, values) if isinstance(v, int)]
        if points:
            ns, vs = zip(*points)
            ax.loglog(ns, [v / 2**20 for v in vs], "o-", label=name)
    ax.set_xlabel("number of steps N")
    ax.set_ylabel("compiled temp memory of one HVP (MiB)")
    ax.set_title("Hessian-vector product, Reversible(Midpoint)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    steps = size["steps"]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"diffrax {diffrax.__version__}, backend {jax.default_backend()}. Batch "
        f"{size['batch']}x{size['dim']}, MLP width {size['width']} depth "
        f"{size['depth']}, float32, Reversible(Midpoint()), constant steps.",
        "",
        "| adjoint | " + " | ".join(f"N={n}" for n in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    print("\n".join(lines), flush=True)
    rows = {}
    for name in ADJOINTS:
        rows[name] = [temp_bytes(size, n, name) for n in steps]
        line = f"| {name} | " + " | ".join(_mib(x) for x in rows[name]) + " |"
        lines.append(line)
        print(line, flush=True)
    ours = rows["Reversible"]
    growth = ours[-1] / ours[0] - 1 if all(isinstance(x, int) for x in ours) else None
    g, p, ratio = time_ratio(size, steps[0] if args.quick else 100, args.repeats)
    lines += [
        "",
        f"Reversible temp memory at N={steps[-1]} vs N={steps[0]}: "
        + ("n/a" if growth is None else f"{100 * growth:+.1f}%"),
        f"Time, ReversibleAdjoint, N={steps[0] if args.quick else 100}: gradient "
        f"{1e3 * g:.2f} ms, HVP {1e3 * p:.2f} ms, HVP / gradient = {ratio:.2f} "
        f"(median of {args.repeats}, interleaved; load {os.getloadavg()[0]:.1f}).",
    ]
    print("\n".join(lines[-3:]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    backend = jax.default_backend()
    png = os.path.join(args.out, f"hvp_memory_{backend}.png")
    plot(rows, steps, png)
    report = os.path.join(args.out, f"hvp_memory_{backend}.md")
    command = "python -m benchmarks.hvp_memory " + " ".join(sys.argv[1:] or [])
    with open(report, "w") as f:
        f.write(f"# Memory of a Hessian-vector product ({backend})\n\n")
        f.write(f"Command: `{command.strip()}`. Plot: `{os.path.basename(png)}`.\n\n")
        f.write("\n".join(lines) + "\n")
    return dict(rows=rows, growth=growth, ratio=ratio, report=report, plot=png)


if __name__ == "__main__":
    main()
