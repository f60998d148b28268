"""The random differential test (`benchmarks/fuzz.py`): its machinery, and a small
fixed-seed slice of its cases, each of which must pass or be refused clearly.

`python -m benchmarks.fuzz --n N --seed S` runs any number of cases; this file keeps
the slice small (each case compiles two gradients).
"""

import dataclasses

import numpy as np
import pytest
from benchmarks import fuzz


# (seed, case), from seed 2: between them `Reversible(Midpoint)` under `PIDController`
# with `jax.vmap` over args, `LeapfrogMidpoint` on a CDE (cubic path) backwards in
# time under `jax.jit` with `checkpoint_every` and time gradients, an SDE,
# `AsynchronousLeapfrog` on a dict state with a closure under `jax.vmap` over y0, and
# a refused input (`SaveAt(dense=True)`). (A case with an event, seed 2 case 28,
# passes too but compiles for several times as long.)
SLICE = [(2, 10), (2, 25), (2, 29), (2, 9), (2, 15)]


def test_cases_are_reproducible_alone():
    # Case k of a seed does not depend on how many cases are drawn, nor on order.
    a = [fuzz.draw_case(7, k) for k in range(20)]
    b = [fuzz.draw_case(7, k) for k in reversed(range(20))][::-1]
    assert a == b
    assert len({dataclasses.replace(c, index=0) for c in a}) > 15
    assert fuzz.draw_case(8, 3) != fuzz.draw_case(7, 3)
    assert "--seed 7 --case 4" in a[4].describe()


def test_generator_covers_every_dimension():
    cases = [fuzz.draw_case(11, k) for k in range(300)]
    seen = {
        f.name: {getattr(c, f.name) for c in cases}
        for f in dataclasses.fields(fuzz.Case)
    }
    assert set(fuzz.SOLVERS) <= seen["solver"]
    assert set(fuzz.CONTROLLERS) <= seen["controller"]
    assert set(fuzz.SAVEATS) <= seen["saveat"]
    assert set(fuzz.TERMS) <= seen["term"]
    assert set(fuzz.TRANSFORMS) <= seen["transform"]
    assert set(fuzz.EVENTS) <= seen["event"]
    assert set(fuzz.STATES) <= seen["state"]
    assert {True, False} == seen["reverse"] == seen["integrated"]
    assert None in seen["checkpoint_every"] and len(seen["checkpoint_every"]) > 1
    assert {d for c in cases for d in c.diff} == {
        "y0",
        "args",
        "params",
        "t0",
        "t1",
        "dt0",
        "sol.ts",
        "saveat.ts",
    }
    assert len(seen["oddity"]) > 2


def test_refusal_kind():
    assert fuzz.refusal_kind("Use `adjoint=diffrax.RecursiveCheckpointAdjoint()`") == (
        "adjoint"
    )
    fix = "`ReversibleAdjoint` needs a reversible solver, got `Tsit5`. Wrap it: ..."
    assert fuzz.refusal_kind(fix) == "fix"
    internal = "CustomVJPException: Detected differentiation of a custom_vjp function"
    assert fuzz.refusal_kind(internal) is None
    assert fuzz.refusal_kind("RuntimeError: Unexpected tangent.") is None


def test_compare():
    ref = {"a": np.array([1.0, -2.0]), "b": np.array([np.inf, 3.0])}
    assert fuzz.compare(ref, ref)[0] == 0.0
    close = {"a": np.array([1.0 + 1e-12, -2.0]), "b": np.array([np.inf, 3.0])}
    assert fuzz.compare(close, ref)[0] <= 1.0
    far = {"a": np.array([1.0 + 1e-6, -2.0]), "b": np.array([np.inf, 3.0])}
    assert fuzz.compare(far, ref)[0] > 1.0
    padding = {"a": np.array([1.0, -2.0]), "b": np.array([0.0, 3.0])}
    assert fuzz.compare(padding, ref)[1] is not None
    assert fuzz.compare({"a": ref["a"]}, ref)[0] == np.inf


@pytest.mark.parametrize("seed, index", SLICE)
def test_slice(seed, index):
    case = fuzz.draw_case(seed, index)
    result = fuzz.run_case(case)
    assert result.outcome in ("pass", "refused"), (case.describe(), result.detail)
