"""The workloads of `benchmarks/pareto.py` (issue 12).

Each `Workload` is a model (whose inexact arrays are the differentiated parameters),
a data argument, a base solver and a step count; `Workload.loss(solver, adjoint)`
gives `(params, data) -> scalar loss` through `diffrax.diffeqsolve` with
`ConstantStepSize` and `SaveAt(t1=True)`. The model travels as the `args` of the
solve (the documented revdiffrax usage).

- `white dwarf`: 2-d state, time-dependent MLP width 10 depth 1 (the model of
  `experiments.white_dwarf`), Midpoint, N=1000, float64;
- `64x16`: batch 64 inside the state, 16-d, time-dependent MLP width 64 depth 2,
  Tsit5, N=1000, float64;
- `CNF Midpoint`, `CNF RK4`, `CNF Dopri5`: the two-moons continuous normalising flow
  (FFJORD state (x, delta log p), batch 1000 inside the state, concat-squash MLP
  2-128-128-128-2, tanh, exact trace), float32, t in [0, 1], N=100;
- `CNF Midpoint integrated`: the same, with the reversible adjoints through
  `Reversible(Midpoint(), integrated=(False, True))` (the log-density advanced
  without coupling, its trace evaluated once per step instead of twice);
- `CDE`: a neural CDE of the published size (hidden 32, vector field MLP width 32
  depth 4, softplus, tanh output) on the cubic-Hermite interpolation of irregularly
  sampled 3-channel spirals (`experiments.neural_cde.make_spirals`), batch 32 by
  `jax.vmap`, Heun, N=1000, float64;
- `SaveAt(ts) 1000 times` (issue 22): the white-dwarf-sized MLP (2-d state, 3-10-2
  with t as input), Heun, N=1000, the loss the mean square of the states saved by
  `SaveAt(ts=...)` at 1,000 times, float64;
- `PDE`: a neural reaction-diffusion PDE on a periodic 64x64 grid (5-point Laplacian
  plus a 3x3 conv net 1-4-1), float32, Midpoint, N=2000: the state (16 KiB) is
  larger than one step's working set of the network, so storing states dominates;
- `CNF vmap Tsit5` (issue 22): the two-moons CNF as diffrax's example writes it, one
  sample per solve and `jax.vmap` over a batch of 500, MLP 2-64-64-64-2, Tsit5
  with 10 constant steps from t1=0.5 down to 0, float32;
- `CDE vmap Tsit5 PID` (issue 22): diffrax's neural CDE example (hidden 8, MLP
  width 128 depth 1, spirals of 100 observations, batch 32 under `jax.vmap`),
  Tsit5 with `PIDController(rtol=1e-3, atol=1e-6)`, float32.

The last two solve one sample at a time under `jax.vmap` and use diffrax's default
`max_steps`; for them the report also has the adjoints with their defaults
(`RCA()`: `RecursiveCheckpointAdjoint()`; `Reversible()`: `ReversibleAdjoint()`,
checks on).

`sde_gan_vmap` (used by `benchmarks/vmap_parity.py`, not by `pareto.py`): the
neural SDE GAN of diffrax's example (generator SDE, neural CDE discriminator, both
`diffrax.ReversibleHeun` with dt0 = 1, batch 1024 under `jax.vmap`, float32); its
reversible adjoint goes through `revdiffrax.ReversibleHeun()` (`Workload.reversible`).

`quick=True` shrinks every workload to run in seconds (smoke tests).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import revdiffrax
from experiments.model import VectorField
from experiments.neural_cde import make_spirals
from experiments.solvers import RK4


@dataclasses.dataclass
class Workload:
    name: str
    description: str
    model: eqx.Module
    data: Any
    base: diffrax.AbstractSolver
    num_steps: int
    dtype: Any
    # (model, data, solver, adjoint, workload) -> scalar loss
    loss_fn: Callable[..., jax.Array]
    # `Reversible(base, integrated=...)` for the reversible adjoints (None: none).
    integrated: Any = None
    # Workload-specific settings of `loss_fn`.
    extra: dict = dataclasses.field(default_factory=dict)
    # Also measure the adjoints with their defaults: `RecursiveCheckpointAdjoint()`
    # and `ReversibleAdjoint()` (with its drift and parasitic-mode checks).
    default_rows: bool = False
    # The number of `SaveAt(ts)` times, for losses that save them (None: t1 only).
    num_saved: int | None = None
    # The solver of `ReversibleAdjoint` where it is not `revdiffrax.Reversible(base)`
    # (e.g. `revdiffrax.ReversibleHeun()` against `diffrax.ReversibleHeun()`).
    reversible: diffrax.AbstractSolver | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")

    def loss(
        self, solver: diffrax.AbstractSolver, adjoint: diffrax.AbstractAdjoint
    ) -> tuple[Callable[[Any, Any], jax.Array], Any]:
        """`(params, data) -> loss` and the params."""
        params, static = eqx.partition(self.model, eqx.is_inexact_array)

        def loss(p, data):
            return self.loss_fn(eqx.combine(p, static), data, solver, adjoint, self)

        return loss, params

    def solve(self, term, solver, adjoint, y0, args) -> Any:
        """The final state of a constant-step solve over t in [0, 1]."""
        dt = self.dtype
        sol = diffrax.diffeqsolve(
            term,
            solver,
            jnp.asarray(0.0, dt),
            jnp.asarray(1.0, dt),
            jnp.asarray(1.0 / self.num_steps, dt),
            y0,
            args=args,
            adjoint=adjoint,
            max_steps=self.num_steps,
        )
        return jax.tree_util.tree_map(lambda x: x[-1], sol.ys)


# ----------------------------------------------------------------------------------
# MLP vector fields (white dwarf, 64x16)


class BatchedMLP(eqx.Module):
    """Time-dependent MLP acting on each row of a batch of states `y[b, d]`."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y):
        def one(yi):
            tt = jnp.reshape(t, (1,)).astype(yi.dtype)
            return self.mlp(jnp.concatenate([tt, yi]))

        return one(y) if y.ndim == 1 else jax.vmap(one)(y)


