"""revdiffrax: algebraically reversible solvers and an exact, O(1)-memory adjoint
for diffrax."""

import importlib.metadata

from ._adjoint import (
    DriftWarning as DriftWarning,
    ParasiticModeWarning as ParasiticModeWarning,
    ReversibleAdjoint as ReversibleAdjoint,
)
from ._adjoint_choice import (
    AdjointChoice as AdjointChoice,
    choose_adjoint as choose_adjoint,
)
from ._checkpoint_choice import (
    CheckpointChoice as CheckpointChoice,
    choose_checkpoint_every as choose_checkpoint_every,
)
from ._solver import (
    AbstractReversibleSolver as AbstractReversibleSolver,
    AsynchronousLeapfrog as AsynchronousLeapfrog,
    LeapfrogMidpoint as LeapfrogMidpoint,
    Reversible as Reversible,
    ReversibleHeun as ReversibleHeun,
    SemiImplicitEuler as SemiImplicitEuler,
    SymmetricComposition as SymmetricComposition,
)


try:
    __version__ = importlib.metadata.version("revdiffrax")
except importlib.metadata.PackageNotFoundError:  # used from a source checkout
    __version__ = "0.0.0+unknown"
