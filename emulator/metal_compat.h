// metalforge emulator: the Metal Shading Language subset LLM kernels use, as C++17 for the CPU.
// Scalar and vector types, swizzles, type traits, the metal:: math library, SIMD-group functions,
// atomics, 8x8 SIMD-group matrices and what MLX's utils.h gives custom kernels. Freestanding: it
// includes no system header (math is the compiler's builtins), so a kernel sees MSL's names and
// nothing of the host's C or C++ library. Execution lives in the runtime, behind mf_kernel.h.
#pragma once
#include "mf_kernel.h"

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
// MSL's half literal suffix (1.0h); the C++ compilers warn that such suffixes are reserved, which they are, for Metal
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpragmas"
#pragma GCC diagnostic ignored "-Wliteral-suffix"
#pragma GCC diagnostic ignored "-Wuser-defined-literals"
constexpr half operator""h(long double v) { return half(v); }
constexpr half operator""h(unsigned long long v) { return half(v); }
#pragma GCC diagnostic pop
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;

#ifdef MF_TRACE
// Trace mode (emulator/trace.py): each lane's device and threadgroup accesses (mf_checked.h) and its
// part in each SIMD-group matrix operation go to the runtime, which counts them per SIMD-group instruction.
#define MF_TRACE_AT(kind) mf::trace(mf::kind, nullptr, 0)
namespace mf { template <class T> struct DevPtr; }   // mf_checked.h; a device source of simdgroup_load
#else
#define MF_TRACE_AT(kind)
#endif

