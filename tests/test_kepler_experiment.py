"""Smoke test of `python -m experiments.kepler --quick`: reversible solvers of both
families (SymmetricComposition(AsynchronousLeapfrog(), 4) and
Reversible(Midpoint())) train a Hamiltonian neural ODE on exact Kepler orbits for
a few iterations with `ReversibleAdjoint` and `PIDController`, and the report,
table and plots are written."""

import json
import math
import os

import numpy as np
import pytest
from experiments import kepler


def test_kepler_orbit_is_exact():
    # Energy -1/2 and angular momentum sqrt(1 - e^2) along the whole orbit, and
    # the orbit closes after one period.
    ts = np.linspace(0.0, 2 * math.pi, 50)
    y = kepler.kepler_orbit(0.6, 1.0, ts)
    energy = 0.5 * np.sum(y[:, 2:] ** 2, -1) - 1 / np.linalg.norm(y[:, :2], axis=-1)
    ang = y[:, 0] * y[:, 3] - y[:, 1] * y[:, 2]
    np.testing.assert_allclose(energy, -0.5, atol=1e-13)
    np.testing.assert_allclose(ang, math.sqrt(1 - 0.6**2), atol=1e-13)
    np.testing.assert_allclose(y[-1], y[0], atol=1e-12)


def test_kepler_quick(tmp_path, capsys):
    result = kepler.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    for name in (
        "kepler.json",
        "kepler.md",
        "kepler_orbits.png",
        "kepler_loss.png",
        "kepler_energy.png",
        "kepler_cost.png",
    ):
        path = os.path.join(tmp_path, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    with open(os.path.join(tmp_path, "kepler.json")) as f:
        saved = json.load(f)
    # --quick trains one solver of each family.
    assert [r["key"] for r in saved["runs"]] == ["sc4", "rev-midpoint"]
    for run in result["runs"]:
        losses = run["losses"]
        assert len(losses) == run["iters"] == 3
        assert all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0]  # training makes progress
        assert run["median_iter_s"] > 0 and run["compile_s"] > 0
        assert run["temp_bytes"] is None or run["temp_bytes"] > 0
        assert math.isfinite(run["test_pos_rel_error"])
        assert math.isfinite(run["learned_energy_drift_last"])
        assert run["mean_steps"] >= 1
    with open(os.path.join(tmp_path, "kepler.md")) as f:
        md = f.read()
    assert "python -m experiments.kepler --quick" in md
    assert "| SymmetricComposition(AsynchronousLeapfrog(), 4) |" in md
    printed = capsys.readouterr().out
    assert "| solver |" in printed and "Reversible(Midpoint())" in printed


def test_unknown_solver_rejected(tmp_path):
    with pytest.raises(SystemExit, match="unknown solver"):
        kepler.main(["--quick", "--out", str(tmp_path), "--solvers", "rk4"])
