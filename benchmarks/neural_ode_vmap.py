"""A neural ODE in the style of diffrax's `neural_ode` example, under an adaptive
step size controller: do the reversible solver's step counts, time per training
step and warnings stay those of the base solver as training proceeds (issue 22)?

The example: 256 trajectories of the 2-d oscillator y' = (x_2, -x_1), x = y / (1 + y),
y(0) ~ U(-0.6, 1)^2, saved at 100 times on [0, 10]; the model y' = MLP(y), width 64,
depth 2, softplus; one solve per sample under `jax.vmap`, batch 32;
`Tsit5` with `PIDController(rtol=1e-3, atol=1e-6)`, dt0 = 0.1; float32; adabelief
(learning rate 3e-3) on the full-length series.

The model is trained once, with diffrax's default adjoint through `Tsit5()`. At
several points of that training, every variant below is measured on the same
parameters and batch: accepted and rejected steps (mean over the batch), the loss,
the error of the solutions (the largest over the batch of the relative 2-norm error
over the saved times, against Tsit5 to rtol = 1e-6, atol = 1e-8; and the same at
t1 alone, where the offset is measured),
`sol.stats["parasitic_offset"]` (the largest over the batch), whether
`ReversibleAdjoint` warns (or would: it warns once per compilation), and the median
time of a jitted training step (gradient and update), the variants interleaved.

- `Tsit5 + RCA`: `Tsit5()` with `RecursiveCheckpointAdjoint()` (diffrax's default);
- `Reversible (default)`: `Reversible(Tsit5())` with `ReversibleAdjoint()` (the
  error estimate: the base solver's, for both base steps of each step);
- `Reversible (parasitic_error=True)`: plus the round-trip defect (the default
  before issue 22).

- `Reversible (record)`: `ReversibleAdjoint(step_times="record")`, which records
  the accepted step times (`max_steps` slots per sample) where the default
  recomputes them on the backward pass.

Run: `python -m benchmarks.neural_ode_vmap [--quick] [--steps 300] [--every 50]
[--variants A,B]`; `--memory`: only the compiled temp memory of each variant's
training-step gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import revdiffrax
from revdiffrax._adjoint.parasitic import auto_parasitic_threshold


DTYPE = jnp.float32


def get_data(dataset_size: int, num_times: int, *, key) -> tuple[jax.Array, jax.Array]:
    """diffrax's `neural_ode` example data: `(ts, ys)`, ys of shape
    `(dataset_size, num_times, 2)`."""
    ts = jnp.linspace(0.0, 10.0, num_times, dtype=DTYPE)

    def vector_field(t, y, args):
        x = y / (1 + y)
        return jnp.stack([x[1], -x[0]], axis=-1)

    def one(key):
        y0 = jr.uniform(key, (2,), DTYPE, minval=-0.6, maxval=1)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            jnp.asarray(0.1, DTYPE),
            y0,
            saveat=diffrax.SaveAt(ts=ts),
        )
        return sol.ys

    return ts, jax.vmap(one)(jr.split(key, dataset_size))


class NeuralODE(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, width: int, depth: int, *, key):
        self.mlp = eqx.nn.MLP(
            2, 2, width, depth, activation=jax.nn.softplus, dtype=DTYPE, key=key
        )

    def __call__(
        self, ts, y0, solver, adjoint, rtol: float = 1e-3, atol: float = 1e-6
    ) -> tuple[jax.Array, dict]:
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, mlp: mlp(y)),
            solver,
            ts[0],
            ts[-1],
            ts[1] - ts[0],
            y0,
            args=self.mlp,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(ts=ts),
            adjoint=adjoint,
            max_steps=4096,
        )
        assert sol.ys is not None
        return sol.ys, sol.stats


def variants() -> dict[str, tuple[diffrax.AbstractSolver, diffrax.AbstractAdjoint]]:
    reversible = revdiffrax.ReversibleAdjoint()
    tsit5 = diffrax.Tsit5()
    return {
        "Tsit5 + RCA": (tsit5, diffrax.RecursiveCheckpointAdjoint()),
        "Reversible (default)": (revdiffrax.Reversible(tsit5), reversible),
        "Reversible (parasitic_error=True)": (
            revdiffrax.Reversible(tsit5, parasitic_error=True),
            reversible,
        ),
        # The step times recorded (`max_steps` per sample) rather than recomputed
        # on the backward pass (the default before).
        "Reversible (record)": (
            revdiffrax.Reversible(tsit5),
            revdiffrax.ReversibleAdjoint(step_times="record"),
        ),
    }


def memory(batch: int, num_times: int, names: Sequence[str] | None = None) -> str:
    """The compiled temp memory of one training-step gradient (deterministic) of
    each variant, at the initial parameters."""
    data_key, model_key = jr.split(jr.PRNGKey(5678))
    ts, ys = get_data(batch, num_times, key=data_key)
    model = NeuralODE(64, 2, key=model_key)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    lines = ["| variant | temp memory | / Tsit5 + RCA |", "|---|---|---|"]
    reference = None
    for name, (solver, adjoint) in variants().items():
        if names is not None and name not in names:
            continue

        def loss(p, solver=solver, adjoint=adjoint):
            m = eqx.combine(p, static)
            pred, _ = jax.vmap(lambda y0: m(ts, y0, solver, adjoint))(ys[:, 0])
            return jnp.mean((ys - pred) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore
        reference = reference or temp
        lines.append(f"| {name} | {temp:,} B | {temp / reference:.2f}x |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def would_warn(stats: dict, finals: jax.Array) -> bool:
    """Whether `parasitic_tol="auto"` warns on any of these solves (the warning is
    issued once per compilation, so later points of training are judged here)."""
    controller = diffrax.PIDController(rtol=1e-3, atol=1e-6)
    threshold = jax.vmap(lambda y, n: auto_parasitic_threshold(controller, y, n))(
        finals, stats["num_accepted_steps"]
    )
    return bool(jnp.any(stats["parasitic_offset"] > threshold))


def make_step(solver, adjoint, optim) -> Callable:
    """One training step: `(model, opt_state, ts, ys) -> (model, opt_state, loss,
    stats)`, with the stats of the solves (per sample)."""

    @eqx.filter_value_and_grad(has_aux=True)
    def loss(model, ts, ys):
        pred, stats = jax.vmap(lambda y0: model(ts, y0, solver, adjoint))(ys[:, 0])
        return jnp.mean((ys - pred) ** 2), (stats, pred)

    @eqx.filter_jit
    def step(model, opt_state, ts, ys):
        (value, stats), grads = loss(model, ts, ys)
        updates, opt_state = optim.update(
            grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), opt_state, value, stats

    return step


@eqx.filter_jit
def _reference(model, ts, y0s) -> jax.Array:
    """The solutions to rtol = 1e-6, atol = 1e-8 (Tsit5, float32)."""
    tsit5, rca = diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint()
    solve = lambda y0: model(ts, y0, tsit5, rca, rtol=1e-6, atol=1e-8)[0]
    return jax.vmap(solve)(y0s)


def relative_error(pred: jax.Array, reference: jax.Array) -> float:
    """The largest over the batch of the relative 2-norm error over the saved
    times."""
    axes = tuple(range(1, pred.ndim))
    error = jnp.sqrt(jnp.sum((pred - reference) ** 2, axis=axes))
    return float(jnp.max(error / jnp.sqrt(jnp.sum(reference**2, axis=axes))))


def measure(
    steps: dict[str, Callable], model, opt_state, ts, ys, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per variant: the solves' statistics, the loss, whether it warned, and the
    median time of a training step (variants interleaved, after a warm-up)."""
    out: dict[str, dict[str, Any]] = {}
    reference = _reference(model, ts, ys[:, 0])
    for name, step in steps.items():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            _, _, value, (stats, pred) = jax.block_until_ready(
                step(model, opt_state, ts, ys)
            )
        warned = any(
            issubclass(w.category, revdiffrax.ParasiticModeWarning) for w in record
        )
        offset = stats.get("parasitic_offset")
        warned = warned or (offset is not None and would_warn(stats, pred[:, -1]))
        out[name] = dict(
            accepted=float(jnp.mean(stats["num_accepted_steps"])),
            rejected=float(jnp.mean(stats["num_rejected_steps"])),
            loss=float(value),
            offset=None if offset is None else float(jnp.max(offset)),
            error=relative_error(pred, reference),
            error_t1=relative_error(pred[:, -1], reference[:, -1]),
            warned=warned,
            times=[],
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", revdiffrax.ParasiticModeWarning)
        for _ in range(repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(step(model, opt_state, ts, ys))
                out[name]["times"].append(time.perf_counter() - start)
    for row in out.values():
        row["time"] = statistics.median(row.pop("times"))
    return out


def run(
    *,
    train_steps: int,
    every: int,
    batch: int,
    dataset_size: int,
    num_times: int,
    repeats: int,
    names: Sequence[str] | None = None,
    seed: int = 5678,
) -> list[dict[str, Any]]:
    data_key, model_key, loader_key = jr.split(jr.PRNGKey(seed), 3)
    ts, ys = get_data(dataset_size, num_times, key=data_key)
    model = NeuralODE(64, 2, key=model_key)
    optim = optax.adabelief(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    chosen = {k: v for k, v in variants().items() if names is None or k in names}
    steps = {name: make_step(s, a, optim) for name, (s, a) in chosen.items()}
    train = steps.get("Tsit5 + RCA") or make_step(*variants()["Tsit5 + RCA"], optim)
    rows = []
    for i in range(train_steps + 1):
        batch_ys = ys[jr.choice(jr.fold_in(loader_key, i), dataset_size, (batch,))]
        if i % every == 0:
            row = measure(steps, model, opt_state, ts, batch_ys, repeats)
            rows.append({"step": i, **row})
        if i < train_steps:
            model, opt_state, _, _ = train(model, opt_state, ts, batch_ys)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    names = [k for k in rows[0] if k != "step"]
    base = "Tsit5 + RCA"
    lines = [
        "| training step | variant | accepted | rejected | loss | error | error at t1 "
        "| parasitic_offset | warns | time per step | vs Tsit5 + RCA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name in names:
            r = row[name]
            offset = "-" if r["offset"] is None else f"{r['offset']:.1e}"
            ratio = f"{r['time'] / row[base]['time']:.2f}x" if base in row else "-"
            lines.append(
                f"| {row['step']} | {name} | {r['accepted']:.1f} | "
                f"{r['rejected']:.1f} | {r['loss']:.5f} | {r['error']:.1e} | "
                f"{r['error_t1']:.1e} | "
                f"{offset} | "
                f"{'yes' if r['warned'] else 'no'} | {r['time'] * 1e3:.1f} ms | "
                f"{ratio} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only the compiled temp memory of each variant's gradient",
    )
    parser.add_argument("--variants", help="comma-separated (default: all)")
    options = parser.parse_args(argv)
    names = None if options.variants is None else options.variants.split(",")
    if options.memory:
        batch, num_times = (4, 20) if options.quick else (32, 100)
        print(memory(batch, num_times, names))
        return []
    if options.quick:
        sizes = dict(train_steps=2, every=2, batch=4, dataset_size=8, num_times=20)
        sizes["repeats"] = 1
    else:
        sizes = dict(
            train_steps=options.steps,
            every=options.every,
            batch=32,
            dataset_size=256,
            num_times=100,
            repeats=options.repeats,
        )
    rows = run(**sizes, names=names)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
