// CUDA kernels of the MiT loss family. No torch headers: plain pointers, sizes, strides and a
// stream; csrc/cuda/mit_loss_cuda.cpp is the torch glue and declares the launchers below.
//
// Layout of the work (its memory traffic: KERNEL_MATH s.5):
//   row_stats     one warp per row, one read of the logits (16-byte packets where the row is
//                 contiguous); lanes keep their own max and merge in a fixed shuffle tree
//                 (mitk::acc_merge). One thread per row where the classes are few, or
//                 strided ([N, C, H, W]) and at most 256 (thread_rows).
//   summary       fixed-size row chunks; block trees in a fixed order, chunk partials combined
//                 in chunk order. The class histogram counts a chunk in shared memory, then
//                 adds whole numbers by double atomics, which are exact (so order-free) below
//                 2^53. Per-class sums (K = C) are summed in row order by one thread per class.
//                 No float atomics anywhere.
//   finalize      one block: state update, H*, lambda / coefficient, loss, stats, grad_info.
//   backward      one warp per row, one read + one write (packets where both rows are
//                 contiguous and equally aligned), or one thread per row as row_stats;
//                 c and row_scale read on device.
// Nothing syncs with the host; offsets are int64.
//
// The glue includes this file with MITK_CUDA_API_ONLY defined: it then sees only the argument
// structs and the launcher declarations, so they are written once.
#include <cuda_runtime.h>

#include <cstdint>

#ifndef MITK_CUDA_API_ONLY
#include <cuda.h>  // CUfunction, CUresult: launch_driver_function
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../mit_loss_math.h"
#endif

namespace mitk {
namespace cuda {

enum LogitsDtype : int { kF64 = 0, kF32 = 1, kBF16 = 2, kF16 = 3 };
enum ScalarCode : int { kSDouble = 0, kSFloat = 1, kSLong = 2, kSInt = 3, kSHalf = 4, kSBFloat16 = 5 };

// What the glue passes: type-erased pointers (dtype codes above), sizes and strides in elements.
struct RowArgs {
  const void* logits;
  int dtype;
  int64_t N, C, S, sn, sc, ss;
  const void* targets;
  bool targets64;
  const void* tau;
  bool tau64;
  int64_t K;
  int64_t ignore_index;
  double t_eps, t_min, t_max;
  void* row_stats;  // [kRowStats, R] acc: m, H, V, CE - H, log s (mit_loss_math.h)
  // backward
  void* grad;
  int64_t gn, gc, gs;
  const void* grad_info;  // [2 + K] acc
  const void* grad_loss;  // [] or [R] acc
  bool grad_rows;
};

struct FinalizeArgs {
  const double* summary;
  const double* local;  // == summary when no local summary
  const void* row_stats;
  bool acc64;
  int64_t R, C, K;
  const void* tau;
  bool tau64;
  int kind;
  double hp0, hp1;
  double t_eps, t_min, t_max;
  int reduction;
  bool update_state;
  void* loss;
  int loss_code;  // ScalarCode
  double* stats;
  void* grad_info;  // acc
  // state (MiT: counts, total, lambda, n; CCT: ema, alpha)
  double* vec_state;
  void* s1;
  int s1_code;
  void* s2;
  int s2_code;
  void* s3;
  int s3_code;
};

// Doubles of scratch that launch_row_stats needs for R rows, C classes, K temperatures.
int64_t summary_workspace_doubles(int64_t R, int64_t C, int64_t K);
// Row stats into a.row_stats and the summary into `summary`.
cudaError_t launch_row_stats(const RowArgs& a, double* summary, double* workspace,
                             cudaStream_t stream);
cudaError_t launch_finalize(const FinalizeArgs& f, cudaStream_t stream);
cudaError_t launch_backward(const RowArgs& a, int reduction, bool compute_grad_tau, void* grad_tau,
                            cudaStream_t stream);
// Whether the gradient kernel has an image for the current device (this build's architectures).
bool backward_kernel_available();
// Launches `function`, a CUfunction that Triton loaded (csrc/triton_plans.h), with `params`:
// cuLaunchKernel through the driver entry point the runtime hands out, so the extension does not
// link against libcuda (it must load where no driver is). Returns the CUresult.
int launch_driver_function(uint64_t function, const uint32_t grid[3], uint32_t threads,
                           uint32_t shared, cudaStream_t stream, void** params);
// Whether launch_driver_function can launch: the driver's entry points resolve.
bool driver_launch_available();

#ifndef MITK_CUDA_API_ONLY
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels
constexpr int kThreads = 256;
constexpr int64_t kChunk = 1024;  // rows per summary chunk
constexpr int64_t kChunkHistClasses = 1024;  // classes a summary chunk counts in shared memory

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

__device__ __forceinline__ double read_code(const void* p, int code) {
  switch (code) {
    case kSDouble: return *static_cast<const double*>(p);
    case kSFloat: return *static_cast<const float*>(p);
    case kSLong: return static_cast<double>(*static_cast<const int64_t*>(p));
    case kSInt: return *static_cast<const int32_t*>(p);
    case kSHalf: return __half2float(*static_cast<const __half*>(p));
    default: return __bfloat162float(*static_cast<const __nv_bfloat16*>(p));
  }
}

__device__ __forceinline__ void write_code(void* p, int code, double v) {
  switch (code) {
    case kSDouble: *static_cast<double*>(p) = v; break;
    case kSFloat: *static_cast<float*>(p) = static_cast<float>(v); break;
    case kSLong: *static_cast<int64_t*>(p) = saturating_cast<int64_t>(v); break;
    case kSInt: *static_cast<int32_t*>(p) = saturating_cast<int32_t>(v); break;
    case kSHalf: *static_cast<__half*>(p) = __float2half(static_cast<float>(v)); break;
    default: *static_cast<__nv_bfloat16*>(p) = __float2bfloat16(static_cast<float>(v)); break;
  }
}

// dual_updates counts steps: integer arithmetic for an integer tensor, so that the count stays
// exact past 2^53, where a round trip through a double would stop it (or step it back).
__device__ __forceinline__ int64_t read_count(const void* p, int code) {
  switch (code) {
    case kSLong: return *static_cast<const int64_t*>(p);
    case kSInt: return *static_cast<const int32_t*>(p);
    default: return saturating_cast<int64_t>(read_code(p, code));
  }
}

__device__ __forceinline__ void write_count(void* p, int code, int64_t v) {
  switch (code) {
    case kSLong: *static_cast<int64_t*>(p) = v; break;
    case kSInt: *static_cast<int32_t*>(p) = saturating_cast<int32_t>(static_cast<double>(v)); break;
    default: write_code(p, code, static_cast<double>(v)); break;
  }
}

__device__ __forceinline__ int64_t target_at(const RowArgs& a, int64_t r) {
  return a.targets64 ? static_cast<const int64_t*>(a.targets)[r]
                     : static_cast<int64_t>(static_cast<const int32_t*>(a.targets)[r]);
}

// T_k in double, rounded through tau's dtype (as on CPU).
__device__ __forceinline__ double temperature_at(const void* tau, bool tau64, int64_t k,
                                                 double t_eps, double t_min, double t_max,
                                                 double* dT = nullptr) {
  const double v = tau64 ? static_cast<const double*>(tau)[k]
                         : static_cast<double>(static_cast<const float*>(tau)[k]);
  return temperature(v, !tau64, t_eps, t_min, t_max, dT);
}

// 1 / T of a valid row whose target is y (that class's temperature when K = C), in acc_t.
template <typename acc_t>
__device__ __forceinline__ acc_t row_inv_temperature(const RowArgs& a, int64_t y) {
  return acc_t(1) / static_cast<acc_t>(temperature_at(a.tau, a.tau64, a.K == 1 ? 0 : y, a.t_eps,
                                                      a.t_min, a.t_max));
}

// Fixed-order block sum (tree over shared memory); every thread gets the result.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) smem[threadIdx.x] += smem[threadIdx.x + off];
    __syncthreads();
  }
  const T out = smem[0];
  __syncthreads();
  return out;
}

