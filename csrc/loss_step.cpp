// mitkernels_C::loss_step_: an eager training step in one call, with a C++ autograd node.
//
// The four kernel ops of the contract (mitkernels/ops.py) serve torch.compile and every backend.
// An eager step through them pays Python for the canonical views, the invalid-target check, a
// Python autograd.Function and its Python backward: on a 32 x 5 batch that was ten times the
// kernels' own time. This op does the same work in C++: the [N, C, S] / [R] / [K] views,
// loss_forward_ (whatever the device: it is called through the dispatcher), on CPU the
// ValueError for invalid targets, and a torch::autograd::Function whose backward calls
// loss_backward, so the autograd engine runs the backward without entering Python.
//
// Registered for the Autograd key (device-agnostic) and, for calls below autograd (inference
// mode), CompositeExplicitAutograd; ops.cpp holds the schema and the Meta kernel.
// triton_loss_step_ is the same step over triton_loss_forward_ / triton_loss_backward, whose
// kernels are the Triton launchers (Python, registered by mitkernels/functional.py): the
// dispatcher calls into Python for the launches only (on a GPU, with the extension's CUDA
// kernels, for the forward's only: triton_step_takes_cuda_backward), and with
// MITKERNELS_TRITON_LAUNCH=cpp not even for those once a call of the same signature has been
// recorded: the launches are replayed from C++ (csrc/triton_plans.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "loss_step.h"
#include "mit_loss_math.h"
#include "op_checks.h"
#include "triton_plans.h"

namespace mitk {

CudaBackwardCheck& cuda_backward_check() {
  static CudaBackwardCheck check = nullptr;
  return check;
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The step's arguments that autograd neither differentiates nor needs to see.
struct StepArgs {
  const Tensor& targets;
  at::TensorList state;
  int64_t kind;
  at::ArrayRef<double> hparams;
  double t_eps, t_min, t_max;
  int64_t ignore_index, reduction;
  bool update_state;
  at::ScalarType loss_dtype;
};

// The canonical inputs of the op contract: [N, C, S] logits, [R] int32/int64 targets, [K] tau.
// Views whenever the layout allows (made below autograd, so they carry no view tracking).
struct Canonical {
  Tensor logits, targets, tau;
};

// Tensors seen under tracing and opcheck (fake, functional, Python subclasses) carry one of
// these keys; their sizes may be symbolic and their data unreadable.
constexpr c10::DispatchKeySet kWrapperKeys({c10::DispatchKey::Python,
                                            c10::DispatchKey::PythonTLSSnapshot,
                                            c10::DispatchKey::Functionalize});

bool is_plain(const Tensor& t) {
  const c10::Device device = t.device();
  return (device.is_cpu() || device.is_cuda()) && !t.key_set().has_any(kWrapperKeys) &&
         t.layout() == at::kStrided;
}

Canonical canonical(const Tensor& logits, const Tensor& targets, const Tensor& tau) {
  TORCH_CHECK_VALUE(logits.dim() >= 2, "logits must be [N, C] or [N, C, d1, ...], got shape ",
                    logits.sizes());
  // As mitkernels.functional checks them (which calls this op with int64 or int32 targets): a
  // float target was truncated to a class, and targets of the right count but another shape
  // gave a per-row loss of the wrong shape.
  const at::ScalarType tt = targets.scalar_type();
  TORCH_CHECK_TYPE(at::isIntegralType(tt, /*includeBool=*/false) && tt != at::kUInt64,
                   "targets must hold integer class indices (int64, int32, or a narrower "
                   "integer dtype), got ", tt);
  bool shape_ok = targets.dim() == logits.dim() - 1 && targets.sym_size(0) == logits.sym_size(0);
  for (int64_t d = 1; shape_ok && d < targets.dim(); ++d) {
    shape_ok = targets.sym_size(d) == logits.sym_size(d + 1);
  }
  TORCH_CHECK_VALUE(shape_ok, "targets must be shaped as the logits without their class "
                    "dimension (1), got ", targets.sym_sizes(), " for logits ",
                    logits.sym_sizes());
  Canonical out{logits, targets, tau};
  // Inputs already in their canonical form are used as they are (each reshape is a dispatch).
  if (logits.dim() != 3) {
    c10::SymInt s = 1;
    for (int64_t d = 2; d < logits.dim(); ++d) s *= logits.sym_size(d);
    out.logits = logits.reshape_symint({logits.sym_size(0), logits.sym_size(1), s});
  }
  if (targets.dim() != 1) out.targets = targets.reshape({-1});
  if (out.targets.scalar_type() != at::kLong && out.targets.scalar_type() != at::kInt) {
    out.targets = out.targets.to(at::kLong);
  }
  out.targets = out.targets.contiguous();
  if (tau.dim() != 1) out.tau = tau.reshape({-1});
  return out;
}

using ForwardOut = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// create_graph=True runs a backward under grad mode, and the gradients it returns join the
// graph. The kernels have no derivative of their own: rather than come back as constants, whose
// derivative would silently be 0, the gradients come back through this node, which depends on
// the logits and tau and raises when a second derivative reaches it. (Python's
// @once_differentiable does the like, but only when the incoming gradient requires grad; these
// gradients depend on the logits whatever it does.)
struct NoSecondDerivative : public torch::autograd::Function<NoSecondDerivative> {
  static Tensor forward(AutogradContext*, const Tensor& grad, const Tensor&, const Tensor&) {
    return grad;
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false, "mitkernels: the loss's kernels have no second derivative (a gradient of "
                "its gradient, taken with create_graph=True); backend='reference' has one");
    return {};
  }
};

// Which kernel ops a step calls: the extension's (CPU and CUDA kernels in C++) or the Triton
// launchers registered under the triton_ names.
struct CompiledKernels {
  static constexpr const char* kForward = "mitkernels_C::loss_forward_";
  static constexpr const char* kBackward = "mitkernels_C::loss_backward";
};
struct TritonKernels {
  static constexpr const char* kForward = "mitkernels_C::triton_loss_forward_";
  static constexpr const char* kBackward = "mitkernels_C::triton_loss_backward";
};

template <class Kernels>
const auto& loss_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Kernels::kForward, "")
          .template typed<ForwardOut(const Tensor&, const Tensor&, const Tensor&, at::TensorList,
                                     int64_t, at::ArrayRef<double>, double, double, double,
                                     int64_t, int64_t, bool, at::ScalarType)>();
  return op;
}

