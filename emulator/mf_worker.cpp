// metalforge emulator: the process a kernel runs in. Started by runner.py with a compiled kernel
// library and one end of a socket; it loads the library, then installs a seccomp filter that
// leaves only the system calls the runtime needs (memory, threads, futexes, its own signals and
// the socket it already holds), and serves launches until the socket closes. A kernel that tries
// anything else (open a file, spawn a process, signal another, use the network) gets SIGSYS and
// the worker ends with a line naming the call; the Python process that asked only sees an error.
//
//   mf_worker LIBRARY FD     (FD: a SOCK_SEQPACKET socket to the parent; fd 2: a capped log file)
//
// Protocol (host byte order; every message one packet):
//   worker -> parent at start:  "MFOK" u64 threadgroup_bytes      or "MFNO" text
//   parent -> worker:           Request, then nbuf i64 meta-tail values, nbuf i64 byte sizes,
//                               nbuf u64 arena offsets (all ones: an unbound buffer, null), then
//                               the entry symbol; optionally with an arena memfd in SCM_RIGHTS
//                               (the worker maps it, replacing the last)
//   worker -> parent:           Reply, then the error messages, each ending with a NUL
#include <dlfcn.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <malloc.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace {

int kSocket = -1;
constexpr int kMaxBuffers = 4096;

struct __attribute__((packed)) Request {
  char magic[4];        // "MFGO"
  int32_t workers, checked, nbuf;
  uint64_t arena_bytes;  // the size of the arena (mapped when a descriptor comes with the request)
  int64_t head[9];      // grid, threadgroup size, threadgroup counts
};

struct __attribute__((packed)) Reply {
  char magic[4];        // "MFRE"
  int32_t rc;           // mf_launch's: 0 ok, -1 errors reported
  int64_t stats[3];
  int32_t errors;
};

using LaunchFn = int (*)(void**, const long long*, const long long*, int, int);

[[noreturn]] void die(const char* what) {
  char line[300];
  const int n = snprintf(line, sizeof line, "mf-worker: %s\n", what);   // one write: allowed under the filter
  if (write(2, line, size_t(n > 0 ? n : 0)) < 0) {}
  _exit(70);
}

void on_sigsys(int, siginfo_t* info, void*) {
  // Async-signal-safe: format by hand, one write (allowed: fd 2), then leave.
  char buf[400] = "mf-worker: forbidden system call ";
  size_t n = strlen(buf);
  int nr = info->si_syscall;
  char digits[12];
  int d = 0;
  do { digits[d++] = char('0' + nr % 10); nr /= 10; } while (nr && d < 11);
  while (d) buf[n++] = digits[--d];
  Dl_info where{};
  if (dladdr(info->si_call_addr, &where) && where.dli_fname) {   // no system call: the loader's own tables
    const char* at = " in ";
    for (const char* s : {at, where.dli_fname, where.dli_sname ? " " : "", where.dli_sname ? where.dli_sname : ""})
      for (; *s && n < sizeof buf - 2; s++) buf[n++] = *s;
  }
  buf[n++] = '\n';
  if (write(2, buf, n) < 0) {}
  syscall(SYS_exit_group, 71);
}

// ---- the seccomp filter -------------------------------------------------------------------------
struct Filter {
  std::vector<sock_filter> code;
  void op(uint16_t c, uint32_t k, uint8_t jt = 0, uint8_t jf = 0) { code.push_back({c, jt, jf, k}); }
  void allow(int nr) {
    op(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(nr), 0, 1);
    op(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  }
  // allowed when the low 32 bits of argument `arg` equal `value`
  void allow_if_arg(int nr, int arg, uint32_t value) {
    op(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(nr), 0, 4);
    op(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args) + 8 * arg);
    op(BPF_JMP | BPF_JEQ | BPF_K, value, 0, 1);
    op(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    op(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
  }
};

void install_filter() {
  Filter f;
  f.op(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, arch));
  f.op(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
  f.op(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
  f.op(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr));
  f.op(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1);   // the x32 ABI: none of ours
  f.op(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS);
  // Memory: the runtime's fiber stacks, guard pages and buffer copies, malloc's arenas.
  for (int nr : {SYS_mmap, SYS_munmap, SYS_mprotect, SYS_madvise, SYS_mremap, SYS_brk})
    f.allow(nr);
  // Threads of one dispatch (clone is checked below), their futexes and bookkeeping.
  for (int nr : {SYS_futex, SYS_set_robust_list, SYS_rseq, SYS_sched_yield, SYS_gettid, SYS_getpid,
                 SYS_exit, SYS_exit_group, SYS_clock_gettime, SYS_clock_nanosleep, SYS_nanosleep,
                 SYS_getrandom, SYS_restart_syscall})
    f.allow(nr);
  // Signals: the runtime's fault handlers on an alternate stack.
  for (int nr : {SYS_rt_sigaction, SYS_rt_sigprocmask, SYS_rt_sigreturn, SYS_sigaltstack})
    f.allow(nr);
  // The worker's own descriptors only: the socket, the log, the arena (nothing can open more).
  for (int nr : {SYS_read, SYS_write, SYS_recvmsg, SYS_sendmsg, SYS_close})
    f.allow(nr);
  // Files: none can be opened (libc probes some, e.g. /sys for the CPU count: they fail as absent)
  for (int nr : {SYS_open, SYS_openat, SYS_openat2, SYS_stat, SYS_lstat, SYS_newfstatat, SYS_access,
                 SYS_faccessat, SYS_faccessat2, SYS_readlink, SYS_readlinkat, SYS_statx}) {
    f.op(BPF_JMP | BPF_JEQ | BPF_K, uint32_t(nr), 0, 1);
    f.op(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EACCES);
  }
  // Signals to this process only (abort(), a thread's cancel); no other process can be reached.
  f.allow_if_arg(SYS_tgkill, 0, uint32_t(getpid()));
  // clone3 cannot be inspected (its flags are behind a pointer): glibc falls back to clone.
  f.op(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, 0, 1);
  f.op(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS);
  // clone: threads of this process, never a new process.
  f.op(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, 0, 4);
  f.op(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, args));
  f.op(BPF_JMP | BPF_JSET | BPF_K, CLONE_THREAD, 0, 1);
  f.op(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
  f.op(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
  f.op(BPF_RET | BPF_K, SECCOMP_RET_TRAP);
  sock_fprog prog{uint16_t(f.code.size()), f.code.data()};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("prctl(PR_SET_NO_NEW_PRIVS) failed");
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) die("the seccomp filter could not be installed");
}

bool send_packet(const void* data, size_t size) {
  iovec io{const_cast<void*>(data), size};
  msghdr msg{};
  msg.msg_iov = &io;
  msg.msg_iovlen = 1;
  return sendmsg(kSocket, &msg, MSG_NOSIGNAL) == ssize_t(size);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: mf_worker LIBRARY FD");
  kSocket = atoi(argv[2]);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigsys;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSYS, &sa, nullptr);
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::string m = std::string("MFNO") + dlerror();
    send_packet(m.data(), m.size());
    return 0;
  }
  auto tg_bytes = reinterpret_cast<size_t (*)()>(dlsym(lib, "mf_threadgroup_bytes"));
  auto stats = reinterpret_cast<void (*)(long long*)>(dlsym(lib, "mf_stats"));
  auto error_count = reinterpret_cast<int (*)()>(dlsym(lib, "mf_error_count"));
  auto error_at = reinterpret_cast<const char* (*)(int)>(dlsym(lib, "mf_error"));
  if (!tg_bytes || !stats || !error_count || !error_at) die("the library lacks the runtime's entry points");
  const uint64_t tg = tg_bytes();
  // malloc counts the CPUs (reading /sys) when a new thread first allocates, unless told how
  // many arenas it may make: tell it, before files are out of reach
  mallopt(M_ARENA_MAX, 8);
  install_filter();
  char hello[12];
  memcpy(hello, "MFOK", 4);
  memcpy(hello + 4, &tg, 8);
  if (!send_packet(hello, sizeof hello)) return 0;

