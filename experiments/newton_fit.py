"""Fit the four rates of a Lotka-Volterra model by Newton-CG on Hessian-vector
products through `ReversibleAdjoint`, against Adam and BFGS; then a Laplace
approximation of the posterior (issue 23, item 3).

Data: built in. The model is simulated at the rates (a, b, c, d) = (1.5, 1.0, 3.0,
1.0) from (x, y) = (1, 1), observed at `NUM_OBS` times in [0, 10] with Gaussian
noise of standard deviation `SIGMA` (fixed key). The loss is the negative
log-likelihood `sum((model - data)^2) / (2 sigma^2)` as a function of the
log-rates theta, the model solved by `Reversible(Tsit5())` with constant steps.

- **Newton-CG** (Levenberg-Marquardt damped): each iteration solves
  `(H + mu I) p = -g` by conjugate gradients (`jax.scipy.sparse.linalg.cg`'s
  loop, from Python around one compiled product), each
  product `H v` being `jax.jvp(jax.grad(loss), (theta,), (v,))` through
  `ReversibleAdjoint`: forward-over-reverse, in memory independent of the number
  of steps. The step is accepted when the loss decreases; `mu` follows the ratio of
  actual to predicted decrease (the usual trust-region rule).
- **BFGS** (`jax.scipy.optimize.minimize`) and **Adam** (`optax.adam`) on the same
  gradients.
- **Laplace**: the Hessian at the Newton optimum (column by column: forward-over-
  reverse through `ReversibleAdjoint`, checked against `diffrax.DirectAdjoint()`);
  its inverse is the posterior covariance of the log-rates under a flat prior.

Newton's method is local: from a start with every log-rate off by 0.2-0.3, Newton-CG
(30 iterations) and BFGS stalled near a loss of 4,000 while Adam (100 steps) reached
55 (quick mode, measured 2026-12-05); the loss of an oscillator's rates has other
basins. The start here is off by 0.07-0.1.

Usage: `python -m experiments.newton_fit [--quick]` (prints markdown tables; the
full run writes `results/newton_fit.md`).
"""

import argparse
import os
import platform
import sys
import time

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.scipy.optimize as jso
import numpy as np
import optax
import revdiffrax


jax.config.update("jax_enable_x64", True)

TRUE_RATES = jnp.array([1.5, 1.0, 3.0, 1.0])
SIGMA = 0.1
NUM_OBS = 40
T1 = 10.0
# The starting point: every log-rate off by 0.07-0.1 (rates off by 7-11%).
OFFSET = jnp.array([0.1, -0.07, -0.1, 0.08])


def lotka_volterra(t, u, log_rates):
    a, b, c, d = jnp.exp(log_rates)
    x, y = u
    return jnp.stack([a * x - b * x * y, c * x * y - d * y])


