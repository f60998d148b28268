"""Random differential test of `revdiffrax.ReversibleAdjoint`.

A seeded generator draws small configurations (solver x step size controller x
`SaveAt` x term kind x differentiated inputs x transform x `checkpoint_every` x
event x time direction x state PyTree), computes the same loss, its outputs and its
gradient with `revdiffrax.ReversibleAdjoint()` and with
`diffrax.RecursiveCheckpointAdjoint()` through the same solver in float64, and
classifies each case:

- `pass`: loss, outputs (`sol.ys`, `sol.ts`) and every gradient agree to
  `RTOL` / `ATOL` (leafwise, relative to the largest magnitude of the reference
  leaf) and are finite;
- `refused`: `ReversibleAdjoint` raised an error that names an alternative (another
  diffrax adjoint, or a concrete fix such as a solver or controller to use), while
  the reference worked;
- `both refuse`: the reference raised as well (an invalid configuration for diffrax
  itself, e.g. adaptive steps with a solver without error estimate); not counted as
  a failure;
- `reference only fails`: the reference raised or was not finite and
  `ReversibleAdjoint` worked, or the two disagree and `diffrax.DirectAdjoint`
  (through the same solver) agrees with `ReversibleAdjoint` on everything (RCA is
  then wrong); reported, not counted as a failure of revdiffrax;
- `failed`: anything else: a mismatch, a non-finite value, or an error whose message
  names no alternative (an internal JAX error, say).

Every case is reproducible alone: case `k` of seed `s` is drawn by its own
`random.Random`, so `--seed s --case k` reruns exactly it.

Commands:

    python -m benchmarks.fuzz --n 300 --seed 20261205 --out benchmarks/results
    python -m benchmarks.fuzz --seed 20261205 --case 17 --show-failures

Warnings (`DriftWarning`, `ParasiticModeWarning`, ...) are recorded per case as
information; they do not change the classification.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import random
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.tree_util as jtu  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402
import revdiffrax  # noqa: E402


RTOL = 1e-8
ATOL = 1e-10
# Clear JAX's caches every this many cases: each case compiles new functions, and
# on the CPU every compiled executable holds LLVM memory mappings (see
# tests/conftest.py; the kernel allows 65530).
CLEAR_EVERY = 10

ERK_BASES = ("Euler", "Midpoint", "Heun", "Ralston", "Bosh3", "Tsit5", "Dopri5")
SOLVERS = (
    *(f"Reversible({b})" for b in ERK_BASES),
    "ReversibleHeun",
    "LeapfrogMidpoint",
    "SemiImplicitEuler",
    "AsynchronousLeapfrog",
    "SymmetricComposition(AsynchronousLeapfrog,4)",
    "SymmetricComposition(ReversibleHeun,6)",
)
# Solvers without an error estimate (adaptive controllers are unsupported combos).
FIXED_STEP_SOLVERS = ("Reversible(Euler)", "LeapfrogMidpoint", "SemiImplicitEuler")
CONTROLLERS = (
    "constant",
    "pid",
    "pid+dtmin",
    "pid+dtmax",
    "pid+jump_ts",
    "pid+step_ts",
    "stepto",  # a fixed grid
    "stepto-traced",  # a grid built from the (maybe differentiated) t0 and t1
)
SAVEATS = ("t1", "t0+t1", "ts", "ts+t1", "steps", "fn", "subs")
ODE_TERMS = ("module", "args", "closure")
TERMS = (*ODE_TERMS, "sde", "cde-linear", "cde-cubic", "cde-closure")
TRANSFORMS = ("none", "jit", "vmap-y0", "vmap-args")
EVENTS = ("none", "bool", "real")
STATES = ("array", "dict", "tuple")
# Unsupported or unusual inputs that should be refused with a clear message.
ODDITIES = (
    "none",
    "plain-solver",  # a non-reversible diffrax solver
    "dense",  # SaveAt(dense=True)
    "unsafe-bm",  # an SDE driven by UnsafeBrownianPath
    "max-steps-none",
)

NUM_STEPS = 20  # steps of the constant grid (|t1 - t0| = 1, |dt0| = 0.05)
MAX_STEPS = 256


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration; `describe()` is its one-line description."""

    seed: int
    index: int
    solver: str
    coupling: float | None
    integrated: bool
    controller: str
    saveat: str
    term: str
    diff: tuple[str, ...]
    transform: str
    checkpoint_every: int | None
    event: str
    reverse: bool
    state: str
    oddity: str

    def describe(self) -> str:
        fields = dataclasses.asdict(self)
        seed, index = fields.pop("seed"), fields.pop("index")
        body = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"[--seed {seed} --case {index}] {body}"


# ----------------------------------------------------------------------------------
# Drawing cases.


def _pick(rng: random.Random, options: Sequence[Any], weights=None) -> Any:
    if weights is None:
        return rng.choice(list(options))
    return rng.choices(list(options), weights=weights, k=1)[0]


