// A product for the few rows of a decoding step that reads the weight once: y = x W^T.
//
// x: M x K float32, W: N x K float32 or bfloat16 (its bits widened to float32 as they are
// read), y: M x N float32; row-major and contiguous. Each thread takes chunks of W's rows; for
// each group of NW rows it keeps NW x MR sums in registers and streams the group's rows once per
// block of MR rows of x (a later block finds the group in L1). The next group is prefetched
// while this one is summed: without that a single core's stream stalled and 4 rows cost 1.3x
// one (measured, Xeon AVX-512). Sums run in float32 whatever W's type.
// Built by bot/engine/skinny.py with -march=native; see that module for why it exists.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
typedef __m512 vec;
// 24 sums, 3 weights and one x of 32 registers: one pass over a group serves 8 rows. With 4 x 4
// (two passes for 8 rows, the second from L1) a step of 8 rows cost 1.5-2.0x one; with 3 x 8,
// 1.2-1.4x (Xeon AVX-512, two threads, 5 Dec 2026, three runs; 2 x 8, 2 x 12, 4 x 6, 4 x 8 in
// between; see skinny.py).
enum { VW = 16, NW = 3, MR = 8 };
// x's vector in a register of its own: left to itself GCC folds x's loads into the FMAs, one
// load per weight row (18 loads for 16 FMAs at 2 x 8), and the sums waited on the loads.
static inline void pin(__m512 &v) { __asm__("" : "+v"(v)); }
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec vload(const uint16_t *p) {  // bfloat16: the high half of a float32
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
// 16 sums in 16 registers (the compiler keeps a few on the stack): one pass over a group serves
// 8 rows. With 4 rows a pass (8 sums, all in registers) a step of 8 rows cost 1.4-1.6x one row;
// with 8 it costs 1.1x (AVX2 EPYC, two threads, 29 Nov 2026; 2x6, 3x4, 3x5, 1x8 in between).
enum { VW = 8, NW = 2, MR = 8 };
static inline void pin(__m256 &) {}  // not measured on AVX2: GCC's own choice is kept there
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vec vload(const uint16_t *p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#else
#error "the skinny product needs AVX2 with FMA, or AVX-512"
#endif

static inline float scalar(float v) { return v; }
static inline float scalar(uint16_t v) {
  const uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// An extension of each dot product (E columns, a multiple of VW; 0: none): row m of x goes on
// with low[m, :] and weight row n with bt[n, :]. The engine's per-row LoRA correction rides on
// it: low = (x A^T) * mask, bt = the stacked B factors, so y = x W^T + low B^T in one pass,
// the factors streamed with the weights instead of read cold by separate small products.
template <int R, int G, typename T>
static inline void group(const float *x, const T *w, float *y, long K, long N, const float *low,
                         const float *bt, long E) {
  const long kv = K - K % VW;
  vec acc[G][R];
#pragma GCC unroll 16
  for (int j = 0; j < G; j++)
#pragma GCC unroll 16
    for (int m = 0; m < R; m++) acc[j][m] = vzero();
  for (long k = 0; k < kv; k += VW) {
    vec wv[G];
#pragma GCC unroll 16
    for (int j = 0; j < G; j++) {
      wv[j] = vload(w + j * K + k);
      // the same place in the next group: a steady stream ahead of the sums
      _mm_prefetch((const char *)(w + (j + G) * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int m = 0; m < R; m++) {
      vec xv = vload(x + m * K + k);
      pin(xv);
#pragma GCC unroll 16
      for (int j = 0; j < G; j++) acc[j][m] = vfma(wv[j], xv, acc[j][m]);
    }
  }
  for (long e = 0; e < E; e += VW) {
    vec bv[G];
#pragma GCC unroll 16
    for (int j = 0; j < G; j++) bv[j] = vload(bt + j * E + e);
#pragma GCC unroll 16
    for (int m = 0; m < R; m++) {
      vec lv = vload(low + m * E + e);
      pin(lv);
#pragma GCC unroll 16
      for (int j = 0; j < G; j++) acc[j][m] = vfma(bv[j], lv, acc[j][m]);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < G; j++)
#pragma GCC unroll 16
    for (int m = 0; m < R; m++) {
      float s = vsum(acc[j][m]);
      for (long k = kv; k < K; k++) s += scalar(w[j * K + k]) * x[m * K + k];
      y[m * N + j] = s;
    }
}

// The last M < MR rows of x: one pass of a group sized for exactly M rows (R counts down to it).
template <int R, int G, typename T>
static inline void rest(const float *x, const T *w, float *y, long M, long K, long N,
                        const float *low, const float *bt, long E) {
  if constexpr (R > 0) {
    if (M == R)
      group<R, G, T>(x, w, y, K, N, low, bt, E);
    else
      rest<R - 1, G, T>(x, w, y, M, K, N, low, bt, E);
  }
}

template <int G, typename T>
static void rows_of_group(const float *x, const T *w, float *y, long M, long K, long N,
                          const float *low, const float *bt, long E) {
  long m = 0;
  for (; m + MR <= M; m += MR)
    group<MR, G, T>(x + m * K, w, y + m * N, K, N, low + m * E, bt, E);
  rest<MR - 1, G, T>(x + m * K, w, y + m * N, M - m, K, N, low + m * E, bt, E);
}

extern "C" int skinny_vector_width(void) { return VW; }

// The chunks of one product, shared among the threads of the enclosing parallel region (run
// alone, outside one, it is the whole product on this thread). No barrier at its end: the
// region's own end is one, and a caller that reads y inside the region puts one itself.
template <typename T>
static void product_tasks(const float *x, const T *w, float *y, long M, long K, long N,
                          int threads, const float *low, const float *bt, long E) {
  // chunks of whole groups, about four a thread (k and v projections have few rows)
  long chunk = (N + threads * 4 - 1) / (threads * 4);
  chunk = (chunk + NW - 1) / NW * NW;
  if (chunk < 2 * NW) chunk = 2 * NW;
  if (chunk > 256) chunk = 256 / NW * NW;
  const long tasks = (N + chunk - 1) / chunk;
#pragma omp for schedule(static) nowait
  for (long t = 0; t < tasks; t++) {
    const long n1 = (t + 1) * chunk < N ? (t + 1) * chunk : N;
    long n = t * chunk;
    for (; n + NW <= n1; n += NW)
      rows_of_group<NW, T>(x, w + n * K, y + n, M, K, N, low, bt + n * E, E);
    for (; n < n1; n++) rows_of_group<1, T>(x, w + n * K, y + n, M, K, N, low, bt + n * E, E);
  }
}

template <typename T>
static void product(const float *x, const T *w, float *y, long M, long K, long N, int threads,
                    const float *low, const float *bt, long E) {
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
  product_tasks<T>(x, w, y, M, K, N, threads, low, bt, E);
}

extern "C" void skinny_linear(const float *x, const float *w, float *y, long M, long K, long N,
                              int threads) {
  product<float>(x, w, y, M, K, N, threads, nullptr, nullptr, 0);
}

extern "C" void skinny_linear_bf16(const float *x, const uint16_t *w, float *y, long M, long K,
                                   long N, int threads) {
  product<uint16_t>(x, w, y, M, K, N, threads, nullptr, nullptr, 0);
}

// y = x W^T + ((x a^T) * mask) bt^T, the engine's per-row LoRA correction of a decoding step
// in one call: a (E x K) the stacked A factors, mask (M x E) which of their columns apply to
// which row, bt (N x E) the stacked, scaled B factors; E a multiple of skinny_vector_width().
// The low-rank product is a small product of its own (E outputs), then each of the weight's
// dot products goes on over its E columns, the factors streamed with the weight.
extern "C" void skinny_linear_corrected(const float *x, const float *w, float *y, long M, long K,
                                        long N, int threads, const float *a, const float *mask,
                                        const float *bt, long E) {
  if (threads < 1) threads = 1;
  float *low = new float[M * E];
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    product_tasks<float>(x, a, low, M, K, E, threads, nullptr, nullptr, 0);
#pragma omp barrier
#pragma omp for schedule(static)
    for (long i = 0; i < M * E; i++) low[i] *= mask[i];  // then a barrier
    product_tasks<float>(x, w, y, M, K, N, threads, low, bt, E);
  }
  delete[] low;
}
