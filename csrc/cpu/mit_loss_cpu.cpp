// CPU kernels of the MiT loss family and their TORCH_LIBRARY_IMPL(mitkernels_C, CPU).
//
// This file is compiled three times:
//   * as itself: the row kernels for the DEFAULT capability (at::vec's portable vectors), the
//     torch glue (checks, parallel_for, summary, finalize) and the registration;
//   * through wrappers that setup.py generates with MITK_CPU_KERNELS_ONLY and the AVX2 and
//     AVX512 targets (CPU_CAPABILITY_AVX2 / _AVX512): the same row kernels only, in namespaces
//     mitk::cpu::AVX2 and mitk::cpu::AVX512.
// The glue picks the kernels at run time from the CPU's features (ATEN_CPU_CAPABILITY=default
// forces the portable path and =avx2 caps it at AVX2, which the tests use). The kernel part
// includes no ATen tensor headers and defines no static data (see ATen's note "Do not compile
// initializers with AVX").
//
// Kernel part: pure functions over row ranges [begin, end) of the canonical [N, C, S] logits.
// Every row gets the same operations whatever range or thread it falls in (a spatial row may go
// through the lanes or the row kernels, which agree bit for bit), so the per-row outputs (and
// the fixed-order sums built from them) are bitwise reproducible.

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../mit_loss_math.h"

#ifndef MITK_CPU_ISA
#define MITK_CPU_ISA DEFAULT
#endif

namespace mitk {
namespace cpu {

#ifndef MITK_CPU_ARGS_DEFINED
#define MITK_CPU_ARGS_DEFINED
enum LogitsDtype : int { kF64 = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };

// Everything a row kernel reads and writes. Pointers are type-erased: `dtype` names the logits
// (and gradient) element type; arrays of temperatures and row statistics are in the acc type
// (double for float64 logits, else float). Strides and offsets in elements, int64.
struct RowArgs {
  const void* logits = nullptr;
  int dtype = kF32;
  int64_t N = 0, C = 0, S = 1;
  int64_t sn = 0, sc = 1, ss = 0;       // logits strides
  const void* targets = nullptr;        // [R] int64 or int32
  bool targets64 = true;
  const void* inv_temp = nullptr;       // [K] acc: 1 / T_k
  int64_t K = 1;
  int64_t ignore_index = -100;
  // row_stats: [kRowStats, R] acc, rows m, H, V, CE - H, log s (mit_loss_math.h; written by stats,
  // read by grad)
  void* row_stats = nullptr;
  // gradient only
  void* grad = nullptr;
  int64_t gn = 0, gc = 1, gs = 0;       // gradient strides
  double coef = 0.0;                    // c
  double row_scale = 1.0;
  double grad_scalar = 1.0;             // g for mean/sum
  const void* grad_rows = nullptr;      // [R] acc: g_r for reduction none, else null
  // forward only: [C + 2] int64, the valid rows of each class, then all valid rows, then the
  // invalid ones (neither valid nor ignore_index), added to by each range (RowCounter); null
  // when the summary counts them (more than kRowCountClasses classes, or K = C)
  std::atomic<int64_t>* counts = nullptr;
};
constexpr int64_t kRowCountClasses = 64;

using RowRangeFn = void (*)(const RowArgs&, int64_t, int64_t);
#endif  // MITK_CPU_ARGS_DEFINED

namespace MITK_CPU_ISA {

using at::vec::Vectorized;

// Loads and stores of acc-type vectors from the logits' element type.
template <typename scalar_t>
struct VecIO {
  using acc_t = scalar_t;
  using Vec = Vectorized<scalar_t>;
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static Vec load(const scalar_t* p, int64_t n) { return Vec::loadu(p, n); }
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
  static void store(scalar_t* p, const Vec& v, int64_t n) { v.store(p, n); }
  // two vectors to p[0, 2 W)
  static void store2(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <typename scalar_t>
struct ReducedVecIO {
  using acc_t = float;
  using Vec = Vectorized<float>;
  static Vec load(const scalar_t* p) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  // The first n < W values, the rest 0.
  static Vec load(const scalar_t* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
    // In registers: the pairs by a masked load (no byte past p[n - 1] is read), an odd last
    // value into its lane. Converting into a stack buffer read back as one vector failed the
    // store-to-load forward: 16% of the bf16 backward's time at C = 7 (perf annotate).
    const __m128i lanes = _mm_setr_epi32(0, 1, 2, 3);
    const __m128i pairs = _mm_set1_epi32(static_cast<int>(n / 2));
    __m128i h = _mm_maskload_epi32(reinterpret_cast<const int*>(p),
                                   _mm_cmpgt_epi32(pairs, lanes));
    if (n % 2 != 0) {
      uint16_t last;
      std::memcpy(&last, p + n - 1, sizeof(last));
      h = _mm_or_si128(h, _mm_and_si128(_mm_set1_epi32(last), _mm_cmpeq_epi32(pairs, lanes)));
    }
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    } else {
      return Vec(_mm256_cvtph_ps(h));
    }
#elif defined(CPU_CAPABILITY_AVX512)
    // AVX512BW/VL: a masked load of the n values (nothing read past them), in registers.
    const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1u), p);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    } else {
      return Vec(_mm512_cvtph_ps(h));
    }
#else
    float tmp[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
#endif
  }
  static void store(scalar_t* p, const Vec& v) {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vec::size());
  }
  // The first n < W values of v.
  static void store(scalar_t* p, const Vec& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
    // By pairs with a masked store (no byte past p[n - 1] is written) and an odd last value:
    // at::vec's partial store calls memcpy with the count.
    const __m256i both = at::vec::convert_from_float<scalar_t>(v, v);
    const __m128i h = _mm256_castsi256_si128(both);
    const __m128i lanes = _mm_setr_epi32(0, 1, 2, 3);
    _mm_maskstore_epi32(reinterpret_cast<int*>(p),
                        _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n / 2)), lanes), h);
    if (n % 2 != 0) {
      alignas(16) uint16_t bits[Vec::size()];
      _mm_store_si128(reinterpret_cast<__m128i*>(bits), h);
      std::memcpy(p + n - 1, bits + n - 1, sizeof(uint16_t));
    }
#elif defined(CPU_CAPABILITY_AVX512)
    const __m512i both = at::vec::convert_from_float<scalar_t>(v, v);
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1u),
                             _mm512_castsi512_si256(both));
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
#endif
  }
  // One conversion fills a reduced vector (2 W elements): store() converts W of them and drops
  // the rest, which made the bf16 backward twice as slow an element as the fp32 one.
  static void store2(scalar_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
};
template <>
struct VecIO<c10::BFloat16> : ReducedVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : ReducedVecIO<c10::Half> {};

// W values at a stride: p[0], p[step], .., p[(W - 1) step] (the same row position in W rows),
// for the lanes of rows that are not neighbours in memory ([N, C] rows, NHWC pixels). Loads
// put the W values together in a register; stores convert as VecIO does (the row kernels'
// rounding, NaN included), then write the W values one by one.
template <typename scalar_t>
struct StridedIO {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int64_t W = Vec::size();

  static Vec load(const scalar_t* p, int64_t step) {
#if defined(CPU_CAPABILITY_AVX2)
    // Scalar loads put together in registers: on this machine's AMD EPYC (Zen 5) they beat
    // vgatherdps, which left the float backward at 2.26 ns a logit at 40000 x 8 against 0.96.
    if constexpr (std::is_same_v<scalar_t, float>) {
      return Vec(_mm256_setr_ps(p[0], p[step], p[2 * step], p[3 * step], p[4 * step],
                                p[5 * step], p[6 * step], p[7 * step]));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      return Vec(_mm256_setr_pd(p[0], p[step], p[2 * step], p[3 * step]));
    } else {
      const __m128i h = _mm_setr_epi16(
          static_cast<int16_t>(p[0].x), static_cast<int16_t>(p[step].x),
          static_cast<int16_t>(p[2 * step].x), static_cast<int16_t>(p[3 * step].x),
          static_cast<int16_t>(p[4 * step].x), static_cast<int16_t>(p[5 * step].x),
          static_cast<int16_t>(p[6 * step].x), static_cast<int16_t>(p[7 * step].x));
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
      } else {
        return Vec(_mm256_cvtph_ps(h));
      }
    }
#elif defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      return Vec(_mm512_set_ps(p[15 * step], p[14 * step], p[13 * step], p[12 * step],
                               p[11 * step], p[10 * step], p[9 * step], p[8 * step],
                               p[7 * step], p[6 * step], p[5 * step], p[4 * step],
                               p[3 * step], p[2 * step], p[step], p[0]));
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      return Vec(_mm512_set_pd(p[7 * step], p[6 * step], p[5 * step], p[4 * step],
                               p[3 * step], p[2 * step], p[step], p[0]));
    } else {
      const auto b = [&](int64_t i) { return static_cast<int16_t>(p[i * step].x); };
      const __m256i h = _mm256_set_epi16(b(15), b(14), b(13), b(12), b(11), b(10), b(9), b(8),
                                         b(7), b(6), b(5), b(4), b(3), b(2), b(1), b(0));
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      } else {
        return Vec(_mm512_cvtph_ps(h));
      }
    }
#else
    alignas(64) acc_t t[W];
    for (int64_t i = 0; i < W; ++i) t[i] = static_cast<acc_t>(p[i * step]);
    return Vec::loadu(t);
#endif
  }

  static void store(scalar_t* p, int64_t step, const Vec& v) {
    alignas(64) scalar_t t[W];
    IO::store(t, v);
    for (int64_t i = 0; i < W; ++i) p[i * step] = t[i];
  }
};

