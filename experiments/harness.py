"""Measuring jitted computations, for the experiments and for ``benchmarks/``.

- `compile_timed`: lower and compile a function, with the compile time and the
  compiled temporary memory (`memory_analysis().temp_size_in_bytes`);
- `compile_step` and `timed_training`: a compiled training step, one warm-up call,
  then a timed training loop (wall-clock time per iteration, process CPU time);
- `median_time` and `interleaved_times`: repeated timings after a warm-up call;
- `peak_rss_mb`: the peak resident memory of the process;
- `tree_rel_error`: the relative error between two PyTrees of arrays.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PyTree


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def temp_bytes(compiled: jax.stages.Compiled) -> int | None:
    """The compiled temporary memory, or None where the backend does not report it."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # memory_analysis is not implemented on every backend
        return None
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def compile_timed(
    fn: Callable, *args: Any
) -> tuple[jax.stages.Compiled, float, int | None]:
    """`jax.jit(fn)` lowered and compiled for `args`: the executable, the compile
    time in seconds and the compiled temporary memory in bytes."""
    tic = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - tic
    return compiled, compile_s, temp_bytes(compiled)


@dataclasses.dataclass
class CompiledStep:
    """A compiled training step and what it cost to get it running."""

    fn: jax.stages.Compiled
    compile_s: float
    temp_bytes: int | None
    warmup_s: float


def compile_step(step: Callable, *args: Any) -> CompiledStep:
    """Compile `step` for `args` and make one warm-up call (its result is discarded:
    training starts from the same inputs). Neither is part of the training time."""
    compiled, compile_s, temp = compile_timed(step, *args)
    tic = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    warmup_s = time.perf_counter() - tic
    return CompiledStep(compiled, compile_s, temp, warmup_s)


@dataclasses.dataclass
class TrainingLog:
    """Per-iteration losses, auxiliary outputs and wall-clock times of a training
    loop."""

    losses: list[float]
    aux: list[float]  # the step's last output: accepted steps, an accuracy, ...
    iter_times: list[float]
    train_s: float  # wall-clock time of the whole loop
    cpu_s: float  # process CPU time of the whole loop


def timed_training(
    step: Callable,
    params: PyTree,
    opt_state: PyTree,
    iters: int,
    *,
    desc: str,
    step_args: Callable[[int], tuple] = lambda i: (),
    progress: bool = True,
    loss_format: str = ".4e",
) -> tuple[PyTree, PyTree, TrainingLog]:
    """Run `params, opt_state, loss, aux = step(params, opt_state, *step_args(i))`
    for i < `iters`, waiting for every iteration (`step_args` gives e.g. the i-th
    minibatch key); returns the final params and optimiser state.

    This is the one training loop of the experiments: `train.train` (white dwarf,
    oscillators, pendulum), `kepler` and `training_loop.measure_adjoint` (cnf,
    digits_odenet, uea_cde) all run it."""
    from tqdm.auto import tqdm

    log = TrainingLog([], [], [], 0.0, 0.0)
    bar = tqdm(
        range(iters),
        desc=desc,
        disable=not progress,
        mininterval=0.5,
        file=sys.stderr,
    )
    tic = time.perf_counter()
    cpu_tic = time.process_time()
    last = tic
    for i in bar:
        params, opt_state, loss, aux = step(params, opt_state, *step_args(i))
        loss, aux = jax.device_get((loss, aux))  # waits for the step
        now = time.perf_counter()
        log.iter_times.append(now - last)
        last = now
        log.losses.append(float(loss))
        log.aux.append(float(aux))
        bar.set_postfix(loss=f"{float(loss):{loss_format}}", refresh=False)
    log.train_s = time.perf_counter() - tic
    log.cpu_s = time.process_time() - cpu_tic
    bar.close()
    return params, opt_state, log


def median_time(fn: Callable, *args: Any, repeats: int) -> float:
    """Median wall-clock time of `fn(*args)` over `repeats` calls, after a warm-up
    call, each waited for with `jax.block_until_ready`."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(
    fns: Mapping[Any, tuple[Callable, Any]],
    repeats: int,
    *,
    min_sample_s: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[Any, tuple[float, float]]:
    """Median and minimum times of `fns` (name -> (function, input)), timed
    round-robin so that load changes on a shared machine hit every candidate alike.

    With `min_sample_s > 0`, a function whose (timed) warm-up call took less than
    that is called `ceil(min_sample_s / warm-up time)` times back to back per
    sample, and the time per call is reported (as `timeit` does), so that calls
    much shorter than the scheduler's time slices are not dominated by them.

    `clock=time.process_time` measures this process's CPU time (XLA's worker threads
    included) instead of wall-clock time: the time slices that other processes take
    on a loaded machine are then not counted."""
    number = {}
    for name, (fn, x) in fns.items():  # warm-up
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        warm = time.perf_counter() - start
        number[name] = max(1, math.ceil(min_sample_s / warm)) if min_sample_s else 1
    times: dict[Any, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, x) in fns.items():
            start = clock()
            jax.block_until_ready([fn(x) for _ in range(number[name])])
            times[name].append((clock() - start) / number[name])
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def tree_rel_error(a: PyTree, ref: PyTree, *, norm: str = "max") -> float:
    """Relative error of `a` against `ref` over all their leaves.

    `norm="max"`: max|a - ref| / max|ref|; `norm="2"`: ||a - ref||_2 / ||ref||_2,
    computed in float64 (so a float32 `a` is compared exactly against a float64
    `ref`).
    """
    la, lr = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(ref)
    if len(la) != len(lr) or not la:
        raise ValueError(f"Cannot compare {len(la)} leaves against {len(lr)}.")
    if norm == "max":
        num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lr))
        return num / max(float(jnp.max(jnp.abs(y))) for y in lr)
    if norm == "2":
        num = sum(
            float(jnp.sum((x.astype(jnp.float64) - y) ** 2)) for x, y in zip(la, lr)
        )
        return math.sqrt(num) / math.sqrt(sum(float(jnp.sum(y**2)) for y in lr))
    raise ValueError(f"Unknown norm {norm!r}; choose 'max' or '2'.")