def draw_case(seed: int, index: int) -> Case:
    """Case `index` of `seed`, drawn by its own generator (independent of the others).

    Most cases respect the solvers' capabilities; about one in six passes an
    unsupported combination on purpose (adaptive steps without an error estimate,
    an event on an SDE, `SaveAt(steps)` with an event, a plain solver, dense output,
    `UnsafeBrownianPath`, no `max_steps`) to check that it is refused clearly.
    """
    rng = random.Random(f"revdiffrax-fuzz:{seed}:{index}")
    odd = rng.random() < 0.17
    term = _pick(rng, TERMS, weights=(3, 3, 3, 2, 1, 1, 1))
    sde = term == "sde"
    cde = term.startswith("cde")
    if sde:
        solver = _pick(
            rng,
            ("Reversible(Heun)", "Reversible(Midpoint)", "ReversibleHeun"),
            weights=(2, 1, 2),
        )
    else:
        # Fewer of the costly compilations (seven stages, eighteen base steps).
        solver = _pick(rng, SOLVERS, weights=(2, 2, 3, 2, 2, 2, 1, 3, 3, 2, 3, 1, 0.5))
    if solver == "SemiImplicitEuler":
        term = _pick(rng, ODE_TERMS)
        sde = cde = False
    coupling = None
    integrated = False
    if solver.startswith("Reversible("):
        coupling = round(rng.uniform(0.9, 0.999), 4) if rng.random() < 0.7 else None
    # State PyTree: SemiImplicitEuler needs a pair; SDE/CDE terms use an array.
    if solver == "SemiImplicitEuler":
        state = "tuple"
    elif sde or cde:
        state = "array"
    else:
        state = _pick(rng, STATES, weights=(2, 1, 1))
    if solver.startswith("Reversible(") and not (sde or cde) and state != "array":
        integrated = rng.random() < 0.4
    adaptive_ok = solver not in FIXED_STEP_SOLVERS
    if adaptive_ok and not (odd and rng.random() < 0.3):
        controller = _pick(rng, CONTROLLERS, weights=(3, 3, 1, 1, 1, 1, 1, 1))
    elif odd:
        controller = _pick(rng, CONTROLLERS)
    else:
        controller = _pick(rng, ("constant", "stepto", "stepto-traced"))
    saveat = _pick(rng, SAVEATS, weights=(3, 1, 3, 1, 2, 1, 1))
    event = "none"
    if (not (sde or cde) or odd) and rng.random() < 0.25:
        event = _pick(rng, ("bool", "real"))
        if saveat == "steps" and not odd:
            saveat = "ts+t1"
    # The differentiated inputs.
    candidates = ["y0", "args", "params", "t0", "t1", "dt0", "sol.ts"]
    if sde and not odd:
        # diffrax's Brownian motions cannot be differentiated with respect to the
        # time interval (no adjoint can); the observation times can.
        candidates = ["y0", "args", "params", "sol.ts"]
    if "ts" in saveat or saveat in ("fn", "subs"):
        candidates.append("saveat.ts")
    diff = tuple(sorted(c for c in candidates if rng.random() < 0.4)) or ("params",)
    transform = _pick(rng, TRANSFORMS, weights=(3, 2, 2, 1))
    checkpoint_every = _pick(rng, (2, 3, 7)) if rng.random() < 0.3 else None
    reverse = rng.random() < 0.3
    oddity = "none"
    if odd:
        oddity = _pick(rng, ODDITIES, weights=(4, 1, 1, 1 if sde else 0, 1))
    return Case(
        seed=seed,
        index=index,
        solver=solver,
        coupling=coupling,
        integrated=integrated,
        controller=controller,
        saveat=saveat,
        term=term,
        diff=diff,
        transform=transform,
        checkpoint_every=checkpoint_every,
        event=event,
        reverse=reverse,
        state=state,
        oddity=oddity,
    )


# ----------------------------------------------------------------------------------
# Building the problem of a case.

DIM = 2  # dimension of the main state component x
CHANNELS = 2  # channels of a CDE's control path


def make_solver(case: Case) -> diffrax.AbstractSolver:
    name = case.solver
    if case.oddity == "plain-solver":
        m = re.fullmatch(r"Reversible\((\w+)\)", name)
        return getattr(diffrax, m.group(1))() if m else diffrax.Tsit5()
    if name.startswith("Reversible("):
        base = getattr(diffrax, name[len("Reversible(") : -1])()
        kwargs = {}
        if case.coupling is not None:
            kwargs["coupling"] = case.coupling
        if case.integrated:
            kwargs["integrated"] = (
                {"c": True, "x": False} if case.state == "dict" else (False, True)
            )
        return revdiffrax.Reversible(base, **kwargs)
    if name.startswith("SymmetricComposition("):
        base_name, order = name[len("SymmetricComposition(") : -1].split(",")
        base = getattr(revdiffrax, base_name)()
        return revdiffrax.SymmetricComposition(base, order=int(order))
    return getattr(revdiffrax, name)()


def _direction(case: Case) -> tuple[float, float]:
    return (1.0, 0.0) if case.reverse else (0.0, 1.0)


