// Standalone check of csrc/ep_signal.cpp across two processes (built by CMakeLists.txt, run by ctest).
// A child process writes a packet into shared memory and release-stores its signal; the parent waits
// (acquire) and must see the whole packet. Then: a wait on a word nobody writes must time out in time.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "../ep_signal.h"

namespace {

int fail(const char* what) {
  std::fprintf(stderr, "FAIL: %s\n", what);
  return 1;
}

}  // namespace

int main() {
  constexpr int kRounds = 2000, kRows = 64;
  struct Shared {
    uint64_t signal;  // producer -> consumer: (seq << 32) | rows
    uint64_t ack;     // consumer -> producer: last sequence read
    uint64_t rows[kRows];
  };
  void* mem = mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return fail("mmap");
  auto* shared = static_cast<Shared*>(mem);
  std::memset(shared, 0, sizeof(Shared));

  const pid_t child = fork();
  if (child == 0) {  // producer: rows, then the signal (release); next round after the consumer's ack
    for (uint64_t seq = 1; seq <= kRounds; ++seq) {
      while (flashmoe::load_acquire(&shared->ack) != seq - 1) {
      }
      for (int i = 0; i < kRows; ++i) shared->rows[i] = seq * 1000 + i;
      const uint64_t word = flashmoe::make_signal(seq, kRows);
      flashmoe::store_release(&shared->signal, &word, 1);
    }
    _exit(0);
  }
  for (uint64_t seq = 1; seq <= kRounds; ++seq) {
    uint64_t seen = 0;
    if (flashmoe::wait_signals(&shared->signal, 1, seq, 5'000'000'000LL, &seen) != -1) return fail("signal never came");
    if (flashmoe::signal_count(seen) != kRows) return fail("count not carried in the signal word");
    for (int i = 0; i < kRows; ++i) {
      if (shared->rows[i] != seq * 1000 + i) return fail("row read before it was written (acquire/release broken)");
    }
    const uint64_t ack = seq;
    flashmoe::store_release(&shared->ack, &ack, 1);
  }
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fail("producer process failed");

  // Nobody writes sequence 7: the wait must give up after ~50 ms and name word 0.
  uint64_t never = 0, seen = 0;
  const auto start = std::chrono::steady_clock::now();
  const int64_t missing = flashmoe::wait_signals(&never, 1, 7, 50'000'000LL, &seen);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (missing != 0) return fail("timeout did not report the missing word");
  if (ms < 45 || ms > 2000) return fail("timeout not honoured");
  std::printf("signal test passed: %d cross-process rounds, timeout after %.0f ms\n", kRounds, ms);
  munmap(mem, sizeof(Shared));
  return 0;
}
