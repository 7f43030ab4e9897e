// metalforge emulator, checked mode: bounds-checked device pointers and threadgroup arrays whose
// accesses feed the race detector in mf_runtime.cpp. The MSL rewrite (source.py) turns
// `device T*` / `constant T*` into mf::DevPtr<T> and threadgroup arrays into mf::TgChecked views.
namespace mf {

// The report names the caller's line: these stay out of line so their return address is in the kernel.
[[gnu::noinline, gnu::cold, noreturn]] inline void device_out_of_bounds(const char* name, long long index, long long size) {
  out_of_bounds("device buffer", name, index, size, __builtin_return_address(0));
}
[[gnu::noinline, gnu::cold, noreturn]] inline void tg_out_of_bounds(const char* name, long long index, long long size) {
  out_of_bounds("threadgroup array", name, index, size, __builtin_return_address(0));
}

// Pointer arithmetic for a checked pointer P (DevPtr, TgPtr): it moves P's `p` and keeps the rest.
template <class P>
struct Arithmetic {
  P& me() { return static_cast<P&>(*this); }
  const P& me() const { return static_cast<const P&>(*this); }
  P operator+(long long n) const { P r = me(); r.p += n; return r; }
  P operator-(long long n) const { P r = me(); r.p -= n; return r; }
  friend P operator+(long long n, const P& d) { return d + n; }
  long long operator-(const P& o) const { return me().p - o.p; }
  P& operator+=(long long n) { me().p += n; return me(); }
  P& operator-=(long long n) { me().p -= n; return me(); }
  P& operator++() { ++me().p; return me(); }
  P& operator--() { --me().p; return me(); }
  P operator++(int) { P r = me(); ++me().p; return r; }
  P operator--(int) { P r = me(); --me().p; return r; }
};

template <class T>
struct DevPtr : Arithmetic<DevPtr<T>> {
  T* p = nullptr;
  T* base = nullptr;
  long long count = 0;
  const char* name = "";
  DevPtr() = default;
  DevPtr(decltype(nullptr)) {}
  DevPtr(T* ptr, long long n, const char* nm) : p(ptr), base(ptr), count(n), name(nm) {}
  template <class U, class = metal::enable_if_t<metal::is_convertible<U*, T*>::value>>
  DevPtr(const DevPtr<U>& o) : p(o.p), base(o.base), count(o.count), name(o.name) {}
  // (device const uint8_t*)ptr: the same bytes seen as another element type
  template <class U, class = metal::enable_if_t<!metal::is_convertible<U*, T*>::value>, class = void>
  explicit DevPtr(const DevPtr<U>& o)
      : p((T*)o.p), base((T*)o.base), count(o.count * (long long)sizeof(U) / (long long)sizeof(T)), name(o.name) {}
  // (device T*)&src[i], or a block struct's member array (llama.cpp's `xb->qs`, a plain array in
  // C++): a plain pointer into a bound buffer, checked against that buffer again
  template <class U>
  DevPtr(U* raw) : p((T*)raw), base((T*)raw), name("(not a device buffer)") {
    unsigned char* start;
    long long bytes;
    if (device_buffer(raw, start, bytes, name)) {
      base = (T*)start;
      count = bytes / (long long)sizeof(T);
    }
  }
  [[gnu::always_inline]] inline void check(long long i) const {
    const long long at = (p - base) + i;
    if (at < 0 || at >= count) device_out_of_bounds(name, at, count);
#ifdef MF_TRACE
    trace(kTraceDevice, p + i, unsigned(sizeof(T)));
#endif
  }
  [[gnu::always_inline]] inline T& operator[](long long i) const { check(i); return p[i]; }
  [[gnu::always_inline]] inline T& operator*() const { check(0); return *p; }
  [[gnu::always_inline]] inline T* operator->() const { check(0); return p; }
  operator T*() const { return p; }
};

template <class T> [[gnu::noinline]] inline T& tg_logged(T* p, const char* name, long long index) {
  tg_log(const_cast<void*>(static_cast<const void*>(p)), unsigned(sizeof(T)), name, index, __builtin_return_address(0));
#ifdef MF_TRACE
  trace(kTraceThreadgroup, p, unsigned(sizeof(T)));
#endif
  return *p;
}

// A view of a threadgroup array: indexing checks the bounds of each dimension and logs the
// element for the race detector; the last dimension yields a plain reference.
template <class A>
struct TgChecked {
  using E = metal::remove_extent_t<A>;
  static constexpr long long N = (long long)metal::extent<A>::value;
  E* p;
  const char* name;
  long long flat;    // index of p[0] in the whole array, in innermost elements
  long long total;   // innermost elements in the whole array
  static constexpr long long inner = (long long)(sizeof(E) / sizeof(metal::remove_all_extents_t<A>));
  decltype(auto) operator[](long long i) const {
    if (i < 0 || i >= N) tg_out_of_bounds(name, i, N);
    if constexpr (metal::is_array<E>::value)
      return TgChecked<E>{p[i], name, flat + i * inner, total};
    else
      return tg_logged(&p[i], name, flat + i);
  }
  operator E*() const { return p; }
};

template <class A, int ID>
inline decltype(auto) tg_view(const char* name) {
  A& a = tg_array<A, ID>();
  if constexpr (metal::is_array<A>::value)
    return TgChecked<A>{a, name, 0, (long long)(sizeof(A) / sizeof(metal::remove_all_extents_t<A>))};
  else
    return a;
}

// A `threadgroup T*` (a helper's argument, steel's loaders' destinations): accesses through it are
// logged for the race detector and counted by trace mode, as accesses of the arrays themselves are.
template <class T>
struct TgPtr : Arithmetic<TgPtr<T>> {
  T* p = nullptr;
  TgPtr() = default;
  TgPtr(decltype(nullptr)) {}
  TgPtr(T* ptr) : p(ptr) {}
  template <class A, class = metal::enable_if_t<metal::is_convertible<typename TgChecked<A>::E*, T*>::value>>
  TgPtr(const TgChecked<A>& a) : p(a.p) {}
  template <class U, class = metal::enable_if_t<metal::is_convertible<U*, T*>::value>>
  TgPtr(const TgPtr<U>& o) : p(o.p) {}
  // reinterpret_cast<threadgroup float*>(...) and (threadgroup V*)&tile[i]: the same bytes as another type
  template <class U, class = metal::enable_if_t<!metal::is_convertible<U*, T*>::value>, class = void>
  explicit TgPtr(const TgPtr<U>& o) : p((T*)o.p) {}
  template <class U, class = metal::enable_if_t<!metal::is_convertible<U*, T*>::value>, class = void>
  explicit TgPtr(U* raw) : p((T*)raw) {}
  template <class A, class = metal::enable_if_t<!metal::is_convertible<typename TgChecked<A>::E*, T*>::value>,
            class = void>
  explicit TgPtr(const TgChecked<A>& a) : p((T*)a.p) {}
  // bounded by the threadgroup's memory (its arrays and the host's threadgroup(n) lengths): Metal
  // does not check, and a kernel writing past its allocation (llama.cpp's vec attention at some
  // tunings) would otherwise corrupt the emulator's heap
  [[gnu::always_inline]] inline T& at(long long i) const {
    const long long off = (long long)((unsigned char*)(p + i) - tg_memory());
    const long long n = (long long)(tg_bytes() / sizeof(T));
    if (off < 0 || off / (long long)sizeof(T) >= n) tg_out_of_bounds("threadgroup memory", off / (long long)sizeof(T), n);
    return tg_logged(p + i, "threadgroup memory", off / (long long)sizeof(T));
  }
  T& operator[](long long i) const { return at(i); }
  T& operator*() const { return at(0); }
  T* operator->() const { return &at(0); }
  operator T*() const { return p; }
};

}  // namespace mf

#define MF_TG(T, name, dims, id) decltype(auto) name = mf::tg_view<T dims, id>(#name)