def make_controller(case: Case, t0, t1) -> diffrax.AbstractStepSizeController:
    name = case.controller
    if name == "constant":
        return diffrax.ConstantStepSize()
    if name.startswith("stepto"):
        # A non-uniform grid from t0 to t1: constants, or built from the (maybe
        # differentiated) endpoints, so that the step times depend on them.
        fractions = np.array([0.0, 0.07, 0.2, 0.31, 0.45, 0.5, 0.62, 0.8, 0.9, 1.0])
        if name == "stepto":
            a, b = _direction(case)
            return diffrax.StepTo(ts=jnp.asarray(a + (b - a) * fractions))
        return diffrax.StepTo(ts=t0 + (t1 - t0) * jnp.asarray(fractions))
    # Loose for SDEs: the Brownian increments make every error estimate O(sqrt(h)).
    sde = case.term == "sde"
    kwargs: dict[str, Any] = (
        dict(rtol=1e-2, atol=1e-2) if sde else dict(rtol=1e-4, atol=1e-6)
    )
    lo, hi = sorted(_direction(case))
    if name == "pid+dtmin":
        kwargs["dtmin"] = 0.04
    elif name == "pid+dtmax":
        kwargs["dtmax"] = 0.07
    elif name == "pid+jump_ts":
        kwargs["jump_ts"] = jnp.array([lo + 0.33 * (hi - lo), lo + 0.71 * (hi - lo)])
    elif name == "pid+step_ts":
        kwargs["step_ts"] = jnp.array([lo + 0.27 * (hi - lo), lo + 0.64 * (hi - lo)])
    return diffrax.PIDController(**kwargs)


def saveat_times(case: Case, t0, t1) -> jax.Array:
    """Observation times: the endpoints and four interior times, in the direction of
    integration, built from the (maybe traced) endpoints."""
    fractions = jnp.array([0.0, 0.13, 0.4, 0.55, 0.86, 1.0])
    return t0 + (t1 - t0) * fractions


def _fn(t, y, args):
    return jtu.tree_map(lambda x: jnp.sin(x) * (1.0 + 0.1 * t), y)


def make_saveat(case: Case, ts) -> diffrax.SaveAt:
    name = case.saveat
    if case.oddity == "dense":
        return diffrax.SaveAt(t1=True, dense=True)
    if name == "t1":
        return diffrax.SaveAt(t1=True)
    if name == "t0+t1":
        return diffrax.SaveAt(t0=True, t1=True)
    if name == "ts":
        return diffrax.SaveAt(ts=ts)
    if name == "ts+t1":
        return diffrax.SaveAt(ts=ts[1:-1], t1=True)
    if name == "steps":
        return diffrax.SaveAt(steps=True)
    if name == "fn":
        return diffrax.SaveAt(ts=ts, fn=_fn)
    if name == "subs":
        return diffrax.SaveAt(
            subs=[
                diffrax.SubSaveAt(t1=True),
                diffrax.SubSaveAt(ts=ts[::2], fn=_fn),
            ]
        )
    raise ValueError(name)


def make_model(case: Case, key) -> eqx.nn.MLP:
    """A tiny MLP with small weights (mild dynamics, no stiffness)."""
    out = DIM * CHANNELS if case.term.startswith("cde") else DIM
    model = eqx.nn.MLP(DIM, out, 4, 1, activation=jnp.tanh, key=key)
    return jtu.tree_map(lambda x: 0.5 * x if eqx.is_inexact_array(x) else x, model)


def _pack(case: Case, x, c):
    if case.state == "dict":
        return {"x": x, "c": c}
    if case.state == "tuple":
        return (x, c)
    return x


def _unpack(case: Case, y):
    if case.state == "dict":
        return y["x"], y["c"]
    if case.state == "tuple":
        return y
    return y, None


def drift(case: Case, t, y, model, a):
    """The ODE vector field: x' = a * MLP(x) + 0.3 cos(t) (+ 0.1 c when the second
    component c is not integrated), c' = sum tanh(x) (- 0.3 c when not integrated).
    The second component is the 'integrated' one of `Reversible(integrated=...)`."""
    x, c = _unpack(case, y)
    dx = a["scale"] * model(x) + 0.3 * jnp.cos(t) + a["shift"]
    if c is None:
        return dx
    dc = jnp.sum(jnp.tanh(x)) * jnp.ones_like(c)
    if not case.integrated:
        dx = dx + 0.1 * jnp.sum(c)
        dc = dc - 0.3 * c
    return _pack(case, dx, dc)


class _Drift(eqx.Module):
    """The vector field as a Module holding the model (term kind 'module')."""

    model: eqx.nn.MLP
    case: Case = eqx.field(static=True)

    def __call__(self, t, y, a):
        return drift(self.case, t, y, self.model, a)


def _cde_field(model, y, a):
    """A CDE's vector field: a (DIM, CHANNELS) matrix."""
    shift = jnp.repeat(a["shift"], CHANNELS)
    return (a["scale"] * model(y) + shift).reshape(DIM, CHANNELS)


