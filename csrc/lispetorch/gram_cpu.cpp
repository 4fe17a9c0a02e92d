// CPU kernel of the factored Gram: the symmetric R×R products AAᵀ and BᵀB of the stacked factors, in float64,
// read straight from the checkpoints' tensors (float32, float64, bfloat16 or float16, any strides, memory-mapped
// files included) without first stacking or converting them.
//
// Layout. A side: row p of the stack is a row of some Aᵢ (rᵢ, in); entry (p, q) is a dot product along `in`.
// B side: row t of the stack is row t of every Bᵢ (out, rᵢ) side by side; BᵀB is a sum of outer products of those
// rows over `out`. Each side is cut into chunks of kChunk columns (A) or rows (B). A chunk is converted to float64
// into a panel that stays in the L2 cache, and a register-blocked kernel adds its contribution:
//   A panel (Rp, kChunk) row-major: dot products of 4 rows against 4 rows, 8 columns per step (AVX-512);
//   B panel (kChunk, Rp) row-major: 8 rows × 8 columns of outer products per step, one vector of columns times
//   8 broadcast values.
// Rp = R rounded up to 8, the padding rows (A) / columns (B) are zeros. Only blocks on or above the diagonal are
// computed, the lower triangle is mirrored at the end. Chunks are shared out between threads, each summing into
// its own R×R accumulators, added together at the end. Everything accumulates in float64.
//
// The kernels are compiled for AVX-512 and for AVX2+FMA and chosen at run time (see chunk_kernel); other
// processors use the ATen path in gram.cpp.
#include "lispetorch.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace lispetorch::detail {

#if defined(__x86_64__) && defined(__GNUC__)

