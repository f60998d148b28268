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

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import revdiffrax

# Importing `experiments` switches on float64 (experiments/__init__.py).
from experiments.harness import compile_timed, median_time, tree_rel_error
from experiments.report import markdown_table


COLUMNS = [
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


class Field(eqx.Module):
    """Time-dependent MLP vector field acting on a batch of states `y[..., d]`."""

    mlp: eqx.nn.MLP

    def __call__(self, t: jax.Array, y: jax.Array, args: None) -> jax.Array:
        def one(yi):
            return self.mlp(jnp.concatenate([jnp.reshape(t, (1,)), yi]))

        if y.ndim == 1:
            return one(y)
        return jax.vmap(one)(y)


def make_field(dim: int, width: int, depth: int, key: jax.Array) -> Field:
    mlp = eqx.nn.MLP(dim + 1, dim, width, depth, activation=jnp.tanh, key=key)
    return Field(mlp)


def adjoints(
    num_steps: int, include_slow: bool = True
) -> dict[str, diffrax.AbstractAdjoint]:
    """The compared adjoints, by table label."""
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


def solve(
    field: Field,
    y0: jax.Array,
    solver: diffrax.AbstractSolver,
    num_steps: int,
    adjoint: diffrax.AbstractAdjoint,
) -> jax.Array:
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


def _loss_fn(field, solver, num_steps, adjoint):
    """(params, y0) -> mean squared final state, and the params of `field`."""
    params, static = eqx.partition(field, eqx.is_inexact_array)

    def loss(p, y):
        f = eqx.combine(p, static)
        return jnp.mean(solve(f, y, solver, num_steps, adjoint) ** 2)

    return loss, params


def measure(field, y0, solver, num_steps, adjoint, repeats) -> dict:
    """Gradient and forward times, compiled temp memory and the gradient."""
    loss, params = _loss_fn(field, solver, num_steps, adjoint)
    grad = jax.jit(jax.grad(loss))
    fwd = jax.jit(loss)
    _, _, temp = compile_timed(jax.grad(loss), params, y0)
    return {
        "grad_s": median_time(grad, params, y0, repeats=repeats),
        "fwd_s": median_time(fwd, params, y0, repeats=repeats),
        "temp_bytes": temp,
        "grad": grad(params, y0),
    }


def fmt_bytes(x: int | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 2**20:.2f} MiB"


def run_case(name, field, y0, solver, num_steps, repeats, include_slow):
    """One table row per adjoint, and the raw measurements."""
    rows = []
    results = {}
    for adj_name, adj in adjoints(num_steps, include_slow).items():
        results[adj_name] = measure(field, y0, solver, num_steps, adj, repeats)
    ref = results["checkpoint (default)"]["grad"]
    rev = results["reversible"]
    for adj_name, r in results.items():
        rows.append(
            [
                name,
                num_steps,
                adj_name,
                f"{r['grad_s'] * 1e3:.1f} ms",
                f"{r['fwd_s'] * 1e3:.1f} ms",
                f"{r['grad_s'] / r['fwd_s']:.2f}",
                f"{r['grad_s'] / rev['grad_s']:.2f}x",
                fmt_bytes(r["temp_bytes"]),
                f"{tree_rel_error(r['grad'], ref):.1e}",
            ]
        )
    return rows, results


def section_a(args, key, include_slow):
    """(a) white-dwarf-sized model, Midpoint and Tsit5 bases."""
    n_a = 100 if args.quick else 1000
    field = make_field(2, 10, 1, key)
    y0 = jnp.array([1.0, 0.0])
    rows = []
    for base in (diffrax.Midpoint(), diffrax.Tsit5()):
        solver = revdiffrax.Reversible(base)
        r, _ = run_case(
            f"(a) {type(base).__name__}",
            field,
            y0,
            solver,
            n_a,
            args.repeats,
            include_slow,
        )
        rows += r
    print("## (a) white-dwarf-sized model (2-d state, MLP 10x1)\n")
    print(markdown_table(COLUMNS, rows) + "\n", flush=True)


def _medium_model(key):
    field = make_field(16, 64, 2, key)
    y0 = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
    return field, y0, revdiffrax.Reversible(diffrax.Tsit5())


def section_b(args, key, include_slow):
    """(b) medium model over several N, and how its temp memory grows."""
    sizes = [n for n in (100, 1000, 10_000) if n <= args.max_n]
    if args.quick:
        sizes = [20, 200]
    field, y0, solver = _medium_model(key)
    rows = []
    temps = {}
    for n in sizes:
        r, res = run_case(
            "(b) Tsit5",
            field,
            y0,
            solver,
            n,
            args.repeats,
            include_slow and n <= 1000,
        )
        rows += r
        temps[n] = res["reversible"]["temp_bytes"]
    if not sizes:
        return
    print("## (b) medium model (batch 64 in y, 16-d state, MLP 64x2, Tsit5)\n")
    print(markdown_table(COLUMNS, rows) + "\n", flush=True)
    lo, hi = min(sizes), max(sizes)
    if temps[lo] is not None:
        buffer = (hi - lo) * 8  # one float64 step time per extra step
        print(
            f"Reversible temp memory: N={lo}: {fmt_bytes(temps[lo])}, N={hi}: "
            f"{fmt_bytes(temps[hi])}; growth {temps[hi] / temps[lo] - 1:+.1%}, "
            f"of which the step-time buffer is {buffer} bytes; growth without it "
            f"{(temps[hi] - buffer) / temps[lo] - 1:+.1%}.\n"
        )


def section_b_memory(args, key):
    """(b) compiled temp memory only (not run) at N = 100 and `--memory-n`."""
    field, y0, solver = _medium_model(key)
    rows = []
    for n in sorted({100, args.memory_n}):
        for adj_name, adj in adjoints(n, include_slow=False).items():
            loss, params = _loss_fn(field, solver, n, adj)
            _, _, temp = compile_timed(jax.grad(loss), params, y0)
            rows.append([n, adj_name, fmt_bytes(temp)])
    print("## (b) compiled temp memory only (not run)\n")
    print(markdown_table(["N", "adjoint", "temp memory"], rows) + "\n", flush=True)


def section_c(args, key):
    """(c) `jax.vmap` over initial conditions against the batch inside y."""
    n_c = 100 if args.quick else 1000
    batch = 256
    field, _, solver = _medium_model(key)
    ys = jax.random.normal(jax.random.PRNGKey(2), (batch, 16))
    params, static = eqx.partition(field, eqx.is_inexact_array)
    adj = revdiffrax.ReversibleAdjoint()

    def loss_inside(p, y):
        return jnp.mean(solve(eqx.combine(p, static), y, solver, n_c, adj) ** 2)

    def loss_vmap(p, y):
        def one(yi):
            return solve(eqx.combine(p, static), yi, solver, n_c, adj)

        return jnp.mean(jax.vmap(one)(y) ** 2)

    grad_inside = jax.jit(jax.grad(loss_inside))
    t_inside = median_time(grad_inside, params, ys, repeats=args.repeats)
    grad_vmap = jax.jit(jax.grad(loss_vmap))
    t_vmap = median_time(grad_vmap, params, ys, repeats=args.repeats)
    print(f"## (c) vmap over {batch} initial conditions (N={n_c})\n")
    rows = [
        ["batch inside y", f"{t_inside * 1e3:.1f} ms"],
        ["jax.vmap", f"{t_vmap * 1e3:.1f} ms"],
        ["ratio vmap / inside", f"{t_vmap / t_inside:.2f}"],
    ]
    print(markdown_table(["layout", "grad time"], rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-direct", action="store_true", help="skip DirectAdjoint")
    parser.add_argument("--max-n", type=int, default=10_000)
    parser.add_argument("--sections", default="abc", help="which of (a), (b), (c)")
    parser.add_argument(
        "--memory-n",
        type=int,
        default=10_000,
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
    key = jax.random.PRNGKey(0)
    include_slow = not args.no_direct
    if "a" in args.sections:
        section_a(args, key, include_slow)
    if "b" in args.sections:
        section_b(args, key, include_slow)
    if "b" in args.sections and args.memory_n and not args.quick:
        section_b_memory(args, key)
    if "c" in args.sections:
        section_c(args, key)


if __name__ == "__main__":
    main()
