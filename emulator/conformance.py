"""The conformance front end: what Apple's Metal compiler refuses, the emulator refuses first.

The emulator compiles MSL as C++, which accepts much that Metal does not. Before a kernel is
compiled, clang (the `libclang` wheel) parses its full generated source (header, MLX's signature,
body) against the emulator's own metal_compat.h, with Metal's address spaces turned into type tags
it can read back, and the AST is checked against the MSL specification's restrictions. Each
refusal names the kernel, the MSL line and the rule with its section of the specification
(Metal Shading Language Specification 3.2). It is the source of Metal's error messages, not a
security boundary: it runs in a process of its own (frontend.py), and what it cannot see runs only
inside a sandboxed worker (runner.py, docs/emulator.md).
"""
from __future__ import annotations

import atexit
import bisect
import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

from metalforge import signals

from .compiler import CompileError, cache_dir
from .source import METAL_HEADERS, compat_header

SPEC = "MSL 3.2"


@dataclass(frozen=True)
class Rule:
    what: str      # the construct, as a user would name it
    reason: str    # the specification's reason
    section: str   # where the specification says so


RULES = {
    "lambda": Rule("a lambda expression", "lambda expressions are not available in Metal", "§1.5.4 Restrictions"),
    "recursion": Rule("a recursive call", "recursive function calls are not available in Metal (from MSL 2.4 only "
                      "through [[visible]] functions in function tables, which a custom kernel cannot link)",
                      "§1.5.4 Restrictions"),
    "dynamic_cast": Rule("dynamic_cast", "the dynamic_cast operator is not available in Metal", "§1.5.4 Restrictions"),
    "typeid": Rule("typeid", "type identification is not available in Metal", "§1.5.4 Restrictions"),
    "new_delete": Rule("new or delete", "the new and delete operators are not available in Metal (a GPU thread has "
                       "no heap)", "§1.5.4 Restrictions"),
    "goto": Rule("goto", "the goto statement is not available in Metal", "§1.5.4 Restrictions"),
    "storage": Rule("a register or thread_local variable", "the register and thread_local storage attributes are "
                    "not available in Metal", "§1.5.4 Restrictions"),
    "virtual": Rule("a virtual function", "the virtual function specifier is not available in Metal",
                    "§1.5.4 Restrictions"),
    # §1.5.4 lists derived classes, but Apple's compiler takes plain inheritance (Metal's own type
    # traits and MLX's steel headers derive from integral_constant); a virtual base needs what a
    # virtual function needs, which Metal has not
    "derived": Rule("a virtual base class", "virtual functions and derived classes are not available in Metal",
                    "§1.5.4 Restrictions"),
    "exceptions": Rule("exception handling", "exception handling (try, catch, throw) is not available in Metal",
                       "§1.5.4 Restrictions"),
    "std": Rule("the C++ standard library", "the C++ standard library must not be used in Metal; Metal has its own "
                "standard library (metal::)", "§1.5.4 Restrictions"),
    "libc": Rule("the C library", "the C library is not part of Metal: a kernel can call only the Metal standard "
                 "library and functions defined in its own source", "§1.5.4 Restrictions"),
    "undefined": Rule("a function declared but not defined", "Metal compiles a custom kernel's source on its own and "
                      "links nothing with it, so every function it calls is Metal's or defined in the source",
                      "§1.5.4 Restrictions"),
    "double": Rule("double", "Metal has no double or long double type", "§2.1 Scalar Data Types"),
    "asm": Rule("inline assembly", "inline assembly is not part of the Metal Shading Language", "§1.5 Metal and C++14"),
    "builtin": Rule("a compiler builtin", "__builtin_ functions are the host compiler's, not Metal's", "§1.5.4 Restrictions"),
    "include": Rule("an #include of a non-Metal header", "only Metal's own headers (metal_stdlib, ...) are available "
                    "to a kernel; the C++ standard library must not be used", "§1.5.4 Restrictions"),
    "read_only": Rule("a write to read-only memory", "the constant address space is read-only, and a const device "
                      "pointer's pointee cannot be modified", "§4.2 Constant Address Space"),
    "space_cast": Rule("a conversion between address spaces", "a pointer to one address space cannot be converted "
                       "to a pointer to another", "§4 Address Spaces"),
    "no_space": Rule("a pointer without an address space", "pointers must be declared with an address space "
                     "attribute (device, constant, threadgroup or thread)", "§1.5.4 Restrictions and §4 Address Spaces"),
    "function_pointer": Rule("a function pointer", "function pointers are not supported (from MSL 2.3 only to "
                             "[[visible]] functions, which a custom kernel cannot link)", "§1.5.4 Restrictions"),
    "threadgroup_scope": Rule("a threadgroup variable outside kernel function scope", "threadgroup variables can be "
                              "declared only in the kernel function's own scope, not in nested blocks, other functions "
                              "or at program scope", "§4.4 Threadgroup Address Space"),
    "threadgroup_init": Rule("an initialised threadgroup variable", "threadgroup variables cannot be initialised "
                             "where they are declared", "§4.4 Threadgroup Address Space"),
    "program_scope": Rule("a program-scope variable outside the constant address space", "variables at program scope "
                          "(and static variables) must be declared in the constant address space", "§4.2 Constant Address Space"),
}