namespace metal {

// ---- type traits (MSL's metal_type_traits, the subset kernels use) ------------------------------
template <class T, T v> struct integral_constant { static constexpr T value = v; constexpr operator T() const { return v; } };
typedef integral_constant<bool, true> true_type;
typedef integral_constant<bool, false> false_type;
template <bool B, class T = void> struct enable_if {};
template <class T> struct enable_if<true, T> { typedef T type; };
template <bool B, class T = void> using enable_if_t = typename enable_if<B, T>::type;
template <bool B, class T, class F> struct conditional { typedef T type; };
template <class T, class F> struct conditional<false, T, F> { typedef F type; };
template <bool B, class T, class F> using conditional_t = typename conditional<B, T, F>::type;
template <class A, class B> struct is_same : false_type {};
template <class A> struct is_same<A, A> : true_type {};
template <class A, class B> inline constexpr bool is_same_v = is_same<A, B>::value;
template <class T> struct remove_const { typedef T type; };
template <class T> struct remove_const<const T> { typedef T type; };
template <class T> struct remove_volatile { typedef T type; };
template <class T> struct remove_volatile<volatile T> { typedef T type; };
template <class T> struct remove_cv { typedef typename remove_volatile<typename remove_const<T>::type>::type type; };
template <class T> using remove_cv_t = typename remove_cv<T>::type;
template <class T> struct remove_reference { typedef T type; };
template <class T> struct remove_reference<T&> { typedef T type; };
template <class T> struct remove_reference<T&&> { typedef T type; };
template <class T> using remove_reference_t = typename remove_reference<T>::type;
template <class T> using decay_t = remove_cv_t<remove_reference_t<T>>;
template <class T> struct mf_integral : false_type {};
#define MF_INTEGRAL(T) template <> struct mf_integral<T> : true_type {};
MF_INTEGRAL(bool) MF_INTEGRAL(char) MF_INTEGRAL(signed char) MF_INTEGRAL(unsigned char) MF_INTEGRAL(short)
MF_INTEGRAL(unsigned short) MF_INTEGRAL(int) MF_INTEGRAL(unsigned int) MF_INTEGRAL(long) MF_INTEGRAL(unsigned long)
MF_INTEGRAL(long long) MF_INTEGRAL(unsigned long long)
#undef MF_INTEGRAL
template <class T> struct is_integral : mf_integral<remove_cv_t<T>> {};
template <class T> inline constexpr bool is_integral_v = is_integral<T>::value;
template <class T> struct mf_floating : false_type {};
template <> struct mf_floating<float> : true_type {};
template <> struct mf_floating<_Float16> : true_type {};
template <class T> struct is_floating_point : mf_floating<remove_cv_t<T>> {};
template <class T> inline constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T> struct is_arithmetic : integral_constant<bool, is_integral<T>::value || is_floating_point<T>::value> {};
template <class T> inline constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T> struct is_signed : integral_constant<bool, is_arithmetic<T>::value && T(-1) < T(0)> {};
template <class T> inline constexpr bool is_signed_v = is_signed<T>::value;
template <class T> struct is_unsigned : integral_constant<bool, is_integral<T>::value && T(0) < T(-1)> {};
template <class T> inline constexpr bool is_unsigned_v = is_unsigned<T>::value;
template <class T> struct make_unsigned { typedef T type; };
template <> struct make_unsigned<char> { typedef unsigned char type; };
template <> struct make_unsigned<signed char> { typedef unsigned char type; };
template <> struct make_unsigned<short> { typedef unsigned short type; };
template <> struct make_unsigned<int> { typedef unsigned int type; };
template <> struct make_unsigned<long> { typedef unsigned long type; };
template <> struct make_unsigned<long long> { typedef unsigned long long type; };
template <class T> using make_unsigned_t = typename make_unsigned<T>::type;
template <class T> struct is_array : false_type {};
template <class T, size_t N> struct is_array<T[N]> : true_type {};
template <class T> struct extent : integral_constant<size_t, 0> {};
template <class T, size_t N> struct extent<T[N]> : integral_constant<size_t, N> {};
template <class T> struct remove_extent { typedef T type; };
template <class T, size_t N> struct remove_extent<T[N]> { typedef T type; };
template <class T> using remove_extent_t = typename remove_extent<T>::type;
template <class T> struct remove_all_extents { typedef T type; };
template <class T, size_t N> struct remove_all_extents<T[N]> { typedef typename remove_all_extents<T>::type type; };
template <class T> using remove_all_extents_t = typename remove_all_extents<T>::type;
template <class T> T&& declval() noexcept;
#ifdef MF_FRONTEND   // clang's own trait: the overload test below sends clang into endless recursion on MLX's complex_t<bfloat>
template <class From, class To> struct is_convertible : integral_constant<bool, __is_convertible_to(From, To)> {};
#else
template <class From, class To> struct is_convertible {
  static true_type test(To);
  static false_type test(...);
  static constexpr bool value = decltype(test(declval<From>()))::value;
};
#endif
template <class From, class To> inline constexpr bool is_convertible_v = is_convertible<From, To>::value;
template <bool B> using bool_constant = integral_constant<bool, B>;
template <class T> struct remove_addrspace { typedef T type; };   // one address space on the CPU
template <class T> using remove_addrspace_t = typename remove_addrspace<T>::type;
// the usual arithmetic conversions of two types (the rule of std::common_type)
template <class A, class B> using mf_common_t = decay_t<decltype(false ? declval<A>() : declval<B>())>;

// numeric_limits: the integer types' from their width and sign, float's and half's from IEEE 754
template <class T> struct numeric_limits {
  static constexpr T max() { return is_signed<T>::value ? T(~(make_unsigned_t<T>(1) << (8 * sizeof(T) - 1))) : T(~T(0)); }
  static constexpr T min() { return is_signed<T>::value ? T(-max() - 1) : T(0); }
  static constexpr T lowest() { return min(); }
};
template <> struct numeric_limits<bool> {
  static constexpr bool max() { return true; }
  static constexpr bool min() { return false; }
  static constexpr bool lowest() { return false; }
};
// a floating type's limits from its largest, smallest normal and epsilon values as floats (F):
// lowest is -max, infinity and NaN are float's converted
template <class T, class F> struct mf_float_limits {
  static constexpr T max() { return T(F::max); }
  static constexpr T min() { return T(F::min); }
  static constexpr T lowest() { return T(-F::max); }
  static constexpr T infinity() { return T(__builtin_inff()); }
  static constexpr T quiet_NaN() { return T(__builtin_nanf("")); }
  static constexpr T epsilon() { return T(F::epsilon); }
};
struct mf_float_values { static constexpr float max = __FLT_MAX__, min = __FLT_MIN__, epsilon = __FLT_EPSILON__; };
struct mf_half_values { static constexpr float max = 65504.0f, min = 6.103515625e-05f, epsilon = 0.0009765625f; };
template <> struct numeric_limits<float> : mf_float_limits<float, mf_float_values> {};
template <> struct numeric_limits<_Float16> : mf_float_limits<_Float16, mf_half_values> {};

// ---- bfloat: storage of the top 16 bits of a float, arithmetic in float, round to nearest even --
struct bfloat {
  uint16_t bits;
  static constexpr uint16_t from_float(float f) {   // constexpr: MLX's headers use bfloat constants
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  bfloat() = default;
  static constexpr bfloat of_bits(uint16_t b) { bfloat r{}; r.bits = b; return r; }
  template <class T, class = enable_if_t<is_arithmetic<T>::value || is_same<T, _Float16>::value>>
  constexpr bfloat(T v) : bits(from_float(float(v))) {}
  constexpr operator float() const { return __builtin_bit_cast(float, uint32_t(bits) << 16); }
  template <class T>
  bfloat& operator+=(T o) { return *this = bfloat(float(*this) + float(o)); }
  template <class T>
  bfloat& operator-=(T o) { return *this = bfloat(float(*this) - float(o)); }
  template <class T>
  bfloat& operator*=(T o) { return *this = bfloat(float(*this) * float(o)); }
  template <class T>
  bfloat& operator/=(T o) { return *this = bfloat(float(*this) / float(o)); }
  constexpr bfloat operator-() const { return bfloat(-float(*this)); }
};
struct mf_bfloat_values { static constexpr float max = 3.38953139e38f, min = 1.17549435e-38f, epsilon = 0.0078125f; };
template <> struct numeric_limits<bfloat> : mf_float_limits<bfloat, mf_bfloat_values> {};

template <class T> struct is_scalar : integral_constant<bool, is_arithmetic<T>::value> {};
template <> struct is_scalar<_Float16> : true_type {};
template <> struct is_scalar<bfloat> : true_type {};

// bfloat op bfloat and bfloat op integer stay bfloat; with float or half the result is float.
template <class T> using bf_result = conditional_t<is_integral<T>::value || is_same<T, bfloat>::value, bfloat, float>;
#define MF_BF_OP(op)                                                                                   \
  template <class T, class = enable_if_t<is_scalar<T>::value>>                                    \
  constexpr bf_result<T> operator op(bfloat a, T b) { return bf_result<T>(float(a) op float(b)); }     \
  template <class T, class = enable_if_t<is_scalar<T>::value && !is_same<T, bfloat>::value>> \
  constexpr bf_result<T> operator op(T a, bfloat b) { return bf_result<T>(float(a) op float(b)); }
MF_BF_OP(+)
MF_BF_OP(-)
MF_BF_OP(*)
MF_BF_OP(/)
#undef MF_BF_OP
#define MF_BF_CMP(op)                                                                                  \
  template <class T, class = enable_if_t<is_scalar<T>::value>>                                    \
  constexpr bool operator op(bfloat a, T b) { return float(a) op float(b); }                           \
  template <class T, class = enable_if_t<is_scalar<T>::value && !is_same<T, bfloat>::value>> \
  constexpr bool operator op(T a, bfloat b) { return float(a) op float(b); }
MF_BF_CMP(<)
MF_BF_CMP(>)
MF_BF_CMP(<=)
MF_BF_CMP(>=)
MF_BF_CMP(==)
MF_BF_CMP(!=)
#undef MF_BF_CMP

// ---- vectors --------------------------------------------------------------------------------
template <class T, int N> struct vec;

// A swizzle such as v.zyx: a view of the parent's storage that reads as, and assigns from, a vec.
template <class T, int N, int... I>
struct swz {
  T d[N];
  using V = vec<T, int(sizeof...(I))>;
  operator V() const { return V(d[I]...); }
  swz& operator=(const V& v) {
    V t = v;
    int k = 0;
    ((d[I] = t[k++]), ...);
    return *this;
  }
  swz& operator=(const swz& o) { return *this = V(o); }
  template <class B> swz& operator+=(const B& b) { return *this = V(*this) + b; }
  template <class B> swz& operator-=(const B& b) { return *this = V(*this) - b; }
  template <class B> swz& operator*=(const B& b) { return *this = V(*this) * b; }
  template <class B> swz& operator/=(const B& b) { return *this = V(*this) / b; }
};

template <class A> struct vec_traits { static constexpr bool is = false; static constexpr int n = 1; using elem = A; };
template <class T, int N> struct vec_traits<vec<T, N>> { static constexpr bool is = true; static constexpr int n = N; using elem = T; };
template <class T, int N, int... I> struct vec_traits<swz<T, N, I...>> {
  static constexpr bool is = true; static constexpr int n = int(sizeof...(I)); using elem = T;
};
template <class A> inline constexpr bool is_vec_v = vec_traits<decay_t<A>>::is;

template <class A> inline auto as_vec(const A& a) {
  if constexpr (is_vec_v<A>) return vec<typename vec_traits<A>::elem, vec_traits<A>::n>(a);
  else return a;
}

template <class T, int N> struct vec_base {
  template <class U> static void put(T* v, int& i, const U& u) {
    if constexpr (vec_traits<U>::is) {
      auto w = as_vec(u);
      for (int k = 0; k < vec_traits<U>::n; k++) v[i++] = T(w[k]);
    } else {
      v[i++] = T(u);
    }
  }
};

#define MF_VEC_COMMON(N)                                                                                    \
  vec() = default;                                                                                          \
  vec(const vec& o) { for (int i = 0; i < N; i++) v[i] = o.v[i]; }                                          \
  vec& operator=(const vec& o) { for (int i = 0; i < N; i++) v[i] = o.v[i]; return *this; }                 \
  template <class U, class = enable_if_t<is_scalar<U>::value>>                                          \
  vec(U s) { for (int i = 0; i < N; i++) v[i] = T(s); }                                                     \
  template <class U>                                                                                        \
  vec(const vec<U, N>& o) { for (int i = 0; i < N; i++) v[i] = T(o[i]); }                                    \
  template <class U, int M, int... I, class = enable_if_t<sizeof...(I) == N>>                           \
  vec(const swz<U, M, I...>& s) {                                                                           \
    const U src[N] = {s.d[I]...};                                                                           \
    for (int i = 0; i < N; i++) v[i] = T(src[i]);                                                           \
  }                                                                                                         \
  template <class A0, class A1, class... A,                                                                 \
            class = enable_if_t<vec_traits<A0>::n + vec_traits<A1>::n + (0 + ... + vec_traits<A>::n) == N>> \
  vec(const A0& a0, const A1& a1, const A&... a) {                                                          \
    int i = 0;                                                                                              \
    vec_base<T, N>::put(v, i, a0);                                                                          \
    vec_base<T, N>::put(v, i, a1);                                                                          \
    (vec_base<T, N>::put(v, i, a), ...);                                                                    \
  }                                                                                                         \
  T& operator[](int i) { return v[i]; }                                                                     \
  const T& operator[](int i) const { return v[i]; }                                                         \
  template <class B> vec& operator+=(const B& b) { return *this = vec(*this + b); }                          \
  template <class B> vec& operator-=(const B& b) { return *this = vec(*this - b); }                          \
  template <class B> vec& operator*=(const B& b) { return *this = vec(*this * b); }                          \
  template <class B> vec& operator/=(const B& b) { return *this = vec(*this / b); }                          \
  template <class B> vec& operator%=(const B& b) { return *this = vec(*this % b); }                          \
  template <class B> vec& operator&=(const B& b) { return *this = vec(*this & b); }                          \
  template <class B> vec& operator|=(const B& b) { return *this = vec(*this | b); }                          \
  template <class B> vec& operator^=(const B& b) { return *this = vec(*this ^ b); }                          \
  template <class B> vec& operator<<=(const B& b) { return *this = vec(*this << b); }                        \
  template <class B> vec& operator>>=(const B& b) { return *this = vec(*this >> b); }

template <class T> struct alignas(2 * sizeof(T)) vec<T, 2> {
  union {
    T v[2];
    struct { T x, y; };
    struct { T r, g; };
    // @SWIZZLES2@
  };
  MF_VEC_COMMON(2)
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 3> {
  union {
    T v[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    // @SWIZZLES3@
  };
  MF_VEC_COMMON(3)
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 4> {
  union {
    T v[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    // @SWIZZLES4@
  };
  MF_VEC_COMMON(4)
};
#undef MF_VEC_COMMON

// packed_ types: no padding (a packed_float3 is 12 bytes), convert to and from vec.
template <class T, int N> struct packed_vec {
  T v[N];
  packed_vec() = default;
  template <class... A> packed_vec(const A&... a) { vec<T, N> t(a...); for (int i = 0; i < N; i++) v[i] = t[i]; }
  // to its vec, or (float4(packed_char4)) to a vec of another element type, element-wise
  template <class U> operator vec<U, N>() const { vec<U, N> t; for (int i = 0; i < N; i++) t[i] = U(v[i]); return t; }
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }
};
template <class T, int N> struct vec_traits<packed_vec<T, N>> { static constexpr bool is = true; static constexpr int n = N; using elem = T; };

template <class A, class B>
using elem_result_t = conditional_t<is_same<A, B>::value, A, mf_common_t<A, B>>;

template <bool Cmp, class A, class B, class F>
inline auto vec_binop(const A& a, const B& b, F f) {
  constexpr int N = is_vec_v<A> ? vec_traits<A>::n : vec_traits<B>::n;
  using EA = typename vec_traits<A>::elem;
  using EB = typename vec_traits<B>::elem;
  // A scalar operand takes the vector's element type; two vectors use their common type.
  using E = conditional_t<is_vec_v<A> && is_vec_v<B>, elem_result_t<EA, EB>, conditional_t<is_vec_v<A>, EA, EB>>;
  using R = conditional_t<Cmp, bool, E>;
  vec<R, N> out;
  const auto va = as_vec(a);
  const auto vb = as_vec(b);
  for (int i = 0; i < N; i++) {
    E x, y;
    if constexpr (is_vec_v<A>) x = E(va[i]); else x = E(va);
    if constexpr (is_vec_v<B>) y = E(vb[i]); else y = E(vb);
    out[i] = R(f(x, y));
  }
  return out;
}

#define MF_VEC_OP(op, cmp)                                                                    \
  template <class A, class B, class = enable_if_t<is_vec_v<A> || is_vec_v<B>>>            \
  inline auto operator op(const A& a, const B& b) {                                            \
    return vec_binop<cmp>(a, b, [](const auto& x, const auto& y) { return x op y; });          \
  }
MF_VEC_OP(+, false)
MF_VEC_OP(-, false)
MF_VEC_OP(*, false)
MF_VEC_OP(/, false)
MF_VEC_OP(%, false)
MF_VEC_OP(&, false)
MF_VEC_OP(|, false)
MF_VEC_OP(^, false)
MF_VEC_OP(<<, false)
MF_VEC_OP(>>, false)
MF_VEC_OP(<, true)
MF_VEC_OP(>, true)
MF_VEC_OP(<=, true)
MF_VEC_OP(>=, true)
MF_VEC_OP(==, true)
MF_VEC_OP(!=, true)
MF_VEC_OP(&&, true)
MF_VEC_OP(||, true)
#undef MF_VEC_OP

template <class A, class = enable_if_t<is_vec_v<A>>>
inline auto operator-(const A& a) { auto v = as_vec(a); for (int i = 0; i < vec_traits<A>::n; i++) v[i] = -v[i]; return v; }
template <class A, class = enable_if_t<is_vec_v<A>>>
inline auto operator+(const A& a) { return as_vec(a); }
template <class A, class = enable_if_t<is_vec_v<A>>>
inline auto operator~(const A& a) { auto v = as_vec(a); for (int i = 0; i < vec_traits<A>::n; i++) v[i] = ~v[i]; return v; }
template <class A, class = enable_if_t<is_vec_v<A>>>
inline auto operator!(const A& a) {
  vec<bool, vec_traits<A>::n> out;
  auto v = as_vec(a);
  for (int i = 0; i < vec_traits<A>::n; i++) out[i] = !v[i];
  return out;
}

#define MF_VEC_TYPES(T, name)                                                                       \
  typedef vec<T, 2> name##2; typedef vec<T, 3> name##3; typedef vec<T, 4> name##4;                   \
  typedef packed_vec<T, 2> packed_##name##2; typedef packed_vec<T, 3> packed_##name##3;              \
  typedef packed_vec<T, 4> packed_##name##4;
MF_VEC_TYPES(float, float)
MF_VEC_TYPES(half, half)
MF_VEC_TYPES(bfloat, bfloat)
MF_VEC_TYPES(int, int)
MF_VEC_TYPES(uint, uint)
MF_VEC_TYPES(short, short)
MF_VEC_TYPES(ushort, ushort)
MF_VEC_TYPES(char, char)
MF_VEC_TYPES(uchar, uchar)
MF_VEC_TYPES(long, long)
MF_VEC_TYPES(ulong, ulong)
MF_VEC_TYPES(bool, bool)
#undef MF_VEC_TYPES

// ---- math ---------------------------------------------------------------------------------
// Half and bfloat functions are evaluated in float and rounded back (Metal's own half functions
// are no more precise than that); integer arguments compute in float.
template <class T> using fresult_t = conditional_t<is_integral<T>::value, float, T>;

#define MF_VEC_MAP1(name)                                                                           \
  template <class T, int N> inline auto name(const vec<T, N>& x) {                                 \
    vec<decltype(name(x[0])), N> r; for (int i = 0; i < N; i++) r[i] = name(x[i]); return r; }      \
  template <class T, int N, int... I> inline auto name(const swz<T, N, I...>& x) { return name(as_vec(x)); }

#define MF_MATH1(name, expr)                                                                        \
  template <class T, class = enable_if_t<is_scalar<T>::value>>                                 \
  inline fresult_t<T> name(T x_) { const float x = float(x_); return fresult_t<T>(expr); }          \
  MF_VEC_MAP1(name)

MF_MATH1(exp, __builtin_expf(x))
MF_MATH1(exp2, __builtin_exp2f(x))
MF_MATH1(exp10, __builtin_powf(10.0f, x))
MF_MATH1(log, __builtin_logf(x))
MF_MATH1(log2, __builtin_log2f(x))
MF_MATH1(log10, __builtin_log10f(x))
MF_MATH1(sqrt, __builtin_sqrtf(x))
MF_MATH1(rsqrt, 1.0f / __builtin_sqrtf(x))
MF_MATH1(sin, __builtin_sinf(x))
MF_MATH1(cos, __builtin_cosf(x))
MF_MATH1(tan, __builtin_tanf(x))
MF_MATH1(asin, __builtin_asinf(x))
MF_MATH1(acos, __builtin_acosf(x))
MF_MATH1(atan, __builtin_atanf(x))
MF_MATH1(sinh, __builtin_sinhf(x))
MF_MATH1(cosh, __builtin_coshf(x))
MF_MATH1(tanh, __builtin_tanhf(x))
MF_MATH1(asinh, __builtin_asinhf(x))
MF_MATH1(acosh, __builtin_acoshf(x))
MF_MATH1(atanh, __builtin_atanhf(x))
MF_MATH1(floor, __builtin_floorf(x))
MF_MATH1(ceil, __builtin_ceilf(x))
MF_MATH1(round, __builtin_roundf(x))
MF_MATH1(rint, __builtin_nearbyintf(x))
MF_MATH1(trunc, __builtin_truncf(x))
MF_MATH1(fract, x - __builtin_floorf(x))
MF_MATH1(fabs, __builtin_fabsf(x))
MF_MATH1(erf, __builtin_erff(x))
MF_MATH1(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
MF_MATH1(sign, x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f))
#undef MF_MATH1

#define MF_PRED1(name, expr)                                                                        \
  template <class T, class = enable_if_t<is_scalar<T>::value>>                                 \
  inline bool name(T x_) { const float x = float(x_); return expr; }                                \
  MF_VEC_MAP1(name)
MF_PRED1(isnan, __builtin_isnan(x))
MF_PRED1(isinf, __builtin_isinf(x))
MF_PRED1(isfinite, __builtin_isfinite(x))
MF_PRED1(signbit, __builtin_signbit(x))
#undef MF_PRED1

template <class T, class = enable_if_t<is_scalar<T>::value>>
inline T abs(T x) { return x < T(0) ? T(-x) : x; }
MF_VEC_MAP1(abs)

template <class T, class = enable_if_t<is_integral<T>::value>>
inline T popcount(T x) { return T(__builtin_popcountll((unsigned long long)(make_unsigned_t<T>)x)); }
template <class T, class = enable_if_t<is_integral<T>::value>>
inline T clz(T x) { return x ? T(__builtin_clzll((unsigned long long)(make_unsigned_t<T>)x) - (64 - 8 * int(sizeof(T)))) : T(8 * sizeof(T)); }
template <class T, class = enable_if_t<is_integral<T>::value>>
inline T ctz(T x) { return x ? T(__builtin_ctzll((unsigned long long)(make_unsigned_t<T>)x)) : T(8 * sizeof(T)); }
MF_VEC_MAP1(popcount)
MF_VEC_MAP1(clz)
MF_VEC_MAP1(ctz)
#undef MF_VEC_MAP1

template <class A, class B> using scalar_pair_t = conditional_t<is_same<A, B>::value, A, mf_common_t<
    conditional_t<is_same<A, bfloat>::value, float, A>, conditional_t<is_same<B, bfloat>::value, float, B>>>;

#define MF_MATH2(name, expr)                                                                          \
  template <class A, class B, class = enable_if_t<is_scalar<A>::value && is_scalar<B>::value>>   \
  inline auto name(A a_, B b_) {                                                                      \
    using R = scalar_pair_t<A, B>;                                                                    \
    if constexpr (is_integral<R>::value) { const R x = R(a_), y = R(b_); return R(expr); }      \
    else { const float x = float(a_), y = float(b_); return R(expr); }                                \
  }                                                                                                   \
  template <class A, class B, class = enable_if_t<is_vec_v<A> || is_vec_v<B>>, class = void>     \
  inline auto name(const A& a, const B& b) {                                                          \
    return vec_binop<false>(a, b, [](const auto& x, const auto& y) { return name(x, y); });           \
  }
MF_MATH2(min, y < x ? y : x)
MF_MATH2(max, x < y ? y : x)
MF_MATH2(fmin, __builtin_fminf(x, y))
MF_MATH2(fmax, __builtin_fmaxf(x, y))
MF_MATH2(pow, __builtin_powf(x, y))
MF_MATH2(powr, __builtin_powf(x, y))
MF_MATH2(atan2, __builtin_atan2f(x, y))
MF_MATH2(fmod, __builtin_fmodf(x, y))
MF_MATH2(copysign, __builtin_copysignf(x, y))
MF_MATH2(step, y < x ? 0 : 1)
MF_MATH2(fdim, __builtin_fdimf(x, y))
#undef MF_MATH2

template <class T, class L, class H>
inline auto clamp(const T& x, const L& lo, const H& hi) { return min(max(x, lo), hi); }
template <class A, class B, class C>
inline auto fma(const A& a, const B& b, const C& c) { return a * b + c; }
template <class A, class B, class C>
inline auto mad(const A& a, const B& b, const C& c) { return a * b + c; }
template <class A, class B, class T>
inline auto mix(const A& x, const B& y, const T& a) { return x + (y - x) * a; }
template <class A, class B, class T>
inline auto smoothstep(const A& e0, const B& e1, const T& x) {
  auto t = clamp((x - e0) / (e1 - e0), 0.0f, 1.0f);
  return t * t * (3.0f - 2.0f * t);
}

template <class A, class B, class C>
inline auto select(const A& a, const B& b, const C& c) {
  if constexpr (is_vec_v<C>) {
    using E = typename vec_traits<A>::elem;
    constexpr int N = vec_traits<C>::n;
    vec<E, N> out, va = as_vec(a), vb = as_vec(b);
    auto vc = as_vec(c);
    for (int i = 0; i < N; i++) out[i] = vc[i] ? vb[i] : va[i];
    return out;
  } else {
    return c ? as_vec(b) : as_vec(a);
  }
}
template <class A, class = enable_if_t<is_vec_v<A>>>
inline bool all(const A& a) { auto v = as_vec(a); for (int i = 0; i < vec_traits<A>::n; i++) if (!v[i]) return false; return true; }
template <class A, class = enable_if_t<is_vec_v<A>>>
inline bool any(const A& a) { auto v = as_vec(a); for (int i = 0; i < vec_traits<A>::n; i++) if (v[i]) return true; return false; }
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }

template <class A, class B>
inline auto dot(const A& a, const B& b) {
  auto va = as_vec(a), vb = as_vec(b);
  auto s = va[0] * vb[0];
  for (int i = 1; i < vec_traits<A>::n; i++) s += va[i] * vb[i];
  return s;
}
template <class A> inline auto length(const A& a) { return sqrt(dot(a, a)); }
template <class A> inline auto normalize(const A& a) { return as_vec(a) * rsqrt(dot(a, a)); }
template <class A, class B> inline auto distance(const A& a, const B& b) { return length(as_vec(a) - as_vec(b)); }
template <class A, class B> inline auto cross(const A& a_, const B& b_) {
  auto a = as_vec(a_), b = as_vec(b_);
  return decltype(a)(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

template <class To, class From>
inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To t;
  __builtin_memcpy(static_cast<void*>(&t), &f, sizeof(To));
  return t;
}

template <class A, class B> inline auto divide(const A& a, const B& b) { return a / b; }

// precise:: and fast:: variants: on the CPU both are the functions above.
#define MF_MATH_ALIASES                                                                              \
  using metal::exp; using metal::exp2; using metal::exp10; using metal::log; using metal::log2;        \
  using metal::log10; using metal::sqrt; using metal::rsqrt; using metal::sin; using metal::cos;       \
  using metal::tan; using metal::tanh; using metal::pow; using metal::powr; using metal::divide;       \
  using metal::fmin; using metal::fmax; using metal::floor; using metal::ceil; using metal::fabs;      \
  using metal::atan; using metal::atan2; using metal::asin; using metal::acos; using metal::sinh;      \
  using metal::cosh; using metal::fmod; using metal::round; using metal::trunc; using metal::fract;
namespace precise { MF_MATH_ALIASES }
namespace fast { MF_MATH_ALIASES }
#undef MF_MATH_ALIASES

#ifndef MF_LIBRARY   // a full library includes MLX's utils.h itself, which defines these
// ---- numeric limits (MLX's utils.h Limits<T>) -----------------------------------------------------
template <class T> struct Limits {
  static constexpr T max = numeric_limits<T>::max();
  static constexpr T min = numeric_limits<T>::lowest();
  static constexpr T finite_max = numeric_limits<T>::max();
  static constexpr T finite_min = numeric_limits<T>::lowest();
};
template <> struct Limits<float> {
  static constexpr float max = __builtin_inff();
  static constexpr float min = -__builtin_inff();
  static constexpr float finite_max = __FLT_MAX__;
  static constexpr float finite_min = -__FLT_MAX__;
};
template <> struct Limits<half> {
  static constexpr half max = half(__builtin_inff());
  static constexpr half min = half(-__builtin_inff());
  static constexpr half finite_max = half(65504.0f);
  static constexpr half finite_min = half(-65504.0f);
};
template <> struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};
template <> struct Limits<bfloat> {
  // bit patterns, so they are constants (no code runs when a kernel's library loads)
  static constexpr bfloat max = bfloat::of_bits(0x7f80);
  static constexpr bfloat min = bfloat::of_bits(0xff80);
  static constexpr bfloat finite_max = bfloat::of_bits(0x7f7f);
  static constexpr bfloat finite_min = bfloat::of_bits(0xff7f);
};

#endif  // MF_LIBRARY

// ---- barriers ----------------------------------------------------------------------------------
enum class mem_flags : unsigned { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }
inline void mf_threadgroup_barrier(mem_flags, int line) { mf::barrier_at(line); }

// ---- SIMD-group functions ------------------------------------------------------------------------
// Each call parks the lane; when every live lane of the SIMD-group is parked, the lanes at the
// same operation and line run it together (mf::resolve_simd) and carry on.
template <class T> inline T mf_load(const mf::Fiber* f) { T v; __builtin_memcpy(static_cast<void*>(&v), f->simd_in, sizeof(T)); return v; }
template <class T> inline void mf_store(mf::Fiber* f, const T& v) { __builtin_memcpy(f->simd_out, static_cast<const void*>(&v), sizeof(T)); }

template <class T, class Op> inline void mf_reduce(mf::Fiber** lanes, int n, Op op) {
  T acc = mf_load<T>(lanes[0]);
  for (int i = 1; i < n; i++) acc = T(op(acc, mf_load<T>(lanes[i])));
  for (int i = 0; i < n; i++) mf_store(lanes[i], acc);
}
template <class T> void mf_sum(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return a + b; }); }
template <class T> void mf_prod(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return a * b; }); }
template <class T> void mf_max(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return max(a, b); }); }
template <class T> void mf_min(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return min(a, b); }); }
template <class T> void mf_and(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return a & b; }); }
template <class T> void mf_or(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return a | b; }); }
template <class T> void mf_xor(mf::Fiber** l, int n) { mf_reduce<T>(l, n, [](const T& a, const T& b) { return a ^ b; }); }
template <bool Inclusive, class T> void mf_prefix(mf::Fiber** l, int n) {
  T acc = T(0);
  for (int i = 0; i < n; i++) {
    T v = mf_load<T>(l[i]);
    if (Inclusive) { acc = T(acc + v); mf_store(l[i], acc); }
    else { mf_store(l[i], acc); acc = T(acc + v); }
  }
}
template <class T> struct mf_indexed { T value; int index; };
// kind 0: absolute lane, 1: xor, 2: up (lane - d), 3: down (lane + d). Out-of-range sources keep their own value.
template <int Kind, class T> void mf_shuffle(mf::Fiber** l, int n) {
  mf::Fiber* by_lane[32] = {};
  for (int i = 0; i < n; i++) by_lane[l[i]->lane] = l[i];
  for (int i = 0; i < n; i++) {
    auto me = mf_load<mf_indexed<T>>(l[i]);
    int lane = int(l[i]->lane), src = -1;
    if (Kind == 0) src = me.index;
    if (Kind == 1) src = lane ^ me.index;
    if (Kind == 2) src = lane - me.index;
    if (Kind == 3) src = lane + me.index;
    T out = me.value;
    if (src >= 0 && src < 32 && by_lane[src]) out = mf_load<mf_indexed<T>>(by_lane[src]).value;
    mf_store(l[i], out);
  }
}
// Quad-group functions: the same operations within each group of four consecutive lanes.
template <class T, class Op> inline void mf_quad_reduce(mf::Fiber** lanes, int n, Op op) {
  for (int i = 0; i < n;) {
    int j = i;
    T acc = mf_load<T>(lanes[i]);
    while (++j < n && lanes[j]->lane / 4 == lanes[i]->lane / 4) acc = T(op(acc, mf_load<T>(lanes[j])));
    for (int k = i; k < j; k++) mf_store(lanes[k], acc);
    i = j;
  }
}
template <class T> void mf_quad_sum(mf::Fiber** l, int n) { mf_quad_reduce<T>(l, n, [](const T& a, const T& b) { return a + b; }); }
template <class T> void mf_quad_max(mf::Fiber** l, int n) { mf_quad_reduce<T>(l, n, [](const T& a, const T& b) { return max(a, b); }); }
template <class T> void mf_quad_min(mf::Fiber** l, int n) { mf_quad_reduce<T>(l, n, [](const T& a, const T& b) { return min(a, b); }); }
// kind 0: lane within the quad, 1: xor, 2: up, 3: down; sources outside the quad keep their own value.
template <int Kind, class T> void mf_quad_shuffle(mf::Fiber** l, int n) {
  mf::Fiber* by_lane[32] = {};
  for (int i = 0; i < n; i++) by_lane[l[i]->lane] = l[i];
  for (int i = 0; i < n; i++) {
    auto me = mf_load<mf_indexed<T>>(l[i]);
    const int lane = int(l[i]->lane), q = lane % 4, base = lane - q;
    int src = Kind == 0 ? me.index : Kind == 1 ? q ^ me.index : Kind == 2 ? q - me.index : q + me.index;
    T out = me.value;
    if (src >= 0 && src < 4 && by_lane[base + src]) out = mf_load<mf_indexed<T>>(by_lane[base + src]).value;
    mf_store(l[i], out);
  }
}

