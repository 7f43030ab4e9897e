// metalforge emulator: what a kernel's translation unit knows of the runtime. Freestanding on
// purpose: it includes nothing, so a kernel compiled against it sees no C or C++ library name.
// Fibers, worker threads, signals and memory live in mf_runtime.cpp, a separate object the
// kernel is linked with; the kernel reaches them only through the functions declared here.
#pragma once

namespace mf {

using size_t = decltype(sizeof 0);
struct u3 { unsigned x, y, z; };

enum class State : int { Runnable, AtBarrier, AtSimd, Done };

struct Fiber;
using SimdFn = void (*)(Fiber** lanes, int count);

// One emulated thread: its position (the attribute values) and what it is waiting for.
struct Fiber {
  void* sp = nullptr;           // saved stack pointer (x86-64 switch)
  char* stack = nullptr;
  State state = State::Runnable;
  int line = 0;                 // barrier / SIMD call site (MSL line)
  SimdFn simd_fn = nullptr;
  alignas(16) unsigned char simd_in[256];
  alignas(16) unsigned char simd_out[256];
  u3 pos_in_tg, tg_pos, tg_size;
  unsigned index = 0, lane = 0, simdgroup = 0;
  unsigned trace_seq = 0;       // trace mode: this lane's accesses so far in its threadgroup
  int trace_quiet = 0;          // trace mode: > 0 inside a matrix load, whose element reads are one record
};

struct Launch {
  u3 grid, nominal_tg, groups;
  int checked = 0;
  int races = 0;                        // checked mode's race detector (off for a count-only traced run)
  int lockstep = 0;                     // lanes switch at each threadgroup access, in step as Metal's SIMD lanes
  const char* kernel = "";
  int buffers = 0;                      // the bound buffers: where they are, their bytes and names
  void* const* data = nullptr;
  const long long* bytes = nullptr;
  const char* const* names = nullptr;
};

// ---- the runtime, as the kernel sees it (mf_runtime.cpp) -----------------------------------
Fiber& self();                                   // the emulated thread running now
void to_scheduler();                             // park it (barrier, SIMD exchange, done)
unsigned char* tg_memory();                      // this threadgroup's shared arena
void simd_sync(Fiber** lanes, int count);        // simdgroup_barrier: orders the lanes' accesses
// checked mode: a bounds violation ends the thread with a report; threadgroup accesses are logged
[[noreturn]] void out_of_bounds(const char* what, const char* name, long long index, long long size,
                                const void* pc);
void tg_log(void* p, unsigned size, const char* name, long long index, const void* pc);
// the bound buffer holding `p`: its start, bytes and name (false for none); checked mode makes a
// raw device pointer (`(device T*)&src[i]`) a bounds-checked one again with it
bool device_buffer(const void* p, unsigned char*& start, long long& bytes, const char*& name);
// trace mode (emulator/trace.py): one lane's access of device or threadgroup memory at `address`,
// or its part in a SIMD-group matrix operation; the runtime counts them as the dispatch runs
enum TraceKind : int { kTraceDevice = 0, kTraceThreadgroup = 1, kTraceMatrixLoad = 2, kTraceMatrixStore = 3,
                       kTraceMatrixMultiply = 4 };
void trace(int kind, const void* address, unsigned bytes);
void trace_simdgroup_operation(int kind);   // one by the whole SIMD-group (the scheduler runs it once)

// ---- blocking points -----------------------------------------------------------------------
inline void barrier_at(int line) {
  Fiber& f = self();
  f.line = line;
  f.state = State::AtBarrier;
  to_scheduler();
}

template <class T>
inline T simd_exchange(const T& value, SimdFn fn, int line) {
  static_assert(sizeof(T) <= sizeof(Fiber::simd_in), "SIMD operand too large");
  Fiber& f = self();
  __builtin_memcpy(f.simd_in, static_cast<const void*>(&value), sizeof(T));
  f.simd_fn = fn;
  f.line = line;
  f.state = State::AtSimd;
  to_scheduler();
  T out;
  __builtin_memcpy(static_cast<void*>(&out), f.simd_out, sizeof(T));
  return out;
}

// ---- threadgroup memory --------------------------------------------------------------------
// Each declaration is a slot of the arena. Its size is a constant in the library's `mf_tg`
// section (no code runs when the library loads); the runtime lays the slots out on first use, and
// the sum of the declared sizes is what dispatch compares with the device's limit.
struct TgEntry { long long id; size_t size; };
size_t tg_offset(int id);                        // a declaration's offset in the arena
size_t tg_bytes();                               // the arena's bytes: every declaration, 16-byte aligned

template <class A, int ID>
inline A& tg_array() {
  // one {id, size} record per use, placed by the assembler (runs nothing; the runtime dedupes)
  __asm__(".pushsection mf_tg,\"a\"\n\t.p2align 3\n\t.quad %c0, %c1\n\t.popsection" :: "i"(ID), "i"(sizeof(A)));
  return *reinterpret_cast<A*>(tg_memory() + tg_offset(ID));
}

// ---- what the launcher in the kernel's translation unit gives the runtime -------------------
struct KernelInfo {
  const char* name;
  const char* const* buffer_names;
  int buffers, first_output;
};

}  // namespace mf

extern "C" {
[[gnu::visibility("hidden")]] extern const mf::KernelInfo mf_kernel_info;
// calls the kernel for one thread with its buffers and attribute values
[[gnu::visibility("hidden")]] void mf_kernel_body(void* const* buffers, const long long* meta, const mf::Launch& L,
                                                  mf::Fiber& f);
}