def _call_model(t, y, model):
    return model(t, y)


def _mean_square_loss(model, y0, solver, adjoint, work):
    y1 = work.solve(diffrax.ODETerm(_call_model), solver, adjoint, y0, model)
    return jnp.mean(y1**2)


def white_dwarf(quick: bool) -> Workload:
    model = VectorField(2, 10, key=jax.random.PRNGKey(0), time_dependent=True)
    return Workload(
        "white dwarf",
        "2-d state, MLP width 10 depth 1, Midpoint, float64",
        model,
        jnp.array([1.0, 0.0]),
        diffrax.Midpoint(),
        100 if quick else 1000,
        jnp.float64,
        _mean_square_loss,
    )


def _saved_times_loss(model, y0, solver, adjoint, work):
    """The mean square of the states saved at `work.num_saved` times of [0, 1]."""
    dt = work.dtype
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_call_model),
        solver,
        jnp.asarray(0.0, dt),
        jnp.asarray(1.0, dt),
        jnp.asarray(1.0 / work.num_steps, dt),
        y0,
        args=model,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, work.num_saved, dtype=dt)),
        adjoint=adjoint,
        max_steps=work.num_steps,
    )
    return jnp.mean(sol.ys**2)


def saved_times(quick: bool) -> Workload:
    num = 100 if quick else 1000
    model = VectorField(2, 10, key=jax.random.PRNGKey(0), time_dependent=True)
    return Workload(
        "SaveAt(ts) 1000 times",
        f"2-d state, MLP 3-10-2 with t as input, Heun, `SaveAt(ts=...)` at {num} "
        "times, float64",
        model,
        jnp.array([1.0, 0.0]),
        diffrax.Heun(),
        num,
        jnp.float64,
        _saved_times_loss,
        num_saved=num,
    )


