"""Closure conversion of vector fields and `SaveAt.fn`.

The backward pass of a `custom_vjp` is traced apart from the forward pass, so it must
not see tracers that a vector field or `SaveAt.fn` closed over (for example diffrax's
own `direction` wrapper of `SaveAt.fn`, or a parameter closed over inside `jax.jit`).
After conversion they are ordinary PyTree leaves and receive gradients like any
other parameter: inside the terms (also a tuple of terms, whose vector fields see only
part of the state), and inside `SaveAt.fn` (which the adjoint differentiates as an
input, `DiffInputs.fns`).
"""

import functools as ft
import itertools
import types
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._term import (  # pyright: ignore[reportPrivateUsage]
    _CallableToPath,
    _ControlToODE,
    WrapTerm,
)
from jaxtyping import PyTree

from .saveat import is_subsaveat


def _is_plain_function(fn: Callable) -> bool:
    return isinstance(fn, (types.FunctionType, types.MethodType, ft.partial))


def _closure_convert(fn: Callable, t, y, args) -> Callable:
    """Hoist the JAX arrays that `fn(t, y, args)` closes over into a PyTree."""
    if not _is_plain_function(fn):
        return fn
    return eqx.filter_closure_convert(fn, t, y, args)


def _is_term(x: Any) -> bool:
    return isinstance(x, diffrax.AbstractTerm)


def _map_vector_fields(
    terms: PyTree[diffrax.AbstractTerm],
    convert: Callable[[int, Callable], Callable],
    convert_path: Callable[[Callable], Callable] = lambda fn: fn,
    convert_grad_f: Callable[[Callable], Callable] = lambda fn: fn,
) -> PyTree[diffrax.AbstractTerm]:
    """Replace the i-th plain-function vector field `vf` of `terms` (in a fixed
    order, through `MultiTerm`, `WrapTerm` and `ControlTerm(...).to_ode()`) by
    `convert(i, vf)`; a plain-function control `(t0, t1) -> increment` of a
    `ControlTerm` by `convert_path(fn)`; and the `grad_f(x, args)` of an
    `UnderdampedLangevinDriftTerm` by `convert_grad_f(grad_f)`."""
    counter = itertools.count()

    def term_fn(term):
        if isinstance(term, diffrax.MultiTerm):
            return diffrax.MultiTerm(*[term_fn(x) for x in term.terms])
        if isinstance(term, WrapTerm):
            return eqx.tree_at(lambda w: w.term, term, term_fn(term.term))
        if isinstance(term, diffrax.UnderdampedLangevinDriftTerm) and (
            _is_plain_function(term.grad_f)
        ):
            return eqx.tree_at(lambda x: x.grad_f, term, convert_grad_f(term.grad_f))
        control = getattr(term, "control", None)
        if isinstance(control, _CallableToPath) and _is_plain_function(control.fn):
            term = eqx.tree_at(lambda x: x.control.fn, term, convert_path(control.fn))
        vf = getattr(term, "vector_field", None)
        if isinstance(vf, _ControlToODE):
            # `ControlTerm(vf, path).to_ode()`: an `ODETerm` whose vector field is a
            # Module holding the control term, whose own vector field may close over
            # (traced) arrays.
            new_vf = _ControlToODE(term_fn(vf.control_term))
            return eqx.tree_at(lambda x: x.vector_field, term, new_vf)
        if vf is not None and _is_plain_function(vf):
            new_vf = convert(next(counter), vf)
            return eqx.tree_at(lambda x: x.vector_field, term, new_vf)
        return term

    return jtu.tree_map(term_fn, terms, is_leaf=_is_term)


def _abstract(tree: PyTree, is_dynamic: Callable[[Any], bool]) -> PyTree:
    def leaf(x):
        if is_dynamic(x):
            return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        return x

    return jtu.tree_map(leaf, tree)


def _example_arguments(terms, solver, t0, t1, y0, args) -> dict[int, tuple]:
    """The abstract `(t, y, args)` each vector field of `terms` is called with by
    `solver.step` (e.g. only part of the state, for a tuple of terms)."""
    examples = {}

    def record(i, vf):
        def recording_vf(t, y, args_):
            # In the loop, times and states are arrays; `args` are as passed.
            t_, y_ = _abstract((t, y), eqx.is_array_like)
            examples.setdefault(i, (t_, y_, _abstract(args_, eqx.is_array)))
            return vf(t, y, args_)

        return recording_vf

    recording = _map_vector_fields(terms, record)

    def step():
        state = solver.init(recording, t0, t1, y0, args)
        return solver.step(recording, t0, t1, y0, args, state, False)

    eqx.filter_eval_shape(step)
    return examples


