#include "ep_signal.h"

#include <chrono>
#include <thread>

namespace flashmoe {

void store_release(uint64_t* words, const uint64_t* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) __atomic_store_n(words + i, values[i], __ATOMIC_RELEASE);
}

uint64_t load_acquire(const uint64_t* word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }

int64_t wait_signals(const uint64_t* words, int64_t n, uint64_t seq, int64_t timeout_ns, uint64_t* seen) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::nanoseconds(timeout_ns);
  int64_t next = 0;  // words before `next` have arrived; each word is written once per launch
  for (int64_t spins = 0;; ++spins) {
    while (next < n) {
      const uint64_t v = __atomic_load_n(words + next, __ATOMIC_ACQUIRE);
      seen[next] = v;
      if (signal_seq(v) != seq) break;
      ++next;
    }
    if (next == n) return -1;
    if (clock::now() >= deadline) {
      for (int64_t i = next + 1; i < n; ++i) seen[i] = __atomic_load_n(words + i, __ATOMIC_ACQUIRE);
      return next;
    }
    // A short busy phase catches a peer that is already sending; then yield the core to it.
    if (spins < 256) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(spins < 4096 ? 20 : 200));
    }
  }
}

}  // namespace flashmoe