// The exp of the row loops, and the unit of the shifts and log-probabilities they hold.
// double: e^t with Sleef's exp (what at::vec's exp_u20 is for double); shifts in nats.
// float: 2^t, shifts in bits (t = d log2(e), the log2(e) folded into 1/T once a row). 2^t is
// split as 2^n 2^r with n = round(t) and r = t - n in [-1/2, 1/2]. Adding 1.5 * 2^23 rounds t
// to n in the low mantissa bits (the adder's own rounding: no floor, convert or range masks);
// shifted into the exponent field with the bias they give 2^n. 2^r is a degree-5 polynomial
// fitted for this library (minimax relative error on [-1/2, 1/2]; 2e-7 in float with Horner's
// rounding, where exp_u20 allows 20 ulp). About 11 vector operations against exp_u20's 17 and
// its log2(e) product, in row loops of about 20 that they bound (not memory).
// -DMITK_CPU_PRECISE_EXP keeps nats and Sleef's 1-ulp exp for float too.
template <typename acc_t>
struct ExpUnit {  // double, and float with MITK_CPU_PRECISE_EXP
  static constexpr acc_t kPerNat = 1;  // shift units in one nat
  static constexpr acc_t kNat = 1;     // nats in one shift unit
  static constexpr acc_t kFloor = static_cast<acc_t>(kMinShift);
  static Vectorized<acc_t> exp(const Vectorized<acc_t>& t) { return t.exp(); }
};

#ifndef MITK_CPU_PRECISE_EXP
template <>
struct ExpUnit<float> {
  static constexpr float kPerNat = 1.44269504088896341f;  // log2(e)
  static constexpr float kNat = 0.693147180559945309f;    // ln(2)
  // t = -127 rounds to n = -127, whose biased exponent 0 makes 2^n (and so the exp) exactly 0:
  // masked (-inf) logits add exactly 0 to the sums and get a gradient of exactly 0, as with an
  // exp that underflows; and n never falls below -127, where the shift would reach the sign bit.
  static constexpr float kFloor = -127.0f;
  // t in [kFloor, 0]: the forward's shifts are below the row max, the backward's log p are
  // capped at 0 (above 128 the exponent would wrap into the sign bit)
  static Vectorized<float> exp(const Vectorized<float>& t) {
    using Vec = Vectorized<float>;
    const Vec shifter(12582912.0f + 127.0f);  // 1.5 * 2^23, plus the exponent bias
    const Vec k = t + shifter;                // bits: those of 1.5 * 2^23 + 127 + n
    const Vec r = t - (k - shifter);
    Vec p = at::vec::fmadd(Vec(1.326470869e-03f), r, Vec(9.671511129e-03f));
    p = at::vec::fmadd(p, r, Vec(5.550733954e-02f));
    p = at::vec::fmadd(p, r, Vec(2.402224243e-01f));
    p = at::vec::fmadd(p, r, Vec(6.931470037e-01f));
    p = at::vec::fmadd(p, r, Vec(1.0f));
    // (bits(k) << 23) mod 2^32 = (127 + n) << 23, the float 2^n (1.5 * 2^23's bits shift out)
#if defined(CPU_CAPABILITY_AVX2)
    const Vec two_n(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23)));
#elif defined(CPU_CAPABILITY_AVX512)
    const Vec two_n(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(k), 23)));
#else
    const Vec two_n = at::vec::cast<float>(at::vec::cast<int32_t>(k) << Vectorized<int32_t>(23));
#endif
    return p * two_n;  // NaN in, NaN out: p is NaN whatever two_n holds
  }
};
#endif

