"""A continuous normalising flow (FFJORD) on two moons, with every adjoint.

The published memory experiment of McCallum & Foster (arXiv 2410.11648, first
version): `sklearn.datasets.make_moons(1000, noise=0.05)`, standardised; the flow
dx/dt = f(t, x) is an MLP of 4 concat-squash layers 2-W-W-W-2 (W = 128 published),
tanh; the log-density is integrated alongside,

    d(x, a)/dt = (f(t, x), -tr(df/dx)),   log p(x0) = log N(x(1); 0, I) - a(1),

with the exact trace (d Jacobian-vector products) or Hutchinson's estimator
(`--trace hutchinson`: one Rademacher vector per point and iteration). The state is
the pair `(x, a)`; `a` does not feed back into the dynamics (an integrated
component). h = 1/N on [0, 1] (N = 100: h = 0.01), `Reversible(base, 0.999)` for
base in Midpoint, RK4 and Dopri5, `optax.adamw(1e-3)`, float32 (as on the GPU).

Every adjoint trains the same model from the same initialisation and minibatches:
`ReversibleAdjoint`, `RecursiveCheckpointAdjoint(c)` for c in {2, 8, floor(sqrt(2N)),
N} and `DirectAdjoint` (see `experiments.adjoint_table`). Reported per adjoint: the
training NLL, the NLL of the whole data set (exact trace), the median time per
iteration, the compile time, the compiled temp memory of the training step and the
peak RSS.

    python -m experiments.cnf --quick --out /tmp/cnf
    python -m experiments.cnf --out results      # see results/cnf.md for the command
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import PyTree

from . import adjoint_table as at, training_loop as tl
from .solvers import make_solver, SOLVERS


DTYPE = jnp.float32


# ---------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------


def two_moons(num: int, seed: int = 0) -> np.ndarray:
    """`make_moons(num, noise=0.05)`, standardised to zero mean and unit variance."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(num, noise=0.05, random_state=seed)
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


class ConcatSquash(eqx.Module):
    """FFJORD's concat-squash layer: `W x * sigmoid(g t + c) + b t`."""

    linear: eqx.nn.Linear
    gate: eqx.nn.Linear
    shift: eqx.nn.Linear

    def __init__(self, in_size: int, out_size: int, *, key: jax.Array):
        k1, k2, k3 = jr.split(key, 3)
        self.linear = eqx.nn.Linear(in_size, out_size, key=k1, dtype=DTYPE)
        self.gate = eqx.nn.Linear(1, out_size, key=k2, dtype=DTYPE)
        self.shift = eqx.nn.Linear(1, out_size, use_bias=False, key=k3, dtype=DTYPE)

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        tt = jnp.reshape(t, (1,)).astype(x.dtype)
        return self.linear(x) * jax.nn.sigmoid(self.gate(tt)) + self.shift(tt)


class Flow(eqx.Module):
    """f(t, x): concat-squash layers dim-W-...-W-dim with tanh between them."""

    layers: tuple[ConcatSquash, ...]

    def __init__(self, dim: int, width: int, num_layers: int, *, key: jax.Array):
        sizes = [dim] + [width] * (num_layers - 1) + [dim]
        keys = jr.split(key, num_layers)
        self.layers = tuple(
            ConcatSquash(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys)
        )

    def __call__(self, t: jax.Array, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(t, x))
        return self.layers[-1](t, x)


def exact_divergence(lin, x: jax.Array) -> jax.Array:
    """tr(df/dx) per point from the linearised batched flow `lin`: one JVP per
    dimension, on the whole batch (batched matmuls, unlike a per-point jacfwd)."""
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    return sum(lin(jnp.broadcast_to(e, x.shape))[:, i] for i, e in enumerate(eye))


def cnf_field(t, y, args):
    """d(x, a)/dt = (f(t, x), -tr(df/dx)): `a` is computed from `x` only and does
    not feed back (an integrated component). `args = (flow, eps)`; `eps` is None for
    the exact trace, else Hutchinson's noise, one vector per point."""
    flow, eps = args
    x, _ = y
    dx, lin = jax.linearize(jax.vmap(lambda xi: flow(t, xi)), x)
    if eps is None:
        div = exact_divergence(lin, x)
    else:
        div = jnp.sum(lin(eps) * eps, axis=-1)
    return dx, -div


