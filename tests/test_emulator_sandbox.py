"""Escape attempts against the emulator: each kernel tries to reach the host (files, processes,
signals, the network, the caller's memory), to run code when its library loads, or to hang or
kill the caller. Each runs in a subprocess of its own; each must be refused or contained: the
caller alive and answering, no file created or read outside, the hang ended by its limit.

Many attempts hide from the conformance front end under `#ifndef __clang__` (it parses with
clang, the compiler is g++): the front end gives Metal's error messages, it is not the boundary.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import mlx.core as mx
    from metalforge import emulator
    from metalforge.errors import MetalforgeError

    spec = json.loads(open(sys.argv[1]).read())
    k = emulator.metal_kernel(name="escape", input_names=["inp"], output_names=["out"], source=spec["body"],
                              header=spec["header"], timeout=spec.get("timeout"))
    inp = mx.arange(64).astype(mx.uint32)
    report = {"outcome": "ran", "message": "", "output": ""}
    start = time.monotonic()
    try:
        if spec.get("prepare"):
            k.prepare(inputs=[inp], output_dtypes=[mx.uint32])
            report["outcome"] = "prepared"
        else:
            out = k(inputs=[inp], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(1024,)],
                    output_dtypes=[mx.uint32])[0]
            report["output"] = np.array(out).tobytes().hex()
            report["first"] = int(np.array(out).view(np.int32)[0])
    except MetalforgeError as e:
        report["outcome"], report["message"] = type(e).__name__, str(e)
    report["seconds"] = time.monotonic() - start
    # the caller goes on: its heap and MLX are fine
    report["after"] = float(mx.sum(mx.arange(1000).astype(mx.float32)).item())
    print("REPORT " + json.dumps(report))
""")

REFUSED = {"CompileError", "ConformanceError"}
STOPPED = {"EmulatorError"}
I = "uint i = thread_position_in_grid.x;\nout[i] = 0;\n"

# A system call gadget, assembled from a section name (GCC writes it into its assembler output):
# what any native code can do, whatever the static checks say.
GADGET = r"""
#ifndef __clang__
__attribute__((section(".text.mf_gadget\n.globl mf_sys\n.type mf_sys,@function\nmf_sys:\n mov %rdi, %rax\n mov %rsi, %rdi\n mov %rdx, %rsi\n mov %rcx, %rdx\n mov %r8, %r10\n syscall\n ret\n.section .data.mf_pad"))) int mf_pad = 1;
extern "C" long mf_sys(long nr, long a = 0, long b = 0, long c = 0, long d = 0);
#endif
"""


def sys_body(call: str) -> str:
    """A kernel whose thread 0 makes a raw system call and stores its result."""
    return I + f"#ifndef __clang__\nif (i == 0) out[0] = uint(mf_sys({call}));\n#endif\n"


# Walks from libc's memcpy (reached through the library's own GOT) down to libc's ELF header,
# then through its dynamic symbol table to system(), and calls it.
GOT_WALK = r"""
#ifndef __clang__
extern "C" void* memcpy(void*, const void*, unsigned long);
typedef int (*mf_system_fn)(const char*);
static mf_system_fn mf_find_system() {
  unsigned long p = (unsigned long)(void*)&memcpy & ~0xfffUL;
  while (!(((const unsigned char*)p)[0] == 0x7f && ((const unsigned char*)p)[1] == 'E' &&
           ((const unsigned char*)p)[2] == 'L' && ((const unsigned char*)p)[3] == 'F')) p -= 0x1000;
  const unsigned char* base = (const unsigned char*)p;
  unsigned long phoff = *(const unsigned long*)(base + 0x20);
  unsigned short phnum = *(const unsigned short*)(base + 0x38);
  const long* dyn = 0;
  for (int k = 0; k < phnum; k++) {
    const unsigned char* ph = base + phoff + 56 * k;
    if (*(const unsigned*)ph == 2) dyn = (const long*)(base + *(const unsigned long*)(ph + 0x10));
  }
  unsigned long symtab = 0, strtab = 0;
  for (; dyn && dyn[0]; dyn += 2) {
    if (dyn[0] == 5) strtab = dyn[1];
    if (dyn[0] == 6) symtab = dyn[1];
  }
  if (symtab < p) symtab += p;
  if (strtab < p) strtab += p;
  for (const unsigned char* s = (const unsigned char*)symtab; (unsigned long)s < strtab; s += 24) {
    const char* name = (const char*)(strtab + *(const unsigned*)s);
    if (name[0] == 's' && name[1] == 'y' && name[2] == 's' && name[3] == 't' && name[4] == 'e' && name[5] == 'm' && !name[6])
      return (mf_system_fn)(p + *(const unsigned long*)(s + 8));
  }
  return 0;
}
#endif
"""

