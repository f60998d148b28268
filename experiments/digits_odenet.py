"""An image-classification ODE-Net on scikit-learn's handwritten digits, with every
adjoint, and the compiled memory of each against the number of steps.

Data: `sklearn.datasets.load_digits` (1,797 real 8x8 grey-scale images of the
digits 0-9, shipped inside scikit-learn), scaled to [0, 1], split 80/20 (stratified)
into training and test sets. Model (the ODE-Net of Chen et al. 2018, scaled down to
8x8 images): a 3x3 convolution 1 -> C channels, then the ODE block
dh/dt = f(t, h) on the C x 8 x 8 feature map, f being two 3x3 convolutions C+1 -> C
with tanh between them and the time as an extra input channel (`ConcatConv`), then
a linear layer from the flattened feature map to the 10 classes. The block is solved
with N fixed steps on [0, 1] by `Reversible(base, 0.999)`; cross-entropy loss,
`optax.adamw`, minibatches, float32.

Every adjoint trains the same model from the same initialisation and minibatches
(`ReversibleAdjoint`, `RecursiveCheckpointAdjoint(c)` for c in {2, 8,
floor(sqrt(2N)), N}, `DirectAdjoint`; see `experiments.adjoint_table`); reported:
training loss, test accuracy, median time per iteration, compile time, compiled temp
memory and peak RSS. A second measurement compiles (without running) the training
step for several N and plots compiled temp memory against N.

    python -m experiments.digits_odenet --quick --out /tmp/digits
    python -m experiments.digits_odenet --out results
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from . import adjoint_table as at, training_loop as tl
from .harness import compile_timed
from .solvers import make_solver, SOLVERS


DTYPE = jnp.float32


def load_digit_images(seed: int = 0, test_fraction: float = 0.2) -> dict:
    """`load_digits` as float32 images (n, 1, 8, 8) in [0, 1], split stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)


class ConcatConv(eqx.Module):
    """A 3x3 convolution that sees the time as an extra input channel."""

    conv: eqx.nn.Conv2d

    def __init__(self, channels: int, *, key: jax.Array):
        self.conv = eqx.nn.Conv2d(
            channels + 1, channels, 3, padding=1, key=key, dtype=DTYPE
        )

    def __call__(self, t: jax.Array, h: jax.Array) -> jax.Array:
        tt = jnp.full((1, *h.shape[1:]), t, h.dtype)
        return self.conv(jnp.concatenate([tt, h]))


class ConvField(eqx.Module):
    """f(t, h) = conv2(t, tanh(conv1(t, h))) on one C x 8 x 8 feature map."""

    conv1: ConcatConv
    conv2: ConcatConv

    def __init__(self, channels: int, *, key: jax.Array):
        k1, k2 = jr.split(key)
        self.conv1 = ConcatConv(channels, key=k1)
        self.conv2 = ConcatConv(channels, key=k2)

    def __call__(self, t: jax.Array, h: jax.Array) -> jax.Array:
        return self.conv2(t, jnp.tanh(self.conv1(t, h)))


class ODENet(eqx.Module):
    """Convolutional stem, ODE block, linear classifier of the flattened map (a
    spatial mean instead learns far more slowly at this size)."""

    stem: eqx.nn.Conv2d
    field: ConvField
    head: eqx.nn.Linear

    def __init__(self, channels: int, *, key: jax.Array):
        k1, k2, k3 = jr.split(key, 3)
        self.stem = eqx.nn.Conv2d(1, channels, 3, padding=1, key=k1, dtype=DTYPE)
        self.field = ConvField(channels, key=k2)
        self.head = eqx.nn.Linear(channels * 64, 10, key=k3, dtype=DTYPE)


def _block_field(t, h, field: ConvField):
    return jax.vmap(lambda hi: field(t, hi))(h)


def logits(
    model: ODENet,
    x: jax.Array,
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    num_steps: int,
) -> jax.Array:
    """Class scores (B, 10) of images x (B, 1, 8, 8)."""
    h0 = jnp.tanh(jax.vmap(model.stem)(x))
    # Times in the state's dtype, so that float64 times do not promote the solve.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_block_field),
        solver,
        jnp.asarray(0.0, DTYPE),
        jnp.asarray(1.0, DTYPE),
        jnp.asarray(1.0 / num_steps, DTYPE),
        h0,
        args=model.field,
        adjoint=adjoint,
        max_steps=num_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    return jax.vmap(model.head)(sol.ys[-1].reshape(x.shape[0], -1))


