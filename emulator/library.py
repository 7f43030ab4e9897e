"""A full Metal library in the emulator: a source with its own `[[kernel]]` functions (MLX's kernel
headers, a third party's .metal file), a function picked by host name, function constants set,
buffers and bytes bound by index, a grid of threadgroups dispatched — what a Metal host program
does with `newLibraryWithSource`, `newFunctionWithName:constantValues:` and a compute encoder.

    lib = Library(source, headers=root)        # #include "mlx/backend/metal/kernels/..." resolves in root
    fn = lib.function("affine_qmv_float_...")  # (kernels/mlx_headers.py: MLX's headers, fetched once)
    fn(buffers={0: w, 1: scales, 2: biases, 3: x, 4: y, 5: K, 6: N}, threadgroups=(M, (N + 7) // 8, 1), threadgroup=(32, 2, 1))

The source is flattened (its quoted includes inlined from the header root), checked by the same
conformance front end as `metal_kernel`, rewritten the same way and compiled into one translation
unit per function and constant values (Metal specialises a function for its constants too), with
a launcher built from the function's parsed signature.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from metalforge.errors import MetalforgeError

from . import compiler, conformance, environment, frontend, runner, trace
from .errors import EmulatorError
from .kernel import _with_lines, device_limits
from .source import ATTRIBUTE_VALUES, METAL_HEADERS, rewrite

# ---- flattening: quoted includes inlined from the header root ----------------------------------------
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"][^\n]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.M)


def flatten(source: str, root: Path | None) -> str:
    """The source with each `#include "..."` (and `<...>` of a file under `root`) replaced by the
    file, recursively, `#pragma once` honoured. Resolution stays inside `root`: anything else
    (a system header, a path escaping the root) is left in place for the front end to refuse;
    Metal's own headers stay too (metal_compat.h declares them)."""
    done: set[Path] = set()
    base = root.resolve() if root is not None else None

    def find(name: str, here: Path | None) -> Path | None:
        if base is None or name in METAL_HEADERS:
            return None
        for folder in (here, base / "mlx/backend/metal/kernels", base):
            if folder is None:
                continue
            path = (folder / name).resolve()
            if path.is_file() and path.is_relative_to(base):
                return path
        return None

    def expand(text: str, here: Path | None) -> str:
        def one(m):
            path = find(m.group(2), here)
            if path is None:
                return m.group(0)
            if path in done:
                return ""
            body = path.read_text()
            if _PRAGMA_ONCE.search(body):
                done.add(path)
                body = _PRAGMA_ONCE.sub("", body)
            return expand(body, path.parent)
        return _INCLUDE.sub(one, text)

    return expand(source, None)


# Overloads on address spaces: member functions on the space of `this` (MLX's complex_t has thread,
# threadgroup, device and constant twins of each constructor), free functions on a reference's,
# partial specialisations on a pointer's. The emulator has one address space, where the `thread`
# one serves, so the others are left out (blank lines keep line numbers).
_SPACE_QUALIFIED = re.compile(r"\)\s*(?:const\s+)?(?:threadgroup|device|constant)\s*(?=[:{])")
# ... and free functions taking a reference in another address space (complex_t's operator+=)
_SPACE_REFERENCE = re.compile(r"\(\s*(?:threadgroup|device|constant)\s+[A-Za-z_][^,();{}\[]*&\s*\w+\s*[,)][^;{}]*\{")
# ... and class templates specialised per address space of a pointer (steel's pointer_element<device T*>)
_SPACE_SPECIALISATION = re.compile(r"\bstruct\s+\w+\s*<\s*(?:const\s+)?(?:threadgroup|device|constant)\s+[^<>{};]*\*\s*>\s*\{")


def _overloaded(msl: str, m: re.Match) -> bool:
    """Whether the function whose parameter list `m` opens is defined more than once."""
    if m.re is not _SPACE_REFERENCE:
        return True
    name = re.search(r"([A-Za-z_]\w*|operator\s*\S+?)\s*$", msl[:m.start()])
    if name is None:
        return True
    definitions = re.findall(rf"(?<![\w.]){re.escape(name.group(1))}\s*\([^;{{}}]*\)[^;{{}}()]*\{{", msl)
    return len(definitions) > 1


