// The connection sides of mHC / HC on the CPU, one pass over the tokens each.
//
// Built on first use by mhc_compile/ops/native.py (torch.utils.cpp_extension) and called
// from the autograd Functions of mhc_compile/ops/cpu_compiled.py. Each pass does all the
// per-token work of its side on tiles of tokens that stay in the L1 cache: the projection
// onto phi and its two backward products, the coefficient activations, Sinkhorn-Knopp and
// its backward, the aggregate and the stream mix. Same math and the same float32 (float64
// for float64 streams) accumulation as the whole-tensor ops of cpu.py; the formulas are
// those of docs/design.md section 4.
//
// Shapes (M tokens, n streams, C channels, K = n^2 + 2n projection columns):
//   x [M, n, C] stream dtype; phi [nC, K], phi_t [K, nC], d [M, K], rstd [M], h_pre, h_post [M, n],
//   h_res [M, n, n] in the accumulation dtype (float32, or float64 for float64 streams).
// Every tensor argument is contiguous (the Python side makes it so).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxStreams = 16;  // per-token scratch lives on the stack
constexpr int64_t kMaxColumns = kMaxStreams * kMaxStreams + 2 * kMaxStreams;
constexpr int64_t kTile = 16;  // tokens whose coefficient math runs side by side in vector lanes

int64_t tiles_of(int64_t tokens) { return (tokens + kTile - 1) / kTile; }

int64_t grain_for(int64_t work_per_token) {  // tokens per parallel chunk: about 16k elements each
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work_per_token));
}

template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t len) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < len; ++c) sum += static_cast<acc_t>(a[c]) * static_cast<acc_t>(b[c]);
  return sum;
}

template <typename acc_t, typename a_t>
inline void axpy(acc_t* out, acc_t scale, const a_t* a, int64_t len) {  // out += scale * a
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) out[c] += scale * static_cast<acc_t>(a[c]);
}

template <typename acc_t, typename out_t>
inline void store(out_t* out, const acc_t* row, int64_t len) {
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) out[c] = static_cast<out_t>(row[c]);
}

// exp for the coefficient math: float takes a polynomial that the compiler vectorises
// (Cephes' expf: within 2 ulp, subnormal results included, 2^k applied in two halves so that
// neither factor leaves the normal range); double takes std::exp.
inline float coef_exp(float x) {
  const bool zero = x < -104.0f;        // exp below half the smallest subnormal
  const bool infinite = x > 88.7228391f;  // exp above float's largest finite value
  x = std::min(std::max(x, -104.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + shifter;
  const float k = shifted - shifter;  // round(x / ln 2), in [-150, 127]
  int32_t k_bits;
  std::memcpy(&k_bits, &shifted, sizeof(k_bits));
  const int32_t k_int = k_bits - 0x4B400000;
  const int32_t half = k_int >> 1;
  const int32_t first_bits = (half + 127) << 23, second_bits = (k_int - half + 127) << 23;
  float first, second;
  std::memcpy(&first, &first_bits, sizeof(first));
  std::memcpy(&second, &second_bits, sizeof(second));
  const float r = x - k * 0.693359375f - k * -2.12194440e-4f;  // x - k ln 2, in two parts
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float result = (y * first) * second;
  return zero ? 0.0f : (infinite ? std::numeric_limits<float>::infinity() : result);
}
inline double coef_exp(double x) { return std::exp(x); }

// Sinkhorn-Knopp on a tile of kTile tokens, in place: p [n * n][kTile] holds the logits
// (row i, column k of token t at p[i * n + k][t]) and becomes the doubly stochastic matrices:
// exp(l - rowmax), then `iters` row and column normalisations, whose sums (the column sums
// clamped to `tiny`) go to sums[(2 * it) * n + i][t] and sums[(2 * it + 1) * n + k][t].
template <typename acc_t>
void sinkhorn_tile(acc_t (*p)[kTile], acc_t (*sums)[kTile], int64_t n, int64_t iters, acc_t tiny) {
  acc_t total[kTile], inverse[kTile];
  for (int64_t i = 0; i < n; ++i) {
    std::copy(p[i * n], p[i * n] + kTile, total);  // the row maximum
    for (int64_t k = 1; k < n; ++k)
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) total[t] = std::max(total[t], p[i * n + k][t]);
    for (int64_t k = 0; k < n; ++k)
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) p[i * n + k][t] = coef_exp(p[i * n + k][t] - total[t]);
  }
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t i = 0; i < n; ++i) {
      std::copy(p[i * n], p[i * n] + kTile, total);
      for (int64_t k = 1; k < n; ++k)
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) total[t] += p[i * n + k][t];
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) {
        sums[(2 * it) * n + i][t] = total[t];
        inverse[t] = acc_t(1) / total[t];
      }
      for (int64_t k = 0; k < n; ++k)
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) p[i * n + k][t] *= inverse[t];
    }
    for (int64_t k = 0; k < n; ++k) {
      std::copy(p[k], p[k] + kTile, total);
      for (int64_t i = 1; i < n; ++i)
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) total[t] += p[i * n + k][t];
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) {
        total[t] = std::max(total[t], tiny);
        sums[(2 * it + 1) * n + k][t] = total[t];
        inverse[t] = acc_t(1) / total[t];
      }
      for (int64_t i = 0; i < n; ++i)
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) p[i * n + k][t] *= inverse[t];
    }
  }
}

