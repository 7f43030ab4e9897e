"""An MSL-on-CPU emulator: a drop-in for `mx.fast.metal_kernel` so Metal kernels run on Linux.

    from metalforge import emulator
    kernel = emulator.metal_kernel(name=..., input_names=..., output_names=..., source=...)
    with emulator.patch():          # or: mx.fast.metal_kernel itself becomes the emulator
        run_third_party_code()
"""
from .compiler import CompileError
from .kernel import EmulatorError, metal_kernel
from .patch import patch

__all__ = ["metal_kernel", "patch", "CompileError", "EmulatorError"]