def push_forward(
    flow: Flow,
    x: jax.Array,
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    num_steps: int,
    eps: jax.Array | None = None,
) -> jax.Array:
    """log p(x) per point: solve (x, a) from t = 0 to 1 with N fixed steps."""
    y0 = (x, jnp.zeros(x.shape[0], x.dtype))
    # Times in the state's dtype: float64 times (x64 is on) would promote the
    # whole solve to float64.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(cnf_field),
        solver,
        jnp.asarray(0.0, x.dtype),
        jnp.asarray(1.0, x.dtype),
        jnp.asarray(1.0 / num_steps, x.dtype),
        y0,
        args=(flow, eps),
        adjoint=adjoint,
        max_steps=num_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    z, a = sol.ys[0][-1], sol.ys[1][-1]
    log_normal = -0.5 * jnp.sum(z**2, -1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    return log_normal - a


def sample(
    flow: Flow, key: jax.Array, num: int, base: str, num_steps: int
) -> jax.Array:
    """Samples: z ~ N(0, I) carried from t = 1 back to t = 0 by the plain base
    solver (no gradient needed, so no reversible solver)."""
    z = jr.normal(key, (num, 2), DTYPE)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, x, f: jax.vmap(lambda xi: f(t, xi))(x)),
        make_solver(base, reversible=False),
        jnp.asarray(1.0, DTYPE),
        jnp.asarray(0.0, DTYPE),
        jnp.asarray(-1.0 / num_steps, DTYPE),
        z,
        args=flow,
        max_steps=num_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    return sol.ys[-1]


# ---------------------------------------------------------------------------
# Training step and evaluation
# ---------------------------------------------------------------------------


def make_loss(static, cfg: argparse.Namespace):
    """(solver, adjoint) -> loss(params, key, data): the NLL of a minibatch (and
    Hutchinson noise) drawn from `key`."""

    def make(solver, adjoint):
        def loss_fn(params, key, data):
            flow = eqx.combine(params, static)
            kb, ke = jr.split(key)
            x = data
            if cfg.batch < data.shape[0]:
                x = data[jr.choice(kb, data.shape[0], (cfg.batch,), replace=False)]
            eps = None
            if cfg.trace == "hutchinson":
                eps = jr.rademacher(ke, x.shape, dtype=x.dtype)
            loss = -jnp.mean(push_forward(flow, x, solver, adjoint, cfg.steps, eps))
            return loss, loss  # (the metric reported is the loss itself)

        return loss_fn

    return make


def make_evaluate(static, data: jax.Array, num_steps: int):
    """(params, solver) -> {"NLL": exact-trace NLL of the whole data set}."""

    @eqx.filter_jit
    def nll(params, solver):
        flow = eqx.combine(params, static)
        adjoint = diffrax.RecursiveCheckpointAdjoint()  # forward only
        return -jnp.mean(push_forward(flow, data, solver, adjoint, num_steps))

    return lambda params, solver: {"NLL": float(nll(params, solver))}


# ---------------------------------------------------------------------------
# Plots and report
# ---------------------------------------------------------------------------


def plot_density(
    data: np.ndarray, runs: dict[str, PyTree], static, cfg, path: str
) -> str:
    """Data, the learned density and samples of each solver's reversible model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 1 + 2 * len(runs)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8))
    lim = 2.5
    axes[0].scatter(data[:, 0], data[:, 1], s=2)
    axes[0].set_title("data", fontsize=8)
    g = np.linspace(-lim, lim, cfg.grid)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(np.float32)
    for i, (base, params) in enumerate(runs.items()):
        flow = eqx.combine(params, static)
        solver = make_solver(base, coupling=cfg.coupling, **_integrated(cfg))
        logp = jax.jit(
            lambda x: push_forward(
                flow, x, solver, diffrax.RecursiveCheckpointAdjoint(), cfg.steps
            )
        )(jnp.asarray(grid))
        ax = axes[1 + 2 * i]
        ax.imshow(
            np.exp(np.asarray(logp)).reshape(cfg.grid, cfg.grid),
            origin="lower",
            extent=(-lim, lim, -lim, lim),
            cmap="viridis",
        )
        ax.set_title(f"density, {base}", fontsize=8)
        xs = np.asarray(sample(flow, jr.PRNGKey(1), data.shape[0], base, cfg.steps))
        ax = axes[2 + 2 * i]
        ax.scatter(xs[:, 0], xs[:, 1], s=2, color="tab:orange")
        ax.set_title(f"samples, {base}", fontsize=8)
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.suptitle(
        f"CNF on two moons after {cfg.iters} iterations (ReversibleAdjoint)",
        fontsize=9,
    )
    return at.save_figure(fig, path)


def write_markdown(result: dict) -> str:
    cfg = result["config"]
    bullets = [
        f"Data: `make_moons({cfg['num_data']}, noise=0.05)`, standardised; minibatch "
        f"{cfg['batch']} per iteration.",
        f"Model: {cfg['layers']} concat-squash layers 2-{cfg['width']}-...-2, tanh "
        f"(published width 128); {cfg['trace']} trace; state `(x, logp)`, the "
        "log-density computed from x only"
        + (
            ", declared integrated (`integrated=(False, True)`)."
            if cfg.get("integrated")
            else " (coupled like x: run without `--integrated`)."
        ),
        f"Solve: N = {cfg['steps']} fixed steps (h = {1 / cfg['steps']:g}) on [0, 1], "
        f"`Reversible(base, {cfg['coupling']})` for every adjoint; "
        f"`optax.adamw({cfg['lr']:g})`; float32; seed {cfg['seed']}. Published: "
        "10,000 iterations on the whole data set, width 128.",
    ]
    return at.report_markdown(
        result,
        "Continuous normalising flow (FFJORD) on two moons: memory and time per "
        "adjoint",
        bullets,
        "NLL",
        "NLL",
        "exact-trace NLL of the whole data set after training",
    )


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _integrated(cfg) -> dict:
    """`Reversible`'s keyword for `--integrated`."""
    return {"integrated": (False, True)} if getattr(cfg, "integrated", False) else {}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.cnf", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--solvers", nargs="+", default=None, help="default midpoint rk4 dopri5"
    )
    p.add_argument("--steps", type=int, default=None, help="N (default 100)")
    p.add_argument("--width", type=int, default=None, help="default 64")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="default 128")
    p.add_argument("--num-data", type=int, default=1000)
    p.add_argument("--trace", choices=("exact", "hutchinson"), default="exact")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--coupling", type=float, default=0.999)
    p.add_argument(
        "--integrated",
        action="store_true",
        help="declare the log-density integrated: `Reversible(..., integrated=(False, "
        "True))`, one trace evaluation per step instead of two",
    )
    p.add_argument("--grid", type=int, default=None, help="density plot resolution")
    at.add_common_flags(p, "cnf")
    return p