template <typename acc_t>
inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// log s for float rows, s a normal float (s >= 1 for a row that has a max). s = 2^e m with m in
// [sqrt(1/2), sqrt(2)) (from s's bits, by subtracting those of sqrt(1/2): the exponent field then
// holds e), f = m - 1 exact, log s = e ln 2 + log(1 + f) with log(1 + f) = f + f^2 P(f), P of
// degree 7 fitted for this library (minimax relative error 3e-8 on [sqrt(1/2) - 1, sqrt(2) - 1],
// Lawson's iteration). About 20 vector operations, where Sleef's 1-ulp logf (at::vec's log) took
// about 95 and a division, a call a vector: at 8 x 5 x 128 x 128 (one log for 8 rows of 5
// classes) it was 16% of the forward's time (perf). Lanes that are not normal floats (0, inf,
// NaN: a row of -inf logits, of NaN) take Sleef's log, as before, each lane on its own.
// -DMITK_CPU_PRECISE_EXP keeps Sleef's log too.
#ifndef MITK_CPU_PRECISE_EXP
inline Vectorized<float> log_normal(const Vectorized<float>& s) {
  using Vec = Vectorized<float>;
  constexpr int32_t kSqrtHalfBits = 0x3f3504f3;  // sqrt(1/2)'s bits
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i t = _mm256_sub_epi32(_mm256_castps_si256(s), _mm256_set1_epi32(kSqrtHalfBits));
  const Vec e(_mm256_cvtepi32_ps(_mm256_srai_epi32(t, 23)));
  const Vec m(_mm256_castsi256_ps(_mm256_add_epi32(
      _mm256_and_si256(t, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(kSqrtHalfBits))));
#elif defined(CPU_CAPABILITY_AVX512)
  const __m512i t = _mm512_sub_epi32(_mm512_castps_si512(s), _mm512_set1_epi32(kSqrtHalfBits));
  const Vec e(_mm512_cvtepi32_ps(_mm512_srai_epi32(t, 23)));
  const Vec m(_mm512_castsi512_ps(_mm512_add_epi32(
      _mm512_and_si512(t, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(kSqrtHalfBits))));
#else
  alignas(64) float lanes[Vec::size()], e_lanes[Vec::size()], m_lanes[Vec::size()];
  s.store(lanes);
  for (int64_t i = 0; i < Vec::size(); ++i) {
    int32_t bits;
    std::memcpy(&bits, &lanes[i], sizeof(bits));
    // in unsigned arithmetic: the lanes that are not normal floats (blended out below) may be
    // negative, whose bits minus those of sqrt(1/2) would overflow an int32_t
    const int32_t t = static_cast<int32_t>(static_cast<uint32_t>(bits) - kSqrtHalfBits);
    e_lanes[i] = static_cast<float>(t >> 23);  // arithmetic: e < 0 for s < sqrt(1/2)
    const int32_t m_bits = (t & 0x007fffff) + kSqrtHalfBits;
    std::memcpy(&m_lanes[i], &m_bits, sizeof(m_bits));
  }
  const Vec e = Vec::loadu(e_lanes), m = Vec::loadu(m_lanes);
#endif
  const Vec f = m - Vec(1.0f);
  Vec p = at::vec::fmadd(Vec(8.734750613524728e-02f), f, Vec(-1.430748307182337e-01f));
  p = at::vec::fmadd(p, f, Vec(1.491798878705558e-01f));
  p = at::vec::fmadd(p, f, Vec(-1.657051406950859e-01f));
  p = at::vec::fmadd(p, f, Vec(1.996207128278821e-01f));
  p = at::vec::fmadd(p, f, Vec(-2.500175501376282e-01f));
  p = at::vec::fmadd(p, f, Vec(3.333395023881218e-01f));
  p = at::vec::fmadd(p, f, Vec(-4.999999160813832e-01f));
  const Vec out = at::vec::fmadd(e, Vec(0.693147180559945309f), at::vec::fmadd(f * f, p, f));
  // Lane by lane, so that a row's log s never depends on the rows it shares a vector with.
  const Vec normal = (s >= Vec(std::numeric_limits<float>::min())) &
                     (s <= Vec(std::numeric_limits<float>::max()));
  return normal.zero_mask() == 0 ? out : Vec::blendv(s.log(), out, normal);
}
#endif

// row_finish's log and floor at 0 on vectors (mit_loss_math.h's ScalarFinishOps): the spatial
// lanes finish W rows at once, and the row kernels theirs W at a time (RowFinisher) through the
// same code, so that both give the same bits.
struct VecFinishOps {
  template <typename Vec>
  static Vec ln(const Vec& v) {
#ifndef MITK_CPU_PRECISE_EXP
    if constexpr (std::is_same_v<typename Vec::value_type, float>) return log_normal(v);
#endif
    return v.log();
  }
  template <typename Vec>
  static Vec max0(const Vec& v) {
    return at::vec::clamp_min(v, Vec(0));  // NaN stays NaN
  }
};

// A row's sums about its max m, A and Q in nats; all 0 for a row of -inf logits.
template <typename acc_t>
struct RowSums {
  acc_t m, s, A, Q;
};

// Finishes the row kernels' rows W at a time, through the vector code of the spatial lanes
// (row_finish_with with VecFinishOps): one vector log for W rows, and the same bits as a lane.
template <typename acc_t>
class RowFinisher {
 public:
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();

  RowFinisher(acc_t* rs, int64_t R) : rs_(rs), R_(R) {}
  ~RowFinisher() { flush(); }

  void add(int64_t r, const RowSums<acc_t>& sums, acc_t inv_t, acc_t x_y) {
    row_[n_] = r;
    m_[n_] = sums.m;
    s_[n_] = sums.s;
    A_[n_] = sums.A;
    Q_[n_] = sums.Q;
    inv_t_[n_] = inv_t;
    xy_[n_] = x_y;
    if (++n_ == W) flush();
  }

  void flush() {
    if (n_ == 0) return;
    for (int64_t i = n_; i < W; ++i) {  // unused lanes: a harmless row, never stored
      m_[i] = A_[i] = Q_[i] = xy_[i] = acc_t(0);
      s_[i] = inv_t_[i] = acc_t(1);
    }
    const RowStats<Vec> st = row_finish_with<Vec, VecFinishOps>(
        Vec::loadu(m_), Vec::loadu(inv_t_), Vec::loadu(s_), Vec::loadu(A_), Vec::loadu(Q_),
        Vec::loadu(xy_));
    alignas(64) acc_t out[kRowStats][W];
    st.m.store(out[kRowMax]);
    st.H.store(out[kRowH]);
    st.V.store(out[kRowV]);
    st.CEH.store(out[kRowCEH]);
    st.log_s.store(out[kRowLogS]);
    for (int64_t i = 0; i < n_; ++i) {
      for (int64_t k = 0; k < kRowStats; ++k) rs_[k * R_ + row_[i]] = out[k][i];
    }
    n_ = 0;
  }

 private:
  acc_t* rs_;
  int64_t R_;
  int64_t n_ = 0;
  int64_t row_[W];
  alignas(64) acc_t m_[W], s_[W], A_[W], Q_[W], inv_t_[W], xy_[W];
};

// The gradient of W rows' target logits, dx_y = scale (p (1 + c (log p + H)) - 1) with log p
// in nats floored at kMinShift (grad_logit_target), shared by the lanes and TargetFixer. p is the
// row loops' exp (ExpUnit) of log p in its unit, clamped as grad_element clamps it: for float,
// Sleef's expf took about 35 vector operations a call, 13% of the NCHW backward at 5 classes
// (perf), where the kernels' own exp takes 11.
template <typename Vec>
inline Vec target_grads(const Vec& x_y, const Vec& inv_t, const Vec& m, const Vec& log_s,
                        const Vec& H, const Vec& c, const Vec& scale) {
  using acc_t = typename Vec::value_type;
  using Unit = ExpUnit<acc_t>;
  const Vec logp = at::vec::clamp_min(log_prob(x_y, m, inv_t, log_s),
                                      Vec(static_cast<acc_t>(kMinShift)));
  const Vec p = Unit::exp(at::vec::clamp(logp * Vec(Unit::kPerNat), Vec(Unit::kFloor),
                                         Vec(acc_t(0))));
  return grad_logit_target(p, logp, H, c, scale);
}

// Rewrites the row kernels' target elements W rows at a time (target_grads), after their rows'
// non-target formula was written: the same bits as the lanes, one vector exp for W rows.
template <typename scalar_t, typename acc_t>
class TargetFixer {
 public:
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();

  explicit TargetFixer(acc_t c) : c_(c) {}
  ~TargetFixer() { flush(); }

  void add(scalar_t* dst, acc_t x_y, acc_t inv_t, acc_t m, acc_t log_s, acc_t H, acc_t scale) {
    dst_[n_] = dst;
    xy_[n_] = x_y;
    inv_t_[n_] = inv_t;
    m_[n_] = m;
    log_s_[n_] = log_s;
    H_[n_] = H;
    scale_[n_] = scale;
    if (++n_ == W) flush();
  }

  void flush() {
    if (n_ == 0) return;
    for (int64_t i = n_; i < W; ++i) {  // unused lanes: never stored
      xy_[i] = inv_t_[i] = m_[i] = log_s_[i] = H_[i] = scale_[i] = acc_t(0);
    }
    alignas(64) acc_t g[W];
    target_grads(Vec::loadu(xy_), Vec::loadu(inv_t_), Vec::loadu(m_), Vec::loadu(log_s_),
                 Vec::loadu(H_), Vec(c_), Vec::loadu(scale_))
        .store(g);
    for (int64_t i = 0; i < n_; ++i) *dst_[i] = static_cast<scalar_t>(g[i]);
    n_ = 0;
  }

 private:
  acc_t c_;
  int64_t n_ = 0;
  scalar_t* dst_[W];
  alignas(64) acc_t xy_[W], inv_t_[W], m_[W], log_s_[W], H_[W], scale_[W];
};

// The two per-element operations of the row loops, each written once: the row kernels and the
// spatial lanes call the same ones (with their row constants as vectors), so they agree bit for
// bit. inv_u and log_s_u are 1/T and log s in the exp's unit (ExpUnit::kPerNat).
// Forward: the shift of logit x below the row max m, floored (NaN stays NaN).
template <typename Vec>
inline Vec shift_of(const Vec& x, const Vec& m, const Vec& inv_u) {
  using Unit = ExpUnit<typename Vec::value_type>;
  return at::vec::clamp_min((x - m) * inv_u, Vec(Unit::kFloor));
}

// Backward: the non-target gradient (grad_logit_folded, row constants a and b) of logit x. log p
// <= 0 for row statistics of these logits; the ceiling at 0 keeps the exp's exponent from
// wrapping into the sign bit should loss_backward be handed statistics of other logits.
template <typename Vec>
inline Vec grad_element(const Vec& x, const Vec& m, const Vec& inv_u, const Vec& log_s_u,
                        const Vec& a, const Vec& b) {
  using acc_t = typename Vec::value_type;
  using Unit = ExpUnit<acc_t>;
  const Vec logp = at::vec::clamp(log_prob(x, m, inv_u, log_s_u), Vec(Unit::kFloor),
                                  Vec(acc_t(0)));
  return grad_logit_folded(Unit::exp(logp), logp, a, b);
}

// Max over the lanes (shuffle tree); NaN wins, as torch.max does.
template <typename Vec>
inline typename Vec::value_type hmax(const Vec& v) {
  using acc_t = typename Vec::value_type;
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Sum over the lanes in lane order (stats_lanes reproduces this order for its rows).
template <typename Vec>
inline typename Vec::value_type hsum(const Vec& v) {
  using acc_t = typename Vec::value_type;
  alignas(64) acc_t a[Vec::size()];
  v.store(a);
  acc_t s = a[0];
  for (int i = 1; i < Vec::size(); ++i) s += a[i];
  return s;
}

// The forward's integer counts (RowArgs::counts), taken where the row pass already has each
// row's target: a range counts into its own array, and adds it in when it ends (relaxed atomic
// adds: whole numbers, the same total in any order, whatever the threads). In the summary's
// second walk over the targets they were three quarters of its time, a fifth of the forward
// at 8 x 5 x 128 x 128 (perf).
class RowCounter {
 public:
  explicit RowCounter(const RowArgs& a) : out_(a.counts), C_(a.C), ignore_(a.ignore_index) {
    if (out_) std::fill(n_, n_ + C_ + 2, int64_t(0));
  }
  ~RowCounter() {
    if (!out_) return;
    for (int64_t k = 0; k < C_ + 2; ++k) {
      if (n_[k] != 0) out_[k].fetch_add(n_[k], std::memory_order_relaxed);
    }
  }
  RowCounter(const RowCounter&) = delete;
  RowCounter& operator=(const RowCounter&) = delete;

  void add(int64_t y, bool valid) {
    if (!out_) return;
    if (valid) {
      ++n_[y];
      ++n_[C_];
    } else if (y != ignore_) {
      ++n_[C_ + 1];
    }
  }

 private:
  std::atomic<int64_t>* out_;
  int64_t C_, ignore_;
  int64_t n_[kRowCountClasses + 2];
};

inline int64_t load_target(const RowArgs& a, int64_t r) {
  return a.targets64 ? static_cast<const int64_t*>(a.targets)[r]
                     : static_cast<int64_t>(static_cast<const int32_t*>(a.targets)[r]);
}

// ---------------------------------------------------------------------------------------------
// Forward: one row with class stride 1, in two passes: the row's max (NaN wins, as in
// at::vec::maximum), then, with the row in L1/L2, one exp per element relative to it in blocks
// of U vectors. The single-pass online form paid a horizontal max and a branch per block and
// rescaled the lane accumulators as the max grew; a second read of a row in cache costs less.
// U = 2: with 4 the block's 12 partial sums, exp's constants and the row's own spilled to the
// stack, and the forward took 12% longer (1024 x 1000 fp32, one thread, alternating builds).
// Shifts and the sums A, Q are in the exp's unit (ExpUnit), A and Q taken back to nats at the end.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
inline RowSums<typename VecIO<scalar_t>::acc_t> stats_row_contiguous(
    const scalar_t* x, int64_t C, typename VecIO<scalar_t>::acc_t inv_t) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = Vec::size();
  constexpr int64_t U = 2;
  const Vec vninf(neg_inf<acc_t>());
  using Unit = ExpUnit<acc_t>;
  const Vec vinv(inv_t * Unit::kPerNat);  // shifts in the exp's unit
  acc_t xmax;
  {
    Vec m0(vninf), m1(vninf);
    int64_t j = 0;
    for (; j + 2 * W <= C; j += 2 * W) {
      m0 = at::vec::maximum(m0, IO::load(x + j));
      m1 = at::vec::maximum(m1, IO::load(x + j + W));
    }
    for (; j < C; j += W) {
      const int64_t rem = C - j;
      m0 = at::vec::maximum(m0, rem >= W ? IO::load(x + j)
                                         : Vec::set(vninf, IO::load(x + j, rem), rem));
    }
    // + 0: the max of +0 and -0 is whichever comes second, and the lanes compare in another
    // order; -0 + 0 = +0 makes the stored max the same either way
    xmax = hmax(at::vec::maximum(m0, m1)) + acc_t(0);
  }
  Vec s(acc_t(0)), A(acc_t(0)), Q(acc_t(0));
  if (xmax == neg_inf<acc_t>()) {  // every logit -inf: nothing to add
    return {xmax, acc_t(0), acc_t(0), acc_t(0)};
  }
  const Vec vm(xmax);
  for (int64_t j0 = 0; j0 < C; j0 += U * W) {
    Vec v[U];
    if (j0 + U * W <= C) {
      for (int64_t u = 0; u < U; ++u) v[u] = IO::load(x + j0 + u * W);
    } else {
      for (int64_t u = 0; u < U; ++u) {
        const int64_t rem = C - (j0 + u * W);
        v[u] = rem >= W ? IO::load(x + j0 + u * W)
                        : (rem > 0 ? Vec::set(vninf, IO::load(x + j0 + u * W, rem), rem) : vninf);
      }
    }
    static_assert(U == 2, "acc_add2 sums a block of two vectors");
    Vec d[U];
    for (int64_t u = 0; u < U; ++u) d[u] = shift_of(v[u], vm, vinv);
    acc_add2(s, A, Q, Unit::exp(d[0]), d[0], Unit::exp(d[1]), d[1]);
  }
  // A and Q back to nats (a product by 1 for double)
  return {xmax, hsum(s), hsum(A) * Unit::kNat, hsum(Q) * (Unit::kNat * Unit::kNat)};
}

// ---------------------------------------------------------------------------------------------
// Lanes: W rows a vector. First for spatial rows ([N, C, d1, ..] logits with spatial stride 1,
// as NCHW is): W consecutive rows of one image are the W lanes of a vector and the classes are
// the loop, so every load is a contiguous vector where a row alone gathered C scalars a plane
// apart and paid its horizontal sums, partial loads and log for C = 2 .. 20 values.
// A lane computes for its row what stats_row_contiguous computes, operation for operation and
// in the same order, so the two paths give the same bits (the tests compare layouts bitwise):
// there, lane i of block b holds classes 2Wb + i and 2Wb + W + i (acc_add2 from a zero block
// sum), and the lanes are summed in order (hsum); here the loop runs over i, then b. The terms
// the row form pads with (a -inf logit: the floor shift, whose exp is exactly 0) add exactly
// nothing to sums that are never -0, so classes past C are skipped, and the padded second term
// of a pair is the constant pair (floor, exp(floor)).
// Rows that are not neighbours in memory (kGathered: [N, C] rows, NHWC pixels, step apart) take
// the same code, their classes gathered once each rather than each row walked alone: a row of 7
// classes paid two passes, three horizontal sums and partial loads. Up to kGatherLaneClasses
// classes: cpu_ops, one thread, 40000 x C, the forward in ns a logit, rows -> lanes: fp32 C = 2
// 11.8 -> 3.4, 7 3.37 -> 1.42, 16 1.42 -> 0.86, 32 0.94 -> 0.69, 48 0.71 -> 0.69, 64 0.60 ->
// 0.65; bf16 48 0.77 -> 0.68, 64 0.67 -> 0.64: 6 W classes (the AVX2 W = 8 floats). The
// AVX-512 kernels (W = 16): fp32 48 0.91 -> 0.55, 64 0.70 -> 0.59, 96 0.53 -> 0.52, 128 0.47 ->
// 0.50; fp64 96 1.51 -> 1.33, 128 1.34 -> 1.30, 200 1.19 -> 1.23. The backward scatters its
// gradient a value at a time: up to kGatherGradLaneClasses. Rows -> lanes, backward: AVX2 fp32
// C = 8 1.17 -> 0.96, 9 1.24 -> 0.90, 12 0.93 -> 0.81, but 16 0.63 -> 0.75; bf16 9 1.87 ->
// 1.18, 12 1.26 -> 1.08, 16 0.79 -> 1.00; fp64 9 3.09 -> 2.60, 12 2.19 -> 2.39; AVX-512 fp32
// 8 1.05 -> 0.80, 9 0.93 -> 0.80, 12 0.69 -> 0.72, 16 0.50 -> 0.66; bf16 9 1.24 -> 0.93, 12
// 0.94 -> 0.86; fp64 12 1.66 -> 1.44. Rows whose classes fill whole vectors lose least.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kGatherLaneClasses = 6 * Vectorized<float>::size();
constexpr int64_t kGatherGradLaneClasses = 12;

template <typename scalar_t, bool kGathered>
inline void stats_lanes(const RowArgs& a, int64_t r0, const scalar_t* x0, int64_t step,
                        RowCounter& counter) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Unit = ExpUnit<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t C = a.C, sc = a.sc, R = a.N * a.S;
  if constexpr (!kGathered) step = 1;
  const acc_t* inv_temp = static_cast<const acc_t*>(a.inv_temp);
  acc_t* rs = static_cast<acc_t*>(a.row_stats);
  int64_t y[W];
  bool valid[W];
  alignas(64) acc_t inv_t[W], inv_u[W];
  bool any = false;
  for (int64_t i = 0; i < W; ++i) {
    y[i] = load_target(a, r0 + i);
    valid[i] = target_valid(y[i], C, a.ignore_index);
    counter.add(y[i], valid[i]);
    any = any || valid[i];
    inv_t[i] = valid[i] ? inv_temp[a.K == 1 ? 0 : y[i]] : acc_t(1);
    inv_u[i] = inv_t[i] * Unit::kPerNat;
  }
  if (!any) {
    for (int64_t i = 0; i < W; ++i) store_zero_row_stats(rs, R, r0 + i);
    return;
  }
  Vec cols[kGathered ? kGatherLaneClasses : 1];
  const auto load = [&](int64_t c) {
    if constexpr (kGathered) {
      return cols[c];
    } else {
      return IO::load(x0 + c * sc);
    }
  };
  if constexpr (kGathered) {
    for (int64_t c = 0; c < C; ++c) cols[c] = StridedIO<scalar_t>::load(x0 + c * sc, step);
  }
  Vec vm(neg_inf<acc_t>());
  for (int64_t c = 0; c < C; ++c) vm = at::vec::maximum(vm, load(c));
  vm = vm + Vec(acc_t(0));  // -0 to +0, as the row kernels do
  // the row kernels' padding: a -inf logit, whose shift is the floor and its exp exactly 0
  const Vec vinv = Vec::loadu(inv_u), d_pad(Unit::kFloor), e_pad = Unit::exp(d_pad);
  Vec s(acc_t(0)), A(acc_t(0)), Q(acc_t(0));
  const int64_t lanes_used = std::min<int64_t>(W, C);
  for (int64_t i = 0; i < lanes_used; ++i) {
    Vec ls(acc_t(0)), lA(acc_t(0)), lQ(acc_t(0));
    for (int64_t c0 = i; c0 < C; c0 += 2 * W) {
      const Vec d0 = shift_of(load(c0), vm, vinv);
      if (c0 + W < C) {
        const Vec d1 = shift_of(load(c0 + W), vm, vinv);
        acc_add2(ls, lA, lQ, Unit::exp(d0), d0, Unit::exp(d1), d1);
      } else {
        acc_add2(ls, lA, lQ, Unit::exp(d0), d0, e_pad, d_pad);
      }
    }
    if (i == 0) {
      s = ls;
      A = lA;
      Q = lQ;
    } else {
      s = s + ls;
      A = A + lA;
      Q = Q + lQ;
    }
  }
  // The finish of the W rows at once (RowFinisher's code); a row whose logits are all -inf has
  // sums of 0, as the row kernels give it, and a row that is not valid zeros.
  alignas(64) acc_t xy[W], valid_f[W];
  for (int64_t i = 0; i < W; ++i) {
    xy[i] = valid[i] ? static_cast<acc_t>(x0[y[i] * sc + i * step]) : acc_t(0);
    valid_f[i] = valid[i] ? acc_t(1) : acc_t(0);
  }
  const Vec zero(acc_t(0));
  const Vec empty = vm == Vec(neg_inf<acc_t>());
  const RowStats<Vec> st = row_finish_with<Vec, VecFinishOps>(
      vm, Vec::loadu(inv_t), Vec::blendv(s, zero, empty),
      Vec::blendv(A * Vec(Unit::kNat), zero, empty),
      Vec::blendv(Q * Vec(Unit::kNat * Unit::kNat), zero, empty), Vec::loadu(xy));
  const Vec invalid = Vec::loadu(valid_f) == zero;
  Vec::blendv(st.m, zero, invalid).store(rs + kRowMax * R + r0);
  Vec::blendv(st.H, zero, invalid).store(rs + kRowH * R + r0);
  Vec::blendv(st.V, zero, invalid).store(rs + kRowV * R + r0);
  Vec::blendv(st.CEH, zero, invalid).store(rs + kRowCEH * R + r0);
  Vec::blendv(st.log_s, zero, invalid).store(rs + kRowLogS * R + r0);
}

// Whether the W rows from r on go through the lanes: all in [r, end), one stride apart (the
// pixels of one image, or with no spatial dims the samples), that stride in the logits in *x
// and, for the backward (g given), in the gradient in *g. A stride other than 1 in either is
// gathered, for rows of at most kGatherLaneClasses classes (kGatherGradLaneClasses for the
// backward; beyond, a row's contiguous loads beat W scalar loads a class).
inline bool lane_group(const RowArgs& a, int64_t r, int64_t end, int64_t W, int64_t* x,
                       int64_t* g = nullptr) {
  if (r + W > end) return false;
  if (a.S == 1) {
    *x = a.sn;
    if (g) *g = a.gn;
  } else {
    if (a.S < W || (r % a.S) + W > a.S) return false;
    *x = a.ss;
    if (g) *g = a.gs;
  }
  if (*x == 1 && (g == nullptr || *g == 1)) return true;
  return a.C <= (g == nullptr ? kGatherLaneClasses : kGatherGradLaneClasses);
}

// Forward over rows [begin, end). A row whose class stride is not 1 is first gathered into a
// contiguous buffer (one per range, not per row), so every layout runs the same code and gives
// the same bits as its contiguous copy.
template <typename scalar_t>
void stats_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const scalar_t* x = static_cast<const scalar_t*>(a.logits);
  const acc_t* inv_temp = static_cast<const acc_t*>(a.inv_temp);
  acc_t* rs = static_cast<acc_t*>(a.row_stats);
  const int64_t R = a.N * a.S;
  std::vector<scalar_t> buf(a.sc == 1 ? 0 : static_cast<size_t>(a.C));
  constexpr int64_t W = VecIO<scalar_t>::Vec::size();
  RowFinisher<acc_t> finisher(rs, R);  // flushed as it fills, and when it goes out of scope
  RowCounter counter(a);               // added in when it goes out of scope
  for (int64_t r = begin; r < end; ++r) {
    int64_t step;
    if (lane_group(a, r, end, W, &step)) {
      const int64_t n = a.S == 1 ? r : r / a.S;
      const scalar_t* x0 = x + n * a.sn + (r - n * a.S) * a.ss;
      if (step == 1) {
        stats_lanes<scalar_t, false>(a, r, x0, 1, counter);
      } else {
        stats_lanes<scalar_t, true>(a, r, x0, step, counter);
      }
      r += W - 1;
      continue;
    }
    const int64_t y = load_target(a, r);
    const bool valid = target_valid(y, a.C, a.ignore_index);
    counter.add(y, valid);
    if (!valid) {
      store_zero_row_stats(rs, R, r);
      continue;
    }
    const int64_t n = a.S == 1 ? r : r / a.S;
    const int64_t sp = a.S == 1 ? 0 : r - n * a.S;
    const scalar_t* row = x + n * a.sn + sp * a.ss;
    const acc_t inv_t = inv_temp[a.K == 1 ? 0 : y];
    if (a.sc != 1) {
      for (int64_t j = 0; j < a.C; ++j) buf[j] = row[j * a.sc];
      row = buf.data();
    }
    finisher.add(r, stats_row_contiguous<scalar_t>(row, a.C, inv_t), inv_t,
                 static_cast<acc_t>(row[y]));
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: dx = scale (p (1 + c (log p + H)) - [j == y]), log p = (x - m) / T - log s
// (KERNEL_MATH s.3, mit_loss_math.h's log_prob), log p in the exp's unit (ExpUnit) and the
// non-target formula as grad_logit_folded: one FMA and a product an element besides the exp.
// This writes the non-target formula everywhere; grad_rows then has the target element
// rewritten from its own formula (TargetFixer: one rounding to the output dtype either way).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
inline void grad_row_contiguous(const scalar_t* x, scalar_t* dx, int64_t C,
                                typename VecIO<scalar_t>::acc_t inv_t,
                                typename VecIO<scalar_t>::acc_t m,
                                typename VecIO<scalar_t>::acc_t log_s,
                                typename VecIO<scalar_t>::acc_t H,
                                typename VecIO<scalar_t>::acc_t c,
                                typename VecIO<scalar_t>::acc_t scale) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = Vec::size();
  constexpr int64_t U = 2;
  using Unit = ExpUnit<acc_t>;
  // log p in the exp's unit, and the gradient's row constants (grad_element)
  const GradCoeffs<acc_t> k = grad_logit_coeffs(H, c, scale, Unit::kNat);
  const Vec vinv(inv_t * Unit::kPerNat), vm(m), vlog_s(log_s * Unit::kPerNat), va(k.a), vb(k.b);
  int64_t j = 0;
  for (; j + U * W <= C; j += U * W) {
    Vec v[U];
    for (int64_t u = 0; u < U; ++u) v[u] = IO::load(x + j + u * W);
    static_assert(U == 2, "store2 writes a block of two vectors");
    Vec g[U];
    for (int64_t u = 0; u < U; ++u) g[u] = grad_element(v[u], vm, vinv, vlog_s, va, vb);
    IO::store2(dx + j, g[0], g[1]);
  }
  for (; j < C; j += W) {
    const int64_t rem = std::min<int64_t>(W, C - j);
    const Vec v = rem == W ? IO::load(x + j) : IO::load(x + j, rem);
    const Vec g = grad_element(v, vm, vinv, vlog_s, va, vb);
    if (rem == W) {
      IO::store(dx + j, g);
    } else {
      IO::store(dx + j, g, rem);
    }
  }
}

// The backward of W spatial rows as the lanes of a vector (stats_lanes says why); every element
// gets grad_row_contiguous's operations, the row constants and the target element included, so
// either path gives the same bits.
// kGathered: rows xstep apart in the logits and gstep apart in the gradient (lane_group).
template <typename scalar_t, bool kGathered>
inline void grad_lanes(const RowArgs& a, int64_t r0, const scalar_t* x0, scalar_t* g0,
                       int64_t xstep, int64_t gstep) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Unit = ExpUnit<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t C = a.C, sc = a.sc, gc = a.gc, R = a.N * a.S;
  if constexpr (!kGathered) xstep = gstep = 1;
  const acc_t* inv_temp = static_cast<const acc_t*>(a.inv_temp);
  const acc_t* rs = static_cast<const acc_t*>(a.row_stats);
  const acc_t* grad_rows_in = static_cast<const acc_t*>(a.grad_rows);
  int64_t y[W];
  alignas(64) acc_t inv_t[W], valid_f[W], xy[W];
  for (int64_t i = 0; i < W; ++i) {
    y[i] = load_target(a, r0 + i);
    const bool valid = target_valid(y[i], C, a.ignore_index);
    inv_t[i] = valid ? inv_temp[a.K == 1 ? 0 : y[i]] : acc_t(0);
    valid_f[i] = valid ? acc_t(1) : acc_t(0);
    xy[i] = valid ? static_cast<acc_t>(x0[y[i] * sc + i * xstep]) : acc_t(0);
  }
  const Vec zero(acc_t(0)), coef(static_cast<acc_t>(a.coef));
  const Vec invalid = Vec::loadu(valid_f) == zero;  // computed on whatever they hold; zeroed
  const Vec vinv_t = Vec::loadu(inv_t);
  const Vec g_r = grad_rows_in ? Vec::loadu(grad_rows_in + r0)
                               : Vec(static_cast<acc_t>(a.grad_scalar));
  const Vec scale = g_r * Vec(static_cast<acc_t>(a.row_scale)) * vinv_t;
  const Vec m = Vec::loadu(rs + kRowMax * R + r0), H = Vec::loadu(rs + kRowH * R + r0),
            log_s = Vec::loadu(rs + kRowLogS * R + r0);
  const GradCoeffs<Vec> k = grad_logit_coeffs(H, coef, scale, Vec(Unit::kNat));
  const Vec vinv = vinv_t * Vec(Unit::kPerNat), vlog_s = log_s * Vec(Unit::kPerNat);
  for (int64_t c = 0; c < C; ++c) {
    if constexpr (kGathered) {
      const Vec g = grad_element(StridedIO<scalar_t>::load(x0 + c * sc, xstep), m, vinv, vlog_s,
                                 k.a, k.b);
      StridedIO<scalar_t>::store(g0 + c * gc, gstep, Vec::blendv(g, zero, invalid));
    } else {
      const Vec g = grad_element(IO::load(x0 + c * sc), m, vinv, vlog_s, k.a, k.b);
      IO::store(g0 + c * gc, Vec::blendv(g, zero, invalid));
    }
  }
  // the target elements, rewritten from their own formula
  alignas(64) acc_t gt[W];
  target_grads(Vec::loadu(xy), vinv_t, m, log_s, H, coef, scale).store(gt);
  for (int64_t i = 0; i < W; ++i) {
    if (valid_f[i] != acc_t(0)) g0[y[i] * gc + i * gstep] = static_cast<scalar_t>(gt[i]);
  }
}

