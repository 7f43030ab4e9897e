// metalforge emulator runtime: fibers, threadgroup scheduling, barriers, SIMD-group exchange,
// threadgroup memory arenas, faults and error reporting. Compiled once into an object that every
// kernel's library is linked with; the kernel's own translation unit sees only mf_kernel.h, so
// nothing here (the C and C++ libraries included) can be named by a kernel.
#include "mf_kernel.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>
#include <sys/mman.h>
#include <dlfcn.h>
#include <csetjmp>
#include <csignal>
#include <pthread.h>
#include <ucontext.h>
#include <unistd.h>

namespace mf {

// ---- errors -------------------------------------------------------------------------------
// Counts of the last dispatch: threads run, barrier crossings (per thread) and SIMD-group
// exchanges (per lane), for the benchmark and for curious users.
struct Stats { std::atomic<long long> threads{0}, barrier_crossings{0}, simd_lanes{0}; };
inline Stats& stats() { static Stats s; return s; }

struct Errors {
  std::mutex mu;
  std::vector<std::string> messages;
  std::atomic<int> abort{0};
  void add(const std::string& m, bool fatal) {
    std::lock_guard<std::mutex> g(mu);
    if (messages.size() < 16) messages.push_back(m);
    if (fatal) abort.store(1);
  }
};
inline Errors& errors() { static Errors e; return e; }

// ---- per OS thread scheduler state --------------------------------------------------------
// checked mode: a threadgroup-memory access since the fiber's last scheduling point
struct Access { unsigned char* p; unsigned size; unsigned char snap[16]; const void* pc; const char* name; long long index; };
// trace mode: one lane's access (buffer -1 for threadgroup memory and matrix operations)
struct TraceRec { int kind, buffer; unsigned simdgroup, seq; long long offset; unsigned bytes; };

struct Worker {
  std::vector<Fiber> fibers;
  std::vector<std::vector<Access>> logs;   // per fiber (checked mode)
#if !defined(__x86_64__)
  std::vector<ucontext_t> ucs;             // per fiber
  ucontext_t sched_uc;
#endif
  int count = 0;
  void* sched_sp = nullptr;
  Fiber* current = nullptr;
  void* const* buffers = nullptr;
  const long long* meta = nullptr;
  unsigned char* tg_memory = nullptr;
  size_t tg_capacity = 0;
  unsigned tg_epoch = 0;
  std::vector<unsigned> sg_epoch;
  const Launch* launch = nullptr;
  bool failed = false;
  // checked mode: shadow of threadgroup memory, one record per byte offset
  struct Shadow { int writer, reader; unsigned wepoch, repoch, wsg, rsg; const void* wpc; const void* rpc; };
  std::vector<Shadow> shadow;
  int races = 0;
  // trace mode: this threadgroup's accesses not yet counted, and this worker's counts (trace_layout)
  std::vector<TraceRec> trace_recs;
  std::vector<long long> trace_counts;
  int trace_buffer = 0;      // the buffer the last device access hit (the next one likely hits it again)
  // faults: where a fatal signal in a fiber jumps to, and the fiber stacks' guard pages
  sigjmp_buf escape;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
};
inline thread_local Worker* tls_worker = nullptr;
inline Worker& worker() { return *tls_worker; }
Fiber& self() { return *tls_worker->current; }
unsigned char* tg_memory() { return tls_worker->tg_memory; }

constexpr size_t kStackBytes = 64 * 1024;   // each emulated thread's private memory (its fiber stack)
constexpr size_t kGuardBytes = 4096;        // a PROT_NONE page below each stack: an overflow faults there

// ---- context switch ---------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void mf_ctx_switch(void** save_sp, void* load_sp);
extern "C" void mf_fiber_trampoline();
asm(R"(
.text
.p2align 4
.hidden mf_ctx_switch
.globl mf_ctx_switch
.type mf_ctx_switch,@function
mf_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size mf_ctx_switch,.-mf_ctx_switch
.p2align 4
.hidden mf_fiber_trampoline
.globl mf_fiber_trampoline
.type mf_fiber_trampoline,@function
mf_fiber_trampoline:
  movq %r12, %rdi
  call mf_fiber_main
  ud2
.size mf_fiber_trampoline,.-mf_fiber_trampoline
)");
#endif

extern "C" [[gnu::visibility("hidden")]] void mf_fiber_main(Fiber* f);

inline void flush_accesses(Worker& w, Fiber& f);
inline void trace_early(Worker& w);
constexpr int kPerBuffer = 6, kTail = 8, kFunctions = 6, kFences = 7;   // trace mode's counts (see Tracer)
inline void trace_meet(Worker& w, Fiber** lanes, int count, int counter);

void to_scheduler() {
  Worker& w = worker();
  Fiber* f = w.current;
  if (w.launch->races && !w.logs[f->index].empty()) flush_accesses(w, *f);
#if defined(__x86_64__)
  mf_ctx_switch(&f->sp, w.sched_sp);
#else
  swapcontext(&w.ucs[f->index], &w.sched_uc);
#endif
}

inline void resume(Fiber& f) {
  Worker& w = worker();
  w.current = &f;
#if defined(__x86_64__)
  mf_ctx_switch(&w.sched_sp, f.sp);
#else
  swapcontext(&w.sched_uc, &w.ucs[f.index]);
#endif
  w.current = nullptr;
}

#if !defined(__x86_64__)
inline void ucontext_entry(unsigned hi, unsigned lo) {
  mf_fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}
#endif

inline void start_fiber(Fiber& f) {
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t csr[2] = {0x1F80u, 0x037Fu};
  std::memcpy(&sp[0], csr, 8);   // mxcsr, x87 control word
  sp[1] = 0;                     // r15
  sp[2] = 0;                     // r14
  sp[3] = 0;                     // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);  // r12 -> first argument of mf_fiber_main
  sp[5] = 0;                     // rbx
  sp[6] = 0;                     // rbp
  sp[7] = reinterpret_cast<uint64_t>(&mf_fiber_trampoline);
  f.sp = sp;
#else
  ucontext_t& uc = worker().ucs[f.index];
  getcontext(&uc);
  uc.uc_stack.ss_sp = f.stack;
  uc.uc_stack.ss_size = kStackBytes;
  uc.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&uc, (void (*)())ucontext_entry, 2, unsigned(p >> 32), unsigned(p & 0xffffffffu));
#endif
}

