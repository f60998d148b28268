"""Data-parallel training of a neural ODE with `ReversibleAdjoint` inside
`jax.shard_map`: the batch is split over all devices, the model is replicated.

    python -m experiments.data_parallel                # 1, 2, 4 and 8 devices
    python -m experiments.data_parallel --devices 4    # one row, printed as JSON

On a CPU, `--devices N` forces N host devices (`XLA_FLAGS`), one process per N. Each
row reports the median time per training iteration, the compiled gradient's memory
per device, and the relative difference between the sharded gradient and the
single-device gradient at the initial parameters. Writes `results/data_parallel.md`.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_one(num_devices: int, batch: int, iters: int) -> dict:
    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.tree_util as jtu
    import numpy as np
    import revdiffrax
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == num_devices, jax.devices()
    mesh = jax.make_mesh((num_devices,), ("batch",))
    key_model, key_data = jax.random.split(jax.random.PRNGKey(0))
    model = eqx.nn.MLP(2, 2, 32, 2, activation=jnp.tanh, key=key_model)
    params, static = eqx.partition(model, eqx.is_array)
    ts = jnp.linspace(0.0, 2.0, 9)
    # Targets: a damped rotation, y' = A y, from random initial conditions.
    a = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
    y0s = jax.random.normal(key_data, (batch, 2))
    targets = jax.vmap(
        lambda y0: jax.vmap(lambda t: jax.scipy.linalg.expm(t * a) @ y0)(ts)
    )(y0s)

    def solve(params, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, m: m(y)),
            revdiffrax.Reversible(diffrax.Tsit5()),
            t0=0.0,
            t1=2.0,
            dt0=0.05,
            y0=y0,
            args=eqx.combine(params, static),
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            adjoint=revdiffrax.ReversibleAdjoint(),
            max_steps=1024,
            throw=False,  # `equinox.error_if` does not support `shard_map`
        )
        return sol.ys

    def loss(params, y0s, targets):
        ys = jax.vmap(solve, in_axes=(None, 0))(params, y0s)
        return jnp.sum((ys - targets) ** 2) / batch  # this device's share

    def local(params, y0s, targets):
        value, grads = jax.value_and_grad(loss)(params, y0s, targets)
        # The replicated parameters' gradient is already summed over the devices.
        return jax.lax.psum(value, "batch"), grads

    specs = (P(), P("batch"), P("batch"))
    sharded_grad = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    )
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(params, P()), put(y0s, P("batch")), put(targets, P("batch")))
    start = time.perf_counter()
    compiled = sharded_grad.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    # The gradient equals one device's (no sharding, no shard_map).
    _, grads = compiled(*args)
    _, ref = jax.jit(jax.value_and_grad(loss))(params, y0s, targets)
    leaves = zip(jtu.tree_leaves(grads), jtu.tree_leaves(ref))
    err = max(float(jnp.max(jnp.abs(g - r))) for g, r in leaves)
    err /= max(float(jnp.max(jnp.abs(r))) for r in jtu.tree_leaves(ref))

    @jax.jit
    def sgd(params, grads):
        return jtu.tree_map(lambda p, g: p - 0.05 * g, params, grads)

    p = args[0]
    times, losses = [], []
    for _ in range(iters):
        start = time.perf_counter()
        value, grads = compiled(p, args[1], args[2])
        p = sgd(p, grads)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - start)
        losses.append(float(value))
    return {
        "devices": num_devices,
        "batch": batch,
        "per_device_batch": batch // num_devices,
        "compile_s": compile_s,
        "median_s_per_iter": float(np.median(times)),
        "min_s_per_iter": float(np.min(times)),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "grad_rel_diff_vs_single_device": err,
        "argument_MiB_per_device": memory.argument_size_in_bytes / 2**20,
        "temp_MiB_per_device": memory.temp_size_in_bytes / 2**20,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
    }


def _table(rows: list[dict], command: str) -> str:
    lines = [
        "# Data-parallel neural ODE with `ReversibleAdjoint` inside `jax.shard_map`",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, shared with other jobs; devices: "
        f"{rows[0]['platform']} ({rows[0]['device_kind']}), forced host devices "
        "(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), float64.",
        "",
        "Neural ODE: MLP 2-32-32-2 vector field, `Reversible(Tsit5())`, "
        "`PIDController(rtol=1e-6, atol=1e-6)` (each trajectory takes its own steps), "
        f"`SaveAt(ts)` with 9 times, batch {rows[0]['batch']} split over the devices, "
        "SGD. Time per iteration: median over the iterations after compilation.",
        "",
        "**These numbers show correctness and overhead, not speed-up**: the forced "
        "host devices share this machine's 2 CPU cores, so more devices cannot run "
        "faster; on a real multi-GPU/TPU mesh each device would do 1/N of the work.",
        "",
        "| devices | per-device batch | s / iter (median) | s / iter (min) | compile s "
        "| temp MiB / device | argument MiB / device | grad rel. diff vs 1 device "
        "| loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['per_device_batch']} "
            f"| {r['median_s_per_iter']:.3f} "
            f"| {r['min_s_per_iter']:.3f} | {r['compile_s']:.1f} "
            f"| {r['temp_MiB_per_device']:.3f} | {r['argument_MiB_per_device']:.4f} "
            f"| {r['grad_rel_diff_vs_single_device']:.1e} "
            f"| {r['first_loss']:.4f} -> {r['last_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--all", default="1,2,4,8", help="device counts to run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "results" / "data_parallel.md"))
    opts = parser.parse_args()
    if opts.devices is not None:
        print(json.dumps(_run_one(opts.devices, opts.batch, opts.iters)))
        return
    rows = []
    for n in [int(x) for x in opts.all.split(",")]:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        cmd = [sys.executable, "-m", "experiments.data_parallel", "--devices", str(n)]
        cmd += ["--batch", str(opts.batch), "--iters", str(opts.iters)]
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    command = "python -m experiments.data_parallel " + " ".join(sys.argv[1:])
    pathlib.Path(opts.out).write_text(_table(rows, command.strip()))
    print(_table(rows, command.strip()))


if __name__ == "__main__":
    main()