// ---------------------------------------------------------------------------------------------
// Reading a contiguous row in 16-byte packets. A warp per row that reads one element a lane
// (4 bytes of fp32) keeps too few bytes in flight: at 4096 x 32000 fp32 on an H200 the backward
// took 0.55 ms (45% of the copy bandwidth) and the forward 0.46 ms, against Triton's 0.27 and
// 0.15 ms. With packets, kInFlight of them loaded before any is used (a lane has 64 bytes in
// flight; 16 for float64, whose exp needs the registers: two packets in flight spilled on
// sm_90), the backward takes 0.28 ms (88%) and the forward 0.30 ms (41%; its online max and
// four sums an element cost more than the reads). benchmarks/results/GPU_RUNS.md, session 7.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct alignas(16) Packet {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int kInFlight = sizeof(scalar_t) == 8 ? 1 : 4;
  scalar_t v[kSize];
};

// exp of a shift d <= 0 in the forward's per-element loop: float's __expf (ex2.approx after a
// multiply by log2 e, a few ulp), double's exp. The per-row terms (acc_merge, row_finish) keep
// exp; the backward works in base 2 (fast_exp2).
__device__ __forceinline__ float fast_exp(float d) { return __expf(d); }
__device__ __forceinline__ double fast_exp(double d) { return exp(d); }
// 2^u, for the backward's base-2 log p: ex2.approx itself, one instruction (__expf is a multiply
// by log2 e before it).
__device__ __forceinline__ float fast_exp2(float u) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(u));
  return r;
}
__device__ __forceinline__ double fast_exp2(double u) { return exp2(u); }

// Whether a row at p (and its gradient at g, when given) can be read in packets: unit class
// stride, and p and g equally far from a 16-byte boundary.
template <typename scalar_t>
__device__ __forceinline__ bool packets_fit(const scalar_t* p, int64_t stride, const scalar_t* g,
                                            int64_t g_stride) {
  const uintptr_t pa = reinterpret_cast<uintptr_t>(p);
  if (stride != 1 || pa % sizeof(scalar_t) != 0) return false;
  return g == nullptr || (g_stride == 1 && reinterpret_cast<uintptr_t>(g) % 16 == pa % 16);
}

