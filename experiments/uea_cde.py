"""A neural CDE classifying real multivariate time series (UEA JapaneseVowels by
default), with every adjoint.

Data: the UEA archive's `.ts` files shipped inside sktime's wheel (read by
`experiments.ts_data`, without importing sktime): JapaneseVowels, 9 speakers, 12
LPC cepstrum coefficients per frame, 7 to 29 frames per utterance, 270 training and
370 test utterances (`--dataset BasicMotions`, or any archive data set with
`--data-dir`). Each series is standardised per channel (training statistics), gets
a time channel, is padded by holding its last value (so the hidden state stops at
its end) and is turned into a control X by `backward_hermite_coefficients` and
`CubicInterpolation`.

Model (the published size: hidden 32, vector field MLP width 32 depth 4): z(0) =
Linear(X(0)); dz = f(z) dX with f an MLP hidden -> hidden x channels (softplus,
final tanh); class scores Linear(z(1)). Solved with `Reversible(base, 0.999)` and N =
`steps_per_obs` x (length - 1) fixed steps on [0, 1]; cross-entropy,
`optax.adamw`, float32, full batch by default.

Every adjoint trains the same model from the same initialisation (see
`experiments.adjoint_table`); reported: training loss, test accuracy, median time
per iteration, compile time, compiled temp memory and peak RSS. The synthetic
spirals example stays in `experiments.neural_cde`.

    python -m experiments.uea_cde --quick --out /tmp/uea
    python -m experiments.uea_cde --out results
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from . import adjoint_table as at, training_loop as tl
from .solvers import make_solver, SOLVERS
from .ts_data import channel_stats, find_split, load_ts, to_arrays


DTYPE = jnp.float32


def load_dataset(name: str, data_dir: str | None, max_cases: int | None) -> dict:
    """Training and test arrays (values with time channel, labels) of a data set."""
    train = load_ts(find_split(name, "TRAIN", data_dir))
    test = load_ts(find_split(name, "TEST", data_dir))
    if train.class_labels != test.class_labels or train.dims != test.dims:
        raise ValueError(f"{name}: training and test files disagree on the classes")
    length = max(len(s) for s in train.series + test.series)
    mean, std = channel_stats(train)
    x_tr, y_tr = to_arrays(train, length, mean, std)
    x_te, y_te = to_arrays(test, length, mean, std)
    if max_cases is not None:
        # A random subset: the files are sorted by class.
        rng = np.random.default_rng(0)
        i_tr = rng.permutation(len(y_tr))[:max_cases]
        i_te = rng.permutation(len(y_te))[:max_cases]
        x_tr, y_tr, x_te, y_te = x_tr[i_tr], y_tr[i_tr], x_te[i_te], y_te[i_te]
    return dict(
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        length=length,
        classes=train.class_labels,
        name=train.name,
    )


class NeuralCDE(eqx.Module):
    """z(0) = initial(X(0)); dz = field(z) dX; scores = readout(z(1))."""

    initial: eqx.nn.Linear
    field: eqx.nn.MLP
    readout: eqx.nn.Linear
    hidden: int = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    def __init__(
        self, channels: int, hidden: int, width: int, depth: int, classes: int, *, key
    ):
        k1, k2, k3 = jr.split(key, 3)
        self.initial = eqx.nn.Linear(channels, hidden, key=k1, dtype=DTYPE)
        self.field = eqx.nn.MLP(
            hidden,
            hidden * channels,
            width,
            depth,
            activation=jax.nn.softplus,
            final_activation=jnp.tanh,
            key=k2,
            dtype=DTYPE,
        )
        self.readout = eqx.nn.Linear(hidden, classes, key=k3, dtype=DTYPE)
        self.hidden, self.channels = hidden, channels


def _cde_field(t, z, model: NeuralCDE):
    return model.field(z).reshape(model.hidden, model.channels)


def scores(
    model: NeuralCDE,
    values: jax.Array,
    solver: diffrax.AbstractSolver,
    adjoint: diffrax.AbstractAdjoint,
    num_steps: int,
) -> jax.Array:
    """Class scores of one series `values` (length, channels) observed at equally
    spaced times on [0, 1]."""
    ts = jnp.linspace(0.0, 1.0, values.shape[0], dtype=DTYPE)
    control = diffrax.CubicInterpolation(
        ts, diffrax.backward_hermite_coefficients(ts, values)
    )
    sol = diffrax.diffeqsolve(
        diffrax.ControlTerm(_cde_field, control),
        solver,
        ts[0],
        ts[-1],
        jnp.asarray(1.0 / num_steps, DTYPE),
        model.initial(values[0]),
        args=model,
        adjoint=adjoint,
        max_steps=num_steps,
        saveat=diffrax.SaveAt(t1=True),
    )
    return model.readout(sol.ys[-1])


def make_loss(static, batch: int, num_steps: int):
    """(solver, adjoint) -> loss(params, key, data): the cross-entropy and accuracy
    of a minibatch drawn from `key` (the whole training set if `batch` covers it)."""

    def make(solver, adjoint):
        def loss_fn(params, key, data):
            x, y = data
            if batch < x.shape[0]:
                idx = jr.choice(key, x.shape[0], (batch,), replace=False)
                x, y = x[idx], y[idx]
            model = eqx.combine(params, static)
            out = jax.vmap(lambda v: scores(model, v, solver, adjoint, num_steps))(x)
            loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
            return loss, jnp.mean(jnp.argmax(out, -1) == y)

        return loss_fn

    return make


def make_evaluate(static, data: dict, num_steps: int):
    """(params, solver) -> test and training accuracy (forward solves only)."""

    @eqx.filter_jit
    def accuracy(params, solver, x, y):
        model = eqx.combine(params, static)
        adjoint = diffrax.RecursiveCheckpointAdjoint()  # forward only
        out = jax.vmap(lambda v: scores(model, v, solver, adjoint, num_steps))(x)
        return jnp.mean(jnp.argmax(out, -1) == y)

    def evaluate(params, solver):
        x_te, y_te, x_tr, y_tr = (
            data[k] for k in ("x_test", "y_test", "x_train", "y_train")
        )
        return {
            "test accuracy": float(accuracy(params, solver, x_te, y_te)),
            "train accuracy": float(accuracy(params, solver, x_tr, y_tr)),
        }

    return evaluate


def write_markdown(result: dict) -> str:
    cfg = result["config"]
    bullets = [
        f"Data: UEA {cfg['dataset']} from sktime's wheel (`.ts` files read by "
        f"`experiments.ts_data`): {cfg['num_train']} training / {cfg['num_test']} "
        f"test series, {cfg['channels'] - 1} channels + time, padded to "
        f"{cfg['length']} observations, {cfg['num_classes']} classes; minibatch "
        f"{cfg['batch_used']}.",
        f"Model: hidden {cfg['hidden']}, vector field MLP width {cfg['width']} depth "
        f"{cfg['depth']} (softplus, final tanh); float32.",
        f"Solve: N = {cfg['steps']} fixed steps on [0, 1] ({cfg['steps_per_obs']} per "
        f"observation interval), `Reversible({cfg['solver']}, {cfg['coupling']})` for "
        f"every adjoint; `optax.adamw({cfg['lr']:g})`.",
    ]
    return at.report_markdown(
        result,
        f"Neural CDE on UEA {cfg['dataset']}: memory and time per adjoint",
        bullets,
        "test accuracy",
        "loss",
        "accuracy on the test series after training (train accuracy in the JSON)",
    )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.uea_cde", description=__doc__.splitlines()[0]
    )
    p.add_argument("--dataset", default="JapaneseVowels")
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with <dataset>/<dataset>_TRAIN.ts and _TEST.ts "
        "(default: sktime's bundled data)",
    )
    p.add_argument("--solver", default="midpoint", help="base solver")
    p.add_argument("--steps-per-obs", type=int, default=None, help="default 2")
    p.add_argument("--hidden", type=int, default=None, help="default 32")
    p.add_argument("--width", type=int, default=None, help="default 32")
    p.add_argument("--depth", type=int, default=None, help="default 4")
    p.add_argument("--batch", type=int, default=None, help="default: all")
    p.add_argument("--max-cases", type=int, default=None, help="use fewer series")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--coupling", type=float, default=0.999)
    at.add_common_flags(p, "uea_cde")
    return p


QUICK = dict(
    iters=3,
    time_iters=2,
    steps_per_obs=1,
    hidden=8,
    width=8,
    depth=1,
    max_cases=32,
    adjoints="reversible,direct",
)
FULL = dict(
    iters=100,
    time_iters=3,
    steps_per_obs=2,
    hidden=32,
    width=32,
    depth=4,
    adjoints=at.DEFAULT_ADJOINTS,
)
CONFIG_KEYS = (
    "dataset",
    "solver",
    "adjoints",
    "iters",
    "time_iters",
    "steps_per_obs",
    "hidden",
    "width",
    "depth",
    "batch",
    "max_cases",
    "lr",
    "coupling",
    "seed",
    "max_run_mib",
)


def setup(args: argparse.Namespace) -> tl.Setup:
    """Data, model and the one table."""
    if args.solver not in SOLVERS:
        raise SystemExit(f"error: unknown solver {args.solver!r}")
    data = load_dataset(args.dataset, args.data_dir, args.max_cases)
    steps = args.steps_per_obs * (data["length"] - 1)
    channels = data["x_train"].shape[-1]
    model = NeuralCDE(
        channels,
        args.hidden,
        args.width,
        args.depth,
        len(data["classes"]),
        key=jr.PRNGKey(args.seed),
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = min(args.batch or len(data["y_train"]), len(data["y_train"]))
    group = tl.Group(
        loss=make_loss(static, batch, steps),
        solver=make_solver(args.solver, coupling=args.coupling),
        base_solver=make_solver(args.solver, reversible=False),
        num_steps=steps,
        evaluate=make_evaluate(static, data, steps),
    )
    return tl.Setup(
        params=params,
        optim=optax.adamw(args.lr),
        data=(jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])),
        groups={f"Reversible({args.solver}), N = {steps}": group},
        title=f"Neural CDE on {args.dataset}, {args.solver}, N = {steps}",
        config=dict(
            steps=steps,
            length=data["length"],
            channels=channels,
            num_classes=len(data["classes"]),
            num_train=len(data["y_train"]),
            num_test=len(data["y_test"]),
            batch_used=batch,
        ),
    )


EXPERIMENT = tl.AdjointExperiment(
    name="uea_cde",
    make_parser=make_parser,
    quick=QUICK,
    full=FULL,
    config_keys=CONFIG_KEYS,
    setup=setup,
    write_markdown=write_markdown,
    metric="test accuracy",
    loss_name="loss",
    loss_ylabel="cross-entropy",
)


def main(argv: Sequence[str] | None = None) -> dict:
    return tl.run(argv, EXPERIMENT)


if __name__ == "__main__":
    main()