def drop_space_overloads(msl: str) -> str:
    spans = []
    matches = sorted([*_SPACE_QUALIFIED.finditer(msl), *_SPACE_REFERENCE.finditer(msl),
                      *_SPACE_SPECIALISATION.finditer(msl)], key=lambda m: m.start())
    for m in matches:
        if spans and m.start() < spans[-1][1]:
            continue
        start = max(msl.rfind(c, 0, m.start()) for c in ";{}") + 1
        if msl[start - 1] == "}" and msl[start:m.start()].lstrip().startswith(";"):
            start = msl.index(";", start) + 1
        if _KERNEL.search(msl, start, m.start() + 1) or not _overloaded(msl, m):
            continue   # a kernel or a function defined once taking `constant Args& args` (llama.cpp's): no twin
        open_at, depth = msl.index("{", m.end() - 1), 0
        for end in range(open_at, len(msl)):
            depth += {"{": 1, "}": -1}.get(msl[end], 0)
            if depth == 0:
                break
        end += 1
        if msl[end:end + 1] == ";":
            end += 1
        spans.append((start, end))
    for a, b in reversed(spans):
        msl = msl[:a] + "\n" * msl.count("\n", a, b) + msl[b:]
    return msl


# ---- the library's kernels, instantiations and function constants --------------------------------------
@dataclass(frozen=True)
class Param:
    """One argument of a kernel function, as its signature binds it."""
    name: str
    declaration: str         # the type and name as written
    binding: str             # buffer | attribute
    index: int | None        # n of [[buffer(n)]]
    attribute: str | None    # e.g. thread_position_in_grid
    condition: str | None    # [[function_constant(c)]]: bound only when the constant c is true

    @property
    def writable(self) -> bool:
        """A device pointer without const: the kernel may write it (the buffer is copied back); the
        constant address space is read-only."""
        return self.binding == "buffer" and re.search(r"\bconst(?:ant)?\b", self.declaration) is None

    @property
    def scalar_type(self) -> str | None:
        """The element type's name for `const constant int& n` and the like (to take Python numbers)."""
        words = [w for w in re.findall(r"[A-Za-z_][\w:]*", self.declaration[:self.declaration.rfind(self.name)])
                 if w not in ("const", "constant", "device", "thread", "threadgroup")]
        return words[-1] if words else None


@dataclass(frozen=True)
class KernelFunction:
    name: str
    params: tuple[Param, ...]
    template: bool
    problem: str = ""        # why the emulator cannot bind its signature (said when it is picked)


@dataclass(frozen=True)
class Instantiation:
    host_name: str
    function: str
    arguments: str           # the template arguments as written
    span: tuple[int, int]    # where the statement is in the flattened source


MODES = ("plain", "checked", "traced")
_POINTER_ELEMENT = re.compile(r"using\s+pointer_element_t\s*=[^;]*;")
_CHECKED_POINTER_ELEMENT = (" template <typename T> struct pointer_element<mf::DevPtr<T>> "
                            "{ using type = remove_cv_t<T>; };")
_THREADGROUP_ATTRIBUTE = re.compile(r"\[\[\s*threadgroup\s*\(")
_KERNEL = re.compile(r"\[\[\s*kernel\b[^\]]*\]\]\s*void\s+([A-Za-z_]\w*)\s*\(")   # [[kernel, max_total_threads_...]]
# clang's range initialiser, `float s[N] = { [ 0 ... N - 1 ] = 0.0f };` and `= -FLT_MAX/2` (llama.cpp),
# which g++'s C++ lacks: `{}` zero-initialises, then a loop sets elements 0 ... last to the value
_ZERO_RANGE = re.compile(r"\{\s*\[\s*0\s*\.\.\.[^\]{};]*\]\s*=\s*0(?:\.0*)?f?\s*\}")
_FILL_RANGE = re.compile(r"(\b[A-Za-z_]\w*)(\s*\[[^\]]+\]\s*)=\s*\{\s*\[\s*0\s*\.\.\.([^\]{};]*)\]\s*=\s*([^{};]+?)\s*\}\s*;")


def _filled(text: str) -> str:
    return _FILL_RANGE.sub(lambda m: f"{m.group(1)}{m.group(2)}= {{}}; for (int mf_k = 0; mf_k <= ({m.group(3).strip()}); "
                                     f"++mf_k) {m.group(1)}[mf_k] = {m.group(4)};", _ZERO_RANGE.sub("{}", text))
# the keyword spelling, `kernel void f(` and `template [[host_name("h")]] kernel f_t f<..>;` (llama.cpp's),
# read as the attribute one: the emulator's headers define no `kernel` keyword
_KERNEL_KEYWORD = re.compile(r"(?<![\w:.\[])kernel(?=\s+(?:void\s+[A-Za-z_]\w*\s*\(|[A-Za-z_]\w*\s+[A-Za-z_]\w*\s*<))")
# template [[host_name("h")]] [[kernel]] decltype(f<A>) f<A>;  or, over a `typedef decltype(f<B>) f_t;`,
# template [[host_name("h")]] [[kernel]] f_t f<A>;
_INSTANCE = re.compile(
    r'template\s*\[\[\s*host_name\(\s*"([^"]+)"\s*\)\s*\]\]\s*\[\[\s*kernel\s*\]\]\s*'
    r"(?:decltype\(\s*([A-Za-z_]\w*)\s*<([^;]*?)>\s*\)\s*\2|[A-Za-z_]\w*\s+([A-Za-z_]\w*))\s*<([^;]*?)>\s*;")
