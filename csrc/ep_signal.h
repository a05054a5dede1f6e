// Cross-process signal words of the CPU symmetric heap (flashmoe_py/parallel/layout.py, DESIGN §5).
//
// Why this is C++: the shm transport maps every rank's heap segment into every process. A sender
// writes rows into a peer's segment and then a 64-bit signal word; the receiver spins on the word and
// then reads the rows. That needs a release store and an acquire load on memory another *process*
// writes, plus a bounded spin. Python has neither: a tensor copy_ is not an atomic store, gives no
// ordering guarantee against later stores, and a Python spin loop holds the GIL and burns a core.
// The GCC/Clang __atomic builtins on lock-free 8-byte words are address-free, so they order correctly
// across processes sharing the mapping.
//
// Torch-free on purpose: the standalone CMake test (csrc/tests/test_ep_signal.cpp) links it without torch,
// and csrc/torch_bindings.cpp is the only file that includes torch.
#pragma once

#include <cstdint>

namespace flashmoe {

// A signal word holds (sequence << 32) | count: the launch that wrote it and the rows of its packet.
constexpr int kSeqShift = 32;
constexpr uint64_t kCountMask = (uint64_t{1} << kSeqShift) - 1;

inline uint64_t make_signal(uint64_t seq, uint64_t count) { return (seq << kSeqShift) | (count & kCountMask); }
inline uint64_t signal_seq(uint64_t word) { return word >> kSeqShift; }
inline uint64_t signal_count(uint64_t word) { return word & kCountMask; }

// Store values[i] into words[i] for i < n, each a release store: every write this thread made before
// the call (the packet's rows) is visible to a process that acquire-loads the word and sees the value.
void store_release(uint64_t* words, const uint64_t* values, int64_t n);

// Acquire-load of one word.
uint64_t load_acquire(const uint64_t* word);

// Spin until signal_seq(words[i]) == seq for every i < n, or until timeout_ns elapse.
// Copies the words it saw into seen[0..n). Returns -1 when all arrived, else the index of the first
// word that had not (the caller names that slot in its error). Spins briefly, then sleeps in short
// steps so that more ranks than cores still make progress.
int64_t wait_signals(const uint64_t* words, int64_t n, uint64_t seq, int64_t timeout_ns, uint64_t* seen);

}  // namespace flashmoe
