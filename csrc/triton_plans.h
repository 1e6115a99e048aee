// Launch plans: the eager Triton step's kernels launched from C++, without Python.
//
// A Triton launch from Python costs the host tens of microseconds (the JIT's binder and cache
// key, then the launcher's argument parsing), and on the autograd engine's device thread a
// backward that enters Python costs more (GPU_RUNS.md, session 7: 150 us against 32 on the main
// thread). The step's launches are a pure function of its call signature: dtypes, sizes,
// strides, the 16-byte alignment of each input (what Triton specializes on), the scalar
// arguments and the device. So the first call with a signature runs the Python launchers and
// records what they did (mitkernels/triton/launch_plans.py): the buffers they allocated, and for
// each launch the compiled kernel, grid, block, shared memory and, parameter by parameter, where
// its value comes from (an input's pointer, a buffer's pointer plus an offset, or a literal).
// Later calls with that signature replay the plan here: the same allocations through ATen and
// the same launches through the CUDA driver, with the new tensors' pointers.
//
// Device-agnostic but for the launch itself, which the CUDA glue installs (cuda slot); tests
// install a recording launcher for CPU tensors (cpu slot), which checks the packing without a GPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mitk {
namespace plans {

enum class Op : int64_t { kForward = 0, kBackward = 1 };

// Launches `function` (a CUfunction, as Triton's CompiledKernel.function holds it) on the
// current stream of `device` with `num_params` packed parameters. Returns 0, or the driver's
// error (a CUresult) when it refused the launch: a replay whose first launch is refused goes
// to the Python launchers, one refused later fails the call (triton_plans.cpp's run).
using Launcher = int (*)(uint64_t function, const uint32_t grid[3], uint32_t threads,
                         uint32_t shared, void** params, int num_params, c10::Device device);
Launcher& launcher(c10::DeviceType type);  // kCUDA: set by the CUDA glue; kCPU: tests only
// Whether the launcher can launch here (the CUDA glue: the driver's entry points resolve);
// null: it can.
using Probe = bool (*)();
Probe& launcher_probe(c10::DeviceType type);

// MITKERNELS_TRITON_LAUNCH: `python` (the default) or `cpp` (plans). Read on the caller's thread.
bool requested();
// Whether plans may serve a call on these logits: requested, and a launcher for their device.
bool usable(const at::Tensor& logits);

// The call signature a plan is stored under.
using Key = std::vector<int64_t>;
Key make_key(Op op, at::TensorList inputs, const std::vector<int64_t>& scalars);
int64_t bits(double v);  // a double's bits, for Key scalars

// The outputs of the stored plan for `key` run on `inputs`, or nullopt when none is stored, the
// signature's calls are kept on Python, or the replay stopped before its first kernel ran (its
// plan is then retired). On nullopt, run the Python launchers inside a Recording for `key`: a
// first call stores the plan (launch_plans.py).
std::optional<std::vector<at::Tensor>> replay(const Key& key, at::TensorList inputs);

// Marks this thread's next Python launch of the op as one to record under `key`.
class Recording {
 public:
  explicit Recording(const Key& key);
  ~Recording();
  Recording(const Recording&) = delete;
  Recording& operator=(const Recording&) = delete;
};

}  // namespace plans
}  // namespace mitk

namespace pybind11 {
class module_;
}

namespace mitk {
namespace plans {
// The Python side of plans: _triton_plan_* functions of mitkernels._C (ops.cpp calls this).
void bind(pybind11::module_& m);
}  // namespace plans
}  // namespace mitk