# Names of the C library (and POSIX) a kernel might try; none of them exists in Metal.
C_LIBRARY = frozenset("""printf fprintf sprintf snprintf vprintf puts putchar fputs fwrite fread fopen fclose fflush
fseek ftell remove rename tmpfile malloc calloc realloc free aligned_alloc system exit _exit abort atexit getenv
setenv popen pclose fork vfork execl execlp execle execv execvp execve kill raise signal open close read write
unlink mkdir rmdir chdir dlopen dlsym mmap munmap mprotect syscall pthread_create time clock rand srand memcpy
memmove memset memcmp strlen strcpy strncpy strcmp strcat sleep usleep socket connect""".split())

_TOKEN_RULES = {"double": "double", "goto": "goto", "thread_local": "storage", "register": "storage",
                "virtual": "virtual", "try": "exceptions", "catch": "exceptions", "throw": "exceptions",
                "typeid": "typeid", "dynamic_cast": "dynamic_cast", "asm": "asm", "__asm__": "asm", "__asm": "asm"}


class ConformanceError(CompileError):
    """The kernel uses something Metal does not allow; the message cites the MSL specification."""


@dataclass(frozen=True)
class Refusal:
    rule: str
    line: int
    detail: str = ""


@dataclass(frozen=True)
class Facts:
    """What the rewrite into C++ needs from the front end."""
    threadgroup_declarations: int                  # threadgroup variables in kernel functions
    constant_declarations: tuple[tuple[int, int], ...]   # (line, column) of program-scope `constant` to make const


MSL_FILE = "/metalforge/kernel.metal"
_MAIN = "/metalforge/main.cpp"
_HEADER = "/metalforge/metal_compat.h"
_ARGS = ["-x", "c++", "-std=c++17", "-nostdinc", "-nostdinc++", "-DMF_FRONTEND", "-fno-exceptions",
         "-I/metalforge", "-Wno-ignored-attributes", "-Wno-unknown-attributes", "-Wno-duplicate-decl-specifier"]
_lock = threading.Lock()   # libclang's Python binding is not documented as thread-safe


@lru_cache(maxsize=1)
def _index():
    try:   # loaded on the first check: the libclang binding costs start-up time for users of the rest
        from clang import cindex
    except ImportError as e:   # a dependency; this only happens in a broken install
        raise CompileError("emulator: the conformance front end needs the libclang wheel (pip install libclang)") from e
    atexit.register(_index.cache_clear)   # dispose of the index before the binding's library is torn down
    return cindex, cindex.Index.create()


@lru_cache(maxsize=2)
def _pch_name(library: bool = False) -> str:
    key = hashlib.sha256("\0".join([compat_header(False, library), metadata.version("libclang"), *_ARGS]).encode())
    return f"frontend-{key.hexdigest()[:16]}.pch"


def _precompiled_header(library: bool = False) -> list[str]:
    """metal_compat.h parsed once into a clang PCH in the cache (keyed by header, flags and
    libclang version): parsing it is most of a small kernel's front-end time (24 ms of 30).
    Looked for on every check: the cache folder may change or be cleared while we run."""
    cindex, index = _index()
    path = cache_dir() / _pch_name(library)
    if not path.exists():
        tu = index.parse(_HEADER, args=["-x", "c++-header", *_ARGS[2:]],
                         unsaved_files=[(_HEADER, compat_header(False, library))])
        if any(d.severity >= 3 for d in tu.diagnostics):   # cannot happen with our own header; parse it each time
            return []
        with tempfile.TemporaryDirectory(dir=path.parent, prefix="frontend-build-") as tmp:
            tu.save(f"{tmp}/pch")   # renamed into place: a concurrent process never reads half a file
            os.replace(f"{tmp}/pch", path)
    return ["-include-pch", str(path)]


