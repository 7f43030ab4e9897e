"""The text the emulator compiles: MLX's generated MSL (same signature rules as
`mx.fast.metal_kernel`), rewritten line for line into C++ that metal_compat.h can compile."""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import mlx.core as mx

from metalforge.errors import MetalforgeError

# Attributes MLX adds when their name appears in the source, in MLX's order, with their types.
ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)

# The C++ expression (over mf::Fiber f and mf::Launch L) that gives each attribute's value.
ATTRIBUTE_VALUES = {
    "dispatch_quadgroups_per_threadgroup": "uint((L.nominal_tg.x * L.nominal_tg.y * L.nominal_tg.z + 3) / 4)",
    "dispatch_simdgroups_per_threadgroup": "uint((L.nominal_tg.x * L.nominal_tg.y * L.nominal_tg.z + 31) / 32)",
    "dispatch_threads_per_threadgroup": "uint3(L.nominal_tg.x, L.nominal_tg.y, L.nominal_tg.z)",
    "grid_origin": "uint3(0u, 0u, 0u)",
    "grid_size": "uint3(L.grid.x, L.grid.y, L.grid.z)",
    "quadgroup_index_in_threadgroup": "uint(f.index / 4)",
    "quadgroups_per_threadgroup": "uint((f.tg_size.x * f.tg_size.y * f.tg_size.z + 3) / 4)",
    "simdgroup_index_in_threadgroup": "uint(f.simdgroup)",
    "simdgroups_per_threadgroup": "uint((f.tg_size.x * f.tg_size.y * f.tg_size.z + 31) / 32)",
    "thread_execution_width": "uint(32)",
    "thread_index_in_quadgroup": "uint(f.index % 4)",
    "thread_index_in_simdgroup": "uint(f.lane)",
    "thread_index_in_threadgroup": "uint(f.index)",
    "thread_position_in_grid": "uint3(f.tg_pos.x * L.nominal_tg.x + f.pos_in_tg.x, f.tg_pos.y * L.nominal_tg.y + f.pos_in_tg.y, f.tg_pos.z * L.nominal_tg.z + f.pos_in_tg.z)",
    "thread_position_in_threadgroup": "uint3(f.pos_in_tg.x, f.pos_in_tg.y, f.pos_in_tg.z)",
    "threadgroup_position_in_grid": "uint3(f.tg_pos.x, f.tg_pos.y, f.tg_pos.z)",
    "threadgroups_per_grid": "uint3(L.groups.x, L.groups.y, L.groups.z)",
    "threads_per_grid": "uint3(L.grid.x, L.grid.y, L.grid.z)",
    "threads_per_simdgroup": "uint(32)",
    "threads_per_threadgroup": "uint3(f.tg_size.x, f.tg_size.y, f.tg_size.z)",
}

MAX_CONSTANT_ARRAY_SIZE = 8  # inputs with fewer elements go to the constant address space

TYPE_NAMES = {
    mx.bool_: "bool", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float32: "float",
    mx.complex64: "complex64_t",
}


def type_name(dtype) -> str:
    try:
        return TYPE_NAMES[dtype]
    except KeyError:
        raise MetalforgeError(f"emulator: dtype {dtype} is not supported in kernels") from None


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: object
    ndim: int
    size: int
    shape: bool
    strides: bool
    ndim_used: bool

    @property
    def location(self) -> str:
        return "constant" if self.size < MAX_CONSTANT_ARRAY_SIZE else "device"


def template_value(value) -> tuple[str, str]:
    """(parameter kind, C++ spelling) of one template argument, as MLX writes them."""
    if isinstance(value, bool):
        return "bool", "1" if value else "0"
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        return "typename", type_name(value)
    raise MetalforgeError(f"emulator: template values must be mx.Dtype, int or bool, got {type(value).__name__}")


