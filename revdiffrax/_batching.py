"""How many solves the backward pass pulls back at once under `jax.vmap`.

diffrax's examples solve one sample at a time and `jax.vmap` the solve over the
batch. The backward pass of `ReversibleAdjoint` is then traced with the shapes of
one sample (JAX traces the `custom_vjp`'s backward function, and every loop body in
it, with per-sample shapes, and batches the result), so a decision taken from
shapes (whether to pull back through a Runge-Kutta step one stage at a time, see
`revdiffrax._solver.erk.use_stage_pullback`) would see one sample's residuals
where XLA holds those of the whole batch.

The backward function itself runs inside the `vmap`s that batch it, so on entry
the sizes of the enclosing `vmap` axes can be read from JAX's trace stack
(`enclosing_vmap_size`); `ReversibleAdjoint` records them for the duration of the
backward pass (`vmapped_solves`), and shape-based decisions multiply by
`vmap_size()`.
"""

import contextlib
import contextvars
from collections.abc import Iterator


_VMAP_SIZE: contextvars.ContextVar[int] = contextvars.ContextVar(
    "revdiffrax_vmap_size", default=1
)


def enclosing_vmap_size() -> int:
    """The product of the sizes of the `jax.vmap` axes that enclose the current
    trace (1 outside `vmap`, or where JAX's trace stack cannot be read).

    This reads JAX's internal trace stack; every `vmap` on it counts, which can
    overestimate the batch of a solve whose inputs one of them does not batch (the
    decisions that use it then err towards less memory)."""
    try:
        from jax._src import core  # pyright: ignore[reportMissingImports]
        from jax._src.interpreters import (  # pyright: ignore[reportMissingImports]
            batching,
        )

        trace = core.trace_ctx.trace
    except (ImportError, AttributeError):  # a JAX whose internals moved
        return 1
    size = 1
    seen = 0
    while trace is not None and seen < 1000:
        if isinstance(trace, batching.BatchTrace):
            axis_size = getattr(getattr(trace, "axis_data", None), "size", None)
            if isinstance(axis_size, int) and axis_size > 0:
                size *= axis_size
        trace = getattr(trace, "parent_trace", None)
        seen += 1
    return size


def vmap_size() -> int:
    """The number of solves that the backward pass being traced pulls back at once
    (1 outside `vmapped_solves`)."""
    return _VMAP_SIZE.get()


@contextlib.contextmanager
def vmapped_solves(size: int) -> Iterator[None]:
    """Within this context `vmap_size()` is `size`."""
    token = _VMAP_SIZE.set(size)
    try:
        yield
    finally:
        _VMAP_SIZE.reset(token)