def check(msl: str, kernel_name: str, kernel_functions: frozenset[str] = frozenset(), library: bool = False) -> Facts:
    """Refuse what Metal refuses (ConformanceError naming rule, section and line); otherwise return
    the facts the C++ rewrite needs. `kernel_functions`: a full library's [[kernel]] functions (a
    custom kernel has one, `kernel_name`); `library`: parse against the library's header variant."""
    cindex, index = _index()
    # clang recurses without end on a type tag over an array whose size a template decides
    # (threadgroup float buf[TG]): threadgroup arrays are marked by a same-length keyword instead
    parsed = _TG_ARRAY.sub("mf_tg_array", msl)
    # ... and instantiating a template whose pointers' tags depend on its arguments (`const device T*`)
    # crashes libclang the same way: explicit instantiations are left out (spaces keep the line
    # numbers and offsets); the templates themselves are checked, and the C++ compile instantiates them
    parsed = _INSTANTIATION.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), parsed)
    # ... with the `typedef decltype(f<..>) f_t;` they are written over (llama.cpp), which instantiates too
    parsed = _DECLTYPE_TYPEDEF.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), parsed)
    # ... and a tag on a member function's `this` (`operator U() const thread`, MLX's complex_t) sends
    # clang into endless recursion when the class is instantiated: `thread` is the default there anyway
    parsed = _THIS_THREAD.sub(lambda m: m.group(1) + " " * len(m.group(2)), parsed)
    # ... and so does a `constant` tag on a constexpr variable of a template's type (steel's
    # integral_constant: `static constexpr constant T value`): constexpr is read-only already
    parsed = _CONSTEXPR_CONSTANT.sub("const   ", parsed)
    # ... and so does instantiating, from a plain kernel (llama.cpp's), a template whose pointer or
    # reference tags a type parameter (`device const T*`, `constant args_t&`): those tags are left
    # out of the parse (a dependent pointer is not refused for its space; the compile checks it)
    parsed = _untag_dependent(parsed)
    with _lock, signals.held():   # the walk runs in ctypes callbacks, where an interrupt would be lost
        pch = _precompiled_header(library)
        include = "" if pch else '#include "metal_compat.h"\n'
        files = [(_MAIN, f'{include}#define mf_tg_array\n#include "{MSL_FILE}"\n'),
                 (_HEADER, compat_header(False, library)), (MSL_FILE, parsed),
                 *((f"/metalforge/{h}", "") for h in METAL_HEADERS)]
        tu = index.parse(_MAIN, args=_ARGS + pch, unsaved_files=files,
                         options=cindex.TranslationUnit.PARSE_DETAILED_PROCESSING_RECORD)
        walker = _Walker(cindex, tu, kernel_name, msl, kernel_functions | {kernel_name})
        refusals = walker.run()
    if refusals:
        raise ConformanceError(_message(kernel_name, msl, refusals))
    return Facts(walker.threadgroup_declarations, tuple(walker.constant_tokens))


def _message(kernel_name: str, msl: str, refusals: list[Refusal]) -> str:
    lines = msl.splitlines()
    out = [f"emulator: kernel `{kernel_name}` uses what Metal does not allow (lines of its generated MSL; "
           "verbose=True prints it):"]
    seen = set()
    for r in sorted(refusals, key=lambda r: r.line):
        if (r.rule, r.line) in seen:
            continue
        seen.add((r.rule, r.line))
        rule = RULES[r.rule]
        text = lines[r.line - 1].strip() if 0 < r.line <= len(lines) else ""
        detail = f" ({r.detail})" if r.detail else ""
        out.append(f"  line {r.line}: {rule.what}{detail}: {rule.reason} [{SPEC} {rule.section}]\n      {text}")
        if len(seen) == 8:
            break
    return "\n".join(out)


