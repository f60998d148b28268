"""Smoke tests of the paper-reproduction experiments in `experiments/`.

Each experiment's `--quick` mode runs in-process (a few iterations on a short
solve), on built-in/simulated data. The data loaders are tested on small files
written in the format of the real recordings, including their error messages.
"""

import json
import math
import os

import jax.numpy as jnp
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


# ---------------------------------------------------------------------------
# Experiments where memory binds: CNF, digits ODE-Net, neural CDE on UEA data
# ---------------------------------------------------------------------------


def _check_adjoint_table(result, out_dir, name, plots, extra_rows=0):
    for f in [f"{name}.json", f"{name}.csv", f"{name}.md", *plots]:
        path = os.path.join(out_dir, f)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    with open(os.path.join(out_dir, f"{name}.json")) as f:
        saved = json.load(f)
    assert saved["command"].startswith(f"python -m experiments.{name} --quick")
    with open(os.path.join(out_dir, f"{name}.md")) as f:
        md = f.read()
    assert "| reversible |" in md and "| direct |" in md and "CPUs" in md
    for records in result["tables"].values():
        rev, direct, *others = records
        assert len(others) == extra_rows
        assert (rev["label"], direct["label"]) == ("reversible", "direct")
        assert rev["trained"] and not direct["trained"]
        assert len(rev["losses"]) == rev["iters"] and len(direct["losses"]) == 2
        assert all(math.isfinite(x) for x in rev["losses"] + direct["losses"])
        # Exact gradients either way: the same training trajectory (float32).
        assert direct["loss_rel_diff"] < 1e-4
        # Storing every stage costs more than reconstructing.
        assert direct["temp_bytes"] > 2 * rev["temp_bytes"] > 0
        assert rev["median_iter_s"] > 0 and rev["peak_rss_mb"] > 0
    return saved


def test_cnf_quick(tmp_path):
    from experiments import cnf

    result = cnf.main(
        ["--quick", "--out", str(tmp_path), "--no-progress", "--integrated"]
    )
    plots = ["cnf_density.png", "cnf_cost.png", "cnf_loss.png"]
    _check_adjoint_table(result, tmp_path, "cnf", plots)
    (rev, _) = result["tables"]["midpoint"]
    assert math.isfinite(rev["eval"]["NLL"])


def test_cnf_divergence_and_density():
    import diffrax
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    from experiments import cnf

    flow = cnf.Flow(2, 16, 4, key=jr.PRNGKey(3))
    x = jr.normal(jr.PRNGKey(4), (5, 2), jnp.float32)
    t = jnp.asarray(0.3, jnp.float32)
    jac = jax.vmap(jax.jacfwd(lambda xi: flow(t, xi)))(x)
    exact = jnp.trace(jac, axis1=1, axis2=2)
    dx, da = cnf.cnf_field(t, (x, jnp.zeros(5, jnp.float32)), (flow, None))
    np.testing.assert_allclose(-da, exact, rtol=1e-5, atol=1e-6)
    # Hutchinson averaged over the four sign vectors of R^2 is the exact trace.
    signs = [jnp.array(s, jnp.float32) for s in ((1, 1), (1, -1), (-1, 1), (-1, -1))]
    hutch = [
        cnf.cnf_field(t, (x, 0 * x[:, 0]), (flow, s * jnp.ones_like(x)))[1]
        for s in signs
    ]
    np.testing.assert_allclose(-sum(hutch) / 4, exact, rtol=1e-5, atol=1e-6)
    # The flow's density integrates to one (change of variables, sign of logp).
    g = np.linspace(-7, 7, 141, dtype=np.float32)
    grid = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2))
    solver = cnf.make_solver("midpoint")
    logp = cnf.push_forward(flow, grid, solver, diffrax.DirectAdjoint(), 10)
    mass = float(jnp.sum(jnp.exp(logp)) * (g[1] - g[0]) ** 2)
    assert abs(mass - 1) < 1e-2


def test_digits_odenet_quick(tmp_path):
    from experiments import digits_odenet

    result = digits_odenet.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    plots = [
        "digits_odenet_cost.png",
        "digits_odenet_loss.png",
        "digits_odenet_memory_steps.png",
    ]
    _check_adjoint_table(result, tmp_path, "digits_odenet", plots)
    (rev, _) = next(iter(result["tables"].values()))
    assert 0 <= rev["eval"]["test accuracy"] <= 1
    assert result["config"]["num_train"] + result["config"]["num_test"] == 1797
    # Direct memory grows with the number of steps (DirectAdjoint allocates in
    # blocks of 16 steps), and exceeds reversible's, which does not grow.
    mem = {k: dict(v) for k, v in result["memory_vs_steps"].items()}
    assert mem["direct"][32] > mem["direct"][4] > mem["reversible"][4]
    assert mem["reversible"][32] < 1.1 * mem["reversible"][4]


