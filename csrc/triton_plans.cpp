// Launch plans of the eager Triton step: storage, keys, replay (see triton_plans.h).
#include "triton_plans.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>

namespace mitk {
namespace plans {
namespace {

using at::Tensor;

// Where a kernel parameter's value comes from (launch_plans.py's PARAM_KINDS, in this order).
enum ParamKind : int { kInput = 0, kBuffer = 1, kI32 = 2, kI64 = 3, kF32 = 4, kF64 = 5, kNull = 6 };

struct Param {
  int kind;
  int64_t index;   // kInput / kBuffer: which one
  int64_t value;   // kInput / kBuffer: byte offset; kI32 / kI64: the value
  double fvalue;   // kF32 / kF64
};

struct Buffer {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  bool zero;
  std::string dtype_name;  // as launch_plans.py named it
  int64_t offset;          // bytes into the replay's scratch block (not for an output)
  int64_t bytes;           // from its first element to the end of its last
  bool output = false;     // an output of the op: its own allocation, as the launchers make it
};

struct Launch {
  uint64_t function;
  std::array<uint32_t, 3> grid;
  uint32_t threads, shared;
  std::vector<Param> params;
};

// A replay allocates its scratch buffers as views of one block (one allocator call, not one
// each): the zeroed ones first, so one memset zeroes them all; each at a multiple of kAlign
// bytes. The op's outputs get one allocation each (store_plan says why).
constexpr int64_t kAlign = 256;

struct Plan {
  int64_t num_inputs;
  int64_t block_bytes = 0, zero_bytes = 0;
  std::vector<Buffer> buffers;
  std::vector<Launch> launches;
  std::vector<int64_t> outputs;  // buffer indices, in the op's output order
};

// A Triton kernel of this library takes under 40 parameters (two scratch pointers included).
constexpr int kMaxParams = 64;
// Signatures seen in one process: a training run has a handful (its batch shapes); past this
// many, new signatures stay on the Python launchers rather than grow the store without bound.
constexpr size_t kMaxPlans = 4096;

struct KeyHash {
  size_t operator()(const Key& k) const noexcept {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the words
    for (int64_t v : k) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

struct Store {
  std::mutex mutex;
  // A null plan: calls with that signature stay on Python (launch_plans.py said why).
  std::unordered_map<Key, std::shared_ptr<const Plan>, KeyHash> plans;
  std::string last_refusal;
  std::atomic<int64_t> hits{0}, recorded{0}, refused{0};
};

Store& store() {
  static Store* s = new Store();  // leaked: replays may run on threads alive at exit
  return *s;
}

thread_local const Key* pending = nullptr;

// The CPU slot's recording launcher (tests): what each launch was given.
struct LoggedLaunch {
  uint64_t function;
  std::array<uint32_t, 3> grid;
  uint32_t threads, shared;
  std::vector<uint64_t> params;  // each parameter's 8-byte slot
};
std::mutex log_mutex;
bool log_buffers = true;  // the CPU slot's replays check and log their buffers
// Tests: after refuse_after more logged launches, the next refuse_times are refused (as the
// driver refuses a launch) with refuse_code; -1: none is.
int64_t refuse_after = -1, refuse_times = 0;
int refuse_code = 0;
std::vector<LoggedLaunch>& launch_log() {
  static auto* log = new std::vector<LoggedLaunch>();
  return *log;
}

int logging_launcher(uint64_t function, const uint32_t grid[3], uint32_t threads, uint32_t shared,
                     void** params, int num_params, c10::Device) {
  LoggedLaunch entry{function, {grid[0], grid[1], grid[2]}, threads, shared, {}};
  for (int i = 0; i < num_params; ++i) {
    uint64_t v;
    std::memcpy(&v, params[i], sizeof v);
    entry.params.push_back(v);
  }
  const std::lock_guard<std::mutex> lock(log_mutex);
  if (refuse_after == 0 && refuse_times > 0) {
    if (--refuse_times == 0) refuse_after = -1;
    return refuse_code;  // refused: not logged
  }
  if (refuse_after > 0) refuse_after--;
  launch_log().push_back(std::move(entry));
  return 0;
}

at::ScalarType dtype_from_name(const std::string& name) {
  static const std::unordered_map<std::string, at::ScalarType> names = {
      {"float16", at::kHalf}, {"bfloat16", at::kBFloat16}, {"float32", at::kFloat},
      {"float64", at::kDouble}, {"int8", at::kChar}, {"uint8", at::kByte},
      {"int32", at::kInt}, {"int64", at::kLong}, {"bool", at::kBool}};
  const auto it = names.find(name);
  TORCH_CHECK_VALUE(it != names.end(), "launch plan: unknown buffer dtype '", name, "'");
  return it->second;
}

uint64_t slot_of(const Param& p, at::TensorList inputs, const std::vector<Tensor>& buffers) {
  uint64_t v = 0;
  switch (p.kind) {
    case kInput:
      return reinterpret_cast<uint64_t>(inputs[p.index].data_ptr()) + p.value;
    case kBuffer:
      return reinterpret_cast<uint64_t>(buffers[p.index].data_ptr()) + p.value;
    case kI32: {
      const int32_t x = static_cast<int32_t>(p.value);
      std::memcpy(&v, &x, sizeof x);
      return v;
    }
    case kI64:
      return static_cast<uint64_t>(p.value);
    case kF32: {
      const float x = static_cast<float>(p.fvalue);
      std::memcpy(&v, &x, sizeof x);
      return v;
    }
    case kF64:
      std::memcpy(&v, &p.fvalue, sizeof v);
      return v;
    default:  // kNull: the scratch pointers Triton appends, unused by these kernels
      return 0;
  }
}

// A buffer as launch_plans.py describes it, and as the CPU slot's replays log it: sizes,
// strides, dtype name, zeroed.
using BufferSpec = std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::string, bool>;

// What the CPU slot's replays allocated (tests compare it with the Python launchers').
std::vector<std::vector<BufferSpec>>& buffer_log() {
  static auto* log = new std::vector<std::vector<BufferSpec>>();
  return *log;
}

// A tensor of `dtype` on `block`'s storage, without the dispatcher (as stats_entries in
// loss_step.cpp: a dispatched view costs more than a small step's kernels).
Tensor view_of(const Tensor& block, at::ScalarType dtype, at::IntArrayRef sizes,
               at::IntArrayRef strides, int64_t offset_bytes) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(
      c10::Storage(block.storage()), block.key_set(), c10::scalarTypeToTypeMeta(dtype));
  impl->set_sizes_and_strides(sizes, strides,
                              offset_bytes / static_cast<int64_t>(c10::elementSize(dtype)));
  return Tensor(std::move(impl));
}

// Whether a launch's CUresult is an error the context already held: an earlier kernel's fault,
// which the driver reports at the next launch and keeps (a "sticky" error: 214 uncorrectable
// ECC, 700 illegal address, 702 launch timeout, 709 context destroyed, 710 device-side assert,
// 714 hardware stack error, 715 illegal instruction, 716 misaligned address, 717 invalid
// address space, 718 invalid PC, 719 launch failed). Any other code is the
// driver refusing this launch itself (its configuration, its function, the context it needs),
// which the Python launchers may still serve.
struct ContextError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

bool is_context_error(int rc) {
  switch (rc) {
    case 214: case 700: case 702: case 709: case 710: case 714: case 715: case 716: case 717:
    case 718: case 719:
      return true;
    default:
      return false;
  }
}

// The plan's buffers and launches on `inputs`; nullopt, with `why` said, when the replay stops
// before any of its kernels ran, so that the call can take the Python launchers as if no plan
// were stored:
// - the block is not 16-byte aligned (the kernels were compiled for aligned buffers: an
//   allocator that gives less);
// - the driver refuses the first launch (a configuration the driver will not take, a function
//   that is not loaded in this thread's context). Such refusals are returned at once and leave
//   the context usable. A later refusal fails the call: kernels before it ran, and one of them
//   may have updated the state.
std::optional<std::vector<Tensor>> run(const Plan& plan, at::TensorList inputs, std::string& why) {
  const c10::Device device = inputs[0].device();
  const Launcher launch = launcher(device.type());
  TORCH_CHECK(launch != nullptr, "launch plan: no launcher for ", device);
  const c10::OptionalDeviceGuard guard(device);
  const at::TensorOptions bytes = at::TensorOptions().dtype(at::kByte).device(device);
  const Tensor block = at::empty({plan.block_bytes}, bytes);
  std::vector<Tensor> buffers;
  buffers.reserve(plan.buffers.size());
  for (const Buffer& b : plan.buffers) {
    buffers.push_back(b.output ? at::empty_strided(b.sizes, b.strides, bytes.dtype(b.dtype))
                               : view_of(block, b.dtype, b.sizes, b.strides, b.offset));
  }
  // The kernels were compiled for 16-byte aligned buffers (the block's offsets keep its own)
  auto aligned = [](const Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.storage().data()) % 16 == 0;
  };
  bool all_aligned = aligned(block);
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (plan.buffers[i].output) all_aligned = all_aligned && aligned(buffers[i]);
  }
  if (!all_aligned) {
    why = "a replay buffer was not 16-byte aligned";
    return std::nullopt;
  }
  // The CPU slot (tests) runs no kernel. Logging buffers, it fills every byte with 0xFF first,
  // so that the log says which buffers the plan's zeroing reached; then it zeroes them all, so
  // that the outputs are defined.
  const bool test_slot = device.is_cpu();
  auto all_bytes = [&](const Tensor& t) {
    return view_of(t, at::kByte, {static_cast<int64_t>(t.storage().nbytes())}, {1}, 0);
  };
  if (test_slot && log_buffers) {
    block.fill_(0xFF);
    for (size_t i = 0; i < buffers.size(); ++i) {
      if (plan.buffers[i].output) all_bytes(buffers[i]).fill_(0xFF);
    }
  }
  if (plan.zero_bytes > 0) view_of(block, at::kByte, {plan.zero_bytes}, {1}, 0).zero_();
  if (test_slot) {
    if (log_buffers) {
      const std::lock_guard<std::mutex> lock(log_mutex);
      auto& entry = buffer_log().emplace_back();
      for (size_t i = 0; i < buffers.size(); ++i) {
        const Tensor& t = buffers[i];
        const bool zeroed = t.numel() == 0 || t.eq(0).all().item<bool>();
        entry.emplace_back(t.sizes().vec(), t.strides().vec(), plan.buffers[i].dtype_name,
                           zeroed);
      }
    }
    block.zero_();
    for (size_t i = 0; i < buffers.size(); ++i) {
      if (plan.buffers[i].output) all_bytes(buffers[i]).zero_();
    }
  }
  std::array<uint64_t, kMaxParams> slots;
  std::array<void*, kMaxParams> params;
  int64_t launched = 0;
  for (const Launch& l : plan.launches) {
    if (l.grid[0] == 0 || l.grid[1] == 0 || l.grid[2] == 0) continue;  // as Triton's launcher
    const int n = static_cast<int>(l.params.size());
    for (int i = 0; i < n; ++i) {
      slots[i] = slot_of(l.params[i], inputs, buffers);
      params[i] = &slots[i];
    }
    const int rc = launch(l.function, l.grid.data(), l.threads, l.shared, params.data(), n, device);
    if (rc != 0 && launched == 0 && is_context_error(rc)) {
      // An error the context already held (an earlier kernel's illegal address, say) surfaces at
      // the next launch: not this plan's fault, so the call fails and the plan stays.
      throw ContextError("mitkernels launch plan: the CUDA context reported CUresult " +
                         std::to_string(rc) + " at the replay's first launch, before any of its "
                         "kernels ran: an earlier kernel's error (an illegal address, a failed "
                         "launch) surfaces at the next launch");
    }
    if (rc != 0 && launched == 0) {
      why = "the driver refused the replay's first launch (CUresult " + std::to_string(rc) +
            "); the call took the Python launchers";
      return std::nullopt;
    }
    TORCH_CHECK(rc == 0, "mitkernels launch plan: the driver refused launch ", launched + 1,
                " of the replay (CUresult ", rc, ") after its earlier kernels were queued");
    launched++;
  }
  std::vector<Tensor> out;
  out.reserve(plan.outputs.size());
  for (int64_t i : plan.outputs) out.push_back(buffers[i]);
  return out;
}

// --- Python side (launch_plans.py) ------------------------------------------------------------
using PyParam = std::tuple<int, int64_t, int64_t, double>;
using PyLaunch = std::tuple<uint64_t, std::vector<int64_t>, int64_t, int64_t, std::vector<PyParam>>;

bool put(std::shared_ptr<const Plan> plan) {
  TORCH_CHECK(pending != nullptr, "launch plan: no call of this thread is being recorded");
  Store& s = store();
  const std::lock_guard<std::mutex> lock(s.mutex);
  const bool room = s.plans.size() < kMaxPlans;
  if (room) s.plans[*pending] = std::move(plan);
  pending = nullptr;  // one plan a recorded call
  return room;
}

// Counts a refusal and keeps its reason; the store's mutex is held.
void note_refusal(Store& s, const std::string& reason) {
  s.last_refusal = reason;
  s.refused++;
}

// Keeps `key`'s calls on Python from now on (a replay that could not run), saying why.
void retire(const Key& key, const std::string& reason) {
  Store& s = store();
  const std::lock_guard<std::mutex> lock(s.mutex);
  s.plans[key] = nullptr;
  note_refusal(s, reason);
}

void store_plan(int64_t num_inputs, const std::vector<BufferSpec>& buffers,
                const std::vector<PyLaunch>& launches, const std::vector<int64_t>& outputs) {
  auto plan = std::make_shared<Plan>();
  plan->num_inputs = num_inputs;
  for (const auto& [sizes, strides, dtype, zero] : buffers) {
    TORCH_CHECK_VALUE(sizes.size() == strides.size(),
                      "launch plan: buffer sizes and strides differ in length");
    plan->buffers.push_back({sizes, strides, dtype_from_name(dtype), zero, dtype, 0, 0});
  }
  const auto nbuf = static_cast<int64_t>(plan->buffers.size());
  for (int64_t i : outputs) {
    TORCH_CHECK_VALUE(i >= 0 && i < nbuf, "launch plan: output buffer ", i, " of ", nbuf);
    plan->buffers[i].output = true;
  }
  // The scratch block's layout: the buffers that are not outputs, zeroed ones first (one
  // memset), each at a multiple of kAlign. Outputs are allocated one by one: a view of a shared
  // block would keep all of it alive (tau.grad, one number, held the logits' gradient).
  int64_t end = 0;
  for (bool zeroed : {true, false}) {
    for (Buffer& b : plan->buffers) {
      if (b.zero != zeroed) continue;
      int64_t span = 1;  // elements from the first to the last one it addresses
      for (size_t d = 0; d < b.sizes.size(); ++d) {
        TORCH_CHECK_VALUE(b.sizes[d] >= 0 && b.strides[d] >= 0, "launch plan: buffer layout");
        if (b.sizes[d] == 0) span = 0;
        if (span > 0) span += (b.sizes[d] - 1) * b.strides[d];
      }
      b.bytes = span * static_cast<int64_t>(c10::elementSize(b.dtype));
      if (b.output) continue;
      b.offset = (end + kAlign - 1) / kAlign * kAlign;
      end = b.offset + b.bytes;
    }
    if (zeroed) plan->zero_bytes = end;
  }
  plan->block_bytes = end;
  for (const auto& [function, grid, threads, shared, params] : launches) {
    TORCH_CHECK_VALUE(grid.size() == 3, "launch plan: a grid has 3 dimensions");
    TORCH_CHECK_VALUE(params.size() <= static_cast<size_t>(kMaxParams), "launch plan: ",
                      params.size(), " parameters, more than ", kMaxParams);
    Launch l{function, {}, static_cast<uint32_t>(threads), static_cast<uint32_t>(shared), {}};
    for (int d = 0; d < 3; ++d) {
      TORCH_CHECK_VALUE(grid[d] >= 0 && grid[d] <= UINT32_MAX, "launch plan: grid ", grid[d]);
      l.grid[d] = static_cast<uint32_t>(grid[d]);
    }
    for (const auto& [kind, index, value, fvalue] : params) {
      TORCH_CHECK_VALUE(kind >= kInput && kind <= kNull, "launch plan: parameter kind ", kind);
      TORCH_CHECK_VALUE(kind != kInput || (index >= 0 && index < num_inputs && value == 0),
                        "launch plan: input ", index, " of ", num_inputs, " at ", value);
      TORCH_CHECK_VALUE(kind != kBuffer || (index >= 0 && index < nbuf),
                        "launch plan: buffer ", index, " of ", nbuf);
      // a view's offset lies inside its buffer (an empty buffer's pointer is its start)
      TORCH_CHECK_VALUE(kind != kBuffer || (value >= 0 && (value < plan->buffers[index].bytes ||
                                                           value == 0)),
                        "launch plan: buffer ", index, " at byte ", value);
      l.params.push_back({kind, index, value, fvalue});
    }
    plan->launches.push_back(std::move(l));
  }
  plan->outputs = outputs;
  if (put(std::move(plan))) store().recorded++;
}

void refuse(const std::string& reason) {
  if (!put(nullptr)) return;
  Store& s = store();
  const std::lock_guard<std::mutex> lock(s.mutex);
  note_refusal(s, reason);
}

pybind11::dict info() {
  Store& s = store();
  pybind11::dict d;
  const std::lock_guard<std::mutex> lock(s.mutex);
  d["plans"] = s.plans.size();
  d["hits"] = s.hits.load();
  d["recorded"] = s.recorded.load();
  d["refused"] = s.refused.load();
  d["last_refusal"] = s.last_refusal;
  return d;
}

void clear() {
  Store& s = store();
  const std::lock_guard<std::mutex> lock(s.mutex);
  s.plans.clear();
  s.last_refusal.clear();
  s.hits = 0;
  s.recorded = 0;
  s.refused = 0;
}

void test_launcher(bool enable, bool buffers) {
  launcher(c10::kCPU) = enable ? &logging_launcher : nullptr;
  log_buffers = buffers;
  const std::lock_guard<std::mutex> lock(log_mutex);
  launch_log().clear();
  buffer_log().clear();
  refuse_after = -1;
}

void test_refuse(int64_t after, int64_t times, int code) {
  const std::lock_guard<std::mutex> lock(log_mutex);
  refuse_after = after;
  refuse_times = times;
  refuse_code = code;
}

// A logged launch for Python: function, grid, threads, shared bytes, parameter slots.
using LaunchRecord =
    std::tuple<uint64_t, std::vector<int64_t>, int64_t, int64_t, std::vector<uint64_t>>;

std::vector<LaunchRecord> test_log() {
  const std::lock_guard<std::mutex> lock(log_mutex);
  std::vector<LaunchRecord> out;
  for (const auto& e : launch_log()) {
    out.emplace_back(e.function, std::vector<int64_t>{e.grid[0], e.grid[1], e.grid[2]}, e.threads,
                     e.shared, e.params);
  }
  launch_log().clear();
  return out;
}

std::vector<std::vector<BufferSpec>> test_buffers() {
  const std::lock_guard<std::mutex> lock(log_mutex);
  auto out = std::move(buffer_log());
  buffer_log().clear();
  return out;
}

}  // namespace

Launcher& launcher(c10::DeviceType type) {
  static Launcher cuda = nullptr, cpu = nullptr;
  return type == c10::kCUDA ? cuda : cpu;
}

Probe& launcher_probe(c10::DeviceType type) {
  static Probe cuda = nullptr, cpu = nullptr;
  return type == c10::kCUDA ? cuda : cpu;
}

bool requested() {
  const char* env = std::getenv("MITKERNELS_TRITON_LAUNCH");
  const std::string choice = env == nullptr ? "" : env;
  TORCH_CHECK_VALUE(choice.empty() || choice == "python" || choice == "cpp",
                    "MITKERNELS_TRITON_LAUNCH must be python or cpp, got '", choice, "'");
  return choice == "cpp";
}

bool usable(const at::Tensor& logits) {
  const c10::DeviceType type = logits.device().type();
  // The variable is checked on every Triton step, so a typo fails whatever the device.
  if (!requested() || (type != c10::kCUDA && type != c10::kCPU) || launcher(type) == nullptr) {
    return false;
  }
  const Probe probe = launcher_probe(type);
  return probe == nullptr || probe();
}

int64_t bits(double v) {
  int64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

Key make_key(Op op, at::TensorList inputs, const std::vector<int64_t>& scalars) {
  Key k;
  k.reserve(8 + inputs.size() * 12 + scalars.size());
  k.push_back(static_cast<int64_t>(op));
  k.push_back(static_cast<int64_t>(inputs[0].device().type()));
  k.push_back(inputs[0].device().index());
  k.push_back(static_cast<int64_t>(inputs.size()));
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    const auto ptr = reinterpret_cast<uintptr_t>(t.data_ptr());
    k.push_back(static_cast<int64_t>(t.scalar_type()));
    k.push_back(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) k.push_back(t.size(d));
    for (int64_t d = 0; d < t.dim(); ++d) k.push_back(t.stride(d));
    k.push_back(ptr % 16 == 0);  // Triton compiles aligned and unaligned pointers apart
    // A replay passes pointers straight to the driver, with no device check of its own: an
    // input elsewhere (a CPU tensor, another GPU) is another signature, left to the launchers,
    // which refuse it by name, rather than a plan that would fault the context.
    k.push_back(t.device() == inputs[0].device());
    // Which earlier input shares this pointer (a plan maps inputs by position).
    int64_t alias = -1;
    for (size_t j = 0; j < i && alias < 0; ++j) {
      if (reinterpret_cast<uintptr_t>(inputs[j].data_ptr()) == ptr) alias = static_cast<int64_t>(j);
    }
    k.push_back(alias);
  }
  k.push_back(static_cast<int64_t>(scalars.size()));
  k.insert(k.end(), scalars.begin(), scalars.end());
  return k;
}

std::optional<std::vector<Tensor>> replay(const Key& key, at::TensorList inputs) {
  Store& s = store();
  std::shared_ptr<const Plan> plan;
  {
    const std::lock_guard<std::mutex> lock(s.mutex);
    const auto it = s.plans.find(key);
    if (it == s.plans.end() || it->second == nullptr) return std::nullopt;
    plan = it->second;
  }
  TORCH_CHECK(plan->num_inputs == static_cast<int64_t>(inputs.size()),
              "launch plan: recorded for ", plan->num_inputs, " inputs, called with ", inputs.size());
  std::optional<std::vector<Tensor>> out;
  std::string why;
  try {
    out = run(*plan, inputs, why);
  } catch (const ContextError&) {
    throw;  // the context's error, not the plan's: the plan stays
  } catch (const std::exception& err) {
    // A launch the driver refused after others ran (or an allocation that failed): this call
    // fails, later calls with the signature take the Python launchers.
    retire(key, std::string("replay failed: ") + err.what());
    throw;
  }
  if (!out) {  // nothing ran: this call and later ones take the Python launchers
    retire(key, why);
    return std::nullopt;
  }
  s.hits++;
  return out;
}

bool known(const Key& key) {
  Store& s = store();
  const std::lock_guard<std::mutex> lock(s.mutex);
  return s.plans.count(key) > 0 || s.plans.size() >= kMaxPlans;
}

Recording::Recording(const Key& key) { pending = known(key) ? nullptr : &key; }
Recording::~Recording() { pending = nullptr; }

void bind(pybind11::module_& m) {
  m.def("_triton_plan_pending", [] { return pending != nullptr; },
        "Whether this thread's current Triton op call is to be recorded as a launch plan.");
  m.def("_triton_plan_store", &store_plan, "Store the launch plan of the call being recorded.");
  m.def("_triton_plan_refuse", &refuse,
        "Keep the recorded call's signature on the Python launchers, saying why.");
  m.def("_triton_plan_info", &info, "Counts of the launch plan store.");
  m.def("_triton_plan_clear", &clear, "Forget every launch plan (tile tables changed, tests).");
  m.def("_triton_plan_test_launcher", &test_launcher, pybind11::arg("enable"),
        pybind11::arg("buffers") = true,
        "Tests: launch plans of CPU tensors go to a launcher that logs their parameters (and, "
        "with buffers, each replay's buffers, checked for the zeroing).");
  m.def("_triton_plan_test_refuse", &test_refuse, pybind11::arg("after"),
        pybind11::arg("times") = 1, pybind11::arg("code") = 1,
        "Tests: the test launcher refuses `times` launches after `after` more (-1: none), "
        "returning `code` as the driver would.");
  m.def("_triton_plan_test_log", &test_log, "Tests: the logged launches, oldest first (then cleared).");
  m.def("_triton_plan_test_buffers", &test_buffers,
        "Tests: each logged replay's buffers (sizes, strides, dtype, zero), oldest first (then cleared).");
  m.def("_triton_plan_test_key",
        [](const std::vector<Tensor>& inputs) { return make_key(Op::kForward, inputs, {}); },
        "Tests: the forward's plan key of `inputs` (no scalars).");
}

}  // namespace plans
}  // namespace mitk
