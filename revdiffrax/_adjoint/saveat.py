"""`SaveAt` bookkeeping: its `SubSaveAt`s, their differentiable `ts`, and where each
output lands in a sub's output buffer."""

from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int


def is_subsaveat(x: Any) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def subsaveats(saveat: diffrax.SaveAt) -> list[diffrax.SubSaveAt]:
    """The `SubSaveAt`s of `saveat`, in the order of diffrax's outputs."""
    return jtu.tree_leaves(saveat.subs, is_leaf=is_subsaveat)


def saveat_ts(saveat: diffrax.SaveAt) -> list[Array]:
    """The `ts` of every `SubSaveAt` that has them."""
    return [sub.ts for sub in subsaveats(saveat) if sub.ts is not None]


def replace_ts(saveat: diffrax.SaveAt, ts_list: list[Array]) -> diffrax.SaveAt:
    """`saveat` with the `ts` of its `SubSaveAt`s replaced by `ts_list` (as returned
    by `saveat_ts`)."""
    if len(ts_list) == 0:
        return saveat
    return eqx.tree_at(lambda s: saveat_ts(s), saveat, ts_list)


def saveat_fns(saveat: diffrax.SaveAt) -> list:
    """The `fn` of every `SubSaveAt`, in the order of `subsaveats`."""
    return [sub.fn for sub in subsaveats(saveat)]


def replace_fns(saveat: diffrax.SaveAt, fns: list) -> diffrax.SaveAt:
    """`saveat` with the `fn` of its `SubSaveAt`s replaced by `fns` (as returned by
    `saveat_fns`)."""
    it = iter(fns)

    def replace(sub):
        return eqx.tree_at(lambda s: s.fn, sub, next(it))

    subs = jtu.tree_map(replace, saveat.subs, is_leaf=is_subsaveat)
    return eqx.tree_at(lambda s: s.subs, saveat, subs)


def t1_output(
    sub: diffrax.SubSaveAt, num_steps: Int[Array, ""], ts_saved: Any = None
) -> tuple[Int[Array, ""], Bool[Array, ""]]:
    """Where `sub` stored its output at `t1`, and whether it did.

    A sub's outputs are laid out as `[t0] [ts...] [steps...] [t1]`; with
    `steps=k` the output at `t1` is only stored when it is not a step output already.
    After an event, only the first `ts_saved` of the `ts` were saved.
    """
    num_ts = 0 if sub.ts is None else len(sub.ts)
    if ts_saved is not None:
        num_ts = ts_saved
    base = (1 if sub.t0 else 0) + num_ts
    if sub.steps == 0:
        return jnp.asarray(base), jnp.asarray(sub.t1)
    saved = num_steps // sub.steps
    if sub.steps == 1:
        pred = jnp.asarray(False)
    else:
        pred = jnp.asarray(sub.t1) & (num_steps % sub.steps != 0)
    return base + saved, pred


def steps_output(
    sub: diffrax.SubSaveAt, n: Int[Array, ""]
) -> tuple[Int[Array, ""], Bool[Array, ""]]:
    """Where `sub` (with `steps=k`) stored its output after accepted step n, and
    whether it did (every k-th step)."""
    first = 1 if sub.t0 else 0
    pred = (n >= 1) & (n % sub.steps == 0)
    return first + jnp.maximum(n // sub.steps - 1, 0), pred