class _CDEField(eqx.Module):
    model: eqx.nn.MLP

    def __call__(self, t, y, a):
        return _cde_field(self.model, y, a)


def make_path(case: Case, kind: str):
    key = jax.random.PRNGKey(case.index + 1)
    ts = jnp.linspace(-0.2, 1.2, 9)
    xs = jnp.cumsum(0.3 * jax.random.normal(key, (9, CHANNELS)), axis=0)
    xs = jnp.concatenate([ts[:, None], xs[:, 1:]], axis=1)
    if kind == "cde-linear":
        return diffrax.LinearInterpolation(ts, xs)
    coeffs = diffrax.backward_hermite_coefficients(ts, xs)
    return diffrax.CubicInterpolation(ts, coeffs)


def make_terms(case: Case, model, a):
    """The terms and the `args` of the solve, for the case's term kind."""
    kind = case.term
    if case.solver == "SemiImplicitEuler":
        # (x, c)' = (c-dependent, x-dependent): x' = f1(c), c' = f2(x).
        def f1(t, c, args):
            model_, a_ = args
            return 0.5 * c + 0.1 * jnp.cos(t) + a_["shift"]

        def f2(t, x, args):
            model_, a_ = args
            return -a_["scale"] * model_(x)

        if kind == "closure":
            return (
                diffrax.ODETerm(lambda t, c, _: f1(t, c, (model, a))),
                diffrax.ODETerm(lambda t, x, _: f2(t, x, (model, a))),
            ), None
        return (diffrax.ODETerm(f1), diffrax.ODETerm(f2)), (model, a)
    if kind == "module":
        return diffrax.ODETerm(_Drift(model, case)), a
    if kind == "args":
        return diffrax.ODETerm(lambda t, y, args: drift(case, t, y, *args)), (model, a)
    if kind == "closure":
        return diffrax.ODETerm(lambda t, y, _: drift(case, t, y, model, a)), None
    if kind == "sde":
        key = jax.random.PRNGKey(case.index)
        if case.oddity == "unsafe-bm":
            bm = diffrax.UnsafeBrownianPath(shape=(DIM,), key=key)
        else:
            bm = diffrax.VirtualBrownianTree(-0.1, 1.1, tol=1e-3, shape=(DIM,), key=key)

        def diffusion(t, y, a_):
            return 0.2 * a_["scale"] * jnp.diag(jnp.tanh(y)) + 0.05

        terms = diffrax.MultiTerm(
            diffrax.ODETerm(_Drift(model, case)), diffrax.ControlTerm(diffusion, bm)
        )
        return terms, a
    path = make_path(case, "cde-cubic" if kind == "cde-cubic" else "cde-linear")
    if kind == "cde-closure":

        def field(t, y, args):
            return _cde_field(model, y, a)

        return diffrax.ControlTerm(field, path).to_ode(), None
    return diffrax.ControlTerm(_CDEField(model), path).to_ode(), a


def make_event(case: Case):
    if case.event == "none":
        return None
    sign = -1.0 if case.reverse else 1.0

    def real(t, y, args, **kwargs):
        x, _ = _unpack(case, y)
        return sign * (t - 0.5) + 0.1 * jnp.tanh(x[0])

    if case.event == "bool":
        return diffrax.Event(lambda t, y, args, **kw: real(t, y, args, **kw) > 0)
    return diffrax.Event(real, root_finder=optx.Newton(rtol=1e-10, atol=1e-10))


def initial_inputs(case: Case) -> tuple[dict, Any]:
    """All inputs that may be differentiated (`params` is the array part of the
    model; its static part is returned separately)."""
    model = make_model(case, jax.random.PRNGKey(1000 + case.index))
    params, static = eqx.partition(model, eqx.is_array)
    t0, t1 = _direction(case)
    x0 = jnp.array([0.4, -0.3])
    if case.solver == "SemiImplicitEuler":
        y0 = (x0, jnp.array([0.2, 0.5]))
    else:
        y0 = _pack(case, x0, jnp.array([0.25]))
    a = {"scale": jnp.array(0.9), "shift": jnp.array([0.05, -0.1])}
    batch = 2
    if case.transform == "vmap-y0":
        y0 = jtu.tree_map(lambda x: jnp.stack([x, 0.8 * x + 0.01]), y0)
    if case.transform == "vmap-args":
        a = jtu.tree_map(lambda x: jnp.stack([x, 1.1 * x + 0.01][:batch]), a)
    dt0 = (t1 - t0) / NUM_STEPS
    inputs = {
        "y0": y0,
        "args": a,
        "params": params,
        "t0": jnp.array(t0),
        "t1": jnp.array(t1),
        "dt0": jnp.array(dt0),
    }
    return inputs, static


def _finite_or_zero(x):
    mask = jnp.isfinite(x)
    return jnp.where(mask, x, 0.0), mask


def _weighted_sum_squares(tree) -> jax.Array:
    total = jnp.array(0.0)
    for i, leaf in enumerate(jtu.tree_leaves(tree)):
        safe, mask = _finite_or_zero(leaf)
        w = 1.0 + 0.1 * i + 0.05 * jnp.arange(safe.size).reshape(safe.shape)
        total = total + jnp.sum(jnp.where(mask, w * safe**2, 0.0))
    return total


