// The mitkernels_C operator library (schemas only: the CPU and CUDA files add their kernels)
// and the Python module mitkernels._C, whose import loads them.
//
// The schema strings are mitkernels/ops.py's KERNEL_SCHEMAS, verbatim (tests/test_ops.py checks).
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

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
#ifdef MITK_HAVE_CPU_AVX2
  d["cpu_kernels_compiled"] = std::vector<std::string>{"default", "avx2"};
#else
  d["cpu_kernels_compiled"] = std::vector<std::string>{"default"};
#endif
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
}
