// Device-side signal words of the GPU symmetric heap (nvshmem transport): the CUDA twin of ep_signal.h.
//
// Why this is CUDA: a signal must become visible to a peer GPU only after the packet's rows, and a
// waiter must read the rows only after it saw the signal. Torch copies give stream order on one device
// but no system-scope release/acquire towards another GPU's loads; and a wait has to spin on the device
// with a deadline (globaltimer), which no torch op does. Torch-free: csrc/torch_bindings.cpp binds it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace flashmoe {

// Release-store values[i] (device memory) into words[i] (device or peer-mapped memory), i < n, on `stream`,
// after everything earlier on the stream (the packet's puts).
cudaError_t launch_store_release(uint64_t* words, const int64_t* values, int64_t n, cudaStream_t stream);

// On `stream`: spin until (words[i] >> 32) == seq for all i < n or timeout_ns pass (device globaltimer).
// Writes the words seen into seen[0..n) and into *missing the lowest index that did not arrive (n when all did).
cudaError_t launch_wait_signals(const uint64_t* words, int64_t n, uint64_t seq, int64_t timeout_ns, int64_t* seen,
                                int64_t* missing, cudaStream_t stream);

}  // namespace flashmoe