def simulate(log_rates, adjoint, steps: int):
    """The populations at the `NUM_OBS` observation times."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lotka_volterra),
        revdiffrax.Reversible(diffrax.Tsit5()),
        0.0,
        T1,
        T1 / steps,
        jnp.array([1.0, 1.0]),
        args=log_rates,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, T1, NUM_OBS)),
        adjoint=adjoint,
        max_steps=steps,
    )
    assert sol.ys is not None
    return sol.ys


def make_loss(steps: int, adjoint):
    """The negative log-likelihood of the log-rates, on the built-in data."""
    clean = simulate(jnp.log(TRUE_RATES), diffrax.DirectAdjoint(), steps)
    data = clean + SIGMA * jr.normal(jr.PRNGKey(0), clean.shape)

    def loss(theta):
        residual = simulate(theta, adjoint, steps) - data
        return 0.5 * jnp.sum(residual**2) / SIGMA**2

    return loss


def hessian_vector_product(loss):
    """`(theta, v) -> H(theta) v`: forward-over-reverse, `jax.jvp` of `jax.grad`."""
    grad = jax.grad(loss)

    def hvp(theta, v):
        return jax.jvp(grad, (theta,), (v,))[1]

    return hvp


def hessian(hvp, theta):
    """The Hessian at `theta`, column by column from `hvp` (one compiled product
    called once per basis vector: what `jax.hessian` computes, forward-over-reverse,
    without compiling another program)."""
    basis = jnp.eye(theta.size, dtype=theta.dtype)
    return jnp.stack([hvp(theta, e) for e in basis], axis=1)


def newton_cg(
    loss,
    theta,
    max_iters: int,
    gtol: float,
    radius: float = 0.25,
    hvp=None,
    value_and_grad=None,
):
    """Levenberg-Marquardt damped Newton-CG on Hessian-vector products, its steps
    capped at `radius` in the log-rates (the loss of an oscillator's parameters has
    other minima: a long step may land in another period's basin). The damping
    starts at the mean Hessian diagonal (so the first step is close to a scaled
    gradient step), computed by `hvp(theta, v)` (default: a jitted
    `hessian_vector_product(loss)`; pass an already compiled one to reuse it; the
    same for `value_and_grad`, default `jax.jit(jax.value_and_grad(loss))`).
    Returns the final point, the number of iterations, of Hessian-vector products,
    and the loss after each iteration."""
    if value_and_grad is None:
        value_and_grad = jax.jit(jax.value_and_grad(loss))
    dim = theta.size
    if hvp is None:
        hvp = jax.jit(hessian_vector_product(loss))

    def newton_step(theta, g, mu):
        p = conjugate_gradients(lambda v: hvp(theta, v) + mu * v, -g, 2 * dim)
        p = p * jnp.minimum(1.0, radius / jnp.linalg.norm(p))
        predicted = -(g @ p + 0.5 * p @ hvp(theta, p))  # the quadratic model's decrease
        return p, predicted

    value, g = value_and_grad(theta)
    mean_diagonal = jnp.abs(jnp.trace(hessian(hvp, theta))) / dim
    mu, history, products = float(mean_diagonal), [float(value)], dim
    iteration = 0
    for iteration in range(1, max_iters + 1):
        if float(jnp.linalg.norm(g)) < gtol:
            iteration -= 1
            break
        p, predicted = newton_step(theta, g, mu)
        products += 2 * dim + 1  # at most, per CG solve and model decrease
        new_value, new_g = value_and_grad(theta + p)
        ratio = float((value - new_value) / predicted)
        if np.isfinite(ratio) and ratio > 0:
            theta, value, g = theta + p, new_value, new_g
        if not np.isfinite(ratio) or ratio < 0.25:
            mu *= 4.0
        elif ratio > 0.75:
            mu = max(mu / 4.0, 1e-9)
        history.append(float(value))
    return theta, iteration, products, history


def conjugate_gradients(matvec, b, maxiter: int, tol: float = 1e-5):
    """`x` with `matvec(x) = b`, `matvec` symmetric positive definite: the loop of
    `jax.scipy.sparse.linalg.cg` (start at zero, stop at `|r| <= tol |b|` or after
    `maxiter` products), run from Python so that `matvec` may call an already
    compiled Hessian-vector product (a jitted loop compiles another copy of it:
    most of `--quick`'s time)."""
    x, r = jnp.zeros_like(b), b
    p, gamma, atol2 = r, r @ r, tol**2 * (b @ b)
    for _ in range(maxiter):
        if not float(gamma) > float(atol2):
            break
        ap = matvec(p)
        alpha = gamma / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        gamma, gamma_old = r @ r, gamma
        p = r + (gamma / gamma_old) * p
    return x


def bfgs(loss, theta, max_iters: int):
    result = jso.minimize(loss, theta, method="BFGS", options=dict(maxiter=max_iters))
    return result.x, int(result.nit), float(result.fun)


def adam(loss, theta, iters: int, lr: float, value_and_grad=None):
    """`iters` Adam steps, each one jitted program; or, given an already compiled
    `value_and_grad`, that program then a jitted update (no second compilation of
    the gradient)."""
    optimiser = optax.adam(lr)

    @jax.jit
    def update(theta, state, g):
        updates, state = optimiser.update(g, state)
        return optax.apply_updates(theta, updates), state

    if value_and_grad is None:
        grad = jax.value_and_grad(loss)

        @jax.jit
        def step(theta, state):
            return update(theta, state, grad(theta)[1])

    else:

        def step(theta, state):
            return update(theta, state, value_and_grad(theta)[1])

    state = optimiser.init(theta)
    for _ in range(iters):
        theta, state = step(theta, state)
    return theta


def compiled(fn, *args):
    """`jax.jit(fn)` compiled for `args`, and its compiled temp memory in MiB."""
    executable = jax.jit(fn).lower(*args).compile()
    analysis = executable.memory_analysis()
    assert analysis is not None
    return executable, analysis.temp_size_in_bytes / 2**20


def temp_mib(fn, *args) -> float:
    return compiled(fn, *args)[1]


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--out", default=None, help="write the report here")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else 1000
    adam_iters = 50 if args.quick else 1000
    max_iters = 15 if args.quick else 50
    bfgs_iters = 0 if args.quick else 200
    loss = make_loss(steps, revdiffrax.ReversibleAdjoint())
    theta0 = jnp.log(TRUE_RATES) + OFFSET
    grad = jax.grad(loss)

    rows = {}

    # One compiled Hessian-vector product: its memory, Newton's damping, its
    # conjugate gradients and the Laplace Hessian (compiling each separately made
    # most of the quick mode's time).
    # Its compilation counts in Newton's wall time, as does that of the compiled
    # value and gradient (`--quick` reuses the latter for Adam).
    def fit():
        hvp, hvp_mib = compiled(hessian_vector_product(loss), theta0, theta0)
        value_and_grad = compiled(jax.value_and_grad(loss), theta0)
        out = newton_cg(
            loss, theta0, max_iters, 1e-6, hvp=hvp, value_and_grad=value_and_grad[0]
        )
        return out, hvp, hvp_mib, value_and_grad

    ((theta_n, it_n, hvps, _), hvp, hvp_mib, value_and_grad), seconds = _timed(fit)
    rows["Newton-CG (HVPs through ReversibleAdjoint)"] = (
        f"{it_n} ({hvps} HVPs at most)",
        seconds,
        float(loss(theta_n)),
        hvp_mib,
    )
    # BFGS and Adam use the same gradient. `--quick` reads the memory of the value
    # and gradient compiled above rather than compiling the gradient alone again.
    grad_mib = value_and_grad[1] if args.quick else temp_mib(grad, theta0)
    # Not in `--quick`: compiling BFGS's loop took a third of the quick mode's time
    # (`bfgs` is tested on its own).
    if bfgs_iters:
        (theta_b, it_b, value_b), seconds = _timed(bfgs, loss, theta0, bfgs_iters)
        rows["BFGS (gradients through ReversibleAdjoint)"] = (
            str(it_b),
            seconds,
            value_b,
            grad_mib,
        )
    shared = value_and_grad[0] if args.quick else None  # full runs time its compile
    theta_a, seconds = _timed(adam, loss, theta0, adam_iters, 1e-2, shared)
    rows["Adam, lr 1e-2 (gradients through ReversibleAdjoint)"] = (
        str(adam_iters),
        seconds,
        float(loss(theta_a)),
        grad_mib,
    )
    direct_loss = make_loss(steps, diffrax.DirectAdjoint())
    direct_hvp, direct_hvp_mib = compiled(
        hessian_vector_product(direct_loss), theta0, theta0
    )

    ours = hessian(hvp, theta_n)
    direct = hessian(direct_hvp, theta_n)
    hessian_error = float(jnp.max(jnp.abs(ours - direct)) / jnp.max(jnp.abs(direct)))
    covariance = jnp.linalg.inv(ours)
    std = jnp.sqrt(jnp.diag(covariance))

    flag = " --quick" if args.quick else ""
    lines = [
        f"Command: `python -m experiments.newton_fit{flag}`."
        f" Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.python_version()}, jax {jax.__version__}, float64.",
        "",
        f"Lotka-Volterra, 4 log-rates, {NUM_OBS} noisy observations (sigma "
        f"{SIGMA}) of both populations on [0, {T1:g}], `Reversible(Tsit5())` with "
        f"{steps} constant steps. Start: log-rates off by {OFFSET.tolist()}. Wall "
        "times include compilation.",
        "",
        "| method | iterations | wall time (s) | final loss | compiled temp memory "
        "of its derivative (MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, (iters, seconds, value, mib) in rows.items():
        lines.append(f"| {name} | {iters} | {seconds:.2f} | {value:.6f} | {mib:.3f} |")
    lines += [
        "",
        f"The same Hessian-vector product through `DirectAdjoint` compiles to "
        f"{direct_hvp_mib:.3f} MiB.",
        "",
        "Laplace approximation at the Newton optimum (flat prior on the log-rates; "
        "standard deviations from the inverse Hessian, forward-over-reverse "
        "through `ReversibleAdjoint` (one Hessian-vector product per column), "
        f"max relative difference from `DirectAdjoint`'s "
        f"{hessian_error:.1e}):",
        "",
        "| rate | true | fitted | posterior std of the log-rate | fitted error in "
        "stds |",
        "|---|---|---|---|---|",
    ]
    for i, name in enumerate("abcd"):
        fitted = float(jnp.exp(theta_n[i]))
        z = float((theta_n[i] - jnp.log(TRUE_RATES[i])) / std[i])
        lines.append(
            f"| {name} | {float(TRUE_RATES[i]):.3f} | {fitted:.4f} | "
            f"{float(std[i]):.4f} | {z:+.2f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# Newton-CG on Hessian-vector products: Lotka-Volterra fit\n\n")
            f.write(report)
    return dict(
        rows=rows,
        hessian_error=hessian_error,
        std=np.asarray(std),
        theta=np.asarray(theta_n),
        direct_hvp_mib=direct_hvp_mib,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