# the index a number or a sum of numbers and object-like macros (llama.cpp: `FC_MUL_MV + 0`)
_CONSTANT = re.compile(
    r"\bconstant\s+([A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*\[\[\s*function_constant\(\s*([\w\s+]+?)\s*\)\s*\]\]\s*;")
_INT_MACRO = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+(\d+)[ \t]*$", re.M)
_ATTR = re.compile(r"\[\[(.*?)\]\]", re.S)


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets of any kind."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _closing(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise MetalforgeError("emulator: a [[kernel]] function's parameter list is not closed")


def _param(text: str, kernel: str) -> Param:
    attrs = [a.strip() for m in _ATTR.finditer(text) for a in _split_top(m.group(1))]
    decl = _ATTR.sub("", text).strip()
    name = re.findall(r"[A-Za-z_]\w*", decl)[-1]
    binding = index = attribute = condition = None
    for a in attrs:
        m = re.fullmatch(r"(buffer|threadgroup|function_constant)\s*\(\s*(\w+)\s*\)", a)
        if m and m.group(1) == "function_constant":
            condition = m.group(2)
        elif m:
            binding, index = m.group(1), int(m.group(2))
        elif a in ATTRIBUTE_VALUES:
            binding, attribute = "attribute", a
    if binding is None and attrs:
        raise MetalforgeError(f"emulator: parameter `{decl}` of kernel `{kernel}` has no attribute the emulator "
                              f"binds ({', '.join(attrs)}): it binds [[buffer(n)]] and the thread position attributes")
    if binding is None:   # no attribute: Metal assigns the next buffer index (kernel_functions numbers them)
        binding = "buffer"
    return Param(name, decl, binding, index, attribute, condition)


def kernel_functions(msl: str) -> dict[str, KernelFunction]:
    out = {}
    for m in _KERNEL.finditer(msl):
        close = _closing(msl, m.end() - 1)
        before = msl[max(msl.rfind(c, 0, m.start()) for c in ";{}") + 1:m.start()]
        template = re.search(r"\btemplate\s*<", re.sub(r"(?m)^\s*#.*$", "", before)) is not None
        try:
            params = _numbered([_param(p, m.group(1)) for p in _split_top(msl[m.end():close])])
        except MetalforgeError as e:
            out[m.group(1)] = KernelFunction(m.group(1), (), template, str(e))
            continue
        out[m.group(1)] = KernelFunction(m.group(1), params, template)
    return out


def _numbered(params: list[Param]) -> tuple[Param, ...]:
    """Buffers without an index take the next one after the previous buffer's (MSL §5.2.1)."""
    out, last = [], -1
    for p in params:
        if p.binding == "buffer" and p.index is None:
            p = Param(p.name, p.declaration, p.binding, last + 1, p.attribute, p.condition)
        if p.binding == "buffer":
            last = p.index
        out.append(p)
    return tuple(out)


# object-like macros (no `(` right after the name), their bodies over continued lines, and #undefs
_DEFINE = re.compile(r"^[ \t]*#[ \t]*(define|undef)[ \t]+([A-Za-z_]\w*)(?![\w(])((?:[^\n]*\\\n)*[^\n]*)", re.M)
_WORD = re.compile(r"\b[A-Za-z_]\w*\b")


def _expanded(text: str, defines: list, at: int) -> str:
    """`text` with the object-like macros live at offset `at` expanded (llama.cpp instantiates its
    kernels over `#define FA_TYPES ...` and #undefs it at the end of the file, before the launcher
    the emulator appends names the instantiation again)."""
    live: dict[str, str] = {}
    for pos, kind, name, body in defines:
        if pos > at:
            break
        if kind == "define":
            live[name] = body
        else:
            live.pop(name, None)
    for _ in range(8):          # macros of macros; a self-referencing one stops expanding, as in C
        new = _WORD.sub(lambda m: live.get(m.group(0), m.group(0)), text)
        if new == text:
            break
        text = new
    return text


def instantiations(msl: str) -> dict[str, Instantiation]:
    defines = [(m.start(), m.group(1), m.group(2), m.group(3).replace("\\\n", " ").strip())
               for m in _DEFINE.finditer(msl)]
    return {m.group(1): Instantiation(m.group(1), m.group(2) or m.group(4),
                                      _expanded((m.group(3) or m.group(5)).strip(), defines, m.start()), m.span())
            for m in _INSTANCE.finditer(msl)}