// ---- reporting helpers --------------------------------------------------------------------
inline std::string pos_str(const Fiber& f) {
  const Launch& L = *worker().launch;
  char buf[160];
  std::snprintf(buf, sizeof buf, "thread (%u,%u,%u) of threadgroup (%u,%u,%u)",
                f.tg_pos.x * L.nominal_tg.x + f.pos_in_tg.x, f.tg_pos.y * L.nominal_tg.y + f.pos_in_tg.y,
                f.tg_pos.z * L.nominal_tg.z + f.pos_in_tg.z, f.tg_pos.x, f.tg_pos.y, f.tg_pos.z);
  return buf;
}

// A program counter turned into text "@pc:0x..."; Python maps it to an MSL line with addr2line.
inline std::string pc_str(const void* pc) {
  Dl_info info;
  char buf[64];
  if (pc && dladdr(pc, &info) && info.dli_fbase) {
    std::snprintf(buf, sizeof buf, "@pc:0x%lx", (unsigned long)((const char*)pc - (const char*)info.dli_fbase - 1));
    return buf;
  }
  return "@pc:?";
}

[[noreturn]] inline void fail(const std::string& message) {
  errors().add(message, true);
  Worker& w = worker();
  w.failed = true;
  self().state = State::Done;
  to_scheduler();
  __builtin_unreachable();
}

// ---- checked mode: threadgroup-memory data races ---------------------------------------------
// A fiber runs alone between scheduling points, so an element whose value changed since the
// access was logged was written by this thread; otherwise it was read. Two accesses by different
// threads in the same barrier interval, at least one a write, are a race (threads of one
// SIMD-group are ordered by simdgroup_barrier as well).
inline std::string race_report(Worker& w, const Access& a, const char* mine, int other, const char* theirs,
                               const void* their_pc) {
  const Launch& L = *w.launch;
  Fiber& me = *w.current;
  Fiber& o = w.fibers[other];
  char buf[400];
  std::snprintf(buf, sizeof buf,
                "%s: threadgroup memory race on %s[%lld] in threadgroup (%u,%u,%u): thread (%u,%u,%u) %s it at %s and "
                "thread (%u,%u,%u) %s it at %s with no barrier in between",
                L.kernel, a.name, a.index, me.tg_pos.x, me.tg_pos.y, me.tg_pos.z, o.pos_in_tg.x, o.pos_in_tg.y,
                o.pos_in_tg.z, theirs, pc_str(their_pc).c_str(), me.pos_in_tg.x, me.pos_in_tg.y, me.pos_in_tg.z, mine,
                pc_str(a.pc).c_str());
  return buf;
}

inline bool ordered(Worker& w, int other, unsigned epoch, unsigned sg_epoch) {
  Fiber& me = *w.current;
  if (epoch != w.tg_epoch) return true;
  return w.fibers[other].simdgroup == me.simdgroup && sg_epoch != w.sg_epoch[me.simdgroup];
}

inline void flush_accesses(Worker& w, Fiber& f) {
  const int me = int(f.index);
  const unsigned sgep = w.sg_epoch[f.simdgroup];
  std::vector<Access>& log = w.logs[f.index];
  for (const auto& a : log) {
    size_t off = size_t(a.p - w.tg_memory);
    if (off >= w.shadow.size()) continue;
    Worker::Shadow& s = w.shadow[off];
    const bool wrote = std::memcmp(a.p, a.snap, std::min<unsigned>(a.size, 16)) != 0;
    std::string report;
    if (s.writer >= 0 && s.writer != me && !ordered(w, s.writer, s.wepoch, s.wsg))
      report = race_report(w, a, wrote ? "wrote" : "read", s.writer, "wrote", s.wpc);
    else if (wrote && s.reader >= 0 && s.reader != me && !ordered(w, s.reader, s.repoch, s.rsg))
      report = race_report(w, a, "wrote", s.reader, "read", s.rpc);
    if (!report.empty() && w.races++ < 8) errors().add(report, false);
    if (wrote) { s.writer = me; s.wepoch = w.tg_epoch; s.wsg = sgep; s.wpc = a.pc; }
    else { s.reader = me; s.repoch = w.tg_epoch; s.rsg = sgep; s.rpc = a.pc; }
  }
  log.clear();
}

