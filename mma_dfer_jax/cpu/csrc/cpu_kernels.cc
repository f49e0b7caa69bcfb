// Fused multi-head self-attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why by hand: XLA:CPU has no fused attention. It runs softmax(q k^T) v as separate batched matmuls over the
// (frame, head) pairs, whose (203 x 203 x 64) shapes reach 36-44 GFLOP/s on a 2-core AVX2 machine, with the score
// matrix and the transposes going through memory between them (BENCHMARKS.md). No library offers an XLA:CPU
// attention kernel. Here each (batch, head) problem is done start to end in one worker: its q, k, v are packed
// once, the score matrix stays in the worker's cache, and the softmax runs in place between the two matmuls.
//
// Layouts (row-major, any number of leading batch dimensions, flattened into B):
//   qkv  (B, L, 3, H, d)  one fused projection, as the ViT's qkv Dense reshaped
//   out  (B, L, H, d)     ready to reshape to (B, L, H*d) for the output projection
//   lse  (B, H, L)        log-sum-exp of each score row, the only extra residual the backward pass needs
//   dqkv (B, L, 3, H, d)
// float32 only; the caller chooses this kernel on CPU for float32 compute.
//
// Built at first use by mma_dfer_jax/cpu_kernels.py with the host compiler (-O3 -march=native). The matmul
// micro-kernel uses GCC/Clang vector extensions, so it compiles to AVX2/AVX-512 on x86 and NEON on Arm.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "cblas.h"  // scipy-openblas32 (requirements.txt): OpenBLAS with its symbols prefixed scipy_
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f Load(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8f Splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

constexpr int kTileRows = 6;   // micro-kernel tile: 6 rows x 16 columns = 12 vector accumulators
constexpr int kTileCols = 16;

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[r, 0:cols] = sum_k A[r, k] B[k, 0:16] for r < Rows. A is read through strides (a_row, a_k), so a transposed
// operand needs no copy; B rows hold at least 16 readable floats (packed, zero-padded). Full tiles store straight
// from the accumulators (kFull), so that the compiler keeps them in registers with no stack copy.
template <int Rows, bool kFull>
inline void MicroKernel(int64_t depth, const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t b_row,
                        float* c, int64_t c_row, int64_t cols) {
  v8f acc0[Rows], acc1[Rows];
  for (int r = 0; r < Rows; ++r) acc0[r] = acc1[r] = v8f{};
#pragma GCC unroll 2
  for (int64_t k = 0; k < depth; ++k) {
    const v8f b0 = Load(b + k * b_row), b1 = Load(b + k * b_row + 8);
    const float* a_k_col = a + k * a_k;
    for (int r = 0; r < Rows; ++r) {
      const v8f x = Splat(a_k_col[r * a_row]);
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    if constexpr (kFull) {
      Store(c + r * c_row, acc0[r]);
      Store(c + r * c_row + 8, acc1[r]);
    } else {  // a partial tile at the right edge of a strided output
      float tile[kTileCols];
      Store(tile, acc0[r]);
      Store(tile + 8, acc1[r]);
      std::memcpy(c + r * c_row, tile, cols * sizeof(float));
    }
  }
}

template <int Rows>
inline void Tile(int64_t depth, const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t b_row, float* c,
                 int64_t c_row, int64_t cols) {
  if (cols == kTileCols) {
    MicroKernel<Rows, true>(depth, a, a_row, a_k, b, b_row, c, c_row, cols);
  } else {
    MicroKernel<Rows, false>(depth, a, a_row, a_k, b, b_row, c, c_row, cols);
  }
}

// C (rows x cols, row stride c_row) = A (rows x depth, strides a_row, a_k) @ B (depth x cols, row stride b_row),
// where B's rows are readable up to a multiple of 16 columns.
void Matmul(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_row, int64_t a_k, const float* b,
            int64_t b_row, float* c, int64_t c_row) {
  for (int64_t j = 0; j < cols; j += kTileCols) {
    const int64_t tile_cols = std::min<int64_t>(kTileCols, cols - j);
    int64_t i = 0;
    for (; i + kTileRows <= rows; i += kTileRows)
      Tile<kTileRows>(depth, a + i * a_row, a_row, a_k, b + j, b_row, c + i * c_row + j, c_row, tile_cols);
    const float* a_i = a + i * a_row;
    float* c_i = c + i * c_row + j;
    switch (rows - i) {
      case 5: Tile<5>(depth, a_i, a_row, a_k, b + j, b_row, c_i, c_row, tile_cols); break;
      case 4: Tile<4>(depth, a_i, a_row, a_k, b + j, b_row, c_i, c_row, tile_cols); break;
      case 3: Tile<3>(depth, a_i, a_row, a_k, b + j, b_row, c_i, c_row, tile_cols); break;
      case 2: Tile<2>(depth, a_i, a_row, a_k, b + j, b_row, c_i, c_row, tile_cols); break;
      case 1: Tile<1>(depth, a_i, a_row, a_k, b + j, b_row, c_i, c_row, tile_cols); break;
      default: break;
    }
  }
}

// exp on 8 lanes: Cody-Waite range reduction and a degree-6 polynomial (as Cephes' expf, ~1 ulp). Inputs below
// log(FLT_MIN) give exactly 0, which is what a softmax needs for scores far below the row's maximum.
inline v8f Exp(v8f x) {
  const v8f lowest = Splat(-87.33654475f);
  const v8i underflow = x < lowest;
  x = x > Splat(88.37626266f) ? Splat(88.37626266f) : x;
  x = x < lowest ? lowest : x;
  const v8f round_magic = Splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting rounds to the nearest integer
  const v8f n = (x * Splat(1.44269504088896341f) + round_magic) - round_magic;
  const v8f r = x - n * Splat(0.693359375f) - n * Splat(-2.12194440e-4f);
  v8f p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r * r + r + Splat(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const v8f result = p * scale;
  return underflow ? v8f{} : result;
}

inline float ExpScalar(float x) { return Exp(Splat(x))[0]; }

// row[j] = exp(row[j] - shift) for j < n; returns the sum.
float ExpShifted(float* row, int64_t n, float shift) {
  v8f sum8 = v8f{};
  const v8f shift8 = Splat(shift);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f e = Exp(Load(row + j) - shift8);
    Store(row + j, e);
    sum8 += e;
  }
  float sum = 0.f;
  for (int l = 0; l < 8; ++l) sum += sum8[l];
  for (; j < n; ++j) sum += (row[j] = ExpScalar(row[j] - shift));
  return sum;
}

float RowMax(const float* row, int64_t n) {
  float m = -INFINITY;
  int64_t j = 0;
  if (n >= 8) {
    v8f m8 = Load(row);
    for (j = 8; j + 8 <= n; j += 8) {
      const v8f x = Load(row + j);
      m8 = x > m8 ? x : m8;
    }
    for (int l = 0; l < 8; ++l) m = std::max(m, m8[l]);
  }
  for (; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

// The problem sizes of one call and where (batch, head) p's rows live in the caller's buffers.
struct Geometry {
  int64_t batch, length, heads, head_dim;
  int64_t padded_dim, padded_length;  // rounded up to the micro-kernel's 16 columns
  float scale;

  explicit Geometry(ffi::Span<const int64_t> dims) {
    const size_t rank = dims.size();
    batch = 1;
    for (size_t i = 0; i + 4 < rank; ++i) batch *= dims[i];
    length = dims[rank - 4];
    heads = dims[rank - 2];
    head_dim = dims[rank - 1];
    padded_dim = RoundUp(head_dim, kTileCols);
    padded_length = RoundUp(length, kTileCols);
    scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  }
  int64_t problems() const { return batch * heads; }
  int64_t qkv_row() const { return 3 * heads * head_dim; }
  int64_t out_row() const { return heads * head_dim; }
  // offset of row 0 of slot (0 q, 1 k, 2 v) of problem p in a (B, L, 3, H, d) buffer
  int64_t qkv_offset(int64_t p, int slot) const {
    return (p / heads) * length * qkv_row() + slot * heads * head_dim + (p % heads) * head_dim;
  }
  int64_t out_offset(int64_t p) const { return (p / heads) * length * out_row() + (p % heads) * head_dim; }
};

// Copies a (length x head_dim) strided slice into a (length x padded_dim) buffer, times `scale`, zero padded.
void PackRows(const Geometry& g, const float* src, int64_t src_row, float scale, float* dst) {
  for (int64_t l = 0; l < g.length; ++l) {
    float* d = dst + l * g.padded_dim;
    const float* s = src + l * src_row;
    for (int64_t c = 0; c < g.head_dim; ++c) d[c] = s[c] * scale;
    std::fill(d + g.head_dim, d + g.padded_dim, 0.f);
  }
}

// Copies the transpose of a (length x head_dim) strided slice into a (head_dim x padded_length) buffer.
void PackTransposed(const Geometry& g, const float* src, int64_t src_row, float* dst) {
  for (int64_t c = 0; c < g.head_dim; ++c) {
    float* d = dst + c * g.padded_length;
    for (int64_t l = 0; l < g.length; ++l) d[l] = src[l * src_row + c];
    std::fill(d + g.length, d + g.padded_length, 0.f);
  }
}

// Per-thread scratch, grown on demand and kept between calls (no allocation in the steady state).
struct Scratch {
  std::vector<float> q, k, v, kt, vt, d_out, scores, d_scores;
};
Scratch& ThreadScratch(const Geometry& g) {
  thread_local Scratch s;
  const size_t rows = g.length * g.padded_dim, cols = g.head_dim * g.padded_length,
               square = g.length * g.padded_length;
  for (auto* b : {&s.q, &s.k, &s.v, &s.d_out}) if (b->size() < rows) b->resize(rows);
  for (auto* b : {&s.kt, &s.vt}) if (b->size() < cols) b->resize(cols);
  for (auto* b : {&s.scores, &s.d_scores}) if (b->size() < square) b->resize(square);
  return s;
}

// Forward of one (batch, head): out = softmax(scale q k^T) v, lse = logsumexp of each score row.
void ForwardProblem(const Geometry& g, int64_t p, const float* qkv, float* out, float* lse) {
  Scratch& s = ThreadScratch(g);
  const int64_t L = g.length, Lp = g.padded_length, Dp = g.padded_dim;
  PackRows(g, qkv + g.qkv_offset(p, 0), g.qkv_row(), g.scale, s.q.data());
  PackTransposed(g, qkv + g.qkv_offset(p, 1), g.qkv_row(), s.kt.data());
  PackRows(g, qkv + g.qkv_offset(p, 2), g.qkv_row(), 1.f, s.v.data());
  float* scores = s.scores.data();
  Matmul(L, Lp, g.head_dim, s.q.data(), Dp, 1, s.kt.data(), Lp, scores, Lp);
  float* lse_p = lse + p * L;
  for (int64_t i = 0; i < L; ++i) {
    float* row = scores + i * Lp;
    const float m = RowMax(row, L);
    const float sum = ExpShifted(row, L, m);
    const v8f inv = Splat(1.f / sum);
    for (int64_t j = 0; j < L; j += 8) Store(row + j, Load(row + j) * inv);  // Lp >= L rounded to 16: in bounds
    lse_p[i] = m + std::log(sum);
  }
  Matmul(L, g.head_dim, L, scores, Lp, 1, s.v.data(), Dp, out + g.out_offset(p), g.out_row());
}

// Backward of one (batch, head), recomputing the probabilities from q, k and lse:
//   dv = P^T do,  dP = do v^T,  dS = P (dP - rowsum(do * out)),  dq = scale dS k,  dk = scale dS^T q.
void BackwardProblem(const Geometry& g, int64_t p, const float* qkv, const float* out, const float* lse,
                     const float* d_out, float* d_qkv) {
  Scratch& s = ThreadScratch(g);
  const int64_t L = g.length, Lp = g.padded_length, Dp = g.padded_dim, D = g.head_dim;
  const float* q = qkv + g.qkv_offset(p, 0);
  const float* k = qkv + g.qkv_offset(p, 1);
  const float* v = qkv + g.qkv_offset(p, 2);
  PackRows(g, q, g.qkv_row(), g.scale, s.q.data());
  PackRows(g, k, g.qkv_row(), g.scale, s.k.data());
  PackTransposed(g, k, g.qkv_row(), s.kt.data());
  PackTransposed(g, v, g.qkv_row(), s.vt.data());
  PackRows(g, d_out + g.out_offset(p), g.out_row(), 1.f, s.d_out.data());

  float* probs = s.scores.data();
  Matmul(L, Lp, D, s.q.data(), Dp, 1, s.kt.data(), Lp, probs, Lp);
  const float* lse_p = lse + p * L;
  for (int64_t i = 0; i < L; ++i) ExpShifted(probs + i * Lp, L, lse_p[i]);

  float* dq = d_qkv + g.qkv_offset(p, 0);
  float* dk = d_qkv + g.qkv_offset(p, 1);
  float* dv = d_qkv + g.qkv_offset(p, 2);
  Matmul(L, D, L, probs, 1, Lp, s.d_out.data(), Dp, dv, g.qkv_row());  // P^T do: P read by columns

  float* d_scores = s.d_scores.data();
  Matmul(L, Lp, D, s.d_out.data(), Dp, 1, s.vt.data(), Lp, d_scores, Lp);
  const float* out_p = out + g.out_offset(p);
  for (int64_t i = 0; i < L; ++i) {
    const float* o = out_p + i * g.out_row();
    const float* dout = s.d_out.data() + i * Dp;
    float delta = 0.f;
    for (int64_t c = 0; c < D; ++c) delta += dout[c] * o[c];
    float* ds = d_scores + i * Lp;
    const float* pr = probs + i * Lp;
    const v8f delta8 = Splat(delta);
    for (int64_t j = 0; j < L; j += 8) Store(ds + j, Load(pr + j) * (Load(ds + j) - delta8));
  }
  Matmul(L, D, L, d_scores, Lp, 1, s.k.data(), Dp, dq, g.qkv_row());
  Matmul(L, D, L, d_scores, 1, Lp, s.q.data(), Dp, dk, g.qkv_row());  // dS^T (scale q)
}

// Runs body(p) for p in [0, n) on the caller and the XLA:CPU intra-op pool. Work is handed out one problem at a
// time from a shared counter; the caller returns once every problem is done, and helpers that start late find the
// counter exhausted and exit without touching the (by then gone) buffers.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, body]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < n;) {
      body(p);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_done.wait(lock, [&] { return state->done.load() == n; });
}

ffi::Error CheckQkv(ffi::Span<const int64_t> dims) {
  if (dims.size() < 5 || dims[dims.size() - 3] != 3)
    return ffi::Error::InvalidArgument("cpu attention: qkv must be (..., L, 3, H, d)");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (ffi::Error e = CheckQkv(qkv.dimensions()); e.failure()) return e;
  const Geometry g(qkv.dimensions());
  const float* qkv_p = qkv.typed_data();
  float* out_p = out->typed_data();
  float* lse_p = lse->typed_data();
  ParallelFor(pool, g.problems(), [&g, qkv_p, out_p, lse_p](int64_t p) { ForwardProblem(g, p, qkv_p, out_p, lse_p); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> d_out, ffi::ResultBuffer<ffi::F32> d_qkv) {
  if (ffi::Error e = CheckQkv(qkv.dimensions()); e.failure()) return e;
  const Geometry g(qkv.dimensions());
  const float *qkv_p = qkv.typed_data(), *out_p = out.typed_data(), *lse_p = lse.typed_data(),
              *d_out_p = d_out.typed_data();
  float* d_qkv_p = d_qkv->typed_data();
  ParallelFor(pool, g.problems(), [&g, qkv_p, out_p, lse_p, d_out_p, d_qkv_p](int64_t p) {
    BackwardProblem(g, p, qkv_p, out_p, lse_p, d_out_p, d_qkv_p);
  });
  return ffi::Error::Success();
}

// y = op(a) @ op(b) with OpenBLAS, where op transposes when asked. a is (..., n) taken as a matrix of its leading
// dimensions' product by n, b a matrix. The output is split over the intra-op pool into blocks of rows (or of
// columns), one single-threaded sgemm each, so OpenBLAS's own threads never compete with XLA's.
ffi::Error BlasMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                      ffi::ResultBuffer<ffi::F32> y, bool transpose_a, bool transpose_b) {
  const auto a_dims = a.dimensions(), b_dims = b.dimensions();
  if (a_dims.size() < 2 || b_dims.size() != 2)
    return ffi::Error::InvalidArgument("cpu matmul: a must have rank >= 2 and b rank 2");
  const int64_t a_cols = a_dims[a_dims.size() - 1], a_rows = a.element_count() / std::max<int64_t>(a_cols, 1);
  const int64_t rows = transpose_a ? a_cols : a_rows, depth = transpose_a ? a_rows : a_cols;
  const int64_t cols = transpose_b ? b_dims[0] : b_dims[1];
  if ((transpose_b ? b_dims[1] : b_dims[0]) != depth)
    return ffi::Error::InvalidArgument("cpu matmul: contracting dimensions differ");
  const float* a_p = a.typed_data();
  const float* b_p = b.typed_data();
  float* y_p = y->typed_data();
  if (rows == 0 || cols == 0) return ffi::Error::Success();
  if (depth == 0) {
    std::fill(y_p, y_p + rows * cols, 0.f);
    return ffi::Error::Success();
  }
  // Blocks of at least 256 rows, two per worker where there are enough: a worker that starts late, busy with another
  // op, then takes fewer blocks instead of holding the call up. Each block repacks b, a small cost next to its sgemm
  // when blocks are tall. With too few rows for one block per worker (the audio tokens), split the columns instead.
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = std::min<int64_t>(2 * workers, rows / 256);
  const bool by_rows = row_blocks >= workers || cols < 32 * workers;
  const int64_t blocks = by_rows ? std::max<int64_t>(1, std::max(row_blocks, std::min(workers, rows)))
                                 : workers;
  const int64_t extent = by_rows ? rows : cols;
  const int64_t block = (extent + blocks - 1) / blocks;
  const int64_t b_row = b_dims[1];
  const auto trans_a = transpose_a ? CblasTrans : CblasNoTrans, trans_b = transpose_b ? CblasTrans : CblasNoTrans;
  ParallelFor(pool, blocks, [=](int64_t w) {
    const int64_t start = w * block, n = std::min(extent, start + block) - start;
    if (n <= 0) return;
    if (by_rows) {
      const float* a_block = transpose_a ? a_p + start : a_p + start * a_cols;  // rows of a^T are columns of a
      scipy_cblas_sgemm(CblasRowMajor, trans_a, trans_b, n, cols, depth, 1.f, a_block, a_cols, b_p, b_row, 0.f,
                        y_p + start * cols, cols);
    } else {
      const float* b_block = transpose_b ? b_p + start * b_row : b_p + start;  // columns of b^T are rows of b
      scipy_cblas_sgemm(CblasRowMajor, trans_a, trans_b, rows, n, depth, 1.f, a_p, a_cols, b_block, b_row, 0.f,
                        y_p + start, cols);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// OpenBLAS keeps one thread per call; the parallelism is the intra-op pool's (BlasMatmul above).
extern "C" __attribute__((visibility("default"))) void MmaDferInitBlas() { scipy_openblas_set_num_threads(1); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmaDferMatmul, BlasMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmaDferAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmaDferAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