def solve_loss(case: Case, inputs: dict, static, adjoint) -> tuple[jax.Array, Any]:
    """The loss of one (unbatched) solve, and its outputs `(sol.ys, sol.ts)`."""
    model = eqx.combine(inputs["params"], static)
    t0, t1 = inputs["t0"], inputs["t1"]
    ts = saveat_times(case, t0, t1)
    terms, args = make_terms(case, model, inputs["args"])
    dt0 = None if case.controller.startswith("stepto") else inputs["dt0"]
    sol = diffrax.diffeqsolve(
        terms,
        make_solver(case),
        t0,
        t1,
        dt0,
        inputs["y0"],
        args=args,
        saveat=make_saveat(case, inputs.get("saveat.ts", ts)),
        stepsize_controller=make_controller(case, t0, t1),
        event=make_event(case),
        adjoint=adjoint,
        max_steps=None if case.oddity == "max-steps-none" else MAX_STEPS,
    )
    loss = _weighted_sum_squares(sol.ys)
    if "sol.ts" in case.diff:
        for leaf in jtu.tree_leaves(sol.ts):
            safe, mask = _finite_or_zero(leaf)
            loss = loss + jnp.sum(jnp.where(mask, jnp.sin(3.0 * safe), 0.0))
    return loss, (sol.ys, sol.ts)


def make_grad_fn(case: Case, static, adjoint) -> Callable:
    """(diff inputs, other inputs) -> ((loss, outputs), gradients), with the case's
    transform (plain, `jax.jit`, or `jax.vmap` over y0 or over args)."""

    def loss(diff_inputs, other_inputs):
        inputs = {**other_inputs, **diff_inputs}
        if case.transform in ("vmap-y0", "vmap-args"):
            batched = "y0" if case.transform == "vmap-y0" else "args"
            axes = {k: (0 if k == batched else None) for k in inputs}
            losses, outs = jax.vmap(
                lambda i: solve_loss(case, i, static, adjoint), in_axes=(axes,)
            )(inputs)
            return jnp.sum(losses), outs
        return solve_loss(case, inputs, static, adjoint)

    fn = jax.value_and_grad(loss, has_aux=True)
    if case.transform == "jit":
        fn = jax.jit(fn)
    return fn


def split_inputs(case: Case) -> tuple[dict, dict, Any]:
    inputs, static = initial_inputs(case)
    diff = {}
    for name in case.diff:
        if name == "sol.ts":
            continue
        if name == "saveat.ts":
            t0, t1 = inputs["t0"], inputs["t1"]
            diff[name] = saveat_times(case, t0, t1)
            continue
        if name == "dt0" and case.controller.startswith("stepto"):
            continue
        diff[name] = inputs.pop(name)
    return diff, inputs, static


# ----------------------------------------------------------------------------------
# Running and classifying.

_ADJOINT_NAMES = (
    "RecursiveCheckpointAdjoint",
    "DirectAdjoint",
    "BacksolveAdjoint",
    "ForwardMode",
    "ImplicitAdjoint",
)
# A refusal without an alternative adjoint must at least name a concrete fix.
_FIX_PATTERNS = (r"\bUse\b", r"\buse\b", r"\bpass\b", r"\bWrap\b", r"instead")


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def refusal_kind(message: str) -> str | None:
    """'adjoint' if the error names an alternative adjoint, 'fix' if it names a
    concrete fix (an API to use instead), None if it is not a clear refusal."""
    if any(name in message for name in _ADJOINT_NAMES):
        return "adjoint"
    if "revdiffrax" in message or "ReversibleAdjoint" in message:
        if any(re.search(p, message) for p in _FIX_PATTERNS):
            return "fix"
    return None


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jtu.tree_leaves(tree)]


def compare(rev, ref) -> tuple[float, str | None]:
    """The worst leafwise error of `rev` against `ref` in units of the tolerance
    (<= 1 passes), and a description of the first problem found."""
    la, lb = _leaves(rev), _leaves(ref)
    if jtu.tree_structure(rev) != jtu.tree_structure(ref) or len(la) != len(lb):
        return math.inf, "different output structures"
    worst = 0.0
    for i, (u, v) in enumerate(zip(la, lb)):
        if u.shape != v.shape:
            return math.inf, f"leaf {i}: shapes {u.shape} vs {v.shape}"
        if not np.issubdtype(v.dtype, np.inexact):
            if not np.array_equal(u, v):
                return math.inf, f"leaf {i}: integer values differ"
            continue
        fin_u, fin_v = np.isfinite(u), np.isfinite(v)
        # Padding (inf in unused SaveAt(steps) slots, after an event) must match.
        if not np.array_equal(fin_u, fin_v) or not np.array_equal(u[~fin_u], v[~fin_v]):
            return math.inf, f"leaf {i}: non-finite values differ"
        if not fin_u.any():
            continue
        scale = float(np.max(np.abs(v[fin_v])))
        err = float(np.max(np.abs(u[fin_u] - v[fin_v])))
        worst = max(worst, err / (ATOL + RTOL * scale))
    return worst, None