// ---- the scheduler for one threadgroup ------------------------------------------------------
inline void resolve_simd(Worker& w, bool& progressed) {
  const int n = w.count;
  Fiber* lanes[32];
  for (int base = 0; base < n; base += 32) {
    const int end = std::min(n, base + 32);
    bool any_running = false, any_simd = false;
    for (int i = base; i < end; i++) {
      State s = w.fibers[i].state;
      any_running |= s == State::Runnable;
      any_simd |= s == State::AtSimd;
    }
    if (any_running || !any_simd) continue;
    // Lanes waiting at the same operation and call site execute it together (the active set).
    for (int i = base; i < end; i++) {
      Fiber& lead = w.fibers[i];
      if (lead.state != State::AtSimd) continue;
      int count = 0;
      for (int j = i; j < end; j++) {
        Fiber& o = w.fibers[j];
        if (o.state == State::AtSimd && o.simd_fn == lead.simd_fn && o.line == lead.line) lanes[count++] = &o;
      }
      lead.simd_fn(lanes, count);
      for (int k = 0; k < count; k++) lanes[k]->state = State::Runnable;
      if (!w.trace_counts.empty()) trace_meet(w, lanes, count, lead.simd_fn == &simd_sync ? kFences : kFunctions);
      stats().simd_lanes.fetch_add(count, std::memory_order_relaxed);
      progressed = true;
    }
  }
}

inline std::string thread_list(Worker& w, State state, int line, bool match_line) {
  std::string out;
  int shown = 0, total = 0;
  for (int i = 0; i < w.count; i++) {
    Fiber& f = w.fibers[i];
    if (f.state != state || (match_line && f.line != line)) continue;
    total++;
    if (shown < 4) {
      char buf[48];
      std::snprintf(buf, sizeof buf, "%s(%u,%u,%u)", shown ? ", " : "", f.pos_in_tg.x, f.pos_in_tg.y, f.pos_in_tg.z);
      out += buf;
      shown++;
    }
  }
  if (total > shown) out += ", ... (" + std::to_string(total) + " threads)";
  return out;
}

inline void run_threadgroup(Worker& w) {
  const int n = w.count;
  for (int i = 0; i < n; i++) {
    w.fibers[i].state = State::Runnable;
    start_fiber(w.fibers[i]);
  }
  w.tg_epoch = 0;
  std::fill(w.sg_epoch.begin(), w.sg_epoch.end(), 0u);
  if (w.launch->races) {
    for (auto& a : w.shadow) a = Worker::Shadow{-1, -1, ~0u, ~0u, 0, 0, nullptr, nullptr};
  }
  for (;;) {
    bool progressed = false;
    for (int i = 0; i < n; i++) {
      if (w.fibers[i].state == State::Runnable) {
        resume(w.fibers[i]);
        progressed = true;
        if (w.failed || errors().abort.load(std::memory_order_relaxed)) return;
      }
    }
    resolve_simd(w, progressed);
    if (!w.trace_recs.empty()) trace_early(w);
    if (progressed) continue;
    int done = 0, at_barrier = 0, at_simd = 0;
    for (int i = 0; i < n; i++) {
      State s = w.fibers[i].state;
      done += s == State::Done;
      at_barrier += s == State::AtBarrier;
      at_simd += s == State::AtSimd;
    }
    if (done == n) return;
    const Launch& L = *w.launch;
    char head[200];
    Fiber& f0 = *std::find_if(w.fibers.begin(), w.fibers.begin() + n,
                              [](const Fiber& f) { return f.state == State::AtBarrier || f.state == State::AtSimd; });
    std::snprintf(head, sizeof head, "%s: threadgroup (%u,%u,%u): ", L.kernel, f0.tg_pos.x, f0.tg_pos.y, f0.tg_pos.z);
    if (at_barrier && !at_simd && done == 0) {
      // Everyone is at a barrier: they must all be at the same one.
      int line = f0.line;
      bool same = true;
      for (int i = 0; i < n; i++) same &= w.fibers[i].line == line;
      if (same) {
        for (int i = 0; i < n; i++) w.fibers[i].state = State::Runnable;
        stats().barrier_crossings.fetch_add(n, std::memory_order_relaxed);
        if (!w.trace_counts.empty()) {
          Fiber* all[1024];
          for (int i = 0; i < n; i++) all[i] = &w.fibers[i];
          trace_meet(w, all, n, -1);
        }
        w.tg_epoch++;
        continue;
      }
      int other = 0;
      for (int i = 0; i < n; i++) if (w.fibers[i].line != line) { other = w.fibers[i].line; break; }
      errors().add(std::string(head) + "divergent barrier: threads " + thread_list(w, State::AtBarrier, line, true) +
                   " wait at the barrier on line " + std::to_string(line) + " while threads " +
                   thread_list(w, State::AtBarrier, other, true) + " wait at the barrier on line " + std::to_string(other),
                   true);
      w.failed = true;
      return;
    }
    std::string msg = std::string(head) + "barrier on line " + std::to_string(f0.line) + " is not reached by every live thread: threads " +
                      thread_list(w, f0.state, f0.line, true) + " wait there";
    if (done) msg += ", while threads " + thread_list(w, State::Done, 0, false) + " already returned";
    errors().add(msg, true);
    w.failed = true;
    return;
  }
}

// ---- threadgroup memory ------------------------------------------------------------------
// The kernel's declarations, as the linker gathered them into the `mf_tg` section.
extern "C" [[gnu::weak, gnu::visibility("hidden")]] const TgEntry __start_mf_tg[];
extern "C" [[gnu::weak, gnu::visibility("hidden")]] const TgEntry __stop_mf_tg[];

