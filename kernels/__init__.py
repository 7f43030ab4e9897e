"""Kernel families, their rendering and resource checks, device profiles and launch backends."""
from metalforge.kernels.checks import Violation, check, check_space
from metalforge.kernels.families import FAMILIES
from metalforge.kernels.families import get as family

__all__ = ["FAMILIES", "family", "check", "check_space", "Violation"]