_SPACE = re.compile(r'btf_type_tag\("(\w+)"\)')
_OBJECT_MACRO = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+([^\n]*)$", re.M)
_THIS_THREAD = re.compile(r"(\)\s*(?:const\s+)?)(thread)(?=\s*(?:[{:;=]|const\b|noexcept\b))")
_CONSTEXPR_CONSTANT = re.compile(r"\bconstant\b(?=\s+constexpr\b)|(?<=\bconstexpr )constant\b")
_INSTANTIATION = re.compile(r"\btemplate\s*\[\[[^;{}]*;")
_DECLTYPE_TYPEDEF = re.compile(r"\btypedef\s+decltype\s*\([^;{}]*;")
# an array's `[` (not an attribute's `[[`), before any `*` or `=` (an array of pointers, an initialiser's index)
_TG_ARRAY = re.compile(r"\bthreadgroup\b(?=[^;(){}\[*=]*\[(?!\[))")
# a call's explicit template arguments, `f<N, constant A&>(` (not a cast's, `reinterpret_cast<..>(`)
_CALL_ARGUMENTS = re.compile(r"\b(?!(?:reinterpret|static|const|dynamic|as_type)_cast\b)[A-Za-z_]\w*\s*<([^<>;{}()]*)>\s*\(")
_TAG = re.compile(r"\b(?:device|constant|thread|threadgroup)\b(?=(?:\s+const)?\s+[A-Za-z_][\w:]*\s*(?:const\s*)?[*&])")
_TEMPLATE_HEAD = re.compile(r"\btemplate\s*<([^<>;{}]*(?:<[^<>;{}]*>[^<>;{}]*)*)>")


def _untag_dependent(msl: str) -> str:
    """Address-space words before a template type parameter's pointer or reference blanked."""
    names = {m.group(1) for head in _TEMPLATE_HEAD.finditer(msl)
             for m in re.finditer(r"\b(?:typename|class)\s+([A-Za-z_]\w*)", head.group(1))}
    blank = lambda m: " " * len(m.group(0))  # noqa: E731
    # a tagged type as a call's template argument: `f<constant A&>(..)`
    msl = _CALL_ARGUMENTS.sub(lambda m: m.group(0)[:m.start(1) - m.start()] + _TAG.sub(blank, m.group(1))
                              + m.group(0)[m.end(1) - m.start():], msl)
    if not names:
        return msl
    tagged = re.compile(r"\b(?:device|constant|thread|threadgroup)\b(?=(?:\s+const)?\s+(?:"
                        + "|".join(sorted(map(re.escape, names))) + r")\s*(?:const\s*)?[*&])")
    return tagged.sub(blank, msl)


