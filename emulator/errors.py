"""The emulator's run-time error (compile errors are compiler.CompileError)."""
from metalforge.errors import MetalforgeError


class EmulatorError(MetalforgeError):
    """A kernel failed at dispatch or while running (limits, divergent barriers, checked-mode
    reports, its worker process dying or overrunning its time limit)."""