def make_loss(static, batch: int, num_steps: int):
    """(solver, adjoint) -> loss(params, key, data): the cross-entropy and accuracy
    of a minibatch drawn from `key`."""

    def make(solver, adjoint):
        def loss_fn(params, key, data):
            x, y = data
            idx = jr.choice(key, x.shape[0], (batch,), replace=False)
            out = logits(
                eqx.combine(params, static), x[idx], solver, adjoint, num_steps
            )
            loss = jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(out, y[idx])
            )
            return loss, jnp.mean(jnp.argmax(out, -1) == y[idx])

        return loss_fn

    return make


def make_evaluate(static, data: dict, num_steps: int):
    """(params, solver) -> test and training accuracy (forward solves only)."""

    @eqx.filter_jit
    def accuracy(params, solver, x, y):
        model = eqx.combine(params, static)
        adjoint = diffrax.RecursiveCheckpointAdjoint()  # forward only
        return jnp.mean(
            jnp.argmax(logits(model, x, solver, adjoint, num_steps), -1) == y
        )

    def evaluate(params, solver):
        x_te, y_te, x_tr, y_tr = (
            data[k] for k in ("x_test", "y_test", "x_train", "y_train")
        )
        return {
            "test accuracy": float(accuracy(params, solver, x_te, y_te)),
            "train accuracy": float(accuracy(params, solver, x_tr, y_tr)),
        }

    return evaluate


def memory_against_steps(
    static,
    params,
    optim,
    args,
    data,
    steps_list: Sequence[int],
    known: dict[tuple[int, str], int | None],
) -> dict[str, list]:
    """Compiled temp memory of the training step for each N and adjoint (compiled,
    not run); `known` maps (N, label) to temp memory already measured."""
    curves: dict[str, list] = {}
    key = jr.PRNGKey(0)
    opt_state = optim.init(params)
    for n in steps_list:
        group = _group(args, static, n)
        for spec in at.parse_adjoints(args.memory_adjoints, n):
            name = spec.label if spec.kind != "checkpoint" else None
            name = name or _checkpoint_curve_name(spec, n, args.memory_adjoints)
            temp = known.get((n, spec.label))
            if (n, spec.label) not in known:
                _, _, temp = compile_timed(
                    group.make_step(spec, optim), params, opt_state, key, data
                )
            curves.setdefault(name, []).append((n, temp))
    return curves


def _checkpoint_curve_name(spec: at.AdjointSpec, n: int, adjoints: str) -> str:
    """A curve per entry of --memory-adjoints: checkpoint(sqrt) stays one curve
    across N although its count changes."""
    from .solvers import sqrt_checkpoints

    if "checkpoint:sqrt" in adjoints and spec.checkpoints == sqrt_checkpoints(n):
        return "checkpoint(floor(sqrt(2N)))"
    if "checkpoint:N" in adjoints and spec.checkpoints == n:
        return "checkpoint(N)"
    return spec.label


