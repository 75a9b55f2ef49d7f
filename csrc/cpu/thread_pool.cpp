// See thread_pool.h.
#include "thread_pool.h"

#include <unistd.h>

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace effattn {
namespace cpu {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Runs body(1 .. n - 1) on pool threads and body(0) here.
  void run(int n, const std::function<void(int)>& body) {
    while (static_cast<int>(threads_.size()) < n - 1) {
      const int id = static_cast<int>(threads_.size()) + 1;
      threads_.emplace_back([this, id] { loop(id); });
    }
    {
      std::lock_guard<std::mutex> g(m_);
      body_ = &body;
      active_ = n;
      pending_ = n - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    std::exception_ptr mine;
    try {
      body(0);
    } catch (...) {
      mine = std::current_exception();
    }
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return pending_ == 0; });
    body_ = nullptr;
    if (mine) std::rethrow_exception(mine);
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* body;
      {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, [&] { return stop_ || (generation_ != seen && id < active_); });
        if (stop_) return;
        seen = generation_;
        body = body_;
      }
      std::exception_ptr err;
      try {
        (*body)(id);
      } catch (...) {
        err = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> g(m_);
        if (err && !error_) error_ = err;
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* body_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

std::mutex busy;

// The pool of this process; a forked child (whose copy has no threads) makes its own. The pool is
// never destroyed: its threads may outlive static destruction at exit.
Pool& pool() {
  static Pool* p = nullptr;
  static pid_t owner = 0;
  if (p == nullptr || owner != getpid()) {
    p = new Pool();
    owner = getpid();
  }
  return *p;
}

}  // namespace

int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

void run_parallel(int threads, const std::function<void(int)>& body) {
  std::unique_lock<std::mutex> lk(busy, std::try_to_lock);
  if (threads <= 1 || !lk.owns_lock()) {
    for (int w = 0; w < (threads < 1 ? 1 : threads); ++w) body(w);
    return;
  }
  pool().run(threads, body);
}

}  // namespace cpu
}  // namespace effattn
