"""Training one model on a `Problem` with one adjoint, and what is recorded about it.

For every run we record the training time (compilation excluded), the compile time,
the compiled temp memory of the jitted train step, the process peak RSS, the loss
curve and, for the reversible adjoint, the reconstruction drift of one gradient of
the trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import revdiffrax
from jaxtyping import PyTree

from .harness import (
    compile_step,
    CompiledStep,
    peak_rss_mb,
    timed_training,
    TrainingLog,
)
from .model import VectorField
from .problem import Problem
from .solvers import make_adjoint, make_solver


@dataclasses.dataclass
class RunConfig:
    """One training run: adjoint, solver and optimiser settings, seed."""

    adjoint: str
    solver: str
    checkpoints: int | None = None
    baseline_solver: str = "reversible"  # "reversible" or "base"
    coupling: float = 0.999
    iters: int = 100
    seed: int = 0
    lr: float = 1e-2
    weight_decay: float = 1e-5
    width: int = 10

    @property
    def reversible_solver(self) -> bool:
        return self.adjoint == "reversible" or self.baseline_solver == "reversible"

    @property
    def label(self) -> str:
        if self.adjoint == "checkpoint":
            name = f"checkpoint({self.checkpoints})"
        else:
            name = self.adjoint
        if not self.reversible_solver:
            name += " [base solver]"
        return name

    @property
    def solver_label(self) -> str:
        if self.reversible_solver:
            return f"Reversible({self.solver}, {self.coupling})"
        return self.solver


def _mse(problem: Problem, solver, adjoint, static: PyTree) -> Callable:
    """params -> (MSE of the prediction against the data, accepted steps)."""
    ys_data = jnp.asarray(problem.ys)

    def loss_fn(params):
        pred, nsteps = problem.predict(eqx.combine(params, static), solver, adjoint)
        return jnp.mean((pred - ys_data) ** 2), nsteps

    return loss_fn


def final_drift(
    problem: Problem, solver: diffrax.AbstractSolver, static: PyTree, params: PyTree
) -> float | None:
    """Relative error of the y0 rebuilt by the reversible backward pass, for one
    gradient of the trained model (not timed): how much reconstruction drift the
    gradient suffered."""
    drifts: list = []
    adjoint = revdiffrax.ReversibleAdjoint(drift_callback=drifts.append)
    loss_fn = _mse(problem, solver, adjoint, static)
    jax.block_until_ready(jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(params))
    jax.effects_barrier()
    return float(np.max(np.asarray(drifts[-1]))) if drifts else None


def _final_prediction(
    problem: Problem, solver: diffrax.AbstractSolver, static: PyTree, params: PyTree
) -> tuple[np.ndarray, float]:
    """The trained model's prediction and loss, from a plain forward solve."""
    ys_data = jnp.asarray(problem.ys)

    @jax.jit
    def predict(params):
        pred, _ = problem.predict(
            eqx.combine(params, static), solver, diffrax.RecursiveCheckpointAdjoint()
        )
        return pred, jnp.mean((pred - ys_data) ** 2)

    pred, loss = jax.device_get(predict(params))
    return pred, float(loss)


def _result(
    problem: Problem,
    cfg: RunConfig,
    compiled: CompiledStep,
    log: TrainingLog,
    pred: np.ndarray,
    final_loss: float,
    drift: float | None,
) -> dict:
    losses, steps, iters = log.losses, log.aux, max(cfg.iters, 1)
    return dict(
        experiment=problem.name,
        adjoint=cfg.adjoint,
        label=cfg.label,
        checkpoints=cfg.checkpoints,
        solver=cfg.solver_label,
        base_solver=cfg.solver,
        coupling=cfg.coupling,
        seed=cfg.seed,
        iters=cfg.iters,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        width=cfg.width,
        train_time_s=log.train_s,
        time_per_iter_s=log.train_s / iters,
        # Robust to other load on the machine (intermittent contention).
        median_iter_s=float(np.median(log.iter_times)) if log.iter_times else None,
        train_cpu_s=log.cpu_s,
        cpu_per_iter_s=log.cpu_s / iters,
        compile_time_s=compiled.compile_s,
        warmup_call_s=compiled.warmup_s,
        temp_bytes=compiled.temp_bytes,
        peak_rss_mb=peak_rss_mb(),
        initial_loss=losses[0] if losses else None,
        final_loss=final_loss,
        min_loss=min(losses) if losses else None,
        mean_accepted_steps=float(np.mean(steps)) if steps else None,
        final_accepted_steps=int(steps[-1]) if steps else None,
        reconstruction_drift=drift,
        losses=losses,
        iter_times=log.iter_times,
        prediction=np.asarray(pred).tolist(),
    )


def train(
    problem: Problem,
    cfg: RunConfig,
    *,
    progress: bool = True,
    measure_drift: bool = True,
) -> dict:
    """Train one model; returns a JSON-serialisable result dict."""
    solver = make_solver(
        cfg.solver, reversible=cfg.reversible_solver, coupling=cfg.coupling
    )
    adjoint = make_adjoint(cfg.adjoint, cfg.checkpoints)
    model = VectorField(
        problem.dim,
        cfg.width,
        key=jr.PRNGKey(cfg.seed),
        time_dependent=problem.time_dependent,
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adamw(cfg.lr, weight_decay=cfg.weight_decay)
    opt_state = optim.init(params)
    loss_fn = _mse(problem, solver, adjoint, static)

    def step(params, opt_state):
        (loss, nsteps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optim.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, nsteps

    compiled = compile_step(step, params, opt_state)
    params, opt_state, log = timed_training(
        compiled.fn,
        params,
        opt_state,
        cfg.iters,
        desc=f"{problem.name} {cfg.label} seed={cfg.seed}",
        progress=progress,
    )
    pred, final_loss = _final_prediction(problem, solver, static, params)
    measure = cfg.adjoint == "reversible" and measure_drift
    drift = final_drift(problem, solver, static, params) if measure else None
    return _result(problem, cfg, compiled, log, pred, final_loss, drift)