template <class T> void mf_first(mf::Fiber** l, int n) { T v = mf_load<T>(l[0]); for (int i = 0; i < n; i++) mf_store(l[i], v); }
inline void mf_is_first(mf::Fiber** l, int n) { for (int i = 0; i < n; i++) mf_store(l[i], i == 0); }
inline void mf_ballot(mf::Fiber** l, int n) {
  uint64_t bits = 0;
  for (int i = 0; i < n; i++) if (mf_load<bool>(l[i])) bits |= uint64_t(1) << l[i]->lane;
  for (int i = 0; i < n; i++) mf_store(l[i], bits);
}

struct simd_vote {
  using vote_t = uint64_t;
  vote_t v;
  explicit operator vote_t() const { return v; }
  bool all() const { return v == 0xffffffffu; }
  bool any() const { return v != 0; }
};

template <class T> inline T mf_simd_sum(T x, int line) { return mf::simd_exchange(x, &mf_sum<T>, line); }
template <class T> inline T mf_simd_product(T x, int line) { return mf::simd_exchange(x, &mf_prod<T>, line); }
template <class T> inline T mf_simd_max(T x, int line) { return mf::simd_exchange(x, &mf_max<T>, line); }
template <class T> inline T mf_simd_min(T x, int line) { return mf::simd_exchange(x, &mf_min<T>, line); }
template <class T> inline T mf_simd_and(T x, int line) { return mf::simd_exchange(x, &mf_and<T>, line); }
template <class T> inline T mf_simd_or(T x, int line) { return mf::simd_exchange(x, &mf_or<T>, line); }
template <class T> inline T mf_simd_xor(T x, int line) { return mf::simd_exchange(x, &mf_xor<T>, line); }
template <class T> inline T mf_simd_prefix_inclusive_sum(T x, int line) { return mf::simd_exchange(x, &mf_prefix<true, T>, line); }
template <class T> inline T mf_simd_prefix_exclusive_sum(T x, int line) { return mf::simd_exchange(x, &mf_prefix<false, T>, line); }
template <int Kind, class T, bool Quad = false> inline T mf_shuffle_call(T x, int index, int line) {
  mf_indexed<T> in{x, index};
  mf::Fiber& f = mf::self();
  __builtin_memcpy(f.simd_in, static_cast<const void*>(&in), sizeof in);
  f.simd_fn = Quad ? &mf_quad_shuffle<Kind, T> : &mf_shuffle<Kind, T>;
  f.line = line;
  f.state = mf::State::AtSimd;
  mf::to_scheduler();
  T out;
  __builtin_memcpy(static_cast<void*>(&out), f.simd_out, sizeof(T));
  return out;
}
template <class T, class I> inline T mf_simd_shuffle(T x, I lane, int line) { return mf_shuffle_call<0>(x, int(lane), line); }
template <class T, class I> inline T mf_simd_shuffle_xor(T x, I mask, int line) { return mf_shuffle_call<1>(x, int(mask), line); }
template <class T, class I> inline T mf_simd_shuffle_up(T x, I delta, int line) { return mf_shuffle_call<2>(x, int(delta), line); }
template <class T, class I> inline T mf_simd_shuffle_down(T x, I delta, int line) { return mf_shuffle_call<3>(x, int(delta), line); }
template <class T, class I> inline T mf_simd_broadcast(T x, I lane, int line) { return mf_shuffle_call<0>(x, int(lane), line); }
template <class T> inline T mf_simd_broadcast_first(T x, int line) { return mf::simd_exchange(x, &mf_first<T>, line); }
template <class T> inline T mf_quad_sum_(T x, int line) { return mf::simd_exchange(x, &mf_quad_sum<T>, line); }
template <class T> inline T mf_quad_max_(T x, int line) { return mf::simd_exchange(x, &mf_quad_max<T>, line); }
template <class T> inline T mf_quad_min_(T x, int line) { return mf::simd_exchange(x, &mf_quad_min<T>, line); }
template <class T, class I> inline T mf_quad_shuffle_(T x, I lane, int line) { return mf_shuffle_call<0, T, true>(x, int(lane), line); }
template <class T, class I> inline T mf_quad_shuffle_xor_(T x, I mask, int line) { return mf_shuffle_call<1, T, true>(x, int(mask), line); }
template <class T, class I> inline T mf_quad_shuffle_up_(T x, I delta, int line) { return mf_shuffle_call<2, T, true>(x, int(delta), line); }
template <class T, class I> inline T mf_quad_shuffle_down_(T x, I delta, int line) { return mf_shuffle_call<3, T, true>(x, int(delta), line); }
inline bool mf_simd_all(bool b, int line) { return mf::simd_exchange(b, &mf_and<bool>, line); }
inline bool mf_simd_any(bool b, int line) { return mf::simd_exchange(b, &mf_or<bool>, line); }
inline simd_vote mf_simd_ballot(bool b, int line) {
  return simd_vote{mf::simd_exchange(uint64_t(b), &mf_ballot, line)};
}
inline bool mf_simd_is_first(int line) { return mf::simd_exchange(false, &mf_is_first, line); }
inline void mf_simdgroup_barrier(mem_flags, int line) { mf::simd_exchange(0, &mf::simd_sync, line); }