template <class Kernels>
const auto& loss_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(Kernels::kBackward, "")
          .template typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                     const Tensor&, const Tensor&, const Tensor&,
                                                     double, double, double, int64_t, int64_t,
                                                     bool)>();
  return op;
}

// Which backward the eager Triton step runs on CUDA tensors: the extension's C++/CUDA gradient
// kernel when it has one for the logits' GPU (the same op contract, row statistics and formula).
// The autograd engine runs a CUDA node's backward on its device thread, and a Triton launch there
// enters Python: through Triton's launcher the backward alone took 386 us of host time at
// 256 x 5, the cuda backend's 175 us (H200, `gpu_kernels --overhead`, run 150227); through the
// CUDA kernel 107 us, the cuda backend's 99 us (run 152201; benchmarks/results/GPU_RUNS.md,
// session 7). Where the logits hold 1 GiB or more, the backward's device time covers that launch
// and Triton's kernel is the faster one: at 8192 x 65536 (H200) the step took 0.889 ms (bf16) and
// 1.590 ms (fp32) with Triton's backward, 0.928 and 1.609 with the CUDA kernel; at 4096 x 32000
// (0.25 / 0.5 GiB) it took 1.112 / 0.618 ms against 0.592 / 0.430 (gpu_kernels --overhead,
// GPU_RUNS session 9, run 222651). MITKERNELS_TRITON_BACKWARD: unset or `auto` as above, `triton`
// Triton's kernel, `cuda` the CUDA kernel or an error. Decided in forward, on the caller's
// thread (the environment is not read on the engine's threads), before anything is computed.
constexpr int64_t kTritonBackwardBytes = int64_t(1) << 30;