def test_uea_cde_quick(tmp_path):
    """The quick table, and `checkpoint:N@base` (one run for both: the model and data
    compile once): the plain base solver gets a row of its own, the same model and
    minibatches, and losses close to, but unlike those of every adjoint through
    `Reversible(base)` not equal to, the reversible run's (the coupled scheme is a
    different discrete model)."""
    from experiments import uea_cde

    result = uea_cde.main(
        ["--quick", "--out", str(tmp_path), "--no-progress"]
        + ["--adjoints", "reversible,direct,checkpoint:N@base"]
    )
    _check_adjoint_table(
        result,
        tmp_path,
        "uea_cde",
        ["uea_cde_cost.png", "uea_cde_loss.png"],
        extra_rows=1,
    )
    cfg = result["config"]
    assert (cfg["channels"], cfg["num_classes"], cfg["length"]) == (13, 9, 29)
    assert cfg["steps"] == 28  # one step per observation interval in --quick
    (rev, direct, base) = next(iter(result["tables"].values()))
    assert base["label"] == "checkpoint(28) [base solver]" and base["base_solver"]
    assert not rev["base_solver"] and not direct["base_solver"] and base["ran"]
    assert 1e-6 < base["loss_rel_diff"] < 1e-2
    md = (tmp_path / "uea_cde.md").read_text()
    assert "| checkpoint(28) [base solver] |" in md and "plain base solver" in md


def test_japanese_vowels_from_sktime():
    from experiments.ts_data import find_split, load_ts

    train = load_ts(find_split("JapaneseVowels", "TRAIN"))
    test = load_ts(find_split("JapaneseVowels", "TEST"))
    assert (len(train.series), len(test.series)) == (270, 370)
    assert train.dims == 12 and train.class_labels == [str(i) for i in range(1, 10)]
    lengths = [len(s) for s in train.series + test.series]
    assert (min(lengths), max(lengths)) == (7, 29)


TS_HEADER = """\
# a comment
@problemName Tiny
@timeStamps false
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b
@data
"""


def test_ts_loader_and_padding(tmp_path):
    from experiments.ts_data import channel_stats, load_ts, to_arrays

    path = tmp_path / "tiny.ts"
    path.write_text(TS_HEADER + "1,2,3:4,5,6:a\n7,8:9,10:b\n")
    data = load_ts(path)
    assert data.name == "Tiny" and list(data.labels) == ["a", "b"]
    np.testing.assert_array_equal(data.series[0], [[1, 4], [2, 5], [3, 6]])
    mean, std = channel_stats(data)
    x, y = to_arrays(data, 3, mean, std)
    assert x.shape == (2, 3, 3) and list(y) == [0, 1]
    # The shorter case holds its last value, time channel included.
    np.testing.assert_array_equal(x[1, 2], x[1, 1])
    np.testing.assert_allclose(x[0, :, 0], [0, 0.5, 1])


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("1,2:3,4:a\n", "not a tag"),
        (TS_HEADER.replace("@data\n", ""), "no '@data'"),
        (TS_HEADER.replace("false\n@uni", "true\n@uni"), "time-stamped"),
        (TS_HEADER.replace("@classLabel true a b", "@classLabel false"), "classLabel"),
        (TS_HEADER, "no cases"),
        (TS_HEADER + "1,2,3:a\n", "1 dimensions, the header says 2"),
        (TS_HEADER + "1,2:3,4:c\n", "label 'c'"),
        (TS_HEADER + "1,x:3,4:a\n", "cannot parse"),
        (TS_HEADER + "1,?:3,4:a\n", "missing values"),
        (TS_HEADER + "1,2:3:a\n", "different lengths"),
        (TS_HEADER + "1,inf:3,4:a\n", "non-finite"),
    ],
)
def test_malformed_ts_file_errors(tmp_path, text, match):
    from experiments.ts_data import load_ts

    path = tmp_path / "bad.ts"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_ts(path)


def test_missing_ts_file_errors(tmp_path):
    from experiments.ts_data import find_split, load_ts

    with pytest.raises(FileNotFoundError, match="@data"):
        load_ts(tmp_path / "nope.ts")
    with pytest.raises(FileNotFoundError, match="Nope_TRAIN.ts"):
        find_split("Nope", "TRAIN", str(tmp_path))


