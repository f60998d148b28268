"""Smoke tests of `benchmarks/`: the Pareto benchmark's quick mode, in-process."""

import json
import os

import jax
from benchmarks import pareto


def test_pareto_frontier():
    points = {"a": (1.0, 5.0), "b": (2.0, 2.0), "c": (3.0, 2.0), "d": (4.0, 1.0)}
    assert pareto.pareto_frontier(points) == ["a", "b", "d"]
    # Ties on both axes: neither beats the other.
    assert pareto.pareto_frontier({"a": (1.0, 1.0), "b": (1.0, 1.0)}) == ["a", "b"]


def test_pareto_quick(tmp_path, capsys):
    out = pareto.main(
        ["--quick", "--only", "white", "--repeats", "1", "--out", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    (result,) = out["results"].values()
    assert result["name"] == "white dwarf"
    labels = [r["label"] for r in result["rows"]]
    expected = pareto.adjoints(result["num_steps"])
    assert labels == list(expected)
    assert {"RCA(2)", "RCA(4)", "RCA(8)", "RCA(16)", "RCA(14)", "RCA(100)"} <= set(
        labels
    )
    assert {"Direct", "Backsolve", "Reversible", "Reversible(k=100)"} <= set(labels)
    assert "Reversible(k=10)" in labels
    # Every adjoint ran (nothing this small is skipped) and has a table row.
    for r in result["rows"]:
        assert r["skipped"] is None, r
        assert r["temp_bytes"] > 0 and r["time_s"] > 0
        assert f"| {r['label']} |" in printed or f"| **{r['label']}** |" in printed
    # The frontier holds exact adjoints only, and the verdicts are printed.
    assert result["frontier"] and "Backsolve" not in result["frontier"]
    assert "Reversible is on the exact frontier: " in printed
    assert "memory Reversible / RCA(2): " in printed
    assert "speed-up of Reversible over the fastest RCA" in printed
    assert "approximate" in printed
    # Files: the per-workload JSON, the plot and the collected report.
    backend = jax.default_backend()
    with open(tmp_path / f"pareto_{backend}_white_dwarf.json") as f:
        saved = json.load(f)
    assert saved["verdict"] == result["verdict"]
    assert os.path.getsize(result["plot"]) > 0
    report = (tmp_path / f"pareto_{backend}.md").read_text()
    assert "## white dwarf" in report and "Command: `" in report


def test_hvp_memory_is_flat_in_the_number_of_steps():
    """`benchmarks/hvp_memory.py`'s measurement, on its quick model: the compiled
    temp memory of a Hessian-vector product through `ReversibleAdjoint` does not
    grow from N=10 to N=100 constant steps, `DirectAdjoint`'s does."""
    from benchmarks import hvp_memory

    size = hvp_memory.QUICK
    ours = [hvp_memory.temp_bytes(size, n, "Reversible") for n in (10, 100)]
    direct = [hvp_memory.temp_bytes(size, n, "Direct") for n in (10, 100)]
    assert all(isinstance(x, int) and x > 0 for x in ours + direct), (ours, direct)
    assert ours[1] <= 1.1 * ours[0]
    assert direct[1] > 1.1 * direct[0]


def test_scaling_cost_model_and_choice():
    from benchmarks import scaling

    # Binomial checkpointing: N <= C(c + r, r).
    assert scaling.recomputations(4, 10_000) == 20
    assert scaling.recomputations(8, 10_000) == 8
    assert scaling.recomputations(100, 100) == 0
    assert scaling.rca_counts(100) == [2, 4, 8, 14, 16, 100]
    # RCA is timed up to r recomputations per step, or up to a total model cost.
    assert scaling._timed(4, 10_000, max_recompute=20, max_work=0)
    assert not scaling._timed(2, 1000, max_recompute=20, max_work=0)  # r = 44
    assert scaling._timed(2, 1000, max_recompute=20, max_work=5e4)  # 48F x 1e3
    assert not scaling._timed(2, 10_000, max_recompute=20, max_work=5e4)
    rev = scaling.Row("w", "float32", 100, "rev", None, 1000, time_s=1.0)
    rev.grad_error = 1e-6
    rows = [
        rev,
        # Fastest, but over 1.25x the memory.
        scaling.Row("w", "float32", 100, "RCA(8)", 8, 1300, time_s=0.2),
        # Within memory, but less accurate than both reversible and sqrt(eps).
        scaling.Row("w", "float32", 100, "RCA(4)", 4, 1200, time_s=0.3),
        scaling.Row("w", "float32", 100, "RCA(2)", 2, 1100, time_s=2.0),
    ]
    rows[1].grad_error, rows[2].grad_error, rows[3].grad_error = 0.0, 1e-2, 1e-7
    best, speedup = scaling.fastest_equal(rows, eps=1.2e-7)
    assert best is rows[3] and speedup == 2.0


def test_gpu_report_quick(tmp_path, monkeypatch):
    """The GPU report's wiring, and `scaling.measure` (its section 2) on six float64
    steps of the white dwarf: every adjoint's memory, time and gradient error."""
    from benchmarks import gpu, scaling

    # The Pareto part is `pareto.main`, smoke-tested above; here only its wiring.
    calls = []

    def fake_pareto(argv):
        calls.append(argv)
        return {"results": {"white dwarf": {"verdict": "V"}}, "report": "r.md"}

    measured, real_measure = [], scaling.measure

    def measure(*args, **kwargs):
        measured.append(real_measure(*args, **kwargs))
        return measured[-1]

    monkeypatch.setattr(gpu.pareto, "main", fake_pareto)
    monkeypatch.setattr(scaling, "measure", measure)
    path = gpu.main(["--quick", "--out", str(tmp_path)])
    (rows,) = measured
    labels = [r.label for r in rows]
    assert labels == ["ReversibleAdjoint", "RCA(2)", "RCA(3)", "RCA(4)", "RCA(6)"]
    for r in rows:
        assert r.workload == "white dwarf" and r.dtype == "float64" and r.n == 6
        assert r.temp_bytes is not None and r.temp_bytes > 0
        assert r.time_s is not None and r.time_s > 0
        # float64 gradients of the same discrete solve agree with the reference.
        assert r.grad_error is not None and r.grad_error < 1e-9
    # Six steps are one segment: "auto" makes no checkpoints; the drift is reported.
    assert rows[0].k == "auto" and rows[0].auto_k is None
    assert rows[0].drift is not None and rows[0].drift < 1e-12
    text = open(path).read()
    assert calls and "--only" in calls[0]
    kind = jax.devices()[0].device_kind
    assert text.startswith(f"# GPU report: {kind}")
    assert "- white dwarf: V" in text
    assert "## 2. Scaling at GPU sizes" in text and "| 6 | RCA(2) |" in text
    assert "| RCA, Tsit5 |" in text and "| Reversible, Reversible(Tsit5) |" in text
    if jax.devices()[0].platform != "gpu":
        assert "**Not run on a GPU**" in text
