"""Integrated components of the state: leaves whose derivative does not depend on
them (nor on any other integrated leaf), like the log-density of a continuous
normalising flow or a running cost.

`Reversible(..., integrated=...)` advances them by the increment of the forward base
step alone, $q_{n+1} = q_n + \\Psi^q_h(t_n, z_n)$, and undoes them by subtraction. They
need no coupling and no second state, and the backward base step
$\\Psi_{-h}(t_{n+1}, y_{n+1})$ is made without them, on the *dynamic* leaves only
(`_DynamicTerm`), so their vector field (e.g. a CNF's trace) is evaluated once per
base step pair instead of twice.
"""

from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._term import WrapTerm
from jax.extend.core import ClosedJaxpr, Literal
from jaxtyping import PyTree


class StateSplit(eqx.Module):
    """The split of a state PyTree into dynamic and integrated leaves.

    `dynamic(y)` replaces the integrated leaves by `None`; `full(x)` puts zeros back
    in their place. Without integrated leaves both are the identity.
    """

    treedef: Any = eqx.field(static=True)
    mask: tuple[bool, ...] = eqx.field(static=True)  # per leaf: integrated?
    shapes: tuple[Any, ...] = eqx.field(static=True)  # ShapeDtypeStructs of leaves

    @property
    def any(self) -> bool:
        return any(self.mask)

    def dynamic(self, tree: PyTree) -> PyTree:
        if not self.any:
            return tree
        leaves = self.treedef.flatten_up_to(tree)
        kept = [None if m else x for m, x in zip(self.mask, leaves)]
        return jtu.tree_unflatten(self.treedef, kept)

    def full(self, tree: PyTree) -> PyTree:
        if not self.any:
            return tree
        leaves = self.treedef.flatten_up_to(tree)
        out = [
            jnp.zeros(s.shape, s.dtype) if m else x
            for m, x, s in zip(self.mask, leaves, self.shapes)
        ]
        return jtu.tree_unflatten(self.treedef, out)

    def merge(self, dynamic: PyTree, tree: PyTree) -> PyTree:
        """`tree` with its dynamic leaves replaced by those of `dynamic`."""
        if not self.any:
            return dynamic
        new = self.treedef.flatten_up_to(dynamic)
        old = self.treedef.flatten_up_to(tree)
        out = [o if m else n for m, n, o in zip(self.mask, new, old)]
        return jtu.tree_unflatten(self.treedef, out)

    def coupling(self, coupling: float) -> PyTree:
        """The coupling per leaf: 1 for integrated leaves (no coupling)."""
        values = [1.0 if m else coupling for m in self.mask]
        return jtu.tree_unflatten(self.treedef, values)

    def wrap(self, terms: PyTree) -> PyTree:
        """The terms of the dynamic leaves only, for the backward base step."""
        return _DynamicTerm(terms, self) if self.any else terms


def split_state(integrated: PyTree[bool] | None, y: PyTree) -> StateSplit:
    """The `StateSplit` of `y` declared by `integrated`, a PyTree of bools with the
    structure of `y` or a prefix of it (e.g. `(False, True)` for `y = (x, logp)`)."""
    leaves, treedef = jtu.tree_flatten(y)
    shapes = tuple(
        jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves
    )
    if integrated is None:
        return StateSplit(treedef, (False,) * len(leaves), shapes)
    try:
        full = jtu.tree_map(
            lambda m, sub: jtu.tree_map(lambda _: m, sub), integrated, y
        )
    except ValueError as e:
        raise ValueError(
            "`Reversible(integrated=...)` must be a PyTree of bools with the "
            "structure of the state, or a prefix of it, e.g. `integrated=(False, "
            f"True)` for a state `(x, logp)`. Got {integrated!r} for a state with "
            f"structure {treedef}."
        ) from e
    mask = tuple(treedef.flatten_up_to(full))
    if not all(isinstance(m, bool) for m in mask):
        raise ValueError(f"`integrated` must hold Python bools, got {integrated!r}.")
    if all(mask):
        raise ValueError(
            "`Reversible(integrated=...)` marks every leaf of the state as integrated, "
            "but some must be dynamic: integrated leaves are those whose derivative "
            "depends on the other leaves only."
        )
    return StateSplit(treedef, mask, shapes)


class _DynamicTerm(diffrax.AbstractTerm):
    """An `ODETerm` restricted to the dynamic leaves: the vector field evaluated with
    zeros in place of the integrated leaves (which it does not read), its integrated
    outputs dropped. XLA removes their computation."""

    term: diffrax.AbstractTerm
    split: StateSplit

    def vf(self, t, y, args):
        return self.split.dynamic(self.term.vf(t, self.split.full(y), args))

    def contr(self, t0, t1, **kwargs):
        return self.term.contr(t0, t1, **kwargs)

    def prod(self, vf, control):
        # `ODETerm.prod` maps over `vf` alone, so it takes the dynamic leaves as well.
        return self.term.prod(vf, control)


def _is_var(v) -> bool:
    return not isinstance(v, Literal)


def _depends(jaxpr: ClosedJaxpr, inputs: list[bool]) -> list[bool]:
    """Which outputs of `jaxpr` may depend on the inputs flagged in `inputs`: a
    conservative forward pass (an equation's outputs depend on all of its inputs)."""
    deps = {v for v, flag in zip(jaxpr.jaxpr.invars, inputs) if flag}
    for eqn in jaxpr.jaxpr.eqns:
        if any(not isinstance(v, Literal) and v in deps for v in eqn.invars):
            deps.update(eqn.outvars)
    return [_is_var(v) and v in deps for v in jaxpr.jaxpr.outvars]


def _unwrap(terms: PyTree) -> PyTree:
    """The user's term inside diffrax's `WrapTerm` (which `diffeqsolve` adds)."""
    while isinstance(terms, WrapTerm):
        terms = terms.term
    return terms


def check_integrated(split: StateSplit, terms: PyTree, t0, y0: PyTree, args) -> None:
    """Refuse an `integrated` declaration that the vector field contradicts: the
    dynamic outputs, or any output, must not read the integrated leaves. Traced only
    (nothing is evaluated)."""
    if not split.any:
        return
    if not isinstance(_unwrap(terms), diffrax.ODETerm):
        raise ValueError(
            "`Reversible(integrated=...)` is supported for ODEs, whose terms are one "
            f"`diffrax.ODETerm`; got {type(_unwrap(terms)).__name__}. Drop "
            "`integrated` (the components are then coupled like the others)."
        )
    leaves = split.treedef.flatten_up_to(y0)

    def field(*flat):
        return jtu.tree_leaves(
            terms.vf(t0, jtu.tree_unflatten(split.treedef, flat), args)
        )

    jaxpr = jax.make_jaxpr(field)(*leaves)
    if any(_depends(jaxpr, list(split.mask))):
        raise ValueError(
            "`Reversible(integrated=...)` declares state components as integrated, "
            "but the vector field reads them: an integrated component's derivative may "
            "depend on the other components only (and nothing may depend on it), "
            "otherwise undoing it by subtraction would be wrong. Remove those "
            "components from `integrated`."
        )
