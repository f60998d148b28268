"""Smoke tests of the paper-reproduction experiments in `experiments/`.

Each experiment's `--quick` mode runs in-process (a few iterations on a short
solve), on built-in/simulated data. The data loaders are tested on small files
written in the format of the real recordings, including their error messages.
"""

import json
import math
import os

import numpy as np
import pytest
from experiments import coupled_oscillators, double_pendulum, white_dwarf
from experiments.data import (
    load_motion_capture,
    OSCILLATOR_FORMAT,
    PENDULUM_FORMAT,
    read_motion_capture,
    write_motion_capture,
)
from experiments.solvers import make_solver, RK4, sqrt_checkpoints


# The adjoint exercised by the single-adjoint smoke tests.
ADJOINT = "reversible"


def _check_outputs(result, out_dir, name, adjoints):
    files = [
        "results.json",
        f"{name}_trajectory.png",
        f"{name}_loss.png",
        f"{name}_cost.png",
    ]
    for f in files:
        path = os.path.join(out_dir, f)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    with open(os.path.join(out_dir, "results.json")) as f:
        saved = json.load(f)
    assert saved["experiment"] == name
    assert [r["adjoint"] for r in saved["runs"]] == adjoints
    for run in result["runs"]:
        losses = run["losses"]
        assert len(losses) == run["iters"] > 0
        assert all(math.isfinite(x) for x in losses)
        assert math.isfinite(run["final_loss"])
        # Training makes progress.
        assert run["final_loss"] < losses[0]
        assert min(losses[1:]) < losses[0]
        assert run["train_time_s"] > 0 and run["compile_time_s"] > 0
        assert run["temp_bytes"] is None or run["temp_bytes"] > 0
        assert run["peak_rss_mb"] > 0
    return saved


def test_white_dwarf_quick(tmp_path, capsys):
    result = white_dwarf.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    _check_outputs(result, tmp_path, "white_dwarf", ["reversible", "checkpoint"])
    printed = capsys.readouterr().out
    assert "| adjoint |" in printed and "final loss" in printed
    rev, ck = result["runs"]
    # Same solver and initialisation: identical first loss. Exact gradients either
    # way, so training stays close (Adam's normalised first steps amplify rounding
    # differences in near-zero gradient entries, hence the tolerance).
    np.testing.assert_allclose(rev["losses"][0], ck["losses"][0], rtol=1e-12)
    np.testing.assert_allclose(rev["final_loss"], ck["final_loss"], rtol=2e-2)
    assert ck["checkpoints"] == sqrt_checkpoints(100)


def test_coupled_oscillators_quick_simulated(tmp_path):
    result = coupled_oscillators.main(
        ["--quick", "--out", str(tmp_path), "--no-progress", "--adjoint", ADJOINT]
    )
    _check_outputs(result, tmp_path, "coupled_oscillators", [ADJOINT])
    # Without --data the simulated recording is written and read back.
    sim = tmp_path / "simulated_double_linear.txt"
    assert sim.is_file()
    assert sim.read_text().splitlines()[0] == "% x1 x2 v1 v2"
    ts, ys = load_motion_capture(sim, OSCILLATOR_FORMAT)
    assert ys.shape == (500, 4) and np.all(np.isfinite(ys))
    # Comparable to the recording: positions and speeds of order 1 after /100.
    assert 0.3 < np.abs(ys).max() < 5


def test_double_pendulum_quick_simulated(tmp_path):
    result = double_pendulum.main(
        ["--quick", "--out", str(tmp_path), "--no-progress", "--adjoint", ADJOINT]
    )
    _check_outputs(result, tmp_path, "double_pendulum", [ADJOINT])
    sim = tmp_path / "simulated_double_pend.txt"
    data = read_motion_capture(sim, PENDULUM_FORMAT)
    assert sorted(set(data[:, 0])) == [0.0, 1.0]  # two trials, like the recording
    np.testing.assert_array_equal(data[:, 4:6], data[:, 6:8])  # repeated omegas