// Calls f(j, x_j) for this lane's elements of the contiguous row x[0, C) (packets_fit), and with
// kWrite stores its result to g[j]; whole packets go to fp(j0, packet) instead, which returns the
// packet of results. The elements before the first 16-byte boundary and after the last whole
// packet go one a lane; every lane takes whole packets in between.
template <bool kWrite, typename scalar_t, typename F, typename FP>
__device__ __forceinline__ void packet_walk(const scalar_t* x, scalar_t* g, int64_t C, int lane,
                                            F&& f, FP&& fp) {
  using P = Packet<scalar_t>;
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) % 16);
  int64_t head = ((16 - mis) % 16) / static_cast<int64_t>(sizeof(scalar_t));
  head = head < C ? head : C;
  if (lane < head) {
    const scalar_t v = f(lane, to_acc(x[lane]));
    if (kWrite) g[lane] = v;
  }
  const int64_t packets = (C - head) / P::kSize;
  const P* xp = reinterpret_cast<const P*>(x + head);
  P* gp = kWrite ? reinterpret_cast<P*>(g + head) : nullptr;
  int64_t q = lane;
  for (; q + (P::kInFlight - 1) * kWarp < packets; q += P::kInFlight * kWarp) {
    P in[P::kInFlight];
#pragma unroll
    for (int u = 0; u < P::kInFlight; ++u) in[u] = xp[q + u * kWarp];
#pragma unroll
    for (int u = 0; u < P::kInFlight; ++u) {
      const P out = fp(head + (q + u * kWarp) * P::kSize, in[u]);
      if (kWrite) gp[q + u * kWarp] = out;
    }
  }
  for (; q < packets; q += kWarp) {
    const P out = fp(head + q * P::kSize, xp[q]);
    if (kWrite) gp[q] = out;
  }
  for (int64_t j = head + packets * P::kSize + lane; j < C; j += kWarp) {
    const scalar_t v = f(j, to_acc(x[j]));
    if (kWrite) g[j] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Row statistics: one warp per row, or one thread per row (thread_rows below).
// ---------------------------------------------------------------------------------------------
// The online accumulators of a row, or of a lane's part of it: the max m in logit units and
// s, A, Q about it (d = (x - m) / T).
template <typename acc_t>
struct OnlineRow {
  acc_t inv_t;
  acc_t m = -INFINITY, s = 0, A = 0, Q = 0;

  // x replaces the max cur when larger, or NaN (which then sticks).
  __device__ static bool rises(acc_t x, acc_t cur) { return x > cur || x != x; }
  // The max rises to xm: the sums are re-expressed about it.
  __device__ void raise_max(acc_t xm) {
    if (rises(xm, m)) {
      if (m > acc_t(-INFINITY)) {
        const acc_t d = clamp_shift((m - xm) * inv_t);
        acc_rescale(s, A, Q, d, exp(d));
      }
      m = xm;
    }
  }
  __device__ void add_term(acc_t xj) {
    const acc_t d = clamp_shift((xj - m) * inv_t);
    acc_add(s, A, Q, fast_exp(d), d);
  }
  __device__ void add(acc_t xj) {
    raise_max(xj);
    if (m != acc_t(-INFINITY)) add_term(xj);
  }
};

// Whether the row kernels take a thread a row rather than a warp. A warp per row reads a row's
// classes side by side, which is what a contiguous row of many classes wants. Logits laid out
// [N, C, H, W] (segmentation) have their classes H W apart: a warp on one pixel read C elements
// from C different 32-byte sectors with most lanes idle (16 x 5 x 256 x 256 float32 on an H200:
// the Triton step, whose backward is this kernel, took 0.879 ms against 0.206 ms for
// F.cross_entropy, GPU_RUNS session 9). A thread a row reads neighbouring pixels in neighbouring
// threads: each class is one coalesced load a warp. Rows of a few classes (the 2-to-8-class
// medical case) also go a thread a row rather than leave 24-30 of 32 lanes idle. A thread walks
// its row's classes one after another, so strided rows of many classes keep the warp: a
// [B, V, T] language-model batch (V = 32000 classes T apart, B T rows) would give each of a few
// thousand threads 32000 dependent loads.
constexpr int64_t kThreadRowMaxClasses = 8;
constexpr int64_t kThreadRowMaxStridedClasses = 256;
__host__ __device__ inline bool thread_rows(const RowArgs& a) {
  return a.C <= kThreadRowMaxClasses || (a.sc != 1 && a.C <= kThreadRowMaxStridedClasses);
}

// Calls f(j, x_j) for j in [0, C) in order, for a row that one thread walks: kLoads loads
// issued before the first of them is used (one load a step left one load in flight a thread).
template <int kLoads, typename scalar_t, typename F>
__device__ __forceinline__ void thread_walk(const scalar_t* x, int64_t sc, int64_t C, F&& f) {
  int64_t j = 0;
  for (; j + kLoads <= C; j += kLoads) {
    scalar_t v[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) v[u] = x[(j + u) * sc];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) f(j + u, v[u]);
  }
  for (; j < C; ++j) f(j, x[j * sc]);
}
constexpr int kThreadLoads = 4;