bool cuda_backward_runs(c10::DeviceIndex device) {
  const CudaBackwardCheck check = cuda_backward_check();
  if (check == nullptr) return false;
  static std::array<std::atomic<int8_t>, 64> known{};  // per device: 0 not asked, 1 yes, 2 no
  if (device < 0 || device >= static_cast<c10::DeviceIndex>(known.size())) return check(device);
  int8_t v = known[device].load(std::memory_order_relaxed);
  if (v == 0) {
    v = check(device) ? 1 : 2;
    known[device].store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

bool triton_step_takes_cuda_backward(const Tensor& logits) {
  const char* env = std::getenv("MITKERNELS_TRITON_BACKWARD");
  const std::string choice = env == nullptr ? "" : env;
  TORCH_CHECK_VALUE(choice.empty() || choice == "auto" || choice == "triton" || choice == "cuda",
                    "MITKERNELS_TRITON_BACKWARD must be auto, triton or cuda, got '", choice, "'");
  if (choice == "triton" || !logits.is_cuda() || !is_plain(logits)) return false;
  if (choice != "cuda" && logits.numel() * static_cast<int64_t>(logits.element_size()) >=
                              kTritonBackwardBytes) {
    return false;
  }
  const bool runs = cuda_backward_runs(logits.device().index());
  TORCH_CHECK_VALUE(runs || choice != "cuda",
                    "MITKERNELS_TRITON_BACKWARD=cuda, but the extension has no CUDA gradient "
                    "kernel for ", logits.device(), " (build it with MITKERNELS_BUILD_CUDA=1 and "
                    "that GPU's architecture in TORCH_CUDA_ARCH_LIST)");
  return runs;
}

// The kernels counted invalid targets and left the state as it was. On the CPU, reading the
// count costs no synchronisation: say which target, now, rather than return a NaN loss (the
// same message as functional.py's check for the reference backend).
void raise_on_invalid_targets(const Tensor& flat, const Tensor& stats, const Tensor& logits,
                              int64_t ignore_index) {
  if (!flat.is_cpu() || !is_plain(flat) || !is_plain(stats) || flat.numel() == 0) return;
  const int64_t num_classes = logits.size(1);
  const double n_invalid = stats.const_data_ptr<double>()[STATS_SIZE - 1];
  if (n_invalid == 0) return;
  const int64_t R = flat.numel();
  int64_t value = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t y = flat.scalar_type() == at::kLong ? flat.const_data_ptr<int64_t>()[r]
                                                      : flat.const_data_ptr<int32_t>()[r];
    if (target_invalid(y, num_classes, ignore_index)) {
      value = y;
      break;
    }
  }
  TORCH_CHECK_VALUE(false, "targets must lie in [0, ", num_classes, ") or equal ignore_index (",
                    ignore_index, "); found ", value);
}

struct StepOut {
  Tensor loss, stats, row_stats, grad_info;
};

// Whether the eager Triton step launches through plans (csrc/triton_plans.h): asked for
// (MITKERNELS_TRITON_LAUNCH=cpp), a launcher for the logits' device, and plain tensors (a plan
// reads pointers; tracing and subclass tensors take the ops). Decided in forward, on the
// caller's thread, like the backward's choice.
bool plans_serve(const Tensor& logits) { return is_plain(logits) && plans::usable(logits); }

bool all_plain(at::TensorList tensors) {
  for (const Tensor& t : tensors) {
    if (!t.defined() || !is_plain(t)) return false;
  }
  return true;
}

// A Triton op's outputs through its plan when one is stored; else the op (its Python launchers),
// recording a plan for the next call with this signature.
template <class Call>
std::vector<Tensor> by_plan(plans::Op op, at::TensorList inputs, const std::vector<int64_t>& scalars,
                            Call call) {
  const plans::Key key = plans::make_key(op, inputs, scalars);
  if (auto out = plans::replay(key, inputs)) return std::move(*out);
  const plans::Recording recording(key);
  return call();
}

template <class Kernels>
ForwardOut call_forward(const Canonical& in, const StepArgs& a, bool use_plans) {
  const auto call = [&] {
    return loss_forward_op<Kernels>().call(in.logits, in.targets, in.tau, a.state, a.kind,
                                           a.hparams, a.t_eps, a.t_min, a.t_max, a.ignore_index,
                                           a.reduction, a.update_state, a.loss_dtype);
  };
  if (!use_plans) return call();
  std::vector<Tensor> inputs{in.logits, in.targets, in.tau};
  inputs.insert(inputs.end(), a.state.begin(), a.state.end());
  if (!all_plain(inputs)) return call();
  std::vector<int64_t> scalars{a.kind, static_cast<int64_t>(a.hparams.size())};
  for (double h : a.hparams) scalars.push_back(plans::bits(h));
  for (double t : {a.t_eps, a.t_min, a.t_max}) scalars.push_back(plans::bits(t));
  scalars.insert(scalars.end(), {a.ignore_index, a.reduction, a.update_state,
                                 static_cast<int64_t>(a.loss_dtype)});
  // A replay skips the Python launcher, which marks the state written (its version counters):
  // marked here for both (a second bump on a recording call is harmless).
  checks::mark_state_written(a.state, a.kind, a.update_state);
  const std::vector<Tensor> out = by_plan(plans::Op::kForward, inputs, scalars, [&] {
    auto [loss, stats, row_stats, grad_info] = call();
    return std::vector<Tensor>{loss, stats, row_stats, grad_info};
  });
  return {out[0], out[1], out[2], out[3]};
}

template <class Kernels>
StepOut step_forward(const Tensor& logits, const Tensor& tau, const StepArgs& a, bool use_plans) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // The logits' device current: Triton launches on the current device (the autograd engine sets
  // it for the backward), and launch plans record kernels loaded there.
  c10::OptionalDeviceGuard device_guard;
  if (logits.is_cuda() && is_plain(logits)) device_guard.reset_device(logits.device());
  const Canonical in = canonical(logits, a.targets, tau);
  StepOut out;
  std::tie(out.loss, out.stats, out.row_stats, out.grad_info) =
      call_forward<Kernels>(in, a, use_plans);
  raise_on_invalid_targets(in.targets, out.stats, in.logits, a.ignore_index);
  if (a.reduction == 0) out.loss = out.loss.view_symint(a.targets.sym_sizes());
  return out;
}

