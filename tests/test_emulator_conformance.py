"""The emulator accepts what Metal accepts: the conformance front end refuses each construct the MSL
specification rules out (test ids cite its section, MSL 3.2), with the reason and the kernel's own
line; host escapes are refused twice (front end, then a translation unit with no C library in it);
Metal constructs that used to fail run and match numpy; nothing valid is refused."""
import ast
import importlib
import inspect
import itertools
import pathlib
import sys

import mlx.core as mx
import numpy as np
import pytest

from metalforge import emulator
from metalforge.emulator import CompileError, compiler, conformance
from metalforge.emulator.conformance import RULES, ConformanceError
from metalforge.emulator.kernel import _translation_unit
from metalforge.emulator.source import InputInfo, buffer_plan, mlx_source

X64 = mx.arange(64).astype(mx.float32)


def run(body: str, header: str = "", inp=X64, out_dtype=mx.float32):
    k = emulator.metal_kernel(name="conf", input_names=["inp"], output_names=["out"], source=body, header=header)
    return k(inputs=[inp], grid=(inp.size, 1, 1), threadgroup=(min(32, inp.size), 1, 1),
             output_shapes=[(inp.size,)], output_dtypes=[out_dtype])[0]


I = "uint i = thread_position_in_grid.x; "
# (id citing the rule's section, rule, header, body, the text of the line the refusal must quote)
REFUSED = [
    ("1.5.4-lambda", "lambda", "", I + "auto f = [](float v) { return v * 2; }; out[i] = f(inp[i]);", "auto f ="),
    ("1.5.4-lambda-capture", "lambda", "", I + "float k = 2; auto f = [&](float v) { return v * k; }; out[i] = f(inp[i]);", "auto f"),
    ("1.5.4-recursion", "recursion", "float fact(float n) { return n <= 1 ? 1 : n * fact(n - 1); }",
     I + "out[i] = fact(inp[i]);", "float fact"),
    ("1.5.4-mutual-recursion", "recursion",
     "float odd(int n);\nfloat even(int n) { return n == 0 ? 1 : odd(n - 1); }\nfloat odd(int n) { return n == 0 ? 0 : even(n - 1); }",
     I + "out[i] = even(int(i));", "float"),
    ("1.5.4-dynamic_cast", "dynamic_cast", "struct A { float x; };",
     I + "A a{1}; thread A* p = dynamic_cast<thread A*>(&a); out[i] = p->x;", "dynamic_cast"),
    ("1.5.4-typeid", "typeid", "", I + "out[i] = typeid(float) == typeid(int);", "typeid"),
    ("1.5.4-new-array", "new_delete", "", I + "thread float* p = new float[2]; out[i] = p[0];", "new float"),
    ("1.5.4-new-delete", "new_delete", "", I + "thread float* p = new float(1.0f); out[i] = *p; delete p;", "new float"),
    ("1.5.4-goto", "goto", "", I + "if (i > 10) goto done; out[i] = 1; done: out[i] = 2;", "goto"),
    ("1.5.4-register", "storage", "", I + "register float r = inp[i]; out[i] = r;", "register"),
    ("1.5.4-thread_local", "storage", "", I + "thread_local float t = 0; out[i] = t;", "thread_local"),
    ("1.5.4-virtual", "virtual", "struct B { virtual float f() const { return 1; } };", I + "B b; out[i] = b.f();", "virtual"),
    ("1.5.4-virtual-base", "derived", "struct A { float a; };\nstruct D : virtual A { float b; };",
     I + "D d; d.a = 1; out[i] = d.a;", "struct D"),
    ("1.5.4-try-catch", "exceptions", "", I + "try { out[i] = 1; } catch (...) { out[i] = 0; }", "try"),
    ("1.5.4-throw", "exceptions", "", I + "if (i > 100) throw 1; out[i] = 1;", "throw"),
    ("1.5.4-std-max", "std", "", I + "out[i] = std::max(inp[i], 0.0f);", "std::max"),
    ("1.5.4-std-array", "std", "", I + "std::array<float, 2> a; out[i] = a[0];", "std::array"),
    ("1.5.4-using-namespace-std", "std", "using namespace std;", I + "out[i] = inp[i];", "using namespace std"),
    ("1.5.4-libc-printf", "libc", "", I + 'printf("%f", inp[i]); out[i] = 1;', "printf"),
    ("1.5.4-libc-malloc", "libc", "", I + "thread float* p = (thread float*)malloc(8); out[i] = p[0];", "malloc"),
    ("1.5.4-libc-free", "libc", "", I + "free(nullptr); out[i] = 1;", "free"),
    ("1.5.4-libc-system", "libc", "", I + 'out[i] = system("touch /tmp/metalforge-escaped");', "system"),
    ("1.5.4-libc-fopen", "libc", "", I + 'auto f = fopen("/tmp/metalforge-escaped", "w"); out[i] = f != 0;', "fopen"),
    ("1.5.4-libc-exit", "libc", "", I + "if (i == 3) exit(1); out[i] = 1;", "exit"),
    ("1.5.4-libc-abort", "libc", "", I + "if (i == 3) abort(); out[i] = 1;", "abort"),
    ("1.5.4-libc-memcpy", "libc", "", I + "float v; memcpy(&v, &inp[i], 4); out[i] = v;", "memcpy"),
    ("1.5.4-libc-getenv", "libc", "", I + 'out[i] = getenv("HOME") != 0;', "getenv"),
    ("1.5.4-libc-dlopen", "libc", "", I + 'out[i] = dlopen("libc.so.6", 1) != 0;', "dlopen"),
    ("1.5.4-extern-c-system", "undefined", 'extern "C" int system(const char*);',
     I + 'out[i] = system("touch /tmp/metalforge-escaped");', 'extern "C"'),
    ("1.5.4-extern-c-block", "undefined", 'extern "C" { int rand(); }', I + "out[i] = rand();", 'extern "C"'),
    ("1.5.4-declared-not-defined", "undefined", "int getpid();", I + "out[i] = getpid();", "int getpid"),
    ("2.1-double", "double", "", I + "double d = inp[i]; out[i] = d;", "double d"),
    ("2.1-long-double", "double", "", I + "long double e = inp[i]; out[i] = e;", "long double"),
    ("2.1-double-cast", "double", "", I + "out[i] = float(double(inp[i]) * 2);", "double("),
    ("2.1-double-typedef", "double", "typedef double real;", I + "real r = inp[i]; out[i] = r;", "typedef double"),
    ("2.1-double-template-arg", "double", "template <typename T> T twice(T x) { return x * 2; }",
     I + "out[i] = twice<double>(inp[i]);", "twice<double>"),
    ("1.5-asm", "asm", "", I + 'asm("nop"); out[i] = 1;', "asm("),
    ("1.5-asm-syscall", "asm", "", I + '__asm__ volatile("syscall"); out[i] = 1;', "__asm__"),
    ("1.5-asm-in-header", "asm", "inline void spin() { __asm(\"pause\"); }", I + "spin(); out[i] = 1;", "__asm"),
    ("1.5.4-builtin-printf", "builtin", "", I + '__builtin_printf("x"); out[i] = 1;', "__builtin_printf"),
    ("1.5.4-builtin-frame-address", "builtin", "", I + "out[i] = __builtin_frame_address(0) != 0;", "__builtin_frame_address"),
    ("1.5.4-builtin-trap", "builtin", "", I + "if (i == 70) __builtin_trap(); out[i] = 1;", "__builtin_trap"),
    ("1.5.4-builtin-memcpy", "builtin", "", I + "float v; __builtin_memcpy(&v, &inp[i], 4); out[i] = v;", "__builtin_memcpy"),
    ("1.5.4-sync-builtin", "builtin", "", I + "__sync_synchronize(); out[i] = 1;", "__sync_synchronize"),
    ("1.5.4-include-cstdlib", "include", "#include <cstdlib>", I + "out[i] = 1;", "#include <cstdlib>"),
    ("1.5.4-include-stdio", "include", "#include <stdio.h>", I + "out[i] = 1;", "#include <stdio.h>"),
    ("1.5.4-include-unistd", "include", "#include <unistd.h>", I + "out[i] = 1;", "#include <unistd.h>"),
    ("1.5.4-include-host-file", "include", '#include "/etc/hostname"', I + "out[i] = 1;", "/etc/hostname"),
    ("4.2-write-const-device", "read_only", "", I + "inp[i] = 1; out[i] = inp[i];", "inp[i] = 1"),
    ("4.2-write-constant", "read_only", "", "uint i = thread_position_in_grid.x; inp[0] = 1; out[i] = inp[0];", "inp[0] = 1"),
    ("4-cast-device-to-thread", "space_cast", "", I + "thread float* p = (thread float*)inp; out[i] = p[i];", "(thread float*)inp"),
    ("4-cast-threadgroup-to-device", "space_cast", "",
     I + "threadgroup float buf[32]; device float* p = (device float*)buf; out[i] = p[0];", "(device float*)buf"),
    ("4-reinterpret-device-to-thread", "space_cast", "", I + "out[i] = reinterpret_cast<thread float*>(out)[0];",
     "reinterpret_cast"),
    ("4-cast-device-to-constant", "space_cast", "", I + "constant float* c = (constant float*)out; out[i] = c[0];",
     "(constant float*)out"),
    ("4-call-device-to-thread-parameter", "space_cast", "inline void put(thread float* p) { p[0] = 1; }",
     I + "put(out + i);", "put(out + i)"),
    ("4-call-threadgroup-to-device-parameter", "space_cast", "inline float get(device const float* p) { return p[0]; }",
     I + "threadgroup float buf[32]; buf[i % 32] = 1; out[i] = get(buf);", "get(buf)"),
    ("4-pointer-without-space-local", "no_space", "", I + "float local = 1; float* p = &local; out[i] = *p;", "float* p"),
    ("4-pointer-without-space-param", "no_space", "float first(float* p) { return p[0]; }",
     I + "float v[2] = {1, 2}; out[i] = first(v);", "float first"),
    ("4-pointer-without-space-field", "no_space", "struct Ref { float* p; };", I + "Ref r; out[i] = 1;", "float* p"),
    ("1.5.4-function-pointer", "function_pointer", "float twice(float x) { return 2 * x; }",
     I + "float (*f)(float) = twice; out[i] = f(inp[i]);", "(*f)"),
    ("4.4-threadgroup-in-if", "threadgroup_scope", "",
     I + "if (i == 0) { threadgroup float t[4]; t[0] = 1; } out[i] = 1;", "threadgroup float t"),
    ("4.4-threadgroup-in-loop", "threadgroup_scope", "",
     I + "for (int k = 0; k < 2; k++) { threadgroup float t[4]; t[k] = 1; } out[i] = 1;", "threadgroup float t"),
    ("4.4-threadgroup-in-helper", "threadgroup_scope", "inline float helper() { threadgroup float t[4]; return t[0]; }",
     I + "out[i] = helper();", "threadgroup float t"),
    ("4.4-threadgroup-program-scope", "threadgroup_scope", "threadgroup float g[4];", I + "out[i] = g[0];",
     "threadgroup float g"),
    ("4.4-threadgroup-initialised", "threadgroup_init", "", I + "threadgroup float t = 0; out[i] = t;",
     "threadgroup float t = 0"),
    ("4.2-program-scope-variable", "program_scope", "float counter = 0;", I + "out[i] = counter;", "float counter"),
    ("4.2-program-scope-device-pointer", "program_scope", "device float* gp;", I + "out[i] = gp[0];", "device float* gp"),
    ("4.2-static-local", "program_scope", "", I + "static float s = 0; s += 1; out[i] = s;", "static float s"),
    ("4.2-static-in-helper", "program_scope", "inline int calls() { static int n = 0; return ++n; }",
     I + "out[i] = calls();", "static int n"),
]