// MSL's SIMD-group functions are functions, not macros, so a library may overload them (MLX's
// utils.h adds 64-bit and complex shuffles, its bf16_math.h bfloat ones); the call site's line,
// which lanes meet at, is the default argument's.
#define MF_LINE int line = __builtin_LINE()
#define MF_SIMD1(name, impl) template <class T> inline T name(T x, MF_LINE) { return impl(x, line); }
#define MF_SIMD2(name, impl) template <class T, class I> inline T name(T x, I i, MF_LINE) { return impl(x, i, line); }
MF_SIMD1(simd_sum, mf_simd_sum) MF_SIMD1(simd_product, mf_simd_product) MF_SIMD1(simd_prod, mf_simd_product)
MF_SIMD1(simd_max, mf_simd_max) MF_SIMD1(simd_min, mf_simd_min) MF_SIMD1(simd_and, mf_simd_and)
MF_SIMD1(simd_or, mf_simd_or) MF_SIMD1(simd_xor, mf_simd_xor)
MF_SIMD1(simd_prefix_inclusive_sum, mf_simd_prefix_inclusive_sum)
MF_SIMD1(simd_prefix_exclusive_sum, mf_simd_prefix_exclusive_sum)
MF_SIMD1(simd_broadcast_first, mf_simd_broadcast_first) MF_SIMD1(quad_sum, mf_quad_sum_)
MF_SIMD1(quad_max, mf_quad_max_) MF_SIMD1(quad_min, mf_quad_min_)
MF_SIMD2(simd_shuffle, mf_simd_shuffle) MF_SIMD2(simd_shuffle_xor, mf_simd_shuffle_xor)
MF_SIMD2(simd_shuffle_up, mf_simd_shuffle_up) MF_SIMD2(simd_shuffle_down, mf_simd_shuffle_down)
MF_SIMD2(simd_broadcast, mf_simd_broadcast) MF_SIMD2(quad_shuffle, mf_quad_shuffle_)
MF_SIMD2(quad_shuffle_xor, mf_quad_shuffle_xor_) MF_SIMD2(quad_shuffle_up, mf_quad_shuffle_up_)
MF_SIMD2(quad_shuffle_down, mf_quad_shuffle_down_) MF_SIMD2(quad_broadcast, mf_quad_shuffle_)
inline bool simd_all(bool b, MF_LINE) { return mf_simd_all(b, line); }
inline bool simd_any(bool b, MF_LINE) { return mf_simd_any(b, line); }
inline simd_vote simd_ballot(bool b, MF_LINE) { return mf_simd_ballot(b, line); }
inline bool simd_is_first(MF_LINE) { return mf_simd_is_first(line); }