@dataclasses.dataclass
class Result:
    case: Case
    outcome: str  # pass | refused | both refuse | reference only fails | failed
    failure_class: str | None = None
    detail: str = ""
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0


def _run(case: Case, adjoint) -> tuple[Any, list[str]]:
    diff, other, static = split_inputs(case)
    fn = make_grad_fn(case, static, adjoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = jax.block_until_ready(fn(diff, other))
    names = sorted({w.category.__name__ for w in caught})
    return out, names


def _all_finite(tree) -> bool:
    # Non-finite padding of outputs is compared in `compare`; loss and gradients
    # must be finite.
    return all(np.all(np.isfinite(x)) for x in _leaves(tree))


def _first_line(message: str, n: int = 200) -> str:
    """The informative line of an error message (for an error raised inside JIT by
    equinox, the message at the end rather than the stack header)."""
    # equinox's runtime errors (from `eqx.error_if`) bury their message in a stack
    # or a callback traceback, above its debugging hints.
    found = re.search(r"EquinoxRuntimeError: (?!Above is the stack)(.+)", message)
    if found:
        return f"EquinoxRuntimeError: {found.group(1).strip()}"[:n]
    lines = [ln for ln in message.strip().splitlines() if ln.strip()] or [message]
    line = lines[0]
    return line[:n]


def _error_class(message: str) -> str:
    """A short, stable class name for an unexplained error message."""
    line = _first_line(message, 120)
    line = re.sub(r"0x[0-9a-f]+", "0x?", line)
    line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
    return f"crash: {line}"


def _problems(rev, ref) -> list[tuple[str, float, str | None]]:
    """The quantities (loss, outputs, gradients) where `rev` and `ref` disagree."""
    (rev_loss, rev_out), rev_grad = rev
    (ref_loss, ref_out), ref_grad = ref
    problems = []
    for name, a, b in (
        ("loss", rev_loss, ref_loss),
        ("sol.ys", rev_out[0], ref_out[0]),
        ("sol.ts", rev_out[1], ref_out[1]),
    ):
        worst, why = compare(a, b)
        if worst > 1.0:
            problems.append((name, worst, why))
    for key in sorted(ref_grad):
        worst, why = compare(rev_grad[key], ref_grad[key])
        if worst > 1.0:
            problems.append((f"d/d{key}", worst, why))
    return problems


def _reference_wrong(case: Case, rev) -> bool:
    """Whether a mismatch is RCA's: `ReversibleAdjoint` agrees with
    `diffrax.DirectAdjoint` (a third, independent route: backpropagation through
    the unrolled loop) on everything. E.g. diffrax 0.7.2's RCA counts the saved
    times' cotangent once per sample under `jax.vmap` when a loss uses both
    `sol.ys` and `sol.ts` with `SaveAt.ts` differentiated."""
    try:
        direct, _ = _run(case, diffrax.DirectAdjoint())
    except Exception:  # noqa: BLE001 -- no tie-breaker then: a failure stands
        return False
    return not _problems(rev, direct)


def run_case(case: Case) -> Result:
    start = time.perf_counter()
    rev_adjoint = revdiffrax.ReversibleAdjoint(checkpoint_every=case.checkpoint_every)
    ref_adjoint = diffrax.RecursiveCheckpointAdjoint()
    ref_error = rev_error = None
    try:
        ref, _ = _run(case, ref_adjoint)
    except Exception as e:  # noqa: BLE001 -- classifying every error is the point
        ref, ref_error = None, _message(e)
    try:
        rev, warns = _run(case, rev_adjoint)
    except Exception as e:  # noqa: BLE001
        rev, warns, rev_error = None, [], _message(e)
        rev_trace = traceback.format_exc()
    elapsed = time.perf_counter() - start

    def result(outcome, failure_class=None, detail=""):
        return Result(case, outcome, failure_class, detail, tuple(warns), elapsed)

    ref_ok = ref_error is None and _all_finite((ref[0][0], ref[1]))
    if rev_error is not None:
        if not ref_ok:
            why = _first_line(ref_error or "non-finite", 120)
            return result(
                "both refuse", detail=f"{_first_line(rev_error)} / RCA: {why}"
            )
        kind = refusal_kind(rev_error)
        if kind is not None:
            return result("refused", f"refused ({kind})", _first_line(rev_error))
        where = [ln for ln in rev_trace.splitlines() if "revdiffrax/" in ln]
        detail = _first_line(rev_error, 400) + (
            f" [at {where[-1].strip()}]" if where else ""
        )
        return result("failed", _error_class(rev_error), detail)
    if not ref_ok:
        return result(
            "reference only fails", detail=_first_line(ref_error or "non-finite")
        )
    (rev_loss, rev_out), rev_grad = rev
    if not _all_finite((rev_loss, rev_grad)):
        return result("failed", "non-finite loss or gradient")
    problems = _problems(rev, ref)
    if problems and _reference_wrong(case, rev):
        names = ", ".join(p[0] for p in problems)
        return result(
            "reference only fails",
            detail=f"RCA disagrees ({names}); ReversibleAdjoint agrees with "
            "DirectAdjoint",
        )
    if problems:
        names = ", ".join(p[0] for p in problems)
        detail = "; ".join(
            f"{n}: {why or f'error {w:.3g} x tolerance'}" for n, w, why in problems
        )
        return result("failed", f"mismatch: {names}", detail)
    return result("pass")


# ----------------------------------------------------------------------------------
# Command line.

OUTCOMES = ("pass", "refused", "both refuse", "reference only fails", "failed")


def run_cases(
    cases: Sequence[Case],
    *,
    verbose: bool = True,
    show_failures: bool = False,
    log: str | None = None,
) -> list[Result]:
    """Run and classify `cases`; with `log`, append each result to that JSON-lines
    file as soon as it is known (a long run can be stopped and summarised)."""
    results = []
    for i, case in enumerate(cases):
        r = run_case(case)
        results.append(r)
        if log is not None:
            with open(log, "a") as f:
                f.write(json.dumps(_row(r)) + "\n")
        if verbose:
            tag = r.outcome.upper() if r.outcome == "failed" else r.outcome
            extra = f" ({r.failure_class})" if r.failure_class else ""
            print(f"{case.index:4d} {tag}{extra} {r.seconds:.1f}s", flush=True)
            if r.outcome == "failed" or (show_failures and r.outcome != "pass"):
                print(f"     {case.describe()}", flush=True)
                if show_failures and r.detail:
                    print(f"     {r.detail}", flush=True)
        if (i + 1) % CLEAR_EVERY == 0:
            jax.clear_caches()
            gc.collect()
    return results


# Defects known when this generator was written (issue 22), each with a test on the
# features of a failed case that makes it a suspect; the report lists every suspect,
# and a failure with none is a new class.
_TIME_GRADS = ("d/dt0", "d/dt1", "d/ddt0", "d/dsaveat.ts")
_CLIPPING = ("pid+dtmin", "pid+dtmax", "pid+jump_ts", "pid+step_ts")


def _time_mismatch_only(r: "Result") -> bool:
    cls = r.failure_class or ""
    names = cls.removeprefix("mismatch: ").split(", ")
    return cls.startswith("mismatch: ") and all(n in _TIME_GRADS for n in names)


KNOWN_DEFECTS: dict[str, Callable[["Result"], bool]] = {
    "sol.ts carries no gradient without an event": lambda r: (
        "sol.ts" in r.case.diff and r.case.event == "none" and _time_mismatch_only(r)
    ),
    "time gradients under PID with dtmin/dtmax/jump_ts/step_ts": lambda r: (
        r.case.controller in _CLIPPING and _time_mismatch_only(r)
    ),
    "SDE with differentiated SaveAt(ts): Unexpected tangent": lambda r: (
        r.case.term == "sde" and "Unexpected tangent" in r.detail
    ),
    "closure inside ControlTerm(...).to_ode(): CustomVJPException": lambda r: (
        r.case.term == "cde-closure" and "custom_vjp" in r.detail
    ),
}


def suspects(r: Result) -> list[str]:
    """The known defects that may explain the failed case `r`."""
    return [name for name, test in KNOWN_DEFECTS.items() if test(r)]


def summarise(results: Sequence[Result], command: str) -> str:
    counts = Counter(r.outcome for r in results)
    total = sum(r.seconds for r in results)
    lines = [
        f"Command: `{command}`",
        "",
        f"Cases: {len(results)}; total {total:.0f} s "
        f"({total / max(len(results), 1):.1f} s per case); jax {jax.__version__}, "
        f"diffrax {diffrax.__version__}, backend {jax.default_backend()}.",
        "",
        "| outcome | cases |",
        "|---|---|",
        *(f"| {o} | {counts.get(o, 0)} |" for o in OUTCOMES),
        "",
    ]
    kinds = Counter(r.failure_class for r in results if r.outcome == "refused")
    if kinds:
        lines += [
            f"Of the refusals, {kinds.get('refused (adjoint)', 0)} name an alternative "
            f"adjoint and {kinds.get('refused (fix)', 0)} a concrete fix without one "
            "(another solver, `SaveAt`, `max_steps`, ...).",
            "",
        ]
    failed = [r for r in results if r.outcome == "failed"]
    if failed:
        by_class: dict[str, list[Result]] = {}
        for r in failed:
            by_class.setdefault(r.failure_class or "?", []).append(r)
        lines += ["## Failure classes", "", "| class | cases | one reproduction |"]
        lines += ["|---|---|---|"]
        for cls, rs in sorted(by_class.items(), key=lambda kv: -len(kv[1])):
            idx = ", ".join(str(r.case.index) for r in rs)
            cls_md = cls.replace("|", "\\|")
            lines.append(
                f"| {cls_md} | {len(rs)} ({idx}) | `{rs[0].case.describe()}` |"
            )
        unexplained = [r for r in failed if not suspects(r)]
        lines += [
            "",
            "Known defects (issue 22) that may explain the failures, by the features "
            "of each case:",
            "",
            "| known defect | cases |",
            "|---|---|",
        ]
        for name in KNOWN_DEFECTS:
            idx = [str(r.case.index) for r in failed if name in suspects(r)]
            lines.append(f"| {name} | {len(idx)} ({', '.join(idx)}) |")
        idx = [str(r.case.index) for r in unexplained]
        lines.append(f"| none of them | {len(idx)} ({', '.join(idx)}) |")
        lines += ["", "Details of each failure:", ""]
        for r in failed:
            why = "; ".join(suspects(r)) or "no known defect"
            detail = r.detail.replace("|", "/")
            lines.append(f"- `{r.case.describe()}`: {detail} (suspects: {why})")
        lines.append("")
    refused = [r for r in results if r.outcome in ("refused", "both refuse")]
    if refused:
        lines += ["## Refusals", "", "| outcome | message | cases |", "|---|---|---|"]
        msgs = Counter((r.outcome, r.detail[:150]) for r in refused)
        for (outcome, msg), n in msgs.most_common():
            lines.append(f"| {outcome} | {msg.replace('|', '/')} | {n} |")
        lines.append("")
    warned = Counter(w for r in results for w in r.warnings)
    if warned:
        lines += ["Warnings issued (cases): "]
        lines[-1] += ", ".join(f"{w} {n}" for w, n in warned.most_common()) + "."
        lines.append("")
    return "\n".join(lines)


# Faster CPU compilation (each case compiles two new gradients, and compiling
# dominates a case's time): about 15% less. Set by `main` only, before the first
# computation initialises the backend, so importing this module changes nothing.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)


def _row(r: Result) -> dict:
    return {
        **dataclasses.asdict(r.case),
        "outcome": r.outcome,
        "failure_class": r.failure_class,
        "detail": r.detail,
        "warnings": list(r.warnings),
        "seconds": r.seconds,
    }


def _from_row(row: dict) -> Result:
    fields = {f.name for f in dataclasses.fields(Case)}
    case = Case(
        **{k: (tuple(v) if k == "diff" else v) for k, v in row.items() if k in fields}
    )
    return Result(
        case,
        row["outcome"],
        row["failure_class"],
        row["detail"],
        tuple(row["warnings"]),
        row["seconds"],
    )


def _suffix(opts) -> str:
    """'' for a whole run (or a merge), else which part of the run this is."""
    if opts.merge or not (opts.start or opts.stride or opts.case):
        return ""
    cases = opts.case or ()
    if len(cases) > 4:  # a file name must stay short
        cases = (min(cases), max(cases), f"{len(cases)}cases")
    parts = [opts.start, *(opts.stride or ()), *cases]
    return "_part" + "_".join(str(x) for x in parts)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first case index")
    parser.add_argument("--case", type=int, action="append", help="run only these")
    parser.add_argument(
        "--stride",
        type=int,
        nargs=2,
        metavar=("EVERY", "OFFSET"),
        help="run every EVERY-th case from start + OFFSET (to split a run over "
        "processes: merge their JSON reports with --merge)",
    )
    parser.add_argument("--out", help="folder for fuzz_<seed>.md and .json reports")
    parser.add_argument("--show-failures", action="store_true")
    parser.add_argument(
        "--merge", nargs="+", help="summarise these JSON reports instead of running"
    )
    parser.add_argument("--command", help="the command to state in a merged report")
    opts = parser.parse_args(argv)
    command = opts.command or "python -m benchmarks.fuzz " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if opts.merge:
        results = []
        for path in opts.merge:
            with open(path) as f:
                rows = (
                    [json.loads(line) for line in f if line.strip()]
                    if path.endswith(".jsonl")
                    else json.load(f)
                )
            results += [_from_row(row) for row in rows]
        results.sort(key=lambda r: r.case.index)
    else:
        if argv is None and "XLA_FLAGS" not in os.environ:
            os.environ["XLA_FLAGS"] = FAST_COMPILE_FLAGS
        every, offset = opts.stride or (1, 0)
        first, stop = opts.start + offset, opts.start + opts.n
        indices = opts.case or range(first, stop, every)
        cases = [draw_case(opts.seed, k) for k in indices]
        log = None
        if opts.out:
            os.makedirs(opts.out, exist_ok=True)
            log = os.path.join(opts.out, f"fuzz_{opts.seed}{_suffix(opts)}.jsonl")
        results = run_cases(cases, show_failures=opts.show_failures, log=log)
    report = summarise(results, command)
    print(report)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        stem = os.path.join(opts.out, f"fuzz_{opts.seed}{_suffix(opts)}")
        with open(stem + ".md", "w") as f:
            f.write(f"# Random differential test, seed {opts.seed}\n\n{report}")
        with open(stem + ".json", "w") as f:
            json.dump([_row(r) for r in results], f, indent=1)
    counts = Counter(r.outcome for r in results)
    return {"results": results, "counts": dict(counts), "report": report}


if __name__ == "__main__":
    main()
