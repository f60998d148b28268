"""`ReversibleAdjoint` inside `jax.shard_map` with its default checks
(`check_vma=True`): a data-parallel neural ODE, the batch split over two forced host
CPU devices and the model replicated, gives the single-device gradients (of the
model and of every initial condition) to rounding, with fixed steps, with per-sample
adaptive steps (each element taking its own number of steps), and with
`checkpoint_every`, all with `SaveAt(ts)`. And a sharded state: a 2-D
reaction-diffusion field split over the devices along its rows (a five-point stencil
with the neighbouring rows exchanged by `ppermute`) gives one device's gradient, in
half the memory per device.

The devices are forced with `XLA_FLAGS` before JAX starts, so the cases run in a
subprocess (`shard_map_cases.py`); this keeps the other tests of the same pytest
worker on one device.
"""

import json
import os
import pathlib
import subprocess
import sys


HERE = pathlib.Path(__file__).parent


def _run_cases() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, str(HERE / "shard_map_cases.py"), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_gradients_equal_single_device():
    full = _run_cases()
    report = full["data_parallel"]
    assert set(report) == {"fixed", "adaptive", "adaptive_checkpoint_every_3"}
    for name, case in report.items():
        assert case["vs_single_device"] < 1e-12, (name, case)
        assert case["steps_equal"], (name, case)
    # Per-sample adaptive steps: the elements (two per device) take different
    # numbers of steps, so the devices run their loops for different lengths.
    assert len(set(report["adaptive"]["steps"])) > 1, report["adaptive"]
    assert report["fixed"]["steps"] == [20, 20, 20, 20]
    # The sharded state.
    state = full["sharded_state"]
    assert state["vs_single_device"] < 1e-12, state
    single, sharded = state["memory_single_device"], state["memory_per_device_sharded"]
    for kind in ("argument_MiB", "temp_MiB"):
        assert sharded[kind] < 0.6 * single[kind], (kind, single, sharded)
