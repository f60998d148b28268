"""Does a `step_times="recompute"` re-run reproduce the forward's steps bitwise?

Issue 22 item 1. For each problem, one gradient with
`ReversibleAdjoint(step_times="recompute", checkpoint_every=k)`:

- `mismatch`: the largest mismatch a re-run reports (the relative difference of
  the sums of its segment's step times, snapped to the recorded low bits, from the
  forward's; `inf` for another count or a snap out of range), taken from
  `Rerun.load` with nothing else instrumented;
- `first step`, `fields`: with every iteration of diffrax's loop logged (through
  `jax.debug.callback`, in the forward pass and in the re-runs), the first
  iteration whose inputs (y, solver and controller states, times) are bitwise
  equal to the forward's but whose outputs are not, and which outputs differ
  there (not under `jax.vmap`);
- `vs record`: the relative difference of the gradient from `"record"`'s.

With `--flags` the first problem is also run (in subprocesses) under XLA flags
that remove fused multiply-adds (`--xla_cpu_max_isa=AVX`) or the new CPU fusion
emitters (`--xla_cpu_use_fusion_emitters=false`).

Run: `python -m benchmarks.rerun_bitwise [--flags]` (results in
`benchmarks/results/rerun_bitwise_cpu.md`).
"""

import argparse
import collections
import os
import subprocess
import sys

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import revdiffrax
from revdiffrax._adjoint import checkpoints, rerun


jax.config.update("jax_enable_x64", True)

LOG = collections.defaultdict(list)


def _log_iteration(tag, num_steps, old, new):
    LOG[tag].append(
        (int(num_steps), jtu.tree_map(np.asarray, old), jtu.tree_map(np.asarray, new))
    )


def _fields(state):
    return dict(
        tprev=state.tprev,
        tnext=state.tnext,
        y=state.y,
        solver_state=state.solver_state,
        controller_state=state.controller_state,
        num_accepted_steps=state.num_accepted_steps,
        made_jump=state.made_jump,
    )


def _logging_loop(loop, tag):
    """A while loop that logs each iteration of diffrax's outer loop."""

    def wrapped(cond, body, init, **kwargs):
        def logged(carry):
            new = body(carry)
            old_state = carry[0] if isinstance(carry, tuple) else carry
            new_state = new[0] if isinstance(new, tuple) else new
            if hasattr(new_state, "num_accepted_steps"):
                jax.debug.callback(
                    _log_iteration,
                    tag,
                    new_state.num_steps,
                    _fields(old_state),
                    _fields(new_state),
                    ordered=True,
                )
            return new

        return loop(cond, logged, init, **kwargs)

    return wrapped


def _log_mismatch(mismatch):
    LOG["mismatch"].append(float(np.max(np.asarray(mismatch))))


class _Instrumented:
    """Patches `rerun`/`checkpoints` for one gradient (`loop`: log every loop
    iteration too)."""

    def __init__(self, loop: bool):
        self.loop = loop

    def __enter__(self):
        LOG.clear()
        self.saved = (checkpoints.outer_loop, rerun.outer_loop, rerun.Rerun.load)
        load = rerun.Rerun.load

        def logged_load(self_, a, target):
            segment, mismatch = load(self_, a, target)
            # (Under `jax.vmap` the samples that keep their segment re-run nothing
            # and their mismatch is discarded: `Rerun.enter`.)
            kept = jnp.where(target > 0, mismatch, 0)
            jax.debug.callback(_log_mismatch, kept, ordered=True)
            return segment, mismatch

        if not self.loop:  # (either instrumentation alone: each changes fusion)
            rerun.Rerun.load = logged_load
        else:
            checkpoints.outer_loop = _logging_loop(checkpoints.outer_loop, "fwd")
            rerun.outer_loop = _logging_loop(rerun.outer_loop, "rerun")

    def __exit__(self, *exc):
        checkpoints.outer_loop, rerun.outer_loop, rerun.Rerun.load = self.saved


def _equal(a, b) -> bool:
    return all(
        np.array_equal(x, y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
    )


def _first_divergence():
    """The first re-run iteration with the forward's inputs but other outputs."""
    forward = {n: (old, new) for n, old, new in LOG["fwd"]}
    found = []
    for n, old, new in LOG["rerun"]:
        f_old, f_new = forward[n]
        if _equal(old, f_old) and not _equal(new, f_new):
            fields = [
                f"{k} ({_relative(new[k], f_new[k]):.0e})"
                for k in new
                if not _equal(new[k], f_new[k])
            ]
            found.append((n, fields))
    return min(found) if found else (None, [])


def _relative(a, b) -> float:
    """The largest relative difference of the leaves of `a` and `b`."""
    return max(
        float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-300)))
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))
        if np.issubdtype(np.asarray(x).dtype, np.floating)
    )


def _lotka_volterra(t, y, theta):
    alpha, beta, gamma, delta = theta
    prey, predator = y
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            -gamma * predator + delta * prey * predator,
        ]
    )