// Differentiable inputs: logits (edge 0) and tau (edge 1); the rest rides in StepArgs. `Node`
// is the concrete node type (below, outside any namespace: see there).
template <class Kernels, class Node>
struct LossStep : public torch::autograd::Function<Node> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& tau,
                               const StepArgs& a) {
    bool cuda_backward = false, use_plans = false;
    if constexpr (std::is_same_v<Kernels, TritonKernels>) {
      cuda_backward = triton_step_takes_cuda_backward(logits);
      use_plans = plans_serve(logits);
    }
    StepOut out = step_forward<Kernels>(logits, tau, a, use_plans);
    // The stats output never takes a gradient: no zeros for it in backward.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({out.stats});
    // The original inputs are saved (their version counters catch in-place changes before
    // backward); backward rebuilds the canonical views from them.
    // Labels kept from an inference_mode pass: torch refuses to save an inference tensor (after
    // the kernels had updated the state); a copy is a normal tensor, and targets are small.
    ctx->save_for_backward({logits, tau, a.targets.is_inference() ? a.targets.clone() : a.targets,
                            out.row_stats, out.grad_info});
    ctx->saved_data["t"] = c10::IValue(std::vector<double>{a.t_eps, a.t_min, a.t_max});
    ctx->saved_data["i"] = c10::IValue(std::vector<int64_t>{a.ignore_index, a.reduction});
    ctx->saved_data["b"] = c10::IValue(cuda_backward);
    ctx->saved_data["p"] = c10::IValue(use_plans);
    return {out.loss, out.stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& grad_loss = grads[0];
    const bool needs_logits = ctx->needs_input_grad(0), needs_tau = ctx->needs_input_grad(1);
    if (!grad_loss.defined() || !(needs_logits || needs_tau)) return {Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &tau = saved[1];
    const auto t = ctx->saved_data["t"].toDoubleVector();
    const auto i = ctx->saved_data["i"].toIntVector();
    // The kernels' gradients, computed below autograd.
    variable_list out = [&]() -> variable_list {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Canonical in = canonical(logits, saved[2], tau);
      const bool cuda_backward = ctx->saved_data["b"].toBool();
      const auto& backward_op =
          cuda_backward ? loss_backward_op<CompiledKernels>() : loss_backward_op<Kernels>();
      // Contiguous here rather than in the launchers: the per-row gradient of loss.sum() is an
      // expanded (stride 0) tensor, whose copy a launch plan could not trace to an input.
      const Tensor grad = grad_loss.contiguous();
      const auto call = [&] {
        return backward_op.call(grad, in.logits, in.targets, in.tau, saved[3], saved[4], t[0],
                                t[1], t[2], i[0], i[1], needs_tau);
      };
      Tensor grad_logits, grad_tau;
      std::vector<Tensor> inputs;
      if (!cuda_backward && ctx->saved_data["p"].toBool()) {
        inputs = {grad, in.logits, in.targets, in.tau, saved[3], saved[4]};
      }
      if (!inputs.empty() && all_plain(inputs)) {
        const std::vector<int64_t> scalars{plans::bits(t[0]), plans::bits(t[1]),
                                           plans::bits(t[2]), i[0], i[1], needs_tau};
        const std::vector<Tensor> out = by_plan(plans::Op::kBackward, inputs, scalars, [&] {
          auto [g, gt] = call();
          return std::vector<Tensor>{g, gt};
        });
        grad_logits = out[0];
        grad_tau = out[1];
      } else {
        std::tie(grad_logits, grad_tau) = call();
      }
      return {needs_logits ? grad_logits.reshape_symint(logits.sym_sizes()) : Tensor(),
              needs_tau ? grad_tau.reshape_symint(tau.sym_sizes()) : Tensor(), Tensor()};
    }();
    if (at::GradMode::is_enabled()) {  // create_graph=True
      for (int k = 0; k < 2; ++k) {
        if (out[k].defined()) out[k] = NoSecondDerivative::apply(out[k], logits, tau);
      }
    }
    return out;
  }
};

// The stats vector as its entries, 0-dim tensors on its storage (the values of the Python stats
// dict). For a plain CPU or CUDA tensor they are made here without the dispatcher: nine
// dispatched views cost more than the 32-row kernels. Other tensors take unbind.
std::vector<Tensor> stats_entries(const Tensor& stats) {
  if (!is_plain(stats) || stats.dim() != 1) return stats.unbind();
  std::vector<Tensor> out;
  out.reserve(static_cast<size_t>(stats.size(0)));
  for (int64_t i = 0; i < stats.size(0); ++i) {
    auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(stats.storage()),
                                                     stats.key_set(), stats.dtype());
    impl->set_sizes_and_strides(c10::IntArrayRef{}, c10::IntArrayRef{},
                                stats.storage_offset() + i * stats.stride(0));
    out.emplace_back(std::move(impl));
  }
  return out;
}

}  // namespace
}  // namespace mitk