def mlp_64x16(quick: bool) -> Workload:
    batch, width = (8, 16) if quick else (64, 64)
    key = jax.random.PRNGKey(0)
    mlp = eqx.nn.MLP(17, 16, width, 2, activation=jnp.tanh, key=key)
    return Workload(
        "64x16",
        f"batch {batch} inside the state, 16-d, MLP width {width} depth 2, Tsit5, "
        "float64",
        BatchedMLP(mlp),
        jax.random.normal(jax.random.PRNGKey(1), (batch, 16)),
        diffrax.Tsit5(),
        100 if quick else 1000,
        jnp.float64,
        _mean_square_loss,
    )


# ----------------------------------------------------------------------------------
# Two-moons CNF


def two_moons(n: int) -> np.ndarray:
    """`sklearn.datasets.make_moons(n, noise=0.05)`, standardised, float32."""
    from sklearn.datasets import make_moons

    pts, _ = make_moons(n, noise=0.05, random_state=0)
    return ((pts - pts.mean(0)) / pts.std(0)).astype(np.float32)


class ConcatSquash(eqx.Module):
    """FFJORD's concat-squash layer: `(W x + b) * sigmoid(a t + c) + d t`."""

    linear: eqx.nn.Linear
    gate: eqx.nn.Linear
    bias: eqx.nn.Linear

    def __init__(self, n_in: int, n_out: int, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.linear = eqx.nn.Linear(n_in, n_out, key=k1, dtype=jnp.float32)
        self.gate = eqx.nn.Linear(1, n_out, key=k2, dtype=jnp.float32)
        self.bias = eqx.nn.Linear(1, n_out, use_bias=False, key=k3, dtype=jnp.float32)

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        tt = jnp.reshape(t, (1,))
        return self.linear(x) * jax.nn.sigmoid(self.gate(tt)) + self.bias(tt)


class CNF(eqx.Module):
    """d(x, delta log p)/dt = (f(t, x), -tr df/dx) on a batch `x[b, 2]`, the trace
    exact (reverse mode over the rows of the identity, as in diffrax's CNF
    example)."""

    layers: list[ConcatSquash]

    def __init__(self, sizes: tuple[int, ...], key: jax.Array):
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = [
            ConcatSquash(a, b, k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        ]

    def f(self, t: jax.Array, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(t, x))
        return self.layers[-1](t, x)

    def __call__(self, t, y):
        x, _ = y
        t = jnp.asarray(t, jnp.float32)

        def one(xi):
            dx, vjp = jax.vjp(lambda u: self.f(t, u), xi)
            (jac,) = jax.vmap(vjp)(jnp.eye(xi.shape[0], dtype=xi.dtype))
            return dx, -jnp.trace(jac)

        return jax.vmap(one)(x)


def _cnf_loss(model, y0, solver, adjoint, work):
    z, delta_logp = work.solve(diffrax.ODETerm(_call_model), solver, adjoint, y0, model)
    log_normal = -0.5 * jnp.sum(z**2, -1) - jnp.log(2 * jnp.pi)
    return -jnp.mean(log_normal - delta_logp)


def cnf(
    base: diffrax.AbstractSolver, quick: bool, integrated: bool = False
) -> Workload:
    batch, width = (64, 16) if quick else (1000, 128)
    model = CNF((2, width, width, width, 2), jax.random.PRNGKey(0))
    x0 = jnp.asarray(two_moons(batch))
    suffix = " integrated" if integrated else ""
    return Workload(
        f"CNF {type(base).__name__}{suffix}",
        f"two-moons CNF, batch {batch} inside the state, concat-squash MLP "
        f"2-{width}-{width}-{width}-2, tanh, exact trace, {type(base).__name__}, "
        "float32"
        + (
            ", reversible through `Reversible(base, integrated=(False, True))`"
            if integrated
            else ""
        ),
        model,
        (x0, jnp.zeros(batch, jnp.float32)),
        base,
        10 if quick else 100,
        jnp.float32,
        _cnf_loss,
        (False, True) if integrated else None,
    )


# ----------------------------------------------------------------------------------
# Neural CDE


class CDE(eqx.Module):
    """z0 = initial(X(0)), dz = f(z) dX, logit = readout(z(1))."""

    initial: eqx.nn.Linear
    field: eqx.nn.MLP
    readout: eqx.nn.Linear
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(self, channels: int, hidden: int, width: int, depth: int, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.initial = eqx.nn.Linear(channels, hidden, key=k1)
        self.field = eqx.nn.MLP(
            hidden,
            hidden * channels,
            width,
            depth,
            activation=jax.nn.softplus,
            final_activation=jnp.tanh,
            key=k2,
        )
        self.readout = eqx.nn.Linear(hidden, 1, key=k3)
        self.hidden, self.channels = hidden, channels


def _cde_field(t, z, model):
    return model.field(z).reshape(model.hidden, model.channels)


def _cde_loss(model, data, solver, adjoint, work):
    ts, values, labels = data

    def logit(t, v):
        control = diffrax.CubicInterpolation(
            t, diffrax.backward_hermite_coefficients(t, v)
        )
        z0 = model.initial(control.evaluate(t[0]))
        term = diffrax.ControlTerm(_cde_field, control)
        return model.readout(work.solve(term, solver, adjoint, z0, model))[0]

    logits = jax.vmap(logit)(ts, values)
    return -jnp.mean(
        labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits)
    )


def neural_cde(quick: bool) -> Workload:
    batch, num_obs = (4, 12) if quick else (32, 48)
    hidden, width, depth = (8, 8, 2) if quick else (32, 32, 4)
    return Workload(
        "CDE",
        f"neural CDE, hidden {hidden}, MLP width {width} depth {depth}, cubic "
        f"interpolation of 3-channel spirals ({num_obs} observations), batch "
        f"{batch} by vmap, Heun, float64",
        CDE(3, hidden, width, depth, jax.random.PRNGKey(0)),
        make_spirals(jax.random.PRNGKey(1), batch, num_obs),
        diffrax.Heun(),
        50 if quick else 1000,
        jnp.float64,
        _cde_loss,
    )


# ----------------------------------------------------------------------------------
# Neural PDE


class ReactionDiffusion(eqx.Module):
    """du/dt = diffusion * Laplacian(u) + g(u), g a 3x3 conv net 1-c-1 (tanh), on a
    periodic grid, the Laplacian the 5-point stencil in grid units."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    diffusion: float = eqx.field(static=True)

    def __init__(self, channels: int, key: jax.Array, diffusion: float = 0.5):
        k1, k2 = jax.random.split(key)
        kw = dict(kernel_size=3, padding=0, dtype=jnp.float32)
        self.conv1 = eqx.nn.Conv2d(1, channels, key=k1, **kw)
        self.conv2 = eqx.nn.Conv2d(channels, 1, key=k2, **kw)
        self.diffusion = diffusion

    def __call__(self, t, u):
        del t
        lap = (
            jnp.roll(u, 1, 0)
            + jnp.roll(u, -1, 0)
            + jnp.roll(u, 1, 1)
            + jnp.roll(u, -1, 1)
            - 4 * u
        )

        def wrap(x):
            return jnp.pad(x, ((0, 0), (1, 1), (1, 1)), mode="wrap")

        h = jnp.tanh(self.conv1(wrap(u[None])))
        return self.diffusion * lap + self.conv2(wrap(h))[0]


def neural_pde(quick: bool) -> Workload:
    n, channels = (16, 2) if quick else (64, 4)
    x = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u0 = np.sin(x)[:, None] * np.cos(2 * x)[None, :] + 0.1 * np.random.default_rng(
        0
    ).standard_normal((n, n))
    return Workload(
        "PDE",
        f"neural reaction-diffusion PDE on a periodic {n}x{n} grid, 3x3 conv net "
        f"1-{channels}-1, Midpoint, float32",
        ReactionDiffusion(channels, jax.random.PRNGKey(0)),
        jnp.asarray(u0, jnp.float32),
        diffrax.Midpoint(),
        100 if quick else 2000,
        jnp.float32,
        _mean_square_loss,
    )


# ----------------------------------------------------------------------------------
# Per-sample solves under `jax.vmap` (diffrax's example style, issue 22)


def _cnf_vmap_field(t, y, model):
    """d(x, log p)/dt = (f(t, x), tr df/dx) for one sample `x[2]`, the trace exact
    (reverse mode over the rows of the identity), as in diffrax's CNF example."""
    x, _ = y
    dx, vjp = jax.vjp(lambda u: model.f(t, u), x)
    (jac,) = jax.vmap(vjp)(jnp.eye(x.shape[0], dtype=x.dtype))
    return dx, jnp.trace(jac)


def _cnf_vmap_loss(model, x, solver, adjoint, work):
    t1, dt0 = work.extra["t1"], work.extra["dt0"]

    def log_likelihood(xi):
        y0 = (xi, jnp.zeros((), jnp.float32))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_cnf_vmap_field),
            solver,
            jnp.asarray(t1, jnp.float32),
            jnp.asarray(0.0, jnp.float32),
            jnp.asarray(-dt0, jnp.float32),
            y0,
            args=model,
            adjoint=adjoint,
        )
        (z,), (delta_logp,) = sol.ys  # pyright: ignore[reportGeneralTypeIssues]
        return delta_logp - 0.5 * jnp.sum(z**2) - jnp.log(2 * jnp.pi)

    return -jnp.mean(jax.vmap(log_likelihood)(x))


