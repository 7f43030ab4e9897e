// metalforge emulator, checked mode: bounds-checked device pointers and threadgroup arrays whose
// accesses feed the race detector in mf_runtime.h. The MSL rewrite (source.py) turns
// `device T*` / `constant T*` into mf::DevPtr<T> and threadgroup arrays into mf::TgChecked views.
namespace mf {

[[gnu::noinline, gnu::cold]] inline void out_of_bounds(const char* what, const char* name, long long index, long long size) {
  const void* pc = __builtin_return_address(0);
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s: out-of-bounds access to %s '%s' at element %lld (it has %lld elements) by %s at %s",
                worker().launch->kernel, what, name, index, size, pos_str(self()).c_str(), pc_str(pc).c_str());
  fail(buf);
}

template <class T>
struct DevPtr {
  T* p = nullptr;
  T* base = nullptr;
  long long count = 0;
  const char* name = "";
  DevPtr() = default;
  DevPtr(std::nullptr_t) {}
  DevPtr(T* ptr, long long n, const char* nm) : p(ptr), base(ptr), count(n), name(nm) {}
  template <class U, class = std::enable_if_t<std::is_convertible<U*, T*>::value>>
  DevPtr(const DevPtr<U>& o) : p(o.p), base(o.base), count(o.count), name(o.name) {}
  // (device const uint8_t*)ptr: the same bytes seen as another element type
  template <class U, class = std::enable_if_t<!std::is_convertible<U*, T*>::value>, class = void>
  explicit DevPtr(const DevPtr<U>& o)
      : p((T*)o.p), base((T*)o.base), count(o.count * (long long)sizeof(U) / (long long)sizeof(T)), name(o.name) {}
  [[gnu::always_inline]] inline void check(long long i) const {
    const long long at = (p - base) + i;
    if (at < 0 || at >= count) out_of_bounds("device buffer", name, at, count);
  }
  [[gnu::always_inline]] inline T& operator[](long long i) const { check(i); return p[i]; }
  [[gnu::always_inline]] inline T& operator*() const { check(0); return *p; }
  [[gnu::always_inline]] inline T* operator->() const { check(0); return p; }
  operator T*() const { return p; }
  DevPtr operator+(long long n) const { DevPtr r = *this; r.p += n; return r; }
  DevPtr operator-(long long n) const { DevPtr r = *this; r.p -= n; return r; }
  friend DevPtr operator+(long long n, const DevPtr& d) { return d + n; }
  long long operator-(const DevPtr& o) const { return p - o.p; }
  DevPtr& operator+=(long long n) { p += n; return *this; }
  DevPtr& operator-=(long long n) { p -= n; return *this; }
  DevPtr& operator++() { ++p; return *this; }
  DevPtr& operator--() { --p; return *this; }
  DevPtr operator++(int) { DevPtr r = *this; ++p; return r; }
  DevPtr operator--(int) { DevPtr r = *this; --p; return r; }
};

template <class T> [[gnu::noinline]] inline T& tg_log(T* p, const char* name, long long index) {
  Fiber& f = self();
  Fiber::Access a;
  a.p = reinterpret_cast<unsigned char*>(p);
  a.size = unsigned(sizeof(T));
  std::memcpy(a.snap, p, std::min<size_t>(sizeof(T), 16));
  a.pc = __builtin_return_address(0);
  a.name = name;
  a.index = index;
  Critical c;
  f.log.push_back(a);
  return *p;
}

// A view of a threadgroup array: indexing checks the bounds of each dimension and logs the
// element for the race detector; the last dimension yields a plain reference.
template <class A>
struct TgChecked {
  using E = std::remove_extent_t<A>;
  static constexpr long long N = (long long)std::extent<A>::value;
  E* p;
  const char* name;
  long long flat;    // index of p[0] in the whole array, in innermost elements
  long long total;   // innermost elements in the whole array
  static constexpr long long inner = (long long)(sizeof(E) / sizeof(std::remove_all_extents_t<A>));
  decltype(auto) operator[](long long i) const {
    if (i < 0 || i >= N) {
      char what[96];
      std::snprintf(what, sizeof what, "threadgroup array (dimension of %lld)", N);
      out_of_bounds(what, name, i, N);
    }
    if constexpr (std::is_array<E>::value)
      return TgChecked<E>{p[i], name, flat + i * inner, total};
    else
      return tg_log(&p[i], name, flat + i);
  }
  operator E*() const { return p; }
};

template <class A, int ID>
inline decltype(auto) tg_view(const char* name) {
  A& a = tg_array<A, ID>();
  if constexpr (std::is_array<A>::value)
    return TgChecked<A>{a, name, 0, (long long)(sizeof(A) / sizeof(std::remove_all_extents_t<A>))};
  else
    return a;
}

}  // namespace mf

#define MF_TG(T, name, dims, id) decltype(auto) name = mf::tg_view<T dims, id>(#name)
