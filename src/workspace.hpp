// Internal: the per-thread scratch memory of the functional layer, so that a call of batch_norm /
// batch_norm_backward allocates nothing once an earlier call on the same thread has needed as much.
//
// Each thread has one arena: a 64-byte aligned block that grows geometrically and is never shrunk.
// A call opens a Workspace::Scope and takes spans from it (per-channel statistics, coefficients,
// the reductions' workspace); the scope gives them all back when it ends. Scopes nest as a stack
// (sync_batch_norm opens one and calls the detail:: pieces of functional.cpp, which open their own):
// an inner scope takes after the outer one's spans and gives back only its own.
//
// Why spans stay valid: the block is replaced (grown) only when a scope opens with no other scope
// open, i.e. while no span is outstanding. A take that does not fit in the block while spans are
// outstanding gets a chunk of its own (kept until its scope ends), and the arena remembers the
// high-water mark of the whole call (block use + chunks); when the outermost scope ends, the block
// grows to it (and, should that allocation fail there, where it cannot throw, when the next
// outermost scope opens). So the first call of a shape may allocate, and every later call that
// needs no more (the same or fewer channels, the same or fewer threads) takes everything from the
// block: zero heap allocations on the hot path.
//
// A span from take() is value-initialized or filled (as the std::vector it replaces was); one from
// take_for_overwrite() is not initialized, for the per-channel buffers that the next loop writes in
// full: zeroing a call's dozen buffers of C doubles cost more than the loops that fill them (about
// half of a 2048-channel call's fixed cost). In the sanitizer build (BNORM_POISON_WORKSPACE) those
// start as all-ones bytes, NaN in every floating type, so a value read before it is written spoils
// the results that the tests compare. Every span is 64-byte aligned and holds trivially copyable
// values only. The arena is thread_local: the OpenMP threads of a kernel
// only read and write spans that the calling thread took for them.
#pragma once

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstring>
#include <new>
#include <span>
#include <type_traits>
#include <vector>

namespace bnorm::detail {

class Workspace {
 public:
  static constexpr std::size_t kAlign = 64;

  // The calling thread's arena.
  static Workspace& local() {
    thread_local Workspace ws;
    return ws;
  }

  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { release(block_); }

  class Scope {
   public:
    explicit Scope(Workspace& ws = Workspace::local()) : ws_(ws) {
      if (ws_.depth_ == 0) ws_.grow_to(ws_.high_water_);  // nothing outstanding: the block may move
      top_ = ws_.top_;
      chunks_ = ws_.chunks_.size();
      level_ = ++ws_.depth_;
    }
    ~Scope() {
      for (std::size_t i = chunks_; i < ws_.chunks_.size(); ++i) {
        ws_.chunk_lines_ -= ws_.chunks_[i].lines;
        release(ws_.chunks_[i].data);
      }
      ws_.chunks_.resize(chunks_);
      ws_.top_ = top_;
      // The call is over: grow now, so that the next call finds the block large enough. A
      // destructor must not throw, so this tries without; the next scope retries with.
      if (--ws_.depth_ == 0) ws_.grow_to(ws_.high_water_, std::nothrow);
    }
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

    // n values of P, each `fill` (value-initialized by default).
    template <class P>
    std::span<P> take(std::size_t n, P fill = P()) {
      static_assert(std::is_trivially_copyable_v<P> && alignof(P) <= kAlign);
      assert(ws_.depth_ == level_ && "take from the innermost scope only (stack discipline)");
      P* p = static_cast<P*>(ws_.take_bytes(n * sizeof(P)));
      for (std::size_t i = 0; i < n; ++i) ::new (static_cast<void*>(p + i)) P(fill);
      return {std::launder(p), n};
    }

    // n values of P, not initialized: each must be written before it is read.
    template <class P>
    std::span<P> take_for_overwrite(std::size_t n) {
      static_assert(std::is_trivially_copyable_v<P> && std::is_trivially_default_constructible_v<P> &&
                    alignof(P) <= kAlign);
      assert(ws_.depth_ == level_ && "take from the innermost scope only (stack discipline)");
      void* bytes = ws_.take_bytes(n * sizeof(P));
#if defined(BNORM_POISON_WORKSPACE)
      if (n > 0) std::memset(bytes, 0xFF, n * sizeof(P));  // (an empty take has no address)
#endif
      // Default-initialization of a trivial type: starts each object's lifetime and writes nothing
      // (the loop compiles to nothing).
      P* p = static_cast<P*>(bytes);
      for (std::size_t i = 0; i < n; ++i) ::new (static_cast<void*>(p + i)) P;
      return {std::launder(p), n};
    }

   private:
    Workspace& ws_;
    std::size_t top_ = 0, chunks_ = 0;
    int level_ = 0;
  };

 private:
  // Sizes count 64-byte lines, so that every span starts on a line of its own.
  struct Line {
    alignas(kAlign) unsigned char bytes[kAlign];
  };
  struct Chunk {
    Line* data;
    std::size_t lines;
  };

  static Line* acquire(std::size_t lines) {
    return static_cast<Line*>(::operator new(lines * sizeof(Line), std::align_val_t{kAlign}));
  }
  static Line* acquire(std::size_t lines, const std::nothrow_t& nt) noexcept {
    return static_cast<Line*>(::operator new(lines * sizeof(Line), std::align_val_t{kAlign}, nt));
  }
  static void release(Line* p) {
    if (p) ::operator delete(p, std::align_val_t{kAlign});
  }

  // Called with no span outstanding: at least `lines` lines in the block (at least doubling it).
  // With std::nothrow a failed allocation leaves the block as it was.
  template <class... NoThrow>
  void grow_to(std::size_t lines, const NoThrow&... nothrow) {
    if (lines <= capacity_) return;
    const std::size_t cap = std::max(lines, 2 * capacity_);
    Line* fresh = acquire(cap, nothrow...);
    if (!fresh) return;
    release(block_);
    block_ = fresh;
    capacity_ = cap;
  }

  void* take_bytes(std::size_t bytes) {
    const std::size_t lines = (bytes + kAlign - 1) / kAlign;
    void* p;
    if (top_ + lines <= capacity_) {
      p = block_ + top_;
      top_ += lines;
    } else {
      // Outgrown while spans are outstanding: a chunk of its own, freed when its scope ends.
      chunks_.reserve(chunks_.size() + 1);  // may throw before the chunk exists: nothing leaks
      Line* chunk = acquire(std::max<std::size_t>(lines, 1));
      chunks_.push_back({chunk, lines});
      chunk_lines_ += lines;
      p = chunk;
    }
    high_water_ = std::max(high_water_, top_ + chunk_lines_);
    return p;
  }

  Line* block_ = nullptr;
  std::size_t capacity_ = 0;     // lines in block_
  std::size_t top_ = 0;          // lines of block_ in use
  std::vector<Chunk> chunks_;    // overflow chunks of the open scopes, in order
  std::size_t chunk_lines_ = 0;  // lines in chunks_
  std::size_t high_water_ = 0;   // most lines (block + chunks) in use at once so far
  int depth_ = 0;                // open scopes
};

}  // namespace bnorm::detail
