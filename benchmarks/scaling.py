"""Where reversible wins: gradient memory and time against the number of steps N
(issue 24).

For each workload and N, the gradient of a constant-step solve through
`ReversibleAdjoint(checkpoint_every="auto")` (through `Reversible(base)`) and
through `diffrax.RecursiveCheckpointAdjoint(checkpoints=c)` (through the plain
`base` solver) for c in {2, 4, 8, 16, floor(sqrt(2N)), N}: its compiled temporary
memory (always: compile only), its time (where it fits the machine) and its
relative error against the float64 gradient of the same discrete solve.

Workloads:

- `kuramoto`: a Kuramoto-type network, state `theta[batch, oscillators]`, learned
  frequencies, a learned rank-8 coupling `K = U V^T / n` evaluated in O(n) through
  `sum_j K_ij sin(theta_j - theta_i) = sum_r U_ir (cos theta_i S_r - sin theta_i
  C_r)`, plus a small per-oscillator correction MLP of `(sin, cos)`, Midpoint,
  dt = 0.05, float32 (and float64);
- `reaction-diffusion`: Allen-Cahn on a periodic grid, `du/dt = D lap(u) + a u -
  b u^3 + c` with four learned coefficients, Midpoint, dt = 0.1: the state is as
  large as one step's working set, so storing states is what memory costs;
- `white dwarf`: the 2-d state, MLP width 10 model of `experiments.white_dwarf`,
  Midpoint, dt = 1e-3, float64 (and float32).

The cost model (DESIGN section 6): a reversible gradient costs about 2F forward and
2(F + B) backward per step (F one base step, B ~ 2F its pullback), about 8F;
`RecursiveCheckpointAdjoint(c)` about (4 + r)F with r the smallest integer such
that N <= C(c + r, r) (binomial checkpointing). Reversible is faster where r > 4.

Run `python -m benchmarks.scaling` (`--quick` for a smoke test of seconds); the
report goes to `benchmarks/results/scaling_<backend>.md` with log-log plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import revdiffrax
from experiments.harness import interleaved_times, temp_bytes, tree_rel_error
from experiments.model import VectorField
from revdiffrax._adjoint.auto_checkpoint import (
    resolve_checkpoint_every,
    rounding_growth,
)


GIB = 1024**3


# ----------------------------------------------------------------------------------
# Workloads


class Kuramoto(eqx.Module):
    """d theta_i / dt = omega_i + (1/n) sum_j (U V^T)_ij sin(theta_j - theta_i)
    + 0.1 mlp(sin theta_i, cos theta_i), for every row of `theta[batch, n]`."""

    omega: jax.Array  # (n,)
    u: jax.Array  # (n, rank)
    v: jax.Array  # (n, rank)
    w1: jax.Array  # (2, width)
    b1: jax.Array  # (width,)
    w2: jax.Array  # (width,)

    def __init__(self, n: int, rank: int, width: int, key: jax.Array):
        ks = jax.random.split(key, 5)
        self.omega = 0.5 * jax.random.normal(ks[0], (n,))
        # Positive on average: the network partially synchronises (order parameter
        # 0.37 -> 0.76 over 1e4 steps), but its drifting oscillators keep the flow
        # sensitive: a perturbation of theta0 grows 488x in 1e3 steps, 6,190x in 1e4,
        # and no float32 gradient (any adjoint) is within 1e-3 of float64 beyond 1e3
        # steps (results/scaling.md).
        self.u = 1.0 + 0.5 * jax.random.normal(ks[1], (n, rank)) / math.sqrt(rank)
        self.v = (1.0 + 0.5 * jax.random.normal(ks[2], (n, rank))) / rank
        self.w1 = jax.random.normal(ks[3], (2, width)) / math.sqrt(2)
        self.b1 = jnp.zeros((width,))
        self.w2 = jax.random.normal(ks[4], (width,)) / math.sqrt(width)

    def __call__(self, t, theta, args):
        del t, args
        s, c = jnp.sin(theta), jnp.cos(theta)
        n = theta.shape[-1]
        # O(n * rank): the rank-8 coupling never forms the n x n matrix.
        big_s, big_c = s @ self.v, c @ self.v  # (batch, rank)
        coupling = (c * (big_s @ self.u.T) - s * (big_c @ self.u.T)) / n
        hidden = jnp.tanh(
            s[..., None] * self.w1[0] + c[..., None] * self.w1[1] + self.b1
        )
        return self.omega + coupling + 0.1 * (hidden @ self.w2)


class AllenCahn(eqx.Module):
    """du/dt = D lap(u) + a u - b u^3 + c on a periodic grid (5-point stencil)."""

    coeffs: jax.Array  # (D, a, b, c)

    def __call__(self, t, u, args):
        del t, args
        d, a, b, c = self.coeffs
        lap = (
            jnp.roll(u, 1, 0)
            + jnp.roll(u, -1, 0)
            + jnp.roll(u, 1, 1)
            + jnp.roll(u, -1, 1)
            - 4 * u
        )
        return d * lap + a * u - b * u**3 + c


class TimeMLP(eqx.Module):
    model: VectorField

    def __call__(self, t, y, args):
        del args
        return self.model(t, y)


@dataclasses.dataclass
class Scaling:
    """A vector field (its inexact arrays the parameters), a float64 initial state,
    a step size, a base solver and a loss of the final state."""

    name: str
    description: str
    field: eqx.Module
    y0: jax.Array
    dt: float
    base: diffrax.AbstractSolver
    dtypes: tuple[Any, ...]  # the dtypes measured; float64 is also the reference
    loss_of_state: Callable[[jax.Array, jax.Array], jax.Array]  # (y1, y0) -> loss
    time_max_n: int  # the largest N timed on this machine
    # `checkpoint_every` of the reversible adjoint, per dtype name; "auto" where
    # absent. Explicit where the horizon law of "auto" is wrong (contracting flows,
    # see `results/scaling.md`).
    checkpoint_every: dict[str, int | None] = dataclasses.field(default_factory=dict)
    coupling: float = 0.999  # of `Reversible(base, coupling)`

    def reversible(self, **kwargs) -> revdiffrax.Reversible:
        return revdiffrax.Reversible(self.base, self.coupling, **kwargs)

    def reversible_adjoint(self, dtype, **kwargs) -> revdiffrax.ReversibleAdjoint:
        name = jnp.dtype(dtype).name
        if name in self.checkpoint_every:
            k = self.checkpoint_every[name]
            return revdiffrax.ReversibleAdjoint(checkpoint_every=k, **kwargs)
        return revdiffrax.ReversibleAdjoint(checkpoint_every="auto", **kwargs)

    def loss(self, solver, adjoint, n: int, dtype) -> tuple[Callable, Any, Any]:
        """`(params, y0) -> loss` for an N-step solve in `dtype`, and its inputs."""
        params, static = eqx.partition(self.field, eqx.is_inexact_array)
        params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
        y0 = self.y0.astype(dtype)
        dt = self.dt

        def loss(p, y0_):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(eqx.combine(p, static)),
                solver,
                jnp.asarray(0.0, dtype),
                jnp.asarray(n * dt, dtype),
                jnp.asarray(dt, dtype),
                y0_,
                adjoint=adjoint,
                max_steps=n,
            )
            assert sol.ys is not None
            return self.loss_of_state(sol.ys[-1], y0_)

        return loss, params, y0


def _cos_loss(y1, y0):
    return jnp.mean(jnp.cos(y1 - y0))


def _pattern_loss(y1, y0):
    return jnp.mean(y1 * jnp.sin(jnp.arange(y1.size).reshape(y1.shape) * 0.1))


def _square_loss(y1, y0):
    del y0
    return jnp.mean(y1**2)


def kuramoto(batch: int, oscillators: int, time_max_n: int) -> Scaling:
    key = jax.random.PRNGKey(0)
    theta0 = jax.random.uniform(jax.random.PRNGKey(1), (batch, oscillators)) * 2 * np.pi
    return Scaling(
        "kuramoto",
        f"Kuramoto-type network, batch {batch} x {oscillators} oscillators, learned "
        "frequencies, learned rank-8 coupling in O(oscillators), per-oscillator "
        "correction MLP 2-16-1, Midpoint, dt = 0.05",
        Kuramoto(oscillators, 8, 16, key),
        theta0,
        0.05,
        diffrax.Midpoint(),
        (jnp.float32,),
        _cos_loss,
        time_max_n,
        # The network has decaying modes: the float32 drift without
        # checkpoints grew like e^(0.0144 per step) from 100 to 1,000 steps, and at
        # the default coupling 0.999 the parasitic mode grew (y and z 7% apart after
        # 1,000 steps, `ParasiticModeWarning`). A coupling of at most e^(-h rho)
        # keeps the mode down, and then the horizon law of "auto" (1 / coupling per
        # step) also covers the contraction's amplification. At 0.98 the "auto"
        # drift after 1,000 float32 steps was 4.9e-4 (14x the law; 1e5x at 0.999),
        # but y and z still ended 6% apart: the fastest decay exceeds the average.
        # (0.985: k = 259, drift 5.5e-3; 0.97: k = 140, drift 2.6e-4, y and z 0.6%
        # apart: more checkpoints, i.e. more memory.)
        coupling=0.98,
    )


# Allen-Cahn's linearisation has eigenvalues from D * (-8) + (a - 3b) = -2.8 (the
# stencil's highest frequency near u = +-1) to a = 1. The reversible scheme's
# parasitic mode is multiplied per step by about coupling / R(h mu), R the base
# solver's stability function, so it is stable only where R(h mu) >= coupling =
# 0.999 for every decaying mode: h * 2.8 <= 1e-3. dt = 2.5e-4 gives h rho = 7e-4
# (dt = 0.1 and D = 0.2, before, gave 1.42 per step: NaN gradients at N = 1e3).
RD_COEFFS = (0.1, 1.0, 1.0, 0.0)  # (D, a, b, c)
RD_DT = 2.5e-4


def reaction_diffusion(grid: int, time_max_n: int) -> Scaling:
    u0 = 0.3 * jax.random.normal(jax.random.PRNGKey(2), (grid, grid))
    return Scaling(
        "reaction-diffusion",
        f"Allen-Cahn reaction-diffusion on a periodic {grid}x{grid} grid, 4 learned "
        f"coefficients (D, a, b, c) = {RD_COEFFS}, Midpoint, dt = {RD_DT:g}",
        AllenCahn(jnp.array(RD_COEFFS)),
        u0,
        RD_DT,
        diffrax.Midpoint(),
        (jnp.float32, jnp.float64),
        _pattern_loss,
        time_max_n,
    )


def white_dwarf(time_max_n: int) -> Scaling:
    model = VectorField(2, 10, key=jax.random.PRNGKey(0), time_dependent=True)
    return Scaling(
        "white dwarf",
        "2-d state, time-dependent MLP width 10 depth 1 (experiments.white_dwarf), "
        "Midpoint, dt = 1e-3",
        TimeMLP(model),
        jnp.array([1.0, 0.0]),
        1e-3,
        diffrax.Midpoint(),
        (jnp.float64, jnp.float32),
        _square_loss,
        time_max_n,
    )


def workloads(quick: bool, gpu: bool = False) -> list[Scaling]:
    if quick:
        return [
            kuramoto(2, 16, 10**9),
            reaction_diffusion(8, 10**9),
            white_dwarf(10**9),
        ]
    if gpu:
        return [
            kuramoto(64, 1000, 10**4),
            reaction_diffusion(256, 10**4),
            white_dwarf(10**4),
        ]
    return [
        kuramoto(8, 128, 10**4),
        reaction_diffusion(64, 10**4),
        white_dwarf(10**4),
    ]


# ----------------------------------------------------------------------------------
# Adjoints and the cost model


def recomputations(c: int, n: int) -> int:
    """The smallest r with n <= C(c + r, r): forward recomputations per step of
    binomial checkpointing with c checkpoints."""
    if c >= n:
        return 0
    r = 1
    while math.comb(c + r, r) < n:
        r += 1
    return r


def rca_counts(n: int) -> list[int]:
    counts = {2, 4, 8, 16, math.floor(math.sqrt(2 * n)), n}
    return sorted(c for c in counts if c <= n)


REVERSIBLE = "ReversibleAdjoint"


def adjoints(work: Scaling, n: int, dtype) -> dict[str, tuple[Any, int | None]]:
    """Label -> (adjoint, RCA checkpoint count or None for reversible)."""
    out: dict[str, tuple[Any, int | None]] = {
        REVERSIBLE: (work.reversible_adjoint(dtype, drift_tol=None), None)
    }
    for c in rca_counts(n):
        out[f"RCA({c})"] = (diffrax.RecursiveCheckpointAdjoint(checkpoints=c), c)
    return out


def solver_for(work: Scaling, checkpoints: int | None) -> diffrax.AbstractSolver:
    return work.reversible() if checkpoints is None else work.base


def model_cost(checkpoints: int | None, n: int) -> float:
    """Cost per step in base-step units F: 8 for reversible, 4 + r for RCA."""
    return 8.0 if checkpoints is None else 4.0 + recomputations(checkpoints, n)


# ----------------------------------------------------------------------------------
# Measurements


@dataclasses.dataclass
class Row:
    workload: str
    dtype: str
    n: int
    label: str
    checkpoints: int | None
    temp_bytes: int | None
    auto_k: int | None = None
    time_s: float | None = None
    grad_error: float | None = None
    drift: float | None = None
    note: str = ""
    k: int | str | None = "auto"  # the reversible adjoint's `checkpoint_every`


def _grad_fn(loss):
    return jax.jit(jax.grad(loss))


def reference_grad(work: Scaling, n: int, reversible: bool):
    """The float64 gradient of the discrete solve (through `Reversible(base)` or
    the base solver), by `RecursiveCheckpointAdjoint` with a checkpoint per step."""
    solver = work.reversible() if reversible else work.base
    adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=n)
    loss, p, y0 = work.loss(solver, adjoint, n, jnp.float64)
    return jax.block_until_ready(_grad_fn(loss)(p, y0))


def _timed(checkpoints: int, n: int, max_recompute: int, max_work: float) -> bool:
    """Whether to time RCA(checkpoints): at most `max_recompute` recomputations per
    step, or a model cost of at most `max_work` base steps in all."""
    r = recomputations(checkpoints, n)
    return r <= max_recompute or n * model_cost(checkpoints, n) <= max_work


def measure(
    work: Scaling,
    n: int,
    dtype,
    repeats: int,
    max_recompute: int,
    max_work: float = 0.0,
) -> list[Row]:
    """Memory of every adjoint; time and gradient error where `n` is timed (RCA
    only where `_timed`)."""
    timed = n <= work.time_max_n
    refs = {}
    if timed:
        refs[True] = reference_grad(work, n, True)
    # In float64 the RCA(n) row's gradient is the base solver's reference (the same
    # program as `reference_grad(work, n, False)`): taken from that row, not compiled
    # twice.
    base_ref_row = f"RCA({n})" if jnp.dtype(dtype) == jnp.float64 else None
    if timed and base_ref_row is None:
        refs[False] = reference_grad(work, n, False)
    rows, fns, grads = [], {}, {}
    drifts: list = []
    for label, (adjoint, c) in adjoints(work, n, dtype).items():
        solver = solver_for(work, c)
        if c is None:  # the reconstruction drift of every reversible gradient
            adjoint = work.reversible_adjoint(
                dtype, drift_tol=None, drift_callback=drifts.append
            )
        loss, p, y0 = work.loss(solver, adjoint, n, dtype)
        compiled = jax.jit(jax.grad(loss)).lower(p, y0).compile()
        row = Row(work.name, jnp.dtype(dtype).name, n, label, c, temp_bytes(compiled))
        if c is None:
            row.k = adjoint.checkpoint_every
            row.auto_k = (
                resolve_checkpoint_every(
                    y0=y0, solver=solver, max_steps=n, drift_tol=None
                )
                if isinstance(row.k, str)
                else row.k
            )
        rows.append(row)
        if not timed:
            continue
        if c is not None and not _timed(c, n, max_recompute, max_work):
            row.note = f"not timed: r = {recomputations(c, n)}"
            continue
        grads[label] = (row, c is None, jax.block_until_ready(compiled(p, y0)))
        if label == base_ref_row:
            refs[False] = grads[label][2]
        if c is None and drifts:
            row.drift = float(drifts[-1])
        fns[label] = (lambda x, f=compiled: f(*x), (p, y0))
    if timed and False not in refs:  # RCA(n) was not timed: compile the reference
        refs[False] = reference_grad(work, n, False)
    for row, reversible, grad in grads.values():
        row.grad_error = tree_rel_error(grad, refs[reversible], norm="2")
    if fns:
        times = interleaved_times(fns, repeats, min_sample_s=0.05)
        for row in rows:
            if row.label in fns:
                row.time_s = times[row.label][0]
    return rows


def fastest_equal(rows: list[Row], eps: float) -> tuple[Row | None, float | None]:
    """The fastest RCA with memory <= 1.25x reversible's and a gradient error at
    most max(reversible's, sqrt(eps)); and the speed-up of reversible over it."""
    rev = next(r for r in rows if r.checkpoints is None)
    if rev.time_s is None or rev.temp_bytes is None:
        return None, None
    bound = max(rev.grad_error or 0.0, math.sqrt(eps))
    candidates = [
        r
        for r in rows
        if r.checkpoints is not None
        and r.time_s is not None
        and r.temp_bytes is not None
        and r.temp_bytes <= 1.25 * rev.temp_bytes
        and r.grad_error is not None
        and r.grad_error <= bound
    ]
    if not candidates:
        return None, None
    best = min(candidates, key=lambda r: r.time_s or math.inf)
    assert best.time_s is not None
    return best, best.time_s / rev.time_s


def horizon_1gib(work: Scaling, dtype, label: str, ns: Sequence[int]) -> str:
    """The longest N whose compiled memory fits in 1 GiB, from a linear fit of the
    memory at the largest N and twice that, checked by compiling at the predicted N
    (compiling costs the same at every N: the solve is a while loop)."""

    def memory(n: int) -> int:
        adjoint, c = _adjoint_of(work, label, n, dtype)
        loss, p, y0 = work.loss(solver_for(work, c), adjoint, n, dtype)
        out = temp_bytes(jax.jit(jax.grad(loss)).lower(p, y0).compile())
        assert out is not None
        return out

    n1, n2 = max(ns), 2 * max(ns)
    m1, m2 = memory(n1), memory(n2)
    if m2 > GIB and m1 > GIB:
        return f"< {n1:,}"
    slope = (m2 - m1) / (n2 - n1)
    if slope <= 0:
        return "unbounded (memory flat in N)"
    guess = int(n2 + (GIB - m2) / slope)
    # One secant correction (the fit is only asymptotic), then the check.
    m = memory(guess)
    if m > GIB:
        guess = int(n2 + (guess - n2) * (GIB - m2) / (m - m2))
        m = memory(guess)
    return f"{guess:,}" if m <= GIB else f"< {guess:,}"


def _adjoint_of(work: Scaling, label: str, n: int, dtype):
    if label == REVERSIBLE:
        return adjoints(work, n, dtype)[REVERSIBLE]
    if label == "RCA(N)":
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=n), n
    if label == "RCA(sqrt(2N))":
        c = math.floor(math.sqrt(2 * n))
        return diffrax.RecursiveCheckpointAdjoint(checkpoints=c), c
    c = int(label[4:-1])
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=c), c