// Row r is pixel sp of sample n; it starts at n stride_n + sp stride_s whatever the strides
// (one division for the logits' offset and the gradient's).
struct RowPos {
  int64_t n, sp;
  __device__ RowPos(int64_t r, int64_t S) : n(r / S), sp(r - n * S) {}
  __device__ int64_t offset(int64_t stride_n, int64_t stride_s) const {
    return n * stride_n + sp * stride_s;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
row_stats_kernel(RowArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t R = a.N * a.S;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  acc_t* rs = static_cast<acc_t*>(a.row_stats);
  const int64_t y = target_at(a, r);
  if (!target_valid(y, a.C, a.ignore_index)) {
    if (lane == 0) store_zero_row_stats(rs, R, r);
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(a.logits) + RowPos(r, a.S).offset(a.sn, a.ss);
  const acc_t inv_t = row_inv_temperature<acc_t>(a, y);
  OnlineRow<acc_t> acc{inv_t};
  const auto add = [&](int64_t, acc_t xj) {
    acc.add(xj);
    return scalar_t();
  };
  using P = Packet<scalar_t>;
  // A packet: its max first (one rescale at most, not one a rising element), then its terms.
  const auto add_packet = [&](int64_t, const P& in) {
    acc_t v[P::kSize];
#pragma unroll
    for (int e = 0; e < P::kSize; ++e) v[e] = to_acc(in.v[e]);
    acc_t xm = v[0];
#pragma unroll
    for (int e = 1; e < P::kSize; ++e) xm = OnlineRow<acc_t>::rises(v[e], xm) ? v[e] : xm;
    acc.raise_max(xm);
    if (acc.m != acc_t(-INFINITY)) {
#pragma unroll
      for (int e = 0; e < P::kSize; ++e) acc.add_term(v[e]);
    }
    return P();
  };
  if (packets_fit<scalar_t>(x, a.sc, nullptr, 0)) {
    packet_walk<false>(x, static_cast<scalar_t*>(nullptr), a.C, lane, add, add_packet);
  } else {
    for (int64_t j = lane; j < a.C; j += kWarp) add(j, to_acc(x[j * a.sc]));
  }
  acc_t m = acc.m, s = acc.s, A = acc.A, Q = acc.Q;
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const acc_t mo = __shfl_down_sync(0xffffffffu, m, off);
    const acc_t so = __shfl_down_sync(0xffffffffu, s, off);
    const acc_t Ao = __shfl_down_sync(0xffffffffu, A, off);
    const acc_t Qo = __shfl_down_sync(0xffffffffu, Q, off);
    // NaN anywhere in the row: NaN stats. A lane that saw +inf holds m = inf and s = NaN
    // (inf - inf): without the s tests acc_merge's empty-lane check (!(s > 0)) dropped it, and
    // the row came out finite where the CPU and Triton give NaN.
    if (m != m || mo != mo || s != s || so != so) {
      // m stays the row's max (+inf beside an empty lane's -inf, as the CPU's), NaN for a NaN
      m = (m != m || mo != mo) ? m + mo : (m > mo ? m : mo);
      s = s + so;
    } else {
      acc_merge(m, s, A, Q, mo, so, Ao, Qo, inv_t);
    }
  }
  if (lane == 0) {
    store_row_stats(rs, R, r, row_finish<acc_t>(m, inv_t, s, A, Q, to_acc(x[y * a.sc])));
  }
}

// One thread a row (thread_rows): the row's classes in order, no merge.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
row_stats_thread_kernel(RowArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t R = a.N * a.S;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= R) return;
  acc_t* rs = static_cast<acc_t*>(a.row_stats);
  const int64_t y = target_at(a, r);
  if (!target_valid(y, a.C, a.ignore_index)) {
    store_zero_row_stats(rs, R, r);
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(a.logits) + RowPos(r, a.S).offset(a.sn, a.ss);
  const acc_t inv_t = row_inv_temperature<acc_t>(a, y);
  OnlineRow<acc_t> acc{inv_t};
  thread_walk<kThreadLoads>(x, a.sc, a.C, [&](int64_t, scalar_t v) { acc.add(to_acc(v)); });
  store_row_stats(rs, R, r,
                  row_finish<acc_t>(acc.m, inv_t, acc.s, acc.A, acc.Q, to_acc(x[y * a.sc])));
}

// ---------------------------------------------------------------------------------------------
// Summary: chunk partials of the header (fixed trees), histogram by exact atomics, per-class
// sums in row order.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
summary_chunk_kernel(RowArgs a, double* header_part, double* hist, double* class_part) {
  __shared__ double smem[kThreads];
  const int64_t R = a.N * a.S;
  const acc_t* rs = static_cast<const acc_t*>(a.row_stats);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t r1 = r0 + kChunk < R ? r0 + kChunk : R;
  // The chunk's class counts in shared memory where the classes fit, then one atomic a class:
  // a double atomic a row put 1M rows of 5 classes (segmentation) on 5 addresses. Whole numbers,
  // exact in any order either way.
  __shared__ unsigned int chunk_hist[kChunkHistClasses];
  const bool local_hist = a.C <= kChunkHistClasses;  // the same for every thread of the block
  if (local_hist) {
    for (int64_t k = threadIdx.x; k < a.C; k += blockDim.x) chunk_hist[k] = 0u;
    __syncthreads();
  }
  double v[5] = {0, 0, 0, 0, 0};
  for (int64_t r = r0 + threadIdx.x; r < r1; r += blockDim.x) {
    const int64_t y = target_at(a, r);
    if (target_valid(y, a.C, a.ignore_index)) {
      v[0] += 1.0;
      v[1] += static_cast<double>(rs[kRowCEH * R + r]);
      v[2] += static_cast<double>(rs[kRowH * R + r]);
      v[3] += static_cast<double>(rs[kRowV * R + r]);
      if (local_hist) {
        atomicAdd(chunk_hist + y, 1u);
      } else {
        atomicAdd(hist + y, 1.0);
      }
    } else if (y != a.ignore_index) {
      v[4] += 1.0;
    }
  }
  if (local_hist) {
    __syncthreads();
    for (int64_t k = threadIdx.x; k < a.C; k += blockDim.x) {
      if (chunk_hist[k] != 0u) atomicAdd(hist + k, static_cast<double>(chunk_hist[k]));
    }
  }
  for (int i = 0; i < 5; ++i) {
    const double t = block_sum(v[i], smem);
    if (threadIdx.x == 0) header_part[blockIdx.x * 5 + i] = t;
  }
  if (class_part == nullptr) return;
  // K = C: per-class (CE - H) and V, one thread per class over the chunk's rows in order.
  for (int64_t k = threadIdx.x; k < a.C; k += blockDim.x) {
    double ce_h = 0.0, var = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
      if (target_at(a, r) == k) {
        ce_h += static_cast<double>(rs[kRowCEH * R + r]);
        var += static_cast<double>(rs[kRowV * R + r]);
      }
    }
    class_part[(blockIdx.x * 2) * a.C + k] = ce_h;
    class_part[(blockIdx.x * 2 + 1) * a.C + k] = var;
  }
}

__global__ void __launch_bounds__(kThreads)
summary_combine_kernel(const double* header_part, const double* hist, const double* class_part,
                       int64_t n_chunks, int64_t C, double* summary) {
  __shared__ double smem[kThreads];
  for (int i = 0; i < 5; ++i) {
    double v = 0.0;
    for (int64_t ch = threadIdx.x; ch < n_chunks; ch += blockDim.x) v += header_part[ch * 5 + i];
    const double t = block_sum(v, smem);
    if (threadIdx.x == 0) summary[i] = t;
  }
  for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
    summary[SUMMARY_HEADER_SIZE + k] = hist[k];
    if (class_part != nullptr) {
      double ce_h = 0.0, var = 0.0;
      for (int64_t ch = 0; ch < n_chunks; ++ch) {
        ce_h += class_part[(ch * 2) * C + k];
        var += class_part[(ch * 2 + 1) * C + k];
      }
      summary[SUMMARY_HEADER_SIZE + C + k] = ce_h;
      summary[SUMMARY_HEADER_SIZE + 2 * C + k] = var;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finalize: one block.
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) finalize_kernel(FinalizeArgs f) {
  __shared__ double smem[kThreads];
  const double* S = f.summary;
  const double* L = f.local;
  const int64_t C = f.C;
  const double B = S[0], sum_ceh = S[1], sum_h = S[2], sum_v = S[3], n_invalid = S[4];
  const double sum_ce = sum_ceh + sum_h;
  const double* hist = S + SUMMARY_HEADER_SIZE;
  const bool ok = B > 0 && n_invalid == 0 && isfinite(sum_ce) && isfinite(sum_h) && isfinite(sum_v);
  const bool upd = f.update_state && ok;
  const double Bg = B > 1.0 ? B : 1.0;
  const double mean_ce = sum_ce / Bg, mean_h = sum_h / Bg;
  double h_star = 0.0, c = 0.0, coef_stat = 0.0, alpha = 0.0;
  if (f.kind == kMiT) {
    double* counts = f.vec_state;
    double part = 0.0;
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
      if (upd) counts[k] += hist[k];
      part += counts[k];
    }
    const double total = block_sum(part, smem);
    part = 0.0;
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) part += entropy_term(counts[k] / total);
    h_star = block_sum(part, smem);
    c = read_code(f.s2, f.s2_code);
    if (upd) {
      const int64_t n_new = next_count(read_count(f.s3, f.s3_code));
      c = mit_dual_average(c, n_new, mit_dual_gap(h_star, mean_h, C));
    }
    __syncthreads();  // every thread has read the old state before thread 0 writes
    if (upd && threadIdx.x == 0) {
      write_code(f.s1, f.s1_code, read_code(f.s1, f.s1_code) + B);
      write_code(f.s2, f.s2_code, c);
      write_count(f.s3, f.s3_code, next_count(read_count(f.s3, f.s3_code)));
    }
    coef_stat = c;
  } else if (f.kind == kTET) {
    c = coef_stat = f.hp0;
  } else {  // kCCT: check_finalize_inputs admits no other kind
    double* ema = f.vec_state;
    double part = 0.0;
    for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
      if (upd) ema[k] = ema_update(ema[k], f.hp0, hist[k] / Bg);
      part += entropy_term(clamp_min(ema[k], f.hp1));
    }
    h_star = block_sum(part, smem);
    alpha = coef_stat = read_code(f.s1, f.s1_code);
    c = cct_coef(alpha, mean_h, h_star);
  }

  // Temperatures, dL/dtau, T stat.
  acc_t* gi = static_cast<acc_t*>(f.grad_info);
  const double gs = f.reduction == 1 ? 1.0 / Bg : 1.0;
  double t_part = 0.0, t0 = 0.0;
  for (int64_t k = threadIdx.x; k < f.K; k += blockDim.x) {
    double dT = 0.0;
    const double T = temperature_at(f.tau, f.tau64, k, f.t_eps, f.t_min, f.t_max, &dT);
    double g = 0.0;
    if (f.reduction != 0) {
      g = f.K == 1 ? grad_tau_value(gs, T, sum_ceh, c, sum_v, dT)
                   : grad_tau_value(gs, T, S[SUMMARY_HEADER_SIZE + C + k], c,
                                    S[SUMMARY_HEADER_SIZE + 2 * C + k], dT);
    }
    gi[2 + k] = static_cast<acc_t>(g);
    t_part += (f.K == 1 ? B : hist[k]) * T;
    if (k == 0) t0 = T;
  }
  const double t_sum = block_sum(t_part, smem);
  if (threadIdx.x != 0) return;

  const double Bl = L[0];
  const double Blg = Bl > 1.0 ? Bl : 1.0;
  const LossForms forms =
      finalize_loss(f.kind, Bl, L[1] + L[2], L[2], c, alpha, mean_h, h_star, n_invalid);
  const double loss_mean = forms.mean, loss_sum = forms.sum;
  if (f.reduction != 0) write_code(f.loss, f.loss_code, f.reduction == 1 ? loss_mean : loss_sum);
  gi[0] = static_cast<acc_t>(c);
  gi[1] = static_cast<acc_t>(f.reduction == 1 ? 1.0 / Blg : 1.0);
  double* st = f.stats;
  st[0] = loss_mean;  // the mean form whatever the reduction (ops.py's contract, as reference.py)
  st[1] = mean_ce;
  st[2] = mean_h;
  st[3] = h_star;
  st[4] = coef_stat;
  st[5] = f.kind == kCCT ? t_sum / Bg : t0;
  st[6] = upd ? 1.0 : 0.0;
  st[7] = B;
  st[8] = n_invalid;
}

