"""Neural CDE classifying irregularly sampled spirals, trained with ReversibleAdjoint.

Each sample is a spiral observed at its own random, irregular times; the label is its
direction (anticlockwise = 1, clockwise = 0). The observations (time, x, y) are
turned into a continuous control with `diffrax.backward_hermite_coefficients` and
`diffrax.CubicInterpolation`; the hidden state solves dz = f(z) dX with
`revdiffrax.Reversible(diffrax.Heun())` and the readout of z(1) gives the class.
Training uses optax and `revdiffrax.ReversibleAdjoint()`. The compiled temp memory and
the time of one training step are compared with `diffrax.RecursiveCheckpointAdjoint`
(skipped with `--quick` unless `--compare` is given, to keep quick runs short).

    python -m experiments.neural_cde --quick --out out/neural_cde
    python -m experiments.neural_cde --out out/neural_cde   # full run, with comparison
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import revdiffrax
from jaxtyping import PyTree

from .harness import compile_timed
from .report import fmt_bytes, machine_info


def make_spirals(key, num_samples: int, num_obs: int):
    """Irregularly sampled spirals: times (B, L), values (B, L, 3), labels (B,)."""
    kt, kl, kphase, knoise, kr = jr.split(key, 5)
    # Per-sample random observation times in [0, 1], first and last fixed.
    ts = jnp.sort(jr.uniform(kt, (num_samples, num_obs)), axis=1)
    ts = ts.at[:, 0].set(0.0).at[:, -1].set(1.0)
    labels = jr.bernoulli(kl, 0.5, (num_samples,)).astype(jnp.float64)
    direction = 2 * labels - 1  # +1 anticlockwise, -1 clockwise
    phase = jr.uniform(kphase, (num_samples, 1), maxval=2 * jnp.pi)
    r0 = jr.uniform(kr, (num_samples, 1), minval=0.5, maxval=1.0)
    angle = phase + direction[:, None] * 2 * jnp.pi * ts
    radius = r0 * (1 - 0.5 * ts)
    x = radius * jnp.cos(angle)
    y = radius * jnp.sin(angle)
    values = jnp.stack([ts, x, y], axis=-1)
    values = values + 0.02 * jr.normal(knoise, values.shape).at[..., 0].set(0.0)
    return ts, values, labels


class NeuralCDE(eqx.Module):
    initial: eqx.nn.Linear
    field: eqx.nn.MLP
    readout: eqx.nn.Linear
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(self, channels: int, hidden: int, width: int, *, key):
        k1, k2, k3 = jr.split(key, 3)
        self.initial = eqx.nn.Linear(channels, hidden, key=k1)
        self.field = eqx.nn.MLP(
            hidden,
            hidden * channels,
            width,
            depth=1,
            activation=jax.nn.softplus,
            final_activation=jnp.tanh,
            key=k2,
        )
        self.readout = eqx.nn.Linear(hidden, 1, key=k3)
        self.hidden, self.channels = hidden, channels


def _field(t, z, model):
    return model.field(z).reshape(model.hidden, model.channels)


def logit(model, ts, values, adjoint, num_steps):
    coeffs = diffrax.backward_hermite_coefficients(ts, values)
    control = diffrax.CubicInterpolation(ts, coeffs)
    z0 = model.initial(control.evaluate(ts[0]))
    sol = diffrax.diffeqsolve(
        diffrax.ControlTerm(_field, control),
        revdiffrax.Reversible(diffrax.Heun()),
        ts[0],
        ts[-1],
        (ts[-1] - ts[0]) / num_steps,
        z0,
        args=model,
        adjoint=adjoint,
        max_steps=num_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    return model.readout(sol.ys[-1])[0]


def make_step(static, optim, adjoint, num_steps):
    def loss_fn(params, ts, values, labels):
        model = eqx.combine(params, static)
        logits = jax.vmap(lambda t, v: logit(model, t, v, adjoint, num_steps))(
            ts, values
        )
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
        acc = jnp.mean((logits > 0) == (labels > 0.5))
        return loss, acc

    @jax.jit
    def step(params, opt_state, ts, values, labels):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, ts, values, labels
        )
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return step, jax.jit(loss_fn)


def _time_call(f: Callable, *args: Any, reps: int) -> float:
    """Mean time of `reps` back-to-back calls of `f`, after a warm-up call."""
    out = f(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def _config(quick: bool) -> dict:
    return dict(
        num_train=64 if quick else 512,
        num_test=128 if quick else 512,
        num_obs=24 if quick else 48,
        hidden=8,
        width=32,
        num_steps=16 if quick else 32,
        iters=30 if quick else 300,
        lr=3e-2,
        batch=64 if quick else 128,
        timing_reps=2 if quick else 10,
    )


def _compile_steps(
    static: PyTree, optim, cfg: dict, compare: bool, *args: Any
) -> tuple[dict, dict]:
    """Compile the training step for each adjoint (the reversible one trains, both
    give the compiled temp memory and the time of one step)."""
    comparison, compiled = {}, {}
    adjoints = [("reversible", revdiffrax.ReversibleAdjoint())]
    if compare:
        adjoints.append(("checkpoint", diffrax.RecursiveCheckpointAdjoint()))
    for name, adjoint in adjoints:
        step, _ = make_step(static, optim, adjoint, cfg["num_steps"])
        compiled[name], compile_s, temp = compile_timed(step, *args)
        comparison[name] = dict(temp_bytes=temp, compile_s=compile_s)
    return comparison, compiled


def run(quick: bool, seed: int = 0, compare: bool | None = None) -> dict:
    """Train and evaluate; `compare` (default: not in quick mode) also compiles and
    times the RecursiveCheckpointAdjoint training step for the comparison."""
    if compare is None:
        compare = not quick
    cfg = _config(quick)
    key = jr.PRNGKey(seed)
    kdata, ktest, kmodel, kbatch = jr.split(key, 4)
    train = make_spirals(kdata, cfg["num_train"], cfg["num_obs"])
    test = make_spirals(ktest, cfg["num_test"], cfg["num_obs"])
    model = NeuralCDE(3, cfg["hidden"], cfg["width"], key=kmodel)
    params, static = eqx.partition(model, eqx.is_array)
    optim = optax.adam(cfg["lr"])
    opt_state = optim.init(params)
    batch = tuple(a[: cfg["batch"]] for a in train)
    comparison, compiled = _compile_steps(
        static, optim, cfg, compare, params, opt_state, *batch
    )
    step = compiled["reversible"]
    _, evaluate = make_step(
        static, optim, revdiffrax.ReversibleAdjoint(), cfg["num_steps"]
    )

    test_loss0, test_acc0 = (float(x) for x in evaluate(params, *test))
    t_start = time.perf_counter()
    losses = []
    for i in range(cfg["iters"]):
        idx = jr.choice(
            jr.fold_in(kbatch, i), cfg["num_train"], (cfg["batch"],), replace=False
        )
        params, opt_state, loss, _ = step(params, opt_state, *(a[idx] for a in train))
        losses.append(float(loss))
    train_time = time.perf_counter() - t_start
    test_loss, test_acc = (float(x) for x in evaluate(params, *test))
    for name in comparison:
        comparison[name]["step_s"] = _time_call(
            compiled[name], params, opt_state, *batch, reps=cfg["timing_reps"]
        )

    return dict(
        experiment="neural_cde",
        quick=quick,
        seed=seed,
        config=cfg,
        initial_test_loss=test_loss0,
        initial_test_accuracy=test_acc0,
        final_test_loss=test_loss,
        final_test_accuracy=test_acc,
        train_losses=losses,
        train_time_s=train_time,
        comparison=comparison,
        machine=machine_info(),
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (< 30 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also compile/time RecursiveCheckpointAdjoint (default: unless --quick)",
    )
    parser.add_argument(
        "--out", default="out/neural_cde", help="directory for results.json"
    )
    args = parser.parse_args(argv)
    result = run(args.quick, args.seed, args.compare)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"test accuracy {result['initial_test_accuracy']:.3f} -> "
        f"{result['final_test_accuracy']:.3f}, test loss "
        f"{result['initial_test_loss']:.4f} "
        f"-> {result['final_test_loss']:.4f} ({result['train_time_s']:.1f} s for "
        f"{len(result['train_losses'])} training steps)"
    )
    for name, row in result["comparison"].items():
        print(
            f"{name:>10}: temp memory {fmt_bytes(row['temp_bytes'])}, "
            f"train step {1e3 * row['step_s']:.1f} ms, compile {row['compile_s']:.1f} s"
        )
    return result


if __name__ == "__main__":
    main()
