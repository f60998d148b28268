"""Data parallelism over several processes: 2 processes on localhost, joined by
`jax.distributed.initialize` (gloo CPU collectives, JAX's default on CPU), each with
2 forced host CPU devices, train a neural ODE with `ReversibleAdjoint` inside
`jax.shard_map` for 3 Adam steps on a batch split over the 4 devices (each element
taking its own number of adaptive steps). The losses and the final parameters equal
one process on one device's to rounding, and both processes end with the same
parameters.

`REVDIFFRAX_MULTIPROCESS_MODES=shard_map,jit` also trains with `jax.jit` and the
batch placed by `NamedSharding` (no `shard_map`); that mode is left out by default
because it doubles the time.

The workers are `multiprocess_cases.py`; the reference runs in this process while
they run. Both workers are killed in any case (as soon as one fails, on a timeout,
or when the reference fails), and their output goes to files (no pipe can fill up
and block them).
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
from multiprocess_cases import NUM_PROCESSES, train


HERE = pathlib.Path(__file__).parent
MODES = os.environ.get("REVDIFFRAX_MULTIPROCESS_MODES", "shard_map").split(",")
TIMEOUT_S = 240  # 41-54 s (35 CPU s) on a 2-core machine loaded by other jobs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _launch(tmp_path: pathlib.Path) -> list[subprocess.Popen]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    # revdiffrax from this checkout (`tests/` itself is the script's directory).
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    port = _free_port()
    procs = []
    for i in range(NUM_PROCESSES):
        cmd = [sys.executable, str(HERE / "multiprocess_cases.py"), "worker"]
        cmd += [str(port), str(i), str(tmp_path), ",".join(MODES)]
        with open(tmp_path / f"worker_{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    return procs


def _logs(tmp_path: pathlib.Path) -> str:
    return "\n".join(
        f"--- worker {i}:\n"
        + (tmp_path / f"worker_{i}.log").read_text(errors="replace")[-3000:]
        for i in range(NUM_PROCESSES)
    )


def _run(tmp_path: pathlib.Path) -> tuple[dict, list]:
    """The workers' results and the single-device reference."""
    start = time.perf_counter()
    procs = _launch(tmp_path)
    try:
        reference = train(None)  # one process, one device, meanwhile
        # Until both are done, one has failed (the other would wait for it), or
        # the time is up.
        while any(proc.poll() is None for proc in procs):
            if any(proc.poll() for proc in procs):
                break
            assert time.perf_counter() - start < TIMEOUT_S, _logs(tmp_path)
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    codes = [proc.returncode for proc in procs]
    assert codes == [0] * NUM_PROCESSES, (codes, _logs(tmp_path))
    results = [np.load(tmp_path / f"process_{i}.npz") for i in range(NUM_PROCESSES)]
    print(f"workers and reference: {time.perf_counter() - start:.1f} s")
    return reference, results


def test_two_processes_equal_one_device(tmp_path):
    reference, results = _run(tmp_path)
    num_leaves = len(reference["params"])
    for mode in MODES:
        for result in results:
            params = [result[f"{mode}_param_{j}"] for j in range(num_leaves)]
            errs = {
                "losses": _rel_err(result[f"{mode}_losses"], reference["losses"]),
                "params": max(map(_rel_err, params, reference["params"])),
            }
            print(mode, errs, f"{float(result[f'{mode}_seconds']):.1f} s")
            assert max(errs.values()) <= 1e-12, (mode, errs)
            # Each element takes its own number of steps, as on one device.
            steps = result[f"{mode}_steps"]
            np.testing.assert_array_equal(steps, reference["steps"])
        # Both processes hold the same (replicated) parameters.
        for j in range(num_leaves):
            np.testing.assert_array_equal(
                results[0][f"{mode}_param_{j}"], results[1][f"{mode}_param_{j}"]
            )
    assert len(set(reference["steps"].tolist())) > 1, reference["steps"]
    # Training lowered the loss.
    assert reference["losses"][-1] < reference["losses"][0], reference["losses"]
