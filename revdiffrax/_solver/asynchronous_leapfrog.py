from collections.abc import Callable
from typing import ClassVar, TypeAlias

import diffrax
import equinox as eqx
import jax.lax as lax
import jax.tree_util as jtu
from diffrax._custom_types import Args, BoolScalarLike, DenseInfo, RealScalarLike, VF, Y
from diffrax._heuristics import is_sde
from diffrax._local_interpolation import ThirdOrderHermitePolynomialInterpolation
from jaxtyping import PyTree

from .base import AbstractReversibleSolver


# v: the auxiliary variable, an approximation of the vector field f(t, y).
_SolverState: TypeAlias = PyTree


def _check_damping(damping) -> float:
    try:
        value = float(damping)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`damping` must be a real number in (0, 1] (a Python or concrete NumPy "
            f"number: it is a static hyperparameter), got {damping!r}."
        ) from e
    if not (0 < value <= 1):
        raise ValueError(
            f"`damping` must lie in (0, 1], got {value}. `damping=1` (the default) "
            "is the undamped, time-symmetric, second-order method."
        )
    if value == 0.5:
        raise ValueError(
            "`damping=0.5` is not invertible: the update v1 = v0 + 2 * damping * "
            "(u - v0) then forgets v0, so the step cannot be undone. Use any other "
            "value in (0, 1], e.g. the default `damping=1`."
        )
    return value


def _current_v(terms, t0, y0, args, v0, made_jump):
    """The v that a step from (t0, y0) uses: v0, or f(t0, y0) after a jump."""
    if made_jump is False:
        return v0
    return lax.cond(made_jump, lambda: terms.vf(t0, y0, args), lambda: v0)