def cnf_vmap(quick: bool) -> Workload:
    batch, width = (16, 16) if quick else (500, 64)
    t1, dt0 = 0.5, 0.05
    return Workload(
        "CNF vmap Tsit5",
        f"two-moons CNF in diffrax's example style: one sample (x[2], log p) per "
        f"solve, `jax.vmap` over a batch of {batch}, concat-squash MLP "
        f"2-{width}-{width}-{width}-2, tanh, exact trace, Tsit5 with constant steps "
        f"from t1={t1} down to 0, float32, diffrax's default `max_steps`",
        CNF((2, width, width, width, 2), jax.random.PRNGKey(0)),
        jnp.asarray(two_moons(batch)),
        diffrax.Tsit5(),
        round(t1 / dt0),
        jnp.float32,
        _cnf_vmap_loss,
        extra=dict(t1=t1, dt0=dt0),
        default_rows=True,
    )


def example_spirals(key: jax.Array, batch: int, length: int):
    """diffrax's neural CDE example data: 2-d spirals x' = A x observed at `length`
    regular times on [0, 4 pi], time as a first channel, half of them mirrored
    (label 1); the cubic Hermite coefficients of each path. float32."""
    theta = jax.random.uniform(key, (batch,), jnp.float32, 0, 2 * np.pi)
    y0 = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    ts = jnp.broadcast_to(
        jnp.linspace(0, 4 * np.pi, length, dtype=jnp.float32), (batch, length)
    )
    matrix = jnp.array([[-0.3, 2], [-2, -0.3]], jnp.float32)
    ys = jax.vmap(
        lambda y, t: jax.vmap(lambda s: jax.scipy.linalg.expm(s * matrix) @ y)(t)
    )(y0, ts)
    ys = jnp.concatenate([ts[:, :, None], ys], axis=-1)
    ys = ys.at[: batch // 2, :, 1].multiply(-1)
    coeffs = jax.vmap(diffrax.backward_hermite_coefficients)(ts, ys)
    labels = jnp.zeros((batch,), jnp.float32).at[: batch // 2].set(1.0)
    return ts, coeffs, labels


class ExampleCDE(eqx.Module):
    """diffrax's neural CDE example: z0 = initial(X(t0)), dz = f(z) dX with f an
    MLP (softplus, tanh output), prediction sigmoid(linear(z(t1)))."""

    initial: eqx.nn.MLP
    field: eqx.nn.MLP
    linear: eqx.nn.Linear
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(self, channels: int, hidden: int, width: int, depth: int, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.initial = eqx.nn.MLP(
            channels, hidden, width, depth, key=k1, dtype=jnp.float32
        )
        self.field = eqx.nn.MLP(
            hidden,
            hidden * channels,
            width,
            depth,
            activation=jax.nn.softplus,
            final_activation=jnp.tanh,
            key=k2,
            dtype=jnp.float32,
        )
        self.linear = eqx.nn.Linear(hidden, 1, key=k3, dtype=jnp.float32)
        self.hidden, self.channels = hidden, channels

    def __call__(self, t, z, args):
        return self.field(z).reshape(self.hidden, self.channels)


def cde_vmap_solve(model, t, coeffs, solver, adjoint, max_steps):
    """One sample's solve of `cde_vmap` (its `sol.stats` count the steps)."""
    control = diffrax.CubicInterpolation(t, coeffs)
    term = diffrax.ControlTerm(model, control).to_ode()
    return diffrax.diffeqsolve(
        term,
        solver,
        t[0],
        t[-1],
        None,
        model.initial(control.evaluate(t[0])),
        stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-6),
        saveat=diffrax.SaveAt(t1=True),
        adjoint=adjoint,
        max_steps=max_steps,
    )


def _cde_vmap_loss(model, data, solver, adjoint, work):
    ts, coeffs, labels = data

    def predict(t, c):
        sol = cde_vmap_solve(model, t, c, solver, adjoint, work.num_steps)
        return jax.nn.sigmoid(model.linear(sol.ys[-1]))[0]  # pyright: ignore

    pred = jax.vmap(predict)(ts, coeffs)
    return -jnp.mean(labels * jnp.log(pred) + (1 - labels) * jnp.log(1 - pred))


def cde_vmap(quick: bool) -> Workload:
    batch, length, width = (4, 20, 16) if quick else (32, 100, 128)
    return Workload(
        "CDE vmap Tsit5 PID",
        f"neural CDE in diffrax's example style: hidden 8, MLP width {width} depth 1 "
        f"(softplus, tanh output), cubic interpolation of 2-d spirals ({length} "
        f"regular observations on [0, 4 pi], time as a channel), one sample per "
        f"solve, `jax.vmap` over a batch of {batch}, Tsit5 with "
        "`PIDController(rtol=1e-3, atol=1e-6)`, `ControlTerm(...).to_ode()`, float32, "
        "N = diffrax's default `max_steps`",
        ExampleCDE(3, 8, width, 1, jax.random.PRNGKey(0)),
        example_spirals(jax.random.PRNGKey(1), batch, length),
        diffrax.Tsit5(),
        4096,
        jnp.float32,
        _cde_vmap_loss,
        default_rows=True,
    )


# ----------------------------------------------------------------------------------
# Neural SDE GAN in diffrax's example style (issue 22)


def lipswish(x: jax.Array) -> jax.Array:
    """diffrax's neural SDE example's activation: 0.909 silu(x) (Lipschitz 1)."""
    return 0.909 * jax.nn.silu(x)


class GANField(eqx.Module):
    """diffrax's neural SDE example's vector fields: an MLP of `(t, y)`, lipswish
    hidden activations, tanh output, reshaped to `shape` (the drift `(hidden,)`, a
    controlled field `(hidden, channels)`), times a fixed per-component scale."""

    scale: jax.Array | float
    mlp: eqx.nn.MLP
    shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, hidden, shape, width, depth, scale: bool, key):
        scale_key, mlp_key = jax.random.split(key)
        self.scale = (
            jax.random.uniform(scale_key, (hidden,), jnp.float32, 0.9, 1.1)
            if scale
            else 1.0
        )
        self.mlp = eqx.nn.MLP(
            hidden + 1,
            int(np.prod(shape)),
            width,
            depth,
            activation=lipswish,
            final_activation=jnp.tanh,
            key=mlp_key,
            dtype=jnp.float32,
        )
        self.shape = tuple(shape)

    def __call__(self, t, y, args):
        t = jnp.asarray(t, y.dtype)
        out = self.mlp(jnp.concatenate([t[None], y])).reshape(self.shape)
        scale = self.scale if len(self.shape) == 1 else jnp.reshape(self.scale, (-1, 1))
        return scale * out


class SDEGenerator(eqx.Module):
    """y0 = initial(noise), dy = f(t, y) dt + g(t, y) o dW (`VirtualBrownianTree`,
    tol dt0/2), saved at `ts`, read out linearly."""

    initial: eqx.nn.MLP
    vf: GANField
    cvf: GANField
    readout: eqx.nn.Linear
    noise_sizes: tuple[int, int] = eqx.field(static=True)

    def __init__(self, data, initial_noise, noise, hidden, width, depth, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        mlp = dict(dtype=jnp.float32)
        self.initial = eqx.nn.MLP(initial_noise, hidden, width, depth, key=k1, **mlp)
        self.vf = GANField(hidden, (hidden,), width, depth, True, k2)
        self.cvf = GANField(hidden, (hidden, noise), width, depth, True, k3)
        self.readout = eqx.nn.Linear(hidden, data, key=k4, dtype=jnp.float32)
        self.noise_sizes = (initial_noise, noise)


class CDEDiscriminator(eqx.Module):
    """h0 = initial(t0, x0), dh = f(t, h) dt + g(t, h) dX (X the linear
    interpolation of (t, x)), score = readout(h(t1))."""

    initial: eqx.nn.MLP
    vf: GANField
    cvf: GANField
    readout: eqx.nn.Linear

    def __init__(self, data, hidden, width, depth, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        mlp = dict(dtype=jnp.float32)
        self.initial = eqx.nn.MLP(data + 1, hidden, width, depth, key=k1, **mlp)
        self.vf = GANField(hidden, (hidden,), width, depth, False, k2)
        self.cvf = GANField(hidden, (hidden, data + 1), width, depth, False, k3)
        self.readout = eqx.nn.Linear(hidden, 1, key=k4, dtype=jnp.float32)


class SDEGAN(eqx.Module):
    generator: SDEGenerator
    discriminator: CDEDiscriminator


def _generate(gen, ts, key, solver, adjoint):
    """One sample path of the generator at `ts` (dt0 = 1, as in the example)."""
    init_key, bm_key = jax.random.split(key)
    initial_noise, noise = gen.noise_sizes
    shape = jax.ShapeDtypeStruct((noise,), jnp.float32)
    bm = diffrax.VirtualBrownianTree(ts[0], ts[-1], tol=0.5, shape=shape, key=bm_key)
    terms = diffrax.MultiTerm(diffrax.ODETerm(gen.vf), diffrax.ControlTerm(gen.cvf, bm))
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        ts[0],
        ts[-1],
        1.0,
        gen.initial(jax.random.normal(init_key, (initial_noise,), jnp.float32)),
        saveat=diffrax.SaveAt(ts=ts),
        adjoint=adjoint,
    )
    return jax.vmap(gen.readout)(sol.ys)


def _discriminate(disc, ts, ys, solver, adjoint):
    """The discriminator's score of one path `ys[t, data]` observed at `ts`."""
    path = jnp.concatenate([ts[:, None], ys], axis=1)
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(disc.vf),
        diffrax.ControlTerm(disc.cvf, diffrax.LinearInterpolation(ts, path)),
    )
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        ts[0],
        ts[-1],
        1.0,
        disc.initial(path[0]),
        saveat=diffrax.SaveAt(t1=True),
        adjoint=adjoint,
    )
    return disc.readout(sol.ys[-1])[0]  # pyright: ignore[reportOptionalSubscript]