struct TgRegistry {
  size_t total = 0;     // sum of declared sizes (what Metal compares with its limit)
  size_t arena = 0;     // with 16-byte alignment of each declaration
  std::vector<size_t> offsets;   // by declaration id
  TgRegistry() {
    std::vector<TgEntry> entries(__start_mf_tg, __stop_mf_tg);
    std::sort(entries.begin(), entries.end(), [](const TgEntry& a, const TgEntry& b) { return a.id < b.id; });
    for (size_t i = 0; i < entries.size(); i++) {
      const TgEntry& e = entries[i];
      if (e.id < 0 || e.id > (1 << 20) || (i && e.id == entries[i - 1].id)) continue;
      if (offsets.size() <= size_t(e.id)) offsets.resize(size_t(e.id) + 1, 0);
      offsets[size_t(e.id)] = arena;
      total += e.size;
      arena += (e.size + 15) & ~size_t(15);
    }
  }
};
inline TgRegistry& tg_registry() { static TgRegistry r; return r; }
size_t tg_offset(int id) { return tg_registry().offsets[size_t(id)]; }
size_t tg_bytes() { return tg_registry().arena; }

void simd_sync(Fiber** lanes, int) { worker().sg_epoch[lanes[0]->simdgroup]++; }

// ---- checked mode: reports and the access log ------------------------------------------------
void out_of_bounds(const char* what, const char* name, long long index, long long size, const void* pc) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s: out-of-bounds access to %s '%s' at element %lld (it has %lld elements) by %s at %s",
                worker().launch->kernel, what, name, index, size, pos_str(self()).c_str(), pc_str(pc).c_str());
  fail(buf);
}

void tg_log(void* p, unsigned size, const char* name, long long index, const void* pc) {
  // lockstep: every lane makes its n-th threadgroup access before any makes its (n+1)-th (the
  // scheduler resumes the runnable lanes in turn), as a SIMD-group's lanes on Metal execute each
  // instruction together; code that shares threadgroup memory within a SIMD-group without a
  // barrier (llama.cpp's flash attention) then reads what Metal's lanes read
  if (worker().launch->lockstep) to_scheduler();
  if (!worker().launch->races) return;
  Access a;
  a.p = static_cast<unsigned char*>(p);
  a.size = size;
  std::memcpy(a.snap, p, std::min<unsigned>(size, 16));
  a.pc = pc;
  a.name = name;
  a.index = index;
  worker().logs[self().index].push_back(a);
}

bool device_buffer(const void* p, unsigned char*& start, long long& bytes, const char*& name) {
  const Launch& L = *worker().launch;
  for (int i = 0; i < L.buffers; i++) {
    unsigned char* s = static_cast<unsigned char*>(L.data[i]);
    if (s && p >= s && p < s + L.bytes[i]) {
      start = s;
      bytes = L.bytes[i];
      name = L.names[i];
      return true;
    }
  }
  return false;
}

// ---- trace mode: counts per SIMD-group instruction ---------------------------------------------
// A SIMD-group instruction is the n-th access of each lane of a SIMD-group in its threadgroup
// (exact where control flow is uniform across the SIMD-group). A threadgroup's accesses are
// counted when it ends, or earlier, up to the instructions every live lane has passed, when many
// are waiting; so the dispatch's size costs time, not memory. Counts, as mf_launch_traced writes them:
// per buffer accesses, instructions, 32-, 64- and 128-byte sectors (summed over instructions) and
// the footprint (distinct bytes); then threadgroup accesses, instructions and bank conflicts,
// SIMD-group matrix loads, stores and multiplies, SIMD-group functions run (multiplies among them)
// and simdgroup_barrier fences (apart: a fence exchanges no data between lanes).
// (kPerBuffer, kTail, kFunctions, kFences: declared with trace_meet above)
constexpr size_t kCountAt = size_t(1) << 21;   // waiting accesses that make a threadgroup count early
struct Tracer {
  bool on = false;
  int buffers = 0;
  std::vector<std::vector<std::atomic<unsigned long long>>> seen;   // per buffer, a bit per byte touched
  std::mutex mu;
  std::vector<long long> counts;
};
inline Tracer& tracer() { static Tracer t; return t; }

void trace(int kind, const void* address, unsigned bytes) {
  Fiber& f = self();
  if (f.trace_quiet || !tracer().on) return;
  Worker& w = worker();
  TraceRec r{kind, -1, f.simdgroup, f.trace_seq++, 0, bytes};
  const unsigned char* a = static_cast<const unsigned char*>(address);
  if (kind == kTraceDevice) {
    const Launch& L = *w.launch;
    for (int k = 0; k < L.buffers && r.buffer < 0; k++) {
      const int i = (w.trace_buffer + k) % L.buffers;
      const unsigned char* s = static_cast<const unsigned char*>(L.data[i]);
      if (s && a >= s && a < s + L.bytes[i]) r.buffer = w.trace_buffer = i, r.offset = a - s;
    }
    if (r.buffer < 0) return;   // bounds checks stop any access outside the buffers first
  } else if (kind == kTraceThreadgroup) {
    r.offset = a - w.tg_memory;
  }
  w.trace_recs.push_back(r);
}

// Distinct `size`-byte sectors the lanes' byte ranges cover, `g` sorted by offset: the union of
// each lane's run of sectors.
inline long long sectors(TraceRec* const* g, int m, long long size) {
  long long total = 0, end = -1;
  for (int i = 0; i < m; i++) {
    const long long first = g[i]->offset / size, last = (g[i]->offset + g[i]->bytes - 1) / size;
    if (last <= end) continue;
    total += last - std::max(first - 1, end);
    end = last;
  }
  return total;
}