def function_constants(msl: str) -> dict[str, tuple[int, str]]:
    """name -> (index, type) of each `constant T name [[function_constant(index)]];`."""
    macros = {m.group(1): int(m.group(2)) for m in _INT_MACRO.finditer(msl)}
    return {m.group(2): (_index(m.group(3), macros, m.group(2)), m.group(1)) for m in _CONSTANT.finditer(msl)}


def _index(expression: str, macros: dict[str, int], name: str) -> int:
    """A function constant's index: numbers and integer macros added."""
    total = 0
    for term in expression.split("+"):
        term = term.strip()
        if not term.isdigit() and term not in macros:
            raise MetalforgeError(f"emulator: function constant `{name}` has index `{expression}`, and `{term}` is "
                                  "neither a number nor an integer macro of the library")
        total += int(term) if term.isdigit() else macros[term]
    return total


def _literal(ctype: str, value) -> str:
    if ctype == "bool":
        return "true" if value else "false"
    if ctype in ("float", "half"):
        return f"{float(value)!r}f"
    return str(int(value))


# ---- the launcher: the chosen function called with its buffers and attribute values ---------------
_LAUNCHER_HELPERS = """
namespace mf_bind {
template <int I, class H, class... P> struct nth { using type = typename nth<I - 1, P...>::type; };
template <class H, class... P> struct nth<0, H, P...> { using type = H; };
template <class F> struct params;
template <class R, class... P> struct params<R(P...)> { template <int I> using at = typename nth<I, P...>::type; };
template <class T> struct is_ptr { static constexpr bool value = false; };
template <class T> struct is_ptr<T*> { static constexpr bool value = true; };
template <class T> struct is_checked { static constexpr bool value = false; };
template <class T> struct element { using type = metal::remove_cv_t<metal::remove_reference_t<T>>; };
template <class T> struct element<T*> { using type = metal::remove_cv_t<T>; };
#ifdef MF_CHECKED
template <class T> struct is_checked<mf::DevPtr<T>> { static constexpr bool value = true; using pointer = T*; };
template <class T> struct element<mf::DevPtr<T>> { using type = metal::remove_cv_t<T>; };
#endif
// a buffer as the parameter takes it: a pointer (in checked mode a bounds-checked one), or the
// value behind a reference
template <class P> inline P buffer(void* p, long long count, const char* name) {
  if constexpr (is_ptr<P>::value) return reinterpret_cast<P>(p);
  else if constexpr (is_checked<P>::value) return P(reinterpret_cast<typename is_checked<P>::pointer>(p), count, name);
  else return *reinterpret_cast<metal::remove_reference_t<P>*>(p);
}
// an attribute's value in the parameter's type (uint3 or its first components)
template <class P, class V> inline P attribute(V v) {
  if constexpr (metal::vec_traits<V>::n == 1) return P(v);
  else if constexpr (metal::vec_traits<P>::n == 3) return P(v);
  else if constexpr (metal::vec_traits<P>::n == 2) return P(v.x, v.y);
  else return P(v.x);
}
}  // namespace mf_bind
"""


def _launcher(host_name: str, callee: str, fn: KernelFunction, order: list[Param]) -> str:
    position = {p.index: i for i, p in enumerate(order)}
    args = []
    for i, p in enumerate(fn.params):
        at = f"P::template at<{i}>"
        if p.binding == "buffer":
            args.append(f'mf_bind::buffer<{at}>(buffers[{position[p.index]}], meta[9 + {position[p.index]}], "{p.name}")')
        else:
            args.append(f"mf_bind::attribute<{at}>({ATTRIBUTE_VALUES[p.attribute]})")
    names = ", ".join(f'"{p.name}"' for p in order) or '""'
    sizes = ", ".join(f"sizeof(typename mf_bind::element<P::template at<{fn.params.index(p)}>>::type)"
                      for p in order) or "0"
    first_output = next((i for i, p in enumerate(order) if p.writable), len(order))
    return f'''
#line 1 "mf_launcher.cpp"
{_LAUNCHER_HELPERS}
using P = mf_bind::params<decltype({callee})>;
static const char* const mf_buffer_names[] = {{{names}}};
extern "C" const mf::KernelInfo mf_kernel_info = {{"{host_name}", mf_buffer_names, {len(order)}, {first_output}}};
extern "C" void mf_kernel_body(void* const* buffers, const long long* meta, const mf::Launch& L, mf::Fiber& f) {{
  {callee}({", ".join(args)});
}}
// entries run by runner.Library (mf_launch's signature): the bytes of each buffer's element, into buffer 0
extern "C" [[gnu::visibility("default")]] int mf_element_bytes(void** buffers, const long long*, const long long*, int, int) {{
  static const unsigned long long sizes[] = {{{sizes}}};
  for (int i = 0; i < {len(order)}; i++) static_cast<unsigned long long*>(buffers[0])[i] = sizes[i];
  return 0;
}}
'''



