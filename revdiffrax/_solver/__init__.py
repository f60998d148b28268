from .asynchronous_leapfrog import AsynchronousLeapfrog as AsynchronousLeapfrog
from .base import AbstractReversibleSolver as AbstractReversibleSolver
from .leapfrog_midpoint import LeapfrogMidpoint as LeapfrogMidpoint
from .reversible import Reversible as Reversible
from .reversible_heun import ReversibleHeun as ReversibleHeun
from .semi_implicit_euler import SemiImplicitEuler as SemiImplicitEuler
from .symmetric_composition import SymmetricComposition as SymmetricComposition