// The bytes [offset, offset + bytes) marked seen, a 64-bit word at a time.
inline void mark(std::vector<std::atomic<unsigned long long>>& seen, long long offset, long long bytes) {
  for (long long b = offset; b < offset + bytes;) {
    const long long in_word = std::min<long long>(64 - (b & 63), offset + bytes - b);
    const unsigned long long bits = (in_word == 64 ? ~0ull : ((1ull << in_word) - 1)) << (b & 63);
    std::atomic<unsigned long long>& word = seen[size_t(b >> 6)];
    if ((word.load(std::memory_order_relaxed) & bits) != bits) word.fetch_or(bits, std::memory_order_relaxed);
    b += in_word;
  }
}

// One SIMD-group instruction: the lanes' records `g` of one kind (and buffer).
inline void count_instruction(Worker& w, TraceRec** g, int m) {
  const TraceRec& r0 = *g[0];
  for (int i = 1; i < m; i++)   // by offset (lanes mostly come in order: insertion sort)
    for (int j = i; j > 0 && g[j - 1]->offset > g[j]->offset; j--) std::swap(g[j - 1], g[j]);
  if (r0.kind == kTraceDevice) {
    long long* c = &w.trace_counts[size_t(r0.buffer) * kPerBuffer];
    c[0] += m;
    c[1] += 1;
    c[2] += sectors(g, m, 32);
    c[3] += sectors(g, m, 64);
    c[4] += sectors(g, m, 128);
    std::vector<std::atomic<unsigned long long>>& seen = tracer().seen[size_t(r0.buffer)];
    long long lo = g[0]->offset, hi = g[0]->offset + g[0]->bytes;   // contiguous runs marked at once
    for (int i = 1; i < m; i++) {
      if (g[i]->offset > hi) {
        mark(seen, lo, hi - lo);
        lo = g[i]->offset;
      }
      hi = std::max(hi, g[i]->offset + (long long)g[i]->bytes);
    }
    mark(seen, lo, hi - lo);
    return;
  }
  long long* t = &w.trace_counts[size_t(tracer().buffers) * kPerBuffer];
  if (r0.kind != kTraceThreadgroup) {
    t[3 + r0.kind - kTraceMatrixLoad] += 1;
    return;
  }
  // bank conflicts: the most distinct 4-byte words one of the 32 banks serves, less one (a word
  // several lanes read is one broadcast)
  t[0] += m;
  t[1] += 1;
  int per_bank[32] = {}, worst = 0;
  for (int i = 0; i < m; i++) {
    const long long word = g[i]->offset / 4;
    if (i == 0 || word != g[i - 1]->offset / 4) worst = std::max(worst, ++per_bank[word % 32]);
  }
  t[2] += worst - 1;
}

// Count the waiting records of instructions every live lane of their SIMD-group has passed (all of
// them once the threadgroup is done).
inline void trace_count(Worker& w, bool all) {
  std::vector<TraceRec>& recs = w.trace_recs;
  if (recs.empty()) return;
  const int groups = (w.count + 31) / 32;
  std::vector<unsigned> done(size_t(groups), ~0u), lo(size_t(groups), ~0u), hi(size_t(groups), 0u);
  if (!all)
    for (int i = 0; i < w.count; i++)
      if (w.fibers[i].state != State::Done)
        done[w.fibers[i].simdgroup] = std::min(done[w.fibers[i].simdgroup], w.fibers[i].trace_seq);
  for (const TraceRec& r : recs)
    if (r.seq < done[r.simdgroup]) {
      lo[r.simdgroup] = std::min(lo[r.simdgroup], r.seq);
      hi[r.simdgroup] = std::max(hi[r.simdgroup], r.seq + 1);
    }
  std::vector<size_t> base(size_t(groups) + 1, 0);
  for (int s = 0; s < groups; s++) base[s + 1] = base[s] + (lo[s] < hi[s] ? hi[s] - lo[s] : 0);
  // counting sort of the countable records by instruction (SIMD-group, sequence number)
  std::vector<unsigned> first(base[groups] + 1, 0);
  for (const TraceRec& r : recs)
    if (r.seq < done[r.simdgroup]) first[base[r.simdgroup] + (r.seq - lo[r.simdgroup]) + 1]++;
  for (size_t i = 1; i < first.size(); i++) first[i] += first[i - 1];
  std::vector<TraceRec*> order(first.back());
  std::vector<unsigned> fill(first.begin(), first.end() - 1);
  for (TraceRec& r : recs)
    if (r.seq < done[r.simdgroup]) order[fill[base[r.simdgroup] + (r.seq - lo[r.simdgroup])]++] = &r;
  TraceRec* g[64];
  for (size_t i = 0; i + 1 < first.size(); i++) {
    const unsigned a = first[i], b = first[i + 1];
    bool taken[64] = {};
    for (unsigned j = a; j < b; j++) {   // divergent lanes may reach different kinds at one number
      if (taken[j - a]) continue;
      int m = 0;
      for (unsigned k = j; k < b && m < 64; k++)
        if (!taken[k - a] && order[k]->kind == order[j]->kind && order[k]->buffer == order[j]->buffer) {
          taken[k - a] = true;
          g[m++] = order[k];
        }
      count_instruction(w, g, m);
    }
  }
  recs.erase(std::remove_if(recs.begin(), recs.end(), [&](const TraceRec& r) { return r.seq < done[r.simdgroup]; }),
             recs.end());
}