// ---- the Metal compiler's own intrinsics, which MLX's headers call (bf16_math.h, steel's MMA) -----
template <class T> inline T __metal_get_thread_index_in_simdgroup(T) { return T(mf::self().lane); }
template <class T> inline T __metal_get_simdgroup_size(T) { return T(32); }
MF_SIMD1(__metal_simd_sum, mf_simd_sum) MF_SIMD1(__metal_simd_product, mf_simd_product)
MF_SIMD1(__metal_simd_max, mf_simd_max) MF_SIMD1(__metal_simd_min, mf_simd_min)
template <class T> inline T __metal_simd_xor(T x, MF_LINE) {   // on the bits (MLX's bfloat simd_xor passes a float)
  using U = conditional_t<sizeof(T) == 2, uint16_t, conditional_t<sizeof(T) == 8, uint64_t, uint32_t>>;
  return __builtin_bit_cast(T, mf_simd_xor(__builtin_bit_cast(U, x), line));
}
MF_SIMD1(__metal_simd_prefix_inclusive_sum, mf_simd_prefix_inclusive_sum)
MF_SIMD1(__metal_simd_prefix_exclusive_sum, mf_simd_prefix_exclusive_sum)
template <class T> void mf_prefix_product(mf::Fiber** l, int n, bool inclusive) {
  T acc = T(1);
  for (int i = 0; i < n; i++) {
    T v = mf_load<T>(l[i]);
    if (inclusive) { acc = T(acc * v); mf_store(l[i], acc); } else { mf_store(l[i], acc); acc = T(acc * v); }
  }
}
template <class T> void mf_prefix_product_in(mf::Fiber** l, int n) { mf_prefix_product<T>(l, n, true); }
template <class T> void mf_prefix_product_ex(mf::Fiber** l, int n) { mf_prefix_product<T>(l, n, false); }
template <class T> inline T __metal_simd_prefix_inclusive_product(T x, MF_LINE) { return mf::simd_exchange(x, &mf_prefix_product_in<T>, line); }
template <class T> inline T __metal_simd_prefix_exclusive_product(T x, MF_LINE) { return mf::simd_exchange(x, &mf_prefix_product_ex<T>, line); }
MF_SIMD2(__metal_simd_shuffle, mf_simd_shuffle) MF_SIMD2(__metal_simd_broadcast, mf_simd_broadcast)
MF_SIMD2(__metal_simd_shuffle_xor, mf_simd_shuffle_xor) MF_SIMD2(__metal_simd_shuffle_up, mf_simd_shuffle_up)
MF_SIMD2(__metal_simd_shuffle_down, mf_simd_shuffle_down)
template <class T, class I> inline T __metal_simd_shuffle_rotate_down(T x, I d, MF_LINE) {
  return mf_simd_shuffle(x, (mf::self().lane + unsigned(d)) % 32u, line);
}
template <class T, class I> inline T __metal_simd_shuffle_rotate_up(T x, I d, MF_LINE) {
  return mf_simd_shuffle(x, (mf::self().lane + 32u - unsigned(d) % 32u) % 32u, line);
}
// down: lane i takes data from lane i + delta, or filling from lane i + delta - width past the end;
// up: from lane i - delta, or filling from lane width + i - delta before the start (within `width` lanes)
template <bool Down, class T, class I, class W> inline T mf_shuffle_and_fill(T data, T fill, I delta, W width, int line) {
  const unsigned lane = mf::self().lane, w = unsigned(width), d = unsigned(delta), base = lane - lane % w, at = lane % w;
  const bool own = Down ? at + d < w : at >= d;
  const T from_data = mf_simd_shuffle(data, base + (own ? (Down ? at + d : at - d) : 0u), line);
  const T from_fill = mf_simd_shuffle(fill, base + (own ? 0u : (Down ? at + d - w : w + at - d)), line);
  return own ? from_data : from_fill;
}
template <class T, class I, class W> inline T __metal_simd_shuffle_and_fill_down(T data, T fill, I delta, W width, MF_LINE) {
  return mf_shuffle_and_fill<true>(data, fill, delta, width, line);
}
template <class T, class I, class W> inline T __metal_simd_shuffle_and_fill_up(T data, T fill, I delta, W width, MF_LINE) {
  return mf_shuffle_and_fill<false>(data, fill, delta, width, line);
}
template <class T, class I> inline T simd_shuffle_rotate_down(T x, I d, MF_LINE) { return __metal_simd_shuffle_rotate_down(x, d, line); }
template <class T, class I> inline T simd_shuffle_rotate_up(T x, I d, MF_LINE) { return __metal_simd_shuffle_rotate_up(x, d, line); }
template <class T, class I> inline T simd_shuffle_and_fill_down(T data, T fill, I delta, MF_LINE) {
  return __metal_simd_shuffle_and_fill_down(data, fill, delta, 32u, line);
}
template <class T, class I, class W> inline T simd_shuffle_and_fill_down(T data, T fill, I delta, W modulo, MF_LINE) {
  return __metal_simd_shuffle_and_fill_down(data, fill, delta, modulo, line);
}
template <class T, class I> inline T simd_shuffle_and_fill_up(T data, T fill, I delta, MF_LINE) {
  return __metal_simd_shuffle_and_fill_up(data, fill, delta, 32u, line);
}
template <class T, class I, class W> inline T simd_shuffle_and_fill_up(T data, T fill, I delta, W modulo, MF_LINE) {
  return __metal_simd_shuffle_and_fill_up(data, fill, delta, modulo, line);
}
#undef MF_LINE
#undef MF_SIMD1
#undef MF_SIMD2
#define MF_INTRINSIC1(name, fn) template <class T, class... M> inline T __metal_##name(T x, M...) { return T(fn(x)); }
#define MF_INTRINSIC2(name, fn) template <class T, class... M> inline T __metal_##name(T x, T y, M...) { return T(fn(x, y)); }
MF_INTRINSIC1(acos, acos) MF_INTRINSIC1(acosh, acosh) MF_INTRINSIC1(asin, asin) MF_INTRINSIC1(asinh, asinh)
MF_INTRINSIC1(atan, atan) MF_INTRINSIC1(atanh, atanh) MF_INTRINSIC1(ceil, ceil) MF_INTRINSIC1(cos, cos)
MF_INTRINSIC1(cosh, cosh) MF_INTRINSIC1(exp, exp) MF_INTRINSIC1(exp10, exp10) MF_INTRINSIC1(exp2, exp2)
MF_INTRINSIC1(fabs, fabs) MF_INTRINSIC1(floor, floor) MF_INTRINSIC1(fract, fract) MF_INTRINSIC1(log, log)
MF_INTRINSIC1(log10, log10) MF_INTRINSIC1(log2, log2) MF_INTRINSIC1(rint, rint) MF_INTRINSIC1(round, round)
MF_INTRINSIC1(rsqrt, rsqrt) MF_INTRINSIC1(sin, sin) MF_INTRINSIC1(sinh, sinh) MF_INTRINSIC1(sqrt, sqrt)
MF_INTRINSIC1(tan, tan) MF_INTRINSIC1(tanh, tanh) MF_INTRINSIC1(trunc, trunc)
MF_INTRINSIC2(atan2, atan2) MF_INTRINSIC2(divide, divide) MF_INTRINSIC2(fmax, fmax) MF_INTRINSIC2(fmin, fmin)
MF_INTRINSIC2(fmod, fmod) MF_INTRINSIC2(pow, pow) MF_INTRINSIC2(powr, powr)
#undef MF_INTRINSIC1
#define __METAL_MAYBE_FAST_MATH__ 0   // the intrinsics' math-mode argument (the emulator computes in float either way)
#define __METAL_FAST_MATH__ 1
#define __METAL_PRECISE_MATH__ 2
#undef MF_INTRINSIC2
template <class T, class... M> inline T __metal_cospi(T x, M...) { return T(__builtin_cosf(float(x) * 3.14159265358979323846f)); }
template <class T, class... M> inline T __metal_sinpi(T x, M...) { return T(__builtin_sinf(float(x) * 3.14159265358979323846f)); }
template <class T, class... M> inline T __metal_tanpi(T x, M...) { return T(__builtin_tanf(float(x) * 3.14159265358979323846f)); }
template <class T, class... M> inline T __metal_fma(T a, T b, T c, M...) { return T(__builtin_fmaf(float(a), float(b), float(c))); }
template <class T, class... M> inline T __metal_fmax3(T a, T b, T c, M...) { return T(fmax(fmax(a, b), c)); }
template <class T, class... M> inline T __metal_fmin3(T a, T b, T c, M...) { return T(fmin(fmin(a, b), c)); }
template <class T, class... M> inline T __metal_fmedian3(T a, T b, T c, M...) { return T(fmax(fmin(a, b), fmin(fmax(a, b), c))); }
template <class T> inline T __metal_frexp(T x, int* e) { return T(__builtin_frexpf(float(x), e)); }
template <class T, class... M> inline T __metal_ldexp(T x, int k, M...) { return T(__builtin_ldexpf(float(x), k)); }
template <class T> inline T __metal_nextafter(T x, T y) { return T(__builtin_nextafterf(float(x), float(y))); }

