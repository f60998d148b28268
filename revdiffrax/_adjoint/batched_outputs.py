"""Outputs batched like the inputs, so that `jax.vmap` cannot double-count a
cotangent.

Under `jax.vmap`, JAX runs a `custom_vjp`'s backward function batched. An output
that does not depend on any batched input (e.g. the saved times `sol.ts` of
`SaveAt(ts=...)` with constant steps, when only `y0` is batched) stays unbatched,
so its cotangent arrives unbatched: the *sum* over the batch of the samples'
cotangents. The backward pass adds it to per-sample cotangents (e.g. the cotangent
of `SaveAt.ts`, which the interpolated outputs also feed), so each sample's
backward pass carries the whole sum, and JAX then sums the samples' results over
the batch for an unbatched input: the saved times' contribution is counted once
per sample instead of once. (diffrax 0.7.2's `RecursiveCheckpointAdjoint` has the
same defect: its `custom_vjp` is in `equinox.internal`'s checkpointed loop.)

`batch_like_inputs` adds a zero that depends on every differentiable input to one
element of each floating-point output: the outputs are then batched whenever an
input is, and each sample's backward pass receives its own cotangent. The zero is
`where(x == x, 0, 0)` (also 0 for a NaN or infinite `x`). XLA folds it away:
without `vmap` the compiled flops and temp memory of a `Tsit5` solve and of its
gradient are unchanged (the forward reads 16 bytes more). Under `vmap` only an
output that would have been unbatched is copied per sample.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def _zero_depending_on(tree: PyTree) -> Array | None:
    """A scalar zero that depends on the first element of every floating-point
    array of `tree` (None if it has none)."""
    zeros = [
        jnp.where(x.ravel()[0] == x.ravel()[0], 0, 0).astype(x.dtype)
        for x in jtu.tree_leaves(tree)
        if eqx.is_inexact_array(x) and x.size > 0
    ]
    if not zeros:
        return None
    return sum(zeros[1:], zeros[0])


def batch_like_inputs(outputs: Any, inputs: PyTree) -> Any:
    """`outputs`, each floating-point array made to depend on every floating-point
    array of `inputs` (through a zero added to its first element, in place)."""
    zero = _zero_depending_on(inputs)
    if zero is None:
        return outputs

    def add(x):
        if eqx.is_inexact_array(x) and x.size > 0:
            return x.at[(0,) * x.ndim].add(zero.astype(x.dtype))
        return x

    return jtu.tree_map(add, outputs)
