"""Data-parallel training of a neural ODE with `ReversibleAdjoint` over several
processes (`jax.distributed`, CPU collectives), and the same training in one process
on one device, for `tests/test_multiprocess.py`.

    python tests/multiprocess_cases.py worker PORT PROCESS_ID OUT_DIR MODES

runs one of two processes, each with the 2 host devices that
`XLA_FLAGS=--xla_force_host_platform_device_count=2` gives it, coordinated on
`localhost:PORT` (`jax.distributed.initialize`; JAX's default CPU collectives,
gloo over TCP, carry the collectives between the processes). For each of the
comma-separated `MODES`, `shard_map` (the gradient inside `jax.shard_map`) and `jit`
(`jax.jit`, the batch placed by `NamedSharding`): a mesh over the 4 devices of both
processes, each process feeding its half of the batch, and 3 Adam steps of a neural
ODE with per-sample adaptive steps. It writes the losses, the final parameters and
the step counts to `OUT_DIR/process_<PROCESS_ID>.npz`. `train(None)` is the
reference: one process, one device, no sharding. The model, the solve and the loss
are `shard_map_cases.py`'s.
"""

import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import revdiffrax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from shard_map_cases import batch_loss


jax.config.update("jax_enable_x64", True)

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
BATCH = 8  # two initial conditions per device
NUM_STEPS = 3


def problem():
    """The initial model's parameters and static part, and the batch of initial
    conditions (of different amplitudes, so each takes its own number of adaptive
    steps)."""
    model = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)
    y0s = jnp.linspace(0.1, 4.0, BATCH)[:, None] * jnp.array([1.0, -0.5])
    return params, static, np.asarray(y0s)


def _mean_loss(params, static, y0s):
    """This device's (or, outside `shard_map`, the whole batch's) share of the mean
    loss over the global batch, and the step counts."""
    model = eqx.combine(params, static)
    total, steps = batch_loss(model, y0s, revdiffrax.ReversibleAdjoint(), True)
    return total / BATCH, steps


def make_step(mode, mesh, static, optimiser):
    """One jitted training step `(params, opt_state, y0s) -> (params, opt_state,
    loss, steps)`. `mode`: `"shard_map"`, `"jit"` (the sharding of the inputs
    decides the partitioning) or `None` (one device)."""
    value_and_grad = jax.value_and_grad(_mean_loss, has_aux=True)

    def loss_and_grads(params, y0s):
        (loss, steps), grads = value_and_grad(params, static, y0s)
        return loss, steps, grads

    def local(params, y0s):  # inside `shard_map`: this device's part of the batch
        loss, steps, grads = loss_and_grads(params, y0s)
        # The replicated parameters' gradient is already summed over the devices.
        return jax.lax.psum(loss, "batch"), steps, grads

    if mode == "shard_map":
        out_specs = (P(), P("batch"), P())
        compute = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P("batch")), out_specs=out_specs
        )
    else:
        compute = loss_and_grads

    @jax.jit
    def step(params, opt_state, y0s):
        loss, steps, grads = compute(params, y0s)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, steps

    return step


def _global_array(x, mesh, spec):
    """A global array from the same host value `x` in every process: each process
    feeds only the rows its own devices hold (`P()`: all of them)."""
    sharding = NamedSharding(mesh, spec)
    local = x
    if spec != P():
        spans = [
            index[0].indices(len(x))[:2]
            for index in sharding.addressable_devices_indices_map(x.shape).values()
            if index is not None
        ]
        first, last = min(a for a, _ in spans), max(b for _, b in spans)
        # This process's devices hold a contiguous block of the batch.
        assert sum(b - a for a, b in spans) == last - first, spans
        local = x[first:last]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)


def _mesh(mode):
    """A mesh over all devices (of every process). With `jit` and no `shard_map`,
    automatic axes: under the default explicit axes, `jax.vmap` rejects the model's
    non-array leaf (`jnp.tanh`) next to a batch whose sharding is in its type
    (`equinox.filter_vmap` would accept it)."""
    if mode == "jit":
        auto = (jax.sharding.AxisType.Auto,)
        return jax.make_mesh((jax.device_count(),), ("batch",), axis_types=auto)
    return jax.make_mesh((jax.device_count(),), ("batch",))


def train(mode):
    """`NUM_STEPS` Adam steps; returns the losses, the final parameters (as a list
    of leaves) and the step counts of the first step, all as NumPy arrays."""
    params, static, y0s = problem()
    optimiser = optax.adam(1e-2)
    if mode is None:
        step = make_step(None, None, static, optimiser)
        batch = jnp.asarray(y0s)
        opt_state = jax.jit(optimiser.init)(params)
    else:
        mesh = _mesh(mode)
        step = make_step(mode, mesh, static, optimiser)
        params = jtu.tree_map(lambda p: _global_array(np.asarray(p), mesh, P()), params)
        batch = _global_array(y0s, mesh, P("batch"))
        # Replicated, as `step` returns it (else `step` compiles twice).
        replicated = NamedSharding(mesh, P())
        opt_state = jax.jit(optimiser.init, out_shardings=replicated)(params)
    losses, first_steps = [], None
    for _ in range(NUM_STEPS):
        params, opt_state, loss, steps = step(params, opt_state, batch)
        losses.append(loss)
        if first_steps is None:
            first_steps = steps
    if mode is not None:  # the step counts are sharded: gather every process's
        first_steps = multihost_utils.process_allgather(first_steps, tiled=True)
    return {
        "losses": np.array([float(x) for x in losses]),
        "params": [np.asarray(p) for p in jtu.tree_leaves(params)],
        "steps": np.asarray(first_steps),
    }


def worker(port: int, process_id: int, out_dir: str, modes: list[str]) -> None:
    start = time.perf_counter()
    arrays = {}
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == NUM_PROCESSES
    assert jax.local_device_count() == DEVICES_PER_PROCESS, jax.local_devices()
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS
    arrays["initialize_seconds"] = np.array(time.perf_counter() - start)
    for mode in modes:
        mode_start = time.perf_counter()
        result = train(mode)
        arrays[f"{mode}_seconds"] = np.array(time.perf_counter() - mode_start)
        arrays[f"{mode}_losses"] = result["losses"]
        arrays[f"{mode}_steps"] = result["steps"]
        for i, leaf in enumerate(result["params"]):
            arrays[f"{mode}_param_{i}"] = leaf
    arrays["seconds"] = np.array(time.perf_counter() - start)
    np.savez(f"{out_dir}/process_{process_id}.npz", **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    assert sys.argv[1] == "worker", sys.argv
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5].split(","))