// ---- atomics ---------------------------------------------------------------------------------
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel, memory_order_seq_cst };
template <class T> struct atomic { T v; };
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;

template <class T> inline T mf_atomic_rmw(atomic<T>* o, T operand, int op) {
  if constexpr (is_integral<T>::value) {
    switch (op) {
      case 0: return __atomic_fetch_add(&o->v, operand, __ATOMIC_RELAXED);
      case 1: return __atomic_fetch_sub(&o->v, operand, __ATOMIC_RELAXED);
      case 2: return __atomic_fetch_and(&o->v, operand, __ATOMIC_RELAXED);
      case 3: return __atomic_fetch_or(&o->v, operand, __ATOMIC_RELAXED);
      case 4: return __atomic_fetch_xor(&o->v, operand, __ATOMIC_RELAXED);
      default: break;
    }
  }
  // min/max, and every floating-point operation: compare-and-swap loop
  T cur;
  __atomic_load(&o->v, &cur, __ATOMIC_RELAXED);
  for (;;) {
    T next = op == 0 ? T(cur + operand) : op == 1 ? T(cur - operand) : op == 5 ? min(cur, operand) : max(cur, operand);
    if (__atomic_compare_exchange(&o->v, &cur, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return cur;
  }
}
#define MF_ATOMIC_FN(name, op)                                                                   \
  template <class T, class U> inline T name(atomic<T>* o, U operand, memory_order) { return mf_atomic_rmw<T>(o, T(operand), op); } \
  template <class T, class U> inline T name(volatile atomic<T>* o, U operand, memory_order) { return mf_atomic_rmw<T>(const_cast<atomic<T>*>(o), T(operand), op); }
MF_ATOMIC_FN(atomic_fetch_add_explicit, 0)
MF_ATOMIC_FN(atomic_fetch_sub_explicit, 1)
MF_ATOMIC_FN(atomic_fetch_and_explicit, 2)
MF_ATOMIC_FN(atomic_fetch_or_explicit, 3)
MF_ATOMIC_FN(atomic_fetch_xor_explicit, 4)
MF_ATOMIC_FN(atomic_fetch_min_explicit, 5)
MF_ATOMIC_FN(atomic_fetch_max_explicit, 6)
#undef MF_ATOMIC_FN
template <class T, class U> inline void atomic_store_explicit(atomic<T>* o, U v, memory_order) { T t = T(v); __atomic_store(&o->v, &t, __ATOMIC_RELAXED); }
template <class T> inline T atomic_load_explicit(const atomic<T>* o, memory_order) { T t; __atomic_load(&o->v, &t, __ATOMIC_RELAXED); return t; }
template <class T, class U> inline T atomic_exchange_explicit(atomic<T>* o, U v, memory_order) { T t = T(v), old; __atomic_exchange(&o->v, &t, &old, __ATOMIC_RELAXED); return old; }
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* o, T* expected, U desired, memory_order, memory_order) {
  T d = T(desired);
  return __atomic_compare_exchange(&o->v, expected, &d, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}

// ---- 8x8 SIMD-group matrices ------------------------------------------------------------------
// Metal's matrix<T, Cols, Rows> (float4x4, half4x4, ...): Cols column vectors, m[c][r]; an explicit
// conversion between element types converts element-wise (MSL 3.2 §2.3 Matrix Data Types)
template <class T, int C, int R> struct matrix {
  vec<T, R> columns[C];
  matrix() = default;
  explicit matrix(T diagonal) {
    for (int c = 0; c < C; c++) for (int r = 0; r < R; r++) columns[c][r] = c == r ? diagonal : T(0);
  }
  template <class U> explicit matrix(const matrix<U, C, R>& o) {
    for (int c = 0; c < C; c++) columns[c] = vec<T, R>(o.columns[c]);
  }
  vec<T, R>& operator[](int c) { return columns[c]; }
  const vec<T, R>& operator[](int c) const { return columns[c]; }
};
typedef matrix<float, 2, 4> float2x4;
typedef matrix<float, 4, 4> float4x4;
typedef matrix<half, 2, 4> half2x4;
typedef matrix<half, 4, 4> half4x4;

// Every lane keeps a full copy; a lane owns the two elements Apple's layout gives it, which is
// what thread_elements() exposes and what simdgroup_store writes. Products gather each element
// from its owner, so per-lane edits through thread_elements() are honoured as on the GPU.
inline void mf_owned(unsigned lane, int& row, int& col) {
  const unsigned q = lane / 4;
  row = int((q & 4) + (lane / 2) % 4);
  col = int((q & 2) * 2 + (lane % 2) * 2);
}
template <class T, int R, int C> struct simdgroup_matrix {
  T d[R * C];
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T fill) { for (auto& e : d) e = fill; }
  vec<T, 2>& thread_elements() {
    int r, c;
    mf_owned(mf::self().lane, r, c);
    return *reinterpret_cast<vec<T, 2>*>(&d[r * C + c]);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
// Metal: make_filled_simdgroup_matrix<T, Cols, Rows = Cols>(value) (only 8x8 exists, so the order is moot)
template <class T, int C, int R = C> inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) { return simdgroup_matrix<T, R, C>(v); }

#ifdef MF_TRACE
template <class P> struct mf_device_source : false_type {};
template <class U> struct mf_device_source<::mf::DevPtr<U>> : true_type {};
#endif
template <class T, class P>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, P src, ulong elements_per_row = 8, vec<ulong, 2> origin = vec<ulong, 2>(0, 0), bool transpose = false) {
  MF_TRACE_AT(kTraceMatrixLoad);
#ifdef MF_TRACE
  mf::self().trace_quiet++;
#endif
  for (int r = 0; r < 8; r++)
    for (int c = 0; c < 8; c++) {
      const ulong row = transpose ? origin.y + c : origin.y + r;
      const ulong col = transpose ? origin.x + r : origin.x + c;
      m.d[r * 8 + c] = T(src[row * elements_per_row + col]);
    }
#ifdef MF_TRACE
  mf::self().trace_quiet--;
  // from device memory (llama.cpp's flash attention loads K and V so): the traffic is counted as
  // the lanes read it, each its own two elements, as simdgroup_store writes them (a threadgroup
  // source stays one fragment operation)
  if constexpr (mf_device_source<P>::value) {
    int r0, c0;
    mf_owned(mf::self().lane, r0, c0);
    for (int c = c0; c < c0 + 2; c++) {
      const ulong row = transpose ? origin.y + c : origin.y + r0;
      const ulong col = transpose ? origin.x + r0 : origin.x + c;
      (void)src[row * elements_per_row + col];
    }
  }
#endif
}
template <class T, class P>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, P dst, ulong elements_per_row = 8, vec<ulong, 2> origin = vec<ulong, 2>(0, 0), bool transpose = false) {
  MF_TRACE_AT(kTraceMatrixStore);
  int r0, c0;
  mf_owned(mf::self().lane, r0, c0);
  for (int c = c0; c < c0 + 2; c++) {
    const ulong row = transpose ? origin.y + c : origin.y + r0;
    const ulong col = transpose ? origin.x + r0 : origin.x + c;
    dst[row * elements_per_row + col] = m.d[r0 * 8 + c];
  }
}
template <class TD, class TA, class TB, class TC> struct mf_mma_args {
  simdgroup_matrix<TD, 8, 8>* d; const simdgroup_matrix<TA, 8, 8>* a; const simdgroup_matrix<TB, 8, 8>* b; const simdgroup_matrix<TC, 8, 8>* c;
};
template <class TD, class TA, class TB, class TC> void mf_mma(mf::Fiber** l, int n) {
  using Args = mf_mma_args<TD, TA, TB, TC>;
#ifdef MF_TRACE
  mf::trace_simdgroup_operation(mf::kTraceMatrixMultiply);
#endif
  const Args* by_lane[32] = {};
  Args first = mf_load<Args>(l[0]);
  Args all[32];
  for (int i = 0; i < n; i++) { all[i] = mf_load<Args>(l[i]); by_lane[l[i]->lane] = &all[i]; }
  float A[64], B[64], Cm[64];
  for (unsigned lane = 0; lane < 32; lane++) {
    int r, c;
    mf_owned(lane, r, c);
    const Args& src = by_lane[lane] ? *by_lane[lane] : first;
    for (int k = c; k < c + 2; k++) {
      A[r * 8 + k] = float(src.a->d[r * 8 + k]);
      B[r * 8 + k] = float(src.b->d[r * 8 + k]);
      Cm[r * 8 + k] = src.c ? float(src.c->d[r * 8 + k]) : 0.0f;
    }
  }
  for (int r = 0; r < 8; r++)
    for (int c = 0; c < 8; c++) {
      float s = Cm[r * 8 + c];
      for (int k = 0; k < 8; k++) s += A[r * 8 + k] * B[k * 8 + c];
      for (int i = 0; i < n; i++) all[i].d->d[r * 8 + c] = TD(s);
    }
}
template <class TD, class TA, class TB, class TC>
inline void mf_simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                             const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c, int line) {
  // operands may alias d (d = a*b + d), so every lane's inputs are gathered before any is written
  simdgroup_matrix<TA, 8, 8> ca = a;
  simdgroup_matrix<TB, 8, 8> cb = b;
  simdgroup_matrix<TC, 8, 8> cc = c;
  mf::simd_exchange(mf_mma_args<TD, TA, TB, TC>{&d, &ca, &cb, &cc}, &mf_mma<TD, TA, TB, TC>, line);
}
template <class TD, class TA, class TB>
inline void mf_simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a, const simdgroup_matrix<TB, 8, 8>& b, int line) {
  simdgroup_matrix<TA, 8, 8> ca = a;
  simdgroup_matrix<TB, 8, 8> cb = b;
  mf::simd_exchange(mf_mma_args<TD, TA, TB, TD>{&d, &ca, &cb, nullptr}, &mf_mma<TD, TA, TB, TD>, line);
}

