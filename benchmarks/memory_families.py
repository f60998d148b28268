"""Compiled temp memory of a `ReversibleAdjoint` gradient against
`RecursiveCheckpointAdjoint(checkpoints=2)`, beyond the ODE workloads of
`benchmarks/pareto.py` (issue 12, item 1: "the same for `checkpoint_every`, SDEs,
CDEs and the symmetric family").

Every case differentiates a loss of the final state of a batched neural field
(batch 1024 inside the state, 8-d, MLP width 128 depth 2, tanh, float32, t in
[0, 1], N=100 constant steps) with respect to the MLP's weights, so that one
evaluation's residuals (about 1 MiB) dominate the state (32 KiB), as in the neural
models that motivate the issue. Nothing is run: each gradient is compiled and
`memory_analysis().temp_size_in_bytes` read.

- ODE: `Reversible(base)` for base in Midpoint, Tsit5, Dopri5, with
  `checkpoint_every` None and 10 (10 checkpoints of the state pair); RCA(2)
  through the base solver.
- SDE: drift and diagonal diffusion MLPs, `VirtualBrownianTree`,
  `Reversible(Heun())` against RCA(2) through `Heun()`.
- The time-symmetric family: `ReversibleHeun`, `AsynchronousLeapfrog`,
  `LeapfrogMidpoint`, `SymmetricComposition(AsynchronousLeapfrog())` against RCA(2)
  through the same solver (they have no separate base).

The neural CDE of the published size is a workload of `benchmarks/pareto.py`.

Usage: `python -m benchmarks.memory_families` (prints a markdown table).
"""

import platform

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import revdiffrax


BATCH, DIM, WIDTH, DEPTH, STEPS = 1024, 8, 128, 2, 100


def _mlp(key, final=None):
    kwargs = {} if final is None else dict(final_activation=final)
    return eqx.nn.MLP(
        DIM,
        DIM,
        WIDTH,
        DEPTH,
        activation=jnp.tanh,
        key=key,
        dtype=jnp.float32,
        **kwargs,
    )


def _drift(t, y, model):
    return jax.vmap(model[0])(y)


def _diagonal_diffusion(t, y, model):
    return lx.DiagonalLinearOperator(jax.vmap(model[1])(y))


def _ode_terms():
    return diffrax.ODETerm(_drift)


def _sde_terms():
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(BATCH, DIM), key=jr.PRNGKey(2)
    )
    return diffrax.MultiTerm(
        diffrax.ODETerm(_drift), diffrax.ControlTerm(_diagonal_diffusion, bm)
    )


def gradient_temp_bytes(make_terms, solver, adjoint) -> int:
    """Compiled temp memory of the gradient with respect to both MLPs' weights."""
    model = (_mlp(jr.PRNGKey(0)), _mlp(jr.PRNGKey(1), jnp.tanh))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    y0 = jnp.ones((BATCH, DIM), jnp.float32)

    def loss(p):
        sol = diffrax.diffeqsolve(
            make_terms(),
            solver,
            0.0,
            1.0,
            1.0 / STEPS,
            y0,
            args=eqx.combine(p, static),
            adjoint=adjoint,
            max_steps=STEPS,
        )
        return jnp.sum(sol.ys**2)  # pyright: ignore[reportOptionalOperand]

    # Not `experiments.harness.compile_timed`: importing `experiments` switches on
    # float64, which would double every buffer of these float32 cases.
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes  # pyright: ignore[reportOptionalMemberAccess]


def cases():
    """(label, terms, reversible solver, checkpoint_every, RCA's solver)."""
    for base in (diffrax.Midpoint(), diffrax.Tsit5(), diffrax.Dopri5()):
        name = type(base).__name__
        for k in (None, 10):
            label = f"ODE, Reversible({name})" + ("" if k is None else f", k={k}")
            yield label, _ode_terms, revdiffrax.Reversible(base), k, base
    heun = diffrax.Heun()
    yield "SDE, Reversible(Heun)", _sde_terms, revdiffrax.Reversible(heun), None, heun
    for solver in (
        revdiffrax.ReversibleHeun(),
        revdiffrax.AsynchronousLeapfrog(),
        revdiffrax.LeapfrogMidpoint(),
        revdiffrax.SymmetricComposition(revdiffrax.AsynchronousLeapfrog()),
    ):
        name = type(solver).__name__
        if isinstance(solver, revdiffrax.SymmetricComposition):
            name += "(AsynchronousLeapfrog)"
        yield f"ODE, {name}", _ode_terms, solver, None, solver


def main():
    print(
        f"Machine: {platform.machine()}, jax {jax.__version__}, diffrax "
        f"{diffrax.__version__}, backend {jax.default_backend()}. Batch {BATCH}x{DIM}, "
        f"MLP width {WIDTH} depth {DEPTH}, float32, N={STEPS}.\n"
    )
    print("| case | reversible temp | RCA(2) temp (solver) | ratio |")
    print("|---|---|---|---|")
    for label, terms, solver, k, rca_solver in cases():
        ours = gradient_temp_bytes(
            terms,
            solver,
            revdiffrax.ReversibleAdjoint(checkpoint_every=k, drift_tol=None),
        )
        ref = gradient_temp_bytes(
            terms, rca_solver, diffrax.RecursiveCheckpointAdjoint(checkpoints=2)
        )
        rca_name = type(rca_solver).__name__
        print(
            f"| {label} | {ours / 2**20:.2f} MiB | {ref / 2**20:.2f} MiB ({rca_name}) "
            f"| {ours / ref:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
