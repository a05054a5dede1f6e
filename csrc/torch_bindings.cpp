// The one file of flashmoe_py._C that includes torch: argument checks and Python bindings.
// The torch-free cores live beside it (ep_signal.cpp; ep_device.cu where CUDA is built).
#include <torch/extension.h>

#include <cstdint>
#include <tuple>

#include "ep_signal.h"

#ifdef FLASHMOE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "ep_signal_cuda.h"
#endif

namespace {

uint64_t* word_ptr(int64_t address, const char* what) {
  TORCH_CHECK(address != 0, what, ": null address");
  TORCH_CHECK(address % 8 == 0, what, ": address ", address, " is not 8-byte aligned");
  return reinterpret_cast<uint64_t*>(address);
}

// values [n] int64 CPU -> release-stored into the n words at `address` (a mapped peer segment).
void store_release(int64_t address, const torch::Tensor& values) {
  TORCH_CHECK(values.device().is_cpu(), "values: expected a CPU tensor, got ", values.device());
  TORCH_CHECK(values.scalar_type() == torch::kInt64, "values: expected int64, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values: expected a contiguous 1-D tensor");
  auto v = values.contiguous();
  flashmoe::store_release(word_ptr(address, "store_release"), reinterpret_cast<const uint64_t*>(v.data_ptr<int64_t>()),
                          v.numel());
}

// Wait for n words at `address` to carry sequence `seq`. Returns (index of the first missing word or -1,
// seen [n] int64). The GIL is released while waiting so other Python threads keep running.
std::tuple<int64_t, torch::Tensor> wait_signals(int64_t address, int64_t n, int64_t seq, double timeout_s) {
  TORCH_CHECK(n >= 0, "n: must be >= 0, got ", n);
  TORCH_CHECK(seq > 0 && seq < (int64_t{1} << 31), "seq: must lie in [1, 2^31), got ", seq);
  TORCH_CHECK(timeout_s > 0, "timeout_s: must be > 0, got ", timeout_s);
  auto seen = torch::empty({n}, torch::kInt64);
  const uint64_t* words = word_ptr(address, "wait_signals");
  auto* out = reinterpret_cast<uint64_t*>(seen.data_ptr<int64_t>());
  int64_t missing;
  {
    pybind11::gil_scoped_release no_gil;
    missing = flashmoe::wait_signals(words, n, static_cast<uint64_t>(seq), static_cast<int64_t>(timeout_s * 1e9), out);
  }
  return {missing, seen};
}

#ifdef FLASHMOE_WITH_CUDA
// values [n] int64 on the GPU -> release-stored (system scope) into the n words at `address` (local or
// peer-mapped device memory), ordered after earlier work on the current stream.
void cuda_store_release(int64_t address, const torch::Tensor& values) {
  TORCH_CHECK(values.is_cuda(), "values: expected a CUDA tensor, got ", values.device());
  TORCH_CHECK(values.scalar_type() == torch::kInt64, "values: expected int64, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values: expected a contiguous 1-D tensor");
  const c10::cuda::CUDAGuard guard(values.device());
  auto err = flashmoe::launch_store_release(word_ptr(address, "cuda_store_release"), values.data_ptr<int64_t>(),
                                            values.numel(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cuda_store_release: ", cudaGetErrorString(err));
}

// Spin on the device until n words at `address` carry `seq` or timeout_s pass. Returns (missing [] int64,
// seen [n] int64), both on `device`, filled asynchronously on the current stream; missing == n means all came.
std::tuple<torch::Tensor, torch::Tensor> cuda_wait_signals(int64_t address, int64_t n, int64_t seq, double timeout_s,
                                                           const torch::Device& device) {
  TORCH_CHECK(device.is_cuda(), "device: expected a CUDA device, got ", device);
  TORCH_CHECK(n >= 0, "n: must be >= 0, got ", n);
  TORCH_CHECK(seq > 0 && seq < (int64_t{1} << 31), "seq: must lie in [1, 2^31), got ", seq);
  TORCH_CHECK(timeout_s > 0, "timeout_s: must be > 0, got ", timeout_s);
  const c10::cuda::CUDAGuard guard(device);
  auto opts = torch::TensorOptions().dtype(torch::kInt64).device(device);
  auto seen = torch::empty({n}, opts);
  auto missing = torch::empty({}, opts);
  auto err = flashmoe::launch_wait_signals(word_ptr(address, "cuda_wait_signals"), n, static_cast<uint64_t>(seq),
                                           static_cast<int64_t>(timeout_s * 1e9), seen.data_ptr<int64_t>(),
                                           missing.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cuda_wait_signals: ", cudaGetErrorString(err));
  return {missing, seen};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashmoe_py native helpers: cross-process signal words of the CPU symmetric heap";
  m.def("store_release", &store_release, "release-store int64 values into the words at an address",
        pybind11::arg("address"), pybind11::arg("values"));
  m.def("wait_signals", &wait_signals, "acquire-spin until words carry a sequence number, with a timeout",
        pybind11::arg("address"), pybind11::arg("n"), pybind11::arg("seq"), pybind11::arg("timeout_s"));
  m.attr("signal_seq_shift") = flashmoe::kSeqShift;
#ifdef FLASHMOE_WITH_CUDA
  m.def("cuda_store_release", &cuda_store_release, "release-store (system scope) int64 values into device words",
        pybind11::arg("address"), pybind11::arg("values"));
  m.def("cuda_wait_signals", &cuda_wait_signals, "device spin until words carry a sequence number, with a timeout",
        pybind11::arg("address"), pybind11::arg("n"), pybind11::arg("seq"), pybind11::arg("timeout_s"),
        pybind11::arg("device"));
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