template <typename scalar_t>
void grad_rows(const RowArgs& a, int64_t begin, int64_t end) {
  using acc_t = typename VecIO<scalar_t>::acc_t;
  const scalar_t* x = static_cast<const scalar_t*>(a.logits);
  scalar_t* g = static_cast<scalar_t*>(a.grad);
  const acc_t* inv_temp = static_cast<const acc_t*>(a.inv_temp);
  const acc_t* rs = static_cast<const acc_t*>(a.row_stats);
  const acc_t* grad_rows_in = static_cast<const acc_t*>(a.grad_rows);
  const int64_t R = a.N * a.S;
  const acc_t c = static_cast<acc_t>(a.coef);
  // Strided rows go through contiguous buffers (same code, same bits as a contiguous copy).
  const bool gather = a.sc != 1 || a.gc != 1;
  std::vector<scalar_t> xbuf(gather ? static_cast<size_t>(a.C) : 0);
  std::vector<scalar_t> gbuf(gather ? static_cast<size_t>(a.C) : 0);
  constexpr int64_t W = VecIO<scalar_t>::Vec::size();
  TargetFixer<scalar_t, acc_t> targets(c);  // flushed as it fills, and when it goes out of scope
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = a.S == 1 ? r : r / a.S;
    const int64_t sp = a.S == 1 ? 0 : r - n * a.S;
    scalar_t* grow = g + n * a.gn + sp * a.gs;
    int64_t xstep, gstep;
    if (lane_group(a, r, end, W, &xstep, &gstep)) {
      const scalar_t* x0 = x + n * a.sn + sp * a.ss;
      if (xstep == 1 && gstep == 1) {
        grad_lanes<scalar_t, false>(a, r, x0, grow, 1, 1);
      } else {
        grad_lanes<scalar_t, true>(a, r, x0, grow, xstep, gstep);
      }
      r += W - 1;
      continue;
    }
    const int64_t y = load_target(a, r);
    if (!target_valid(y, a.C, a.ignore_index)) {
      for (int64_t j = 0; j < a.C; ++j) grow[j * a.gc] = scalar_t(0);
      continue;
    }
    const scalar_t* row = x + n * a.sn + sp * a.ss;
    const acc_t inv_t = inv_temp[a.K == 1 ? 0 : y];
    const acc_t g_r = grad_rows_in ? grad_rows_in[r] : static_cast<acc_t>(a.grad_scalar);
    const acc_t scale = g_r * static_cast<acc_t>(a.row_scale) * inv_t;
    const acc_t m = rs[kRowMax * R + r], H = rs[kRowH * R + r], log_s = rs[kRowLogS * R + r];
    if (!gather) {
      grad_row_contiguous<scalar_t>(row, grow, a.C, inv_t, m, log_s, H, c, scale);
    } else {
      for (int64_t j = 0; j < a.C; ++j) xbuf[j] = row[j * a.sc];
      grad_row_contiguous<scalar_t>(xbuf.data(), gbuf.data(), a.C, inv_t, m, log_s, H, c, scale);
      for (int64_t j = 0; j < a.C; ++j) grow[j * a.gc] = gbuf[j];
    }
    targets.add(grow + y * a.gc, static_cast<acc_t>(row[y * a.sc]), inv_t, m, log_s, H, scale);
  }
}

