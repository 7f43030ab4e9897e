"""Deprecated alias: the emulator is `metalforge.emulator` now. Kept importable for one release."""
import importlib
import sys
import warnings

warnings.warn("metalforge.kernels.emulator is deprecated: import metalforge.emulator", DeprecationWarning,
              stacklevel=2)

# The old module paths (metalforge.kernels.emulator.kernel, ...) name the new modules.
for _sub in ("compiler", "kernel", "patch", "pytest_plugin", "source"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"metalforge.emulator.{_sub}")
sys.modules[__name__] = importlib.import_module("metalforge.emulator")
