// jax_tilek launcher: one XLA FFI target, "tilek_launch", that runs any precompiled TileLang kernel.
//
// Stages (XLA FFI):
//   instantiate  decode the launch record (attributes) into a LaunchState, once per call site.
//   initialize   load the cubin into the current CUDA context, look up every entry, raise the
//                dynamic shared-memory limit. Runs before XLA records a command buffer.
//   execute      encode TMA descriptors from the buffer pointers and launch each device kernel on
//                XLA's stream (cuLaunchKernel, or cuLaunchKernelEx for clusters, PDL or cooperative
//                launches). Nothing else: no loading, no allocation, no sync,
//                so the handler is command-buffer (CUDA graph) compatible.
//   record       (jaxlib whose XLA has the FFI record stage) when XLA builds a command buffer: the same
//                launches as kernel nodes (create_launch: the cubin, dims, shared memory, the buffers as
//                device pointers and the TMA descriptors and scalars as host values), updated in place
//                when the buffers move (update_launch) instead of re-capturing a stream into a child
//                graph. Call sites it cannot express (a zero fill, a cooperative launch) ask XLA for
//                stream capture, which runs execute as before.
//
// Targets: "tilek_launch" (instantiate, initialize, execute) is registered through jax.ffi, whose
// handler dictionary has no record slot (jaxlib 0.11.2). Its twin "tilek_launch_record" adds the record
// stage and is registered straight into XLA's FFI registry (XLA_FFI_Handler_Register), with the FFI API
// pointer that XLA passes when it asks the execute handler for its metadata at registration. Opt-in:
// jax_tilek emits the twin under JAX_TILEK_RECORD=1.
//
// The launch record layout is written by jax_tilek/_record.py (encode_record); keep the two in step.
// The CUDA driver is reached through dlopen("libcuda.so.1"), so this module loads on machines without
// a GPU (where it is simply never called).

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cuda.h>
#include <dlfcn.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"
#if __has_include("xla/ffi/api/record_api.h")
#include "xla/ffi/api/record_api.h"
#define TILEK_HAS_RECORD 1
#else
#define TILEK_HAS_RECORD 0
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRecordVersion = 1;
constexpr size_t kMaxBuffers = 64;
constexpr size_t kMaxTma = 16;
constexpr size_t kMaxArgs = 128;
constexpr size_t kMaxRank = 5;

// ---------------------------------------------------------------------------------------------
// CUDA driver entry points.

struct Driver {
  CUresult (*GetErrorName)(CUresult, const char**) = nullptr;
  CUresult (*GetErrorString)(CUresult, const char**) = nullptr;
  CUresult (*CtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*CtxGetDevice)(CUdevice*) = nullptr;
  CUresult (*DeviceGetAttribute)(int*, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*ModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*FuncSetAttribute)(CUfunction, CUfunction_attribute, int) = nullptr;
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           CUstream, void**, void**) = nullptr;
  CUresult (*LaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**) = nullptr;
  CUresult (*TensorMapEncodeTiled)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                                   CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                   CUtensorMapFloatOOBfill) = nullptr;
  CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream) = nullptr;
  CUresult (*StreamIsCapturing)(CUstream, CUstreamCaptureStatus*) = nullptr;
  std::string problem;  // why the driver is unusable; empty when it is fine
};

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn& fn, std::string& problem) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (fn == nullptr && problem.empty()) problem = std::string("libcuda.so.1 has no symbol ") + name;
  return fn != nullptr;
}

const Driver& GetDriver() {
  static const Driver* driver = [] {
    auto* d = new Driver();
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      d->problem = std::string("cannot load libcuda.so.1: ") + dlerror();
      return d;
    }
    Resolve(lib, "cuGetErrorName", d->GetErrorName, d->problem);
    Resolve(lib, "cuGetErrorString", d->GetErrorString, d->problem);
    Resolve(lib, "cuCtxGetCurrent", d->CtxGetCurrent, d->problem);
    Resolve(lib, "cuCtxGetDevice", d->CtxGetDevice, d->problem);
    Resolve(lib, "cuDeviceGetAttribute", d->DeviceGetAttribute, d->problem);
    Resolve(lib, "cuModuleLoadData", d->ModuleLoadData, d->problem);
    Resolve(lib, "cuModuleGetFunction", d->ModuleGetFunction, d->problem);
    Resolve(lib, "cuFuncSetAttribute", d->FuncSetAttribute, d->problem);
    Resolve(lib, "cuLaunchKernel", d->LaunchKernel, d->problem);
    Resolve(lib, "cuLaunchKernelEx", d->LaunchKernelEx, d->problem);
    Resolve(lib, "cuTensorMapEncodeTiled", d->TensorMapEncodeTiled, d->problem);
    Resolve(lib, "cuMemsetD8Async", d->MemsetD8Async, d->problem);
    Resolve(lib, "cuStreamIsCapturing", d->StreamIsCapturing, d->problem);
    return d;
  }();
  return *driver;
}

