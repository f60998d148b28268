"""Gradients through `ReversibleAdjoint` inside `jax.shard_map` (default
`check_vma=True`) against the same gradients on one device. The batch elements need
different numbers of adaptive steps (15, 11, 10 and 9; two per device).

Run by `tests/test_shard_map.py` in a subprocess, because the number of (forced
host) devices must be fixed before JAX starts: `python tests/shard_map_cases.py N`
prints one JSON object with the relative gradient differences of every case.
"""

import json
import os
import sys
import time


if __name__ == "__main__":
    flag = f"--xla_force_host_platform_device_count={int(sys.argv[1])}"
    os.environ["XLA_FLAGS"] = flag

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import revdiffrax
from jax.sharding import NamedSharding, PartitionSpec as P


jax.config.update("jax_enable_x64", True)


def rel_err(a, b) -> float:
    """max|a - b| / max|b| over the array leaves."""
    la, lb = jtu.tree_leaves(a), jtu.tree_leaves(b)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb))
    return num / max(float(jnp.max(jnp.abs(y))) for y in lb)


# --- data parallel: a batch of initial conditions split over the mesh ---------------


def vector_field(t, y, model):
    return model(y) - 0.1 * y


def solve_one(model, y0, adjoint, adaptive, ts):
    controller = (
        diffrax.PIDController(rtol=1e-4, atol=1e-4)
        if adaptive
        else diffrax.ConstantStepSize()
    )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        revdiffrax.Reversible(diffrax.Midpoint()),
        t0=0.0,
        t1=1.0,
        dt0=0.05,
        y0=y0,
        args=model,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=256,
        # `throw=True` calls `equinox.error_if`, whose callback returns replicated
        # values, which `shard_map` refuses for a sharded solution (equinox 0.13).
        throw=False,
    )
    return jnp.sum(sol.ys**2), sol.stats["num_accepted_steps"]


def batch_loss(model, y0s, adjoint, adaptive):
    """Sum over the batch (local batch inside `shard_map`), and the step counts."""
    ts = jnp.array([0.1, 0.35, 0.6, 1.0])
    losses, steps = jax.vmap(solve_one, in_axes=(None, 0, None, None, None))(
        model, y0s, adjoint, adaptive, ts
    )
    return jnp.sum(losses), steps


def data_parallel_grads(mesh, model, y0s, adjoint, adaptive):
    """Gradients with respect to `(model, y0s)`, and the step counts, with the batch
    split over `mesh` and the model replicated. The gradient of the replicated
    model comes out summed over the devices (JAX's transpose of its implicit
    replicated-to-varying cast), with no explicit `psum`."""
    params, static = eqx.partition(model, eqx.is_array)

    def local(params, y0s):
        loss = lambda p, y: batch_loss(eqx.combine(p, static), y, adjoint, adaptive)
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, y0s)

    specs = (P(), P("batch"))
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=specs, out_specs=(specs, P("batch"))
    )
    y0s = jax.device_put(y0s, NamedSharding(mesh, P("batch")))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    return jax.jit(sharded)(params, y0s)


def single_device_grads(model, y0s, adjoint, adaptive):
    """Gradients with respect to `(model, y0s)`, and the step counts, on one
    device."""

    def loss(pair, _, adjoint, adaptive):
        return batch_loss(pair[0], pair[1], adjoint, adaptive)

    grads, steps = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))(
        (model, y0s), None, adjoint, adaptive
    )
    return grads, steps


def data_parallel_cases(num_devices: int) -> dict:
    mesh = jax.make_mesh((num_devices,), ("batch",))
    model = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    # Different amplitudes: with adaptive steps, each element takes its own number
    # of steps (item 5 of issue 13).
    scale = jnp.linspace(0.1, 4.0, 2 * num_devices)[:, None]
    y0s = scale * jnp.array([1.0, -0.5])
    out = {}
    cases = {
        "fixed": (revdiffrax.ReversibleAdjoint(), False),
        "adaptive": (revdiffrax.ReversibleAdjoint(), True),
        "adaptive_checkpoint_every_3": (
            revdiffrax.ReversibleAdjoint(checkpoint_every=3),
            True,
        ),
    }
    for name, (adjoint, adaptive) in cases.items():
        start = time.perf_counter()
        grads, steps = data_parallel_grads(mesh, model, y0s, adjoint, adaptive)
        (ref_model, ref_y0s), ref_steps = single_device_grads(
            model, y0s, adjoint, adaptive
        )
        model_grads, y0s_grads = grads
        ref_model = eqx.filter(ref_model, eqx.is_array)
        out[name] = {
            "vs_single_device": max(
                rel_err(model_grads, ref_model), rel_err(y0s_grads, ref_y0s)
            ),
            "steps": [int(s) for s in np.asarray(steps)],
            "steps_equal": bool(np.array_equal(steps, ref_steps)),
            "seconds": time.perf_counter() - start,
        }
    return out


