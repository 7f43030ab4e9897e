"""Kernel families, their rendering and resource checks, device profiles and launch backends."""
from metalforge.kernels.checks import Violation, check, check_space
from metalforge.kernels.families import FAMILIES
from metalforge.kernels.families import get as get_family

__all__ = ["FAMILIES", "get_family", "check", "check_space", "Violation"]