// An error result for functions returning ffi::ErrorOr<T>.
ffi::Unexpected<ffi::Error> Fail(ffi::ErrorCode code, std::string message) {
  return ffi::Unexpected(ffi::Error(code, std::move(message)));
}

std::string DescribeCuda(CUresult r) {
  const Driver& d = GetDriver();
  const char* name = "unknown CUDA error";
  const char* text = "";
  if (d.GetErrorName) d.GetErrorName(r, &name);
  if (d.GetErrorString) d.GetErrorString(r, &text);
  std::ostringstream s;
  s << name << " (" << static_cast<int>(r) << "): " << text;
  return s.str();
}

// ---------------------------------------------------------------------------------------------
// The decoded launch record.

enum ArgKind : int64_t { kBufferArg = 0, kTmaArg = 1, kScalarArg = 2 };

struct Arg {
  int64_t kind;
  int64_t a;  // buffer index | TMA index | scalar size in bytes
  int64_t b;  // byte offset  | unused    | scalar bits (little-endian, low `a` bytes)
};

struct TmaRecipe {
  int64_t buffer;
  int64_t byte_offset;
  CUtensorMapDataType dtype;
  cuuint32_t rank;
  cuuint64_t dims[kMaxRank];
  cuuint64_t strides[kMaxRank - 1];
  cuuint32_t box[kMaxRank];
  cuuint32_t element_strides[kMaxRank];
  CUtensorMapInterleave interleave;
  CUtensorMapSwizzle swizzle;
  CUtensorMapL2promotion l2_promotion;
  CUtensorMapFloatOOBfill oob_fill;
};

struct KernelLaunch {
  std::string entry;
  unsigned grid[3];
  unsigned block[3];
  unsigned cluster[3];
  unsigned smem;
  bool pdl;
  bool cooperative;
  std::vector<Arg> args;
};

// Opt-in counters (JAX_TILEK_LAUNCH_STATS=1 when a call site is instantiated): how often execute ran,
// and how often it ran while XLA was capturing a CUDA graph. Replays of a captured graph do not call
// execute at all, which is what makes command-buffer capture observable from tests.
// Also the host time spent in execute, and in its TMA descriptor encoding, in nanoseconds.
std::atomic<int64_t> g_executions{0};
std::atomic<int64_t> g_captured_executions{0};
std::atomic<int64_t> g_execute_ns{0};
std::atomic<int64_t> g_encode_ns{0};
std::atomic<int64_t> g_launch_ns{0};  // of execute's time, in the driver's launch calls
std::atomic<int64_t> g_records{0};  // record-stage calls that created or updated kernel nodes
std::atomic<bool> g_record_target{false};  // "tilek_launch_record" registered (RegisterRecordTarget)

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Adds the time since its construction to `total` when `on`.
class HostTimer {
 public:
  HostTimer(bool on, std::atomic<int64_t>& total) : on_(on), total_(total), start_(on ? NowNs() : 0) {}
  ~HostTimer() {
    if (on_) total_.fetch_add(NowNs() - start_, std::memory_order_relaxed);
  }

 private:
  bool on_;
  std::atomic<int64_t>& total_;
  int64_t start_;
};

struct LaunchState {
  static ffi::TypeId id;

  bool count_stats = false;
  std::string name;       // the op or kernel name, for error messages
  std::string cubin;      // the module image
  std::string cubin_key;  // content hash of the image, keys the per-context module cache
  int64_t num_buffers = 0;
  std::vector<int64_t> zero_fill;
  std::vector<TmaRecipe> tma;
  std::vector<KernelLaunch> kernels;

  std::mutex mu;
  std::vector<std::pair<CUcontext, std::vector<CUfunction>>> functions;  // per CUDA context
  // The first context's functions, readable without the lock once `first_context` is published.
  std::atomic<CUcontext> first_context{nullptr};
  std::vector<CUfunction> first_functions;

  std::string Where(const KernelLaunch* k = nullptr) const {
    std::string s = "jax_tilek kernel '" + name + "'";
    if (k != nullptr) s += " (entry " + k->entry + ")";
    return s;
  }
};

ffi::TypeId LaunchState::id = {};

class Reader {
 public:
  explicit Reader(ffi::Span<const int64_t> data) : data_(data) {}
  bool ok() const { return ok_; }
  int64_t Next() {
    if (pos_ >= data_.size()) {
      ok_ = false;
      return 0;
    }
    return data_[pos_++];
  }
  bool AtEnd() const { return pos_ == data_.size(); }