PASSWD = "root:x:0:0"

ATTEMPTS = [
    # ---- reaching libc and the host's functions ------------------------------------------------
    ("got-walk-to-system", GOT_WALK, I + '#ifndef __clang__\nif (i == 0) { mf_system_fn f = mf_find_system(); '
     'out[0] = f ? f("touch MARK") : 12345; }\n#endif\n', STOPPED, "forbidden system call"),
    ("extern-system", 'extern "C" int system(const char*);', I + 'out[i] = system("touch MARK");', REFUSED, "system"),
    ("extern-system-past-front-end", '#ifndef __clang__\nextern "C" int system(const char*);\n#endif',
     I + '#ifndef __clang__\nout[i] = system("touch MARK");\n#endif', REFUSED, "`system`"),
    ("dup2-past-front-end", '#ifndef __clang__\nextern "C" int __dup2(int, int);\n#endif',
     I + "#ifndef __clang__\nout[i] = __dup2(2, 1);\n#endif", REFUSED, "`__dup2`"),
    ("setjmp-longjmp-past-front-end",
     '#ifndef __clang__\nextern "C" int _setjmp(void*); extern "C" void longjmp(void*, int);\n#endif',
     I + "#ifndef __clang__\nlong b[64]; if (_setjmp(b) == 0) longjmp(b, 1);\n#endif", REFUSED, "jmp"),
    ("builtin-setjmp", "", I + "#ifndef __clang__\nvoid* b[5]; out[i] = __builtin_setjmp(b);\n#endif", REFUSED, ""),
    # ---- raw system calls: seccomp -----------------------------------------------------------------
    ("raw-openat-create", GADGET, sys_body('257, -100, (long)"MARK", 0x41, 0644'), {"ran"}, ""),
    ("raw-openat-passwd", GADGET, sys_body('257, -100, (long)"/etc/passwd", 0, 0'), {"ran"}, ""),
    ("raw-execve", GADGET, sys_body('59, (long)"/bin/sh", 0, 0'), STOPPED, "forbidden system call 59"),
    ("raw-fork", GADGET, sys_body("57, 0, 0, 0"), STOPPED, "forbidden system call 57"),
    ("raw-vfork", GADGET, sys_body("58, 0, 0, 0"), STOPPED, "forbidden system call 58"),
    ("raw-clone-process", GADGET, sys_body("56, 17, 0, 0"), STOPPED, "forbidden system call 56"),
    ("raw-kill-init", GADGET, sys_body("62, 1, 0, 0"), STOPPED, "forbidden system call 62"),
    ("raw-tgkill-another-process", GADGET, sys_body("234, 1, 1, 0"), STOPPED, "forbidden system call 234"),
    ("raw-getppid", GADGET, sys_body("110, 0, 0, 0"), STOPPED, "forbidden system call 110"),
    ("raw-socket", GADGET, sys_body("41, 2, 1, 0"), STOPPED, "forbidden system call 41"),
    ("raw-ptrace", GADGET, sys_body("101, 16, 1, 0"), STOPPED, "forbidden system call 101"),
    ("raw-prctl", GADGET, sys_body("157, 38, 1, 0"), STOPPED, "forbidden system call 157"),
    ("raw-unshare", GADGET, sys_body("272, 0x10000000, 0, 0"), STOPPED, "forbidden system call 272"),
    ("raw-process-vm-writev", GADGET, sys_body("311, 1, 0, 1"), STOPPED, "forbidden system call 311"),
    ("raw-dup2", GADGET, sys_body("33, 2, 1, 0"), STOPPED, "forbidden system call 33"),
    ("raw-mmap-until-exhausted", GADGET, I + "#ifndef __clang__\nif (i == 0) { for (;;) { long p = mf_sys(9, 0, 64L << 20, 3, 0x8022); "
     "*(volatile char*)p = 1; } }\n#endif\n", STOPPED, ""),
    ("raw-forged-reply", GADGET, I + '#ifndef __clang__\nif (i == 0) for (long fd = 3; fd < 16; fd++) '
     'mf_sys(1, fd, (long)"MFRExxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", 40, 0);\n#endif\n', {"ran", "EmulatorError"}, ""),
    # ---- files at compile time ----------------------------------------------------------------------
    ("incbin-passwd-via-section-name",
     '#ifndef __clang__\n__attribute__((section(".rodata.mf_a\\n.globl mf_blob\\nmf_blob:\\n.incbin \\"/etc/passwd\\"\\n'
     '.byte 0\\n.section .rodata.mf_b"))) const char mf_b = 0;\nextern "C" const char mf_blob[];\n#endif',
     I + "#ifndef __clang__\nfor (int k = 0; k < 256; k++) out[k] = (uint)mf_blob[k];\n#endif", REFUSED, ""),
    ("include-passwd", '#include "/etc/passwd"', I, REFUSED, "include"),
    ("include-passwd-past-front-end", '#ifndef __clang__\n#include "/etc/passwd"\n#endif', I, REFUSED, ""),
    ("include-passwd-relative", '#ifndef __clang__\n#include "../../../../../../../../etc/passwd"\n#endif', I,
     REFUSED, ""),
    ("include-next-passwd", '#ifndef __clang__\n#include_next "/etc/passwd"\n#endif', I, REFUSED, ""),
    ("include-dev-stdin", '#include "/dev/stdin"', I, REFUSED, ""),
    ("include-dev-stdin-past-front-end", '#ifndef __clang__\n#include "/dev/stdin"\n#endif', I, REFUSED, ""),
    ("include-dev-zero", '#include "/dev/zero"', I, REFUSED, ""),
    ("include-dev-zero-past-front-end", '#ifndef __clang__\n#include "/dev/zero"\n#endif', I, REFUSED, ""),
    # ---- code at load time ---------------------------------------------------------------------------
    ("constructor", '#ifndef __clang__\n__attribute__((constructor)) static void mf_c() { for (;;) {} }\n#endif', I,
     REFUSED, "refused before loading"),
    ("destructor", '#ifndef __clang__\nstatic volatile long mf_zero = 0;\n'
     '__attribute__((destructor)) static void mf_d() { *(volatile int*)mf_zero = 1; }\n#endif', I, REFUSED,
     "refused before loading"),
    ("constructor-null-write", '#ifndef __clang__\nstatic volatile long mf_zero = 0;\n'
     '__attribute__((constructor)) static void mf_c() { *(volatile int*)mf_zero = 1; }\n#endif', I, REFUSED,
     "refused before loading"),
    ("constructor-system-call", GADGET + '#ifndef __clang__\n__attribute__((constructor)) static void mf_c() { '
     'mf_sys(257, -100, (long)"MARK", 0x41, 0644); }\n#endif', I, REFUSED, "refused before loading"),
    ("ifunc", '#ifndef __clang__\nstatic int mf_impl() { return 1; }\nextern "C" void* mf_resolve() { for (;;) {} return (void*)mf_impl; }\n'
     'extern "C" int mf_if() __attribute__((ifunc("mf_resolve")));\n#endif', I + "#ifndef __clang__\nout[i] = mf_if();\n#endif",
     REFUSED, "indirect function"),
    ("init-array-section", '#ifndef __clang__\nstatic void mf_f() { for (;;) {} }\n'
     '__attribute__((section(".init_array"), used)) static void (*mf_p)() = mf_f;\n#endif', I, REFUSED, "refused before loading"),
    ("init-array-via-section-name", '#ifndef __clang__\nstatic void mf_f() { for (;;) {} }\n'
     '__attribute__((section(".data.mf_x\\n.section .init_array"), used)) static void (*mf_p)() = mf_f;\n#endif', I,
     REFUSED, "refused before loading"),
    ("endless-constant-initialiser", "inline int mf_forever(int x) { while (x >= 0) { x = x + 0; } return x; }\n"
     "constant int mf_k = mf_forever(1);", I + "out[i] = mf_k;", REFUSED, ""),
    ("constant-initialiser-system-call", GADGET + '#ifndef __clang__\nconst long mf_k = mf_sys(257, -100, (long)"MARK", 0x41, 0644);\n#endif',
     I, REFUSED, "refused before loading"),
    # ---- native code that kills or hijacks -------------------------------------------------------------
    ("section-text-machine-code", '#ifndef __clang__\n__attribute__((section(".text.mf_code"))) const unsigned char mf_code[] = {0x0f, 0x0b, 0xc3};\n#endif',
     I + "#ifndef __clang__\nif (i == 0) ((void (*)())(const void*)mf_code)();\n#endif", REFUSED | STOPPED, ""),
    ("builtin-trap-via-macro-concat", "#define MF_CAT2(a, b) a##b\n#define MF_CAT(a, b) MF_CAT2(a, b)",
     I + "if (i == 3) MF_CAT(__buil, tin_trap)();", REFUSED | STOPPED, ""),
    ("target-avx512f", '#ifndef __clang__\n__attribute__((target("avx512f"))) static float mf_v(float x) { return x * 2; }\n#endif',
     I + "#ifndef __clang__\nout[i] = uint(mf_v(float(i)));\n#endif", REFUSED | STOPPED | {"ran"}, ""),
    ("naked-function", '#ifndef __clang__\n__attribute__((naked)) static void mf_n() {}\n#endif',
     I + "#ifndef __clang__\nif (i == 0) mf_n();\n#endif", REFUSED | STOPPED | {"ran"}, ""),
    ("wrfsbase", '#ifndef __clang__\n__attribute__((target("fsgsbase"))) static void mf_w() { __builtin_ia32_wrfsbase64(0); }\n#endif',
     I + "#ifndef __clang__\nif (i == 0) mf_w();\n#endif\nout[i] = 1;", REFUSED | STOPPED, ""),
    ("fiber-saved-stack-pointer", "",
     I + "if (i == 0) (&mf::self())[1].sp = (void*)0x4141414141414140UL;\n"
     "threadgroup_barrier(mem_flags::mem_threadgroup);\nout[i] = 1;", REFUSED | STOPPED, ""),
    ("return-address-overwrite", "",
     I + "uint a[2];\nfor (int j = 0; j < 64; j++) a[j + int(inp[0])] = 0x41414141u;\nout[i] = a[1];",
     REFUSED | STOPPED | {"ran"}, ""),
    # ---- compiler and front end bombs ------------------------------------------------------------------
    ("template-bomb", "template <int N, long M> struct MfF { static constexpr long v = MfF<N - 1, 2 * M>::v + "
     "MfF<N - 1, 2 * M + 1>::v; };\ntemplate <long M> struct MfF<0, M> { static constexpr long v = 1; };",
     I + "out[i] = uint(MfF<40, 0>::v);", REFUSED, ""),
    ("template-bomb-past-front-end", "#ifndef __clang__\ntemplate <int N, long M> struct MfF { static constexpr long v = "
     "MfF<N - 1, 2 * M>::v + MfF<N - 1, 2 * M + 1>::v; };\ntemplate <long M> struct MfF<0, M> { static constexpr long "
     "v = 1; };\n#endif", I + "#ifndef __clang__\nout[i] = uint(MfF<40, 0>::v);\n#endif", REFUSED, ""),
    ("macro-bomb-past-front-end", "#ifndef __clang__\n" + "\n".join(["#define MF_B0 1+"] + [f"#define MF_B{n} MF_B{n - 1} MF_B{n - 1}" for n in range(1, 33)]) + "\n#endif",
     I + "#ifndef __clang__\nout[i] = MF_B32 1;\n#endif", REFUSED, ""),
    ("macro-bomb", "\n".join(["#define MF_B0 1+"] + [f"#define MF_B{n} MF_B{n - 1} MF_B{n - 1}" for n in range(1, 33)]),
     I + "out[i] = MF_B32 1;", REFUSED, ""),
    ("200000-statements", "", I + "out[i] += 1u;\n" * 200_000, REFUSED | {"ran"}, ""),
    ("endless-kernel", "", I + "float x = float(inp[i]);\nwhile (true) { x = x * 1.0001f; }\nout[i] = uint(x);",
     STOPPED, "time limit"),
]


