// The ops' contract checks, one copy for the CPU and CUDA implementations (cpu/mit_loss_cpu.cpp,
// cuda/mit_loss_cuda.cpp): shapes, dtypes, devices and state, each refused with the same message
// whichever device runs the call, and all of them before an op writes anything. The Triton
// launchers run the same checks in Python (mitkernels/triton/checks.py, with these messages) and
// the meta kernels only shape their outputs (ops.cpp).
//
// Torch glue only: the .cu (device code) does not include it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "mit_loss_math.h"  // kRowStats, SUMMARY_HEADER_SIZE

namespace mitk {
namespace checks {

using at::Tensor;

// finalize_'s `kind` (mit_loss_math.h).
using ::mitk::kCCT;
using ::mitk::kMiT;
using ::mitk::kTET;

// The device of an op's first tensor (logits, summary), which must be of the implementation's
// device type: the dispatcher picks the implementation from any of the arguments.
inline c10::Device device_of(const Tensor& first, c10::DeviceType type, const char* op,
                             const char* name) {
  TORCH_CHECK(first.device().type() == type, "mitkernels_C::", op, " (", type, "): ", name,
              " must be a ", type, " tensor, got ", first.device());
  return first.device();
}

inline void check_on(const Tensor& t, const c10::Device& device, const char* op,
                     const char* name) {
  TORCH_CHECK(t.device() == device, "mitkernels_C::", op, " (", device.type(), "): ", name,
              " must be on ", device, ", got ", t.device());
}

inline void check_logits_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "mitkernels: logits must be float16, bfloat16, float32 or float64, got ", t);
}

// Accumulation type of a row's statistics: float64 logits keep float64, the rest float32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Logits [N, C, S] (S: pixels a sample, 1 for [N, C]), targets [N*S], tau [1] or [C]: R = N*S
// rows, K temperatures.
struct RowShape {
  int64_t N, C, S, R, K;
};

