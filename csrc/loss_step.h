// What the eager step (loss_step.cpp) needs from the CUDA glue, without CUDA headers: the
// extension is built with or without its CUDA part, and loss_step.cpp is in both.
#pragma once

namespace mitk {

// Whether the extension's CUDA gradient kernel has an image for CUDA device `device` (built for
// its architecture). The CUDA glue sets it when it is loaded; without CUDA kernels it stays null.
using CudaBackwardCheck = bool (*)(int device);
CudaBackwardCheck& cuda_backward_check();

}  // namespace mitk