inline RowRangeFn stats_fn(int dtype) {
  switch (dtype) {
    case kF64: return &stats_rows<double>;
    case kF32: return &stats_rows<float>;
    case kBF16: return &stats_rows<c10::BFloat16>;
    default: return &stats_rows<c10::Half>;
  }
}

inline RowRangeFn grad_fn(int dtype) {
  switch (dtype) {
    case kF64: return &grad_rows<double>;
    case kF32: return &grad_rows<float>;
    case kBF16: return &grad_rows<c10::BFloat16>;
    default: return &grad_rows<c10::Half>;
  }
}

// The entry points the glue calls (one pair per compiled capability).
void stats_range(const RowArgs& a, int64_t begin, int64_t end) { stats_fn(a.dtype)(a, begin, end); }
void grad_range(const RowArgs& a, int64_t begin, int64_t end) { grad_fn(a.dtype)(a, begin, end); }

}  // namespace MITK_CPU_ISA
}  // namespace cpu
}  // namespace mitk


// =============================================================================================
// Torch glue: checks, temperatures, parallel row loop, summary, finalize, registration.
// Compiled once (DEFAULT pass only).
// =============================================================================================
#ifndef MITK_CPU_KERNELS_ONLY

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <cstdlib>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <torch/library.h>

#include "../op_checks.h"