def mlx_kernel_name(name: str, template: list, inputs: list[InputInfo], output_dtypes) -> str:
    """MLX 0.32's name: template values and each input's and output's dtype are appended."""
    out = "custom_kernel_" + name
    if template:
        spelled = "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"
        out += "_" + re.sub(r"<|>|(, )", "_", spelled)[:-1]
    for i in inputs:
        out += "_" + type_name(i.dtype) + ("s" if i.ndim == 0 else "c" if i.size < MAX_CONSTANT_ARRAY_SIZE else "")
    for d in output_dtypes:
        out += "_" + type_name(d)
    return out


def attributes_in(source: str) -> list[str]:
    return [a for a, _ in ATTRIBUTES if a in source]


@dataclass(frozen=True)
class Buffer:
    """One `[[buffer(i)]]` argument of a generated kernel. The signature (mlx_source), the launcher
    (kernel._translation_unit) and the marshalling (EmulatedKernel.__call__) all walk one list of
    these, so the order MLX gives the buffers is written down once."""
    name: str           # the MSL parameter
    of: str             # the input or output it carries or describes
    role: str           # input | scalar | shape | strides | ndim | output
    ctype: str          # element type as MSL spells it (atomic<T> for atomic outputs)
    declaration: str    # the parameter as MLX declares it

    @property
    def by_reference(self) -> bool:   # `const constant T&`: the launcher passes the value, not a pointer
        return self.role in ("scalar", "ndim")


def buffer_plan(inputs: list[InputInfo], output_names, output_dtypes, atomic_outputs: bool) -> tuple[Buffer, ...]:
    """MLX's order: each input, then the shape, strides and ndim buffers its source names, then
    the outputs."""
    plan = []
    for i in inputs:
        t = type_name(i.dtype)
        if i.ndim == 0:
            plan.append(Buffer(i.name, i.name, "scalar", t, f"const {i.location} {t}& {i.name}"))
            continue
        plan.append(Buffer(i.name, i.name, "input", t, f"const {i.location} {t}* {i.name}"))
        for used, role, ctype, ref in ((i.shape, "shape", "int", "*"), (i.strides, "strides", "int64_t", "*"),
                                       (i.ndim_used, "ndim", "int", "&")):
            if used:
                name = f"{i.name}_{role}"
                plan.append(Buffer(name, i.name, role, ctype, f"const constant {ctype}{ref} {name}"))
    for name, dtype in zip(output_names, output_dtypes):
        t = f"atomic<{type_name(dtype)}>" if atomic_outputs else type_name(dtype)
        plan.append(Buffer(name, name, "output", t, f"device {t}* {name}"))
    return tuple(plan)


def mlx_source(kernel_name: str, header: str, source: str, plan: tuple[Buffer, ...], template: list) -> str:
    """The full MSL text MLX generates for a call (what verbose=True prints)."""
    lines = [header]
    if template:
        lines.append("template <" + ", ".join(f"{template_value(v)[0]} {n}" for n, v in template) + ">\n")
    sig = f"[[kernel]] void {kernel_name}(\n"
    params = [f"  {b.declaration} [[buffer({index})]]" for index, b in enumerate(plan)]
    attr_types = dict(ATTRIBUTES)
    for a in attributes_in(source):
        params.append(f"  {attr_types[a]} {a} [[{a}]]")
    sig += ",\n".join(params) + ") {\n"
    text = "".join(lines) + sig + source + "\n}\n"
    if template:
        args = "<" + ", ".join(template_value(v)[1] for _, v in template) + ">"
        text += (f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({kernel_name}{args}) '
                 f"{kernel_name}{args};\n")
    return text


# ---- rewriting MSL into C++ (line-preserving) ----------------------------------------------------
_DECLARATOR = r"[A-Za-z_]\w*\s*(?:\[[^\]\n]+\]\s*)*"
_TG_DECL = re.compile(
    r"\bthreadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;<>]*>)?)\s+(" + _DECLARATOR + r"(?:,\s*" + _DECLARATOR + r")*);"
)
_PTR_DECL = re.compile(
    r"\b(const\s+)?(device|constant|threadgroup)\s+(const\s+)?([A-Za-z_][\w:]*(?:\s*<[^;<>()]*>)?)\s*\*"
)
_CONSTANT_REFERENCE = re.compile(r"(?<![\w])(?<!const )constant\s+[A-Za-z_][\w:]*(?:\s*<[^;<>()]*>)?\s*&")
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_CHECKED_REINTERPRET = re.compile(r"\breinterpret_cast\s*<\s*(mf::(?:DevPtr|TgPtr)<.+?> )>\s*\(")