// Lanes meeting at a barrier or a SIMD-group function continue in step: their next accesses are
// one instruction again, however many each made before (divergent code, bounds-checked tails).
// `counter`: the tail slot the meeting counts in (kFunctions, kFences), or -1 (a barrier).
inline void trace_meet(Worker&, Fiber** lanes, int count, int counter) {
  unsigned seq = 0;
  for (int i = 0; i < count; i++) seq = std::max(seq, lanes[i]->trace_seq);
  for (int i = 0; i < count; i++) lanes[i]->trace_seq = seq;
  if (counter >= 0) worker().trace_counts[size_t(tracer().buffers) * kPerBuffer + counter] += 1;
}

void trace_simdgroup_operation(int kind) {
  if (worker().trace_counts.empty()) return;
  worker().trace_counts[size_t(tracer().buffers) * kPerBuffer + 3 + kind - kTraceMatrixLoad] += 1;
}

inline void trace_early(Worker& w) {
  if (w.trace_recs.size() > kCountAt) trace_count(w, false);
}

// ---- faults: errors, never a dead process ----------------------------------------------------
// A kernel runs on worker threads in fibers. While one does, SIGFPE, SIGSEGV and SIGBUS are ours:
// integer division by zero gives 0 (a GPU gives a value, not a trap; checked mode reports it), a
// fault in a guard page or anywhere else ends the dispatch with an error. A signal on any other
// thread goes to the handler that was installed before the dispatch. A time limit or Ctrl-C ends
// the whole worker process (runner.py). x86-64 Linux only (where the emulator is for).

struct GuardRange { const char* lo; const char* hi; const char* buffer; const char* data_end; };
struct FaultState {
  std::mutex mu;
  std::vector<GuardRange> guards;                 // device buffers' guard pages
  struct sigaction previous[3];
};
inline FaultState& faults() { static FaultState s; return s; }
constexpr int kSignals[3] = {SIGFPE, SIGSEGV, SIGBUS};

inline std::string here_str(const Fiber& f, const void* pc) {
  return std::string(worker().launch->kernel) + ": " + pos_str(f) + " at " + pc_str(pc);
}

[[noreturn]] inline void escape_with(const std::string& message) {
  Worker& w = worker();
  if (!message.empty()) errors().add(message, true);
  errors().abort.store(1);
  w.failed = true;
  siglongjmp(w.escape, 1);
}

#if defined(__x86_64__) && defined(__linux__)
// Length of a DIV/IDIV instruction (F6/F7 with ModRM reg 6 or 7) at pc, or 0 if it is none.
inline int div_length(const unsigned char* pc, bool* byte_form) {
  int n = 0;
  while (pc[n] == 0x66 || pc[n] == 0x67 || pc[n] == 0xF2 || pc[n] == 0xF3 || pc[n] == 0x2E || pc[n] == 0x3E) n++;
  if ((pc[n] & 0xF0) == 0x40) n++;                               // REX
  if (pc[n] != 0xF6 && pc[n] != 0xF7) return 0;
  *byte_form = pc[n] == 0xF6;
  const unsigned char modrm = pc[n + 1];
  const int mod = modrm >> 6, reg = (modrm >> 3) & 7, rm = modrm & 7;
  if (reg != 6 && reg != 7) return 0;
  n += 2;
  if (mod != 3 && rm == 4) {                                     // SIB
    const int base = pc[n] & 7;
    n += 1;
    if (mod == 0 && base == 5) n += 4;
  }
  if (mod == 0 && rm == 5) n += 4;                               // RIP-relative
  if (mod == 1) n += 1;
  if (mod == 2) n += 4;
  return n;
}

inline void on_signal(int sig, siginfo_t* info, void* raw) {
  Worker* w = tls_worker;
  auto* uc = static_cast<ucontext_t*>(raw);
  const bool in_kernel = w && w->current;
  if (!in_kernel) {
    // not ours: hand the signal to whoever had it before the dispatch, as if we were not here
    FaultState& s = faults();
    for (int i = 0; i < 3; i++)
      if (kSignals[i] == sig) sigaction(sig, &s.previous[i], nullptr);
    return;   // the instruction faults again, now under the previous handler
  }
  Fiber& f = *w->current;
  const unsigned char* pc = reinterpret_cast<const unsigned char*>(uc->uc_mcontext.gregs[REG_RIP]);
  if (sig == SIGFPE) {
    bool byte_form = false;
    const int len = div_length(pc, &byte_form);
    if (len == 0) escape_with(here_str(f, pc + 1) + ": arithmetic fault");
    if (byte_form) uc->uc_mcontext.gregs[REG_RAX] &= ~0xFFFFll;   // AL quotient, AH remainder
    else uc->uc_mcontext.gregs[REG_RAX] = uc->uc_mcontext.gregs[REG_RDX] = 0;
    uc->uc_mcontext.gregs[REG_RIP] += len;
    if (w->launch->checked) errors().add(here_str(f, pc + 1) + ": integer division by zero (or overflow); "
                                         "a GPU gives an undefined value, the emulator gives 0", false);
    return;
  }
  const char* addr = static_cast<const char*>(info->si_addr);
  const bool write = uc->uc_mcontext.gregs[REG_ERR] & 2;
  if (addr >= w->stacks && addr < w->stacks + w->stacks_bytes)
    escape_with(here_str(f, pc + 1) + ": private memory overflow: the thread used more than the " +
                std::to_string(kStackBytes / 1024) + " KiB of private memory (stack) the emulator gives each "
                "thread (a large private array, or recursion)");
  for (const GuardRange& g : faults().guards) {
    if (addr < g.lo || addr >= g.hi) continue;
    if (!write) {
      // an out-of-bounds read returns zeros, as Apple GPUs' bounds-checked loads do; checked mode reports it
      mprotect(const_cast<char*>(g.lo), size_t(g.hi - g.lo), PROT_READ);
      return;
    }
    escape_with(here_str(f, pc + 1) + ": out-of-bounds write to device buffer '" + g.buffer + "' (" +
                std::to_string(addr - g.data_end) + " bytes past its end, or before its start; "
                "run with checked=True for the exact index)");
  }
  escape_with(here_str(f, pc + 1) + ": invalid " + (write ? "write to" : "read of") + " memory address " +
              std::to_string(reinterpret_cast<uintptr_t>(addr)) + " (a pointer outside every buffer)");
}