@pytest.mark.parametrize("rule,header,body,quoted", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_with_the_specifications_reason_and_the_kernels_line(rule, header, body, quoted):
    inp = mx.arange(4).astype(mx.float32) if "4.2-write-constant" in body or "inp[0] = 1" in body else X64
    with pytest.raises(ConformanceError) as e:
        run(body, header, inp)
    msg = str(e.value)
    assert RULES[rule].reason in msg and RULES[rule].section in msg, msg
    assert "custom_kernel_conf" in msg
    quoted_lines = [ln.strip() for ln in msg.splitlines()[1:] if not ln.lstrip().startswith("line ")]
    assert any(quoted in ln for ln in quoted_lines), msg
    assert not pathlib.Path("/tmp/metalforge-escaped").exists()


def test_the_corpus_is_large_and_covers_every_rule():
    assert len(REFUSED) >= 60
    assert {r[1] for r in REFUSED} == set(RULES)


# ---- host isolation that does not depend on the front end -------------------------------------------
def _unit(body: str, header: str = "") -> tuple[str, str]:
    info = InputInfo("inp", mx.float32, 1, 64, False, False, False)
    kname = "custom_kernel_iso_float_float"
    plan = buffer_plan([info], ["out"], [mx.float32], False)
    msl = mlx_source(kname, header, body, plan, [])
    facts = conformance.Facts(0, ())
    return _translation_unit(kname, msl, facts, plan, [], False, ["thread_position_in_grid"]), kname


@pytest.mark.parametrize("header,body,expected", [
    ('extern "C" int system(const char*);', I + 'out[i] = system("touch /tmp/metalforge-escaped");', "`system`"),
    ('extern "C" void* fopen(const char*, const char*);', I + 'out[i] = fopen("/tmp/metalforge-escaped", "w") != 0;',
     "`fopen`"),
    ('extern "C" long syscall(long, ...);', I + "out[i] = syscall(39);", "`syscall`"),
    ("#include <cstdlib>", I + "out[i] = 1;", "cstdlib"),
    ("", I + '__asm__ volatile("syscall"); out[i] = 1;', "poisoned"),
    ("", I + "out[i] = std::max(1.0f, 2.0f);", "std"),
], ids=["extern-system", "extern-fopen", "extern-syscall", "include-cstdlib", "asm", "std"])
def test_a_kernel_cannot_reach_the_host_even_past_the_front_end(header, body, expected):
    """Compiled straight through the compiler, as if the front end had missed it."""
    unit, kname = _unit(body, header)
    with pytest.raises(CompileError) as e:
        compiler.build(unit, kname, False)
    assert expected in str(e.value)
    assert not pathlib.Path("/tmp/metalforge-escaped").exists()


# ---- Metal constructs that run --------------------------------------------------------------------
def test_several_threadgroup_arrays_in_one_declaration_are_shared_arrays():
    body = """
        uint t = thread_position_in_threadgroup.x;
        threadgroup float a_sh[32], b_sh[32];
        a_sh[t] = inp[thread_position_in_grid.x];
        b_sh[t] = 2.0f * inp[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = a_sh[31 - t] + b_sh[(t + 1) % 32];
    """
    x = np.arange(64, dtype=np.float32)
    got = np.array(run(body, inp=mx.array(x)))
    want = np.concatenate([g[::-1] + 2 * np.roll(g, -1) for g in x.reshape(2, 32)])
    np.testing.assert_array_equal(got, want)


def test_program_scope_constants_bound_arrays_and_hold_tables():
    header = "constant uint N = 32;\nconstant float scale[4] = {1.0f, 2.0f, 3.0f, 4.0f};\n"
    body = """
        uint t = thread_position_in_threadgroup.x;
        threadgroup float buf[N];
        buf[t] = inp[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = buf[N - 1 - t] * scale[t % 4];
    """
    x = np.arange(64, dtype=np.float32)
    got = np.array(run(body, header, mx.array(x)))
    want = np.concatenate([g[::-1] for g in x.reshape(2, 32)]) * np.tile([1, 2, 3, 4], 16)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("include", ["metal_stdlib", "metal_math", "metal_simdgroup", "metal_atomic"])
def test_metals_own_headers_can_be_included(include):
    got = run(I + "out[i] = metal::exp(inp[i]) + simd_sum(1.0f);", f"#include <{include}>\nusing namespace metal;\n",
              X64 / 64)
    np.testing.assert_allclose(np.array(got), np.exp(np.arange(64) / 64) + 32, rtol=1e-6)


def test_complex64_buffers_have_real_and_imag():
    z = (np.arange(8) + 1j * np.arange(8)[::-1]).astype(np.complex64)
    k = emulator.metal_kernel(name="cplx", input_names=["z"], output_names=["out"], source="""
        uint i = thread_position_in_grid.x;
        complex64_t v = z[i] * z[i] + complex64_t(1.0f, 0.0f);
        out[i] = complex64_t(v.real, -v.imag);
    """)
    got = k(inputs=[mx.array(z)], grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
            output_dtypes=[mx.complex64])[0]
    np.testing.assert_allclose(np.array(got), np.conj(z * z + 1), rtol=1e-6)


def test_a_compile_error_points_at_the_kernels_own_line():
    with pytest.raises(CompileError) as e:
        run("uint i = thread_position_in_grid.x;\nout[i] = undefined_name + 1;")
    assert "line 6" in str(e.value) and "undefined_name" in str(e.value)


# ---- zero false refusals: mlx-lm's shipped kernels --------------------------------------------------
def _mlx_lm_kernel_sources() -> list[dict]:
    """Every mx.fast.metal_kernel the installed mlx-lm creates, at import or from its factories."""
    import mlx_lm
    root = pathlib.Path(mlx_lm.__file__).parent
    recorded: list[dict] = []
    original = mx.fast.metal_kernel

    def record(**kwargs):
        recorded.append(kwargs)
        return original(**kwargs)

    mx.fast.metal_kernel = record
    try:
        for path in sorted(root.rglob("*.py")):
            text = path.read_text()
            if "metal_kernel(" not in text:
                continue
            name = "mlx_lm." + ".".join(path.relative_to(root).with_suffix("").parts)
            try:
                module = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
            except Exception:   # a model module whose optional dependency is missing
                continue
            for node in ast.parse(text).body:
                if isinstance(node, ast.FunctionDef) and "metal_kernel(" in ast.get_source_segment(text, node):
                    fn = getattr(module, node.name)
                    fn = getattr(fn, "__wrapped__", fn)
                    params = list(inspect.signature(fn).parameters)
                    for values in itertools.product([False, True], repeat=len(params)):
                        fn(*values)
    finally:
        mx.fast.metal_kernel = original
    return recorded


def test_every_kernel_shipped_in_mlx_lm_passes_the_front_end():
    kernels = _mlx_lm_kernel_sources()
    assert len(kernels) >= 15, len(kernels)
    for kw in kernels:
        infos = [InputInfo(n, mx.float32, 1, 64, f"{n}_shape" in kw["source"], f"{n}_strides" in kw["source"],
                           f"{n}_ndim" in kw["source"]) for n in kw["input_names"]]
        kname = "custom_kernel_" + kw["name"]
        plan = buffer_plan(infos, kw["output_names"], [mx.float32] * len(kw["output_names"]),
                           kw.get("atomic_outputs", False))
        msl = mlx_source(kname, kw.get("header", ""), kw["source"], plan, [])
        conformance.check(msl, kname)   # raises ConformanceError on a false refusal