// The row inputs of row_stats, loss_forward_ and loss_backward.
inline RowShape check_row_inputs(const Tensor& logits, const Tensor& targets, const Tensor& tau,
                                 c10::DeviceType type, const char* op) {
  const c10::Device device = device_of(logits, type, op, "logits");
  check_on(targets, device, op, "targets");
  check_on(tau, device, op, "tau");
  TORCH_CHECK(logits.dim() == 3, "mitkernels_C::", op, ": logits must be [N, C, S], got shape ",
              logits.sizes());
  check_logits_dtype(logits.scalar_type());
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.size(2);
  TORCH_CHECK(C >= 1, "mitkernels_C::", op, ": logits need at least one class, got C = ", C);
  TORCH_CHECK(targets.dim() == 1 && targets.numel() == N * S, "mitkernels_C::", op,
              ": targets must be [N*S] = [", N * S, "], got shape ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt,
              "mitkernels_C::", op, ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK(tau.dim() == 1 && (tau.numel() == 1 || tau.numel() == C), "mitkernels_C::", op,
              ": tau must be [1] or [C] = [", C, "], got shape ", tau.sizes());
  TORCH_CHECK(tau.scalar_type() == at::kFloat || tau.scalar_type() == at::kDouble,
              "mitkernels_C::", op, ": tau must be float32 or float64, got ", tau.scalar_type());
  return {N, C, S, N * S, tau.numel()};
}

// finalize_'s summaries: float64 vectors, the local one (distributed: this rank's) as long as
// the global one. Returns the summary's length.
inline int64_t check_summaries(const Tensor& summary, const std::optional<Tensor>& local,
                               c10::DeviceType type) {
  const c10::Device device = device_of(summary, type, "finalize_", "summary");
  TORCH_CHECK(summary.scalar_type() == at::kDouble && summary.dim() == 1,
              "mitkernels_C::finalize_: summary must be a float64 vector, got ",
              summary.scalar_type(), " ", summary.sizes());
  const int64_t size = summary.numel();
  if (local.has_value()) {
    check_on(*local, device, "finalize_", "local_summary");
    TORCH_CHECK(local->scalar_type() == at::kDouble && local->numel() == size,
                "mitkernels_C::finalize_: local_summary must be float64 like summary ([", size,
                "]), got ", local->scalar_type(), " ", local->sizes());
  }
  return size;
}

inline void check_state_vec(const Tensor& t, const c10::Device& device, int64_t C,
                            const char* what) {
  check_on(t, device, "finalize_", what);
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == 1 && t.numel() == C && t.is_contiguous(),
              "mitkernels_C::finalize_: ", what, " must be a contiguous float64 [C] = [", C,
              "] tensor, got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

inline void check_state_scalar(const Tensor& t, const c10::Device& device, const char* what) {
  check_on(t, device, "finalize_", what);
  TORCH_CHECK(t.numel() == 1, "mitkernels_C::finalize_: ", what, " must hold one value, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat ||
                  t.scalar_type() == at::kLong || t.scalar_type() == at::kInt,
              "mitkernels_C::finalize_: ", what, " must be float64/float32/int64/int32, got ",
              t.scalar_type());
}

// The rest of finalize_'s arguments, the state included, for a summary of `summary_size`
// entries on `device`. Returns C, the number of classes.
inline int64_t check_finalize_inputs(int64_t summary_size, const Tensor& row_stats,
                                     const Tensor& tau, at::TensorList state, int64_t kind,
                                     at::ArrayRef<double> hparams, int64_t reduction,
                                     at::ScalarType loss_dtype, const c10::Device& device) {
  check_on(row_stats, device, "finalize_", "row_stats");
  check_on(tau, device, "finalize_", "tau");
  TORCH_CHECK(kind == kMiT || kind == kTET || kind == kCCT,
              "mitkernels_C::finalize_: kind must be 0 (MiT), 1 (TET) or 2 (CCT-EAL), got ", kind);
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "mitkernels_C::finalize_: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
  TORCH_CHECK(!(kind == kCCT && reduction == 0),
              "mitkernels_C::finalize_: reduction 'none' is not defined for CCT-EAL");
  TORCH_CHECK(tau.dim() == 1 && tau.numel() >= 1 &&
                  (tau.scalar_type() == at::kFloat || tau.scalar_type() == at::kDouble),
              "mitkernels_C::finalize_: tau must be a float32/float64 [K] tensor");
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == kRowStats &&
                  (row_stats.scalar_type() == at::kFloat || row_stats.scalar_type() == at::kDouble),
              "mitkernels_C::finalize_: row_stats must be float32/float64 [", kRowStats,
              ", R], got ", row_stats.scalar_type(), " ", row_stats.sizes());
  // checked here, before the state is touched: the loss is stored only after the update
  TORCH_CHECK(loss_dtype == at::kHalf || loss_dtype == at::kBFloat16 || loss_dtype == at::kFloat ||
                  loss_dtype == at::kDouble,
              "mitkernels_C::finalize_: loss_dtype must be float16, bfloat16, float32 or "
              "float64, got ", loss_dtype);
  const int64_t K = tau.numel();
  const int64_t C = K == 1 ? summary_size - SUMMARY_HEADER_SIZE : K;
  TORCH_CHECK(C >= 1 && summary_size == SUMMARY_HEADER_SIZE + (K == 1 ? C : 3 * C),
              "mitkernels_C::finalize_: summary has ", summary_size,
              " entries, which fits neither [5 + C] (one temperature) nor [5 + 3C] with C = K = ",
              K);
  if (kind == kMiT) {
    TORCH_CHECK(state.size() == 4, "mitkernels_C::finalize_: MiT state is [class_counts, ",
                "total_seen, lambda_entropy, dual_updates], got ", state.size(), " tensors");
    check_state_vec(state[0], device, C, "class_counts");
    check_state_scalar(state[1], device, "total_seen");
    check_state_scalar(state[2], device, "lambda_entropy");
    check_state_scalar(state[3], device, "dual_updates");
    TORCH_CHECK(hparams.empty(), "mitkernels_C::finalize_: MiT hparams are [], got ",
                hparams.size(), " values");
  } else if (kind == kTET) {
    TORCH_CHECK(state.empty(), "mitkernels_C::finalize_: TET state is [], got ", state.size(),
                " tensors");
    // exactly: the GPU kernels take two hparams and would drop a third without a word
    TORCH_CHECK(hparams.size() == 1, "mitkernels_C::finalize_: TET hparams are [lambda], got ",
                hparams.size(), " values");
  } else {
    TORCH_CHECK(state.size() == 2, "mitkernels_C::finalize_: CCT-EAL state is [label_freq_ema, ",
                "alpha], got ", state.size(), " tensors");
    check_state_vec(state[0], device, C, "label_freq_ema");
    check_state_scalar(state[1], device, "alpha");
    TORCH_CHECK(hparams.size() == 2,
                "mitkernels_C::finalize_: CCT-EAL hparams are [ema_momentum, entropy_eps], got ",
                hparams.size(), " values");
  }
  return C;
}

// The state tensors that finalize_ writes when it updates (MiT's four; CCT-EAL's label_freq_ema,
// its alpha being read only), marked written as torch's in-place ops mark theirs: their version
// counters bumped, so that autograd refuses a backward through a graph that saved one before the
// step (the kernels write through raw pointers, which autograd cannot see; without the bump such
// a backward used the updated values, silently). Bumped before the write, whether or not the
// batch turns out to update (the device decides, and the host cannot wait for it). A tensor made
// under inference mode takes no in-place update outside it (torch's rule): refused here, before
// anything is written.
inline void mark_state_written(at::TensorList state, int64_t kind, bool update_state) {
  if (!update_state || kind == kTET) return;
  static const char* const kMiTNames[] = {"class_counts", "total_seen", "lambda_entropy",
                                          "dual_updates"};
  const size_t n = kind == kMiT ? 4 : 1;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(!state[i].is_inference() || c10::InferenceMode::is_enabled(),
                "mitkernels_C::finalize_: ", kind == kMiT ? kMiTNames[i] : "label_freq_ema",
                " was made under torch.inference_mode() and cannot be updated in place outside "
                "it: make the state outside inference mode (or pass update_state=False)");
  }
  for (size_t i = 0; i < n; ++i) state[i].unsafeGetTensorImpl()->bump_version();
}