#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mitk {
namespace cpu {

// The entry points of an ISA's kernels (defined in setup.py's generated wrapper for it).
#define MITK_CPU_ISA_ENTRY_POINTS(ISA)                                \
  namespace ISA {                                                     \
  void stats_range(const RowArgs& a, int64_t begin, int64_t end);     \
  void grad_range(const RowArgs& a, int64_t begin, int64_t end);      \
  }
#ifdef MITK_HAVE_CPU_AVX2
MITK_CPU_ISA_ENTRY_POINTS(AVX2)
#endif
#ifdef MITK_HAVE_CPU_AVX512
MITK_CPU_ISA_ENTRY_POINTS(AVX512)
#endif
#undef MITK_CPU_ISA_ENTRY_POINTS

namespace {

using at::Tensor;

struct Kernels {
  RowRangeFn stats;
  RowRangeFn grad;
  const char* isa;
};

// The widest kernels the CPU runs. ATen's switch ATEN_CPU_CAPABILITY caps them here too:
// `default` the portable kernels, `avx2` at most AVX2 (how the tests reach each set).
const Kernels& kernels() {
  static const Kernels k = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = forced ? forced : "";
    if (cap == "default") return Kernels{&DEFAULT::stats_range, &DEFAULT::grad_range, "default"};
#if defined(MITK_HAVE_CPU_AVX2) || defined(MITK_HAVE_CPU_AVX512)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
#endif
#ifdef MITK_HAVE_CPU_AVX512
    // 16 floats a vector: the row loops are bound by their arithmetic (1024 x 32000 fp32 on
    // this machine's AMD EPYC: forward 0.34 -> 0.22 ns a logit against AVX2)
    if (cap != "avx2" && avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq")) {
      return Kernels{&AVX512::stats_range, &AVX512::grad_range, "avx512"};
    }
#endif
#ifdef MITK_HAVE_CPU_AVX2
    if (avx2) return Kernels{&AVX2::stats_range, &AVX2::grad_range, "avx2"};
#endif
    return Kernels{&DEFAULT::stats_range, &DEFAULT::grad_range, "default"};
  }();
  return k;
}

// A fresh multi-megabyte gradient costs more in first-touch page faults than the kernel itself
// (4096 x 32000 fp32 here: ~390 ms of faults vs ~110 ms of work). Where the kernel offers
// transparent huge pages on request (THP "madvise" mode), ask for them before the first write.
// Advice only: nothing changes when it is refused.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.storage().nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Rows per parallel task: enough elements that a task outweighs its scheduling.
constexpr int64_t kGrainElements = 32768;
// Rows per summary chunk (at least C, so the per-chunk partials stay O(R + C)).
constexpr int64_t kSummaryChunk = 8192;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: checks::check_logits_dtype(t);  // throws: the one message for these dtypes
  }
  return kF32;
}

using checks::acc_type;

// Outputs come straight from the CPU allocator, not through a dispatched at::empty / zeros /
// .to(): on a 32-row batch each dispatched op costs about as much as the rows' math, and a
// step makes a dozen of them.
Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype);
}

// An empty tensor with the layout empty_like gives: the same strides when `like` is
// non-overlapping and dense (straight from the allocator), else through empty_like itself.
Tensor empty_cpu_like(const Tensor& like) {
  if (like.is_non_overlapping_and_dense()) {
    return at::detail::empty_strided_cpu(like.sizes(), like.strides(), like.scalar_type());
  }
  // A view with gaps (a sliced, transposed sequence of logits, say): dense strides in the view's
  // own order, as at::empty_like gives and the ops' fake kernels promise. A compiled graph
  // checks the gradient's strides against theirs; the kernels take any gradient strides.
  return at::empty_like(like);
}

// Element i of a floating tensor's data, as double / from double (float64, float32, bfloat16,
// float16: the dtypes a loss, grad_info or gradient can have).
double load_as_double(const void* p, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kDouble: return static_cast<const double*>(p)[i];
    case at::kFloat: return static_cast<const float*>(p)[i];
    case at::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case at::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: TORCH_CHECK(false, "mitkernels: unexpected dtype ", t);
  }
  return 0.0;
}

void store_from_double(void* p, at::ScalarType t, int64_t i, double v) {
  switch (t) {
    case at::kDouble: static_cast<double*>(p)[i] = v; break;
    case at::kFloat: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case at::kBFloat16: static_cast<c10::BFloat16*>(p)[i] = static_cast<float>(v); break;
    case at::kHalf: static_cast<c10::Half*>(p)[i] = static_cast<float>(v); break;
    default: TORCH_CHECK(false, "mitkernels: unexpected dtype ", t);
  }
}

double read_scalar(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kDouble: return *t.const_data_ptr<double>();
    case at::kFloat: return *t.const_data_ptr<float>();
    case at::kLong: return static_cast<double>(*t.const_data_ptr<int64_t>());
    case at::kInt: return *t.const_data_ptr<int32_t>();
    default: return t.item<double>();
  }
}

void write_scalar(const Tensor& t, double v) {
  switch (t.scalar_type()) {
    case at::kDouble: *t.mutable_data_ptr<double>() = v; break;
    case at::kFloat: *t.mutable_data_ptr<float>() = static_cast<float>(v); break;
    case at::kLong: *t.mutable_data_ptr<int64_t>() = saturating_cast<int64_t>(v); break;
    case at::kInt: *t.mutable_data_ptr<int32_t>() = saturating_cast<int32_t>(v); break;
    default: t.fill_(v);
  }
}

// Neumaier's compensated sum, for the finalize's walks over the classes: one term after another,
// plain addition loses up to C ulps (8.5e-13 of H* at C = 1e5, against the reference's pairwise
// 3e-16); this keeps about one. A NaN or inf sum is returned as it is (its correction is NaN).
struct CompensatedSum {
  double sum = 0.0, correction = 0.0;
  void add(double v) {
    const double t = sum + v;
    correction += std::fabs(sum) >= std::fabs(v) ? (sum - t) + v : (v - t) + sum;
    sum = t;
  }
  double value() const { return std::isfinite(sum) ? sum + correction : sum; }
};

// dual_updates counts steps: integer arithmetic for an integer tensor, so that the count stays
// exact past 2^53, where a round trip through a double would stop it (or step it back).
int64_t read_count(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kLong: return *t.const_data_ptr<int64_t>();
    case at::kInt: return *t.const_data_ptr<int32_t>();
    default: return saturating_cast<int64_t>(read_scalar(t));
  }
}

void write_count(const Tensor& t, int64_t v) {
  switch (t.scalar_type()) {
    case at::kLong: *t.mutable_data_ptr<int64_t>() = v; break;
    case at::kInt: *t.mutable_data_ptr<int32_t>() = saturating_cast<int32_t>(static_cast<double>(v)); break;
    default: write_scalar(t, static_cast<double>(v));
  }
}

// Row inputs of row_stats / loss_forward_ / loss_backward: shapes, dtypes, devices.
using checks::RowShape;
RowShape check_row_inputs(const Tensor& logits, const Tensor& targets, const Tensor& tau,
                          const char* op) {
  return checks::check_row_inputs(logits, targets, tau, c10::kCPU, op);
}

// T_k in double, rounded through tau's dtype (as the eager computation in that dtype would be).
double temperature_of(const Tensor& tau, int64_t k, double t_eps, double t_min, double t_max,
                      double* dT = nullptr) {
  const bool f32 = tau.scalar_type() == at::kFloat;
  const double v = f32 ? static_cast<double>(tau.const_data_ptr<float>()[k])
                       : tau.const_data_ptr<double>()[k];
  return temperature(v, f32, t_eps, t_min, t_max, dT);
}

// Acc-typed 1/T_k, held in a small vector (no heap allocation for one temperature).
struct InvTemps {
  c10::SmallVector<double, 4> d;
  c10::SmallVector<float, 4> f;
  const void* fill(const Tensor& tau, bool acc64, double t_eps, double t_min, double t_max) {
    const int64_t K = tau.numel();
    if (acc64) {
      d.resize(K);
      for (int64_t k = 0; k < K; ++k) d[k] = 1.0 / temperature_of(tau, k, t_eps, t_min, t_max);
      return d.data();
    }
    f.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      f[k] = 1.0f / static_cast<float>(temperature_of(tau, k, t_eps, t_min, t_max));
    }
    return f.data();
  }
};