def _run(spec: dict, tmp_path, timeout=180):
    env = {**os.environ, "METALFORGE_EMULATOR_COMPILE_TIMEOUT_S": "20", "METALFORGE_EMULATOR_MEMORY_MB": "1024",
           "METALFORGE_EMULATOR_TIMEOUT_S": "5"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "spec.json")], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)


# Load-time code ran at prepare() alone (the probe's case): these only compile.
PREPARE_ONLY = {"constructor", "ifunc", "endless-constant-initialiser", "constant-initialiser-system-call"}


@pytest.mark.parametrize("name,header,body,allowed,cause", ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
def test_an_escape_attempt_is_refused_or_contained(name, header, body, allowed, cause, tmp_path):
    mark = tmp_path / "escaped"
    spec = {"header": header.replace("MARK", str(mark)) + "\n", "body": body.replace("MARK", str(mark)),
            "prepare": name in PREPARE_ONLY}
    started = time.monotonic()
    run = _run(spec, tmp_path)
    elapsed = time.monotonic() - started
    lines = [line for line in run.stdout.splitlines() if line.startswith("REPORT ")]
    assert run.returncode == 0 and lines, f"the caller died or failed ({run.returncode}): {run.stderr[-3000:]}"
    report = json.loads(lines[0][len("REPORT "):])
    assert report["after"] == 499500.0                        # the caller's MLX and heap still work
    assert not mark.exists(), "a file was created"
    assert PASSWD not in report["message"] and PASSWD.encode().hex() not in report["output"]
    assert report["outcome"] in allowed, report
    assert cause in report["message"], report
    assert "Traceback" not in run.stderr
    assert elapsed < 120   # bombs and hangs end at their limits (20 s compile, 5 s run)


def test_raw_file_calls_fail_as_permission_denied(tmp_path):
    """openat inside a kernel returns -EACCES: the file is neither created nor read."""
    mark = tmp_path / "escaped"
    for target, flags in ((str(mark), "0x41"), ("/etc/passwd", "0")):
        run = _run({"header": GADGET, "body": sys_body(f'257, -100, (long)"{target}", {flags}, 0644')}, tmp_path)
        report = json.loads(run.stdout.split("REPORT ", 1)[1])
        assert report["outcome"] == "ran" and report["first"] == -13, report
    assert not mark.exists()


ENDLESS = "uint i = thread_position_in_grid.x; float x = inp[i]; while (true) { x = x * 1.0001f; } out[i] = x;"


def test_ctrl_c_ends_a_running_kernel_within_two_seconds_and_the_heap_stays_whole(tmp_path):
    """The probe's case: 8 of 8 runs died later with "free(): corrupted unsorted chunks"."""
    child = textwrap.dedent(f"""
        import gc, sys, time
        import numpy as np
        import mlx.core as mx
        from metalforge import emulator
        x = mx.arange(64).astype(mx.float32)
        k = emulator.metal_kernel(name="endless", input_names=["inp"], output_names=["out"], source={ENDLESS!r})
        ok = emulator.metal_kernel(name="fine", input_names=["inp"], output_names=["out"],
                                   source="uint i = thread_position_in_grid.x; out[i] = inp[i] * 2;")
        run = lambda kern: kern(inputs=[x], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)],
                                output_dtypes=[mx.float32])[0]
        k.prepare(inputs=[x], output_dtypes=[mx.float32]); run(ok)
        print("running", flush=True)
        try:
            run(k)
        except KeyboardInterrupt:
            print("interrupted", time.time(), flush=True)
        for _ in range(200):   # the heap: allocate and free a lot, then run kernels again
            blobs = [np.random.rand(1000) for _ in range(50)]
            del blobs
        gc.collect()
        assert np.array(run(ok)).tolist() == [2.0 * i for i in range(64)]
        print("alive", flush=True)
    """)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "running"
        time.sleep(1.0)
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        stopped = float(out.split("interrupted ", 1)[1].split()[0])
        assert stopped - sent < 2.0 and "alive" in out


def test_ctrl_c_ends_a_compile_bomb_within_two_seconds(tmp_path):
    header = "\n".join(["#define MF_B0 1+"] + [f"#define MF_B{n} MF_B{n - 1} MF_B{n - 1}" for n in range(1, 33)])
    child = textwrap.dedent(f"""
        import time
        import mlx.core as mx
        from metalforge import emulator
        k = emulator.metal_kernel(name="bomb", input_names=["inp"], output_names=["out"], header={header!r},
                                  source="out[thread_position_in_grid.x] = MF_B32 1;")
        print("compiling", flush=True)
        try:
            k.prepare(inputs=[mx.zeros(4)], output_dtypes=[mx.float32])
        except KeyboardInterrupt:
            print("interrupted", time.time(), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "compiling"
    time.sleep(2.0)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert float(out.split("interrupted ", 1)[1].split()[0]) - sent < 2.0


def test_the_sandbox_layers_are_reported():
    from metalforge.emulator import confine
    layers = confine.layers()
    assert set(layers) == {"processes", "seccomp", "rlimits", "landlock", "network namespace"}
    if confine.landlock_abi():
        assert layers["landlock"].startswith(f"ABI {confine.landlock_abi()}")


# ---- smaller defects of the same issue ---------------------------------------------------------------
def test_a_grid_larger_than_metal_takes_is_refused_not_run_partially():
    """Was: a grid whose size overflows 64 bits (each dimension cut to 32) returned uninitialised memory."""
    import mlx.core as mx
    from metalforge import emulator
    k = emulator.metal_kernel(name="grid", input_names=["inp"], output_names=["out"],
                              source="out[thread_position_in_grid.x] = 1;")
    for grid, message in (((1 << 32, 1, 1), r"larger than a Metal grid takes \(4294967295 threads\)"),
                          ((1 << 64, 1, 1), r"larger than a Metal grid takes \(4294967295 threads\)"),
                          ((1 << 22, 1 << 22, 1 << 22), r"has 73786976294838206464 threads, more than a 64-bit count")):
        with pytest.raises(ValueError, match=message):
            k(inputs=[mx.zeros(1)], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=grid, threadgroup=(32, 1, 1))
    out = k(inputs=[mx.zeros(1)], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(4, 1, 1),
            threadgroup=(32, 1, 1))[0]
    assert out.tolist() == [1.0] * 4


def test_an_error_in_a_launchs_setting_surfaces_as_itself(monkeypatch):
    """Was: METALFORGE_EMULATOR_THREADS=two surfaced as an unrelated IndexError from the launch thread."""
    import mlx.core as mx
    from metalforge import emulator
    from metalforge.errors import MetalforgeError
    k = emulator.metal_kernel(name="env", input_names=["inp"], output_names=["out"],
                              source="out[thread_position_in_grid.x] = 1;")
    for name, raw, wording in (("METALFORGE_EMULATOR_THREADS", "two", "a whole number >= 1"),
                               ("METALFORGE_EMULATOR_THREADS", "0", "a whole number >= 1"),
                               ("METALFORGE_EMULATOR_TIMEOUT_S", "-1", "a number >= 0.001"),
                               ("METALFORGE_EMULATOR_MEMORY_MB", "lots", "a whole number >= 64")):
        monkeypatch.setenv(name, raw)
        with pytest.raises(MetalforgeError) as e:
            k(inputs=[mx.zeros(1)], output_shapes=[(4,)], output_dtypes=[mx.float32], grid=(4, 1, 1),
              threadgroup=(4, 1, 1))
        assert str(e.value) == f"{name} must be {wording}, got {raw!r}"
        monkeypatch.delenv(name)


def test_the_deprecated_import_path_does_not_need_pytest():
    run = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c",
                          "import sys; sys.modules['pytest'] = None\n"
                          "import metalforge.kernels.emulator as old\n"
                          "from metalforge import emulator\n"
                          "assert old.metal_kernel is emulator.metal_kernel\nprint('ok')"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_a_dead_worker_is_replaced_and_the_same_kernel_runs_again():
    import mlx.core as mx
    import numpy as np
    from metalforge import emulator
    from metalforge.emulator import EmulatorError
    k = emulator.metal_kernel(name="dies", input_names=["inp"], output_names=["out"],
                              header="#define MF_CAT2(a, b) a##b\n#define MF_CAT(a, b) MF_CAT2(a, b)\n",
                              source="uint i = thread_position_in_grid.x;\n"
                                     "if (inp[0] == 7u) MF_CAT(__buil, tin_trap)();\nout[i] = inp[i] + 1u;")
    run = lambda x: k(inputs=[x], grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)],
                      output_dtypes=[mx.uint32])[0]
    with pytest.raises(EmulatorError, match=r"custom_kernel_dies_uint32_t_uint32_t: .*(SIGILL|illegal instruction)"):
        run(mx.full((64,), 7, dtype=mx.uint32))
    x = mx.arange(64).astype(mx.uint32)
    assert np.array(run(x)).tolist() == list(range(1, 65))


def test_buffers_beyond_the_workers_memory_are_an_error_naming_the_kernel(monkeypatch):
    import mlx.core as mx
    from metalforge import emulator
    from metalforge.emulator import EmulatorError
    monkeypatch.setenv("METALFORGE_EMULATOR_MEMORY_MB", "64")
    k = emulator.metal_kernel(name="big", input_names=["inp"], output_names=["out"],
                              source="out[thread_position_in_grid.x] = 1.0f;")
    with pytest.raises(EmulatorError, match=r"custom_kernel_big_floatc_float: the kernel's worker process died .*"
                                            r"it ran out of memory \(the worker's limit is 64 MiB"):
        k(inputs=[mx.zeros(1)], output_shapes=[(32 << 20,)], output_dtypes=[mx.float32], grid=(32, 1, 1),
          threadgroup=(32, 1, 1))


@pytest.mark.parametrize("mode", ["plain", "checked", "traced"])
def test_a_full_librarys_kernel_runs_in_the_sandboxed_worker_in_every_mode(mode):
    """A library kernel (emulator/library.py, MLX's kernels' path) runs in a worker process, not in
    the caller: the process id it reads is not ours, its library is never mapped here, and a
    system call outside the filter ends the worker with the sandbox's error."""
    import numpy as np
    from metalforge.emulator import EmulatorError
    from metalforge.emulator.library import Library
    source = GADGET + """
[[kernel]] void pid(device int* out [[buffer(0)]], const constant int& call [[buffer(1)]],
                    uint i [[thread_position_in_grid]]) {
#ifndef __clang__
  if (i == 0) out[0] = int(mf_sys(call));
#endif
}
"""
    fn = Library(source, mode=mode).function("pid")
    out = np.zeros(32, dtype=np.int32)
    fn(buffers={0: out, 1: 39}, threads=(32, 1, 1), threadgroup=(32, 1, 1))   # getpid: allowed
    assert out[0] > 0 and out[0] != os.getpid()
    if mode == "traced":
        assert fn.last_trace.device["out"].accesses == 1
    library_path = str(fn._program[1])
    assert library_path not in open("/proc/self/maps").read()
    with pytest.raises(EmulatorError, match=r"pid: the kernel's worker process died .*forbidden system call 110"):
        fn(buffers={0: out, 1: 110}, threads=(32, 1, 1), threadgroup=(32, 1, 1))   # getppid: not allowed


def test_a_full_librarys_endless_kernel_ends_at_its_time_limit_and_the_next_call_runs():
    import numpy as np
    from metalforge.emulator import EmulatorError
    from metalforge.emulator.library import Library
    source = """
[[kernel]] void spin(device float* out [[buffer(0)]], const constant int& endless [[buffer(1)]],
                     uint i [[thread_position_in_grid]]) {
  float x = 1.0f;
  while (endless) { x = x * 1.0001f; }
  out[i] = x + float(i);
}
"""
    fn = Library(source, timeout=2).function("spin")
    out = np.zeros(32, dtype=np.float32)
    start = time.monotonic()
    with pytest.raises(EmulatorError, match=r"spin: the kernel ran past its time limit of 2 s"):
        fn(buffers={0: out, 1: 1}, threads=(32, 1, 1), threadgroup=(32, 1, 1))
    assert time.monotonic() - start < 10
    fn(buffers={0: out, 1: 0}, threads=(32, 1, 1), threadgroup=(32, 1, 1))
    assert out.tolist() == [1.0 + i for i in range(32)]
