// The scalar math of the MiT loss family, shared by the CPU and CUDA kernels.
//
// Every formula of docs/KERNEL_MATH.md that a kernel evaluates lives here once. Functions are
// templates over the value type `V`: a plain float/double, or (on CPU) an at::vec::Vectorized,
// so the vector and scalar paths evaluate the very same expression. Only + - * / and the
// helpers passed in are used on `V`; exp/log of scalars use the std:: / CUDA overloads.
//
// No torch headers: this file is compiled by nvcc as well.
#pragma once

#include <cmath>
#include <type_traits>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MITK_HD __host__ __device__ __forceinline__
#else
#define MITK_HD inline
#endif

namespace mitk {

// Unqualified exp/log below pick the float or double overload (std:: on host, CUDA's on device).
using std::exp;
using std::log;
using std::log1p;

// Entries of the summary before the per-class arrays: B, sum (CE - H), sum H, sum V, n_invalid.
// CE - H rather than CE: the temperature gradient needs sum (CE - H), and with near-uniform
// predictions (small logits, as at initialization) CE and H both sit near log C, so their
// difference taken from rounded values lost its digits (1e-4 relative in float32 at logits of
// 0.01 and C = 1000, where eager autograd is within 1e-6). The kernels form CE - H directly.
constexpr int64_t SUMMARY_HEADER_SIZE = 5;
// Entries of the stats vector: loss, mean CE, mean H, H*, lambda|alpha, T, updated, B, n_invalid.
constexpr int64_t STATS_SIZE = 9;

// finalize_'s `kind` (mitkernels/ops.py's KIND_*): what it makes of the summary. The row pass and
// the backward are the same for every kind.
enum LossKind : int64_t { kMiT = 0, kTET = 1, kCCT = 2 };

// Rows of the row_stats tensor ([kRowStats, R], acc type): the row's max logit m (logit units,
// not divided by T), H, V, CE - H, log s with s = sum_j exp((x_j - m) / T). The backward takes
// log p = (x - m) / T - log s from m and log s, not x / T - lse: lse = m / T + log s rounds to the
// ulp of |x / T|, and log p inherited that error (3e-5 at |z| = 500 in float32, on p of the
// dominant class too, where eager PyTorch's log_softmax is exact).
constexpr int64_t kRowStats = 5;
constexpr int64_t kRowMax = 0, kRowH = 1, kRowV = 2, kRowCEH = 3, kRowLogS = 4;

// Logits shifted by the row max are clamped here before exp: exp(-1e4) is 0 in float and double,
// and the clamp keeps e * d and e * d^2 at 0 (not NaN) for -inf logits.
constexpr double kMinShift = -1e4;

template <typename acc_t>
MITK_HD acc_t clamp_shift(acc_t d) {
  return d < acc_t(kMinShift) ? acc_t(kMinShift) : d;  // NaN stays NaN
}

// ---------------------------------------------------------------------------------------------
// Temperature: T = clamp(softplus(tau) + t_eps, t_min, t_max), torch's softplus (threshold 20).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
MITK_HD acc_t softplus(acc_t x) {
  return x > acc_t(20) ? x : log1p(exp(x));
}

template <typename acc_t>
MITK_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

MITK_HD double round_to(double x, bool f32) {
  return f32 ? static_cast<double>(static_cast<float>(x)) : x;
}

// T = clamp(softplus(tau) + t_eps, t_min, t_max) of one tau, in double, rounded as torch
// computes it in tau's dtype (float32 when tau_f32): softplus(tau) + t_eps and the bounds are
// rounded to it before the clamp. With *dT, dT/dtau: sigmoid(tau) (1 above softplus' threshold)
// inside torch.clamp's inclusive range, tested on those rounded values, else 0. So a float32
// tau whose T rounds onto a bound keeps its gradient, as in torch (softplus(tau) = 1.50000003
// is 1.5 in float32: on a bound of 1.5, inside the range); a test on the unrounded double had
// it outside, with a gradient of 0 that kept tau there for good. A NaN tau gives T and dT NaN,
// as the reference's autograd does (the clamp passes 0, softplus' backward makes it 0 * NaN).
MITK_HD double temperature(double tau, bool tau_f32, double t_eps, double t_min,
                                  double t_max, double* dT = nullptr) {
  const double raw = round_to(softplus(tau) + t_eps, tau_f32);
  const double lo = round_to(t_min, tau_f32), hi = round_to(t_max, tau_f32);
  const bool inside = raw >= lo && raw <= hi;
  if (dT) *dT = tau != tau ? tau : !inside ? 0.0 : tau > 20.0 ? 1.0 : sigmoid(tau);
  return raw < lo ? lo : raw > hi ? hi : raw;
}

// ---------------------------------------------------------------------------------------------
// Online row accumulators (KERNEL_MATH s.2). With the row max m and d = (x - m) / T <= 0:
//   s = sum e^d, A = sum e^d d, Q = sum e^d d^2.
// ---------------------------------------------------------------------------------------------
template <typename V>
MITK_HD void acc_add(V& s, V& A, V& Q, const V& e, const V& d) {
  const V ed = e * d;
  s = s + e;
  A = A + ed;
  Q = Q + ed * d;
}

// acc_add of two terms, summed together before they join the running sums: shorter add chains,
// and each running sum takes half the terms (less fp32 rounding growth). No block sums start from
// 0: 0 + x is not x to the compiler (-0), so a zeroed block cost three adds a vector.
template <typename V>
MITK_HD void acc_add2(V& s, V& A, V& Q, const V& e0, const V& d0, const V& e1, const V& d1) {
  const V ed0 = e0 * d0, ed1 = e1 * d1;
  s = s + (e0 + e1);
  A = A + (ed0 + ed1);
  Q = Q + (ed0 * d0 + ed1 * d1);
}

// The max rose by -d (d = m_old - m_new <= 0), f = e^d: re-express the sums about the new max.
template <typename V>
MITK_HD void acc_rescale(V& s, V& A, V& Q, const V& d, const V& f) {
  Q = f * (Q + V(2) * d * A + d * d * s);
  A = f * (A + d * s);
  s = f * s;
}

// Merge accumulator b (max mb) into a (max ma); both maxima in logit units (d = (m - m') / T),
// either may be -inf for an empty accumulator. Used where lanes or threads kept their own max.
// d is floored at kMinShift like every shift: a max far below the other (a span of masked
// logits of -1e30) then scales its sums by 0, where d^2 would overflow into 0 * inf.
template <typename acc_t>
MITK_HD void acc_merge(acc_t& ma, acc_t& sa, acc_t& Aa, acc_t& Qa, acc_t mb, acc_t sb, acc_t Ab,
                       acc_t Qb, acc_t inv_t) {
  if (!(sb > acc_t(0))) return;
  if (!(sa > acc_t(0))) {
    ma = mb; sa = sb; Aa = Ab; Qa = Qb;
    return;
  }
  if (mb > ma) {
    const acc_t d = clamp_shift((ma - mb) * inv_t);
    acc_rescale(sa, Aa, Qa, d, exp(d));
    ma = mb;
  } else if (mb < ma) {
    const acc_t d = clamp_shift((mb - ma) * inv_t);
    acc_rescale(sb, Ab, Qb, d, exp(d));
  }
  sa += sb;
  Aa += Ab;
  Qa += Qb;
}

// Row finish: H (predictive entropy), V (variance of z under p), CE - H and log s, from the
// accumulators about the row max m (logit units) and the target's logit. H = log s - A/s without
// cancelling m; CE - H = E_p[z] - z_y = (m - x_y) / T + A/s, with no log s to cancel
// (SUMMARY_HEADER_SIZE says why); CE = (CE - H) + H where the loss needs it.
template <typename acc_t>
struct RowStats {
  acc_t m, H, V, CEH, log_s;
};

// The log (ln) and the floor at 0 (max0) of row_finish, for scalars. The CPU kernels finish
// their rows W at a time on vectors, with their own (VecFinishOps in csrc/cpu/).
struct ScalarFinishOps {
  template <typename acc_t>
  MITK_HD static acc_t ln(acc_t v) {
    return log(v);  // as everywhere here: std:: on the host, CUDA's on the device
  }
  template <typename acc_t>
  MITK_HD static acc_t max0(acc_t v) {
    return v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN
  }
};

template <typename V, typename Ops>
MITK_HD RowStats<V> row_finish_with(const V& m, const V& inv_t, const V& s, const V& A,
                                    const V& Q, const V& x_target) {
  RowStats<V> r;
  const V log_s = Ops::ln(s);
  const V a = A / s;
  r.m = m;
  r.log_s = log_s;
  r.H = log_s - a;
  r.V = Ops::max0(Q / s - a * a);  // rounding can leave a tiny negative
  r.CEH = (m - x_target) * inv_t + a;
  return r;
}

template <typename acc_t>
MITK_HD RowStats<acc_t> row_finish(acc_t m, acc_t inv_t, acc_t s, acc_t A, acc_t Q,
                                   acc_t x_target) {
  return row_finish_with<acc_t, ScalarFinishOps>(m, inv_t, s, A, Q, x_target);
}

// Row r of row_stats ([kRowStats, R], rows kRowMax .. kRowLogS): a valid row's statistics, or
// zeros for a row that is not valid.
template <typename acc_t>
MITK_HD void store_row_stats(acc_t* rs, int64_t R, int64_t r, const RowStats<acc_t>& st) {
  rs[kRowMax * R + r] = st.m;
  rs[kRowH * R + r] = st.H;
  rs[kRowV * R + r] = st.V;
  rs[kRowCEH * R + r] = st.CEH;
  rs[kRowLogS * R + r] = st.log_s;
}

template <typename acc_t>
MITK_HD void store_zero_row_stats(acc_t* rs, int64_t R, int64_t r) {
  for (int64_t k = 0; k < kRowStats; ++k) rs[k * R + r] = acc_t(0);
}

// log p_j = (x_j - m) / T - log s, before the kMinShift clamp (KERNEL_MATH s.3). The difference
// first: exact for the logits near the max, whose p matter, whatever |x / T|.
template <typename V>
MITK_HD V log_prob(const V& x, const V& m, const V& inv_t, const V& log_s) {
  return (x - m) * inv_t - log_s;
}

// ---------------------------------------------------------------------------------------------
// Gradient w.r.t. the logits (KERNEL_MATH s.3), with scale = g row_scale / T_r and log p from
// log_prob:
//   dx = scale (p (1 + c (log p + H)) - [j == y])
// ---------------------------------------------------------------------------------------------
template <typename V>
MITK_HD V grad_logit_target(const V& p, const V& log_p, const V& H, const V& c, const V& scale) {
  return scale * (p * (V(1) + c * (log_p + H)) - V(1));
}

// The non-target elements' dx with the row's constants gathered: p (a + b log p),
// a = scale (1 + c H), b = scale c; two operations an element, for the per-element loops of the
// CPU and CUDA kernels. log p may be held in another unit: the base-2 kernels (CUDA's backward,
// the CPU's float exp) take u = log2 p, whose exp is the cheaper one, and nats_per_unit = ln 2
// makes b u = scale c log p; the CPU's double (and MITK_CPU_PRECISE_EXP) stays in nats, 1.
template <typename V>
struct GradCoeffs {
  V a, b;
};

template <typename V>
MITK_HD GradCoeffs<V> grad_logit_coeffs(const V& H, const V& c, const V& scale,
                                        const V& nats_per_unit) {
  return {scale * (V(1) + c * H), scale * c * nats_per_unit};
}

template <typename V>
MITK_HD V grad_logit_folded(const V& p, const V& log_p, const V& a, const V& b) {
  return p * (a + b * log_p);
}

// Row term of sum_j (dL/dz_j) z_j (KERNEL_MATH s.4): (CE - H) + c V.
template <typename acc_t>
MITK_HD acc_t tau_row_term(acc_t ce_minus_h, acc_t c, acc_t v) {
  return ce_minus_h + c * v;
}

// dL/dtau = -gs / T * (sum (CE - H) + c sum V) * dT/dtau. A clamped T passes no gradient even
// where the rest is inf (a row whose CE overflowed): torch's clamp backward masks, where a
// product with dT = 0 would give NaN and poison tau.
template <typename acc_t>
MITK_HD acc_t grad_tau_value(acc_t gs, acc_t T, acc_t sum_ce_minus_h, acc_t c, acc_t sum_v,
                             acc_t dT) {
  if (dT == acc_t(0)) return acc_t(0);
  return -gs / T * tau_row_term(sum_ce_minus_h, c, sum_v) * dT;
}

// ---------------------------------------------------------------------------------------------
// Finalize (float64 scalars).
// ---------------------------------------------------------------------------------------------
// One term of the entropy -sum q log q, with 0 log 0 = 0.
MITK_HD double entropy_term(double q) {
  return q == 0.0 ? 0.0 : -q * log(q);  // torch.xlogy's -q log q: NaN (and q < 0) give NaN
}

// torch.clamp_min(q, lo): a NaN stays NaN (std::max or a > test would drop it).
MITK_HD double clamp_min(double q, double lo) { return q < lo ? lo : q; }

// MiT dual averaging: d = max(0, (H* - H) / log C), lam' = clamp((lam (n' - 1) + d) / n', 0, 0.5).
MITK_HD double mit_dual_gap(double h_star, double mean_h, int64_t num_classes) {
  const double d = (h_star - mean_h) / log(static_cast<double>(num_classes));
  return d < 0.0 ? 0.0 : d;  // NaN stays NaN, as torch.clamp(min=0)
}

// dual_updates + 1, held at its largest value rather than overflow (a state dict can hold any
// count; the reference and Triton hold it there too).
MITK_HD int64_t next_count(int64_t n) {
  return n < static_cast<int64_t>(0x7fffffffffffffffLL) ? n + 1 : n;
}

// A double stored into an integer state scalar: saturated at I's range, NaN as 0, never the
// conversion C++ leaves undefined (an int32 total_seen past 2^31, say).
template <typename I>
MITK_HD I saturating_cast(double v) {
  constexpr I kMax = static_cast<I>(~static_cast<typename std::make_unsigned<I>::type>(0) >> 1);
  constexpr I kMin = static_cast<I>(-kMax - 1);
  if (!(v == v)) return 0;
  if (v >= static_cast<double>(kMax)) return kMax;  // 2^63 or 2^31 - 1 exactly as doubles
  if (v <= static_cast<double>(kMin)) return kMin;
  return static_cast<I>(v);
}

MITK_HD double mit_dual_average(double lam, int64_t n_new, double d) {
  double l = (lam * static_cast<double>(n_new - 1) + d) / static_cast<double>(n_new);
  if (l < 0.0) l = 0.0;
  if (l > 0.5) l = 0.5;
  return l;
}

// CCT-EAL: coefficient c = -dR/dH of R = alpha (H - H*)^2, and the regularizer itself.
MITK_HD double cct_coef(double alpha, double mean_h, double h_star) {
  return -2.0 * alpha * (mean_h - h_star);
}

MITK_HD double cct_penalty(double alpha, double mean_h, double h_star) {
  const double g = mean_h - h_star;
  return alpha * g * g;
}

MITK_HD double ema_update(double ema, double momentum, double freq) {
  return momentum * ema + (1.0 - momentum) * freq;
}

// finalize_'s loss from this rank's valid count Bl and sums of CE and H (ops.py's contract):
// the mean and sum forms, CE - c H (MiT, TET) or CE + alpha (H - H*)^2 per row (CCT-EAL, with
// H and H* of all ranks); NaN when any rank had an invalid target, 0 when this rank has no
// valid row.
struct LossForms {
  double mean, sum;
};

MITK_HD LossForms finalize_loss(int64_t kind, double Bl, double ce_l, double h_l, double c,
                                double alpha, double mean_h, double h_star, double n_invalid) {
  if (n_invalid > 0) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {nan, nan};
  }
  if (Bl == 0) return {0.0, 0.0};
  if (kind == kCCT) {
    const double penalty = cct_penalty(alpha, mean_h, h_star);
    return {ce_l / Bl + penalty, ce_l + Bl * penalty};
  }
  return {ce_l / Bl - c * h_l / Bl, ce_l - c * h_l};
}

// reduction 'none': a valid row's loss CE - c H, from the row statistics CE - H and H (0 for the
// other rows: their statistics are 0). Every kind with a per-row loss has this form (CCT-EAL,
// whose alignment term is a batch quantity, has none); the backward assumes it.
MITK_HD double row_loss(double ce_minus_h, double h, double c) {
  return ce_minus_h + (1.0 - c) * h;
}

// Row validity of the op contract.
MITK_HD bool target_valid(int64_t y, int64_t num_classes, int64_t ignore_index) {
  return y != ignore_index && y >= 0 && y < num_classes;
}

MITK_HD bool target_invalid(int64_t y, int64_t num_classes, int64_t ignore_index) {
  return y != ignore_index && (y < 0 || y >= num_classes);
}

}  // namespace mitk