RowArgs row_args(const Tensor& logits, const Tensor& targets, const RowShape& sh,
                 int64_t ignore_index) {
  RowArgs a;
  a.logits = logits.const_data_ptr();
  a.dtype = dtype_code(logits.scalar_type());
  a.N = sh.N;
  a.C = sh.C;
  a.S = sh.S;
  a.sn = logits.stride(0);
  a.sc = logits.stride(1);
  a.ss = logits.stride(2);
  a.targets = targets.const_data_ptr();
  a.targets64 = targets.scalar_type() == at::kLong;
  a.K = sh.K;
  a.ignore_index = ignore_index;
  return a;
}

void run_rows(RowRangeFn fn, const RowArgs& a, int64_t R, int64_t C) {
  if (R == 0) return;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
  at::parallel_for(0, R, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

int64_t target_at(const RowArgs& a, int64_t r) {
  return a.targets64 ? static_cast<const int64_t*>(a.targets)[r]
                     : static_cast<int64_t>(static_cast<const int32_t*>(a.targets)[r]);
}

// summary = [B, sum (CE - H), sum H, sum V, n_invalid, hist[C], (sum_{y=k}(CE - H))[C],
//            (sum_{y=k} V)[C]]
// Fixed-size row chunks (size from R and C only), each summed in row order, then combined in
// chunk order: the same bits for any thread count.
template <typename acc_t>
void summarize(const RowArgs& a, const acc_t* rs, int64_t R, int64_t C, int64_t K, double* out) {
  const bool per_class = K != 1;
  const int64_t size = SUMMARY_HEADER_SIZE + (per_class ? 3 * C : C);
  // Rows go kSumWays at a time into as many partial sums, added up in a fixed order at the end of
  // the chunk: one running sum a quantity made each row wait on the previous row's add. The
  // float sums keep one order, whatever the threads. Counts are whole numbers, exact in any
  // order: the row pass took them (a.counts) where the classes are few and the temperature one;
  // otherwise they are taken here.
  const std::atomic<int64_t>* const counts = a.counts;
  constexpr int64_t kSumWays = 4;
  const acc_t* const quantity[3] = {rs + kRowCEH * R, rs + kRowH * R, rs + kRowV * R};
  auto add_rows = [&](int64_t b, int64_t e, double* acc) {
    // The statistics of a row that is not valid are +0 (the row kernels store zeros), so the
    // sums take every row, branch-free (the compiler vectorizes the ways): the same additions,
    // in the same order, as taking the valid rows only (adding +0 to a sum that starts at +0
    // changes no bit).
    double part[3][kSumWays] = {};
    for (int q = 0; q < 3; ++q) {
      const acc_t* v = quantity[q];
      int64_t r0 = b;
      for (; r0 + kSumWays <= e; r0 += kSumWays) {
        for (int64_t w = 0; w < kSumWays; ++w) part[q][w] += static_cast<double>(v[r0 + w]);
      }
      for (int64_t w = 0; r0 + w < e; ++w) part[q][w] += static_cast<double>(v[r0 + w]);
    }
    for (int64_t w = 0; w < kSumWays; ++w) {
      for (int q = 0; q < 3; ++q) acc[1 + q] += part[q][w];
    }
    if (counts != nullptr) return;
    int64_t valid = 0, invalid = 0;
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = target_at(a, r);
      const bool ok = target_valid(y, C, a.ignore_index);
      valid += ok;
      invalid += !ok && y != a.ignore_index;
      if (ok) {
        acc[5 + y] += 1.0;
        if (per_class) {
          acc[5 + C + y] += rs[kRowCEH * R + r];
          acc[5 + 2 * C + y] += rs[kRowV * R + r];
        }
      }
    }
    acc[0] += static_cast<double>(valid);
    acc[4] += static_cast<double>(invalid);
  };
  std::fill(out, out + size, 0.0);
  const int64_t chunk = std::max<int64_t>(kSummaryChunk, C);
  const int64_t n_chunks = (R + chunk - 1) / chunk;
  if (n_chunks > 1) {
    std::vector<double> part(static_cast<size_t>(n_chunks * size), 0.0);
    at::parallel_for(0, n_chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        add_rows(ch * chunk, std::min(R, (ch + 1) * chunk), part.data() + ch * size);
      }
    });
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const double* p = part.data() + ch * size;
      for (int64_t i = 0; i < size; ++i) out[i] += p[i];
    }
  } else {
    add_rows(0, R, out);
  }
  if (counts != nullptr) {
    for (int64_t k = 0; k < C; ++k) out[5 + k] = static_cast<double>(counts[k].load());
    out[0] = static_cast<double>(counts[C].load());
    out[4] = static_cast<double>(counts[C + 1].load());
  }
}

// The summary of row_stats_impl: a host vector, since loss_forward_ only reads it.
using Summary = std::vector<double>;

Tensor row_stats_impl(const Tensor& logits, const Tensor& targets_in, const Tensor& tau_in,
                      double t_eps, double t_min, double t_max, int64_t ignore_index,
                      const char* op, Summary& summary) {
  const RowShape sh = check_row_inputs(logits, targets_in, tau_in, op);
  const Tensor targets = targets_in.contiguous();
  const Tensor tau = tau_in.contiguous();
  const bool acc64 = logits.scalar_type() == at::kDouble;
  Tensor rs = empty_cpu({kRowStats, sh.R}, acc_type(logits.scalar_type()));
  summary.resize(static_cast<size_t>(SUMMARY_HEADER_SIZE + (sh.K == 1 ? sh.C : 3 * sh.C)));
  RowArgs a = row_args(logits, targets, sh, ignore_index);
  InvTemps inv;
  a.inv_temp = inv.fill(tau, acc64, t_eps, t_min, t_max);
  a.row_stats = rs.mutable_data_ptr();
  std::unique_ptr<std::atomic<int64_t>[]> counts;
  if (sh.K == 1 && sh.C <= kRowCountClasses) {
    counts.reset(new std::atomic<int64_t>[static_cast<size_t>(sh.C + 2)]);
    for (int64_t k = 0; k < sh.C + 2; ++k) counts[k].store(0, std::memory_order_relaxed);
    a.counts = counts.get();
  }
  run_rows(kernels().stats, a, sh.R, sh.C);
  if (acc64) {
    summarize<double>(a, rs.const_data_ptr<double>(), sh.R, sh.C, sh.K, summary.data());
  } else {
    summarize<float>(a, rs.const_data_ptr<float>(), sh.R, sh.C, sh.K, summary.data());
  }
  return rs;
}

std::tuple<Tensor, Tensor> row_stats_cpu(const Tensor& logits, const Tensor& targets,
                                         const Tensor& tau, double t_eps, double t_min,
                                         double t_max, int64_t ignore_index) {
  Summary summary;
  Tensor rs = row_stats_impl(logits, targets, tau, t_eps, t_min, t_max, ignore_index, "row_stats",
                             summary);
  Tensor out = empty_cpu({static_cast<int64_t>(summary.size())}, at::kDouble);
  std::copy(summary.begin(), summary.end(), out.mutable_data_ptr<double>());
  return {rs, out};
}

