// The CPU kernels' entry points for the eager step (csrc/loss_step.cpp), beside the registered
// ops: a forward that keeps the exponentials of the rows and a backward that turns them into the
// gradient in place, with no exp.
//
// On this kind of CPU the backward's exp is two thirds of its time (1024 x 1000 fp32, 2 threads:
// 0.33 ms with it, 0.10 ms without). Keeping e = exp(z - m) costs a write in the forward and a
// read in the backward, and the buffer is the gradient itself, so a step's peak memory does not
// grow. That trade pays while the logits and the buffer stay in the caches; for large logits the
// extra traffic would cost more than the exp, so only logits up to kExpsMaxBytes take this path.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace mitk {
namespace cpu {

// Rows narrower than this keep the plain path: a batch of a few classes is bound by fixed
// costs, not by exp.
constexpr int64_t kExpsMinClasses = 16;
// Logits up to this size: the logits and the buffer together stay within a server L3 cache.
constexpr int64_t kExpsMaxBytes = int64_t(16) << 20;

// Canonical [N, C, 1] float32/float64 CPU logits of class stride 1, C >= kExpsMinClasses, at
// most kExpsMaxBytes.
bool keeps_exps(const at::Tensor& logits);

// loss_forward_'s outputs, then the exponentials ([R, C], the logits' dtype) and the rows'
// 1 / sum(e) ([R]; 0 where a row needs the exp formula).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
loss_forward_keeping_exps(const at::Tensor& logits, const at::Tensor& targets,
                          const at::Tensor& tau, at::TensorList state, int64_t kind,
                          at::ArrayRef<double> hparams, double t_eps, double t_min, double t_max,
                          int64_t ignore_index, int64_t reduction, bool update_state,
                          at::ScalarType loss_dtype);

// loss_backward's outputs; the gradient is `exps`, overwritten.
std::tuple<at::Tensor, at::Tensor> loss_backward_from_exps(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& targets,
    const at::Tensor& tau, const at::Tensor& row_stats, const at::Tensor& grad_info,
    const at::Tensor& exps, const at::Tensor& inv_sums, double t_eps, double t_min, double t_max,
    int64_t ignore_index, int64_t reduction, bool compute_grad_tau);

}  // namespace cpu
}  // namespace mitk
