"""Closure conversion of vector fields and `SaveAt.fn`.

The backward pass of a `custom_vjp` is traced apart from the forward pass, so it must
not see tracers that a vector field or `SaveAt.fn` closed over (for example diffrax's
own `direction` wrapper of `SaveAt.fn`, or a parameter closed over inside `jax.jit`).
After conversion they are ordinary PyTree leaves and, inside the terms, receive
gradients like any other parameter.
"""

import functools as ft
import types
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax.tree_util as jtu
from diffrax._term import WrapTerm
from jaxtyping import PyTree

from .saveat import is_subsaveat


def _is_plain_function(fn: Callable) -> bool:
    return isinstance(fn, (types.FunctionType, types.MethodType, ft.partial))


def _closure_convert(fn: Callable, t, y, args) -> Callable:
    """Hoist the JAX arrays that `fn(t, y, args)` closes over into a PyTree."""
    if not _is_plain_function(fn):
        return fn
    return eqx.filter_closure_convert(fn, t, y, args)


def _convert_term(term: diffrax.AbstractTerm, t, y, args) -> diffrax.AbstractTerm:
    if isinstance(term, diffrax.MultiTerm):
        return diffrax.MultiTerm(*[_convert_term(x, t, y, args) for x in term.terms])
    if isinstance(term, WrapTerm):
        return eqx.tree_at(lambda w: w.term, term, _convert_term(term.term, t, y, args))
    vf = getattr(term, "vector_field", None)
    if vf is not None and _is_plain_function(vf):
        return eqx.tree_at(
            lambda x: x.vector_field, term, _closure_convert(vf, t, y, args)
        )
    return term


def convert_terms(terms: PyTree[diffrax.AbstractTerm], t, y, args) -> PyTree:
    """Closure-convert the vector field of every term of a single-term solve."""
    if not isinstance(terms, diffrax.AbstractTerm):
        # e.g. `SemiImplicitEuler`'s `(term_1, term_2)`: each vector field sees only
        # part of the state, so (t, y, args) are not example arguments for it.
        return terms
    return _convert_term(terms, t, y, args)


def convert_saveat(saveat: diffrax.SaveAt, t, y, args) -> diffrax.SaveAt:
    """Closure-convert the `fn` of every `SubSaveAt`."""

    def convert(sub):
        return eqx.tree_at(lambda s: s.fn, sub, _closure_convert(sub.fn, t, y, args))

    subs = jtu.tree_map(convert, saveat.subs, is_leaf=is_subsaveat)
    return eqx.tree_at(lambda s: s.subs, saveat, subs)
