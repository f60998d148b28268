"""One command for a GPU (issue 24): the Pareto subset, the scaling tables at GPU
sizes and diffrax-example-style `vmap` training steps, in one markdown report that
names the device.

    python -m benchmarks.gpu            # about 8 minutes on one H100 (budgeted)
    python -m benchmarks.gpu --quick    # seconds, any backend (smoke test)

Sections:

1. the Pareto subset: `benchmarks.pareto` on the white dwarf, the neural PDE and
   the CNF (Midpoint), every adjoint;
2. the scaling tables of `benchmarks.scaling` at GPU sizes: the Kuramoto-type
   network at batch 64 x 1,000 oscillators and the 256 x 256 reaction-diffusion
   stencil at N = 100, 1,000, 5,000 and 10,000 steps (memory always, time up to
   10,000), the setting of the EES paper's Kuramoto comparison (Shmelev & Salvi
   2025: reversible 70.5 s / 137.8 s at 5k / 10k steps, recursive checkpointing
   107.5 s / 219.6 s, on their GPU and model; `--quick`: six float64 steps of the
   white dwarf);
3. training steps in the style of diffrax's neural ODE example: an MLP vector field
   (width 64, depth 2) fitted to a batch of 256 trajectories by `jax.vmap`, Tsit5,
   100 save times: the time of one jitted training step per adjoint.

The report goes to `benchmarks/results/gpu_<device kind>.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import revdiffrax
from benchmarks import pareto, scaling
from experiments.harness import interleaved_times, temp_bytes


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


# ----------------------------------------------------------------------------------
# diffrax-example-style vmap training steps


class Func(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        del t, args
        return self.mlp(y)


def _data(batch: int, num_ts: int):
    """Spirals of the damped linear ODE y' = A y (as diffrax's example data)."""
    ts = jnp.linspace(0.0, 10.0, num_ts)
    y0 = jax.random.uniform(jax.random.PRNGKey(0), (batch, 2), minval=-0.6, maxval=1)
    a = jnp.array([[-0.1, 1.3], [-1.0, -0.1]])
    ys = jax.vmap(lambda y: jax.vmap(lambda t: jax.scipy.linalg.expm(t * a) @ y)(ts))(
        y0
    )
    return ts, y0, ys


def vmap_training(quick: bool, repeats: int) -> list[str]:
    """Time of one jitted training step (loss, gradient, Adam update) per adjoint."""
    batch, num_ts, width = (8, 10, 8) if quick else (256, 100, 64)
    ts, y0, ys = _data(batch, num_ts)
    model = Func(
        eqx.nn.MLP(
            2, 2, width, 2, activation=jax.nn.softplus, key=jax.random.PRNGKey(1)
        )
    )
    optim = optax.adam(1e-3)
    cases = {
        "RCA, Tsit5": (diffrax.Tsit5(), diffrax.RecursiveCheckpointAdjoint()),
        "Reversible, Reversible(Tsit5)": (
            revdiffrax.Reversible(diffrax.Tsit5()),
            revdiffrax.ReversibleAdjoint(),
        ),
        "RCA, Reversible(Tsit5)": (
            revdiffrax.Reversible(diffrax.Tsit5()),
            diffrax.RecursiveCheckpointAdjoint(),
        ),
    }
    if quick:  # the smoke test: the two adjoints a user compares
        del cases["RCA, Reversible(Tsit5)"]
    fns, memory = {}, {}
    for label, (solver, adjoint) in cases.items():

        def loss(m, solver=solver, adjoint=adjoint):
            def solve(y):
                sol = diffrax.diffeqsolve(
                    diffrax.ODETerm(m),
                    solver,
                    ts[0],
                    ts[-1],
                    0.1,
                    y,
                    saveat=diffrax.SaveAt(ts=ts),
                    stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-6),
                    adjoint=adjoint,
                    max_steps=4096,
                )
                return sol.ys

            return jnp.mean((jax.vmap(solve)(y0) - ys) ** 2)

        def step(m, state, loss=loss):
            value, grads = eqx.filter_value_and_grad(loss)(m)
            updates, state = optim.update(grads, state)
            return eqx.apply_updates(m, updates), state, value

        state = optim.init(eqx.filter(model, eqx.is_inexact_array))
        compiled = eqx.filter_jit(step).lower(model, state).compile()
        memory[label] = temp_bytes(compiled)
        fns[label] = (lambda x, f=compiled: f(*x), (model, state))
    times = interleaved_times(fns, repeats)
    lines = [
        f"Batch {batch} by `jax.vmap`, {num_ts} save times on [0, 10], MLP 2-{width}-"
        f"{width}-2 (softplus), PIDController(rtol=1e-3, atol=1e-6), float32.",
        "",
        "| adjoint, solver | step time (s) | compiled memory (MiB) |",
        "|---|---:|---:|",
    ]
    for label in fns:
        mem = memory[label]
        lines.append(
            f"| {label} | {times[label][0]:.3g} | "
            f"{'n/a' if mem is None else f'{mem / 2**20:.3g}'} |"
        )
    return lines


# ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> str:
    x64 = jax.config.read("jax_enable_x64")
    try:
        return _main(argv)
    finally:  # the sections switch float64 on and off; leave it as it was
        jax.config.update("jax_enable_x64", x64)


def _main(argv: Sequence[str] | None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="output folder")
    args = parser.parse_args(argv)
    argv = list(argv if argv is not None else sys.argv[1:])
    out = args.out or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    repeats = 1 if args.quick else args.repeats
    device = jax.devices()[0]
    tic = time.perf_counter()
    sections = [
        f"# GPU report: {device.device_kind}",
        "",
        f"Command: `python -m benchmarks.gpu {' '.join(argv)}`  ",
        f"Device: `jax.devices()[0].device_kind` = {device.device_kind} "
        f"({device.platform}); JAX {jax.__version__}",
        "",
    ]
    if device.platform != "gpu":
        sections += [
            f"**Not run on a GPU**: this report comes from the {device.platform} "
            "backend (a smoke test of the command).",
            "",
        ]

    # 1. The Pareto subset (its own report, linked here).
    pareto_out = os.path.join(out, f"gpu_pareto_{_slug(device.device_kind)}")
    only = "white" if args.quick else "white,PDE,CNF Midpoint"
    pareto_argv = ["--only", only, "--repeats", str(repeats), "--out", pareto_out]
    quick_argv = ["--quick", "--memory-only"] if args.quick else []
    result = pareto.main(quick_argv + pareto_argv)
    sections += ["## 1. Pareto subset", ""]
    for name, res in result["results"].items():
        sections.append(f"- {name}: {res.get('verdict', '')}")
    sections += ["", f"Full tables: `{os.path.relpath(result['report'], out)}`.", ""]

    # 2. The scaling tables at GPU sizes.
    jax.config.update("jax_enable_x64", True)
    if args.quick:  # the smoke test: six float64 steps of the white dwarf
        works = [dataclasses.replace(scaling.white_dwarf(10**9), dtypes=(jnp.float64,))]
        ns = [6]
    else:
        works = scaling.workloads(False, gpu=True)[:2]
        ns = [100, 1000, 5000, 10_000]
    scaling_out = os.path.join(out, f"gpu_scaling_{_slug(device.device_kind)}")
    os.makedirs(scaling_out, exist_ok=True)
    res = scaling.run(
        works,
        ns,
        repeats=repeats,
        max_recompute=12,
        out=scaling_out,
        horizons=False,
        overhead_n=None,
        argv=argv,
        title=f"Scaling with the number of steps on {device.device_kind}",
    )
    sections += ["## 2. Scaling at GPU sizes", ""]
    with open(res["report"]) as f:
        body = f.read().split("\n", 1)[1]
    sections += [
        body.replace("](scaling_", f"]({os.path.basename(scaling_out)}/scaling_")
    ]

    # 3. vmap training steps.
    jax.config.update("jax_enable_x64", False)
    sections += ["## 3. diffrax-example-style vmap training steps", ""]
    sections += vmap_training(args.quick, repeats) + [""]
    sections.append(f"Total wall time: {time.perf_counter() - tic:.0f} s.")
    path = os.path.join(out, f"gpu_{_slug(device.device_kind)}.md")
    with open(path, "w") as f:
        f.write("\n".join(sections) + "\n")
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
