"""`revdiffrax.choose_adjoint`: every exact adjoint measured on the user's loss, the
fastest that fits the memory budget returned."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
import revdiffrax
from revdiffrax._adjoint_choice import AdjointChoice, pick_fastest


def _row(label, temp, seconds, eligible=True):
    return AdjointChoice(label, diffrax.DirectAdjoint(), temp, seconds, 0.0, eligible)


def test_pick_fastest_rule():
    rows = [
        _row("RCA(2)", 100, 3.0),
        _row("RCA(N)", 900, 1.0),
        _row("reversible", 80, 2.0),
        _row("too big", 5000, None, eligible=False),
        _row("drifts", 50, 0.5, eligible=False),
    ]
    assert pick_fastest(rows).label == "RCA(N)"  # pyright: ignore
    assert pick_fastest(rows[:1] + rows[2:]).label == "reversible"  # pyright: ignore
    assert pick_fastest(rows[3:]) is None


def _setup():
    mlp = eqx.nn.MLP(8, 8, 64, 2, activation=jnp.tanh, key=jr.PRNGKey(0))
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    y0 = jr.normal(jr.PRNGKey(1), (128, 8))

    def loss(adjoint, p, y0):
        term = diffrax.ODETerm(lambda t, y, p: jax.vmap(eqx.combine(p, static))(y))
        base = diffrax.Midpoint()
        reversible = isinstance(adjoint, revdiffrax.ReversibleAdjoint)
        solver = revdiffrax.Reversible(base) if reversible else base
        sol = diffrax.diffeqsolve(
            term, solver, 0.0, 1.0, 0.02, y0, args=p, adjoint=adjoint, max_steps=50
        )
        return jnp.mean(sol.ys**2)  # pyright: ignore

    return loss, params, y0


def test_choose_adjoint_budgets(capsys):
    """With room for everything it picks the fastest measured (RCA(N) or the
    reversible adjoint here, close in time since `Reversible`'s stage loop); under a
    budget that only the reversible adjoint meets, the reversible adjoint."""
    loss, params, y0 = _setup()
    candidates = {
        "RCA(2)": diffrax.RecursiveCheckpointAdjoint(checkpoints=2),
        "RCA(N)": diffrax.RecursiveCheckpointAdjoint(checkpoints=50),
        "reversible": revdiffrax.ReversibleAdjoint(drift_tol=None),
    }
    chosen, rows = revdiffrax.choose_adjoint(
        loss, params, y0, candidates=candidates, repeats=5
    )
    fastest = min(rows, key=lambda r: r.seconds)  # pyright: ignore
    assert chosen is candidates[fastest.label]
    assert fastest.label != "RCA(2)"  # two checkpoints recompute: far slower
    assert "<- chosen" in capsys.readouterr().out
    memory = {r.label: r.temp_bytes for r in rows}
    assert memory["reversible"] < memory["RCA(2)"] < memory["RCA(N)"]  # pyright: ignore
    budget = memory["reversible"]
    # Over the budget, RCA(2) is compiled but not run (RCA(N), larger still, would
    # take the same path: left out, one compilation less).
    fewer = {k: candidates[k] for k in ("RCA(2)", "reversible")}
    chosen, rows = revdiffrax.choose_adjoint(
        loss, params, y0, candidates=fewer, memory_budget=budget, verbose=False
    )
    assert chosen is candidates["reversible"]
    assert [r.seconds is None for r in rows] == [True, False]
    # Nothing fits: one candidate suffices (every candidate is compiled and measured
    # alike, as the calls above check; each costs a compilation).
    with pytest.raises(ValueError, match="No adjoint fits"):
        revdiffrax.choose_adjoint(
            loss,
            params,
            y0,
            candidates={"reversible": candidates["reversible"]},
            memory_budget=1,
            verbose=False,
        )


def test_default_candidates():
    from revdiffrax._adjoint_choice import default_candidates

    labels = list(default_candidates(1000))
    assert labels == [
        "RCA(2)",
        "RCA(4)",
        "RCA(8)",
        "RCA(16)",
        "RCA(44)",
        "RCA(1000)",
        "Direct",
        "reversible",
        "reversible k=100",
        "reversible k=10",
    ]
    assert "RCA(None)" in default_candidates(None)
