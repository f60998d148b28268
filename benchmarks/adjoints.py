"""Benchmark `revdiffrax.ReversibleAdjoint` against diffrax's adjoints.

Prints markdown tables of gradient time, forward time and compiled temporary memory
(`jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`) for

(a) a white-dwarf-sized model: MLP width 10, one hidden layer, 2-d state,
    1,000 steps, bases Midpoint and Tsit5;
(b) a medium model: batch 64 inside y, 16-d state, MLP width 64 depth 2, Tsit5 base,
    N in {100, 1000, 10000} steps;
(c) `jax.vmap` over 256 initial conditions against the batch inside y.

Times are medians over `--repeats` calls after a warm-up call, with
`jax.block_until_ready`. Run: `python benchmarks/adjoints.py [--quick]`.
"""

import argparse
import math
import platform
import statistics
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp

import revdiffrax


jax.config.update("jax_enable_x64", True)


class Field(eqx.Module):
    """Time-dependent MLP vector field acting on a batch of states `y[..., d]`."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        def one(yi):
            return self.mlp(jnp.concatenate([jnp.reshape(t, (1,)), yi]))

        if y.ndim == 1:
            return one(y)
        return jax.vmap(one)(y)


def make_field(dim, width, depth, key):
    mlp = eqx.nn.MLP(dim + 1, dim, width, depth, activation=jnp.tanh, key=key)
    return Field(mlp)


def adjoints(num_steps, include_slow=True):
    c = int(math.floor(math.sqrt(2 * num_steps)))
    out = {
        "reversible": revdiffrax.ReversibleAdjoint(),
        "checkpoint (default)": diffrax.RecursiveCheckpointAdjoint(),
        f"checkpoint (c={c})": diffrax.RecursiveCheckpointAdjoint(checkpoints=c),
    }
    if include_slow:
        out["direct"] = diffrax.DirectAdjoint()
    out["backsolve"] = diffrax.BacksolveAdjoint()
    return out


def solve(field, y0, solver, num_steps, adjoint):
    # BacksolveAdjoint solves the adjoint ODE with the (reversible) solver as well.
    return diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        0.0,
        1.0,
        1.0 / num_steps,
        y0,
        adjoint=adjoint,
        max_steps=num_steps,
    ).ys


def timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(field, y0, solver, num_steps, adjoint, repeats):
    params, static = eqx.partition(field, eqx.is_inexact_array)

    def loss(p, y):
        f = eqx.combine(p, static)
        return jnp.mean(solve(f, y, solver, num_steps, adjoint) ** 2)

    grad = jax.jit(jax.grad(loss))
    fwd = jax.jit(loss)
    memory = grad.lower(params, y0).compile().memory_analysis()
    temp = None if memory is None else memory.temp_size_in_bytes
    return {
        "grad_s": timed(grad, params, y0, repeats=repeats),
        "fwd_s": timed(fwd, params, y0, repeats=repeats),
        "temp_bytes": temp,
        "grad": grad(params, y0),
    }


def fmt_bytes(x):
    if x is None:
        return "n/a"
    return f"{x / 2**20:.2f} MiB"


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def rel_err(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / den


def run_case(name, field, y0, solver, num_steps, repeats, include_slow):
    rows = []
    results = {}
    for adj_name, adj in adjoints(num_steps, include_slow).items():
        r = measure(field, y0, solver, num_steps, adj, repeats)
        results[adj_name] = r
    ref = results["checkpoint (default)"]["grad"]
    rev = results["reversible"]
    for adj_name, r in results.items():
        rows.append(
            {
                "case": name,
                "N": num_steps,
                "adjoint": adj_name,
                "grad time": f"{r['grad_s'] * 1e3:.1f} ms",
                "fwd time": f"{r['fwd_s'] * 1e3:.1f} ms",
                "grad/fwd": f"{r['grad_s'] / r['fwd_s']:.2f}",
                "grad time vs reversible": f"{r['grad_s'] / rev['grad_s']:.2f}x",
                "temp memory": fmt_bytes(r["temp_bytes"]),
                "grad rel. err vs checkpoint": f"{rel_err(r['grad'], ref):.1e}",
            }
        )
    return rows, results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-direct", action="store_true", help="skip DirectAdjoint")
    parser.add_argument("--max-n", type=int, default=10_000)
    parser.add_argument("--sections", default="abc", help="which of (a), (b), (c)")
    parser.add_argument(
        "--memory-n", type=int, default=10_000,
        help="also compile (not run) model (b) at this N and report temp memory",
    )
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(
        f"# revdiffrax adjoint benchmark\n\nmachine: {platform.platform()}, "
        f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, "
        f"diffrax {diffrax.__version__}, float64, median of {args.repeats} calls "
        "after a warm-up call.\n"
    )
    columns = [
        "case",
        "N",
        "adjoint",
        "grad time",
        "fwd time",
        "grad/fwd",
        "grad time vs reversible",
        "temp memory",
        "grad rel. err vs checkpoint",
    ]
    key = jax.random.PRNGKey(0)
    include_slow = not args.no_direct

    # (a) white-dwarf-sized model.
    n_a = 100 if args.quick else 1000
    field = make_field(2, 10, 1, key)
    y0 = jnp.array([1.0, 0.0])
    rows = []
    bases = (diffrax.Midpoint(), diffrax.Tsit5()) if "a" in args.sections else ()
    for base in bases:
        solver = revdiffrax.Reversible(base)
        r, _ = run_case(
            f"(a) {type(base).__name__}", field, y0, solver, n_a, args.repeats,
            include_slow,
        )
        rows += r
    if rows:
        print("## (a) white-dwarf-sized model (2-d state, MLP 10x1)\n")
        print(table(rows, columns) + "\n", flush=True)

    # (b) medium model.
    sizes = [n for n in (100, 1000, 10_000) if n <= args.max_n]
    if args.quick:
        sizes = [20, 200]
    if "b" not in args.sections:
        sizes = []
    field = make_field(16, 64, 2, key)
    y0 = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    solver = revdiffrax.Reversible(diffrax.Tsit5())
    rows = []
    temps = {}
    for n in sizes:
        r, res = run_case(
            "(b) Tsit5", field, y0, solver, n, args.repeats,
            include_slow and n <= 1000,
        )
        rows += r
        temps[n] = res["reversible"]["temp_bytes"]
    if sizes:
        print("## (b) medium model (batch 64 in y, 16-d state, MLP 64x2, Tsit5)\n")
        print(table(rows, columns) + "\n", flush=True)
    lo, hi = (min(sizes), max(sizes)) if sizes else (None, None)
    if sizes and temps[lo] is not None:
        buffer = (hi - lo) * 8  # one float64 step time per extra step
        print(
            f"Reversible temp memory: N={lo}: {fmt_bytes(temps[lo])}, N={hi}: "
            f"{fmt_bytes(temps[hi])}; growth {temps[hi] / temps[lo] - 1:+.1%}, "
            f"of which the step-time buffer is {buffer} bytes; growth without it "
            f"{(temps[hi] - buffer) / temps[lo] - 1:+.1%}.\n"
        )

    if "b" in args.sections and args.memory_n and not args.quick:
        field = make_field(16, 64, 2, key)
        y0 = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
        params, static = eqx.partition(field, eqx.is_inexact_array)
        mem_rows = []
        for n in sorted({100, args.memory_n}):
            for adj_name, adj in adjoints(n, include_slow=False).items():
                def loss(p, y, adj=adj, n=n):
                    f = eqx.combine(p, static)
                    return jnp.mean(solve(f, y, solver, n, adj) ** 2)

                compiled = jax.jit(jax.grad(loss)).lower(params, y0).compile()
                m = compiled.memory_analysis()
                mem_rows.append(
                    {
                        "N": n,
                        "adjoint": adj_name,
                        "temp memory": fmt_bytes(None if m is None else m.temp_size_in_bytes),
                    }
                )
        print("## (b) compiled temp memory only (not run)\n")
        print(table(mem_rows, ["N", "adjoint", "temp memory"]) + "\n", flush=True)

    if "c" not in args.sections:
        return
    # (c) vmap over initial conditions against the batch inside y.
    n_c = 100 if args.quick else 1000
    batch = 256
    field = make_field(16, 64, 2, key)
    ys = jax.random.normal(jax.random.PRNGKey(2), (batch, 16))
    params, static = eqx.partition(field, eqx.is_inexact_array)
    adj = revdiffrax.ReversibleAdjoint()

    def loss_inside(p, y):
        return jnp.mean(solve(eqx.combine(p, static), y, solver, n_c, adj) ** 2)

    def loss_vmap(p, y):
        one = lambda yi: solve(eqx.combine(p, static), yi, solver, n_c, adj)  # noqa: E731
        return jnp.mean(jax.vmap(one)(y) ** 2)

    t_inside = timed(jax.jit(jax.grad(loss_inside)), params, ys, repeats=args.repeats)
    t_vmap = timed(jax.jit(jax.grad(loss_vmap)), params, ys, repeats=args.repeats)
    print(f"## (c) vmap over {batch} initial conditions (N={n_c})\n")
    print(
        table(
            [
                {"layout": "batch inside y", "grad time": f"{t_inside * 1e3:.1f} ms"},
                {"layout": "jax.vmap", "grad time": f"{t_vmap * 1e3:.1f} ms"},
                {"layout": "ratio vmap / inside", "grad time": f"{t_vmap / t_inside:.2f}"},
            ],
            ["layout", "grad time"],
        )
    )


if __name__ == "__main__":
    main()