QUICK = dict(
    iters=3,
    time_iters=2,
    steps=10,
    width=16,
    batch=64,
    grid=20,
    solvers=["midpoint"],
    adjoints="reversible,direct",
)
FULL = dict(
    iters=30,
    time_iters=3,
    steps=100,
    width=64,
    batch=128,
    grid=60,
    solvers=["midpoint", "rk4", "dopri5"],
    adjoints=at.DEFAULT_ADJOINTS,
)
CONFIG_KEYS = (
    "solvers",
    "adjoints",
    "iters",
    "time_iters",
    "steps",
    "width",
    "layers",
    "batch",
    "num_data",
    "trace",
    "lr",
    "coupling",
    "integrated",
    "seed",
    "max_run_mib",
)


def setup(args: argparse.Namespace) -> tl.Setup:
    """Data, model and one table per base solver."""
    for s in args.solvers:
        if s not in SOLVERS:
            raise SystemExit(
                f"error: unknown solver {s!r}; choose from {sorted(SOLVERS)}"
            )
    data = jnp.asarray(two_moons(args.num_data, args.seed))
    flow = Flow(2, args.width, args.layers, key=jr.PRNGKey(args.seed))
    params, static = eqx.partition(flow, eqx.is_inexact_array)
    groups = {
        base: tl.Group(
            loss=make_loss(static, args),
            solver=make_solver(base, coupling=args.coupling, **_integrated(args)),
            base_solver=make_solver(base, reversible=False),
            num_steps=args.steps,
            evaluate=make_evaluate(static, data, args.steps),
        )
        for base in args.solvers
    }
    return tl.Setup(
        params=params,
        optim=optax.adamw(args.lr),
        data=data,
        groups=groups,
        title=f"CNF, two moons, N = {args.steps}",
        private=dict(static=static),
    )


def extras(args: argparse.Namespace, setup: tl.Setup, result: dict, trained) -> None:
    """The density plot of each solver's reversible model (first of the plots)."""
    static = setup.private["static"]
    models = {b: p["reversible"] for b, p in trained.items() if "reversible" in p}
    if not args.no_plots:
        path = os.path.join(args.out, "cnf_density.png")
        plot = plot_density(np.asarray(setup.data), models, static, args, path)
        result["plots"].insert(0, plot)


EXPERIMENT = tl.AdjointExperiment(
    name="cnf",
    make_parser=make_parser,
    quick=QUICK,
    full=FULL,
    config_keys=CONFIG_KEYS,
    setup=setup,
    write_markdown=write_markdown,
    metric="NLL",
    loss_name="NLL",
    loss_ylabel="minibatch NLL",
    extras=extras,
)


def main(argv: Sequence[str] | None = None) -> dict:
    return tl.run(argv, EXPERIMENT)


if __name__ == "__main__":
    main()