def _sde_gan_loss(model, data, solver, adjoint, work):
    """The Wasserstein GAN objective of one training step, mean(real score - fake
    score): its gradient is that of both networks (the example then negates the
    generator's)."""
    ts, real, keys = data
    fake = jax.vmap(lambda k: _generate(model.generator, ts, k, solver, adjoint))(keys)

    def score(ys):
        return _discriminate(model.discriminator, ts, ys, solver, adjoint)

    return jnp.mean(jax.vmap(score)(real) - jax.vmap(score)(fake))


def ou_paths(key: jax.Array, batch: int, t_size: int) -> jax.Array:
    """diffrax's neural SDE example data: dy = (mu t - theta y) dt + 2 sigma t / t1
    dW, y0 ~ U(-1, 1), observed at t = 0, 1, ..., t_size - 1 (Euler-Maruyama on a
    grid 10x finer), float32, shape `(batch, t_size, 1)`."""
    mu, theta, sigma, sub = 0.02, 0.1, 0.4, 10
    t1 = t_size - 1
    k0, k1 = jax.random.split(key)
    y = jax.random.uniform(k0, (batch,), jnp.float32, -1.0, 1.0)
    dw = jax.random.normal(k1, (t1 * sub, batch), jnp.float32) * np.sqrt(1 / sub)
    out = [y]
    for n in range(t1 * sub):
        t = n / sub
        y = y + (mu * t - theta * y) / sub + 2 * sigma * t / t1 * dw[n]
        if (n + 1) % sub == 0:
            out.append(y)
    return jnp.stack(out, axis=1)[:, :, None]