namespace {

constexpr int64_t kChunk = 512;  // columns of A / rows of B per panel: a 32-row panel is 128 KiB
constexpr int64_t kPad = 8;      // Rp is a multiple of this

// One factor as the kernel reads it: element (i, j) at data + i*s0 + j*s1, in elements of its dtype.
struct Factor {
  const void* data;
  at::ScalarType dtype;
  int64_t rows, cols, s0, s1;
};

template <typename T>
LT_INLINE double to_double(T v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
LT_INLINE double to_double<double>(double v) {
  return v;
}

// dst[p][j] = A[p][t0 + j] for j < n, zero up to ld: rows of one Aᵢ into the A panel.
template <typename T>
LT_INLINE void pack_rows_t(const Factor& f, int64_t t0, int64_t n, double* dst, int64_t ld) {
  const T* base = static_cast<const T*>(f.data);
  for (int64_t p = 0; p < f.rows; ++p) {
    const T* src = base + p * f.s0 + t0 * f.s1;
    double* d = dst + p * ld;
    if (f.s1 == 1) {
      for (int64_t j = 0; j < n; ++j) d[j] = to_double(src[j]);
    } else {
      for (int64_t j = 0; j < n; ++j) d[j] = to_double(src[j * f.s1]);
    }
    for (int64_t j = n; j < ld; ++j) d[j] = 0.0;
  }
}

// dst[j][col0 + p] = B[t0 + j][p] for j < n: columns of one Bᵢ into the B panel (row stride ld).
template <typename T>
LT_INLINE void pack_cols_t(const Factor& f, int64_t t0, int64_t n, double* dst, int64_t ld, int64_t col0) {
  const T* base = static_cast<const T*>(f.data);
  for (int64_t j = 0; j < n; ++j) {
    const T* src = base + (t0 + j) * f.s0;
    double* d = dst + j * ld + col0;
    if (f.s1 == 1) {
      for (int64_t p = 0; p < f.cols; ++p) d[p] = to_double(src[p]);
    } else {
      for (int64_t p = 0; p < f.cols; ++p) d[p] = to_double(src[p * f.s1]);
    }
  }
}

#define LT_DISPATCH_FACTOR(f, FN, ...)                                             \
  switch ((f).dtype) {                                                             \
    case at::kFloat: FN<float>(f, __VA_ARGS__); break;                             \
    case at::kDouble: FN<double>(f, __VA_ARGS__); break;                           \
    case at::kBFloat16: FN<c10::BFloat16>(f, __VA_ARGS__); break;                  \
    default: FN<c10::Half>(f, __VA_ARGS__); break;                                 \
  }

template <typename V>
LT_INLINE V loadv(const double* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, int W>
LT_INLINE double hsum(V v) {
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// H[p][q] += Σ_t P[p][t] P[q][t] for the row blocks (p0.., q0..) of BP and BQ rows; len a multiple of W.
template <typename V, int W, int BP, int BQ>
LT_INLINE void dot_block(const double* P, int64_t ld, int64_t len, int64_t p0, int64_t q0, double* H, int64_t ldh) {
  V acc[BP][BQ];
  for (int i = 0; i < BP; ++i)
    for (int j = 0; j < BQ; ++j) acc[i][j] = V{} ;
  for (int64_t t = 0; t < len; t += W) {
    V a[BP], b[BQ];
    for (int i = 0; i < BP; ++i) a[i] = loadv<V>(P + (p0 + i) * ld + t);
    for (int j = 0; j < BQ; ++j) b[j] = loadv<V>(P + (q0 + j) * ld + t);
    for (int i = 0; i < BP; ++i)
      for (int j = 0; j < BQ; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < BP; ++i)
    for (int j = 0; j < BQ; ++j) H[(p0 + i) * ldh + q0 + j] += hsum<V, W>(acc[i][j]);
}

// A side: every block pair on or above the diagonal of the (Rp, len) panel.
template <typename V, int W, int BP, int BQ>
LT_INLINE void rows_gram(const double* P, int64_t ld, int64_t len, int64_t Rp, double* H) {
  for (int64_t p0 = 0; p0 < Rp; p0 += BP)
    for (int64_t q0 = p0 / BQ * BQ; q0 < Rp; q0 += BQ) dot_block<V, W, BP, BQ>(P, ld, len, p0, q0, H, Rp);
}

// B side: H[p][q] += Σ_t P[t][p] P[t][q] over the n rows of the (n, Rp) panel, in tiles of TP rows × TV vectors.
template <typename V, int W, int TP, int TV>
LT_INLINE void cols_gram(const double* P, int64_t n, int64_t Rp, double* H) {
  constexpr int CW = TV * W;  // columns per tile
  for (int64_t c0 = 0; c0 < Rp; c0 += CW) {
    for (int64_t p0 = 0; p0 < Rp && p0 < c0 + CW; p0 += TP) {
      V acc[TP][TV];
      for (int i = 0; i < TP; ++i)
        for (int v = 0; v < TV; ++v) acc[i][v] = V{};
      for (int64_t t = 0; t < n; ++t) {
        const double* row = P + t * Rp;
        V b[TV];
        for (int v = 0; v < TV; ++v) b[v] = loadv<V>(row + c0 + v * W);
        for (int i = 0; i < TP; ++i) {
          const double a = row[p0 + i];
          for (int v = 0; v < TV; ++v) acc[i][v] += a * b[v];
        }
      }
      for (int i = 0; i < TP; ++i) {
        double* h = H + (p0 + i) * Rp + c0;
        for (int v = 0; v < TV; ++v) {
          V cur = loadv<V>(h + v * W);
          cur += acc[i][v];
          std::memcpy(h + v * W, &cur, sizeof(V));
        }
      }
    }
  }
}

struct Work {
  const std::vector<Factor>* A;
  const std::vector<Factor>* B;
  int64_t in, out, Rp;
};

// One chunk: side 0 = columns [t0, t0+n) of the A factors, side 1 = rows [t0, t0+n) of the B factors.
template <typename V, int W, int BP, int BQ, int TP, int TV>
LT_INLINE void chunk_impl(const Work& w, int side, int64_t t0, int64_t n, double* panel, double* H) {
  const int64_t Rp = w.Rp;
  if (side == 0) {
    const int64_t ld = (n + W - 1) / W * W;
    int64_t off = 0;
    for (const Factor& f : *w.A) {
      LT_DISPATCH_FACTOR(f, pack_rows_t, t0, n, panel + off * ld, ld);
      off += f.rows;
    }
    std::fill(panel + off * ld, panel + Rp * ld, 0.0);
    rows_gram<V, W, BP, BQ>(panel, ld, ld, Rp, H);
  } else {
    int64_t off = 0;
    for (const Factor& f : *w.B) {
      LT_DISPATCH_FACTOR(f, pack_cols_t, t0, n, panel, Rp, off);
      off += f.cols;
    }
    if (off < Rp)
      for (int64_t j = 0; j < n; ++j) std::fill(panel + j * Rp + off, panel + (j + 1) * Rp, 0.0);
    cols_gram<V, W, TP, TV>(panel, n, Rp, H);
  }
}

typedef double v8d __attribute__((vector_size(64)));
typedef double v4d __attribute__((vector_size(32)));

__attribute__((target("avx512f"))) void chunk_avx512(const Work& w, int side, int64_t t0, int64_t n, double* panel,
                                                     double* H) {
  chunk_impl<v8d, 8, 4, 4, 8, 1>(w, side, t0, n, panel, H);
}

__attribute__((target("avx2,fma"))) void chunk_avx2(const Work& w, int side, int64_t t0, int64_t n, double* panel,
                                                    double* H) {
  chunk_impl<v4d, 4, 2, 4, 4, 2>(w, side, t0, n, panel, H);
}

using ChunkFn = void (*)(const Work&, int, int64_t, int64_t, double*, double*);

// The widest kernel this processor runs, as capped by LISPETORCH_ISA (simd.h); none under =aten.
ChunkFn chunk_kernel() {
  switch (simd::isa()) {
    case simd::Isa::avx512: return &chunk_avx512;
    case simd::Isa::avx2: return &chunk_avx2;
    default: return nullptr;
  }
}

// Reads of memory-mapped factors under a guard. A page of a map whose file was cut short underneath raises SIGBUS
// when read; while a Gram call runs, its handler sends a thread that faults inside a chunk back to the start of
// that chunk (siglongjmp to the sigsetjmp there), and the call ends with an error naming the factor instead of the
// process dying. Between the sigsetjmp and the reads nothing is allocated or locked, so jumping back skips no
// clean-up. A SIGBUS outside a guarded chunk (another thread, another cause) is passed on: the handler puts the
// previous disposition back and returns, the faulting instruction runs again and meets it.
thread_local sigjmp_buf* t_guard = nullptr;
thread_local const void* t_fault = nullptr;
struct sigaction g_previous;

void on_sigbus(int, siginfo_t* info, void*) {
  if (t_guard != nullptr) {
    t_fault = info->si_addr;
    siglongjmp(*t_guard, 1);
  }
  sigaction(SIGBUS, &g_previous, nullptr);
}

// Installs on_sigbus for the lifetime of one Gram call (one call at a time) and puts back what was there.
class SigbusGuard {
 public:
  SigbusGuard() : lock_(mutex()) {
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous);
  }
  ~SigbusGuard() { sigaction(SIGBUS, &g_previous, nullptr); }
  SigbusGuard(const SigbusGuard&) = delete;
  SigbusGuard& operator=(const SigbusGuard&) = delete;

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  std::lock_guard<std::mutex> lock_;
};

// Runs one chunk under the guard; false if it faulted (the fault's address in t_fault).
bool guarded_chunk(ChunkFn kernel, const Work& w, int side, int64_t t0, int64_t n, double* panel, double* H) {
  sigjmp_buf env;
  if (sigsetjmp(env, 1) != 0) {
    t_guard = nullptr;
    return false;
  }
  t_guard = &env;
  kernel(w, side, t0, n, panel, H);
  t_guard = nullptr;
  return true;
}

Factor as_factor(const at::Tensor& t) {
  return {t.data_ptr(), t.scalar_type(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

}  // namespace

bool gram_cpu_available(at::TensorList lora_A, at::TensorList lora_B) {
  if (chunk_kernel() == nullptr) return false;
  auto ok = [](const at::Tensor& t) {
    const auto s = t.scalar_type();
    return t.device().is_cpu() && t.layout() == at::kStrided && !t.is_conj() && !t.is_neg() &&
           (s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf);
  };
  return std::all_of(lora_A.begin(), lora_A.end(), ok) && std::all_of(lora_B.begin(), lora_B.end(), ok);
}

at::Tensor lora_grams_cpu(at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scales,
                          const std::vector<std::vector<int64_t>>& ranks) {
  const ChunkFn kernel = chunk_kernel();
  TORCH_CHECK(kernel != nullptr, "lora_gram: no vector kernel for this processor");
  const int64_t M = static_cast<int64_t>(ranks.size());
  const int64_t k = M > 0 ? static_cast<int64_t>(ranks[0].size()) : 0;
  // Per module: its factors, sizes, and where its two (Rp, Rp) accumulators start in a thread's buffer.
  std::vector<std::vector<Factor>> A(M), B(M);
  std::vector<Work> work(M);
  std::vector<int64_t> R(M), offset(M + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < k; ++i) {
      A[m].push_back(as_factor(lora_A[m * k + i]));
      B[m].push_back(as_factor(lora_B[m * k + i]));
    }
    R[m] = 0;
    for (int64_t r : ranks[m]) R[m] += r;
    const int64_t Rp = (R[m] + kPad - 1) / kPad * kPad;
    work[m] = Work{&A[m], &B[m], lora_A[m * k].size(1), lora_B[m * k].size(0), Rp};
    offset[m + 1] = offset[m] + 2 * Rp * Rp;
  }
  // Work items (module, side, first column/row): per module the chunks of both sides interleaved, modules in
  // order, so that a contiguous share of the items is a balanced share of the work and of the file.
  struct Item {
    int64_t module;
    int side;
    int64_t t0;
  };
  std::vector<Item> items;
  int64_t panel_size = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t na = (work[m].in + kChunk - 1) / kChunk, nb = (work[m].out + kChunk - 1) / kChunk;
    for (int64_t i = 0; i < std::max(na, nb); ++i) {
      if (i < na) items.push_back({m, 0, i * kChunk});
      if (i < nb) items.push_back({m, 1, i * kChunk});
    }
    panel_size = std::max(panel_size, kChunk * work[m].Rp);
  }
  // Per thread: the accumulators of every module, zeroed, and one panel (uninitialised: a chunk writes what it
  // reads).
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t acc = offset[M];
  std::vector<double> sums(static_cast<size_t>(nthreads * acc), 0.0);
  std::vector<std::unique_ptr<double[]>> panels(nthreads);
  std::atomic<const void*> fault{nullptr};
  {
    const SigbusGuard guard;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_CHECK(tid >= 0 && tid < nthreads, "lora_gram: thread ", tid, " outside the ", nthreads, " planned");
      if (!panels[tid]) panels[tid].reset(new double[panel_size]);
      for (int64_t c = begin; c < end && fault.load() == nullptr; ++c) {
        const Item& it = items[c];
        const Work& w = work[it.module];
        double* H = sums.data() + tid * acc + offset[it.module] + (it.side == 0 ? 0 : w.Rp * w.Rp);
        const int64_t n = std::min(kChunk, (it.side == 0 ? w.in : w.out) - it.t0);
        if (!guarded_chunk(kernel, w, it.side, it.t0, n, panels[tid].get(), H)) fault.store(t_fault);
      }
    });
  }
  if (const void* where = fault.load()) {
    // The factor whose memory holds the address, to name it.
    const auto* p = static_cast<const char*>(where);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < k; ++i)
        for (const at::Tensor* t : {&lora_A[m * k + i], &lora_B[m * k + i]}) {
          const auto* begin = static_cast<const char*>(t->data_ptr());
          const int64_t extent = ((t->size(0) - 1) * t->stride(0) + (t->size(1) - 1) * t->stride(1) + 1) *
                                 static_cast<int64_t>(t->element_size());
          TORCH_CHECK(!(p >= begin && p < begin + extent), "lora_gram: SIGBUS reading ",
                      t == &lora_A[m * k + i] ? "lora_A" : "lora_B", "[", m * k + i, "] (module ", m,
                      ", checkpoint ", i, "): the memory it maps is gone (its file was cut short while mapped)");
        }
    TORCH_CHECK(false, "lora_gram: SIGBUS reading a factor: the memory it maps is gone (its file was cut short "
                "while mapped)");
  }
  for (int64_t t = 1; t < nthreads; ++t)
    for (int64_t i = 0; i < acc; ++i) sums[i] += sums[t * acc + i];
  // G[i][j] = sᵢ sⱼ Σ_{p ∈ block i, q ∈ block j} HA[p][q] · HB[p][q], from the upper triangles (p ≤ q).
  at::Tensor G = at::zeros({M, k, k}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t Rp = work[m].Rp;
    const double* ha = sums.data() + offset[m];
    const double* hb = ha + Rp * Rp;
    std::vector<int64_t> block(R[m]);
    for (int64_t i = 0, p = 0; i < k; ++i)
      for (int64_t j = 0; j < ranks[m][i]; ++j) block[p++] = i;
    double* g = G.data_ptr<double>() + m * k * k;
    for (int64_t p = 0; p < R[m]; ++p)
      for (int64_t q = p; q < R[m]; ++q) {
        const double v = ha[p * Rp + q] * hb[p * Rp + q];
        const int64_t i = block[p], j = block[q];
        g[i * k + j] += v;
        if (p != q) g[j * k + i] += v;
      }
    const double* s = scales.data() + m * k;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) g[i * k + j] *= s[i] * s[j];
  }
  return G;
}

#else

bool gram_cpu_available(at::TensorList, at::TensorList) { return false; }

at::Tensor lora_grams_cpu(at::TensorList, at::TensorList, at::ArrayRef<double>,
                          const std::vector<std::vector<int64_t>>&) {
  TORCH_CHECK(false, "lora_gram: no vector kernel for this processor");
}

#endif

}  // namespace lispetorch::detail