// The logits' gradient from p's, on a tile: g [n * n][kTile] (in place), p the final
// matrices (overwritten: walked back to the first normalisation's input), sums as
// sinkhorn_tile wrote them. For p' = p / s along an axis, g = g' - p' * sum(g') along it,
// and p = p' * s; g starts as dL/dp * p (d exp(l) / dl = exp(l); the row shift's term is 0).
template <typename acc_t>
void sinkhorn_backward_tile(acc_t (*g)[kTile], acc_t (*p)[kTile], const acc_t (*sums)[kTile], int64_t n,
                            int64_t iters) {
  acc_t total[kTile];
  for (int64_t q = 0; q < n * n; ++q)
#pragma omp simd
    for (int64_t t = 0; t < kTile; ++t) g[q][t] *= p[q][t];
  for (int64_t step = 2 * iters - 1; step >= 0; --step) {
    const bool columns = step % 2;
    for (int64_t a = 0; a < n; ++a) {  // a column k (columns) or a row i
      const int64_t first = columns ? a : a * n, stride = columns ? n : 1;
      std::copy(g[first], g[first] + kTile, total);
      for (int64_t b = 1; b < n; ++b)
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) total[t] += g[first + b * stride][t];
      for (int64_t b = 0; b < n; ++b) {
        acc_t* gq = g[first + b * stride];
        acc_t* pq = p[first + b * stride];
        const acc_t* s = sums[step * n + a];
#pragma omp simd
        for (int64_t t = 0; t < kTile; ++t) {
          gq[t] -= pq[t] * total[t];
          pq[t] *= s[t];
        }
      }
    }
  }
}

// The projection of a tile of tokens: z[q][t] = sum_k x[t * len + k] * w[k * K + q] for the
// first `count` tokens of the tile (rows of x `len` long, x's dtype; w [len, K]), 0 in the
// lanes past them. Four tokens at a time, each row of K columns in vector lanes.
template <typename acc_t, typename scalar_t>
void project_tile(acc_t (*z)[kTile], const scalar_t* x, int64_t count, int64_t len, const acc_t* w, int64_t K) {
  acc_t rows[4][kMaxColumns];
  for (int64_t t0 = 0; t0 < kTile; t0 += 4) {
    for (auto& row : rows) std::fill(row, row + K, acc_t(0));
    if (t0 < count) {
      const int64_t used = std::min<int64_t>(4, count - t0);
      const scalar_t* x0 = x + t0 * len;
      const scalar_t* x1 = used > 1 ? x0 + len : x0;  // a repeated row for lanes past count: discarded
      const scalar_t* x2 = used > 2 ? x0 + 2 * len : x0;
      const scalar_t* x3 = used > 3 ? x0 + 3 * len : x0;
      for (int64_t k = 0; k < len; ++k) {
        const acc_t* wk = w + k * K;
        const acc_t v0 = x0[k], v1 = x1[k], v2 = x2[k], v3 = x3[k];
#pragma omp simd
        for (int64_t q = 0; q < K; ++q) {
          rows[0][q] += v0 * wk[q];
          rows[1][q] += v1 * wk[q];
          rows[2][q] += v2 * wk[q];
          rows[3][q] += v3 * wk[q];
        }
      }
      for (int64_t tt = used; tt < 4; ++tt) std::fill(rows[tt], rows[tt] + K, acc_t(0));
    }
    for (int64_t q = 0; q < K; ++q)
      for (int64_t tt = 0; tt < 4; ++tt) z[q][t0 + tt] = rows[tt][q];
  }
}

// The projection and its two backward products with float32 accumulation, in sixteen-lane
// vectors held in registers (GCC and Clang vector types); project_tile and the plain loops of
// pre_backward otherwise; the same for the stream mix and the post side's dot products.
// kFloatVectors<T>: whether the accumulation type T takes them.
#if defined(__GNUC__)
template <typename T>
constexpr bool kFloatVectors = std::is_same_v<T, float>;
typedef float float16_v __attribute__((vector_size(64)));
inline float16_v load16(const float* p) {
  float16_v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, float16_v v) { std::memcpy(p, &v, sizeof(v)); }

// sums[q + r, k + 16 h] += sum_t g[t, q + r] * x[t, k + 16 h] for r < 4, h < H: four columns
// by H sixteen-channel vectors in 4 * H accumulators (each x load serves four columns, each g
// broadcast H vectors).
template <int64_t H>
inline void phi_gradient_block(float* sums, const float* x, const float* g, int64_t count, int64_t len, int64_t K,
                               int64_t q, int64_t k) {
  float16_v a[4][H];
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t h = 0; h < H; ++h) a[r][h] = load16(sums + (q + r) * len + k + 16 * h);
  for (int64_t t = 0; t < count; ++t) {
    float16_v xv[H];
    for (int64_t h = 0; h < H; ++h) xv[h] = load16(x + t * len + k + 16 * h);
    const float* gt = g + t * K + q;
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t h = 0; h < H; ++h) a[r][h] += gt[r] * xv[h];
  }
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t h = 0; h < H; ++h) store16(sums + (q + r) * len + k + 16 * h, a[r][h]);
}

// sums [K, len] += g^T @ x: g [count, K], x [count, len] (len % 16 == 0); four columns at a time,
// sixty-four channels at a time where len allows, else sixteen (a remainder of K % 4 columns falls
// to the caller's loop: returns the first column left).
inline int64_t phi_gradient_tile(float* sums, const float* x, const float* g, int64_t count, int64_t len, int64_t K) {
  int64_t q = 0;
  for (; q + 4 <= K; q += 4) {
    int64_t k = 0;
    for (; k + 64 <= len; k += 64) phi_gradient_block<4>(sums, x, g, count, len, K, q, k);
    for (; k < len; k += 16) phi_gradient_block<1>(sums, x, g, count, len, K, q, k);
  }
  return q;
}