def rewrite(msl: str, checked: bool, facts=None) -> str:
    """Threadgroup declarations become slots of the threadgroup's shared arena (one per declarator:
    `threadgroup float a[N], b[N];` is two arrays); program-scope `constant` variables become const
    (the C++ compiler then takes them as array bounds); in checked mode device/constant pointers
    become bounds-checked pointers, threadgroup arrays race-checked views and threadgroup pointers
    (helpers' arguments) race-checked pointers. `facts` come from the
    conformance front end, which parsed the same text: the rewrite must find every threadgroup
    variable clang found, or it refuses to run the kernel rather than run it wrong."""
    if facts is not None and facts.constant_declarations:
        lines = msl.split("\n")
        for line, column in sorted(facts.constant_declarations, reverse=True):
            text = lines[line - 1]
            lines[line - 1] = text[:column - 1] + "const   " + text[column - 1 + len("constant"):]
        msl = "\n".join(lines)
    found = 0

    def tg(m):
        nonlocal found
        t = m.group(1)
        slots = []
        for decl in re.findall(_DECLARATOR, m.group(2)):
            name, dims = re.match(r"([A-Za-z_]\w*)\s*(.*)", decl.strip()).groups()
            slots.append(f"MF_TG({t}, {name}, {dims.replace(' ', '')}, __COUNTER__)")
        found += len(slots)
        return "; ".join(slots) + ";"

    out = _sub_in_code(_TG_DECL, tg, msl)
    # `constant int& n`: constant memory is read-only, so Metal binds it to a const value; the C++
    # compile, where `constant` is no keyword, needs the const written (MLX's qmv_quad_impl)
    out = _sub_in_code(_CONSTANT_REFERENCE, lambda m: "const " + m.group(0), out)
    if facts is not None and found != facts.threadgroup_declarations:
        raise MetalforgeError(
            f"emulator: this kernel declares {facts.threadgroup_declarations} threadgroup variables and the emulator "
            f"recognised {found}; it runs `threadgroup T name[N]...;` declarations in the kernel function's scope "
            "(several per line are fine), so write the others that way")
    if checked:
        def ptr(m):
            const = "const " if (m.group(1) or m.group(3)) else ""
            return f"mf::{'TgPtr' if m.group(2) == 'threadgroup' else 'DevPtr'}<{const}{m.group(4)}> "
        out = _sub_in_code(_PTR_DECL, ptr, out)
        # reinterpret_cast<const device T*>(p) reads p's bytes as another type: with p checked, the
        # same conversion is DevPtr's explicit constructor (its bounds in the new element size)
        out = _CHECKED_REINTERPRET.sub(r"\1(", out)
        out = _element_addresses(out)
    return out


_ADDRESS_OF = re.compile(r"&\s*(\(\s*)?([A-Za-z_]\w*(?:(?:\.|->)[A-Za-z_]\w*)*)\s*\[")