# --- a sharded state: a 2-D field split over the mesh along its first axis ---------


def reaction_diffusion(sharded: bool, num_devices: int):
    """du/dt = D lap(u) + r u (1 - u) on a periodic grid. Sharded, each device holds
    a band of rows and gets the rows next to it from its neighbours (`ppermute`)."""

    def rows_around(u):
        if not sharded:
            return jnp.roll(u, 1, axis=0)[:1], jnp.roll(u, -1, axis=0)[-1:]
        down = [(i, (i + 1) % num_devices) for i in range(num_devices)]
        up = [(i, (i - 1) % num_devices) for i in range(num_devices)]
        above = jax.lax.ppermute(u[-1:], "space", perm=down)
        below = jax.lax.ppermute(u[:1], "space", perm=up)
        return above, below

    def vector_field(t, u, args):
        diffusion, rate = args
        above, below = rows_around(u)
        padded = jnp.concatenate([above, u, below], axis=0)
        lap = (
            padded[:-2]
            + padded[2:]
            + jnp.roll(u, 1, axis=1)
            + jnp.roll(u, -1, axis=1)
            - 4 * u
        )
        return diffusion * lap + rate * u * (1 - u)

    return vector_field


def field_loss(args, u0, sharded, num_devices):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(reaction_diffusion(sharded, num_devices)),
        revdiffrax.Reversible(diffrax.Midpoint()),
        t0=0.0,
        t1=0.2,
        dt0=0.01,
        y0=u0,
        args=args,
        adjoint=revdiffrax.ReversibleAdjoint(),
        max_steps=32,
        throw=False,
    )
    return jnp.sum(sol.ys[-1] ** 2)


def _memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    return {
        "argument_MiB": stats.argument_size_in_bytes / 2**20,
        "output_MiB": stats.output_size_in_bytes / 2**20,
        "temp_MiB": stats.temp_size_in_bytes / 2**20,
    }


def sharded_state_case(num_devices: int, shape=(128, 64)) -> dict:
    mesh = jax.make_mesh((num_devices,), ("space",))
    x = jnp.linspace(0, 2 * jnp.pi, shape[0])[:, None]
    u0 = 0.5 + 0.3 * jnp.sin(x) * jnp.cos(jnp.linspace(0, 2 * jnp.pi, shape[1]))
    args = (jnp.array(0.2), jnp.array(1.5))
    grad = jax.grad(field_loss, argnums=(0, 1))

    single = jax.jit(lambda a, u: grad(a, u, False, num_devices))
    sharded = jax.jit(
        jax.shard_map(
            lambda a, u: grad(a, u, True, num_devices),
            mesh=mesh,
            in_specs=(P(), P("space")),
            out_specs=(P(), P("space")),
        )
    )
    u0_sharded = jax.device_put(u0, NamedSharding(mesh, P("space")))
    single_compiled = single.lower(args, u0).compile()
    sharded_compiled = sharded.lower(args, u0_sharded).compile()
    ref = single_compiled(args, u0)
    out = sharded_compiled(args, u0_sharded)
    return {
        "shape": list(shape),
        "vs_single_device": max(rel_err(out[0], ref[0]), rel_err(out[1], ref[1])),
        "memory_single_device": _memory(single_compiled),
        "memory_per_device_sharded": _memory(sharded_compiled),
    }


if __name__ == "__main__":
    n = int(sys.argv[1])
    assert len(jax.devices()) == n
    report = {
        "data_parallel": data_parallel_cases(n),
        "sharded_state": sharded_state_case(n),
    }
    print(json.dumps(report))