// The projection of a tile (as project_tile) with float32 streams: w_padded [len, KP] is w with
// its columns padded to KP (a multiple of 32); four tokens x 32 columns accumulate in eight
// vector registers.
inline void project_tile_float(float (*z)[kTile], const float* x, int64_t count, int64_t len,
                               const float* w_padded, int64_t K, int64_t KP) {
  for (int64_t t0 = 0; t0 < kTile; t0 += 4) {
    if (t0 >= count) {
      for (int64_t q = 0; q < K; ++q) std::fill(z[q] + t0, z[q] + t0 + 4, 0.0f);
      continue;
    }
    const int64_t used = std::min<int64_t>(4, count - t0);
    const float* x0 = x + t0 * len;
    const float* x1 = used > 1 ? x0 + len : x0;  // a repeated row for lanes past count: discarded
    const float* x2 = used > 2 ? x0 + 2 * len : x0;
    const float* x3 = used > 3 ? x0 + 3 * len : x0;
    for (int64_t g = 0; g < KP; g += 32) {
      float16_v a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
      for (int64_t k = 0; k < len; ++k) {
        const float16_v w0 = load16(w_padded + k * KP + g), w1 = load16(w_padded + k * KP + g + 16);
        a00 += x0[k] * w0;
        a01 += x0[k] * w1;
        a10 += x1[k] * w0;
        a11 += x1[k] * w1;
        a20 += x2[k] * w0;
        a21 += x2[k] * w1;
        a30 += x3[k] * w0;
        a31 += x3[k] * w1;
      }
      float rows[4][32];
      store16(rows[0], a00);
      store16(rows[0] + 16, a01);
      store16(rows[1], a10);
      store16(rows[1] + 16, a11);
      store16(rows[2], a20);
      store16(rows[2] + 16, a21);
      store16(rows[3], a30);
      store16(rows[3] + 16, a31);
      for (int64_t q = g; q < std::min(K, g + 32); ++q)
        for (int64_t tt = 0; tt < 4; ++tt) z[q][t0 + tt] = tt < used ? rows[tt][q - g] : 0.0f;
    }
  }
}

// out[t][0:64] += sum_q g[t][q] * wt[q * len : q * len + 64] for T tokens' g [K] at once: each
// load of phi^T serves all T.
template <int64_t T>
inline void through_projection_64(float* const* out, const float* const* g, const float* wt, int64_t len, int64_t K) {
  float16_v acc[T][4];
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < 4; ++h) acc[t][h] = load16(out[t] + 16 * h);
  for (int64_t q = 0; q < K; ++q) {
    float16_v w[4];
    for (int64_t h = 0; h < 4; ++h) w[h] = load16(wt + q * len + 16 * h);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < 4; ++h) acc[t][h] += g[t][q] * w[h];
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < 4; ++h) store16(out[t] + 16 * h, acc[t][h]);
}

// Sum of a vector's sixteen lanes, as a tree of halves (8 + 8, 4 + 4, 2 + 2, 1 + 1).
typedef float float8_v __attribute__((vector_size(32)));
typedef float float4_v __attribute__((vector_size(16)));
inline float lane_sum(float16_v v) {
  float8_v lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const float8_v eight = lo + hi;
  float4_v a, b;
  std::memcpy(&a, &eight, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&eight) + sizeof(a), sizeof(b));
  const float4_v four = a + b;
  return (four[0] + four[2]) + (four[1] + four[3]);
}

// out_i = sum_j coef[i * row_stride + j * col_stride] * in_j (+ extra_coef[i] * extra) for the
// rows in_j [C] of one token (j < n_in) and i < n_out: C % 16 == 0, float. Sixteen channels at a
// time: the n_in inputs in registers, one accumulator per output row.
inline void mix_rows_float(float* out, const float* in, int64_t n_out, int64_t n_in, int64_t C, const float* coef,
                           int64_t row_stride, int64_t col_stride, const float* extra_coef, const float* extra) {
  for (int64_t c = 0; c < C; c += 16) {
    float16_v inputs[kMaxStreams];
    for (int64_t j = 0; j < n_in; ++j) inputs[j] = load16(in + j * C + c);
    const float16_v more = extra ? load16(extra + c) : float16_v{};
    for (int64_t i = 0; i < n_out; ++i) {
      float16_v acc = extra ? extra_coef[i] * more : float16_v{};
      for (int64_t j = 0; j < n_in; ++j) acc += coef[i * row_stride + j * col_stride] * inputs[j];
      store16(out + i * C + c, acc);
    }
  }
}

// out[i * n_b + j] = <a_i, b_j> over C channels (C % 16 == 0, float) for rows a_i (i < N) and
// b_j (j < n_b <= N + 1), b_j at b_rows[j]: the dot products of one token, each in its own
// vector accumulator.
template <int64_t N>
inline void row_dots_float(float* out, const float* a, const float* const* b_rows, int64_t n_b, int64_t C) {
  float16_v acc[N][N + 1] = {};
  for (int64_t c = 0; c < C; c += 16) {
    float16_v b[N + 1];
    for (int64_t j = 0; j < n_b; ++j) b[j] = load16(b_rows[j] + c);
    for (int64_t i = 0; i < N; ++i) {
      const float16_v ai = load16(a + i * C + c);
      for (int64_t j = 0; j < n_b; ++j) acc[i][j] += ai * b[j];
    }
  }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < n_b; ++j) out[i * n_b + j] = lane_sum(acc[i][j]);
}
#else
template <typename T>
constexpr bool kFloatVectors = false;  // the calls below them are discarded statements then
#endif

// The post side's backward for token m from its gradient rows gm [n, C] (x's dtype):
// dL/dX[j] = sum_i H_res[i, j] g[i] and dL/dy = sum_i H_post[i] g[i] (x's dtype), dL/dH_post[i] =
// <g[i], y> and dL/dH_res[i, j] = <g[i], X[j]> (accumulation dtype); a null output is not needed.
// row: C accumulators of scratch.
template <typename scalar_t, typename acc_t>
inline void post_backward_token(int64_t m, const scalar_t* gm, const scalar_t* xs, const scalar_t* ys,
                                const acc_t* hp, const acc_t* hr, scalar_t* gx, scalar_t* gy, acc_t* gp, acc_t* gr,
                                int64_t n, int64_t C, acc_t* row) {
  const scalar_t* xm = xs + m * n * C;
  bool mixed = false, dotted = false;  // done in vector registers (mix_rows_float, row_dots_float)
  if constexpr (kFloatVectors<acc_t> && std::is_same_v<scalar_t, float>) {
    if (C % 16 == 0) {
      if (gx) mix_rows_float(gx + m * n * C, gm, n, n, C, hr + m * n * n, 1, n, nullptr, nullptr);
      if (gy) mix_rows_float(gy + m * C, gm, 1, n, C, hp + m * n, 0, 1, nullptr, nullptr);
      mixed = true;
      if (n == 4 && (gp || gr)) {
        const float* columns[5] = {xm, xm + C, xm + 2 * C, xm + 3 * C, ys + m * C};
        float dots[4 * 5];
        row_dots_float<4>(dots, gm, columns, 5, C);
        for (int64_t i = 0; i < 4; ++i) {
          if (gp) gp[m * 4 + i] = dots[i * 5 + 4];
          if (gr)
            for (int64_t j = 0; j < 4; ++j) gr[(m * 4 + i) * 4 + j] = dots[i * 5 + j];
        }
        dotted = true;
      }
    }
  }
  if (gx && !mixed) {
    for (int64_t j = 0; j < n; ++j) {
      std::fill(row, row + C, acc_t(0));
      for (int64_t i = 0; i < n; ++i) axpy(row, hr[(m * n + i) * n + j], gm + i * C, C);
      store(gx + (m * n + j) * C, row, C);
    }
  }
  if (gy && !mixed) {
    std::fill(row, row + C, acc_t(0));
    for (int64_t i = 0; i < n; ++i) axpy(row, hp[m * n + i], gm + i * C, C);
    store(gy + m * C, row, C);
  }
  if (dotted) return;
  for (int64_t i = 0; i < n; ++i) {
    if (gp) gp[m * n + i] = dot<acc_t>(gm + i * C, ys + m * C, C);
    if (gr)
      for (int64_t j = 0; j < n; ++j) gr[(m * n + i) * n + j] = dot<acc_t>(gm + i * C, xm + j * C, C);
  }
}