class AsynchronousLeapfrog(
    AbstractReversibleSolver[_SolverState], diffrax.AbstractAdaptiveSolver
):
    r"""Asynchronous leapfrog (ALF) method of MALI, with its exact backward step.

    Carries, next to $y$, an approximation $v$ of the vector field, initialised as
    $v_0 = f(t_0, y_0)$. With $h = t_1 - t_0$, $t_{1/2} = t_0 + h/2$ and the damping
    $\eta \in (0, 1]$, $\eta \ne \tfrac12$, one step is

    $$y_{1/2} = y_0 + \tfrac h2 v_0,\qquad u = f(t_{1/2}, y_{1/2}),\qquad
      v_1 = v_0 + 2\eta\,(u - v_0),\qquad y_1 = y_{1/2} + \tfrac h2 v_1,$$

    one vector field evaluation per step. It is undone exactly by

    $$y_{1/2} = y_1 - \tfrac h2 v_1,\qquad u = f(t_{1/2}, y_{1/2}),\qquad
      v_0 = \frac{v_1 - 2\eta u}{1 - 2\eta},\qquad y_0 = y_{1/2} - \tfrac h2 v_0.$$

    With $\eta = 1$ (the default) $v_1 = 2u - v_0$ and the map is *time-symmetric*:
    the step of size $-h$ from $(y_1, v_1)$ is exactly the backward step above. It is
    then second order, and [`revdiffrax.SymmetricComposition`][] raises it to order
    4 or 6. For $y' = \lambda y$ the one-step matrix has determinant $-1$, so it is
    stable only on the imaginary axis (purely imaginary $h\lambda$ with
    $|h\lambda| \le 1$): it suits conservative and oscillatory problems.

    With $\eta < 1$ the reflection of $v$ is damped (determinant $1 - 2\eta$): the
    parasitic oscillation of $v$ about $f(t, y)$ decays and the method becomes
    stable for mildly dissipative problems, but it is only first order, no longer
    time-symmetric, and the backward step amplifies rounding errors in $v$ by up to
    $1 / |1 - 2\eta|$ per step, i.e. exponentially in the number of steps: keep
    $\eta$ close to 1 (e.g. `0.99`) and check the gradient with
    `ReversibleAdjoint(drift_callback=...)`.

    Error estimate: the difference with the Euler step $y_0 + h v_0$, i.e.
    $\eta h (u - v_0)$, of local order 2 (`error_order` is 2), so
    [`diffrax.PIDController`](https://docs.kidger.site/diffrax/api/stepsize_controller/#diffrax.PIDController)
    can drive the step size. Dense output: cubic Hermite
    interpolation of $y_0, y_1$ with slopes $v_0, v_1$.

    After a jump (`made_jump=True`), $v_0$ is re-initialised to $f(t_0, y_0)$, as
    FSAL solvers do. The backward step reconstructs the $v_0$ that the step used,
    which is what reverse-mode differentiation of the step needs.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{zhuang2021mali,
            title={{MALI}: A memory efficient and reverse accurate integrator for
                   Neural {ODE}s},
            author={Zhuang, Juntang and Dvornek, Nicha C. and Tatikonda, Sekhar and
                    Duncan, James S.},
            booktitle={International Conference on Learning Representations},
            year={2021}
        }
        ```
    """

    damping: float = eqx.field(default=1.0, static=True, converter=_check_damping)

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[
        Callable[..., ThirdOrderHermitePolynomialInterpolation]
    ] = ThirdOrderHermitePolynomialInterpolation

    def order(self, terms):
        return 2 if self.damping == 1 else 1

    def error_order(self, terms):
        return None if is_sde(terms) else 2

    def init(
        self,
        terms: diffrax.AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
    ) -> _SolverState:
        del t1
        return terms.vf(t0, y0, args)

    def _dense_info(self, terms, t0, t1, y0, y1, v0, v1) -> DenseInfo:
        control = terms.contr(t0, t1)
        return dict(
            y0=y0, y1=y1, k0=terms.prod(v0, control), k1=terms.prod(v1, control)
        )

    def step(
        self,
        terms: diffrax.AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y0: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, Y, DenseInfo, _SolverState, diffrax.RESULTS]:
        eta = self.damping
        v0 = _current_v(terms, t0, y0, args, solver_state, made_jump)
        tm = t0 + 0.5 * (t1 - t0)
        y_half = jtu.tree_map(
            lambda y, p: y + p, y0, terms.prod(v0, terms.contr(t0, tm))
        )
        u = terms.vf(tm, y_half, args)
        v1 = jtu.tree_map(lambda v, u_: v + 2 * eta * (u_ - v), v0, u)
        y1 = jtu.tree_map(
            lambda y, p: y + p, y_half, terms.prod(v1, terms.contr(tm, t1))
        )
        # y1 minus the Euler step y0 + h v0.
        y_error = terms.prod(
            jtu.tree_map(lambda u_, v: eta * (u_ - v), u, v0), terms.contr(t0, t1)
        )
        dense_info = self._dense_info(terms, t0, t1, y0, y1, v0, v1)
        return y1, y_error, dense_info, v1, diffrax.RESULTS.successful

    def backward_step(
        self,
        terms: diffrax.AbstractTerm,
        t0: RealScalarLike,
        t1: RealScalarLike,
        y1: Y,
        args: Args,
        solver_state: _SolverState,
        made_jump: BoolScalarLike,
    ) -> tuple[Y, DenseInfo, _SolverState, diffrax.RESULTS]:
        # After a jump the forward step used v0 = f(t0, y0); the algebra below
        # reconstructs exactly that v0, so `made_jump` needs no special handling.
        del made_jump
        eta = self.damping
        v1 = solver_state
        tm = t0 + 0.5 * (t1 - t0)
        y_half = jtu.tree_map(
            lambda y, p: y - p, y1, terms.prod(v1, terms.contr(tm, t1))
        )
        u = terms.vf(tm, y_half, args)
        if eta == 1:
            v0 = jtu.tree_map(lambda v, u_: 2 * u_ - v, v1, u)
        else:
            v0 = jtu.tree_map(lambda v, u_: (v - 2 * eta * u_) / (1 - 2 * eta), v1, u)
        y0 = jtu.tree_map(
            lambda y, p: y - p, y_half, terms.prod(v0, terms.contr(t0, tm))
        )
        dense_info = self._dense_info(terms, t0, t1, y0, y1, v0, v1)
        return y0, dense_info, v0, diffrax.RESULTS.successful

    def func(
        self, terms: diffrax.AbstractTerm, t0: RealScalarLike, y0: Y, args: Args
    ) -> VF:
        return terms.vf(t0, y0, args)


AsynchronousLeapfrog.__init__.__doc__ = r"""**Arguments:**

- `damping`: the damping $\eta \in (0, 1]$, $\eta \ne \tfrac12$. Defaults to `1`: the
    undamped, time-symmetric, second-order method. Values below 1 give a first-order
    method whose parasitic oscillation of $v$ decays.
"""