 private:
  ffi::Span<const int64_t> data_;
  size_t pos_ = 0;
  bool ok_ = true;
};

ffi::Error Invalid(const LaunchState& st, const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, st.Where() + ": bad launch record: " + what);
}

ffi::Error DecodeRecord(ffi::Span<const int64_t> record, std::string_view entries, LaunchState& st) {
  Reader r(record);
  if (r.Next() != kRecordVersion) return Invalid(st, "unsupported record version");
  st.num_buffers = r.Next();
  const int64_t num_zero = r.Next();
  const int64_t num_tma = r.Next();
  const int64_t num_kernels = r.Next();
  if (!r.ok() || st.num_buffers < 0 || st.num_buffers > static_cast<int64_t>(kMaxBuffers) || num_zero < 0 ||
      num_tma < 0 || num_tma > static_cast<int64_t>(kMaxTma) || num_kernels < 0) {
    return Invalid(st, "header out of range");
  }
  for (int64_t i = 0; i < num_zero; ++i) st.zero_fill.push_back(r.Next());
  for (int64_t i = 0; i < num_tma; ++i) {
    TmaRecipe t{};
    t.buffer = r.Next();
    t.byte_offset = r.Next();
    t.dtype = static_cast<CUtensorMapDataType>(r.Next());
    t.rank = static_cast<cuuint32_t>(r.Next());
    if (t.rank < 1 || t.rank > kMaxRank) return Invalid(st, "TMA rank out of range");
    for (cuuint32_t d = 0; d < t.rank; ++d) t.dims[d] = static_cast<cuuint64_t>(r.Next());
    for (cuuint32_t d = 0; d + 1 < t.rank; ++d) t.strides[d] = static_cast<cuuint64_t>(r.Next());
    for (cuuint32_t d = 0; d < t.rank; ++d) t.box[d] = static_cast<cuuint32_t>(r.Next());
    for (cuuint32_t d = 0; d < t.rank; ++d) t.element_strides[d] = static_cast<cuuint32_t>(r.Next());
    t.interleave = static_cast<CUtensorMapInterleave>(r.Next());
    t.swizzle = static_cast<CUtensorMapSwizzle>(r.Next());
    t.l2_promotion = static_cast<CUtensorMapL2promotion>(r.Next());
    t.oob_fill = static_cast<CUtensorMapFloatOOBfill>(r.Next());
    if (t.buffer < 0 || t.buffer >= st.num_buffers) return Invalid(st, "TMA buffer index out of range");
    st.tma.push_back(t);
  }
  std::vector<std::string> names;
  for (size_t start = 0; !entries.empty() && start <= entries.size();) {
    size_t end = entries.find(';', start);
    if (end == std::string_view::npos) end = entries.size();
    names.emplace_back(entries.substr(start, end - start));
    start = end + 1;
  }
  if (static_cast<int64_t>(names.size()) != num_kernels) return Invalid(st, "entry names do not match kernels");
  for (int64_t i = 0; i < num_kernels; ++i) {
    KernelLaunch k{};
    k.entry = names[i];
    for (unsigned& g : k.grid) g = static_cast<unsigned>(r.Next());
    for (unsigned& b : k.block) b = static_cast<unsigned>(r.Next());
    k.smem = static_cast<unsigned>(r.Next());
    for (unsigned& c : k.cluster) c = static_cast<unsigned>(r.Next());
    const int64_t flags = r.Next();
    k.pdl = (flags & 1) != 0;
    k.cooperative = (flags & 2) != 0;
    const int64_t num_args = r.Next();
    if (!r.ok() || num_args < 0 || num_args > static_cast<int64_t>(kMaxArgs)) return Invalid(st, "too many args");
    for (int64_t j = 0; j < num_args; ++j) {
      Arg a{r.Next(), r.Next(), r.Next()};
      const bool good = (a.kind == kBufferArg && a.a >= 0 && a.a < st.num_buffers) ||
                        (a.kind == kTmaArg && a.a >= 0 && a.a < num_tma) ||
                        (a.kind == kScalarArg && (a.a == 1 || a.a == 2 || a.a == 4 || a.a == 8));
      if (!good) return Invalid(st, "bad argument in " + k.entry);
      k.args.push_back(a);
    }
    st.kernels.push_back(std::move(k));
  }
  for (int64_t z : st.zero_fill) {
    if (z < 0 || z >= st.num_buffers) return Invalid(st, "zero-fill index out of range");
  }
  if (!r.ok() || !r.AtEnd()) return Invalid(st, "record length mismatch");
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Module loading: one CUmodule per (context, cubin), shared by every call site of that cubin.

std::mutex module_mu;
std::vector<std::pair<std::pair<CUcontext, std::string>, CUmodule>>& Modules() {
  static auto* modules = new std::vector<std::pair<std::pair<CUcontext, std::string>, CUmodule>>();
  return *modules;
}

ffi::ErrorOr<CUmodule> LoadModule(CUcontext ctx, const LaunchState& st) {
  std::lock_guard<std::mutex> lock(module_mu);
  for (auto& [key, mod] : Modules()) {
    if (key.first == ctx && key.second == st.cubin_key) return mod;
  }
  CUmodule mod;
  CUresult r = GetDriver().ModuleLoadData(&mod, st.cubin.data());
  if (r != CUDA_SUCCESS) {
    return Fail(ffi::ErrorCode::kInternal,
                      st.Where() + ": cuModuleLoadData failed: " + DescribeCuda(r) +
                          " (was the cubin built for this GPU's architecture?)");
  }
  Modules().push_back({{ctx, st.cubin_key}, mod});
  return mod;
}

ffi::ErrorOr<std::vector<CUfunction>> LoadFunctions(CUcontext ctx, const LaunchState& st) {
  const Driver& d = GetDriver();
  auto mod = LoadModule(ctx, st);
  if (mod.has_error()) return ffi::Unexpected(mod.error());
  CUdevice dev;
  int smem_optin = 0;
  if (d.CtxGetDevice(&dev) == CUDA_SUCCESS) {
    d.DeviceGetAttribute(&smem_optin, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev);
  }
  std::vector<CUfunction> fns;
  for (const KernelLaunch& k : st.kernels) {
    CUfunction fn;
    CUresult r = d.ModuleGetFunction(&fn, mod.value(), k.entry.c_str());
    if (r != CUDA_SUCCESS) {
      return Fail(ffi::ErrorCode::kInternal, st.Where(&k) + ": cuModuleGetFunction failed: " + DescribeCuda(r));
    }
    if (smem_optin > 0 && k.smem > static_cast<unsigned>(smem_optin)) {
      return Fail(ffi::ErrorCode::kResourceExhausted,
                        st.Where(&k) + ": needs " + std::to_string(k.smem) +
                            " bytes of dynamic shared memory, this GPU allows " + std::to_string(smem_optin));
    }
    if (k.smem > 0) {
      r = d.FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(k.smem));
      if (r != CUDA_SUCCESS) {
        return Fail(ffi::ErrorCode::kInternal,
                          st.Where(&k) + ": setting the dynamic shared-memory limit failed: " + DescribeCuda(r));
      }
    }
    if (k.cluster[0] * k.cluster[1] * k.cluster[2] > 8) {
      r = d.FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1);
      if (r != CUDA_SUCCESS) {
        return Fail(ffi::ErrorCode::kInternal,
                          st.Where(&k) + ": allowing a non-portable cluster size failed: " + DescribeCuda(r));
      }
    }
    fns.push_back(fn);
  }
  return fns;
}