// f(scalar_t{}) for the stream dtype (float, double, bfloat16, half). A lambda, unlike the
// body of AT_DISPATCH_*, is no macro argument, so the loops inside can carry pragmas.
template <typename F>
void dispatch_streams(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "mhc_cpu: unsupported stream dtype ", type);
  }
}

at::ScalarType accumulation_type(at::ScalarType stream) {
  return stream == at::kDouble ? at::kDouble : at::kFloat;
}

void check_streams(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(),
              "mhc_cpu: streams must be a contiguous CPU tensor [M, n, C]");
  TORCH_CHECK(x.size(1) >= 1 && x.size(1) <= kMaxStreams, "mhc_cpu: n must be 1 to ", kMaxStreams);
}

// A contiguous CPU tensor of exactly `shape` and dtype `type` (the kernels read raw pointers).
void check_operand(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType type) {
  TORCH_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == type &&
                  t.sizes() == shape,
              "mhc_cpu: ", name, " must be a contiguous CPU ", type, " tensor of shape ", shape, ", got ",
              t.defined() ? t.sizes() : at::IntArrayRef{}, " ", t.defined() ? t.scalar_type() : type);
}

void check_optional(const c10::optional<at::Tensor>& t, const char* name, at::IntArrayRef shape, at::ScalarType type) {
  if (t.has_value() && t->defined()) check_operand(*t, name, shape, type);
}

// ------------------------------------------------------------------------------ pre side

// x [M, n, C], phi [nC, K], bias and gate [K] -> u [M, C] (x's dtype), rstd [M],
// d = (v @ phi) * rstd [M, K] (v = x as [M, nC] in the accumulation dtype), act [M, K] (sigmoid of
// the pre/post columns for mHC, whose res columns are unused; tanh of every column for HC),
// h_pre, h_post [M, n], h_res [M, n, n], by tiles of kTile tokens. The Sinkhorn sums stay in the
// tile's scratch: the backward recomputes them from d (pre_backward), which costs less than
// writing and reading them (2 * iters * n floats a token, more than half the stream's bytes at n = 4).
std::vector<at::Tensor> pre_forward(const at::Tensor& x, const at::Tensor& phi, const at::Tensor& bias,
                                    const at::Tensor& gate, bool sinkhorn, int64_t iters, double eps,
                                    double tiny) {
  check_streams(x);
  const int64_t M = x.size(0), n = x.size(1), C = x.size(2), K = n * n + 2 * n;
  const auto acc_type = accumulation_type(x.scalar_type());
  TORCH_CHECK(iters >= 0, "mhc_cpu.pre_forward: iters must be >= 0, got ", iters);
  check_operand(phi, "pre_forward: phi", {n * C, K}, acc_type);
  check_operand(bias, "pre_forward: bias", {K}, acc_type);
  check_operand(gate, "pre_forward: gate", {K}, acc_type);
  auto acc_opts = phi.options();
  auto u = at::empty({M, C}, x.options());
  auto rstd = at::empty({M}, acc_opts);
  auto d = at::empty({M, K}, acc_opts);
  auto act = at::empty({M, K}, acc_opts);
  auto h_pre = at::empty({M, n}, acc_opts);
  auto h_post = at::empty({M, n}, acc_opts);
  auto h_res = at::empty({M, n, n}, acc_opts);
  const int64_t steps = sinkhorn ? 2 * iters : 0;
  dispatch_streams(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    using lanes_t = acc_t[kTile];
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const acc_t *ws = phi.data_ptr<acc_t>(), *bs = bias.data_ptr<acc_t>(), *gs = gate.data_ptr<acc_t>();
    scalar_t* us = u.data_ptr<scalar_t>();
    acc_t *rs = rstd.data_ptr<acc_t>(), *ds = d.data_ptr<acc_t>(), *as = act.data_ptr<acc_t>();
    acc_t *pre = h_pre.data_ptr<acc_t>(), *post = h_post.data_ptr<acc_t>(), *res = h_res.data_ptr<acc_t>();
    constexpr bool vectors = kFloatVectors<acc_t> && std::is_same_v<scalar_t, float>;
    const int64_t K_padded = (K + 31) / 32 * 32;
    std::vector<acc_t> w_padded;  // phi with its columns padded to K_padded, for project_tile_float
    if constexpr (vectors) {
      w_padded.assign(n * C * K_padded, acc_t(0));
      for (int64_t k = 0; k < n * C; ++k) std::copy(ws + k * K, ws + (k + 1) * K, w_padded.data() + k * K_padded);
    }
    at::parallel_for(0, tiles_of(M), std::max<int64_t>(1, grain_for(2 * n * C) / kTile), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(C);
      std::vector<acc_t> scratch_buffer(std::max<int64_t>(1, steps * n) * kTile);  // the tile's Sinkhorn sums
      lanes_t* scratch = reinterpret_cast<lanes_t*>(scratch_buffer.data());
      lanes_t proj[kMaxColumns];  // the tile's v @ phi, column-major
      lanes_t z[kMaxColumns];  // the tile's logits (bias + d * gate), then its activations, column-major
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t m0 = tile * kTile, count = std::min(kTile, M - m0);
        if constexpr (vectors)
          project_tile_float(proj, xs + m0 * n * C, count, n * C, w_padded.data(), K, K_padded);
        else
          project_tile(proj, xs + m0 * n * C, count, n * C, ws, K);
        for (int64_t t = 0; t < kTile; ++t) {
          const int64_t m = m0 + t;
          if (t >= count) {  // lanes past the last token: any finite logits
            for (int64_t q = 0; q < K; ++q) z[q][t] = 0;
            continue;
          }
          const scalar_t* xm = xs + m * n * C;
          const acc_t r = acc_t(1) / std::sqrt(dot<acc_t>(xm, xm, n * C) / acc_t(n * C) + acc_t(eps));
          rs[m] = r;
          for (int64_t q = 0; q < K; ++q) {
            const acc_t dq = proj[q][t] * r;
            ds[m * K + q] = dq;
            z[q][t] = bs[q] + dq * gs[q];
          }
        }
        if (sinkhorn) {
          for (int64_t j = 0; j < 2 * n; ++j)
#pragma omp simd
            for (int64_t t = 0; t < kTile; ++t) z[j][t] = acc_t(1) / (acc_t(1) + coef_exp(-z[j][t]));
          sinkhorn_tile(z + 2 * n, scratch, n, iters, acc_t(tiny));
        } else {
          for (int64_t q = 0; q < K; ++q)
            for (int64_t t = 0; t < count; ++t) z[q][t] = std::tanh(ds[(m0 + t) * K + q]);
        }
        for (int64_t t = 0; t < count; ++t) {
          const int64_t m = m0 + t;
          for (int64_t q = 0; q < K; ++q) as[m * K + q] = sinkhorn && q >= 2 * n ? acc_t(0) : z[q][t];
          for (int64_t j = 0; j < n; ++j) {
            if (sinkhorn) {
              pre[m * n + j] = z[j][t];
              post[m * n + j] = z[n + j][t] * acc_t(2);
            } else {
              pre[m * n + j] = bs[j] + z[j][t] * gs[j];
              post[m * n + j] = bs[n + j] + z[n + j][t] * gs[n + j];
            }
          }
          for (int64_t q = 2 * n; q < K; ++q)
            res[m * n * n + q - 2 * n] = sinkhorn ? z[q][t] : bs[q] + z[q][t] * gs[q];
          const scalar_t* xm = xs + m * n * C;
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t j = 0; j < n; ++j) axpy(row.data(), pre[m * n + j], xm + j * C, C);
          store(us + m * C, row.data(), C);
        }
      }
    });
  });
  return {u, rstd, d, act, h_pre, h_post, h_res};
}