def _element_addresses(text: str) -> str:
    """`&p[i]` and `&(p[i])` become `(p + (i))`: the same pointer for a pointer or an array (MSL takes no
    address of a vector's element), and for a checked pointer a checked one, so a helper that gets
    `&dst[i]` (steel's fragment stores) still has its accesses checked and traced. Only a unary `&`
    on a single subscript: `&a[i][j]`, `&a[i].x` and `x & a[i]` stay as they are."""
    masked = _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    pieces, last = [], 0
    for m in _ADDRESS_OF.finditer(masked):
        before = masked[:m.start()].rstrip()
        if m.start() < last or not (before == "" or before[-1] in "(,=;{}?:[" or re.search(r"\breturn$", before)):
            continue
        depth, i = 1, m.end()
        while i < len(masked) and depth:
            depth += {"[": 1, "]": -1}.get(masked[i], 0)
            i += 1
        if depth:
            continue
        end = i
        if m.group(1):
            close = re.match(r"\s*\)", masked[end:])
            if not close:
                continue
            end += close.end()
        if re.match(r"\s*(\[|\.|->|\()", masked[end:]):
            continue
        pieces += [text[last:m.start()], f"({m.group(2)} + ({text[m.end():i - 1]}))"]
        last = end
    return "".join(pieces) + text[last:]


def _sub_in_code(pattern: re.Pattern, repl, text: str) -> str:
    """pattern.sub outside comments: "// ... threadgroup" is no declaration, "device memory */" no pointer."""
    masked = _COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    pieces, last = [], 0
    for m in pattern.finditer(masked):
        pieces += [text[last:m.start()], repl(m)]
        last = m.end()
    return "".join(pieces) + text[last:]


# ---- swizzles --------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def swizzle_members() -> dict[int, str]:
    """Swizzle members for 2-, 3- and 4-vectors: every pair, triples and quads without repeats."""
    out = {}
    for n in (2, 3, 4):
        letters = "xyzw"[:n]
        names = ["".join(p) for p in itertools.product(letters, repeat=2)]
        names += ["".join(p) for p in itertools.permutations(letters, 3)]
        names += ["".join(p) for p in itertools.permutations(letters, 4)] if n == 4 else []
        rgba = {"x": "r", "y": "g", "z": "b", "w": "a"}
        members = []
        for name in names:
            idx = ", ".join(str("xyzw".index(c)) for c in name)
            members.append(f"swz<T, {n}, {idx}> {name};")
            members.append(f"swz<T, {n}, {idx}> {''.join(rgba[c] for c in name)};")
        out[n] = " ".join(members)
    return out


# Metal's own headers: a kernel may include them (many published kernels start so); the
# emulator's metal_compat.h, included first, declares everything they do.
METAL_HEADERS = ("metal_stdlib", "metal_atomic", "metal_common", "metal_compute", "metal_geometric",
                 "metal_integer", "metal_math", "metal_matrix", "metal_relational", "metal_simdgroup",
                 "metal_simdgroup_matrix", "metal_type_traits", "metal_types", "simd/simd.h")


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


def kernel_interface() -> str:
    """mf_kernel.h: the runtime as a kernel's translation unit sees it."""
    return _read("mf_kernel.h")


def runtime_source() -> str:
    """mf_runtime.cpp: fibers, scheduling, faults; an object of its own linked with each kernel."""
    return _read("mf_runtime.cpp")


def worker_source() -> str:
    """mf_worker.cpp: the sandboxed process that loads a kernel's library and runs its launches."""
    return _read("mf_worker.cpp")


@lru_cache(maxsize=8)
def compat_header(checked: bool, library: bool = False, traced: bool = False) -> str:
    """metal_compat.h with the runtime interface and its swizzles filled in, and the
    checked-mode layer when asked (and trace mode's calls into the runtime on it). A full library (emulator/library.py) includes MLX's utils.h
    itself, so its variant leaves out what a custom kernel gets of utils.h implicitly."""
    compat = _read("metal_compat.h").replace('#include "mf_kernel.h"', kernel_interface())
    for n, members in swizzle_members().items():
        compat = compat.replace(f"// @SWIZZLES{n}@", members)
    if checked:
        compat = "#define MF_CHECKED 1\n" + compat.replace("using namespace metal;", _read("mf_checked.h") + "\nusing namespace metal;", 1)
    if library:
        compat = "#define MF_LIBRARY 1\n" + compat
    if traced:   # on top of the checked layer, whose pointers and views it counts through
        compat = "#define MF_TRACE 1\n" + compat
    return compat