def convert_terms(
    terms: PyTree[diffrax.AbstractTerm], solver, t0, t1, y0, args
) -> PyTree[diffrax.AbstractTerm]:
    """Closure-convert every vector field of `terms`, so that what they close over
    becomes a leaf of `terms` (and gets its cotangent)."""

    def convert_path(fn):
        # A control given as a function `(t0, t1) -> increment`.
        return eqx.filter_closure_convert(fn, t0, t0)

    def convert_grad_f(fn):
        # `UnderdampedLangevinDriftTerm`'s `grad_f(x, args)`, of the position x.
        x0 = y0[0] if isinstance(y0, tuple) and len(y0) == 2 else y0
        return eqx.filter_closure_convert(fn, x0, args)

    if isinstance(terms, diffrax.AbstractTerm):
        return _map_vector_fields(
            terms,
            lambda i, vf: _closure_convert(vf, t0, y0, args),
            convert_path,
            convert_grad_f,
        )
    # e.g. `SemiImplicitEuler`'s `(term_1, term_2)`: each vector field sees only part
    # of the state, so trace one step to find what each is called with.
    examples = _example_arguments(terms, solver, t0, t1, y0, args)

    def convert(i, vf):
        return _closure_convert(vf, *examples[i]) if i in examples else vf

    return _map_vector_fields(terms, convert, convert_path, convert_grad_f)


def convert_saveat(saveat: diffrax.SaveAt, t, y, args) -> diffrax.SaveAt:
    """Closure-convert the `fn` of every `SubSaveAt`."""

    def convert(sub):
        return eqx.tree_at(lambda s: s.fn, sub, _closure_convert(sub.fn, t, y, args))

    subs = jtu.tree_map(convert, saveat.subs, is_leaf=is_subsaveat)
    return eqx.tree_at(lambda s: s.subs, saveat, subs)


def _holds_array(tree: Any, depth: int = 0) -> bool:
    """Whether `tree` holds a JAX array, also inside the closures of functions."""
    if depth > 8:
        return False
    for leaf in jtu.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            return True
        if isinstance(leaf, types.FunctionType):
            cells = _cell_values(leaf)
            if cells is not None and _holds_array(
                (cells, leaf.__defaults__, leaf.__kwdefaults__), depth + 1
            ):
                return True
        if isinstance(leaf, ft.partial) and _holds_array(
            (leaf.func, leaf.args, leaf.keywords), depth + 1
        ):
            return True
    return False


def _cell_values(fn: types.FunctionType) -> tuple | None:
    """The values `fn` closes over, or None if a cell is still empty."""
    try:
        return tuple(cell.cell_contents for cell in fn.__closure__ or ())
    except ValueError:
        return None


class _HoistedFunction(eqx.Module):
    """A plain function whose closed-over values and default arguments are PyTree
    fields, so that the arrays among them are leaves of `args`."""

    fn: Callable = eqx.field(static=True)  # for its code and globals only
    cells: tuple
    defaults: tuple | None
    kwdefaults: dict | None

    def __call__(self, *args, **kwargs):
        fn = self.fn
        assert isinstance(fn, types.FunctionType)
        closure = tuple(types.CellType(value) for value in self.cells)
        new = types.FunctionType(
            fn.__code__, fn.__globals__, fn.__name__, self.defaults, closure or None
        )
        new.__kwdefaults__ = self.kwdefaults
        return new(*args, **kwargs)


class _HoistedPartial(eqx.Module):
    """A `functools.partial` whose function and bound arguments are PyTree fields."""

    func: Callable
    args: tuple
    keywords: dict

    def __call__(self, *args, **kwargs):
        return self.func(*self.args, *args, **{**self.keywords, **kwargs})


def _hoist(x: Any, depth: int = 0) -> Any:
    if depth > 8 or not _holds_array(x):
        return x
    if isinstance(x, types.FunctionType):
        cells = _cell_values(x)
        if cells is None:
            return x
        hoisted = jtu.tree_map(lambda c: _hoist(c, depth + 1), cells)
        defaults = jtu.tree_map(lambda c: _hoist(c, depth + 1), x.__defaults__)
        kwdefaults = jtu.tree_map(lambda c: _hoist(c, depth + 1), x.__kwdefaults__)
        return _HoistedFunction(x, hoisted, defaults, kwdefaults)
    if isinstance(x, ft.partial):
        parts = jtu.tree_map(
            lambda c: _hoist(c, depth + 1), (x.func, x.args, x.keywords)
        )
        return _HoistedPartial(*parts)
    return x


def convert_args(args: PyTree) -> PyTree:
    """Hoist the arrays that a function in `args` closes over (e.g.
    `args=lambda y: model(y)`, or a `functools.partial`) into PyTree leaves, so
    that they receive cotangents. Functions that close over no array are kept."""
    return jtu.tree_map(_hoist, args)