// ---------------------------------------------------------------------------------------------
// finalize_: float64 scalar math of the op contract.
// ---------------------------------------------------------------------------------------------
// The finalize_ math on host summaries: S (all ranks) and L (this rank's) of `size` entries.
std::tuple<Tensor, Tensor, Tensor> finalize_impl(
    const double* S, const double* L, int64_t size, const Tensor& row_stats, const Tensor& tau_in,
    at::TensorList state, int64_t kind, at::ArrayRef<double> hparams, double t_eps, double t_min,
    double t_max, int64_t reduction, bool update_state, at::ScalarType loss_dtype) {
  // Every check before anything is written.
  const int64_t C = checks::check_finalize_inputs(size, row_stats, tau_in, state, kind, hparams,
                                                  reduction, loss_dtype, c10::Device(c10::kCPU));
  checks::mark_state_written(state, kind, update_state);
  const int64_t K = tau_in.numel();
  const Tensor tau = tau_in.contiguous();

  const double B = S[0], sum_ceh = S[1], sum_h = S[2], sum_v = S[3], n_invalid = S[4];
  const double sum_ce = sum_ceh + sum_h;
  const double* hist = S + SUMMARY_HEADER_SIZE;
  const bool ok = B > 0 && n_invalid == 0 && std::isfinite(sum_ce) && std::isfinite(sum_h) &&
                  std::isfinite(sum_v);
  const bool upd = update_state && ok;
  const double Bg = std::max(B, 1.0);
  const double mean_ce = sum_ce / Bg, mean_h = sum_h / Bg;
  double h_star = 0.0;  // TET has no label entropy: 0 in the stats (never NaN)
  double c = 0.0, coef_stat = 0.0, alpha = 0.0;
  if (kind == kMiT) {
    double* counts = state[0].mutable_data_ptr<double>();
    if (upd) {
      for (int64_t k = 0; k < C; ++k) counts[k] += hist[k];
    }
    CompensatedSum total_sum, h_sum;
    for (int64_t k = 0; k < C; ++k) total_sum.add(counts[k]);
    const double total = total_sum.value();
    for (int64_t k = 0; k < C; ++k) h_sum.add(entropy_term(counts[k] / total));
    h_star = h_sum.value();
    c = read_scalar(state[2]);
    if (upd) {
      const int64_t n_new = next_count(read_count(state[3]));
      c = mit_dual_average(c, n_new, mit_dual_gap(h_star, mean_h, C));
      write_scalar(state[1], read_scalar(state[1]) + B);
      write_scalar(state[2], c);
      write_count(state[3], n_new);
    }
    coef_stat = c;
  } else if (kind == kTET) {
    c = coef_stat = hparams[0];
  } else {
    // a kind added to check_finalize_inputs needs its branch here (and in the CUDA and Triton
    // finalizes), not CCT-EAL's
    TORCH_INTERNAL_ASSERT(kind == kCCT, "finalize_: no branch for kind ", kind);
    double* ema = state[0].mutable_data_ptr<double>();
    const double momentum = hparams[0], eps = hparams[1];
    if (upd) {
      for (int64_t k = 0; k < C; ++k) ema[k] = ema_update(ema[k], momentum, hist[k] / Bg);
    }
    CompensatedSum h_sum;
    for (int64_t k = 0; k < C; ++k) h_sum.add(entropy_term(clamp_min(ema[k], eps)));
    h_star = h_sum.value();
    alpha = coef_stat = read_scalar(state[1]);
    c = cct_coef(alpha, mean_h, h_star);
  }

  // Loss from this rank's sums.
  const double Bl = L[0];
  const double Blg = std::max(Bl, 1.0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const LossForms forms =
      finalize_loss(kind, Bl, L[1] + L[2], L[2], c, alpha, mean_h, h_star, n_invalid);
  const double loss_mean = forms.mean, loss_sum = forms.sum;

  const int64_t R = row_stats.size(1);
  Tensor loss;
  if (reduction == 0) {
    // Per row in float64, rounded once to the loss dtype.
    const Tensor rs = row_stats.contiguous();
    const void* rp = rs.const_data_ptr();
    const at::ScalarType rt = rs.scalar_type();
    loss = empty_cpu({R}, loss_dtype);
    void* lp = loss.mutable_data_ptr();
    for (int64_t r = 0; r < R; ++r) {
      const double v = n_invalid > 0 ? nan
                                     : row_loss(load_as_double(rp, rt, kRowCEH * R + r),
                                                load_as_double(rp, rt, kRowH * R + r), c);
      store_from_double(lp, loss_dtype, r, v);
    }
  } else {
    loss = empty_cpu({}, loss_dtype);
    store_from_double(loss.mutable_data_ptr(), loss_dtype, 0,
                      reduction == 1 ? loss_mean : loss_sum);
  }

  // Temperatures and dL/dtau.
  const at::ScalarType acc = row_stats.scalar_type();
  c10::SmallVector<double, 8> gi(static_cast<size_t>(2 + K), 0.0);
  gi[0] = c;
  gi[1] = reduction == 1 ? 1.0 / Blg : 1.0;
  const double gs = reduction == 1 ? 1.0 / Bg : 1.0;
  double t_stat = 0.0;
  if (K == 1) {
    double dT = 0.0;
    const double T = temperature_of(tau, 0, t_eps, t_min, t_max, &dT);
    t_stat = kind == kCCT ? T * B / Bg : T;
    if (reduction != 0) gi[2] = grad_tau_value(gs, T, sum_ceh, c, sum_v, dT);
  } else {
    const double* cls_ce_h = S + SUMMARY_HEADER_SIZE + C;
    const double* cls_v = S + SUMMARY_HEADER_SIZE + 2 * C;
    double t_sum = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      double dT = 0.0;
      const double T = temperature_of(tau, k, t_eps, t_min, t_max, &dT);
      if (k == 0 && kind != kCCT) t_stat = T;
      t_sum += hist[k] * T;
      if (reduction != 0) gi[2 + k] = grad_tau_value(gs, T, cls_ce_h[k], c, cls_v[k], dT);
    }
    if (kind == kCCT) t_stat = t_sum / Bg;
  }
  Tensor grad_info = empty_cpu({2 + K}, acc);
  for (int64_t i = 0; i < 2 + K; ++i) store_from_double(grad_info.mutable_data_ptr(), acc, i, gi[i]);

  Tensor stats = empty_cpu({STATS_SIZE}, at::kDouble);
  double* st = stats.mutable_data_ptr<double>();
  st[0] = loss_mean;  // the mean form whatever the reduction (ops.py's contract, as reference.py)
  st[1] = mean_ce;
  st[2] = mean_h;
  st[3] = h_star;
  st[4] = coef_stat;
  st[5] = t_stat;
  st[6] = upd ? 1.0 : 0.0;
  st[7] = B;
  st[8] = n_invalid;
  return {loss, stats, grad_info};
}

std::tuple<Tensor, Tensor, Tensor> finalize_cpu(
    const Tensor& summary_in, const std::optional<Tensor>& local_in, const Tensor& row_stats,
    const Tensor& tau, at::TensorList state, int64_t kind, at::ArrayRef<double> hparams,
    double t_eps, double t_min, double t_max, int64_t reduction, bool update_state,
    at::ScalarType loss_dtype) {
  const int64_t size = checks::check_summaries(summary_in, local_in, c10::kCPU);
  const Tensor summary = summary_in.contiguous();
  const Tensor local = local_in.has_value() ? local_in->contiguous() : summary;
  return finalize_impl(summary.const_data_ptr<double>(), local.const_data_ptr<double>(), size,
                       row_stats, tau, state, kind, hparams, t_eps, t_min, t_max, reduction,
                       update_state, loss_dtype);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> loss_forward_cpu(
    const Tensor& logits, const Tensor& targets, const Tensor& tau, at::TensorList state,
    int64_t kind, at::ArrayRef<double> hparams, double t_eps, double t_min, double t_max,
    int64_t ignore_index, int64_t reduction, bool update_state, at::ScalarType loss_dtype) {
  Summary summary;
  Tensor rs = row_stats_impl(logits, targets, tau, t_eps, t_min, t_max, ignore_index,
                             "loss_forward_", summary);
  auto [loss, stats, grad_info] =
      finalize_impl(summary.data(), summary.data(), static_cast<int64_t>(summary.size()), rs, tau,
                    state, kind, hparams, t_eps, t_min, t_max, reduction, update_state, loss_dtype);
  return {loss, stats, rs, grad_info};
}

// ---------------------------------------------------------------------------------------------
// loss_backward
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> loss_backward_cpu(const Tensor& grad_loss, const Tensor& logits,
                                             const Tensor& targets_in, const Tensor& tau_in,
                                             const Tensor& row_stats_in, const Tensor& grad_info_in,
                                             double t_eps, double t_min, double t_max,
                                             int64_t ignore_index, int64_t reduction,
                                             bool compute_grad_tau) {
  const char* op = "loss_backward";
  const RowShape sh = check_row_inputs(logits, targets_in, tau_in, op);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const bool acc64 = acc == at::kDouble;
  checks::check_backward_inputs(grad_loss, row_stats_in, grad_info_in, sh, acc, reduction,
                                c10::Device(c10::kCPU));
  const Tensor targets = targets_in.contiguous();
  const Tensor tau = tau_in.contiguous();
  const Tensor rs = row_stats_in.contiguous();
  const Tensor gi_t = grad_info_in.contiguous();
  c10::SmallVector<double, 8> gip(static_cast<size_t>(2 + sh.K));
  for (int64_t i = 0; i < 2 + sh.K; ++i) {
    gip[i] = load_as_double(gi_t.const_data_ptr(), gi_t.scalar_type(), i);
  }

  Tensor grad = empty_cpu_like(logits);
  advise_huge_pages(grad);
  RowArgs a = row_args(logits, targets, sh, ignore_index);
  InvTemps inv;
  a.inv_temp = inv.fill(tau, acc64, t_eps, t_min, t_max);
  a.row_stats = const_cast<void*>(rs.const_data_ptr());
  a.grad = grad.mutable_data_ptr();
  a.gn = grad.stride(0);
  a.gc = grad.stride(1);
  a.gs = grad.stride(2);
  a.coef = gip[0];
  a.row_scale = gip[1];
  Tensor g_rows;
  if (reduction == 0) {
    g_rows = grad_loss.reshape({sh.R}).to(acc).contiguous();
    a.grad_rows = g_rows.const_data_ptr();
  } else {
    a.grad_scalar = load_as_double(grad_loss.const_data_ptr(), grad_loss.scalar_type(), 0);
  }
  run_rows(kernels().grad, a, sh.R, sh.C);

  std::vector<double> gt(static_cast<size_t>(sh.K), 0.0);
  if (compute_grad_tau) {
    if (reduction != 0) {
      for (int64_t k = 0; k < sh.K; ++k) gt[k] = a.grad_scalar * gip[2 + k];
    } else {
      // Row order, one accumulator per temperature: deterministic.
      const Tensor rs64 = rs.to(at::kDouble);
      const Tensor g64 = g_rows.to(at::kDouble);
      const double* p = rs64.const_data_ptr<double>();
      const double* gr = g64.const_data_ptr<double>();
      const int64_t R = sh.R;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t y = target_at(a, r);
        if (!target_valid(y, sh.C, ignore_index)) continue;
        gt[sh.K == 1 ? 0 : y] += gr[r] * tau_row_term(p[kRowCEH * R + r], a.coef, p[kRowV * R + r]);
      }
      for (int64_t k = 0; k < sh.K; ++k) {
        double dT = 0.0;
        const double T = temperature_of(tau, k, t_eps, t_min, t_max, &dT);
        gt[k] = grad_tau_value(1.0, T, gt[k], 0.0, 0.0, dT);
      }
    }
  }
  Tensor grad_tau = empty_cpu({sh.K}, tau.scalar_type());
  for (int64_t k = 0; k < sh.K; ++k) {
    store_from_double(grad_tau.mutable_data_ptr(), tau.scalar_type(), k, gt[k]);
  }
  return {grad, grad_tau};
}

}  // namespace

const char* kernel_isa() { return kernels().isa; }

}  // namespace cpu
}  // namespace mitk

TORCH_LIBRARY_IMPL(mitkernels_C, CPU, m) {
  m.impl("row_stats", &mitk::cpu::row_stats_cpu);
  m.impl("finalize_", &mitk::cpu::finalize_cpu);
  m.impl("loss_forward_", &mitk::cpu::loss_forward_cpu);
  m.impl("loss_backward", &mitk::cpu::loss_backward_cpu);
}

#endif  // MITK_CPU_KERNELS_ONLY