ffi::ErrorOr<CUcontext> CurrentContext(const LaunchState& st) {
  const Driver& d = GetDriver();
  if (!d.problem.empty()) return Fail(ffi::ErrorCode::kFailedPrecondition, st.Where() + ": " + d.problem);
  CUcontext ctx = nullptr;
  CUresult r = d.CtxGetCurrent(&ctx);
  if (r != CUDA_SUCCESS || ctx == nullptr) {
    return Fail(ffi::ErrorCode::kFailedPrecondition, st.Where() + ": no current CUDA context");
  }
  return ctx;
}

// Returns the entry functions for the current context, loading the module on first use in it.
// `capturing` only sharpens the error message: a load normally happens in the initialize stage,
// before XLA records a command buffer.
ffi::ErrorOr<const std::vector<CUfunction>*> Functions(LaunchState& st, bool capturing) {
  auto ctx = CurrentContext(st);
  if (ctx.has_error()) return ffi::Unexpected(ctx.error());
  if (st.first_context.load(std::memory_order_acquire) == ctx.value()) return &st.first_functions;
  std::lock_guard<std::mutex> lock(st.mu);
  for (auto& [c, fns] : st.functions) {
    if (c == ctx.value()) return &fns;
  }
  auto fns = LoadFunctions(ctx.value(), st);
  if (fns.has_error()) {
    if (!capturing) return ffi::Unexpected(fns.error());
    return Fail(fns.error().errc().value_or(ffi::ErrorCode::kInternal), std::string(fns.error().message()) + " (while the stream was capturing a CUDA graph)");
  }
  if (st.first_context.load(std::memory_order_relaxed) == nullptr) {
    st.first_functions = std::move(fns.value());
    st.first_context.store(ctx.value(), std::memory_order_release);
    return &st.first_functions;
  }
  st.functions.push_back({ctx.value(), std::move(fns.value())});
  return &st.functions.back().second;
}

