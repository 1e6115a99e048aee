// Torch glue of the CUDA kernels: checks, outputs, the current stream, and
// TORCH_LIBRARY_IMPL(mitkernels_C, CUDA). The kernels and their argument structs are in
// mit_loss_cuda.cu (included here for its declarations only).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../loss_step.h"      // cuda_backward_check
#include "../triton_plans.h"   // plans::launcher
#include "../mit_loss_math.h"  // kRowStats
#include "../op_checks.h"      // the ops' contract checks

#define MITK_CUDA_API_ONLY
#include "mit_loss_cuda.cu"
#undef MITK_CUDA_API_ONLY

namespace mitk {
namespace cuda {
namespace {

using at::Tensor;


int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      checks::check_logits_dtype(t);  // throws: the one message for these dtypes
  }
  return kF32;
}

int scalar_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kDouble: return kSDouble;
    case at::kFloat: return kSFloat;
    case at::kLong: return kSLong;
    case at::kInt: return kSInt;
    case at::kHalf: return kSHalf;
    case at::kBFloat16: return kSBFloat16;
    default: TORCH_CHECK(false, "mitkernels_C (cuda): ", what, " has unsupported dtype ", t);
  }
  return kSDouble;
}

using checks::acc_type;
using Shape = checks::RowShape;

Shape check_rows(const Tensor& logits, const Tensor& targets, const Tensor& tau, const char* op) {
  return checks::check_row_inputs(logits, targets, tau, c10::kCUDA, op);
}

RowArgs row_args(const Tensor& logits, const Tensor& targets, const Tensor& tau, const Shape& sh,
                 double t_eps, double t_min, double t_max, int64_t ignore_index) {
  RowArgs a{};
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
  a.tau = tau.const_data_ptr();
  a.tau64 = tau.scalar_type() == at::kDouble;
  a.K = sh.K;
  a.ignore_index = ignore_index;
  a.t_eps = t_eps;
  a.t_min = t_min;
  a.t_max = t_max;
  return a;
}

std::tuple<Tensor, Tensor> row_stats_cuda(const Tensor& logits, const Tensor& targets_in,
                                          const Tensor& tau_in, double t_eps, double t_min,
                                          double t_max, int64_t ignore_index) {
  const Shape sh = check_rows(logits, targets_in, tau_in, "row_stats");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor targets = targets_in.contiguous();
  const Tensor tau = tau_in.contiguous();
  Tensor rs = at::empty({mitk::kRowStats, sh.R},
                        logits.options().dtype(acc_type(logits.scalar_type())));
  Tensor summary = at::empty({SUMMARY_HEADER_SIZE + (sh.K == 1 ? sh.C : 3 * sh.C)},
                             logits.options().dtype(at::kDouble));
  Tensor work = at::empty({summary_workspace_doubles(sh.R, sh.C, sh.K)},
                          logits.options().dtype(at::kDouble));
  RowArgs a = row_args(logits, targets, tau, sh, t_eps, t_min, t_max, ignore_index);
  a.row_stats = rs.mutable_data_ptr();
  C10_CUDA_CHECK(launch_row_stats(a, summary.mutable_data_ptr<double>(),
                                  work.mutable_data_ptr<double>(),
                                  c10::cuda::getCurrentCUDAStream().stream()));
  return {rs, summary};
}