// The pre side's backward, one pass over tiles of kTile tokens. Per tile, from the gradients of
// u [M, C] (x's dtype), of h_post [M, n] and of h_res [M, n, n] (each may be undefined):
//   1. the coefficients' backward: the column gradients through the sigmoids (mHC) or tanh (HC)
//      and through Sinkhorn-Knopp, whose iterations are recomputed from the saved d (the forward's
//      own arithmetic: the same bits), to g_proj = dL/d(v @ phi) [kTile, K] and the per-token
//      factor of the rstd term, both on the stack; the gradients of bias [K] and alpha [3] summed;
//   2. while the tile of x is in the L1 cache:
//      dL/dX = g_proj @ phi^T + X * per_token + h_pre (x) g_u + more (a gradient of X from
//      elsewhere: the fused post + pre side's X_next output) [M, n, C] in x's dtype, and
//      dL/dphi += v^T @ g_proj [nC, K] (accumulation dtype), summed per thread, then over them.
// phi_t = phi^T [K, nC], bias and gate [K], d and act [M, K], rstd [M], h_pre [M, n] in the
// accumulation dtype. dL/dX and dL/dphi come back undefined where need_x / need_phi is false.
// The fused post + pre side (x_prev defined, with y, h_post_prev, h_res_prev: X = H_res_prev X_prev +
// H_post_prev (x) y): each token's dL/dX, rounded to x's dtype, stays in the tile's scratch and
// goes straight on through the post side's backward (post_backward_token) to dL/dX_prev, dL/dy,
// dL/dH_post_prev and dL/dH_res_prev (as post_needs says), instead of dL/dX.
// Returns {dX, dphi, dbias, dalpha, dX_prev, dy, dH_post_prev, dH_res_prev}.
std::vector<c10::optional<at::Tensor>> pre_backward(
    const at::Tensor& x, const at::Tensor& phi_t, const at::Tensor& bias, const at::Tensor& gate,
    const at::Tensor& rstd, const at::Tensor& d, const at::Tensor& act, const at::Tensor& h_pre,
    const c10::optional<at::Tensor>& g_u, const c10::optional<at::Tensor>& g_post,
    const c10::optional<at::Tensor>& g_res, const c10::optional<at::Tensor>& more, bool sinkhorn, int64_t iters,
    double tiny, bool need_x, bool need_phi, const c10::optional<at::Tensor>& x_prev,
    const c10::optional<at::Tensor>& y, const c10::optional<at::Tensor>& h_post_prev,
    const c10::optional<at::Tensor>& h_res_prev, at::IntArrayRef post_needs) {
  check_streams(x);
  const int64_t M = x.size(0), n = x.size(1), C = x.size(2), K = n * n + 2 * n, len = n * C;
  const bool has_u = g_u.has_value() && g_u->defined();
  const bool has_post = g_post.has_value() && g_post->defined();
  const bool has_res = g_res.has_value() && g_res->defined();
  const bool has_more = more.has_value() && more->defined();
  const auto acc_type = accumulation_type(x.scalar_type());
  TORCH_CHECK(iters >= 0, "mhc_cpu.pre_backward: iters must be >= 0, got ", iters);
  check_operand(phi_t, "pre_backward: phi_t", {K, len}, acc_type);
  check_operand(bias, "pre_backward: bias", {K}, acc_type);
  check_operand(gate, "pre_backward: gate", {K}, acc_type);
  check_operand(rstd, "pre_backward: rstd", {M}, acc_type);
  check_operand(d, "pre_backward: d", {M, K}, acc_type);
  check_operand(act, "pre_backward: act", {M, K}, acc_type);
  check_operand(h_pre, "pre_backward: h_pre", {M, n}, acc_type);
  check_optional(g_u, "pre_backward: g_u", {M, C}, x.scalar_type());
  check_optional(g_post, "pre_backward: g_post", {M, n}, acc_type);
  check_optional(g_res, "pre_backward: g_res", {M, n, n}, acc_type);
  check_optional(more, "pre_backward: more", {M, n, C}, x.scalar_type());
  const bool fused = x_prev.has_value() && x_prev->defined();
  TORCH_CHECK(!fused || (need_x && post_needs.size() == 4), "mhc_cpu.pre_backward: the fused post side needs "
              "need_x and four post_needs");
  const bool need_x_prev = fused && post_needs[0], need_y = fused && post_needs[1];
  const bool need_post_prev = fused && post_needs[2], need_res_prev = fused && post_needs[3];
  if (fused) {
    TORCH_CHECK(y.has_value() && y->defined() && h_post_prev.has_value() && h_post_prev->defined() &&
                    h_res_prev.has_value() && h_res_prev->defined(),
                "mhc_cpu.pre_backward: x_prev needs y, h_post_prev and h_res_prev");
    check_operand(*x_prev, "pre_backward: x_prev", {M, n, C}, x.scalar_type());
    check_operand(*y, "pre_backward: y", {M, C}, x.scalar_type());
    check_operand(*h_post_prev, "pre_backward: h_post_prev", {M, n}, acc_type);
    check_operand(*h_res_prev, "pre_backward: h_res_prev", {M, n, n}, acc_type);
  }
  auto acc_opts = d.options();
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, 2, K}, acc_opts);  // per thread: bias and alpha column sums
  at::Tensor g_x = need_x && !fused ? at::empty_like(x) : at::Tensor();
  at::Tensor phi_partial = need_phi ? at::zeros({threads, K, len}, acc_opts) : at::Tensor();  // dphi^T per thread
  at::Tensor g_x_prev = need_x_prev ? at::empty_like(x) : at::Tensor();
  at::Tensor g_y = need_y ? at::empty_like(*y) : at::Tensor();
  at::Tensor g_post_prev = need_post_prev ? at::empty_like(*h_post_prev) : at::Tensor();
  at::Tensor g_res_prev = need_res_prev ? at::empty_like(*h_res_prev) : at::Tensor();
  const int64_t steps = sinkhorn ? 2 * iters : 0;
  dispatch_streams(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    using lanes_t = acc_t[kTile];
    constexpr int64_t kBlock = 64;  // channels per accumulator block
    const scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* gus = has_u ? g_u->data_ptr<scalar_t>() : nullptr;
    const scalar_t* mores = has_more ? more->data_ptr<scalar_t>() : nullptr;
    const acc_t* gps = has_post ? g_post->data_ptr<acc_t>() : nullptr;
    const acc_t* grs = has_res ? g_res->data_ptr<acc_t>() : nullptr;
    const acc_t *wt = phi_t.data_ptr<acc_t>(), *bs = bias.data_ptr<acc_t>(), *gs = gate.data_ptr<acc_t>();
    const acc_t *rs = rstd.data_ptr<acc_t>(), *ds = d.data_ptr<acc_t>(), *as = act.data_ptr<acc_t>();
    const acc_t* hp = h_pre.data_ptr<acc_t>();
    acc_t* parts = partial.data_ptr<acc_t>();
    scalar_t* out = need_x && !fused ? g_x.data_ptr<scalar_t>() : nullptr;
    acc_t* phi_parts = need_phi ? phi_partial.data_ptr<acc_t>() : nullptr;
    const scalar_t* xps = fused ? x_prev->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ys = fused ? y->data_ptr<scalar_t>() : nullptr;
    const acc_t* hpp = fused ? h_post_prev->data_ptr<acc_t>() : nullptr;
    const acc_t* hrp = fused ? h_res_prev->data_ptr<acc_t>() : nullptr;
    scalar_t* gxp = need_x_prev ? g_x_prev.data_ptr<scalar_t>() : nullptr;
    scalar_t* gys = need_y ? g_y.data_ptr<scalar_t>() : nullptr;
    acc_t* gpp = need_post_prev ? g_post_prev.data_ptr<acc_t>() : nullptr;
    acc_t* grp = need_res_prev ? g_res_prev.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, tiles_of(M), std::max<int64_t>(1, grain_for(2 * K * len + 4 * n * n * iters) / kTile),
                     [&](int64_t begin, int64_t end) {
      acc_t* bias_sums = parts + at::get_thread_num() * 2 * K;
      acc_t* alpha_sums = bias_sums + K;
      acc_t* phi_sums = need_phi ? phi_parts + at::get_thread_num() * K * len : nullptr;
      std::vector<acc_t> sums_buffer(std::max<int64_t>(1, steps * n) * kTile);  // the tile's recomputed Sinkhorn sums
      lanes_t* sums = reinterpret_cast<lanes_t*>(sums_buffer.data());
      lanes_t cols[kMaxColumns];  // the tile's column gradients
      lanes_t p[kMaxStreams * kMaxStreams];  // its logits, then its doubly stochastic matrices
      acc_t g_proj[kTile * kMaxColumns];  // token-major [kTile, K]
      acc_t per_token[kTile];
      acc_t block[kBlock], block_b[kBlock];
      std::vector<scalar_t> mid(fused ? kTile * len : 0);  // fused: the tile's dL/dX, token-major
      std::vector<acc_t> row(fused ? C : 0);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t m0 = tile * kTile, count = std::min(kTile, M - m0);
        for (int64_t t = 0; t < kTile; ++t) {
          const int64_t m = m0 + t;
          if (t >= count) {  // lanes past the last token: zero gradients, logits as the forward's
            for (int64_t q = 0; q < K; ++q) cols[q][t] = 0;
            for (int64_t q = 0; q < n * n; ++q) p[q][t] = 0;
            continue;
          }
          const scalar_t* xm = xs + m * n * C;
          const acc_t* am = as + m * K;
          bool done = false;  // dL/dH_pre[j] = <X_j, g_u>
          if constexpr (kFloatVectors<acc_t> && std::is_same_v<scalar_t, float>) {
            if (has_u && n == 4 && C % 16 == 0) {
              const float* g_row = gus + m * C;
              float dots[4];
              row_dots_float<4>(dots, xm, &g_row, 1, C);
              for (int64_t j = 0; j < 4; ++j) cols[j][t] = dots[j];
              done = true;
            }
          }
          if (!done)
            for (int64_t j = 0; j < n; ++j) cols[j][t] = has_u ? dot<acc_t>(xm + j * C, gus + m * C, C) : acc_t(0);
          for (int64_t i = 0; i < n; ++i) cols[n + i][t] = has_post ? gps[m * n + i] : acc_t(0);
          for (int64_t q = 2 * n; q < K; ++q) cols[q][t] = has_res ? grs[m * n * n + q - 2 * n] : acc_t(0);
          if (sinkhorn) {
            for (int64_t i = 0; i < n; ++i) cols[n + i][t] *= acc_t(2);
            for (int64_t j = 0; j < 2 * n; ++j) cols[j][t] *= am[j] * (acc_t(1) - am[j]);
            for (int64_t q = 2 * n; q < K; ++q) p[q - 2 * n][t] = bs[q] + ds[m * K + q] * gs[q];
          }
        }
        if (sinkhorn && has_res) {
          sinkhorn_tile(p, sums, n, iters, acc_t(tiny));
          sinkhorn_backward_tile(cols + 2 * n, p, sums, n, iters);
        }
        for (int64_t t = 0; t < count; ++t) {
          const int64_t m = m0 + t;
          const acc_t* dm = ds + m * K;
          const acc_t* am = as + m * K;
          const acc_t* alpha_factor = sinkhorn ? dm : am;  // d(h)/d(alpha) per column: d, or tanh(d)
          const acc_t r = rs[m];
          acc_t along_d = 0;
          for (int64_t q = 0; q < K; ++q) {
            const acc_t gq = cols[q][t];
            bias_sums[q] += gq;
            alpha_sums[q] += gq * alpha_factor[q];
            acc_t g_d = gq * gs[q];
            if (!sinkhorn) g_d *= acc_t(1) - am[q] * am[q];
            along_d += g_d * dm[q];
            g_proj[t * K + q] = g_d * r;
          }
          per_token[t] = along_d * r * r / -acc_t(n * C);
        }
        if (need_phi) {  // dphi^T[q, k] += sum over the tile's tokens of g_proj[t, q] * v[t, k]
          int64_t q = 0;
          if constexpr (kFloatVectors<acc_t> && std::is_same_v<scalar_t, float>)
            if (len % 16 == 0) q = phi_gradient_tile(phi_sums, xs + m0 * len, g_proj, count, len, K);
          for (; q < K; ++q)
            for (int64_t k0 = 0; k0 < len; k0 += kBlock) {
              const int64_t width = std::min(kBlock, len - k0);
              acc_t* sums_q = phi_sums + q * len + k0;
              std::copy(sums_q, sums_q + width, block);
              for (int64_t t = 0; t < count; ++t) axpy(block, g_proj[t * K + q], xs + (m0 + t) * len + k0, width);
              std::copy(block, block + width, sums_q);
            }
        }
        if (!need_x) continue;
        // a token's block of dX before the projection's term: X * per_token + h_pre (x) g_u + more
        auto start_block = [&](acc_t* dst, int64_t t, int64_t j, int64_t c0, int64_t width) {
          const int64_t m = m0 + t, base = (m * n + j) * C + c0;
          const scalar_t* xr = xs + base;
#pragma omp simd
          for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<acc_t>(xr[c]) * per_token[t];
          if (has_u) axpy(dst, hp[m * n + j], gus + m * C + c0, width);
          if (has_more) axpy(dst, acc_t(1), mores + base, width);
        };
        auto finish_block = [&](const acc_t* src, int64_t t, int64_t j, int64_t c0, int64_t width) {
          store(fused ? mid.data() + t * len + j * C + c0 : out + ((m0 + t) * n + j) * C + c0, src, width);
        };
        for (int64_t t = 0; t < count; t += 2) {  // two tokens at a time: each phi^T load serves both
          const bool pair = t + 1 < count;
          const acc_t* ga = g_proj + t * K;
          const acc_t* gb = g_proj + (t + 1) * K;
          for (int64_t j = 0; j < n; ++j)
            for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
              const int64_t width = std::min(kBlock, C - c0);
              const acc_t* wj = wt + j * C + c0;  // phi^T's columns of this block, row q at wj + q * len
              start_block(block, t, j, c0, width);
              if (pair) start_block(block_b, t + 1, j, c0, width);
              if (kFloatVectors<acc_t> && width == kBlock) {
                if constexpr (kFloatVectors<acc_t>) {
                  float* blocks[2] = {block, block_b};
                  const float* grads[2] = {ga, gb};
                  if (pair)
                    through_projection_64<2>(blocks, grads, wj, len, K);
                  else
                    through_projection_64<1>(blocks, grads, wj, len, K);
                }
              } else {
                for (int64_t q = 0; q < K; ++q) axpy(block, ga[q], wj + q * len, width);
                if (pair)
                  for (int64_t q = 0; q < K; ++q) axpy(block_b, gb[q], wj + q * len, width);
              }
              finish_block(block, t, j, c0, width);
              if (pair) finish_block(block_b, t + 1, j, c0, width);
            }
        }
        if (fused)
          for (int64_t t = 0; t < count; ++t)
            post_backward_token(m0 + t, mid.data() + t * len, xps, ys, hpp, hrp, gxp, gys, gpp, grp, n, C, row.data());
      }
    });
  });
  auto column_sums = partial.sum(0);  // [2, K]
  auto by_column = column_sums[1];
  auto g_alpha = at::stack({by_column.slice(0, 0, n).sum(), by_column.slice(0, n, 2 * n).sum(),
                            by_column.slice(0, 2 * n, K).sum()});
  at::Tensor g_phi = need_phi ? phi_partial.sum(0).t() : at::Tensor();  // [nC, K]
  auto maybe = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  return {maybe(g_x), maybe(g_phi), column_sums[0], g_alpha,
          maybe(g_x_prev), maybe(g_y), maybe(g_post_prev), maybe(g_res_prev)};
}

