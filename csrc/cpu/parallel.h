// Work shared out in turn over torch's OpenMP threads (a dynamic schedule).
//
// at::parallel_for splits a range into one contiguous share per thread up front. On a shared machine a thread
// can be slowed down (its core taken by another VM for a while), and the others then wait for its share at the
// end of the region; here each thread takes the next task as it finishes one, so a slowed thread takes fewer.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace flashgen::cpu {

// body(take) on up to max_threads threads (at least 1, at most torch's thread count); take() returns the next
// task index, shared by all of them, so `for (int64_t i = take(); i < n; i = take())` runs every task once.
// Each body call sets up its own scratch before its loop.
template <class Body>
void in_turn(int64_t max_threads, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::clamp<int64_t>(max_threads, 1, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    body([&] { return next.fetch_add(1, std::memory_order_relaxed); });
  });
}

}  // namespace flashgen::cpu
