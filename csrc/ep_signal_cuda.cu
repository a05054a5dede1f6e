#include "ep_signal_cuda.h"

#include <cuda/atomic>

namespace flashmoe {
namespace {

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void store_release_kernel(uint64_t* words, const int64_t* values, int64_t n) {
  // The packet's rows were written by earlier kernels on this stream, which completed before this one
  // started; the system-scope fence makes those writes visible to every observer before any signal is.
  __threadfence_system();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // System scope: the reader is another GPU (or the host) polling this word over NVLink/PCIe.
    cuda::atomic_ref<uint64_t, cuda::thread_scope_system> word(words[i]);
    word.store(static_cast<uint64_t>(values[i]), cuda::memory_order_release);
  }
}

__global__ void wait_signals_kernel(const uint64_t* words, int64_t n, uint64_t seq, int64_t timeout_ns, int64_t* seen,
                                    int64_t* missing) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *missing = n;
  __syncthreads();
  const uint64_t deadline = globaltimer_ns() + static_cast<uint64_t>(timeout_ns);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    cuda::atomic_ref<uint64_t, cuda::thread_scope_system> word(const_cast<uint64_t*>(words)[i]);
    uint64_t v = word.load(cuda::memory_order_acquire);
    while ((v >> 32) != seq && globaltimer_ns() < deadline) {
      __nanosleep(256);
      v = word.load(cuda::memory_order_acquire);
    }
    seen[i] = static_cast<int64_t>(v);
    if ((v >> 32) != seq) atomicMin(reinterpret_cast<unsigned long long*>(missing), static_cast<unsigned long long>(i));
  }
}

}  // namespace

cudaError_t launch_store_release(uint64_t* words, const int64_t* values, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int threads = 128;
  const int blocks = static_cast<int>((n + threads - 1) / threads);
  store_release_kernel<<<blocks, threads, 0, stream>>>(words, values, n);
  return cudaGetLastError();
}

cudaError_t launch_wait_signals(const uint64_t* words, int64_t n, uint64_t seq, int64_t timeout_ns, int64_t* seen,
                                int64_t* missing, cudaStream_t stream) {
  wait_signals_kernel<<<1, 256, 0, stream>>>(words, n, seq, timeout_ns, seen, missing);
  return cudaGetLastError();
}

}  // namespace flashmoe