#ifndef MF_LIBRARY
// ---- complex64_t: how MLX's Metal backend passes complex64 arrays (two floats, real first) ---------
struct complex64_t {
  float real;
  float imag;
  complex64_t() = default;
  constexpr complex64_t(float re, float im) : real(re), imag(im) {}
  template <class T, class = enable_if_t<is_scalar<T>::value>>
  constexpr complex64_t(T re) : real(float(re)), imag(0.0f) {}
  complex64_t operator-() const { return {-real, -imag}; }
  complex64_t& operator+=(complex64_t o) { real += o.real; imag += o.imag; return *this; }
  complex64_t& operator-=(complex64_t o) { real -= o.real; imag -= o.imag; return *this; }
  complex64_t& operator*=(complex64_t o) { return *this = complex64_t(real * o.real - imag * o.imag, real * o.imag + imag * o.real); }
};
inline complex64_t operator+(complex64_t a, complex64_t b) { return {a.real + b.real, a.imag + b.imag}; }
inline complex64_t operator-(complex64_t a, complex64_t b) { return {a.real - b.real, a.imag - b.imag}; }
inline complex64_t operator*(complex64_t a, complex64_t b) { return {a.real * b.real - a.imag * b.imag, a.real * b.imag + a.imag * b.real}; }
inline complex64_t operator/(complex64_t a, complex64_t b) {
  const float d = b.real * b.real + b.imag * b.imag;
  return {(a.real * b.real + a.imag * b.imag) / d, (a.imag * b.real - a.real * b.imag) / d};
}
inline bool operator==(complex64_t a, complex64_t b) { return a.real == b.real && a.imag == b.imag; }
inline bool operator!=(complex64_t a, complex64_t b) { return !(a == b); }

