"""Fit an Ornstein-Uhlenbeck process with a neural SDE by matching moments.

Target: dX = theta (mu - X) dt + sigma dW, X_0 = x0, whose mean and variance are known
in closed form: m(t) = mu + (x0 - mu) e^{-theta t}, v(t) = sigma^2 (1 - e^{-2 theta t})
/ (2 theta). The model is a neural SDE dY = f(t, Y) dt + g(t, Y) o dW (small MLPs,
diagonal noise, positive diffusion), solved with `revdiffrax.Reversible(diffrax.Heun())`
on a `diffrax.VirtualBrownianTree` for each path. The loss compares the model's mean and
standard deviation over a batch of paths with m and sqrt(v) at the observation
times; gradients come from `revdiffrax.ReversibleAdjoint()`, optimisation from optax.

    python -m experiments.neural_sde --quick --out out/neural_sde
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax
import revdiffrax

from .report import machine_info


THETA, MU, SIGMA, X0, T1 = 1.5, 1.0, 0.5, 0.0, 2.0


def ou_moments(ts):
    decay = jnp.exp(-THETA * ts)
    mean = MU + (X0 - MU) * decay
    var = SIGMA**2 * (1 - decay**2) / (2 * THETA)
    return mean, var


class NeuralSDE(eqx.Module):
    drift: eqx.nn.MLP
    diffusion: eqx.nn.MLP

    def __init__(self, width: int, *, key):
        k1, k2 = jr.split(key)
        # Inputs (t, y); scalar state.
        self.drift = eqx.nn.MLP(2, 1, width, depth=1, activation=jnp.tanh, key=k1)
        self.diffusion = eqx.nn.MLP(2, 1, width, depth=1, activation=jnp.tanh, key=k2)


def _drift(t, y, model):
    return model.drift(jnp.concatenate([jnp.asarray(t, y.dtype)[None], y]))


def _diffusion(t, y, model):
    ty = jnp.concatenate([jnp.asarray(t, y.dtype)[None], y])
    g = jax.nn.softplus(model.diffusion(ty))
    return lx.DiagonalLinearOperator(g)


def sample_paths(model, keys, ts, num_steps, adjoint):
    def one(key):
        bm = diffrax.VirtualBrownianTree(
            0.0, T1, tol=T1 / (4 * num_steps), shape=(1,), key=key
        )
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(_drift), diffrax.ControlTerm(_diffusion, bm)
        )
        sol = diffrax.diffeqsolve(
            terms,
            revdiffrax.Reversible(diffrax.Heun()),
            0.0,
            T1,
            T1 / num_steps,
            jnp.array([X0]),
            args=model,
            adjoint=adjoint,
            max_steps=num_steps,
            saveat=diffrax.SaveAt(ts=ts),
        )
        return sol.ys[:, 0]

    return jax.vmap(one)(keys)  # (paths, len(ts))


def moment_loss(model, keys, ts, num_steps, adjoint):
    paths = sample_paths(model, keys, ts, num_steps, adjoint)
    mean, var = ou_moments(ts)
    return _moment_error(paths, mean, var)


def _moment_error(paths, mean, var):
    # Standard deviations rather than variances, so both terms have the same scale.
    m, v = jnp.mean(paths, 0), jnp.var(paths, 0)
    std_error = jnp.sqrt(v + 1e-12) - jnp.sqrt(var)
    return jnp.mean((m - mean) ** 2) + jnp.mean(std_error**2)


def run(quick: bool, seed: int = 0) -> dict:
    cfg = dict(
        width=16,
        num_paths=64 if quick else 256,
        num_steps=20 if quick else 50,
        num_obs=9,
        iters=60 if quick else 500,
        lr=2e-2,
        eval_paths=512 if quick else 2048,
    )
    key = jr.PRNGKey(seed)
    kmodel, ktrain, keval = jr.split(key, 3)
    ts = jnp.linspace(0.0, T1, cfg["num_obs"])
    model = NeuralSDE(cfg["width"], key=kmodel)
    params, static = eqx.partition(model, eqx.is_array)
    optim = optax.adam(cfg["lr"])
    opt_state = optim.init(params)
    adjoint = revdiffrax.ReversibleAdjoint()

    def loss_fn(params, keys):
        model = eqx.combine(params, static)
        return moment_loss(model, keys, ts, cfg["num_steps"], adjoint)

    @jax.jit
    def step(params, opt_state, keys):
        loss, grads = jax.value_and_grad(loss_fn)(params, keys)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params):
        keys = jr.split(keval, cfg["eval_paths"])
        model = eqx.combine(params, static)
        paths = sample_paths(model, keys, ts, cfg["num_steps"], adjoint)
        mean, var = ou_moments(ts)
        return _moment_error(paths, mean, var), jnp.mean(paths, 0), jnp.var(paths, 0)

    loss0, m0, v0 = evaluate(params)
    t_start = time.perf_counter()
    losses = []
    for i in range(cfg["iters"]):
        keys = jr.split(jr.fold_in(ktrain, i), cfg["num_paths"])
        params, opt_state, loss = step(params, opt_state, keys)
        losses.append(float(loss))
    train_time = time.perf_counter() - t_start  # includes the first step's compile
    loss1, m1, v1 = evaluate(params)
    mean, var = ou_moments(ts)

    def as_list(x):
        return [float(v) for v in np.asarray(x)]

    return dict(
        experiment="neural_sde",
        quick=quick,
        seed=seed,
        config=cfg,
        ou=dict(theta=THETA, mu=MU, sigma=SIGMA, x0=X0),
        ts=as_list(ts),
        initial_loss=float(loss0),
        final_loss=float(loss1),
        true_mean=as_list(mean),
        true_var=as_list(var),
        initial_mean=as_list(m0),
        initial_var=as_list(v0),
        learned_mean=as_list(m1),
        learned_var=as_list(v1),
        train_losses=losses,
        train_time_s=train_time,
        machine=machine_info(),
    )


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (< 30 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="out/neural_sde", help="directory for results.json"
    )
    args = parser.parse_args(argv)
    result = run(args.quick, args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"moment loss (eval, {result['config']['eval_paths']} paths) "
        f"{result['initial_loss']:.3e} -> {result['final_loss']:.3e} "
        f"({result['train_time_s']:.1f} s for {len(result['train_losses'])} steps)"
    )
    print("    t   true mean  learned   true var  learned")
    for row in zip(
        result["ts"],
        result["true_mean"],
        result["learned_mean"],
        result["true_var"],
        result["learned_var"],
    ):
        print("  {:4.2f}  {:8.4f}  {:8.4f}  {:8.4f}  {:8.4f}".format(*row))
    return result


if __name__ == "__main__":
    main()