// ----------------------------------------------------------------------------- post side

// X_next = H_res @ X + H_post (x) y: x [M, n, C], y [M, C] (x's dtype), h_post [M, n],
// h_res [M, n, n] (accumulation dtype) -> [M, n, C] (x's dtype).
at::Tensor post_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h_post, const at::Tensor& h_res) {
  check_streams(x);
  const int64_t M = x.size(0), n = x.size(1), C = x.size(2);
  const auto acc_type = accumulation_type(x.scalar_type());
  check_operand(y, "post_forward: y", {M, C}, x.scalar_type());
  check_operand(h_post, "post_forward: h_post", {M, n}, acc_type);
  check_operand(h_res, "post_forward: h_res", {M, n, n}, acc_type);
  auto out = at::empty_like(x);
  dispatch_streams(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xs = x.data_ptr<scalar_t>(), *ys = y.data_ptr<scalar_t>();
    const acc_t *hp = h_post.data_ptr<acc_t>(), *hr = h_res.data_ptr<acc_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain_for(n * n * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(C);
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* xm = xs + m * n * C;
        if constexpr (kFloatVectors<acc_t> && std::is_same_v<scalar_t, float>) {
          if (C % 16 == 0) {
            mix_rows_float(os + m * n * C, xm, n, n, C, hr + m * n * n, n, 1, hp + m * n, ys + m * C);
            continue;
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          std::fill(row.begin(), row.end(), acc_t(0));
          for (int64_t j = 0; j < n; ++j) axpy(row.data(), hr[(m * n + i) * n + j], xm + j * C, C);
          axpy(row.data(), hp[m * n + i], ys + m * C, C);
          store(os + (m * n + i) * C, row.data(), C);
        }
      }
    });
  });
  return out;
}

