"""Deprecated alias: the emulator is `metalforge.emulator` now. Kept importable for one release."""
import importlib
import sys
import warnings

warnings.warn("metalforge.kernels.emulator is deprecated: import metalforge.emulator", DeprecationWarning,
              stacklevel=2)

# The old module paths (metalforge.kernels.emulator.kernel, ...) name the new modules; the pytest
# plugin's only where pytest has loaded it already (importing it needs pytest).
for _sub in ("compiler", "kernel", "patch", "source"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"metalforge.emulator.{_sub}")
if "metalforge.emulator.pytest_plugin" in sys.modules:
    sys.modules[f"{__name__}.pytest_plugin"] = sys.modules["metalforge.emulator.pytest_plugin"]
sys.modules[__name__] = importlib.import_module("metalforge.emulator")