  char* arena = nullptr;
  size_t arena_bytes = 0;
  std::vector<char> packet(sizeof(Request) + size_t(kMaxBuffers) * 24 + 1024);
  for (;;) {
    iovec io{packet.data(), packet.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    msghdr msg{};
    msg.msg_iov = &io;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t got = recvmsg(kSocket, &msg, MSG_CMSG_CLOEXEC);
    if (got <= 0) return 0;   // the parent went away or closed: done
    Request req;
    if (size_t(got) < sizeof req) die("short request");
    memcpy(&req, packet.data(), sizeof req);
    if (memcmp(req.magic, "MFGO", 4) != 0 || req.nbuf < 0 || req.nbuf > kMaxBuffers) die("bad request");
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int fd;
      memcpy(&fd, CMSG_DATA(c), sizeof fd);
      if (arena) munmap(arena, arena_bytes);
      arena_bytes = req.arena_bytes;
      arena = static_cast<char*>(mmap(nullptr, arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
      close(fd);
      if (arena == MAP_FAILED) die("the buffers' shared memory could not be mapped (out of memory?)");
    }
    const size_t n = size_t(req.nbuf);
    const size_t tail = sizeof req + n * 24;
    if (size_t(got) <= tail) die("short request");
    std::vector<long long> meta(9);
    memcpy(meta.data(), packet.data() + offsetof(Request, head), 9 * sizeof(long long));
    std::vector<long long> bytes(n);
    std::vector<void*> host(n ? n : 1);
    const char* p = packet.data() + sizeof req;
    for (size_t i = 0; i < n; i++) {
      int64_t count, size;
      uint64_t offset;
      memcpy(&count, p + 8 * i, 8);
      memcpy(&size, p + 8 * (n + i), 8);
      memcpy(&offset, p + 8 * (2 * n + i), 8);
      meta.push_back(count);
      if (offset == UINT64_MAX && size == 0) {   // an unbound buffer: null, as Metal leaves it
        bytes[i] = 0;
        host[i] = nullptr;
        continue;
      }
      if (offset > arena_bytes || size < 0 || uint64_t(size) > arena_bytes - offset) die("a buffer outside the arena");
      bytes[i] = size;
      host[i] = arena + offset;
    }
    const std::string entry(packet.data() + tail, size_t(got) - tail);
    auto launch = reinterpret_cast<LaunchFn>(dlsym(lib, entry.c_str()));
    Reply reply{};
    memcpy(reply.magic, "MFRE", 4);
    std::string errors;
    if (!launch) {
      reply.rc = -1;
      reply.errors = 1;
      errors = "the library has no entry point `" + entry + "`";
      errors.push_back('\0');
    } else {
      reply.rc = launch(host.data(), meta.data(), bytes.data(), req.workers, req.checked);
      long long s[3];
      stats(s);
      memcpy(reply.stats, s, sizeof s);
      const int count = error_count();
      for (int i = 0; i < count && errors.size() < 60000; i++) {
        errors += error_at(i);
        errors.push_back('\0');
        reply.errors++;
      }
    }
    std::string out(reinterpret_cast<const char*>(&reply), sizeof reply);
    out += errors;
    if (!send_packet(out.data(), out.size())) return 0;
  }
}