// The post side's backward from g = dL/dX_next [M, n, C] (x's dtype): dL/dX [M, n, C] and
// dL/dy [M, C] (x's dtype), dL/dH_post [M, n] and dL/dH_res [M, n, n] (accumulation dtype);
// a gradient that is not needed comes back undefined.
std::vector<c10::optional<at::Tensor>> post_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y,
                                      const at::Tensor& h_post, const at::Tensor& h_res, bool need_x, bool need_y,
                                      bool need_post, bool need_res) {
  check_streams(x);
  const int64_t M = x.size(0), n = x.size(1), C = x.size(2);
  const auto acc_type = accumulation_type(x.scalar_type());
  check_operand(g, "post_backward: g", {M, n, C}, x.scalar_type());
  check_operand(y, "post_backward: y", {M, C}, x.scalar_type());
  check_operand(h_post, "post_backward: h_post", {M, n}, acc_type);
  check_operand(h_res, "post_backward: h_res", {M, n, n}, acc_type);
  at::Tensor g_x = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor g_y = need_y ? at::empty_like(y) : at::Tensor();
  at::Tensor g_post = need_post ? at::empty_like(h_post) : at::Tensor();
  at::Tensor g_res = need_res ? at::empty_like(h_res) : at::Tensor();
  dispatch_streams(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gs = g.data_ptr<scalar_t>(), *xs = x.data_ptr<scalar_t>(), *ys = y.data_ptr<scalar_t>();
    const acc_t *hp = h_post.data_ptr<acc_t>(), *hr = h_res.data_ptr<acc_t>();
    scalar_t* gx = need_x ? g_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* gy = need_y ? g_y.data_ptr<scalar_t>() : nullptr;
    acc_t* gp = need_post ? g_post.data_ptr<acc_t>() : nullptr;
    acc_t* gr = need_res ? g_res.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, M, grain_for(3 * n * n * C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row(C);
      for (int64_t m = begin; m < end; ++m)
        post_backward_token(m, gs + m * n * C, xs, ys, hp, hr, gx, gy, gp, gr, n, C, row.data());
    });
  });
  auto maybe = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  return {maybe(g_x), maybe(g_y), maybe(g_post), maybe(g_res)};
}

}  // namespace