# ---- the library -----------------------------------------------------------------------------------
class Library:
    """A Metal source compiled as a library; `function(host_name, constants)` picks a kernel.

    `headers`: the include root its quoted includes resolve in (kernels/mlx_headers.include_root()
    for MLX's); without one, an include is left for the front end to refuse. `mode`: plain,
    checked (bounds and races, $METALFORGE_EMULATOR_CHECKED) or traced (checked, and each call
    leaves `last_trace`, a trace.Trace of what it did). `races=False` leaves the race detector
    out of checked and traced runs: for counting a kernel known to run on Metal that relies on a
    SIMD-group's lanes running in lockstep, which the emulator's lanes do not (llama.cpp's flash
    attention), so the detector reports races Metal never shows; with it, `lockstep=True` (checked
    and traced modes) resumes the lanes in turn at each threadgroup access, so such code reads
    what Metal's lanes read."""

    def __init__(self, source: str, *, headers: Path | str | None = None, device=None, timeout=None, mode=None,
                 races: bool = True, lockstep: bool = False):
        self.source = source
        self.races = races
        self.lockstep = lockstep
        if lockstep and races:
            raise MetalforgeError("emulator: lockstep lanes need races=False (the race detector judges each "
                                  "access by its barrier interval, which lockstep does not change)")
        self._headers = Path(headers) if headers is not None else None
        self.device = device
        self.timeout = timeout
        self.mode = mode or ("checked" if environment.checked() else "plain")
        if self.mode not in MODES:
            raise MetalforgeError(f"emulator: mode must be one of {', '.join(MODES)}, got {mode!r}")

    @functools.cached_property
    def msl(self) -> str:
        """The flattened source: what the front end checks and the compiler sees."""
        text = _KERNEL_KEYWORD.sub("[[kernel]]", flatten(self.source, self._headers))
        return drop_space_overloads(_filled(text))

    @functools.cached_property
    def kernels(self) -> dict[str, KernelFunction]:
        return kernel_functions(self.msl)

    @functools.cached_property
    def instances(self) -> dict[str, Instantiation]:
        return instantiations(self.msl)

    @functools.cached_property
    def constants(self) -> dict[str, tuple[int, str]]:
        return function_constants(self.msl)

    def host_names(self) -> list[str]:
        plain = [k.name for k in self.kernels.values() if not k.template]
        return sorted(plain + list(self.instances))

    def check(self) -> None:
        """The conformance front end over the whole library (every instantiation at once)."""
        _facts(self.msl, "library", frozenset(self.kernels))

    def function(self, host_name: str, constants: dict | None = None,
                 threadgroup_memory: dict[int, int] | None = None) -> "LibraryFunction":
        """The kernel with this host name, specialised for `constants` (by index or name; a
        constant not given reads as zero and its conditional buffers are optional) and, for its
        `threadgroup T* p [[threadgroup(n)]]` arguments, `threadgroup_memory` {n: bytes} (what
        the host sets with setThreadgroupMemoryLength:atIndex:)."""
        values = self._constant_values(constants or {})
        if host_name in self.instances:
            inst = self.instances[host_name]
            fn = self.kernels.get(inst.function)
            callee = f"{inst.function}<{inst.arguments}>"
        elif host_name in self.kernels and not self.kernels[host_name].template:
            inst, fn, callee = None, self.kernels[host_name], host_name
        else:
            known = ", ".join(self.host_names()[:8]) or "none"
            raise MetalforgeError(f"emulator: the library has no kernel named `{host_name}` (host names: {known}"
                                  f"{', ...' if len(self.host_names()) > 8 else ''})")
        if fn is None:
            raise MetalforgeError(f"emulator: `{host_name}` instantiates `{inst.function}`, which is not a [[kernel]] "
                                  "function of the library")
        if fn.problem:
            raise MetalforgeError(fn.problem)
        arenas = [p for p in fn.params if p.binding == "threadgroup"]
        missing = [p for p in arenas if p.index not in (threadgroup_memory or {})]
        if missing:
            raise MetalforgeError(f"emulator: kernel `{host_name}` takes threadgroup memory `{missing[0].name}` at "
                                  f"threadgroup({missing[0].index}): give its length in bytes, "
                                  f"threadgroup_memory={{{missing[0].index}: bytes}}")
        msl = _arguments_in_scope(self._specialised(inst, values, host_name), fn, arenas, threadgroup_memory or {})
        fn = dataclasses.replace(fn, params=tuple(p for p in fn.params if p.binding != "threadgroup"))
        return LibraryFunction(self, host_name, fn, callee, msl, values)

    def _constant_values(self, given: dict) -> dict[str, object]:
        by_index = {index: name for name, (index, _) in self.constants.items()}
        values = {}
        for key, value in given.items():
            name = by_index.get(key) if isinstance(key, int) else key if key in self.constants else None
            if name is None:
                declared = ", ".join(f"{i} {n}" for n, (i, _) in sorted(self.constants.items(), key=lambda x: x[1]))
                raise MetalforgeError(f"emulator: function constant {key!r} is not declared in this library "
                                      f"(declared: {declared or 'none'})")
            values[name] = value
        return values

    def _specialised(self, chosen: Instantiation | None, values: dict[str, object], name: str = "") -> str:
        """The source for one function: the other instantiations and plain kernels left out (blank
        lines keep the line numbers; a plain kernel `name` is kept), each function constant given its value."""
        text = self.msl
        spans = [inst.span for inst in self.instances.values() if inst is not chosen]
        spans += [span for k, span in _plain_kernel_spans(text).items() if k != name]
        for a, b in sorted(spans, reverse=True):
            text = text[:a] + "\n" * text.count("\n", a, b) + text[b:]

        def constant(m):
            ctype, name = m.group(1), m.group(2)
            return f"constant {ctype} {name} = {_literal(ctype, values.get(name, 0))};"
        return _CONSTANT.sub(constant, text)



