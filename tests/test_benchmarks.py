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