// ---------------------------------------------------------------------------------------------
// The three stages.

ffi::ErrorOr<std::unique_ptr<LaunchState>> Instantiate(std::string_view name, std::string_view cubin,
                                                       std::string_view cubin_key, std::string_view entries,
                                                       ffi::Span<const int64_t> record) {
  auto st = std::make_unique<LaunchState>();
  st->name = std::string(name);
  st->cubin = std::string(cubin);
  st->cubin_key = std::string(cubin_key);
  const char* stats = std::getenv("JAX_TILEK_LAUNCH_STATS");
  st->count_stats = stats != nullptr && stats[0] == '1';
  if (ffi::Error e = DecodeRecord(record, entries, *st); e.failure()) return ffi::Unexpected(e);
  // Load now if a CUDA context is current; otherwise the initialize stage (or first execute) does.
  CUcontext ctx = nullptr;
  if (GetDriver().problem.empty() && GetDriver().CtxGetCurrent(&ctx) == CUDA_SUCCESS && ctx != nullptr) {
    (void)Functions(*st, /*capturing=*/false);
  }
  return st;
}

ffi::Error Initialize(LaunchState* st) {
  auto fns = Functions(*st, /*capturing=*/false);
  if (fns.has_error()) return fns.error();
  return ffi::Error::Success();
}

// The call's buffers, operands then results: device addresses and sizes.
struct Buffers {
  std::array<char*, kMaxBuffers> ptrs;
  std::array<size_t, kMaxBuffers> sizes;
};

ffi::Error GatherBuffers(const LaunchState& st, ffi::RemainingArgs args, ffi::RemainingRets rets, Buffers& out) {
  const size_t num_args = args.size();
  if (static_cast<int64_t>(num_args + rets.size()) != st.num_buffers) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      st.Where() + ": expected " + std::to_string(st.num_buffers) + " buffers, got " +
                          std::to_string(num_args + rets.size()));
  }
  for (size_t i = 0; i < num_args; ++i) {
    auto buf = args.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    out.ptrs[i] = static_cast<char*>(buf.value().untyped_data());
    out.sizes[i] = buf.value().size_bytes();
  }
  for (size_t i = 0; i < rets.size(); ++i) {
    auto buf = rets.get<ffi::AnyBuffer>(i);
    if (buf.has_error()) return buf.error();
    out.ptrs[num_args + i] = static_cast<char*>(buf.value()->untyped_data());
    out.sizes[num_args + i] = buf.value()->size_bytes();
  }
  return ffi::Error::Success();
}

// The call site's TMA descriptors for these buffers, into maps[0 .. st.tma.size()).
ffi::Error EncodeTma(const LaunchState& st, const Buffers& buffers, CUtensorMap* maps) {
  const Driver& d = GetDriver();
  HostTimer encode_timer(st.count_stats && !st.tma.empty(), g_encode_ns);
  for (size_t i = 0; i < st.tma.size(); ++i) {
    const TmaRecipe& t = st.tma[i];
    CUresult r = d.TensorMapEncodeTiled(&maps[i], t.dtype, t.rank, buffers.ptrs[t.buffer] + t.byte_offset, t.dims,
                                        t.strides, t.box, t.element_strides, t.interleave, t.swizzle, t.l2_promotion,
                                        t.oob_fill);
    if (r != CUDA_SUCCESS) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        st.Where() + ": cuTensorMapEncodeTiled failed for TMA descriptor " + std::to_string(i) +
                            " (buffer " + std::to_string(t.buffer) + "): " + DescribeCuda(r));
    }
  }
  return ffi::Error::Success();
}