// ---- what MLX's utils.h gives a custom kernel ---------------------------------------------------
template <class T, class U> inline T ceildiv(T a, U b) { return T((a + b - 1) / b); }
template <class E, class PS, class PT>
inline int64_t elem_to_loc(E elem, PS shape, PT strides, int ndim) {
  int64_t loc = 0;
  int64_t e = int64_t(elem);
  for (int i = ndim - 1; i >= 0 && e > 0; --i) {
    loc += (e % shape[i]) * int64_t(strides[i]);
    e /= shape[i];
  }
  return loc;
}

#endif  // MF_LIBRARY
}  // namespace metal

typedef metal::bfloat bfloat;
#ifndef MF_LIBRARY
typedef half float16_t;
typedef metal::bfloat bfloat16_t;
#endif
using namespace metal;

#define M_PI_F 3.14159265358979323846f
#define M_LN2_F 0.69314718055994530942f
#define M_LOG2E_F 1.44269504088896340736f
// MSL's numeric constants (the C library's, which a kernel does not see, are not these)
#define MAXFLOAT __FLT_MAX__
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define HUGE_VALF __builtin_inff()
#define FLT_MAX __FLT_MAX__
#define FLT_MIN __FLT_MIN__
#define FLT_EPSILON __FLT_EPSILON__
#define FLT_DIG __FLT_DIG__
#define FLT_MANT_DIG __FLT_MANT_DIG__
#define HALF_MAX half(65504.0f)
#define MAXHALF HALF_MAX
#define HALF_MIN half(6.103515625e-05f)
#define HALF_EPSILON half(0.0009765625f)
#define CHAR_BIT 8
#define SCHAR_MAX 127
#define SCHAR_MIN (-128)
#define UCHAR_MAX 255
#define SHRT_MAX 32767
#define SHRT_MIN (-32768)
#define USHRT_MAX 65535
#define INT_MAX 2147483647
#define INT_MIN (-2147483647 - 1)
#define UINT_MAX 0xffffffffu
#define LONG_MAX 0x7fffffffffffffffL
#define LONG_MIN (-0x7fffffffffffffffL - 1)
#define ULONG_MAX 0xffffffffffffffffUL
#define HUGE_VALH half(__builtin_inff())
#define METAL_FUNC inline
#define STEEL_CONST static constexpr constant

// ---- Metal keywords: macros from here on -------------------------------------------------------------
#ifdef MF_FRONTEND
// The conformance front end (conformance.py) parses with clang: address spaces become type tags
// it can read back from every declaration, and constant memory is read-only, as in Metal.
#define device __attribute__((btf_type_tag("device")))
#define constant __attribute__((btf_type_tag("constant"))) const
#define thread __attribute__((btf_type_tag("thread")))
#define threadgroup __attribute__((btf_type_tag("threadgroup")))
#else
#define device
#define constant
#define thread
#define threadgroup
#endif
#define threadgroup_barrier(flags) mf_threadgroup_barrier(flags, __LINE__)
#define simdgroup_barrier(flags) mf_simdgroup_barrier(flags, __LINE__)
#define simdgroup_multiply_accumulate(d, a, b, c) mf_simdgroup_multiply_accumulate(d, a, b, c, __LINE__)
#define simdgroup_multiply(d, a, b) mf_simdgroup_multiply(d, a, b, __LINE__)
#ifndef MF_CHECKED
#define MF_TG(T, name, dims, id) T(&name) dims = mf::tg_array<T dims, id>()
#endif

// Native code a kernel must not write, whatever the front end misses: no inline assembly (a
// system call needs none of the C library), no reaching into its caller's frames.
#pragma GCC poison asm __asm__ __asm __builtin_frame_address __builtin_return_address __builtin_setjmp __builtin_longjmp __builtin_apply __builtin_apply_args __builtin_eh_return