// Installed for one dispatch on the calling thread; each worker thread registers itself and an
// alternate signal stack (a fault on an overflowed fiber stack needs somewhere else to run).
struct FaultScope {
  Worker& w;
  stack_t alt{}, old_alt{};
  bool owner = false;
  explicit FaultScope(Worker& worker) : w(worker) {
    FaultState& s = faults();
    std::lock_guard<std::mutex> g(s.mu);
    alt.ss_size = 64 * 1024;
    alt.ss_sp = std::malloc(alt.ss_size);
    sigaltstack(&alt, &old_alt);
  }
  ~FaultScope() {
    FaultState& s = faults();
    std::lock_guard<std::mutex> g(s.mu);
    sigaltstack(&old_alt, nullptr);
    std::free(alt.ss_sp);
  }
};

inline void install_handlers() {
  FaultState& s = faults();
  struct sigaction sa {};
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < 3; i++) sigaction(kSignals[i], &sa, &s.previous[i]);
}

inline void restore_handlers() {
  FaultState& s = faults();
  for (int i = 0; i < 3; i++) sigaction(kSignals[i], &s.previous[i], nullptr);
}

// Device buffers, copied into their own mappings with a guard page before and after: a write
// past either end faults there and becomes an error naming the buffer (instead of corrupting
// the host's heap); a read there returns zeros.
struct GuardedBuffers {
  std::vector<void*> ptrs;
  struct Region { char* base; size_t bytes; char* data; size_t size; void* host; bool output; };
  std::vector<Region> regions;
  GuardedBuffers(void** host, const long long* sizes, const char* const* names, int n, int first_output, bool guard) {
    ptrs.assign(host, host + n);
    if (!guard) return;
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (int i = 0; i < n; i++) {
      const size_t size = size_t(sizes[i]);
      if (size == 0) continue;
      const size_t padded = (size + 15) & ~size_t(15);
      const size_t data_pages = (padded + page - 1) / page * page;
      const size_t bytes = data_pages + 2 * page;
      char* base = static_cast<char*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      if (base == MAP_FAILED) continue;   // out of address space: run this buffer unguarded
      mprotect(base, page, PROT_NONE);
      mprotect(base + page + data_pages, page, PROT_NONE);
      char* data = base + page + (data_pages - padded);
      std::memcpy(data, host[i], size);
      ptrs[i] = data;
      regions.push_back({base, bytes, data, size, host[i], i >= first_output});
      faults().guards.push_back({base, base + page, names[i], data + size});
      faults().guards.push_back({base + page + data_pages, base + bytes, names[i], data + size});
    }
  }
  ~GuardedBuffers() {
    for (const Region& r : regions) {
      if (r.output) std::memcpy(r.host, r.data, r.size);
      munmap(r.base, r.bytes);
    }
    faults().guards.clear();
  }
};
#else
struct FaultScope { explicit FaultScope(Worker&) {} };
inline void install_handlers() {}
inline void restore_handlers() {}
struct GuardedBuffers {
  std::vector<void*> ptrs;
  GuardedBuffers(void** host, const long long*, const char* const*, int n, int, bool) : ptrs(host, host + n) {}
};
#endif

