"""`ReversibleAdjoint`: backpropagation through `diffrax.diffeqsolve` by
reconstruction instead of storage.

One concern per module:

- `adjoint`: the public class, its documentation and `loop`;
- `checks`: the inputs it refuses, each with the fix;
- `closure`: closure conversion of vector fields and `SaveAt.fn`;
- `forward`: the forward solve, recording step times (and checkpoints);
- `step_times`: the recorded times and their dependence on `(t0, t1, dt0)`;
- `checkpoints`: `checkpoint_every`: writing and restoring stored states;
- `rerun`: `step_times="recompute"`: restart points of an adaptive solve, and the
  re-run of its segments on the backward pass;
- `saveat`: the layout of `SaveAt` outputs;
- `cotangents`: cotangents of the saved outputs and of the inputs;
- `backward`: the backward driver, one reverse step at a time (the step itself is
  the solver's `backward_step_vjp`, generic or fused);
- `drift`: the reconstruction drift and its checks;
- `parasitic`: the parasitic mode of two-state solvers after the forward solve;
- `vjp`: the `custom_vjp` wiring.
"""

from .adjoint import ReversibleAdjoint as ReversibleAdjoint
from .drift import DriftWarning as DriftWarning
from .parasitic import ParasiticModeWarning as ParasiticModeWarning