// reduction 'none': loss_r = CE_r - c H_r = (CE - H)_r + (1 - c) H_r (0 for rows that are not
// valid: their stats are 0).
template <typename acc_t>
__global__ void loss_rows_kernel(FinalizeArgs f) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= f.R) return;
  const acc_t* rs = static_cast<const acc_t*>(f.row_stats);
  const double c = static_cast<double>(static_cast<const acc_t*>(f.grad_info)[0]);
  const double v = f.summary[4] > 0 ? nan("")
                                    : row_loss(static_cast<double>(rs[kRowCEH * f.R + r]),
                                               static_cast<double>(rs[kRowH * f.R + r]), c);
  switch (f.loss_code) {
    case kSDouble: static_cast<double*>(f.loss)[r] = v; break;
    case kSFloat: static_cast<float*>(f.loss)[r] = static_cast<float>(v); break;
    case kSHalf: static_cast<__half*>(f.loss)[r] = __float2half(static_cast<float>(v)); break;
    default: static_cast<__nv_bfloat16*>(f.loss)[r] = __float2bfloat16(static_cast<float>(v));
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one warp per row.
// ---------------------------------------------------------------------------------------------
// Register bounds per architecture (ptxas 13.0): without a minimum of blocks, sm_80 held the
// 16-bit grad_kernel at 64 registers and spilled 4-8 bytes (the target's fix-up stays live
// across the walk); a minimum of 2 blocks an SM lets it take 91-93. sm_90 takes 64-71 without
// spilling, and any minimum (even 1) lets it take 96-99, which leaves room for fewer blocks.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define MITK_GRAD_BOUNDS __launch_bounds__(kWarp * kRowsPerBlock, 2)
#else
#define MITK_GRAD_BOUNDS __launch_bounds__(kWarp * kRowsPerBlock)
#endif
// A valid row's gradient constants. In base 2, as the CPU kernels: u = log2 p =
// (x - m) inv_t / ln 2 - log_s / ln 2 and dx = p (a + b u) (grad_logit_folded) for every element
// but the target's, which is that minus scale.
template <typename acc_t>
struct GradRow {
  acc_t m, inv_t2, log_s2, scale;
  GradCoeffs<acc_t> k;

  __device__ acc_t folded(acc_t xj) const {
    const acc_t u = clamp_shift(log_prob(xj, m, inv_t2, log_s2));
    return grad_logit_folded(fast_exp2(u), u, k.a, k.b);
  }
};

template <typename acc_t>
__device__ __forceinline__ GradRow<acc_t> grad_row(const RowArgs& a, int64_t r, int64_t y) {
  const int64_t R = a.N * a.S;
  const acc_t* gi = static_cast<const acc_t*>(a.grad_info);
  const acc_t* rs = static_cast<const acc_t*>(a.row_stats);
  const acc_t* gl = static_cast<const acc_t*>(a.grad_loss);
  const acc_t inv_t = row_inv_temperature<acc_t>(a, y);
  const acc_t c = gi[0];
  const acc_t ln2 = acc_t(0.693147180559945309417232121458176568);
  GradRow<acc_t> g;
  g.scale = (a.grad_rows ? gl[r] : gl[0]) * gi[1] * inv_t;
  g.m = rs[kRowMax * R + r];
  g.inv_t2 = inv_t / ln2;
  g.log_s2 = rs[kRowLogS * R + r] / ln2;
  g.k = grad_logit_coeffs(rs[kRowH * R + r], c, g.scale, ln2);
  return g;
}

template <typename scalar_t>
__global__ void MITK_GRAD_BOUNDS grad_kernel(RowArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int lane = threadIdx.x % kWarp;
  const int64_t R = a.N * a.S;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  const RowPos pos(r, a.S);
  scalar_t* g = static_cast<scalar_t*>(a.grad) + pos.offset(a.gn, a.gs);
  const int64_t y = target_at(a, r);
  if (!target_valid(y, a.C, a.ignore_index)) {
    for (int64_t j = lane; j < a.C; j += kWarp) g[j * a.gc] = from_acc<scalar_t>(acc_t(0));
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(a.logits) + pos.offset(a.sn, a.ss);
  const GradRow<acc_t> row = grad_row<acc_t>(a, r, y);
  // Every element takes the non-target form; the target's element is written again after the
  // walk.
  const auto grad = [&](int64_t, acc_t xj) { return from_acc<scalar_t>(row.folded(xj)); };
  using P = Packet<scalar_t>;
  const auto grad_packet = [&](int64_t, const P& in) {
    P out;
#pragma unroll
    for (int e = 0; e < P::kSize; ++e) out.v[e] = from_acc<scalar_t>(row.folded(to_acc(in.v[e])));
    return out;
  };
  if (packets_fit<scalar_t>(x, a.sc, g, a.gc)) {
    packet_walk<true>(x, g, a.C, lane, grad, grad_packet);
  } else {
    for (int64_t j = lane; j < a.C; j += kWarp) g[j * a.gc] = grad(j, to_acc(x[j * a.sc]));
  }
  // Ordered after the walk's store of the same element, which another lane may have made.
  __syncwarp();
  if (lane == 0) g[y * a.gc] = from_acc<scalar_t>(row.folded(to_acc(x[y * a.sc])) - row.scale);
}

// One thread a row (thread_rows): each element written once, the target's with its -scale.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_thread_kernel(RowArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t R = a.N * a.S;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= R) return;
  const RowPos pos(r, a.S);
  scalar_t* g = static_cast<scalar_t*>(a.grad) + pos.offset(a.gn, a.gs);
  const int64_t y = target_at(a, r);
  if (!target_valid(y, a.C, a.ignore_index)) {
    for (int64_t j = 0; j < a.C; ++j) g[j * a.gc] = from_acc<scalar_t>(acc_t(0));
    return;
  }
  const scalar_t* x = static_cast<const scalar_t*>(a.logits) + pos.offset(a.sn, a.ss);
  const GradRow<acc_t> row = grad_row<acc_t>(a, r, y);
  thread_walk<kThreadLoads>(x, a.sc, a.C, [&](int64_t j, scalar_t xj) {
    const acc_t v = row.folded(to_acc(xj));
    g[j * a.gc] = from_acc<scalar_t>(j == y ? v - row.scale : v);
  });
}

// dL/dtau: mean/sum g * grad_info[2 + k]; none: sum_r g_r (-1/T)((CE - H) + c V) T' in a fixed
// order (one block; each thread a fixed stride of rows, then a fixed tree per temperature).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
grad_tau_kernel(RowArgs a, int reduction, void* grad_tau) {
  __shared__ double smem[kThreads];
  const acc_t* gi = static_cast<const acc_t*>(a.grad_info);
  const acc_t* gl = static_cast<const acc_t*>(a.grad_loss);
  for (int64_t k = 0; k < a.K; ++k) {
    double v;
    if (reduction != 0) {
      v = static_cast<double>(gl[0]) * static_cast<double>(gi[2 + k]);
    } else {
      const int64_t R = a.N * a.S;
      const acc_t* rs = static_cast<const acc_t*>(a.row_stats);
      const double c = static_cast<double>(gi[0]);
      double part = 0.0;
      for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
        const int64_t y = target_at(a, r);
        if (!target_valid(y, a.C, a.ignore_index) || (a.K != 1 && y != k)) continue;
        part += static_cast<double>(gl[r]) *
                tau_row_term(static_cast<double>(rs[kRowCEH * R + r]), c,
                             static_cast<double>(rs[kRowV * R + r]));
      }
      const double sum = block_sum(part, smem);
      double dT = 0.0;
      const double T = temperature_at(a.tau, a.tau64, k, a.t_eps, a.t_min, a.t_max, &dT);
      v = grad_tau_value(1.0, T, sum, 0.0, 0.0, dT);
    }
    if (threadIdx.x == 0) {
      if (a.tau64) {
        static_cast<double*>(grad_tau)[k] = v;
      } else {
        static_cast<float*>(grad_tau)[k] = static_cast<float>(v);
      }
    }
  }
}