class _Walker:
    """One pass over the kernel file's AST, tokens and diagnostics."""

    def __init__(self, cindex, tu, kernel_name: str, msl: str, kernel_functions: frozenset[str]):
        self.ci, self.tu, self.kernel_name, self.msl = cindex, tu, kernel_name, msl
        self.kernel_functions = kernel_functions
        # object-like macros of the source (MLX's `#define MLX_MTL_CONST static constant constexpr const`):
        # a declaration's keywords may come from one
        self.macros = {m.group(1): m.group(2).split() for m in _OBJECT_MACRO.finditer(msl)}
        self.K = cindex.CursorKind
        self.refusals: list[Refusal] = []
        self.threadgroup_declarations = 0
        self.constant_tokens: list[tuple[int, int]] = []
        self.calls: dict[str, set[str]] = {}
        self.lines: dict[str, int] = {}

    def refuse(self, rule: str, line: int, detail: str = "") -> None:
        self.refusals.append(Refusal(rule, line, detail))

    def run(self) -> list[Refusal]:
        f = self.tu.get_file(MSL_FILE)
        extent = self.ci.SourceRange.from_locations(self.ci.SourceLocation.from_offset(self.tu, f, 0),
                                                     self.ci.SourceLocation.from_offset(self.tu, f, len(self.msl.encode())))
        # (start offset, end offset, spelling, line, column), read once and with one libclang call
        # per token (each costs): lines and columns come from the offset and the file's line starts
        data = self.msl.encode()
        line_starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
        self.file_tokens = []
        for t in self.tu.get_tokens(extent=extent):
            start, spelling = t.location.offset, t.spelling
            line = bisect.bisect_right(line_starts, start)
            self.file_tokens.append((start, start + len(spelling.encode()), spelling, line,
                                     start - line_starts[line - 1] + 1))
        self.token_starts = [t[0] for t in self.file_tokens]
        self._diagnostics()
        if any(r.rule == "include" for r in self.refusals):
            return self.refusals   # clang stopped at the include: what follows is noise
        self._includes()
        mine = [c for c in self.tu.cursor.get_children() if _in_kernel(c)]
        for c in mine:
            self._visit(c, [])
        self._tokens()
        self._recursion()
        return self.refusals

    # ---- what clang itself reports ------------------------------------------------------------
    def _diagnostics(self) -> None:
        for d in self.tu.diagnostics:
            if d.severity < 3 or not d.location.file or d.location.file.name != MSL_FILE:
                continue
            text, line = d.spelling, d.location.line
            ident = re.search(r"undeclared identifier '(\w+)'|'(\w+)' is not a class, namespace", text)
            name = ident and (ident.group(1) or ident.group(2))
            if name == "std":
                self.refuse("std", line, "std::")
            elif name in C_LIBRARY:
                self.refuse("libc", line, name)
            elif "not assignable" in text or "const-qualified type" in text:
                self.refuse("read_only", line)
            elif "poisoned" in text:
                self.refuse("asm" if "asm" in text else "builtin", line)
            elif "file not found" in text or "cannot open file" in text:   # the latter: outside its sandbox
                self.refuse("include", line, text.split("'")[1] if "'" in text else "")

    def _includes(self) -> None:
        for inc in self.tu.get_includes():
            if inc.source and inc.source.name == MSL_FILE:
                name = inc.include.name
                if not any(name == f"/metalforge/{h}" for h in METAL_HEADERS):
                    self.refuse("include", inc.location.line, name.rsplit("/", 1)[-1])

    # ---- tokens: keywords Metal does not have ---------------------------------------------------
    def _tokens_of(self, c) -> list:
        """A cursor's source tokens (libclang's own get_tokens is empty when a macro starts the extent)."""
        lo, hi = c.extent.start.offset, c.extent.end.offset
        first = bisect.bisect_left(self.token_starts, lo)
        last = bisect.bisect_right(self.token_starts, hi)
        inside = [t for t in self.file_tokens[first:last] if t[1] <= hi]
        # an empty macro (mf_tg_array) that starts a declaration is left out of its extent
        before = self.file_tokens[first - 1:first] if first > 0 else []
        return [t for t in before if t[2] == "mf_tg_array"] + inside

    def _tokens(self) -> None:
        for _, _, s, line, _ in self.file_tokens:
            if s in _TOKEN_RULES:
                self.refuse(_TOKEN_RULES[s], line)
            elif s.startswith("__builtin_") or s.startswith("__sync_") or s.startswith("__atomic_"):
                self.refuse("builtin", line, s)
            elif s == "std":
                self.refuse("std", line, "std::")

    # ---- the AST --------------------------------------------------------------------------------
    def _visit(self, c, parents: list) -> None:
        K, kind, line = self.K, c.kind, c.location.line
        if kind == K.LAMBDA_EXPR:
            self.refuse("lambda", line)
        elif kind in (K.CXX_NEW_EXPR, K.CXX_DELETE_EXPR):
            self.refuse("new_delete", line)
        elif kind == K.CXX_BASE_SPECIFIER and any(t[2] == "virtual" for t in self._tokens_of(c)):
            self.refuse("derived", line)
        elif kind == K.CXX_METHOD and c.is_virtual_method():
            self.refuse("virtual", line)
        elif kind == K.LINKAGE_SPEC:
            self.refuse("undefined", line, 'extern "C"')
        elif kind == K.NAMESPACE_REF and c.spelling == "std":
            self.refuse("std", line, "std::")
        elif kind in (K.FUNCTION_DECL, K.FUNCTION_TEMPLATE, K.CXX_METHOD):
            self._function(c)
        elif kind in (K.VAR_DECL, K.PARM_DECL, K.FIELD_DECL):
            self._declaration(c, parents)
        elif kind in (K.CSTYLE_CAST_EXPR, K.CXX_REINTERPRET_CAST_EXPR, K.CXX_STATIC_CAST_EXPR, K.CXX_CONST_CAST_EXPR):
            kids = list(c.get_children())
            if kids:
                self._conversion(c.type, _source_expr(self.K, kids[-1]), line)
        elif kind == K.CALL_EXPR and parents:
            ref = c.referenced
            fn = next((p for p in reversed(parents) if p.kind in (K.FUNCTION_DECL, K.FUNCTION_TEMPLATE, K.CXX_METHOD)), None)
            if ref is not None and fn is not None:
                self.calls.setdefault(fn.get_usr(), set()).add(_usr(ref))
            if ref is not None and ref.kind in (K.FUNCTION_DECL, K.CXX_METHOD) and _in_kernel(ref):
                # a pointer passed to a parameter of another address space: Metal has no such
                # implicit conversion (no overload matches). The kernel's own functions only: the
                # emulator's header declares Metal's overloads once, without address spaces
                for param, arg in zip(ref.get_arguments(), c.get_arguments()):
                    self._conversion(param.type, _source_expr(K, arg), arg.location.line or line)
        for child in c.get_children():
            self._visit(child, parents + [c])

    def _function(self, c) -> None:
        self.lines[c.get_usr()] = c.location.line
        self.calls.setdefault(c.get_usr(), set())
        if c.kind == self.K.FUNCTION_DECL and not c.is_definition() and c.get_definition() is None \
                and c.spelling not in self.kernel_functions:
            self.refuse("libc" if c.spelling in C_LIBRARY else "undefined", c.location.line, c.spelling)

    def _declaration(self, c, parents: list) -> None:
        K, t, line = self.K, c.type, c.location.line
        ptr = _resolve(self.ci, t)
        if ptr is not None and _kind(ptr) == "POINTER":
            pointee = ptr.get_pointee()
            if _kind(pointee) in ("FUNCTIONPROTO", "FUNCTIONNOPROTO"):
                self.refuse("function_pointer", line, c.spelling)
            elif _pointee_space(ptr) is None and not _dependent(pointee):
                self.refuse("no_space", line, c.spelling)
        if c.kind != K.VAR_DECL:
            return
        kids = list(c.get_children())
        init = next((k for k in kids if k.kind.is_expression()), None)
        if init is not None and ptr is not None and _kind(ptr) == "POINTER":
            self._conversion(t, _source_expr(K, init), line)
        own_tokens = self._tokens_of(c)
        # the keywords of `threadgroup float a[N], b[N];` belong to the whole statement
        statement = parents[-1] if parents and parents[-1].kind == K.DECL_STMT else c
        tokens = [word for tok in self._tokens_of(statement) for word in [tok[2], *self.macros.get(tok[2], ())]]
        # the variable's own space: clang keeps the tag on arrays, the keyword is in the source otherwise
        # (a pointer's tag is its pointee's space, so pointers are thread variables)
        # (an array of pointers too: `threadgroup float* rows[N]` is N thread pointers into threadgroup memory)
        space = None if ptr is not None or _pointer_array(self.ci, t) else _space(t) or next(
            ("threadgroup" if tok == "mf_tg_array" else tok for tok in tokens
             if tok in ("threadgroup", "mf_tg_array", "constant", "device")), None)
        scope = c.semantic_parent.kind if c.semantic_parent is not None else None
        at_program_scope = scope in (K.TRANSLATION_UNIT, K.NAMESPACE)
        if space == "threadgroup":
            body = parents[-2] if len(parents) >= 2 else None
            func = parents[-3] if len(parents) >= 3 else None
            in_kernel_scope = (body is not None and body.kind == K.COMPOUND_STMT and func is not None
                               and func.kind in (K.FUNCTION_DECL, K.FUNCTION_TEMPLATE)
                               and func.spelling in self.kernel_functions)
            if not in_kernel_scope:
                self.refuse("threadgroup_scope", line, c.spelling)
            else:
                self.threadgroup_declarations += 1
            if init is not None and "=" in tokens:
                self.refuse("threadgroup_init", line, c.spelling)
        elif at_program_scope or c.storage_class == self.ci.StorageClass.STATIC and scope not in _CLASSES(K):
            if space == "constant":
                if "const" not in tokens and "constexpr" not in tokens and "constant" in tokens:
                    tok = next(tok for tok in own_tokens if tok[2] == "constant")
                    if at_program_scope:
                        self.constant_tokens.append((tok[3], tok[4]))
            elif "constexpr" not in tokens:
                self.refuse("program_scope", line, c.spelling)

    def _conversion(self, to_type, source, line: int) -> None:
        """A pointer converted to another address space. Only explicit tags count: clang drops
        them through references, so an untagged source is unknown, never a mismatch."""
        from_type = source.type
        to_ptr, from_ptr = _resolve(self.ci, to_type), _resolve(self.ci, from_type)
        if to_ptr is None or _kind(to_ptr) != "POINTER":
            return
        if _kind(from_type) in ("CONSTANTARRAY", "INCOMPLETEARRAY"):   # an array decays to a pointer
            decl = source.referenced
            src = _space(from_type) or ("threadgroup" if decl is not None and any(
                t[2] in ("mf_tg_array", "threadgroup") for t in self._tokens_of(decl)) else None)
        elif from_ptr is not None and _kind(from_ptr) == "POINTER":
            src = _pointee_space(from_ptr)
        else:
            return
        dst = _pointee_space(to_ptr)
        if src is not None and src != (dst or "thread") and not _dependent(to_ptr.get_pointee()):
            self.refuse("space_cast", line, f"{src} to {dst or 'thread'}")

    def _recursion(self) -> None:
        """A cycle in the call graph of the kernel's own functions."""
        state: dict[str, int] = {}

        def visit(u: str) -> str | None:
            state[u] = 1
            for v in self.calls.get(u, ()):
                if v not in self.calls:
                    continue
                if state.get(v) == 1:
                    return v
                if state.get(v) is None:
                    found = visit(v)
                    if found:
                        return found
            state[u] = 2
            return None

        for u in list(self.calls):
            if state.get(u) is None:
                found = visit(u)
                if found:
                    self.refuse("recursion", self.lines.get(found, 0))
                    return


