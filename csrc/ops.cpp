// The mitkernels_C operator library (schemas only: the CPU and CUDA files add their kernels)
// and the Python module mitkernels._C, whose import loads them.
//
// The schema strings are mitkernels/ops.py's KERNEL_SCHEMAS and EAGER_SCHEMAS, verbatim
// (tests/test_ops.py checks).
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "mit_loss_math.h"  // kRowStats
#include "triton_plans.h"   // plans::bind

#ifndef MITKERNELS_TORCH_VERSION
#ifdef TORCH_VERSION
#define MITKERNELS_TORCH_VERSION TORCH_VERSION
#else
#define MITKERNELS_TORCH_VERSION "unknown"
#endif
#endif

#ifndef MITKERNELS_CUDA_ARCHS
#define MITKERNELS_CUDA_ARCHS ""
#endif

namespace mitk {
namespace cpu {
const char* kernel_isa();
}  // namespace cpu
}  // namespace mitk

TORCH_LIBRARY(mitkernels_C, m) {
  m.def(
      "row_stats(Tensor logits, Tensor targets, Tensor tau, float t_eps, float t_min, float t_max, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "finalize_(Tensor summary, Tensor? local_summary, Tensor row_stats, Tensor tau, "
      "Tensor(a!)[] state, int kind, float[] hparams, float t_eps, float t_min, float t_max, "
      "int reduction, bool update_state, ScalarType loss_dtype) -> (Tensor, Tensor, Tensor)");
  m.def(
      "loss_forward_(Tensor logits, Tensor targets, Tensor tau, Tensor(a!)[] state, int kind, "
      "float[] hparams, float t_eps, float t_min, float t_max, int ignore_index, int reduction, "
      "bool update_state, ScalarType loss_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "loss_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor tau, Tensor row_stats, "
      "Tensor grad_info, float t_eps, float t_min, float t_max, int ignore_index, int reduction, "
      "bool compute_grad_tau) -> (Tensor, Tensor)");
  // The eager step in one call, differentiable (csrc/loss_step.cpp has its kernels).
  m.def(
      "loss_step_(Tensor logits, Tensor targets, Tensor tau, Tensor(a!)[] state, int kind, "
      "float[] hparams, float t_eps, float t_min, float t_max, int ignore_index, int reduction, "
      "bool update_state, ScalarType loss_dtype) -> (Tensor, Tensor[])");
  // The same step over the Triton launchers: loss_forward_'s and loss_backward's schemas under
  // names whose CPU and CUDA kernels Python registers (mitkernels/functional.py,
  // _triton_step_op), so that the eager Triton step pays no Python autograd node either.
  m.def(
      "triton_loss_forward_(Tensor logits, Tensor targets, Tensor tau, Tensor(a!)[] state, "
      "int kind, float[] hparams, float t_eps, float t_min, float t_max, int ignore_index, "
      "int reduction, bool update_state, ScalarType loss_dtype) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "triton_loss_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor tau, "
      "Tensor row_stats, Tensor grad_info, float t_eps, float t_min, float t_max, "
      "int ignore_index, int reduction, bool compute_grad_tau) -> (Tensor, Tensor)");
  m.def(
      "triton_loss_step_(Tensor logits, Tensor targets, Tensor tau, Tensor(a!)[] state, "
      "int kind, float[] hparams, float t_eps, float t_min, float t_max, int ignore_index, "
      "int reduction, bool update_state, ScalarType loss_dtype) -> (Tensor, Tensor[])");
}

// Meta kernels: shapes and dtypes only, so FakeTensor / torch.compile / opcheck can trace the
// mitkernels_C ops directly (the public mitkernels ops have their fakes in ops.py).
namespace {

using at::Tensor;

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<Tensor, Tensor> row_stats_meta(const Tensor& logits, const Tensor& targets,
                                          const Tensor& tau, double, double, double, int64_t) {
  TORCH_CHECK(logits.dim() == 3, "mitkernels_C::row_stats: logits must be [N, C, S]");
  const c10::SymInt n = logits.sym_size(0), c = logits.sym_size(1), s = logits.sym_size(2);
  const bool one_temperature = tau.sym_numel() == 1;
  const c10::SymInt summary = one_temperature ? c + 5 : c * 3 + 5;
  return {at::empty_symint({c10::SymInt(mitk::kRowStats), n * s},
                           logits.options().dtype(acc_of(logits.scalar_type()))),
          at::empty_symint({summary}, logits.options().dtype(at::kDouble))};
}

std::tuple<Tensor, Tensor, Tensor> finalize_meta(const Tensor& summary,
                                                 const std::optional<Tensor>&,
                                                 const Tensor& row_stats, const Tensor& tau,
                                                 at::TensorList, int64_t, at::ArrayRef<double>,
                                                 double, double, double, int64_t reduction, bool,
                                                 at::ScalarType loss_dtype) {
  const auto opts = row_stats.options();
  Tensor loss = reduction == 0 ? at::empty_symint({row_stats.sym_size(1)}, opts.dtype(loss_dtype))
                               : at::empty({}, opts.dtype(loss_dtype));
  return {loss, at::empty({9}, opts.dtype(at::kDouble)),
          at::empty_symint({tau.sym_numel() + 2}, opts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> loss_forward_meta(
    const Tensor& logits, const Tensor& targets, const Tensor& tau, at::TensorList state,
    int64_t kind, at::ArrayRef<double> hparams, double t_eps, double t_min, double t_max,
    int64_t ignore_index, int64_t reduction, bool update_state, at::ScalarType loss_dtype) {
  auto [rs, summary] = row_stats_meta(logits, targets, tau, t_eps, t_min, t_max, ignore_index);
  auto [loss, stats, grad_info] = finalize_meta(summary, std::nullopt, rs, tau, state, kind,
                                                hparams, t_eps, t_min, t_max, reduction,
                                                update_state, loss_dtype);
  return {loss, stats, rs, grad_info};
}

std::tuple<Tensor, Tensor> loss_backward_meta(const Tensor&, const Tensor& logits, const Tensor&,
                                              const Tensor& tau, const Tensor&, const Tensor&,
                                              double, double, double, int64_t, int64_t, bool) {
  return {at::empty_like(logits), at::empty_symint({tau.sym_numel()}, tau.options())};
}

std::tuple<Tensor, std::vector<Tensor>> loss_step_meta(
    const Tensor& logits, const Tensor& targets, const Tensor&, at::TensorList, int64_t,
    at::ArrayRef<double>, double, double, double, int64_t, int64_t reduction, bool,
    at::ScalarType loss_dtype) {
  const auto opts = logits.options();
  Tensor loss = reduction == 0 ? at::empty_symint(targets.sym_sizes(), opts.dtype(loss_dtype))
                               : at::empty({}, opts.dtype(loss_dtype));
  return {loss, at::empty({9}, opts.dtype(at::kDouble)).unbind()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mitkernels_C, Meta, m) {
  m.impl("row_stats", &row_stats_meta);
  m.impl("finalize_", &finalize_meta);
  m.impl("loss_forward_", &loss_forward_meta);
  m.impl("loss_backward", &loss_backward_meta);
  m.impl("loss_step_", &loss_step_meta);
  m.impl("triton_loss_forward_", &loss_forward_meta);
  m.impl("triton_loss_backward", &loss_backward_meta);
  m.impl("triton_loss_step_", &loss_step_meta);
}

namespace {

std::vector<std::string> split_archs(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == ';' || ch == ',' || ch == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(ch);
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu"] = true;
#ifdef MITKERNELS_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = split_archs(MITKERNELS_CUDA_ARCHS);
  d["torch_version"] = std::string(MITKERNELS_TORCH_VERSION);
  d["cpu_kernels"] = std::string(mitk::cpu::kernel_isa());
  std::vector<std::string> compiled{"default"};
#ifdef MITK_HAVE_CPU_AVX2
  compiled.emplace_back("avx2");
#endif
#ifdef MITK_HAVE_CPU_AVX512
  compiled.emplace_back("avx512");
#endif
  d["cpu_kernels_compiled"] = compiled;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mitkernels compiled kernels: loading this module registers torch.ops.mitkernels_C";
  m.def("build_info", &build_info,
        "What this build holds: cpu, cuda, cuda_archs, torch_version, cpu_kernels, openmp.");
  mitk::plans::bind(m);
}