std::tuple<Tensor, Tensor, Tensor> finalize_cuda(
    const Tensor& summary_in, const std::optional<Tensor>& local_in, const Tensor& row_stats_in,
    const Tensor& tau_in, at::TensorList state, int64_t kind, at::ArrayRef<double> hparams,
    double t_eps, double t_min, double t_max, int64_t reduction, bool update_state,
    at::ScalarType loss_dtype) {
  // Every check before anything is written.
  const int64_t size = checks::check_summaries(summary_in, local_in, c10::kCUDA);
  const int64_t C = checks::check_finalize_inputs(size, row_stats_in, tau_in, state, kind, hparams,
                                                  reduction, loss_dtype, summary_in.device());
  checks::mark_state_written(state, kind, update_state);
  const int64_t K = tau_in.numel();
  const int loss_code = scalar_code(loss_dtype, "loss_dtype");
  const c10::cuda::CUDAGuard guard(summary_in.device());
  const Tensor summary = summary_in.contiguous();
  const Tensor local = local_in.has_value() ? local_in->contiguous() : summary;
  const Tensor rs = row_stats_in.contiguous();
  const Tensor tau = tau_in.contiguous();
  const int64_t R = rs.size(1);
  const auto opts = summary.options();
  Tensor loss = reduction == 0 ? at::empty({R}, opts.dtype(loss_dtype)) : at::empty({}, opts.dtype(loss_dtype));
  Tensor stats = at::empty({9}, opts);
  Tensor grad_info = at::empty({2 + K}, opts.dtype(rs.scalar_type()));

  FinalizeArgs f{};
  f.summary = summary.const_data_ptr<double>();
  f.local = local.const_data_ptr<double>();
  f.row_stats = rs.const_data_ptr();
  f.acc64 = rs.scalar_type() == at::kDouble;
  f.R = R;
  f.C = C;
  f.K = K;
  f.tau = tau.const_data_ptr();
  f.tau64 = tau.scalar_type() == at::kDouble;
  f.kind = static_cast<int>(kind);
  f.hp0 = hparams.size() > 0 ? hparams[0] : 0.0;
  f.hp1 = hparams.size() > 1 ? hparams[1] : 0.0;
  f.t_eps = t_eps;
  f.t_min = t_min;
  f.t_max = t_max;
  f.reduction = static_cast<int>(reduction);
  f.update_state = update_state;
  f.loss = loss.mutable_data_ptr();
  f.loss_code = loss_code;
  f.stats = stats.mutable_data_ptr<double>();
  f.grad_info = grad_info.mutable_data_ptr();
  if (kind == kMiT) {
    f.vec_state = state[0].mutable_data_ptr<double>();
    f.s1 = state[1].mutable_data_ptr();
    f.s1_code = scalar_code(state[1].scalar_type(), "total_seen");
    f.s2 = state[2].mutable_data_ptr();
    f.s2_code = scalar_code(state[2].scalar_type(), "lambda_entropy");
    f.s3 = state[3].mutable_data_ptr();
    f.s3_code = scalar_code(state[3].scalar_type(), "dual_updates");
  } else if (kind == kCCT) {
    f.vec_state = state[0].mutable_data_ptr<double>();
    f.s1 = state[1].mutable_data_ptr();
    f.s1_code = scalar_code(state[1].scalar_type(), "alpha");
  }
  C10_CUDA_CHECK(launch_finalize(f, c10::cuda::getCurrentCUDAStream().stream()));
  return {loss, stats, grad_info};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> loss_forward_cuda(
    const Tensor& logits, const Tensor& targets, const Tensor& tau, at::TensorList state,
    int64_t kind, at::ArrayRef<double> hparams, double t_eps, double t_min, double t_max,
    int64_t ignore_index, int64_t reduction, bool update_state, at::ScalarType loss_dtype) {
  auto [rs, summary] = row_stats_cuda(logits, targets, tau, t_eps, t_min, t_max, ignore_index);
  auto [loss, stats, grad_info] = finalize_cuda(summary, std::nullopt, rs, tau, state, kind,
                                                hparams, t_eps, t_min, t_max, reduction,
                                                update_state, loss_dtype);
  return {loss, stats, rs, grad_info};
}

std::tuple<Tensor, Tensor> loss_backward_cuda(const Tensor& grad_loss, const Tensor& logits,
                                              const Tensor& targets_in, const Tensor& tau_in,
                                              const Tensor& row_stats_in, const Tensor& grad_info_in,
                                              double t_eps, double t_min, double t_max,
                                              int64_t ignore_index, int64_t reduction,
                                              bool compute_grad_tau) {
  const char* op = "loss_backward";
  const Shape sh = check_rows(logits, targets_in, tau_in, op);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  checks::check_backward_inputs(grad_loss, row_stats_in, grad_info_in, sh, acc, reduction,
                                logits.device());
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor targets = targets_in.contiguous();
  const Tensor tau = tau_in.contiguous();
  const Tensor rs = row_stats_in.contiguous();
  const Tensor gi = grad_info_in.to(acc).contiguous();
  const Tensor gl = grad_loss.reshape({-1}).to(acc).contiguous();
  Tensor grad = at::empty_like(logits);
  Tensor grad_tau = at::zeros({sh.K}, tau.options());
  RowArgs a = row_args(logits, targets, tau, sh, t_eps, t_min, t_max, ignore_index);
  a.row_stats = const_cast<void*>(rs.const_data_ptr());
  a.grad = grad.mutable_data_ptr();
  a.gn = grad.stride(0);
  a.gc = grad.stride(1);
  a.gs = grad.stride(2);
  a.grad_info = gi.const_data_ptr();
  a.grad_loss = gl.const_data_ptr();
  a.grad_rows = reduction == 0;
  C10_CUDA_CHECK(launch_backward(a, static_cast<int>(reduction), compute_grad_tau,
                                 grad_tau.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()));
  return {grad, grad_tau};
}

bool backward_runs_on(int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return backward_kernel_available();
}

// The eager Triton step asks it before taking this extension's gradient kernel for its backward.
[[maybe_unused]] const bool kBackwardCheckSet =
    (mitk::cuda_backward_check() = &backward_runs_on, true);

// The launch plans' launcher (csrc/triton_plans.h): a Triton kernel on the device's current
// stream, as Triton's own launcher puts it. Returns the CUresult.
int plan_launcher(uint64_t function, const uint32_t grid[3], uint32_t threads, uint32_t shared,
                  void** params, int, c10::Device device) {
  return launch_driver_function(function, grid, threads, shared,
                                c10::cuda::getCurrentCUDAStream(device.index()).stream(), params);
}

[[maybe_unused]] const bool kPlanLauncherSet =
    (mitk::plans::launcher(c10::kCUDA) = &plan_launcher,
     mitk::plans::launcher_probe(c10::kCUDA) = &driver_launch_available, true);

}  // namespace
}  // namespace cuda
}  // namespace mitk

TORCH_LIBRARY_IMPL(mitkernels_C, CUDA, m) {
  m.impl("row_stats", &mitk::cuda::row_stats_cuda);
  m.impl("finalize_", &mitk::cuda::finalize_cuda);
  m.impl("loss_forward_", &mitk::cuda::loss_forward_cuda);
  m.impl("loss_backward", &mitk::cuda::loss_backward_cuda);
}