def _plain_kernel_spans(msl: str) -> dict[str, tuple[int, int]]:
    """Where each non-template kernel is defined, its attributes to its closing brace."""
    out = {}
    for m in _KERNEL.finditer(msl):
        start = max(msl.rfind(c, 0, m.start()) for c in ";{}") + 1
        if re.search(r"\btemplate\s*<", re.sub(r"(?m)^\s*#.*$", "", msl[start:m.start()])):
            continue
        depth, end = 0, msl.index("{", _closing(msl, m.end() - 1))
        for end in range(end, len(msl)):
            depth += {"{": 1, "}": -1}.get(msl[end], 0)
            if depth == 0:
                break
        out[m.group(1)] = (start, end + 1)
    return out


def _arguments_in_scope(msl: str, fn: KernelFunction, arenas: list[Param], lengths: dict[int, int]) -> str:
    """The kernel's `threadgroup T* p [[threadgroup(n)]]` arguments as arrays of the host's length
    declared at the top of its body (`threadgroup T p[bytes / sizeof(T)];`), which the emulator
    runs as any threadgroup array; line numbers kept."""
    if not arenas:
        return msl
    m = next(m for m in _KERNEL.finditer(msl) if m.group(1) == fn.name)
    close = _closing(msl, m.end() - 1)
    params = msl[m.end():close]
    kept, pieces, start, depth = [], [], 0, 0
    for i, ch in enumerate(params + ","):
        depth += (ch in "([<{") - (ch in ")]>}")
        if ch == "," and depth == 0:
            pieces.append(params[start:i])
            start = i + 1
    names = {p.name for p in arenas}
    for piece in pieces:
        decl = _ATTR.sub("", piece)
        words = re.findall(r"[A-Za-z_]\w*", decl)
        kept.append("\n" * piece.count("\n") if words and words[-1] in names else piece)
    body = msl.index("{", close)
    declared = []
    for p in arenas:
        element = re.sub(r"\b(threadgroup|const)\b|\*", " ", p.declaration[:p.declaration.rfind(p.name)]).strip()
        # Metal takes lengths in multiples of 16 bytes; a zero length (an argument the kernel leaves
        # unused) still gets 16, C++ having no empty array
        length = max(16, -(-int(lengths[p.index]) // 16) * 16)
        declared.append(f"threadgroup {element} {p.name}[{length} / sizeof({element})];")
    joined = ",".join(k for k in kept if k.strip()) + "\n" * sum(k.count("\n") for k in kept if not k.strip())
    return msl[:m.end()] + joined + msl[close:body + 1] + " " + " ".join(declared) + msl[body + 1:]


@functools.lru_cache(maxsize=64)
def _facts(msl: str, name: str, kernels: frozenset[str]) -> conformance.Facts:
    # [[threadgroup(n)]] is an attribute, not the address-space keyword the front end's header defines
    return frontend.check(_THREADGROUP_ATTRIBUTE.sub("[[mf_threadgroup(", msl), name, kernels, library=True)


class LibraryFunction:
    """One kernel of a library, specialised for its function constants: call it with buffers by
    index and a grid of threadgroups (Metal's dispatchThreadgroups)."""

    def __init__(self, library: Library, host_name: str, fn: KernelFunction, callee: str, msl: str, constants: dict):
        self.library, self.host_name, self.fn, self.callee, self.msl = library, host_name, fn, callee, msl
        self.constants = constants
        self.last_stats: dict = {}
        self.last_trace: trace.Trace | None = None

    def _order(self) -> list[Param]:
        """The host array's order: read-only buffers, then written ones (the runtime copies those back)."""
        params = [p for p in self.fn.params if p.binding == "buffer"]
        return [p for p in params if not p.writable] + [p for p in params if p.writable]

    @functools.cached_property
    def _program(self):
        facts = _facts(self.msl, self.host_name, frozenset(self.library.kernels))
        # [[threadgroup(n)]] on a helper's parameter (steel's GEMM) is an attribute, not the keyword macro
        checked = self.library.mode != "plain"
        text = _THREADGROUP_ATTRIBUTE.sub("[[mf_threadgroup(", rewrite(self.msl, checked, facts))
        if checked:   # steel's pointer_element<T*> traits, for the checked pointers that stand for T*
            text = _POINTER_ELEMENT.sub(lambda m: m.group(0) + _CHECKED_POINTER_ELEMENT, text, count=1)
        unit = (f'#line 1 "{self.host_name}.metal"\n' + text
                + _launcher(self.host_name, self.callee, self.fn, self._order()))
        lib, path = compiler.build(unit, self.host_name, checked, library=True, traced=self.library.mode == "traced")
        sizes = np.zeros(max(1, len(self._order())), dtype=np.uint64)
        got = lib.launch("mf_element_bytes", [runner.Arg(sizes, output=True)], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                         workers=1, checked=False, timeout_s=environment.compile_timeout_s())
        if got.rc != 0:
            raise EmulatorError(f"{self.host_name}: " + "; ".join(got.errors))
        return lib, path, [int(b) for b in sizes[:len(self._order())]]

    def prepare(self) -> None:
        """Check and compile now (thread-safe): for compiling many functions in parallel."""
        self._program  # noqa: B018

    def __call__(self, *, buffers: dict, threadgroup, threadgroups=None, threads=None) -> None:
        """Run the kernel over `threadgroups` (a count per dimension) of `threadgroup` threads
        (dispatchThreadgroups), or over `threads` threads with partial threadgroups at the edges
        (dispatchThreads, what mx.fast.metal_kernel's grid means). Buffers are numpy arrays
        (written in place when the kernel writes them), MLX arrays (read only), bytes, or Python
        numbers for scalar arguments (`const constant int& n`)."""
        tg = tuple(int(t) for t in threadgroup)
        if (threadgroups is None) == (threads is None):
            raise ValueError("give threadgroups (dispatchThreadgroups) or threads (dispatchThreads), one of them")
        if threads is not None:
            grid = tuple(int(t) for t in threads)
            tg = tuple(min(t, g) for t, g in zip(tg, grid))
            groups = tuple(-(-g // t) for g, t in zip(grid, tg))
        else:
            groups = tuple(int(g) for g in threadgroups)
            grid = tuple(g * t for g, t in zip(groups, tg))
        if len(groups) != 3 or len(tg) != 3 or min(groups) < 1 or min(tg) < 1:
            raise ValueError(f"the grid and threadgroup must be three positive integers, got {groups} and {tg}")
        limits = device_limits(self.library.device)
        tg_size = tg[0] * tg[1] * tg[2]
        if tg_size > limits["max_threads_per_threadgroup"]:
            raise EmulatorError(f"Thread group size ({tg_size}) is greater than  the maximum allowed threads per "
                                f"threadgroup ({limits['max_threads_per_threadgroup']}).")
        lib, path, element_bytes = self._program
        tg_bytes = lib.threadgroup_bytes
        if tg_bytes > limits["threadgroup_memory_bytes"]:
            raise EmulatorError(f"Threadgroup memory size ({tg_bytes}) exceeds the maximum threadgroup memory "
                                f"allowed ({limits['threadgroup_memory_bytes']}) in kernel {self.host_name}")
        unknown = sorted(set(buffers) - {p.index for p in self.fn.params if p.binding == "buffer"})
        if unknown:
            raise MetalforgeError(f"emulator: kernel `{self.host_name}` has no buffer({unknown[0]})")
        args = []
        for p, elem in zip(self._order(), element_bytes):
            if p.index not in buffers:   # as in Metal, an unbound buffer is no error until the kernel reads it
                args.append(runner.Arg(None))
                continue
            data = _host_bytes(buffers[p.index], p, self.host_name)
            if data.nbytes < elem:
                raise MetalforgeError(f"emulator: buffer({p.index}) `{p.name}` of kernel `{self.host_name}` holds "
                                      f"{data.nbytes} bytes, less than one {p.scalar_type} ({elem} bytes)")
            # a written buffer keeps what it held (Metal's buffers are the caller's memory)
            args.append(runner.Arg(data, output=p.writable, initialised=True, count=data.nbytes // max(1, elem),
                                   itemsize=max(1, elem)))
        counts, entry = None, "mf_launch"
        if self.library.mode == "traced":
            counts, entry = trace.buffer(len(self._order())), "mf_launch_traced"
            args.append(runner.Arg(counts, output=True))
        timeout = self.library.timeout if self.library.timeout is not None else environment.timeout_s()
        launched = lib.launch(entry, args, grid=grid, threadgroup=tg, workers=environment.threads(),
                              checked=0 if self.library.mode == "plain" else 1 if self.library.races
                              else 3 if self.library.lockstep else 2,
                              timeout_s=timeout)
        self.last_stats = launched.stats
        if launched.rc != 0:
            raise EmulatorError(_with_lines(launched.errors, path, self.host_name))
        if counts is not None:
            names = {i: p.name for i, p in enumerate(self._order())}
            self.last_trace = trace.summarize(counts, names, self.last_stats, groups[0] * groups[1] * groups[2],
                                              tg_bytes)


_PYTHON_SCALARS = {"int": np.int32, "int32_t": np.int32, "uint": np.uint32, "uint32_t": np.uint32,
                   "unsigned": np.uint32, "int64_t": np.int64, "uint64_t": np.uint64, "size_t": np.uint64,
                   "long": np.int64, "float": np.float32, "bool": np.bool_, "short": np.int16,
                   "ushort": np.uint16, "int16_t": np.int16, "uint16_t": np.uint16}


def _host_bytes(value, p: Param, kernel: str) -> np.ndarray:
    """A bound value as a numpy array whose memory the kernel sees."""
    if isinstance(value, np.ndarray):
        if p.writable and not (value.flags.c_contiguous and value.flags.writeable):
            raise MetalforgeError(f"emulator: buffer({p.index}) `{p.name}` of kernel `{kernel}` is written by the "
                                  "kernel: bind a writable C-contiguous numpy array")
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)
    if p.writable:
        raise MetalforgeError(f"emulator: buffer({p.index}) `{p.name}` of kernel `{kernel}` is written by the kernel: "
                              f"bind a numpy array (got {type(value).__name__})")
    if isinstance(value, mx.array):
        value = mx.contiguous(value)
        return np.array(value.view(mx.uint16) if value.dtype == mx.bfloat16 else value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(value), dtype=np.uint8).copy()
    if isinstance(value, np.generic):
        return np.array(value)
    if isinstance(value, (bool, int, float)) and p.scalar_type in _PYTHON_SCALARS:
        return np.array(value, dtype=_PYTHON_SCALARS[p.scalar_type])
    raise MetalforgeError(f"emulator: buffer({p.index}) `{p.name}` of kernel `{kernel}` cannot take a "
                          f"{type(value).__name__}: bind a numpy array, an MLX array or bytes")


def run_custom_kernel(kernel, *, headers, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                      init_value=None, mode: str = "traced"):
    """Run an `mx.fast.metal_kernel` kernel (`kernel` has its name, input_names, output_names and
    source) as the one-kernel library MLX generates for it (MLX's utils.h, from the `headers` root,
    included first, as MLX does), in `mode`; returns its outputs and the function, whose
    `last_trace` a traced run fills."""
    import mlx.core as mx

    from .kernel import NUMPY_DTYPES, _as_array, _numpy_view, _to_mlx
    from .source import InputInfo, buffer_plan, mlx_kernel_name, mlx_source
    arrays = [_as_array(x) for x in inputs]
    arrays = [mx.contiguous(a) if a.ndim else a for a in arrays]
    source = kernel.source
    infos = [InputInfo(n, a.dtype, a.ndim, a.size, f"{n}_shape" in source, f"{n}_strides" in source,
                       f"{n}_ndim" in source) for n, a in zip(kernel.input_names, arrays)]
    template = list(template or [])
    kname = mlx_kernel_name(kernel.name, template, infos, output_dtypes)
    plan = buffer_plan(infos, kernel.output_names, output_dtypes, False)
    msl = mlx_source(kname, getattr(kernel, "header", ""), source, plan, template)
    fn = Library('#include "mlx/backend/metal/kernels/utils.h"\n' + msl, headers=headers, mode=mode).function(kname)
    views = {n: _numpy_view(a) for n, a in zip(kernel.input_names, arrays)}
    outs = {n: np.full(tuple(s), init_value or 0, dtype=NUMPY_DTYPES[d])
            for n, s, d in zip(kernel.output_names, output_shapes, output_dtypes)}
    meta = {"shape": lambda v: np.array(v.shape, np.int32), "ndim": lambda v: np.array(v.ndim, np.int32),
            "strides": lambda v: np.array([s // v.itemsize for s in v.strides], np.int64)}
    buffers = {i: outs[b.of] if b.role == "output" else views[b.of] if b.role in ("input", "scalar")
               else meta[b.role](views[b.of]) for i, b in enumerate(plan)}
    fn(buffers=buffers, threads=grid, threadgroup=threadgroup)
    return [_to_mlx(outs[n], d) for n, d in zip(kernel.output_names, output_dtypes)], fn