int64_t row_blocks(int64_t R) { return (R + kRowsPerBlock - 1) / kRowsPerBlock; }
int64_t thread_row_blocks(int64_t R) { return (R + kThreads - 1) / kThreads; }

// The row kernels of one pass, a warp a row and a thread a row, for launch_rows (which holds
// their launch shapes).
struct RowStatsKernels {
  template <typename T>
  static auto warp() { return &row_stats_kernel<T>; }
  template <typename T>
  static auto thread() { return &row_stats_thread_kernel<T>; }
};
struct GradKernels {
  template <typename T>
  static auto warp() { return &grad_kernel<T>; }
  template <typename T>
  static auto thread() { return &grad_thread_kernel<T>; }
};

template <class Kernels, typename T>
void launch_rows_as(const RowArgs& a, int64_t R, cudaStream_t s) {
  if (thread_rows(a)) {
    const auto kernel = Kernels::template thread<T>();
    kernel<<<static_cast<unsigned>(thread_row_blocks(R)), kThreads, 0, s>>>(a);
  } else {
    const auto kernel = Kernels::template warp<T>();
    kernel<<<static_cast<unsigned>(row_blocks(R)), kWarp * kRowsPerBlock, 0, s>>>(a);
  }
}

// R > 0 rows of the logits' dtype: a thread a row where thread_rows says so, else a warp.
template <class Kernels>
void launch_rows(const RowArgs& a, int64_t R, cudaStream_t s) {
  switch (a.dtype) {
    case kF64: launch_rows_as<Kernels, double>(a, R, s); break;
    case kF32: launch_rows_as<Kernels, float>(a, R, s); break;
    case kBF16: launch_rows_as<Kernels, __nv_bfloat16>(a, R, s); break;
    default: launch_rows_as<Kernels, __half>(a, R, s); break;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers (host).
// ---------------------------------------------------------------------------------------------
int64_t summary_workspace_doubles(int64_t R, int64_t C, int64_t K) {
  const int64_t n_chunks = (R + kChunk - 1) / kChunk;
  return n_chunks * 5 + C + (K == 1 ? 0 : n_chunks * 2 * C);
}

// The histogram part of the workspace is zeroed here, on the stream.
cudaError_t launch_row_stats(const RowArgs& a, double* summary, double* workspace,
                             cudaStream_t stream) {
  const int64_t R = a.N * a.S;
  const int64_t n_chunks = (R + kChunk - 1) / kChunk;
  double* header_part = workspace;
  double* hist = workspace + n_chunks * 5;
  double* class_part = a.K == 1 ? nullptr : hist + a.C;
  cudaError_t err = cudaMemsetAsync(hist, 0, sizeof(double) * a.C, stream);
  if (err != cudaSuccess) return err;
  if (R > 0) {
    launch_rows<RowStatsKernels>(a, R, stream);
    if (a.dtype == kF64) {
      summary_chunk_kernel<double><<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(
          a, header_part, hist, class_part);
    } else {
      summary_chunk_kernel<float><<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(
          a, header_part, hist, class_part);
    }
  }
  summary_combine_kernel<<<1, kThreads, 0, stream>>>(header_part, hist, class_part, n_chunks, a.C,
                                                    summary);
  return cudaGetLastError();
}

cudaError_t launch_finalize(const FinalizeArgs& f, cudaStream_t stream) {
  if (f.acc64) {
    finalize_kernel<double><<<1, kThreads, 0, stream>>>(f);
  } else {
    finalize_kernel<float><<<1, kThreads, 0, stream>>>(f);
  }
  if (f.reduction == 0 && f.R > 0) {
    const unsigned blocks = static_cast<unsigned>((f.R + kThreads - 1) / kThreads);
    if (f.acc64) {
      loss_rows_kernel<double><<<blocks, kThreads, 0, stream>>>(f);
    } else {
      loss_rows_kernel<float><<<blocks, kThreads, 0, stream>>>(f);
    }
  }
  return cudaGetLastError();
}

cudaError_t launch_backward(const RowArgs& a, int reduction, bool compute_grad_tau, void* grad_tau,
                            cudaStream_t stream) {
  const int64_t R = a.N * a.S;
  if (R > 0) {
    launch_rows<GradKernels>(a, R, stream);
  }
  if (compute_grad_tau) {
    if (a.dtype == kF64) {
      grad_tau_kernel<double><<<1, kThreads, 0, stream>>>(a, reduction, grad_tau);
    } else {
      grad_tau_kernel<float><<<1, kThreads, 0, stream>>>(a, reduction, grad_tau);
    }
  }
  return cudaGetLastError();
}
bool backward_kernel_available() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, grad_kernel<float>);
  // Not a sticky error, but the next launch's cudaGetLastError would report it: clear it.
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess;
}