def _pendulum(t, y, args):
    return jnp.stack([y[1], -args[0] * jnp.sin(y[0]) - args[1] * y[1]])


def _notebook_04(adjoint):
    """Notebook 04's fit: 76 accepted steps (16 rejected), `SaveAt(ts)`."""
    key = jax.random.PRNGKey(0)
    t_obs = jnp.sort(jax.random.uniform(key, (40,), minval=0.2, maxval=9.5))
    theta = jnp.array([1.3, 0.9, 3.2, 1.1])

    def loss(theta_, ts, coupling):
        # (The coupling is traced, as in the notebook.)
        solver = revdiffrax.Reversible(diffrax.Tsit5(), coupling=coupling)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_lotka_volterra), solver, 0.0, 10.0, 0.01,
            jnp.array([5.0, 1.0]), args=theta_, saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            adjoint=adjoint, max_steps=256,
        )  # fmt: skip
        return jnp.mean(jnp.sum((sol.ys - 1.0) ** 2, axis=-1)), sol.stats

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(grad)(theta, t_obs, jnp.array(0.999))[1]


def _pendulum_loss(y0, args, adjoint):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulum), revdiffrax.Reversible(diffrax.Tsit5()), 0.0,
        10.0, 0.3, y0, args=args, adjoint=adjoint,
        stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
        saveat=diffrax.SaveAt(t1=True), max_steps=64,
    )  # fmt: skip
    return jnp.sum(sol.ys**2)


def _pendulum_grad(adjoint):
    """`Reversible(Tsit5())` + PID on a pendulum: 40 accepted steps."""
    grad = jax.grad(_pendulum_loss, argnums=(0, 1))
    return jax.jit(grad, static_argnums=2)(
        jnp.array([1.0, 0.2]), jnp.array([2.0, 0.1]), adjoint
    )


def _pendulum_vmap(adjoint):
    """The pendulum under `jax.vmap` over 3 initial states."""
    grad = jax.vmap(jax.grad(_pendulum_loss, argnums=(0, 1)), in_axes=(0, None, None))
    y0s = jnp.array([[1.0, 0.2], [0.5, 0.0], [1.5, -0.3]])
    return jax.jit(grad, static_argnums=2)(y0s, jnp.array([2.0, 0.1]), adjoint)


PROBLEMS = {
    "notebook 04 (k=10)": (_notebook_04, 10, True),
    "pendulum (k=7)": (_pendulum_grad, 7, True),
    "pendulum, vmap of 3 (k=7)": (_pendulum_vmap, 7, False),
}


def _rel(a, b) -> float:
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b))
    return num / max(float(jnp.max(jnp.abs(y))) for y in b)


def measure(name: str) -> str:
    problem, every, per_iteration = PROBLEMS[name]
    recompute = revdiffrax.ReversibleAdjoint(
        step_times="recompute", checkpoint_every=every
    )
    with _Instrumented(loop=False):
        grads = jax.block_until_ready(problem(recompute))
        jax.effects_barrier()
        mismatch = max(LOG["mismatch"], default=float("nan"))
    first, fields = None, []
    if per_iteration:
        with _Instrumented(loop=True):
            # (With the drift reported, as in the notebook: the loop's logging alone
            # can change the fusion enough to hide the difference.)
            logged = revdiffrax.ReversibleAdjoint(
                step_times="recompute",
                checkpoint_every=every,
                drift_callback=LOG["drift"].append,
            )
            jax.block_until_ready(problem(logged))
            jax.effects_barrier()
            first, fields = _first_divergence()
    record = problem(revdiffrax.ReversibleAdjoint(step_times="record"))
    flags = os.environ.get("XLA_FLAGS", "") or "(none)"
    return (
        f"| {name} | `{flags}` | {mismatch:.1e} | {first or '-'} "
        f"| {', '.join(fields) or '-'} "
        f"| {_rel(jtu.tree_leaves(grads), jtu.tree_leaves(record)):.1e} |"
    )


HEADER = (
    "| problem | XLA_FLAGS | mismatch | first step | fields (rel. diff.) "
    "| vs record |\n"
    "|---|---|---|---|---|---|"
)
FLAGS = ["--xla_cpu_max_isa=AVX", "--xla_cpu_use_fusion_emitters=false"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--flags", action="store_true")
    parser.add_argument("--only", help="one problem (used by --flags)")
    options = parser.parse_args()
    if options.only is not None:
        print(measure(options.only), flush=True)
        return
    print(HEADER, flush=True)
    for name in PROBLEMS:
        print(measure(name), flush=True)
    if options.flags:
        name = next(iter(PROBLEMS))
        for flag in FLAGS:
            env = dict(os.environ, XLA_FLAGS=flag)
            command = [sys.executable, "-m", "benchmarks.rerun_bitwise", "--only", name]
            subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