// loss_backward's arguments beside the row inputs: the forward's row statistics and gradient
// constants, and the incoming gradient.
inline void check_backward_inputs(const Tensor& grad_loss, const Tensor& row_stats,
                                  const Tensor& grad_info, const RowShape& sh,
                                  at::ScalarType acc, int64_t reduction,
                                  const c10::Device& device) {
  const char* op = "loss_backward";
  check_on(grad_loss, device, op, "grad_loss");
  check_on(row_stats, device, op, "row_stats");
  check_on(grad_info, device, op, "grad_info");
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "mitkernels_C::loss_backward: reduction must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(row_stats.dim() == 2 && row_stats.size(0) == kRowStats &&
                  row_stats.size(1) == sh.R && row_stats.scalar_type() == acc,
              "mitkernels_C::loss_backward: row_stats must be ", acc, " [", kRowStats, ", ", sh.R,
              "], got ", row_stats.scalar_type(), " ", row_stats.sizes());
  TORCH_CHECK(grad_info.dim() == 1 && grad_info.numel() == 2 + sh.K &&
                  at::isFloatingType(grad_info.scalar_type()),
              "mitkernels_C::loss_backward: grad_info must be floating [2 + K] = [", 2 + sh.K,
              "], got ", grad_info.scalar_type(), " ", grad_info.sizes());
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()),
              "mitkernels_C::loss_backward: grad_loss must be floating, got ",
              grad_loss.scalar_type());
  if (reduction == 0) {
    TORCH_CHECK(grad_loss.numel() == sh.R, "mitkernels_C::loss_backward: grad_loss must be [R] = [",
                sh.R, "] for reduction 'none', got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "mitkernels_C::loss_backward: grad_loss must be a scalar ",
                "for reduction 'mean'/'sum', got ", grad_loss.sizes());
  }
}

}  // namespace checks
}  // namespace mitk