def plot_memory_steps(curves: dict[str, list], title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in curves.items():
        ns = [n for n, b in pts if b is not None]
        ax.plot(ns, [b / 2**20 for n, b in pts if b is not None], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of steps N")
    ax.set_ylabel("compiled temp memory of the training step (MiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return at.save_figure(fig, path)


def write_markdown(result: dict) -> str:
    cfg = result["config"]
    bullets = [
        f"Data: `sklearn.datasets.load_digits` (1,797 real 8x8 images), "
        f"{cfg['num_train']} training / {cfg['num_test']} test images (stratified "
        f"split, seed {cfg['seed']}); minibatch {cfg['batch']}.",
        f"Model: conv stem 1 -> {cfg['channels']} channels, ODE block with two 3x3 "
        "`ConcatConv` layers (time as a channel) and tanh, linear classifier of "
        "the flattened feature map; float32.",
        f"Solve: N = {cfg['steps']} fixed steps on [0, 1], `Reversible("
        f"{cfg['solver']}, {cfg['coupling']})` for every adjoint; "
        f"`optax.adamw({cfg['lr']:g})`.",
    ]
    text = at.report_markdown(
        result,
        "ODE-Net on scikit-learn's digits: memory and time per adjoint",
        bullets,
        "test accuracy",
        "loss",
        "accuracy on the test images after training (train accuracy in the JSON)",
    )
    mem = result.get("memory_vs_steps") or {}
    if mem:
        ns = sorted({n for pts in mem.values() for n, _ in pts})
        rows = []
        for name, pts in mem.items():
            by_n = dict(pts)
            rows.append([name] + [at.fmt_bytes(by_n.get(n)) for n in ns])
        text += (
            "\n## Compiled temp memory of the training step against N\n\n"
            "Compiled, not run (same model and minibatch size).\n\n"
            + at.markdown_table(["adjoint"] + [f"N = {n}" for n in ns], rows)
            + "\n"
        )
    return text


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.digits_odenet",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--solver", default="midpoint", help="base solver")
    p.add_argument("--steps", type=int, default=None, help="N (default 20)")
    p.add_argument("--channels", type=int, default=None, help="default 8")
    p.add_argument("--batch", type=int, default=None, help="default 128")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--coupling", type=float, default=0.999)
    p.add_argument(
        "--memory-steps",
        type=int,
        nargs="*",
        default=None,
        help="N of the memory-against-steps plot (default 10 20 40 80; none: skip)",
    )
    p.add_argument(
        "--memory-adjoints",
        default=None,
        help="adjoints of the memory-against-steps plot (default reversible,"
        "checkpoint:8,checkpoint:sqrt,direct)",
    )
    at.add_common_flags(p, "digits_odenet")
    return p


QUICK = dict(
    iters=3,
    time_iters=2,
    steps=4,
    channels=4,
    batch=32,
    adjoints="reversible,direct",
    memory_steps=[4, 32],
    memory_adjoints="reversible,direct",
)
FULL = dict(
    iters=100,
    time_iters=3,
    steps=20,
    channels=8,
    batch=128,
    adjoints=at.DEFAULT_ADJOINTS,
    memory_steps=[10, 20, 40, 80],
    memory_adjoints="reversible,checkpoint:8,checkpoint:sqrt,direct",
)
CONFIG_KEYS = (
    "solver",
    "adjoints",
    "iters",
    "time_iters",
    "steps",
    "channels",
    "batch",
    "lr",
    "coupling",
    "seed",
    "max_run_mib",
    "memory_steps",
    "memory_adjoints",
)


def _group(
    args: argparse.Namespace, static, num_steps: int, split: dict | None = None
) -> tl.Group:
    """The training step of N = `num_steps` (evaluated on `split`, if given)."""
    return tl.Group(
        loss=make_loss(static, args.batch, num_steps),
        solver=make_solver(args.solver, coupling=args.coupling),
        base_solver=make_solver(args.solver, reversible=False),
        num_steps=num_steps,
        evaluate=None if split is None else make_evaluate(static, split, num_steps),
    )


def setup(args: argparse.Namespace) -> tl.Setup:
    """Data, model and the one table (N = --steps)."""
    if args.solver not in SOLVERS:
        raise SystemExit(f"error: unknown solver {args.solver!r}")
    split = load_digit_images(args.seed)
    model = ODENet(args.channels, key=jr.PRNGKey(args.seed))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return tl.Setup(
        params=params,
        optim=optax.adamw(args.lr),
        data=(jnp.asarray(split["x_train"]), jnp.asarray(split["y_train"])),
        groups={
            f"Reversible({args.solver}), N = {args.steps}": _group(
                args, static, args.steps, split
            )
        },
        title=f"ODE-Net on digits, {args.solver}, N = {args.steps}",
        config=dict(num_train=len(split["y_train"]), num_test=len(split["y_test"])),
        private=dict(static=static),
    )


def extras(args: argparse.Namespace, setup: tl.Setup, result: dict, trained) -> None:
    """Compiled temp memory of the training step against N, and its plot."""
    (records,) = result["tables"].values()
    known = {(args.steps, r["label"]): r["temp_bytes"] for r in records}
    curves = memory_against_steps(
        setup.private["static"],
        setup.params,
        setup.optim,
        args,
        setup.data,
        args.memory_steps,
        known,
    )
    result["memory_vs_steps"] = curves
    if curves and not args.no_plots:
        result["plots"].append(
            plot_memory_steps(
                curves,
                f"ODE-Net on digits, {args.solver}: compiled temp memory against N",
                os.path.join(args.out, "digits_odenet_memory_steps.png"),
            )
        )


EXPERIMENT = tl.AdjointExperiment(
    name="digits_odenet",
    make_parser=make_parser,
    quick=QUICK,
    full=FULL,
    config_keys=CONFIG_KEYS,
    setup=setup,
    write_markdown=write_markdown,
    metric="test accuracy",
    loss_name="loss",
    loss_ylabel="minibatch cross-entropy",
    extras=extras,
)


def main(argv: Sequence[str] | None = None) -> dict:
    return tl.run(argv, EXPERIMENT)


if __name__ == "__main__":
    main()