# ----------------------------------------------------------------------------------
# The horizon law


def measured_drift(work: Scaling, n: int, dtype, checkpoint_every) -> float:
    """The reconstruction drift reported by one reversible gradient."""
    drifts: list = []
    adjoint = revdiffrax.ReversibleAdjoint(
        checkpoint_every=checkpoint_every, drift_tol=None, drift_callback=drifts.append
    )
    loss, p, y0 = work.loss(work.reversible(), adjoint, n, dtype)
    jax.block_until_ready(jax.jit(jax.grad(loss))(p, y0))
    return float(drifts[-1])


def default_checks(work: Scaling, n: int, dtype) -> list[str]:
    """The warnings of one gradient through the default
    `ReversibleAdjoint(checkpoint_every="auto")` (its parasitic-mode and drift
    checks on), as `"Category: message"`."""
    import warnings

    adjoint = revdiffrax.ReversibleAdjoint(checkpoint_every="auto")
    loss, p, y0 = work.loss(work.reversible(), adjoint, n, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(jax.jit(jax.grad(loss))(p, y0))
        jax.effects_barrier()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def drift_law(work: Scaling, ns: Sequence[int]) -> list[str]:
    """Measured drift without checkpoints and with `"auto"`, against the law
    `eps * sqrt(S(N))` (no safety factor), in float32 and float64."""
    coupling = work.coupling
    lines = [
        "| dtype | N | law eps sqrt(S(N)) | drift, no checkpoints | measured / law "
        '| k ("auto") | drift, "auto" |',
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype in (jnp.float32, jnp.float64):
        eps = float(np.finfo(dtype).eps)
        for n in ns:
            law = eps * rounding_growth(coupling, n)
            plain = measured_drift(work, n, dtype, None)
            k = resolve_checkpoint_every(
                y0=work.y0.astype(dtype),
                solver=work.reversible(),
                max_steps=n,
                drift_tol=None,
            )
            auto = plain if k is None else measured_drift(work, n, dtype, "auto")
            lines.append(
                f"| {jnp.dtype(dtype).name} | {n:,} | {law:.2e} | {plain:.2e} | "
                f"{plain / law:.2g} | {k or 'none'} | {auto:.2e} |"
            )
    return lines


# ----------------------------------------------------------------------------------
# The forward overhead of Reversible(Midpoint()) (issue 24)


def count_evaluations(work: Scaling, solver, n: int) -> float:
    """Vector-field evaluations per step, counted at run time."""
    count = [0]

    def bump():
        count[0] += 1

    class Counted(eqx.Module):
        field: eqx.Module

        def __call__(self, t, y, args):
            jax.debug.callback(bump)
            return self.field(t, y, args)  # pyright: ignore

    counted = dataclasses.replace(work, field=Counted(work.field))
    loss, p, y0 = counted.loss(
        solver, diffrax.RecursiveCheckpointAdjoint(), n, work.y0.dtype
    )
    jax.block_until_ready(jax.jit(loss)(p, y0))
    return count[0] / n


def forward_overhead(work: Scaling, n: int, repeats: int) -> list[str]:
    """Forward-solve times of the base solver, `Reversible(base)` with its default
    (diffrax's stage loop for states above 256 elements) and with the stages
    unrolled (the default before), and the base solver with twice the steps (the
    evaluations of the reversible scheme, with twice the loop overhead)."""
    dtype = jnp.float32
    variants = {
        "base, N steps": (work.base, n, 1),
        "Reversible(base), N steps": (work.reversible(), n, 1),
        "Reversible(base, unroll_stages=True)": (
            work.reversible(unroll_stages=True),
            n,
            1,
        ),
        "base, 2N steps (half dt)": (work.base, 2 * n, 2),
    }
    fns, evals = {}, {}
    for label, (solver, steps, div) in variants.items():
        w = dataclasses.replace(work, dt=work.dt / div)
        loss, p, y0 = w.loss(solver, diffrax.RecursiveCheckpointAdjoint(), steps, dtype)
        fns[label] = (lambda x, f=jax.jit(loss): f(*x), (p, y0))
        evals[label] = count_evaluations(w, solver, 8)
    times = interleaved_times(fns, repeats, min_sample_s=0.05)
    base = times["base, N steps"][0]
    lines = [
        "| forward solve | evaluations per step | time (s) | / base |",
        "|---|---:|---:|---:|",
    ]
    for label in fns:
        t = times[label][0]
        lines.append(f"| {label} | {evals[label]:g} | {t:.3g} | {t / base:.2f} |")
    return lines


# ----------------------------------------------------------------------------------
# Report


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.3g}"


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| N | adjoint | checkpoint_every | memory (MiB) | time (s) | model cost / "
        "step (F) | grad error vs float64 | drift |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        k = "-"
        if r.checkpoints is None:
            k = str(r.auto_k or "none")
            k = f'"auto": {k}' if r.k == "auto" else f"{k} (set)"
        err = _fmt(r.grad_error) if r.grad_error is not None else (r.note or "-")
        lines.append(
            f"| {r.n:,} | {r.label} | {k} | {_mib(r.temp_bytes)} | "
            f"{_fmt(r.time_s, '.3g')} | {model_cost(r.checkpoints, r.n):g} | {err} "
            f"| {_fmt(r.drift)} |"
        )
    return lines


FAMILIES = [
    REVERSIBLE,
    "RCA(2)",
    "RCA(4)",
    "RCA(8)",
    "RCA(16)",
    "RCA(sqrt(2N))",
    "RCA(N)",
]


def family(r: Row) -> str:
    """The row's line in the plots: reversible, RCA(c) with a fixed c, RCA(sqrt(2N))
    or RCA(N)."""
    if r.checkpoints is None:
        return REVERSIBLE
    if r.checkpoints == r.n:
        return "RCA(N)"
    if r.checkpoints == math.floor(math.sqrt(2 * r.n)) and r.checkpoints not in (
        2,
        4,
        8,
        16,
    ):
        return "RCA(sqrt(2N))"
    return r.label


def plot(rows: list[Row], path: str, title: str) -> None:
    """Log-log memory and time against N: a colour per adjoint, a line style per
    dtype (float32 solid, float64 dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = dict(zip(FAMILIES, plt.get_cmap("tab10").colors))  # pyright: ignore
    styles = {"float32": "-", "float64": "--"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    dtypes = sorted({r.dtype for r in rows})
    for dtype in dtypes:
        for name in FAMILIES:
            rs = sorted(
                (r for r in rows if r.dtype == dtype and family(r) == name),
                key=lambda r: r.n,
            )
            mem = [(r.n, r.temp_bytes / 2**20) for r in rs if r.temp_bytes]
            tim = [(r.n, r.time_s) for r in rs if r.time_s]
            for ax, pts in ((axes[0], mem), (axes[1], tim)):
                if pts:
                    ax.loglog(
                        *zip(*pts),
                        styles.get(dtype, ":"),
                        color=colours[name],
                        marker="o" if name == REVERSIBLE else ".",
                        linewidth=2.5 if name == REVERSIBLE else 1.2,
                    )
    axes[0].set(xlabel="N (steps)", ylabel="compiled temp memory (MiB)")
    axes[1].set(xlabel="N (steps)", ylabel="median gradient time (s)")
    present = {family(r) for r in rows}
    handles = [
        Line2D([], [], color=colours[name], label=name)
        for name in FAMILIES
        if name in present
    ] + [
        Line2D([], [], color="k", linestyle=styles.get(d, ":"), label=d) for d in dtypes
    ]
    axes[1].legend(handles=handles, fontsize=7, loc="upper left")
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_rows(rows: list[Row], path: str) -> None:
    """The rows as JSON, so that runs of one workload can be plotted together."""
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)


def plot_saved(paths: Sequence[str], png: str, title: str) -> list[Row]:
    """One plot of the rows saved by several runs (`save_rows`)."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [Row(**r) for r in json.load(f)]
    plot(rows, png, title)
    return rows


def machine() -> str:
    dev = jax.devices()[0]
    load = ""
    try:
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}); load: {load}"
    )