def sde_gan_vmap(quick: bool) -> Workload:
    batch, t_size = (8, 8) if quick else (1024, 64)
    noise, hidden, width, depth = 3, 16, 16, 1
    kg, kd, kx, kn = jax.random.split(jax.random.PRNGKey(0), 4)
    model = SDEGAN(
        SDEGenerator(1, 5, noise, hidden, width, depth, kg),
        CDEDiscriminator(1, hidden, width, depth, kd),
    )
    ts = jnp.arange(t_size, dtype=jnp.float32)
    data = (ts, ou_paths(kx, batch, t_size), jax.random.split(kn, batch))
    return Workload(
        "SDE GAN vmap ReversibleHeun",
        "neural SDE GAN in diffrax's example style: generator SDE (initial noise 5, "
        f"Brownian noise {noise}, hidden {hidden}, MLPs width {width} depth {depth}, "
        "lipswish, tanh output; `VirtualBrownianTree`, `SaveAt(ts)` at "
        f"{t_size} times) and neural CDE discriminator, one path per solve, "
        f"`jax.vmap` over a batch of {batch} fake and {batch} real paths, "
        f"`ReversibleHeun` with dt0 = 1 on [0, {t_size - 1}], float32, diffrax's "
        "default `max_steps`; the gradient of the Wasserstein loss for both networks",
        model,
        data,
        diffrax.ReversibleHeun(),
        t_size - 1,
        jnp.float32,
        _sde_gan_loss,
        default_rows=True,
        reversible=revdiffrax.ReversibleHeun(),
    )


def workloads(quick: bool) -> dict[str, Callable[[], Workload]]:
    """Name -> constructor of every workload, in the order of the report (the cheap
    ones first)."""
    return {
        "white dwarf": lambda: white_dwarf(quick),
        "64x16": lambda: mlp_64x16(quick),
        "CDE": lambda: neural_cde(quick),
        "PDE": lambda: neural_pde(quick),
        "CNF Midpoint": lambda: cnf(diffrax.Midpoint(), quick),
        "CNF Midpoint integrated": lambda: cnf(diffrax.Midpoint(), quick, True),
        "CNF RK4": lambda: cnf(RK4(), quick),
        "CNF Dopri5": lambda: cnf(diffrax.Dopri5(), quick),
        "CNF vmap Tsit5": lambda: cnf_vmap(quick),
        "CDE vmap Tsit5 PID": lambda: cde_vmap(quick),
        "SaveAt(ts) 1000 times": lambda: saved_times(quick),
    }