def _CLASSES(K) -> tuple:
    """Where a static variable is a class's member (MLX's STEEL_CONST), not a program-scope one."""
    return (K.STRUCT_DECL, K.CLASS_DECL, K.CLASS_TEMPLATE, K.CLASS_TEMPLATE_PARTIAL_SPECIALIZATION, K.UNION_DECL)


def _in_kernel(c) -> bool:
    return c.location.file is not None and c.location.file.name == MSL_FILE


def _usr(ref) -> str:
    """Calls to a template's specialisation name the template, so cycles through templates count."""
    tmpl = ref.canonical
    return tmpl.get_usr()


def _kind(t) -> str:
    """A type's kind by name; the wheel's binding lacks some of clang's newer kinds (_Float16)."""
    try:
        return t.kind.name
    except ValueError:
        return "UNKNOWN"


def _space(t) -> str | None:
    m = _SPACE.search(t.spelling)
    return m.group(1) if m else None


def _pointee_space(ptr) -> str | None:
    """clang spells the tag on the pointer type (`float __attribute__((btf_type_tag("device")))*`):
    the last tag before the outermost `*` is its pointee's address space."""
    tags = _SPACE.findall(ptr.spelling)
    return tags[-1] if tags else None


def _pointer_array(ci, t) -> bool:
    if not _kind(t).endswith("ARRAY"):
        return False
    element = _resolve(ci, t.element_type)
    return element is not None and _kind(element) == "POINTER"


def _dependent(t) -> bool:
    """A type the template's arguments decide (T*, auto): Metal checks it per instantiation."""
    s = t.spelling
    return _kind(t) in ("UNEXPOSED", "DEPENDENT", "TEMPLATETYPEPARM", "AUTO") or "type-parameter" in s


def _resolve(ci, t):
    """The pointer or array type behind typedefs and elaborated names, keeping address-space tags."""
    for _ in range(8):
        if _kind(t) == "ELABORATED":
            t = t.get_named_type()
        elif _kind(t) == "TYPEDEF":
            t = t.get_declaration().underlying_typedef_type
        else:
            break
    return t if _kind(t) in ("POINTER", "LVALUEREFERENCE") else None


def _source_expr(K, expr):
    """An expression before clang's implicit conversions (which keep tags' sugar off)."""
    while expr.kind in (K.UNEXPOSED_EXPR, K.PAREN_EXPR):
        kids = list(expr.get_children())
        if len(kids) != 1:
            break
        expr = kids[0]
    return expr
