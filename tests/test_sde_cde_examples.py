"""Quick runs of the neural CDE / neural SDE examples in `experiments/`."""

import json

from experiments import neural_cde, neural_sde


def test_neural_cde_quick(tmp_path):
    result = neural_cde.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final_test_accuracy"] == result["final_test_accuracy"]
    # Two balanced classes: chance is 0.5.
    assert result["final_test_accuracy"] > 0.75
    assert result["final_test_loss"] < result["initial_test_loss"]
    assert result["comparison"]["reversible"]["step_s"] > 0


def test_neural_sde_quick(tmp_path):
    result = neural_sde.main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final_loss"] == result["final_loss"]
    assert result["final_loss"] < 0.2 * result["initial_loss"]
    pairs = zip(result["learned_mean"], result["true_mean"])
    assert all(abs(a - b) < 0.1 for a, b in pairs)