// ---- dispatch -----------------------------------------------------------------------------
inline int dispatch(const Launch& L, int workers, void* const* buffers, const long long* meta) {
  errors().messages.clear();
  errors().abort.store(0);
  stats().threads = 0;
  stats().barrier_crossings = 0;
  stats().simd_lanes = 0;
  const unsigned long total_groups = (unsigned long)L.groups.x * L.groups.y * L.groups.z;
  std::atomic<unsigned long> next{0};
  const int nominal = int(L.nominal_tg.x * L.nominal_tg.y * L.nominal_tg.z);
  auto work = [&]() {
    Worker w;
    tls_worker = &w;
    w.launch = &L;
    w.buffers = buffers;
    w.meta = meta;
    w.fibers.resize(nominal);
    if (L.races) w.logs.resize(nominal);
#if !defined(__x86_64__)
    w.ucs.resize(nominal);
#endif
    const size_t slot = kGuardBytes + kStackBytes;
    w.stacks_bytes = slot * nominal;
    w.stacks = static_cast<char*>(mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    for (int i = 0; i < nominal; i++) {
      mprotect(w.stacks + slot * i, kGuardBytes, PROT_NONE);
      w.fibers[i].stack = w.stacks + slot * i + kGuardBytes;
    }
    FaultScope fault_scope(w);
    w.tg_capacity = tg_registry().arena + 16;
    std::vector<unsigned char> arena(w.tg_capacity);
    w.tg_memory = arena.data();
    w.sg_epoch.assign((nominal + 31) / 32, 0u);
    if (L.races) w.shadow.resize(w.tg_capacity);
    if (tracer().on) w.trace_counts.assign(tracer().counts.size(), 0);
    if (sigsetjmp(w.escape, 1) == 0) for (;;) {
      unsigned long g = next.fetch_add(1);
      if (g >= total_groups || errors().abort.load()) break;
      u3 tp{unsigned(g % L.groups.x), unsigned((g / L.groups.x) % L.groups.y), unsigned(g / ((unsigned long)L.groups.x * L.groups.y))};
      u3 sz{std::min(L.nominal_tg.x, L.grid.x - tp.x * L.nominal_tg.x), std::min(L.nominal_tg.y, L.grid.y - tp.y * L.nominal_tg.y),
            std::min(L.nominal_tg.z, L.grid.z - tp.z * L.nominal_tg.z)};
      int n = 0;
      for (unsigned z = 0; z < sz.z; z++)
        for (unsigned y = 0; y < sz.y; y++)
          for (unsigned x = 0; x < sz.x; x++, n++) {
            Fiber& f = w.fibers[n];
            f.pos_in_tg = {x, y, z};
            f.tg_pos = tp;
            f.tg_size = sz;
            f.index = unsigned(n);
            f.lane = unsigned(n) % 32u;
            f.simdgroup = unsigned(n) / 32u;
            f.trace_seq = 0;
            f.trace_quiet = 0;
          }
      w.count = n;
      stats().threads.fetch_add(n, std::memory_order_relaxed);
      if (L.checked) std::memset(w.tg_memory, 0xA5, w.tg_capacity);  // poison: uninitialised reads look wrong
      run_threadgroup(w);
      if (w.failed) break;
      if (tracer().on) trace_count(w, true);
    }
    if (tracer().on) {
      std::lock_guard<std::mutex> g(tracer().mu);
      for (size_t i = 0; i < w.trace_counts.size(); i++) tracer().counts[i] += w.trace_counts[i];
    }
    w.current = nullptr;
    munmap(w.stacks, w.stacks_bytes);
    tls_worker = nullptr;
  };
  const int nthreads = int(std::max<unsigned long>(1, std::min<unsigned long>(workers, total_groups)));
  std::vector<std::thread> pool;
  install_handlers();
  for (int i = 1; i < nthreads; i++) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  restore_handlers();
  return errors().messages.empty() ? 0 : -1;
}

}  // namespace mf

extern "C" [[gnu::visibility("hidden")]] void mf_fiber_main(mf::Fiber* f) {
  mf::Worker& w = mf::worker();
  mf_kernel_body(w.buffers, w.meta, *w.launch, *f);
  f->state = mf::State::Done;
  mf::to_scheduler();
  __builtin_unreachable();
}

#define MF_EXPORT __attribute__((visibility("default")))
extern "C" {
// meta: grid, threadgroup size and threadgroup counts (3 each), then each buffer's element count;
// checked: 0 plain, 1 bounds- and race-checked, 2 bounds-checked only (a traced run that counts),
// 3 bounds-checked with lanes in lockstep at threadgroup accesses
MF_EXPORT int mf_launch(void** host, const long long* meta, const long long* bytes, int workers, int checked) {
  const mf::KernelInfo& k = mf_kernel_info;
  // outside checked mode (which checks every index itself) buffers get guard pages
  mf::GuardedBuffers guarded(host, bytes, k.buffer_names, k.buffers, k.first_output, !checked);
  mf::Launch L;
  L.grid = {unsigned(meta[0]), unsigned(meta[1]), unsigned(meta[2])};
  L.nominal_tg = {unsigned(meta[3]), unsigned(meta[4]), unsigned(meta[5])};
  L.groups = {unsigned(meta[6]), unsigned(meta[7]), unsigned(meta[8])};
  L.checked = checked;
  L.races = checked == 1;
  L.lockstep = checked == 3;
  L.kernel = k.name;
  L.buffers = k.buffers;
  L.data = guarded.ptrs.data();
  L.bytes = bytes;
  L.names = k.buffer_names;
  return mf::dispatch(L, workers, guarded.ptrs.data(), meta);
}
// A traced launch (emulator/trace.py): buffer N, after the kernel's N, receives the counts.
MF_EXPORT int mf_launch_traced(void** host, const long long* meta, const long long* bytes, int workers, int checked) {
  mf::Tracer& t = mf::tracer();
  const int n = mf_kernel_info.buffers;
  t.buffers = n;
  t.counts.assign(size_t(n) * mf::kPerBuffer + mf::kTail, 0);
  t.seen.clear();
  for (int i = 0; i < n; i++) t.seen.emplace_back(size_t(bytes[i] + 63) / 64);
  t.on = true;
  const int rc = mf_launch(host, meta, bytes, workers, checked);
  t.on = false;
  long long* out = static_cast<long long*>(host[n]);
  std::copy(t.counts.begin(), t.counts.end(), out);
  for (int i = 0; i < n; i++) {
    long long bits = 0;
    for (const auto& word : t.seen[size_t(i)]) bits += __builtin_popcountll(word.load());
    out[size_t(i) * mf::kPerBuffer + 5] = bits;
  }
  t.seen.clear();
  return rc;
}
MF_EXPORT mf::size_t mf_threadgroup_bytes() { return mf::tg_registry().total; }
MF_EXPORT int mf_error_count() { return int(mf::errors().messages.size()); }
MF_EXPORT const char* mf_error(int i) { return mf::errors().messages[i].c_str(); }
MF_EXPORT void mf_stats(long long* out) {
  out[0] = mf::stats().threads;
  out[1] = mf::stats().barrier_crossings;
  out[2] = mf::stats().simd_lanes;
}
}