def run(
    works: list[Scaling],
    ns: Sequence[int],
    *,
    repeats: int,
    max_recompute: int,
    max_work: float = 0.0,
    out: str,
    horizons: bool,
    overhead_n: int | None,
    drift_ns: Sequence[int] = (),
    tables: bool = True,
    argv: Sequence[str],
    title: str,
) -> dict:
    backend = jax.default_backend()
    report = [
        f"# {title}",
        "",
        f"Command: `python -m benchmarks.scaling {' '.join(argv)}`  ",
        f"Machine: {machine()}",
        "",
        "Memory: compiled temporary memory of `jax.jit(jax.grad(loss))` (compile "
        "only, deterministic). Time: median gradient time, adjoints interleaved. "
        "Gradient error: relative 2-norm error against the float64 gradient of the "
        "same discrete solve (`Reversible(base)` for the reversible adjoint, `base` "
        "for RCA), by RCA with a checkpoint per step. Model cost: 8F per step for "
        "reversible, (4 + r)F for RCA(c), r the recomputations of binomial "
        "checkpointing. RCA rows with r above "
        f"{max_recompute} are not timed (they take r times a forward solve) unless "
        f"their model cost N (4 + r) is at most {max_work:g} base steps.",
        "",
    ]
    results: dict[str, Any] = {}
    path = os.path.join(out, f"scaling_{backend}.md")

    def write() -> None:  # after every section: a late failure keeps the rest
        with open(path, "w") as f:
            f.write("\n".join(report) + "\n")

    for work in works if tables else []:
        all_rows: list[Row] = []
        report += [
            f"## {work.name}",
            "",
            f"{work.description}; Reversible coupling {work.coupling:g}.",
            "",
        ]
        for dtype in work.dtypes:
            eps = float(np.finfo(dtype).eps)
            rows_dt: list[Row] = []
            speedups = []
            name = jnp.dtype(dtype).name
            for n in ns:
                rows = measure(work, n, dtype, repeats, max_recompute, max_work)
                rows_dt += rows
                # The rows so far, in case a later (longer) N does not finish.
                with open(path + f".{work.name}.{name}.partial", "w") as f:
                    f.write("\n".join(table(rows_dt) + speedups) + "\n")
                best, speedup = fastest_equal(rows, eps)
                if best is not None:
                    speedups.append(
                        f"- N = {n:,}: {speedup:.2f}x over {best.label} "
                        f"({_mib(best.temp_bytes)} MiB, error "
                        f"{_fmt(best.grad_error)})"
                    )
                elif rows[0].time_s is not None:
                    speedups.append(
                        f"- N = {n:,}: no timed RCA within 1.25x the memory and "
                        "as accurate"
                    )
                print(f"{work.name} {jnp.dtype(dtype).name} N={n}: done", flush=True)
            all_rows += rows_dt
            report += [f"### {name}", ""] + table(rows_dt) + [""]
            report += [
                "Speed-up of reversible over the fastest RCA with memory <= 1.25x "
                "reversible's and gradient error <= max(reversible's, sqrt(eps)):",
                "",
            ]
            report += (speedups or ["- (not timed)"]) + [""]
            if horizons:
                labels = [REVERSIBLE, "RCA(sqrt(2N))", "RCA(N)"]
                report += [
                    f"Longest N within 1 GiB of compiled memory ({name}; RCA(c) "
                    "with a fixed c has memory flat in N):",
                    "",
                    "| adjoint | longest N in 1 GiB |",
                    "|---|---:|",
                ]
                for label in labels:
                    report.append(
                        f"| {label} | {horizon_1gib(work, dtype, label, ns)} |"
                    )
                report.append("")
        png = os.path.join(out, f"scaling_{backend}_{work.name.replace(' ', '_')}.png")
        plot(all_rows, png, work.name)
        report += [f"![{work.name}]({os.path.basename(png)})", ""]
        results[work.name] = all_rows
        save_rows(all_rows, png[: -len(".png")] + ".json")
        write()
    if drift_ns:
        work = works[0]
        report += (
            [
                f"## The horizon law ({work.name}, coupling {work.coupling})",
                "",
            ]
            + drift_law(work, drift_ns)
            + [""]
        )
        write()
    if overhead_n:
        work = works[0]
        report += (
            [
                f"## Forward overhead of Reversible(Midpoint()) ({work.name}, "
                f"N = {overhead_n:,}, float32)",
                "",
            ]
            + forward_overhead(work, overhead_n, repeats)
            + [""]
        )
    write()
    print("\n".join(report))
    return {"results": results, "report": path}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ns", default=None, help="comma-separated step counts (default 1e2..1e5)"
    )
    parser.add_argument("--only", default=None, help="workload name substring")
    parser.add_argument(
        "--max-recompute", type=int, default=24, help="time RCA only up to this r"
    )
    parser.add_argument(
        "--max-work",
        type=float,
        default=0.0,
        help="also time RCA whose model cost N (4 + r) is at most this many base steps",
    )
    parser.add_argument("--no-horizons", action="store_true")
    parser.add_argument(
        "--dtype", default=None, help="only this dtype, e.g. float32 (default: all)"
    )
    parser.add_argument(
        "--extras",
        choices=["all", "none", "only"],
        default="all",
        help="the horizon-law (drift) and forward-overhead sections of the first "
        "workload: with the tables, not at all, or alone",
    )
    parser.add_argument(
        "--time-max-n",
        type=int,
        default=None,
        help="time up to this N (default: 1e4 on a CPU)",
    )
    parser.add_argument(
        "--coupling",
        type=float,
        default=None,
        help="the coupling of Reversible(base, coupling) for the selected workloads "
        "(default: each workload's own; the Kuramoto network's is 0.98)",
    )
    parser.add_argument("--out", default=None, help="output folder")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    ns = [10, 30] if args.quick else [100, 1000, 10_000, 100_000]
    if args.ns:
        ns = [int(float(x)) for x in args.ns.split(",")]
    works = workloads(args.quick)
    if args.only:
        works = [w for w in works if args.only in w.name]
    if args.dtype:
        for w in works:
            w.dtypes = tuple(d for d in w.dtypes if jnp.dtype(d).name == args.dtype)
    if args.coupling is not None:
        if not 0 < args.coupling <= 1:
            parser.error(f"--coupling must lie in (0, 1], got {args.coupling}")
        for w in works:
            w.coupling = args.coupling
    if args.time_max_n is not None:
        for w in works:
            w.time_max_n = args.time_max_n
    extras = args.extras != "none"
    out = args.out or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    tic = time.perf_counter()
    result = run(
        works,
        ns,
        repeats=1 if args.quick else args.repeats,
        max_recompute=args.max_recompute,
        max_work=args.max_work,
        out=out,
        horizons=not args.no_horizons,
        overhead_n=(10 if args.quick else 1000) if extras else None,
        drift_ns=([20] if args.quick else [100, 1000, 10_000, 30_000])
        if extras
        else [],
        tables=args.extras != "only",
        argv=list(argv if argv is not None else sys.argv[1:]),
        title="Scaling with the number of steps (issue 24)",
    )
    print(f"total {time.perf_counter() - tic:.1f} s")
    return result


if __name__ == "__main__":
    main()