// The autograd nodes of the two steps. A printed loss shows its node as
// `grad_fn=<` + the last `::` part of the node's C++ type name + `>`: at global scope and without
// template arguments, that reads `grad_fn=<CppNode<MitkernelsLossBackward>>` (inside mitk's
// anonymous namespace it read `grad_fn=<CompiledKernels> >>`).
struct MitkernelsLossBackward
    : mitk::LossStep<mitk::CompiledKernels, MitkernelsLossBackward> {};
struct MitkernelsTritonLossBackward
    : mitk::LossStep<mitk::TritonKernels, MitkernelsTritonLossBackward> {};

namespace mitk {
namespace {

template <class Node>
std::tuple<Tensor, std::vector<Tensor>> loss_step_autograd(
    const Tensor& logits, const Tensor& targets, const Tensor& tau, at::TensorList state,
    int64_t kind, at::ArrayRef<double> hparams, double t_eps, double t_min, double t_max,
    int64_t ignore_index, int64_t reduction, bool update_state, at::ScalarType loss_dtype) {
  // Checked before the step, which would update the state and only then fail to save the
  // logits for tau's gradient (torch refuses to save an inference tensor).
  TORCH_CHECK_VALUE(!(logits.is_inference() && tau.requires_grad() &&
                      at::GradMode::is_enabled()),
                    "logits made under torch.inference_mode() cannot be saved for the "
                    "temperature's gradient: make them outside inference mode (or clone them "
                    "there), or call the loss under torch.no_grad()");
  const StepArgs a{targets, state, kind, hparams, t_eps, t_min, t_max,
                   ignore_index, reduction, update_state, loss_dtype};
  variable_list out = Node::apply(logits, tau, a);
  return {out[0], stats_entries(out[1])};
}

template <class Kernels>
std::tuple<Tensor, std::vector<Tensor>> loss_step_forward_only(
    const Tensor& logits, const Tensor& targets, const Tensor& tau, at::TensorList state,
    int64_t kind, at::ArrayRef<double> hparams, double t_eps, double t_min, double t_max,
    int64_t ignore_index, int64_t reduction, bool update_state, at::ScalarType loss_dtype) {
  const StepArgs a{targets, state, kind, hparams, t_eps, t_min, t_max,
                   ignore_index, reduction, update_state, loss_dtype};
  bool use_plans = false;
  if constexpr (std::is_same_v<Kernels, TritonKernels>) use_plans = plans_serve(logits);
  StepOut out = step_forward<Kernels>(logits, tau, a, use_plans);
  return {out.loss, stats_entries(out.stats)};
}

}  // namespace
}  // namespace mitk

TORCH_LIBRARY_IMPL(mitkernels_C, Autograd, m) {
  m.impl("loss_step_", &mitk::loss_step_autograd<MitkernelsLossBackward>);
  m.impl("triton_loss_step_", &mitk::loss_step_autograd<MitkernelsTritonLossBackward>);
}

TORCH_LIBRARY_IMPL(mitkernels_C, CompositeExplicitAutograd, m) {
  m.impl("loss_step_", &mitk::loss_step_forward_only<mitk::CompiledKernels>);
  m.impl("triton_loss_step_", &mitk::loss_step_forward_only<mitk::TritonKernels>);
}