def test_backsolve_runs(tmp_path):
    # BacksolveAdjoint (approximate gradients) runs; it saves at the data times.
    result = white_dwarf.main(
        [
            "--quick",
            "--iters",
            "2",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--no-plots",
            "--adjoint",
            "backsolve",
        ]
    )
    (run,) = result["runs"]
    assert run["adjoint"] == "backsolve"
    assert all(math.isfinite(x) for x in run["losses"])


def test_unknown_adjoint_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        white_dwarf.main(["--quick", "--out", str(tmp_path), "--adjoint", "nope"])


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="Unknown solver"):
        make_solver("rk45")


def test_rk4_is_fourth_order():
    import diffrax
    import jax.numpy as jnp

    def err(n):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t)),
            RK4(),
            0.0,
            1.0,
            1.0 / n,
            jnp.array(1.0),
            max_steps=n,
        )
        exact = 1.5 * np.exp(-1.0) + 0.5 * (np.sin(1.0) - np.cos(1.0))
        return abs(float(sol.ys[-1]) - exact)

    order = np.log2(err(16) / err(32))
    assert 3.7 < order < 4.3


# ---------------------------------------------------------------------------
# Data loaders
# ---------------------------------------------------------------------------

OSC_ROWS = """\
% x1 x2 v1 v2
  0.0e+000  1.0e+000  10.0 -20.0  1.0  2.0
  0.0e+000  2.0e+000  30.0 -40.0  3.0  4.0
  0.0e+000  5.0e+000  60.0 -70.0  6.0  7.0
"""

PEND_ROWS = """\
% o1 o2 w1 w2
0 0 1.0 2.0 3.0 4.0 3.0 4.0 0.5 0.5
0 1.0 2.0 4.0 6.0 8.0 6.0 8.0 0.5 0.5
0 2.5 5.0 5.0 5.0 5.0 5.0 5.0 0.5 0.5
1 0 9.0 9.0 9.0 9.0 9.0 9.0 0.5 0.5
1 3.0 9.0 9.0 9.0 9.0 9.0 9.0 0.5 0.5
"""


def test_load_oscillators_small_file(tmp_path):
    path = tmp_path / "osc.txt"
    path.write_text(OSC_ROWS)
    ts, ys = load_motion_capture(path, OSCILLATOR_FORMAT, t_max=3.0, n_points=4)
    # Time shifted to start at 0 (the recording starts at 0.033 s).
    np.testing.assert_allclose(ts, [0.0, 1.0, 2.0, 3.0])
    # Divided by 100 and linearly interpolated.
    np.testing.assert_allclose(ys[0], [0.1, -0.2, 0.01, 0.02])
    np.testing.assert_allclose(ys[1], [0.3, -0.4, 0.03, 0.04])
    np.testing.assert_allclose(ys[2], [0.4, -0.5, 0.04, 0.05])
    np.testing.assert_allclose(ys[3], [0.5, -0.6, 0.05, 0.06])