ffi::Error Execute(CUstream stream, LaunchState* st, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const Driver& d = GetDriver();
  HostTimer execute_timer(st->count_stats, g_execute_ns);
  if (st->count_stats) {
    g_executions.fetch_add(1, std::memory_order_relaxed);
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
    if (d.problem.empty() && d.StreamIsCapturing(stream, &capture) == CUDA_SUCCESS &&
        capture != CU_STREAM_CAPTURE_STATUS_NONE) {
      g_captured_executions.fetch_add(1, std::memory_order_relaxed);
    }
  }
  auto fns = Functions(*st, /*capturing=*/false);
  if (fns.has_error() && d.problem.empty()) {
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
    d.StreamIsCapturing(stream, &capture);
    if (capture != CU_STREAM_CAPTURE_STATUS_NONE) fns = Functions(*st, /*capturing=*/true);
  }
  if (fns.has_error()) return fns.error();

  Buffers buffers;
  if (ffi::Error e = GatherBuffers(*st, args, rets, buffers); e.failure()) return e;
  for (int64_t z : st->zero_fill) {
    if (buffers.sizes[z] == 0) continue;
    CUresult r = d.MemsetD8Async(reinterpret_cast<CUdeviceptr>(buffers.ptrs[z]), 0, buffers.sizes[z], stream);
    if (r != CUDA_SUCCESS) return ffi::Error(ffi::ErrorCode::kInternal, st->Where() + ": zero fill failed: " + DescribeCuda(r));
  }
  alignas(64) std::array<CUtensorMap, kMaxTma> maps;
  if (ffi::Error e = EncodeTma(*st, buffers, maps.data()); e.failure()) return e;

  for (size_t n = 0; n < st->kernels.size(); ++n) {
    const KernelLaunch& k = st->kernels[n];
    std::array<void*, kMaxArgs> values;
    std::array<void*, kMaxArgs> params;
    for (size_t j = 0; j < k.args.size(); ++j) {
      const Arg& a = k.args[j];
      if (a.kind == kBufferArg) {
        values[j] = buffers.ptrs[a.a] + a.b;
        params[j] = &values[j];
      } else if (a.kind == kTmaArg) {
        params[j] = &maps[a.a];
      } else {
        params[j] = const_cast<int64_t*>(&a.b);
      }
    }
    CUlaunchAttribute attrs[3];
    unsigned num_attrs = 0;
    if (k.cluster[0] * k.cluster[1] * k.cluster[2] > 1) {
      attrs[num_attrs].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
      attrs[num_attrs].value.clusterDim.x = k.cluster[0];
      attrs[num_attrs].value.clusterDim.y = k.cluster[1];
      attrs[num_attrs].value.clusterDim.z = k.cluster[2];
      ++num_attrs;
    }
    if (k.pdl) {
      attrs[num_attrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attrs[num_attrs].value.programmaticStreamSerializationAllowed = 1;
      ++num_attrs;
    }
    if (k.cooperative) {
      attrs[num_attrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
      attrs[num_attrs].value.cooperative = 1;
      ++num_attrs;
    }
    CUresult r;
    HostTimer launch_timer(st->count_stats, g_launch_ns);
    if (num_attrs == 0) {  // the plain launch, as XLA's own kernels use
      r = d.LaunchKernel((*fns.value())[n], k.grid[0], k.grid[1], k.grid[2], k.block[0], k.block[1], k.block[2],
                         k.smem, stream, params.data(), nullptr);
      if (r != CUDA_SUCCESS) {
        return ffi::Error(ffi::ErrorCode::kInternal, st->Where(&k) + ": cuLaunchKernel failed: " + DescribeCuda(r));
      }
      continue;
    }
    CUlaunchConfig config{};
    config.gridDimX = k.grid[0];
    config.gridDimY = k.grid[1];
    config.gridDimZ = k.grid[2];
    config.blockDimX = k.block[0];
    config.blockDimY = k.block[1];
    config.blockDimZ = k.block[2];
    config.sharedMemBytes = k.smem;
    config.hStream = stream;
    config.attrs = attrs;
    config.numAttrs = num_attrs;
    r = d.LaunchKernelEx(&config, (*fns.value())[n], params.data(), nullptr);
    if (r != CUDA_SUCCESS) {
      return ffi::Error(ffi::ErrorCode::kInternal, st->Where(&k) + ": cuLaunchKernelEx failed: " + DescribeCuda(r));
    }
  }
  return ffi::Error::Success();
}


#if TILEK_HAS_RECORD
// The record stage's context, decoded from XLA's record extension with the header-only error policy.
using RecordContext = ffi::internal::RecordContextBase<ffi::internal::ErrorPolicy>;
struct RecordExtension : ffi::internal::RecordExtensionBase<RecordContext> {};

// Whether kernel nodes can carry this call site: the record API has no memset and no cooperative launch.
bool Recordable(const LaunchState& st) {
  if (!st.zero_fill.empty()) return false;
  for (const KernelLaunch& k : st.kernels) {
    if (k.cooperative) return false;
  }
  return true;
}

ffi::Error Record(RecordContext rec, LaunchState* st, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (!Recordable(*st)) return rec.RequestStreamCapture();
  HostTimer execute_timer(st->count_stats, g_execute_ns);
  Buffers buffers;
  if (ffi::Error e = GatherBuffers(*st, args, rets, buffers); e.failure()) return e;
  alignas(64) std::array<CUtensorMap, kMaxTma> maps;
  if (ffi::Error e = EncodeTma(*st, buffers, maps.data()); e.failure()) return e;

  const bool create = rec.action() == ffi::RecordAction::kCreate;
  ffi::BoundedCommandVector commands = rec.commands();
  if (st->kernels.empty()) {  // nothing to launch: one empty node for XLA to depend on
    if (!create) return ffi::Error::Success();
    auto cmd = rec.CreateEmptyCommand();
    return cmd.has_error() ? cmd.error() : ffi::Error::Success();
  }
  if (!create && commands.size() != static_cast<int64_t>(st->kernels.size())) {
    return ffi::Error(ffi::ErrorCode::kInternal, st->Where() + ": the command buffer holds " +
                                                     std::to_string(commands.size()) + " of its " +
                                                     std::to_string(st->kernels.size()) + " launches");
  }
  const XLA_FFI_Command* previous = nullptr;
  for (size_t n = 0; n < st->kernels.size(); ++n) {
    const KernelLaunch& k = st->kernels[n];
    std::vector<ffi::KernelArg> kargs;
    kargs.reserve(k.args.size());
    for (const Arg& a : k.args) {
      if (a.kind == kBufferArg) {
        kargs.push_back(ffi::DevicePointer{buffers.ptrs[a.a] + a.b});
      } else if (a.kind == kTmaArg) {
        kargs.push_back(ffi::HostValue{&maps[a.a], sizeof(CUtensorMap)});
      } else {
        kargs.push_back(ffi::HostValue{&a.b, static_cast<size_t>(a.a)});
      }
    }
    if (!create) {
      if (ffi::Error e = rec.UpdateLaunch(commands[n], kargs); e.failure()) return e;
      continue;
    }
    const bool clustered = k.cluster[0] * k.cluster[1] * k.cluster[2] > 1;
    auto dim3 = [](const unsigned* v) {
      return XLA_FFI_Dim3{static_cast<int32_t>(v[0]), static_cast<int32_t>(v[1]), static_cast<int32_t>(v[2])};
    };
    XLA_FFI_LaunchDims dims{dim3(k.grid), dim3(k.block), clustered ? dim3(k.cluster) : XLA_FFI_Dim3{0, 0, 0}};
    // The first launch depends on what XLA says it follows (no dependencies given); the others on the previous one.
    std::vector<const XLA_FFI_Command*> after;
    if (previous != nullptr) after.push_back(previous);
    auto cmd = rec.CreateLaunch(k.entry.c_str(), st->cubin.data(), st->cubin.size(), ffi::SourceFormat::kCubin, dims,
                                k.smem, k.pdl, kargs, after);
    if (cmd.has_error()) {
      return ffi::Error(cmd.error().errc().value_or(ffi::ErrorCode::kInternal),
                        st->Where(&k) + ": recording a kernel node failed: " + std::string(cmd.error().message()));
    }
    previous = cmd.value();
  }
  if (st->count_stats) g_records.fetch_add(1, std::memory_order_relaxed);
  return ffi::Error::Success();
}
#endif

}  // namespace

XLA_FFI_DEFINE_HANDLER(kTilekInstantiate, Instantiate,
                       ffi::Ffi::BindInstantiate()
                           .Attr<std::string_view>("name")        // op or kernel name, for errors
                           .Attr<std::string_view>("cubin")       // module image bytes
                           .Attr<std::string_view>("cubin_key")   // sha256 of the image
                           .Attr<std::string_view>("entries")     // entry names, ';'-separated, launch order
                           .Attr<ffi::Span<const int64_t>>("launch"));  // the launch record

XLA_FFI_DEFINE_HANDLER(kTilekInitialize, Initialize,
                       ffi::Ffi::Bind<ffi::ExecutionStage::kInitialize>().Ctx<ffi::State<LaunchState>>());

XLA_FFI_DEFINE_HANDLER(kTilekExecuteBound, Execute,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<CUstream>>()
                           .Ctx<ffi::State<LaunchState>>()
                           .RemainingArgs()
                           .RemainingRets(),
                       {ffi::Traits::kCmdBufferCompatible});

namespace {
// The FFI API of the XLA runtime that calls the execute handler (first seen; one runtime per process).
std::atomic<const XLA_FFI_Api*> g_ffi_api{nullptr};
}  // namespace

// The execute handler, noting the FFI API pointer of the call frame (also the metadata query's) on the way.
static XLA_FFI_Error* kTilekExecute(XLA_FFI_CallFrame* frame) {
  if (frame->api != nullptr && g_ffi_api.load(std::memory_order_relaxed) == nullptr) {
    g_ffi_api.store(frame->api, std::memory_order_relaxed);
  }
  return kTilekExecuteBound(frame);
}

#if TILEK_HAS_RECORD
XLA_FFI_DEFINE_HANDLER(kTilekRecord, Record,
                       ffi::Ffi::BindRecord()
                           .Ctx<ffi::Extension<RecordExtension>>()
                           .Ctx<ffi::State<LaunchState>>()
                           .RemainingArgs()
                           .RemainingRets());
#endif

// ---------------------------------------------------------------------------------------------
// Python module: capsules for jax.ffi.register_ffi_target / register_ffi_type.

namespace {

PyObject* Capsule(void* ptr) { return PyCapsule_New(ptr, nullptr, nullptr); }

PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  const std::pair<const char*, void*> stages[] = {
      {"instantiate", reinterpret_cast<void*>(kTilekInstantiate)},
      {"initialize", reinterpret_cast<void*>(kTilekInitialize)},
      {"execute", reinterpret_cast<void*>(kTilekExecute)},
  };
  for (const auto& [stage, fn] : stages) {
    PyObject* c = Capsule(fn);
    PyDict_SetItemString(d, stage, c);
    Py_DECREF(c);
  }
  return d;
}

PyObject* StateType(PyObject*, PyObject*) {
  static XLA_FFI_TypeInfo info = ffi::MakeTypeInfo<LaunchState>();
  PyObject* d = PyDict_New();
  PyObject* id = Capsule(&LaunchState::id);
  PyObject* ti = Capsule(&info);
  PyDict_SetItemString(d, "type_id", id);
  PyDict_SetItemString(d, "type_info", ti);
  Py_DECREF(id);
  Py_DECREF(ti);
  return d;
}

// Registers the launcher's handlers with the record stage under `name` for `platform`, straight into
// XLA's FFI registry. False when this launcher has no record stage or XLA has not called the execute
// handler yet (so its FFI API is unknown); raises on a registry error.
PyObject* RegisterRecordTarget(PyObject*, PyObject* py_args) {
  const char* name;
  const char* platform;
  if (!PyArg_ParseTuple(py_args, "ss", &name, &platform)) return nullptr;
#if TILEK_HAS_RECORD
  const XLA_FFI_Api* api = g_ffi_api.load();
  if (api == nullptr) Py_RETURN_FALSE;
  XLA_FFI_Handler_Register_Args args{};
  args.struct_size = XLA_FFI_Handler_Register_Args_STRUCT_SIZE;
  args.name = XLA_FFI_ByteSpan{name, std::strlen(name)};
  args.platform = XLA_FFI_ByteSpan{platform, std::strlen(platform)};
  args.bundle = XLA_FFI_Handler_Bundle{kTilekInstantiate, nullptr, kTilekInitialize, kTilekExecute, kTilekRecord};
  args.traits = XLA_FFI_HANDLER_TRAITS_COMMAND_BUFFER_COMPATIBLE;
  XLA_FFI_Error* error = api->XLA_FFI_Handler_Register(&args);
  if (error == nullptr) {
    g_record_target.store(true);
    Py_RETURN_TRUE;
  }
  XLA_FFI_Error_GetDetails_Args details{};
  details.struct_size = XLA_FFI_Error_GetDetails_Args_STRUCT_SIZE;
  details.error = error;
  api->XLA_FFI_Error_GetDetails(&details);
  std::string message = details.message != nullptr ? details.message : "(no message)";
  XLA_FFI_Error_Destroy_Args destroy{};
  destroy.struct_size = XLA_FFI_Error_Destroy_Args_STRUCT_SIZE;
  destroy.error = error;
  api->XLA_FFI_Error_Destroy(&destroy);
  PyErr_SetString(PyExc_RuntimeError, ("registering " + std::string(name) + " with XLA failed: " + message).c_str());
  return nullptr;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* DriverProblem(PyObject*, PyObject*) { return PyUnicode_FromString(GetDriver().problem.c_str()); }

PyObject* LaunchStats(PyObject*, PyObject*) {
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:O,s:O}", "executions", static_cast<long long>(g_executions.load()), "captured",
                       static_cast<long long>(g_captured_executions.load()), "execute_ns",
                       static_cast<long long>(g_execute_ns.load()), "encode_ns", static_cast<long long>(g_encode_ns.load()),
                       "launch_ns", static_cast<long long>(g_launch_ns.load()),
                       "records", static_cast<long long>(g_records.load()), "record_stage", TILEK_HAS_RECORD ? Py_True : Py_False,
                       "record_target", g_record_target.load() ? Py_True : Py_False);
}

PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS, "Stage name -> PyCapsule of the tilek_launch FFI handlers."},
    {"state_type", StateType, METH_NOARGS, "type_id/type_info PyCapsules of the launcher's FFI state."},
    {"register_record_target", RegisterRecordTarget, METH_VARARGS,
     "(name, platform): registers the handlers with the record stage straight into XLA's FFI registry."},
    {"driver_problem", DriverProblem, METH_NOARGS, "Why the CUDA driver cannot be used here ('' when it can)."},
    {"launch_stats", LaunchStats, METH_NOARGS, "Counts of execute calls (JAX_TILEK_LAUNCH_STATS=1 call sites)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_launcher", "jax_tilek's XLA FFI launcher.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__launcher() { return PyModule_Create(&kModule); }