namespace {
// The driver functions a plan's launch needs, from the runtime's entry point query.
struct DriverCalls {
  using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                unsigned, unsigned, CUstream, void**, void**);
  using CtxFn = CUresult (*)(CUcontext*);
  LaunchFn launch = nullptr;
  CtxFn current = nullptr;

  static void* entry(const char* name) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint(name, &p, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky; keep it from the next check
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess ? p : nullptr;
  }
  static const DriverCalls& get() {
    static const DriverCalls calls{reinterpret_cast<LaunchFn>(entry("cuLaunchKernel")),
                                   reinterpret_cast<CtxFn>(entry("cuCtxGetCurrent"))};
    return calls;
  }
};
}  // namespace

bool driver_launch_available() {
  const DriverCalls& d = DriverCalls::get();
  return d.launch != nullptr && d.current != nullptr;
}

int launch_driver_function(uint64_t function, const uint32_t grid[3], uint32_t threads,
                           uint32_t shared, cudaStream_t stream, void** params) {
  // Triton launches with cuLaunchKernelEx; with one CTA a cluster, no cooperative grid, no
  // programmatic dependent launch and under 228 KB of shared memory (launch_plans.py refuses
  // other kernels) that is cuLaunchKernel's launch. Shared memory above 48 KB needs the
  // function's dynamic-shared attribute, which Triton's loader set when it loaded it.
  if (!driver_launch_available()) return CUDA_ERROR_NOT_FOUND;
  const DriverCalls& d = DriverCalls::get();
  // The driver launches into the thread's current context. The runtime (the caller's device
  // guard, the allocations before) makes the device's primary context current, where Triton
  // loaded the function; a thread with none gets it from cudaSetDevice.
  CUcontext ctx = nullptr;
  if (d.current(&ctx) != CUDA_SUCCESS || ctx == nullptr) {
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
      return CUDA_ERROR_INVALID_CONTEXT;
    }
  }
  return d.launch(reinterpret_cast<CUfunction>(function), grid[0], grid[1], grid[2], threads, 1, 1,
                  shared, reinterpret_cast<CUstream>(stream), params, nullptr);
}
#endif  // MITK_CUDA_API_ONLY

}  // namespace cuda
}  // namespace mitk
