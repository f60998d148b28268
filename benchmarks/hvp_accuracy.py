"""Accuracy of Hessian-vector products through `ReversibleAdjoint`: the worst
relative error per solver family against `diffrax.DirectAdjoint()` through the same
solver, in float64, over the configurations of issue 23, item 1.

For every solver family and configuration, the gradient of a loss and its
derivative along a tangent, `jax.jvp(jax.grad(loss), (params,), (v,))`
(forward-over-reverse), are computed with `ReversibleAdjoint()` and with
`diffrax.DirectAdjoint()`, both jitted. Both differentiate the same discrete solve,
so they differ by rounding only. Two relative errors of the product:

- norm-wise: `||ours - ref||_2 / ||ref||_2` over all leaves, flattened together;
- leafwise: the largest over the leaves of `max|ours - ref| / max|ref|`, so that a
  small leaf (e.g. the tangent in `args`) is not hidden by a large one.

Configurations (a loss of the saved states of a small neural ODE
`y' = tanh(mlp(y)) cos t - a y`, y in R^2, t in [0, 1.5], dt0 = 0.1; the parameters
are `(y0, a, mlp)`):

- constant and adaptive (`PIDController`) steps, each with `SaveAt(t1)`,
  `SaveAt(ts)` and `SaveAt(steps)`, a tangent in every parameter;
- tangents in `y0` only, in `args` only, in the vector field's weights only;
- `ReversibleAdjoint(checkpoint_every=3)` (adaptive where the solver has an error
  estimate);
- `jax.vmap` over three (parameter, tangent) pairs;
- `jax.hessian` (`jacfwd` of `jacrev`) with respect to `(y0, a)` as one vector;
- an SDE (drift and diagonal diffusion, `VirtualBrownianTree`) and a CDE (a
  `ControlTerm` driven by the `LinearInterpolation` of data; the tangent is in
  the data and in `args`), constant steps.

`SemiImplicitEuler` needs a partitioned system: there the state is `(q, p)` with
`q' = tanh(mlp(p)) cos t`, `p' = -a q`. A configuration that diffrax itself cannot
solve with this solver (e.g. adaptive steps without an error estimate, an SDE with
a solver that takes one term) is reported as not applicable: `DirectAdjoint`'s
solve raises. One where `DirectAdjoint` works and `ReversibleAdjoint` raises is
reported as refused, with its error: none should be.

Usage: `python -m benchmarks.hvp_accuracy [--quick] [--only SUBSTRING] [--out DIR]`
(prints markdown tables; `--out` writes `hvp_accuracy_<backend>.md` there).
`--quick`: one family and one configuration, for the smoke test;
`--families A,B` and `--configs SUBSTRING` select; `--json PATH` saves the results
and `--combine PATH...` reports those of several runs, from their `--json` files
or, for a run stopped early, its stderr (a later file's result replaces an earlier
one's); `--init-cost`: only the cost of the forward pass's
repeated `solver.init` (compiled flops and memory, interleaved times of a gradient
with and without it).
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import revdiffrax
from benchmarks.hvp_problems import (
    ALF,
    cde_loss,
    CDE_PARAMS,
    CDE_TANGENT,
    hvp,
    ode_loss,
    PARAMS,
    PARAMS_QP,
    pid,
    RTOL,
    SAVEATS,
    sde_loss,
    SDE_PARAMS,
    SDE_TANGENT,
    TANGENT,
    TANGENT_QP,
)


@dataclasses.dataclass(frozen=True)
class Family:
    """A solver, the relative tolerance of its adaptive runs (10 to 30 steps), and
    whether it takes a partitioned system `(term_q, term_p)`."""

    solver: diffrax.AbstractSolver
    rtol: float = 1e-3
    partitioned: bool = False


FAMILIES = {
    "Reversible(Euler)": Family(revdiffrax.Reversible(diffrax.Euler())),
    "Reversible(Midpoint)": Family(revdiffrax.Reversible(diffrax.Midpoint())),
    "Reversible(Heun)": Family(revdiffrax.Reversible(diffrax.Heun(), coupling=0.9)),
    "Reversible(Tsit5)": Family(revdiffrax.Reversible(diffrax.Tsit5()), 1e-8),
    "Reversible(Dopri5)": Family(revdiffrax.Reversible(diffrax.Dopri5()), 1e-8),
    "ReversibleHeun": Family(revdiffrax.ReversibleHeun()),
    "AsynchronousLeapfrog": Family(ALF),
    "LeapfrogMidpoint": Family(revdiffrax.LeapfrogMidpoint()),
    "SymmetricComposition(ALF, 4)": Family(
        revdiffrax.SymmetricComposition(ALF, order=4), 1e-4
    ),
    "SemiImplicitEuler": Family(revdiffrax.SemiImplicitEuler(), partitioned=True),
}
# `--quick`: one family and one configuration (the smoke test).
QUICK = ("Reversible(Midpoint)", "constant, SaveAt(ts)")


def _only(tangent, index: int):
    """`tangent` with every top-level entry but `index` zeroed."""
    return tuple(
        t if i == index else jax.tree_util.tree_map(jnp.zeros_like, t)
        for i, t in enumerate(tangent)
    )


def configurations(family: Family) -> dict[str, Callable]:
    """The configurations of one family: each is `adjoint -> (gradient, product)`
    (for `jax.hessian`: `(Hessian, Hessian)`)."""
    solver = family.solver
    params, tangent = (
        (PARAMS_QP, TANGENT_QP) if family.partitioned else (PARAMS, TANGENT)
    )
    const = diffrax.ConstantStepSize()
    configs = {}
    for name, saveat in SAVEATS.items():
        configs[f"constant, SaveAt({name})"] = (
            lambda adj, s=saveat: hvp(
                ode_loss, params, tangent, adj, solver, const, s
            )
        )  # fmt: skip
    for name, saveat in SAVEATS.items():
        configs[f"adaptive, SaveAt({name})"] = (
            lambda adj, s=saveat: hvp(
                ode_loss, params, tangent, adj, solver, pid(family.rtol), s
            )
        )  # fmt: skip

    def one_leaf_tangents(adjoint):
        # The three products in one compilation (vmapped), reported one by one.
        vs = [_only(tangent, i) for i in range(3)]
        stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *vs)

        def one(v):
            return hvp(ode_loss, params, v, adjoint, solver, const, SAVEATS["ts"])

        out = jax.vmap(one)(stacked)
        return {
            f"tangent in {name} only": jax.tree_util.tree_map(lambda x: x[i], out)
            for i, name in enumerate(["y0", "args", "weights"])
        }

    configs["tangent in one input only"] = one_leaf_tangents

    def checkpointed(adjoint):
        if isinstance(adjoint, revdiffrax.ReversibleAdjoint):
            adjoint = revdiffrax.ReversibleAdjoint(checkpoint_every=3)
        controller = pid(family.rtol) if _adaptive(solver) else const
        return hvp(ode_loss, params, tangent, adjoint, solver, controller,
                   SAVEATS["ts"])  # fmt: skip

    configs["checkpoint_every=3"] = checkpointed

    def vmapped(adjoint):
        ps = jax.tree_util.tree_map(lambda x: jnp.stack([x, x, 1.1 * x]), params)
        vs = jax.tree_util.tree_map(lambda x: jnp.stack([x, -2 * x, x**2]), tangent)

        def one(p, v):
            return hvp(ode_loss, p, v, adjoint, solver, const, SAVEATS["ts"])

        return jax.vmap(one)(ps, vs)

    configs["vmap over 3 products"] = vmapped

    def hessian(adjoint):
        y0, a, weights = params
        flat_y0, unflatten = jax.flatten_util.ravel_pytree(y0)

        def loss(theta):
            p = (unflatten(theta[:-1]), theta[-1], weights)
            return ode_loss(p, adjoint, solver, const, SAVEATS["t1"])

        theta = jnp.concatenate([flat_y0, a[None]])
        h = jax.jit(jax.hessian(loss))(theta)
        return h, h

    configs["jax.hessian in (y0, args)"] = hessian
    configs["SDE"] = lambda adj: hvp(sde_loss, SDE_PARAMS, SDE_TANGENT, adj, solver)
    configs["CDE"] = lambda adj: hvp(cde_loss, CDE_PARAMS, CDE_TANGENT, adj, solver)
    return configs


def _adaptive(solver) -> bool:
    """Whether `solver` has an error estimate (`Reversible`: if its base has)."""
    if isinstance(solver, revdiffrax.Reversible):
        return isinstance(solver.solver, diffrax.AbstractAdaptiveSolver)
    return isinstance(solver, diffrax.AbstractAdaptiveSolver)


def _flat(tree) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


def norm_rel_err(x, ref) -> float:
    a, b = _flat(x), _flat(ref)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def leafwise_rel_err(x, ref) -> float:
    """max over the leaves of max|x - ref| / max|ref| (a zero leaf of `ref` must be
    matched exactly)."""
    err = 0.0
    for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(ref)):
        u, v = np.asarray(u), np.asarray(v)
        scale = float(np.max(np.abs(v)))
        diff = float(np.max(np.abs(u - v)))
        err = max(err, diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf))
    return err


@dataclasses.dataclass
class Result:
    family: str
    config: str
    status: str  # "ok", "n/a" or "refused"
    norm: float = np.nan
    leafwise: float = np.nan
    grad: float = np.nan
    note: str = ""


def run_one(family_name: str, config: str, fn: Callable) -> list[Result]:
    """The errors of one configuration (or of the configurations it groups)."""
    try:
        ref = jax.block_until_ready(fn(diffrax.DirectAdjoint()))
    except Exception as e:  # diffrax cannot solve this configuration
        note = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:90]}"
        return [Result(family_name, config, "n/a", note=note)]
    try:
        ours = jax.block_until_ready(fn(revdiffrax.ReversibleAdjoint()))
    except Exception as e:
        note = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
        return [Result(family_name, config, "refused", note=note)]
    if not isinstance(ref, dict):
        ref, ours = {config: ref}, {config: ours}
    results = []
    for name, (grad_ref, product_ref) in ref.items():
        grad, product = ours[name]
        assert np.all(np.isfinite(_flat(product_ref))), (family_name, name)
        results.append(
            Result(
                family_name,
                name,
                "ok",
                norm=norm_rel_err(product, product_ref),
                leafwise=leafwise_rel_err(product, product_ref),
                grad=leafwise_rel_err(grad, grad_ref),
            )
        )
    return results


def summary_table(results: list[Result]) -> list[str]:
    lines = [
        "| solver family | configurations | worst norm-wise rel. error | attained at "
        "| worst leafwise rel. error | attained at | worst gradient error |"
        " not applicable | refused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family in dict.fromkeys(r.family for r in results):
        rows = [r for r in results if r.family == family]
        ok = [r for r in rows if r.status == "ok"]
        na = [r.config for r in rows if r.status == "n/a"]
        refused = [r.config for r in rows if r.status == "refused"]
        worst_norm = max(ok, key=lambda r: r.norm)
        worst_leaf = max(ok, key=lambda r: r.leafwise)
        grads = [r.grad for r in ok if np.isfinite(r.grad)]
        worst_grad = f"{max(grads):.1e}" if grads else "-"
        lines.append(
            f"| {family} | {len(ok)} | {worst_norm.norm:.1e} | {worst_norm.config} "
            f"| {worst_leaf.leafwise:.1e} | {worst_leaf.config} | {worst_grad} "
            f"| {'; '.join(na) or '-'} | {'; '.join(refused) or '-'} |"
        )
    return lines


def matrix_table(results: list[Result]) -> list[str]:
    """Leafwise errors, configurations x families."""
    families = list(dict.fromkeys(r.family for r in results))
    configs = list(dict.fromkeys(r.config for r in results))
    cell = {(r.family, r.config): r for r in results}
    lines = [
        "| configuration | " + " | ".join(families) + " |",
        "|---|" + "---|" * len(families),
    ]
    for config in configs:
        entries = []
        for family in families:
            r = cell.get((family, config))
            if r is None:  # a group of configurations that failed as a whole
                entries.append("-")
            else:
                entries.append(f"{r.leafwise:.0e}" if r.status == "ok" else r.status)
        lines.append(f"| {config} | " + " | ".join(entries) + " |")
    return lines


def compute(names: list[str], only_configs: str = "") -> tuple[list[Result], float]:
    """The results of the families `names` (of their configurations whose name
    contains `only_configs`), and the seconds they took."""
    start = time.perf_counter()
    results = []
    for name in names:
        for config, fn in configurations(FAMILIES[name]).items():
            if only_configs not in config:
                continue
            for result in run_one(name, config, fn):
                results.append(result)
                print(log_line(result), file=sys.stderr, flush=True)
    return results, time.perf_counter() - start


def log_line(r: Result) -> str:
    """One result as a progress line (`from_log` reads it back)."""
    return (
        f"{r.family:30s} {r.config:28s} {r.status:8s} "
        f"{r.norm:.1e} {r.leafwise:.1e} {r.grad:.1e} {r.note}"
    )


def from_log(path: str) -> list[Result]:
    """The results in the progress lines of a run's stderr (of a run stopped before
    it wrote its `--json`); lines from before the gradient error was logged have
    none (NaN)."""
    results = []
    with open(path) as f:
        for line in f:
            family, config = line[:30].strip(), line[31:59].strip()
            rest = line[60:].split(maxsplit=1)
            if family not in FAMILIES or not rest:
                continue  # a warning, not a result
            status, numbers = rest[0], []
            words = rest[1].split(" ") if len(rest) > 1 else []
            while words and len(numbers) < 3:
                try:
                    numbers.append(float(words[0]))
                except ValueError:
                    break
                words.pop(0)
            norm, leafwise, grad = (numbers + [np.nan] * 3)[:3]
            note = " ".join(words).strip()
            results.append(Result(family, config, status, norm, leafwise, grad, note))
    return results


def report(results: list[Result], elapsed: float | None) -> list[str]:
    ok = [r for r in results if r.status == "ok"]
    worst = max(ok, key=lambda r: np.nanmax([r.leafwise, r.grad]))
    took = "" if elapsed is None else f" in {elapsed:.0f} s (compilation, mostly)"
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"diffrax {diffrax.__version__}, backend {jax.default_backend()}, float64. "
        f"{len(ok)} configurations compared{took}.",
        "",
        *summary_table(results),
        "",
        f"Worst over all: {np.nanmax([worst.leafwise, worst.grad]):.1e} "
        f"({worst.family}, {worst.config}); every error <= {RTOL:g}: "
        f"{all(np.nanmax([r.leafwise, r.grad]) <= RTOL for r in ok)}. Refused: "
        f"{sum(r.status == 'refused' for r in results)}.",
        "",
        "Leafwise relative error of the product, per configuration ('n/a': "
        "`DirectAdjoint`'s solve raises too):",
        "",
        *matrix_table(results),
    ]
    grouped = {}  # (family, status, why) -> configurations
    for r in results:
        if r.status != "ok":
            grouped.setdefault((r.family, r.status, r.note), []).append(r.config)
    notes = [f"- {family}: {'; '.join(configs)}: {status}: {why}"
             for (family, status, why), configs in grouped.items()]  # fmt: skip
    if notes:
        lines += ["", "Why not applicable or refused:", "", *notes]
    return lines


def _reinit_off():
    """A context in which the forward pass does not remake the initial solver state
    (`_with_inputs(reinit=False)`): what it did before second derivatives."""
    import contextlib

    from revdiffrax._adjoint import forward

    original = forward._with_inputs

    def without(init_state, inputs, solver, reinit):
        return original(init_state, inputs, solver, reinit=False)

    @contextlib.contextmanager
    def context():
        forward._with_inputs = without
        try:
            yield
        finally:
            forward._with_inputs = original

    return context()


def init_cost(repeats: int = 21) -> list[str]:
    """The cost, per gradient, of the `solver.init` that the forward pass now
    repeats so that the initial solver state carries tangents: compiled flops and
    interleaved wall times of one gradient with and without it, on cheap workloads
    (the neural ODE above, 15 constant steps, `SaveAt(ts)`)."""
    lines = [
        "| solver | flops with / without | temp bytes with / without "
        "| time with / without (median of interleaved runs) |",
        "|---|---|---|---|",
    ]
    for name in ["Reversible(Tsit5)", "AsynchronousLeapfrog", "ReversibleHeun"]:
        solver = FAMILIES[name].solver

        def loss(p):
            return ode_loss(
                p, revdiffrax.ReversibleAdjoint(), solver,
                diffrax.ConstantStepSize(), SAVEATS["ts"],
            )  # fmt: skip

        # `diffeqsolve` is jitted: without clearing its cache, the second
        # compilation would reuse the first one's trace.
        jax.clear_caches()
        with_init = jax.jit(jax.grad(loss)).lower(PARAMS).compile()
        jax.clear_caches()
        with _reinit_off():
            without = jax.jit(jax.grad(loss)).lower(PARAMS).compile()
        stats = []
        for compiled in (with_init, without):
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            memory = compiled.memory_analysis()
            assert memory is not None
            stats.append((cost["flops"], memory.temp_size_in_bytes))
        times = ([], [])
        jax.block_until_ready((with_init(PARAMS), without(PARAMS)))
        for _ in range(repeats):
            for i, compiled in enumerate((with_init, without)):
                start = time.perf_counter()
                jax.block_until_ready(compiled(PARAMS))
                times[i].append(time.perf_counter() - start)
        ratio = float(np.median(times[0]) / np.median(times[1]))
        lines.append(
            f"| {name} | {stats[0][0]:.0f} / {stats[1][0]:.0f} "
            f"| {stats[0][1]} / {stats[1][1]} | {ratio:.3f} |"
        )
    return lines


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="families containing this")
    parser.add_argument("--families", default=None, help="comma-separated names")
    parser.add_argument("--configs", default="", help="configurations containing")
    parser.add_argument("--out", default=None, help="write the report here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--init-cost", action="store_true", help="only time the repeated init"
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        help="report the results of earlier runs: their --json files, or the stderr "
        "of runs stopped before writing one; a later file's result replaces an "
        "earlier one's",
    )
    args = parser.parse_args(argv)
    command = "python -m benchmarks.hvp_accuracy " + " ".join(
        repr(a) if " " in a else a for a in (argv or sys.argv[1:])
    )
    commands = [command]
    if args.init_cost:
        lines = [
            "The cost of remaking the initial solver state in the forward pass (one "
            "`solver.init` per gradient, so that it carries the tangents of `y0` and "
            f"`args`), one gradient (load {os.getloadavg()[0]:.1f}):",
            "",
            *init_cost(),
        ]
        print("\n".join(lines), flush=True)
        return []
    if args.combine is not None:
        combined, elapsed, commands = {}, None, []
        for path in args.combine:
            if path.endswith(".json"):
                with open(path) as f:
                    saved = json.load(f)
                loaded = [Result(**r) for r in saved["results"]]
                commands.append(saved["command"])
            else:
                loaded = from_log(path)
            combined.update({(r.family, r.config): r for r in loaded})
        commands.append(command)
        results = list(combined.values())
    else:
        names = [n for n in FAMILIES if args.only.lower() in n.lower()]
        if args.families is not None:
            # Commas between names; "SymmetricComposition(ALF, 4)" has ", " in it.
            names = re.split(r",(?! )", args.families)
        configs = args.configs
        if args.quick:
            names, configs = [QUICK[0]], QUICK[1]
        results, elapsed = compute(names, configs)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    results=[dataclasses.asdict(r) for r in results],
                    elapsed=elapsed,
                    command=command,
                ),
                f,
            )
    results.sort(key=lambda r: list(FAMILIES).index(r.family))  # stable
    lines = report(results, elapsed)
    print("\n".join(lines), flush=True)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"hvp_accuracy_{jax.default_backend()}.md")
        with open(path, "w") as f:
            backend = jax.default_backend()
            f.write(f"# Accuracy of Hessian-vector products ({backend})\n\n")
            f.write("Commands: " + ", then ".join(f"`{c.strip()}`" for c in commands))
            f.write(".\n\n")
            f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