def test_parse_adjoints():
    from experiments.adjoint_table import DEFAULT_ADJOINTS, parse_adjoints

    labels = [s.label for s in parse_adjoints(DEFAULT_ADJOINTS, 100)]
    assert labels == [
        "reversible",
        "checkpoint(2)",
        "checkpoint(8)",
        "checkpoint(14)",
        "checkpoint(100)",
        "direct",
        "checkpoint(14) [base solver]",
    ]
    # floor(sqrt(2 * 32)) = 8 is listed once.
    assert len(parse_adjoints(DEFAULT_ADJOINTS, 32)) == 6
    (spec,) = parse_adjoints("direct@base", 10)
    assert spec.base and spec.kind == "direct"
    with pytest.raises(SystemExit):
        parse_adjoints("checkpoint:many", 10)
    with pytest.raises(SystemExit):
        parse_adjoints("backsolve", 10)
    # ReversibleAdjoint needs a reversible solver; only "@base" is known.
    for bad in ("reversible@base", "checkpoint:2@plain"):
        with pytest.raises(SystemExit, match="@base"):
            parse_adjoints(bad, 10)


def test_base_solver_speedups_quick(tmp_path):
    """The side-by-side timing of reversible, checkpointing through
    `Reversible(base)` and through the plain base solver writes one row each."""
    from experiments import base_solver_speedups

    result = base_solver_speedups.main(
        ["--quick", "--only", "neural CDE", "--repeats", "1", "--out", str(tmp_path)]
    )
    (rows,) = result["tables"].values()
    assert [r["label"] for r in rows] == [
        "reversible",
        "checkpoint(7)",
        "checkpoint(7) [base solver]",
    ]
    assert all(r["median_s"] > 0 and r["temp_bytes"] > 0 for r in rows)
    md = (tmp_path / "base_solver_speedups.md").read_text()
    assert "| reversible |" in md and "| 1.00x |" in md and "CPUs" in md


def test_newton_fit_quick(tmp_path):
    """Newton-CG on Hessian-vector products through `ReversibleAdjoint` converges on
    the Lotka-Volterra fit (no worse than Adam after 50 steps), its Hessian equals
    `DirectAdjoint`'s, the Laplace standard deviations are finite and positive, and
    the product's memory is below `DirectAdjoint`'s."""
    from experiments import newton_fit

    out = newton_fit.main(["--quick", "--out", str(tmp_path / "newton_fit.md")])
    rows = list(out["rows"].values())
    assert [name.split(" ")[0] for name in out["rows"]] == ["Newton-CG", "Adam,"]
    newton_loss, adam_loss = rows[0][2], rows[1][2]
    assert newton_loss <= adam_loss
    assert out["hessian_error"] < 1e-9
    assert np.all(np.isfinite(out["std"])) and np.all(out["std"] > 0)
    assert rows[0][3] < out["direct_hvp_mib"]
    assert "Laplace" in (tmp_path / "newton_fit.md").read_text()


def test_newton_fit_bfgs():
    """The BFGS baseline of `experiments/newton_fit.py` (not run by `--quick`), on a
    quadratic whose minimiser is known."""
    from experiments import newton_fit

    target = jnp.array([1.0, -2.0, 0.5])
    x, iterations, value = newton_fit.bfgs(
        lambda x: jnp.sum((x - target) ** 2), jnp.zeros(3), 20
    )
    assert float(jnp.max(jnp.abs(x - target))) < 1e-6 and value < 1e-10
    assert 0 < iterations <= 20


def test_newton_fit_conjugate_gradients():
    """`newton_fit.conjugate_gradients` (the loop of `jax.scipy.sparse.linalg.cg`,
    from Python) solves a symmetric positive definite system as `cg` does."""
    import jax.scipy.sparse.linalg as jsl
    from experiments import newton_fit

    m = np.random.default_rng(0).normal(size=(4, 4))
    a = jnp.asarray(m @ m.T + 0.5 * np.eye(4))
    b = jnp.array([1.0, -2.0, 0.5, 3.0])
    x = newton_fit.conjugate_gradients(lambda v: a @ v, b, 8, tol=1e-12)
    np.testing.assert_allclose(a @ x, b, rtol=1e-10, atol=1e-10)
    ref, _ = jsl.cg(lambda v: a @ v, b, maxiter=2)
    np.testing.assert_allclose(
        newton_fit.conjugate_gradients(lambda v: a @ v, b, 2), ref, rtol=1e-12
    )