def test_load_pendulum_small_file(tmp_path):
    path = tmp_path / "pend.txt"
    path.write_text(PEND_ROWS)
    ts, ys = load_motion_capture(path, PENDULUM_FORMAT, t_max=2.0, n_points=3)
    # Trial 0 only, divided by 10.
    np.testing.assert_allclose(ts, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(ys[0], [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(ys[1], [0.2, 0.4, 0.6, 0.8])
    np.testing.assert_allclose(ys[2], [0.4, 1.4 / 3, 1.6 / 3, 0.6])


def test_write_then_load_roundtrip(tmp_path):
    t = np.linspace(0.0, 3.5, 50)
    cols = np.stack([np.sin(t), np.cos(t), t, -t], 1) * 100
    path = write_motion_capture(tmp_path / "sim.txt", OSCILLATOR_FORMAT, [(t, cols)])
    ts, ys = load_motion_capture(path, OSCILLATOR_FORMAT, n_points=50)
    assert ys.shape == (50, 4)
    np.testing.assert_allclose(ys[:, 2], ts, atol=1e-3)


def test_missing_file_error_names_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"% x1 x2 v1 v2"):
        load_motion_capture(tmp_path / "nope.txt", OSCILLATOR_FORMAT)
    with pytest.raises(FileNotFoundError, match=r"% o1 o2 w1 w2"):
        double_pendulum.main(
            ["--quick", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]
        )


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("0 0 1 2 3 4 3 4 0 0\n", "header"),
        ("% x1 x2 v1 v2\n0 0 1 2 3 4 3 4 0 0\n0 1 1 2 3 4 3 4 0 0\n", "header names"),
        ("% o1 o2 w1 w2\n0 0 1 2 3 4\n0 1 1 2 3 4\n", "expected 10 columns"),
        ("% o1 o2 w1 w2\n0 0 1 2 3 4 3 4 0 0\n0 1 a 2 3 4 3 4 0 0\n", "parse"),
        ("% o1 o2 w1 w2\n0 0 1 2 3 4 3 4 0 0\n", "at least 2"),
        ("% o1 o2 w1 w2\n0 0 1 2 3 4 3 4 0 0\n0 1 nan 2 3 4 3 4 0 0\n", "non-finite"),
        ("% o1 o2 w1 w2\n1 0 1 2 3 4 3 4 0 0\n1 3 1 2 3 4 3 4 0 0\n", "trial 0"),
        ("% o1 o2 w1 w2\n0 1 1 2 3 4 3 4 0 0\n0 0 1 2 3 4 3 4 0 0\n", "increasing"),
        ("% o1 o2 w1 w2\n0 0 1 2 3 4 3 4 0 0\n0 1 1 2 3 4 3 4 0 0\n", "covers only"),
    ],
)
def test_malformed_pendulum_file_errors(tmp_path, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_motion_capture(path, PENDULUM_FORMAT)
    # Every message states the expected format.
    assert "% o1 o2 w1 w2" in str(info.value)
    assert "trial t theta1 theta2" in str(info.value)


def test_report_from_results(tmp_path):
    """`run_grid` turns per-run results into a markdown table with the verdict."""
    import argparse

    from experiments import run_grid

    def fake(adjoint, checkpoints, t_iter, loss):
        label = adjoint if checkpoints is None else f"checkpoint({checkpoints})"
        run = dict(
            label=label,
            adjoint=adjoint,
            checkpoints=checkpoints,
            solver="Reversible(midpoint, 0.999)",
            base_solver="midpoint",
            seed=0,
            iters=10,
            train_time_s=10 * t_iter,
            time_per_iter_s=t_iter,
            median_iter_s=t_iter,
            cpu_per_iter_s=t_iter,
            compile_time_s=1.0,
            warmup_call_s=0.1,
            temp_bytes=1000,
            peak_rss_mb=400.0,
            initial_loss=1.0,
            final_loss=loss,
            min_loss=loss,
            mean_accepted_steps=100.0,
            losses=[1.0, loss],
            prediction=[[0.0, 0.0], [1.0, 1.0]],
            reconstruction_drift=1e-13 if adjoint == "reversible" else None,
        )
        return dict(
            experiment="white_dwarf",
            title="White dwarf",
            num_steps=100,
            adaptive=False,
            data_source="test",
            ts=[0.0, 1.0],
            data=[[0.0, 0.0], [1.0, 1.0]],
            state_labels=["y1", "y2"],
            runs=[run],
        )

    results = [fake("reversible", None, 0.01, 0.5), fake("checkpoint", 14, 0.03, 0.5)]
    args = argparse.Namespace(results=str(tmp_path))
    md = run_grid.write_report("white_dwarf", results, args, "python -m x", 60.0)
    text = open(md).read()
    assert "| checkpoint(14) |" in text and "3.00x" in text
    assert "**3.00x**" in text and "met" in text
    assert "python -m x" in text and "CPUs" in text
    for f in (
        "white_dwarf.csv",
        "white_dwarf_loss.png",
        "white_dwarf_cost.png",
        "white_dwarf_trajectory.png",
    ):
        assert (tmp_path / f).is_file()