TORCH_LIBRARY(mhc_cpu, m) {
  m.def("pre_forward(Tensor x, Tensor phi, Tensor bias, Tensor gate, bool sinkhorn, int iters, float eps, "
        "float tiny) -> Tensor[]");
  m.def("pre_backward(Tensor x, Tensor phi_t, Tensor bias, Tensor gate, Tensor rstd, Tensor d, Tensor act, "
        "Tensor h_pre, Tensor? g_u, Tensor? g_post, Tensor? g_res, Tensor? more, bool sinkhorn, int iters, "
        "float tiny, bool need_x, bool need_phi, Tensor? x_prev, Tensor? y, Tensor? h_post_prev, "
        "Tensor? h_res_prev, int[] post_needs) -> Tensor?[]");
  m.def("post_forward(Tensor x, Tensor y, Tensor h_post, Tensor h_res) -> Tensor");
  m.def("post_backward(Tensor g, Tensor x, Tensor y, Tensor h_post, Tensor h_res, bool need_x, bool need_y, "
        "bool need_post, bool need_res) -> Tensor?[]");
}

TORCH_LIBRARY_IMPL(mhc_cpu, CPU, m) {
  m.impl("pre_forward", &pre_forward);
  m.impl("pre_backward", &pre_backward);
  m.impl("post_forward", &post_forward);
  m.impl("post_backward", &post_backward);
}
