// Large per-call workspaces of the CPU kernels (torch-free, header-only).
//
// A fresh multi-megabyte buffer comes from mmap and is faulted in 4 KiB pages on first touch. On the
// development VM that costs more than the work done with it: 10 ms per 16 MiB against 1.1 ms with 2 MiB
// pages, about 10% of a 2048-token attention forward whose packed K/V is 16 MiB. Buffers of 2 MiB or more
// are therefore 2 MiB aligned and advised to use transparent huge pages (effective where
// /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`, the common defaults; PyTorch's
// THP_MEM_ALLOC_ENABLE does the same for tensors). Nothing is cached between calls.
#pragma once
#include "common/isa.h"
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <type_traits>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace cm3leon {
CM3LEON_ISA_BEGIN

// n elements of a trivial type T, uninitialised (as std::vector without the zero-fill pass).
template <typename T>
class ScratchBuffer {
  static_assert(std::is_trivial_v<T>, "ScratchBuffer holds plain numbers");

 public:
  explicit ScratchBuffer(size_t n) : size_(n) {
    if (n == 0) return;
    const size_t bytes = n * sizeof(T);
    const size_t align = bytes >= kHugePage ? kHugePage : 64;
    const size_t padded = (bytes + align - 1) / align * align;  // aligned_alloc wants a multiple
    data_.reset(static_cast<T*>(std::aligned_alloc(align, padded)));
    if (!data_) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHugePage) madvise(data_.get(), padded, MADV_HUGEPAGE);  // advisory: failure is harmless
#endif
  }

  T* data() const { return data_.get(); }
  size_t size() const { return size_; }
  T& operator[](size_t i) const { return data_.get()[i]; }

 private:
  static constexpr size_t kHugePage = size_t(2) << 20;
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  size_t size_;
};

CM3LEON_ISA_END
}  // namespace cm3leon
