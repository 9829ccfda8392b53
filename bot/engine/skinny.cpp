// A product for the few rows of a decoding step that reads the weight once: y = x W^T.
//
// x: M x K float32, W: N x K float32 or bfloat16 (its bits widened to float32 as they are
// read), y: M x N float32; row-major and contiguous. Each thread takes chunks of W's rows; for
// each group of NW rows it keeps NW x MR sums in registers and streams the group's rows once per
// block of MR rows of x (a later block finds the group in L1). The next group is prefetched
// while this one is summed: without that a single core's stream stalled and 4 rows cost 1.3x
// one (measured, Xeon AVX-512). Sums run in float32 whatever W's type. Which NW x MR is fastest
// depends on the CPU and the row count, so several shapes are built and a table chooses one by
// row count (`skinny_set_shape`, set from measurements: bot/engine/kernels.py).
// Built by bot/engine/skinny.py with -march=native; see that module for why it exists.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <memory>
#include <vector>

#if defined(__AVX512F__)
typedef __m512 vec;
// Shapes NW x MR (sums, weights and one x within 32 registers). 3 x 8, one pass over a group
// for 8 rows: with 4 x 4 (two passes for 8 rows, the second from L1) a step of 8 rows cost
// 1.5-2.0x one, with 3 x 8 1.2-1.4x (Xeon AVX-512, two threads, 5 Dec 2026; 2 x 8, 2 x 12,
// 4 x 6, 4 x 8 in between). On an AVX-512 EPYC (two threads, 6 Dec 2026) 4 x 6 and 5 x 5 ran
// a prefill's products faster: over SmolLM2's layer weights, time ÷ 3 x 8's at 32 rows 0.78 and
// 0.77, at 147 rows 0.85 and 0.81 (1-4 rows: within 1-3 %). Where more rows share a group's
// pass, x's rows come from L2 (24 of 576 floats: 55 KB), and fewer x loads per sum (6 or 5
// instead of 8 for 24-25 sums) win. An 8-row decoding step in the layer step stayed fastest
// with 3 x 8 (12.2-13.1 ms against 14.4-14.6 and 16.6-17.1). The first is the default.
enum { VW = 16 };
#define SHAPES(X) X(0, 3, 8) X(1, 4, 6) X(2, 5, 5)
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
static inline vec vset(float v) { return _mm512_set1_ps(v); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm512_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline void vstore(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vround(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT); }
static inline vec vpow2(vec y, vec n) { return _mm512_scalef_ps(y, n); }  // y * 2^n
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
// 16 sums in 16 registers (the compiler keeps a few on the stack): one pass over a group serves
// 8 rows. With 4 rows a pass (8 sums, all in registers) a step of 8 rows cost 1.4-1.6x one row;
// with 8 it costs 1.1x (AVX2 EPYC, two threads, 29 Nov 2026; 2x6, 3x4, 3x5, 1x8 in between).
// One shape: 16 registers leave no room for another with as few loads a sum.
enum { VW = 8 };
#define SHAPES(X) X(0, 2, 8)
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
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec vdiv(vec a, vec b) { return _mm256_div_ps(a, b); }
static inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec vmin(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline void vstore(float *p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vround(vec v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vec vpow2(vec y, vec n) {  // y * 2^n, n a whole number in [-126, 127]
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                          _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
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
                         const float *bt, long E, bool accumulate, const float *scale) {
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
      if (scale) s *= scale[m * N + j];
      y[m * N + j] = accumulate ? y[m * N + j] + s : s;
    }
}

// The last M < MR rows of x: one pass of a group sized for exactly M rows (R counts down to it).
template <int R, int G, typename T>
static inline void rest(const float *x, const T *w, float *y, long M, long K, long N,
                        const float *low, const float *bt, long E, bool accumulate,
                        const float *scale) {
  if constexpr (R > 0) {
    if (M == R)
      group<R, G, T>(x, w, y, K, N, low, bt, E, accumulate, scale);
    else
      rest<R - 1, G, T>(x, w, y, M, K, N, low, bt, E, accumulate, scale);
  }
}

template <int G, int MR, typename T>
static void rows_of_group(const float *x, const T *w, float *y, long M, long K, long N,
                          const float *low, const float *bt, long E, bool accumulate,
                          const float *scale) {
  long m = 0;
  for (; m + MR <= M; m += MR)
    group<MR, G, T>(x + m * K, w, y + m * N, K, N, low + m * E, bt, E, accumulate,
                    scale ? scale + m * N : nullptr);
  rest<MR - 1, G, T>(x + m * K, w, y + m * N, M - m, K, N, low + m * E, bt, E, accumulate,
                     scale ? scale + m * N : nullptr);
}

extern "C" int skinny_vector_width(void) { return VW; }

// The shapes built here, and which one serves each row count: rows 1..MOST_ROWS, the last for
// more (the same entry every thread of a call reads: a call reads it once, before its region).
enum { MOST_ROWS = 256 };
struct Shape {
  int nw, mr;
};
#define SHAPE_ENTRY(index, nw, mr) {nw, mr},
static const Shape shapes[] = {SHAPES(SHAPE_ENTRY)};
static const int shape_count = sizeof shapes / sizeof shapes[0];
static unsigned char shape_by_rows[MOST_ROWS + 1];  // indices into `shapes`, 0 the default

static int shape_for(long M) {
  const long most = MOST_ROWS;
  return shape_by_rows[M < 0 ? 0 : M < most ? M : most];
}

extern "C" int skinny_shape_count(void) { return shape_count; }

// The shape `index` (0 on success, -1 where there is none).
extern "C" int skinny_shape(int index, int *nw, int *mr) {
  if (index < 0 || index >= shape_count) return -1;
  *nw = shapes[index].nw;
  *mr = shapes[index].mr;
  return 0;
}

// Products of `rows` rows (1..MOST_ROWS; MOST_ROWS also serves more) use shape `index` (0 on
// success, -1 where either is out of range).
extern "C" int skinny_set_shape(long rows, int index) {
  if (rows < 1 || rows > MOST_ROWS || index < 0 || index >= shape_count) return -1;
  shape_by_rows[rows] = (unsigned char)index;
  return 0;
}

extern "C" int skinny_shape_for(long rows) { return shape_for(rows); }

// The chunks of one product, shared among the threads of the enclosing parallel region (run
// alone, outside one, it is the whole product on this thread). No barrier at its end: the
// region's own end is one, and a caller that reads y inside the region puts one itself.
// `accumulate`: y += x W^T (a residual add in the same pass) instead of y = x W^T. `scale`
// (M x N, or null): each sum multiplied by its entry before it is stored (a LoRA mask).
template <typename T, int NW, int MR>
static void shaped_tasks(const float *x, const T *w, float *y, long M, long K, long N,
                         int threads, const float *low, const float *bt, long E, bool accumulate,
                         const float *scale) {
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
      rows_of_group<NW, MR, T>(x, w + n * K, y + n, M, K, N, low, bt + n * E, E, accumulate,
                               scale ? scale + n : nullptr);
    for (; n < n1; n++)
      rows_of_group<1, MR, T>(x, w + n * K, y + n, M, K, N, low, bt + n * E, E, accumulate,
                              scale ? scale + n : nullptr);
  }
}

// `shaped_tasks` in shape `shape` (`shape_for(M)`, read once by the caller before its region:
// every thread must split the same tasks).
template <typename T>
static void product_tasks(int shape, const float *x, const T *w, float *y, long M, long K,
                          long N, int threads, const float *low, const float *bt, long E,
                          bool accumulate = false, const float *scale = nullptr) {
#define SHAPE_CASE(index, nw, mr)                                                           \
  case index:                                                                               \
    return shaped_tasks<T, nw, mr>(x, w, y, M, K, N, threads, low, bt, E, accumulate, scale);
  switch (shape) { SHAPES(SHAPE_CASE) }
#undef SHAPE_CASE
}

template <typename T>
static void product(const float *x, const T *w, float *y, long M, long K, long N, int threads,
                    const float *low, const float *bt, long E) {
  if (threads < 1) threads = 1;
  const int shape = shape_for(M);
#pragma omp parallel num_threads(threads) if (threads > 1)
  product_tasks<T>(shape, x, w, y, M, K, N, threads, low, bt, E);
}

extern "C" void skinny_linear(const float *x, const float *w, float *y, long M, long K, long N,
                              int threads) {
  product<float>(x, w, y, M, K, N, threads, nullptr, nullptr, 0);
}

extern "C" void skinny_linear_bf16(const float *x, const uint16_t *w, float *y, long M, long K,
                                   long N, int threads) {
  product<uint16_t>(x, w, y, M, K, N, threads, nullptr, nullptr, 0);
}

// ---- One decoding step of a Llama-family layer, in one call (bot/engine/decoding.py) ----
//
// The products above are most of a step's time, but between them a step through torch ran
// ~40 small ops a layer (norms, RoPE, the cache write, attention, SiLU, residual adds), each a
// dispatch and a few microseconds: ~10 ms of a 33 ms batch-1 step (AVX-512 EPYC, 6 Dec 2026).
// Here the whole layer is one parallel region, its phases separated by barriers.

template <typename C>
static inline float dot(const float *a, const C *b, long n) {
  vec acc = vzero();
  long k = 0;
  for (; k + VW <= n; k += VW) acc = vfma(vload(a + k), vload(b + k), acc);
  float s = vsum(acc);
  for (; k < n; k++) s += a[k] * scalar(b[k]);
  return s;
}

// A row written into the cache: copied (float32), or rounded to bfloat16 (to nearest, ties
// to even, as torch rounds; a NaN stays a NaN).
static inline void store_row(float *out, const float *in, long n) {
  memcpy(out, in, n * sizeof(float));
}
static inline void store_row(uint16_t *out, const float *in, long n) {
  for (long i = 0; i < n; i++) {
    uint32_t bits;
    memcpy(&bits, in + i, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
      out[i] = (uint16_t)((bits >> 16) | 0x40);
    else
      out[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

// e^x, Cephes' expf on a vector: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by its degree-7
// polynomial, then scaled by 2^n; within 2 ulp of expf over [-87, 88] (tested against torch),
// where scalar expf calls cost 2.8 ms of a 34 ms 8-row step in the SiLU alone.
static inline vec vexp(vec x) {
  x = vmin(vmax(x, vset(-87.3f)), vset(88.3f));
  const vec n = vround(vmul(x, vset(1.44269504088896341f)));
  vec r = vfma(n, vset(-0.693359375f), x);
  r = vfma(n, vset(2.12194440e-4f), r);
  vec p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
  return vpow2(p, n);
}

// out[i] = e^(in[i] - shift), the vector exp over whole vectors and expf over the rest.
static inline void exps(const float *in, float *out, long n, float shift) {
  long i = 0;
  for (; i + VW <= n; i += VW) vstore(out + i, vexp(vadd(vload(in + i), vset(-shift))));
  for (; i < n; i++) out[i] = expf(in[i] - shift);
}

// out = weight * (x / sqrt(mean(x^2) + eps)), row by row, as transformers' LlamaRMSNorm in
// float32. A worksharing loop: its end is a barrier.
static void rms_norm_rows(const float *x, const float *weight, float *out, long M, long H,
                          float eps) {
#pragma omp for schedule(static)
  for (long m = 0; m < M; m++) {
    const float *row = x + m * H;
    const float scale = 1.0f / sqrtf(dot(row, row, H) / (float)H + eps);
    for (long k = 0; k < H; k++) out[m * H + k] = weight[k] * (row[k] * scale);
  }
}

// Attention of the G query heads that share one kv head, for one row (heads of DV vectors):
// each key and value is read once for all G, and the G outputs are summed in registers.
// query and out: the G heads side by side; scores: G x L scratch.
template <int G, int DV, typename C>
static void attend_group(const float *query, const C *keys, const C *values,
                         const int64_t *allowed, long L, float scale, float *scores,
                         float *out) {
  constexpr long D = DV * VW;
  vec qv[G][DV];
  float best[G];
#pragma GCC unroll 8
  for (int g = 0; g < G; g++) {
    best[g] = -INFINITY;
#pragma GCC unroll 8
    for (int i = 0; i < DV; i++) qv[g][i] = vload(query + g * D + i * VW);
  }
  for (long c = 0; c < L; c++) {
    if (allowed && !allowed[c]) continue;  // padding: never read (see below)
    vec kv[DV];
#pragma GCC unroll 8
    for (int i = 0; i < DV; i++) kv[i] = vload(keys + c * D + i * VW);
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
      vec acc = vmul(qv[g][0], kv[0]);
#pragma GCC unroll 8
      for (int i = 1; i < DV; i++) acc = vfma(qv[g][i], kv[i], acc);
      const float score = vsum(acc) * scale;
      scores[g * L + c] = score;
      best[g] = score > best[g] ? score : best[g];
    }
  }
  for (int g = 0; g < G; g++) exps(scores + g * L, scores + g * L, L, best[g]);
  vec acc[G][DV];
  float total[G];
#pragma GCC unroll 8
  for (int g = 0; g < G; g++) {
    total[g] = 0.0f;
#pragma GCC unroll 8
    for (int i = 0; i < DV; i++) acc[g][i] = vzero();
  }
  for (long c = 0; c < L; c++) {
    if (allowed && !allowed[c]) continue;  // padding: its weight is 0, whatever it holds
    vec vv[DV];
#pragma GCC unroll 8
    for (int i = 0; i < DV; i++) vv[i] = vload(values + c * D + i * VW);
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
      const float weight = scores[g * L + c];
      total[g] += weight;
      const vec w = vset(weight);
#pragma GCC unroll 8
      for (int i = 0; i < DV; i++) acc[g][i] = vfma(w, vv[i], acc[g][i]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; g++) {
    const vec norm = vset(total[g] > 0.0f ? 1.0f / total[g] : 0.0f);
#pragma GCC unroll 8
    for (int i = 0; i < DV; i++) vstore(out + g * D + i * VW, vmul(acc[g][i], norm));
  }
}

// Attention of one query head of any size D (where no grouped form is built): the scores
// through `dot`, one head at a time. scores: L scratch.
template <typename C>
static void attend_head(const float *query, const C *keys, const C *values,
                        const int64_t *allowed, long L, long D, float scale, float *scores,
                        float *out) {
  float best = -INFINITY;
  for (long c = 0; c < L; c++) {
    scores[c] = (!allowed || allowed[c]) ? dot(query, keys + c * D, D) * scale : -INFINITY;
    if (scores[c] > best) best = scores[c];
  }
  exps(scores, scores, L, best);
  for (long d = 0; d < D; d++) out[d] = 0.0f;
  float total = 0.0f;
  for (long c = 0; c < L; c++) {
    if (allowed && !allowed[c]) continue;  // padding: its weight is 0, whatever it holds
    const float weight = scores[c];
    total += weight;
    const C *value = values + c * D;
    for (long d = 0; d < D; d++) out[d] += weight * scalar(value[d]);
  }
  const float norm = total > 0.0f ? 1.0f / total : 0.0f;
  for (long d = 0; d < D; d++) out[d] *= norm;
}

template <typename C>
using attend_fn = void (*)(const float *, const C *, const C *, const int64_t *, long, float,
                           float *, float *);

template <int G, typename C>
static attend_fn<C> attend_with(long DV) {
  switch (DV) {
    case 1: return attend_group<G, 1, C>;
    case 2: return attend_group<G, 2, C>;
    case 4: return attend_group<G, 4, C>;
    case 8: return attend_group<G, 8, C>;
    default: return nullptr;
  }
}

// The grouped attention for G query heads a kv head and head_dim D, where one is built
// (G <= 8, D = 1, 2, 4 or 8 vectors); null: `attend_head`, one head at a time.
template <typename C>
static attend_fn<C> attend_for(long G, long D) {
  if (D % VW) return nullptr;
  switch (G) {
    case 1: return attend_with<1, C>(D / VW);
    case 2: return attend_with<2, C>(D / VW);
    case 3: return attend_with<3, C>(D / VW);
    case 4: return attend_with<4, C>(D / VW);
    case 5: return attend_with<5, C>(D / VW);
    case 6: return attend_with<6, C>(D / VW);
    case 7: return attend_with<7, C>(D / VW);
    case 8: return attend_with<8, C>(D / VW);
    default: return nullptr;
  }
}

// One projection of the layer: y (M x N) = in W^T (+ y if accumulate), and where E > 0 the
// per-row LoRA correction as in skinny_linear_corrected (low: M x E scratch).
template <typename T>
struct Projection {
  const T *w;
  float *y;
  long N;
  const float *a, *mask, *bt;
  long E;
  float *low;
  bool accumulate;
};

// The products of projections that share their input, then a barrier; their low-rank
// corrections first where any has one (the same decision on every thread: the barriers match).
template <typename T>
static void project(int shape, const float *in, long M, long K, const Projection<T> *p,
                    int count, int threads) {
  bool corrected = false;
  for (int i = 0; i < count; i++) corrected = corrected || p[i].E > 0;
  if (corrected) {  // low = (in A^T) * mask, the mask applied as each sum is stored
    for (int i = 0; i < count; i++)
      if (p[i].E > 0)
        product_tasks<float>(shape, in, p[i].a, p[i].low, M, K, p[i].E, threads, nullptr,
                             nullptr, 0, false, p[i].mask);
#pragma omp barrier
  }
  for (int i = 0; i < count; i++)
    product_tasks<T>(shape, in, p[i].w, p[i].y, M, K, p[i].N, threads,
                         p[i].E > 0 ? p[i].low : nullptr, p[i].bt, p[i].E, p[i].accumulate);
#pragma omp barrier
}

// y = x W^T + ((x a^T) * mask) bt^T, the engine's per-row LoRA correction of a decoding step
// in one call: a (E x K) the stacked A factors, mask (M x E) which of their columns apply to
// which row, bt (N x E) the stacked, scaled B factors; E a multiple of skinny_vector_width().
// The low-rank product is a small product of its own (E outputs), then each of the weight's
// dot products goes on over its E columns, the factors streamed with the weight: one
// projection of the layer step's `project`.
extern "C" void skinny_linear_corrected(const float *x, const float *w, float *y, long M, long K,
                                        long N, int threads, const float *a, const float *mask,
                                        const float *bt, long E) {
  if (threads < 1) threads = 1;
  std::unique_ptr<float[]> low(new float[M * E]);
  const Projection<float> p = {w, y, N, a, mask, bt, E, low.get(), false};
  const int shape = shape_for(M);
#pragma omp parallel num_threads(threads) if (threads > 1)
  project(shape, x, M, K, &p, 1, threads);
}

// Rotary embedding of one head in place, as transformers' `q * cos + rotate_half(q) * sin`.
static inline void rotate(float *v, const float *cos, const float *sin, long D) {
  const long half = D / 2;
  for (long d = 0; d < half; d++) {
    const float a = v[d], b = v[d + half];
    v[d] = a * cos[d] - b * sin[d];
    v[d + half] = b * cos[d + half] + a * sin[d + half];
  }
}

// x (M x H, the residual stream, updated in place) through one layer, one token a row:
//   h = norm1(x); q, k, v = h Wq^T, h Wk^T, h Wv^T; RoPE on q and k (cos, sin: M x D);
//   row m's k and v written into the cache of sequence seqs[m] at column cols[m] (caches:
//   sequences x kv_heads x capacity x D; seqs null: sequence m; cols null: column `length`,
//   a decoding step's); attention of q over that sequence's columns 0..cols[m] where mask
//   (sequences x mask_width, 0 = padding; null: all) allows, head i on kv head
//   i / (heads / kv_heads), softmax(q k^T * scale) v (a prefill's rows of one sequence see
//   each other's keys: all are written before any attends);
//   x += att Wo^T; h = norm2(x); x += (silu(h Wg^T) * h Wu^T) Wd^T.
// w: the 7 weights q, k, v, o, gate, up, down (out x in) and the caches, both of type T:
// float32, or bfloat16 (`skinny_decode_layer_bf16`: the weights widened as they are read, a
// cache's keys and values widened as attention reads them and rounded as they are written;
// x, the norms and every sum stay float32). ext_a, ext_mask, ext_bt, ext_e: null, or per
// projection the per-row correction's stacked A (E x in), mask (M x E), scaled B (out x E)
// and E (0: none), float32, as skinny_linear_corrected takes them.
template <typename T>
static void decode_layer(float *x, long M, long H, long heads, long kv_heads, long D, long I,
                         const float *norm1, const float *norm2, float eps, const T *const *w,
                         const float *const *ext_a, const float *const *ext_mask,
                         const float *const *ext_bt, const long *ext_e, const float *cos,
                         const float *sin, T *kcache, T *vcache, long capacity, long length,
                         const int64_t *seqs, const int64_t *cols, const int64_t *mask,
                         long mask_width, float scale, int threads) {
  if (threads < 1) threads = 1;
  const long Nq = heads * D, Nk = kv_heads * D, group_size = heads / kv_heads;
  long L = length + 1;  // the most columns a row attends to
  if (cols)
    for (long r = 0; r < M; r++) L = cols[r] + 1 > L ? cols[r] + 1 : L;
  // scratch, left uninitialised (every value is written before it is read): a prefill's
  // 150 tokens zeroed ~2.5 MB a layer for nothing
  std::unique_ptr<float[]> scratch(new float[M * (H + 2 * Nq + 2 * Nk + 2 * I)]);
  float *h = scratch.get(), *q = h + M * H, *k = q + M * Nq, *v = k + M * Nk, *att = v + M * Nk;
  float *g = att + M * Nq, *u = g + M * I;
  float *outputs[7] = {q, k, v, x, g, u, x};
  const long widths[7] = {Nq, Nk, Nk, H, I, I, H};
  std::vector<float> lows[7];
  Projection<T> p[7];
  for (int i = 0; i < 7; i++) {
    const long E = ext_e ? ext_e[i] : 0;
    if (E > 0) lows[i].resize(M * E);
    p[i] = {w[i], outputs[i], widths[i], E > 0 ? ext_a[i] : nullptr,
            E > 0 ? ext_mask[i] : nullptr, E > 0 ? ext_bt[i] : nullptr, E,
            E > 0 ? lows[i].data() : nullptr, i == 3 || i == 6};
  }
  const attend_fn<T> grouped = attend_for<T>(group_size, D);
  const int shape = shape_for(M);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> scores(L * group_size);
    rms_norm_rows(x, norm1, h, M, H, eps);
    project(shape, h, M, H, p, 3, threads);
#pragma omp for schedule(static)
    for (long t = 0; t < M * (heads + kv_heads); t++) {
      const long m = t / (heads + kv_heads), head = t % (heads + kv_heads);
      if (head < heads) {
        rotate(q + m * Nq + head * D, cos + m * D, sin + m * D, D);
      } else {
        const long seq = seqs ? seqs[m] : m, col = cols ? cols[m] : length;
        const long kv = head - heads, at = ((seq * kv_heads + kv) * capacity + col) * D;
        float *key = k + m * Nk + kv * D;
        rotate(key, cos + m * D, sin + m * D, D);  // in the scratch: then stored as T
        store_row(kcache + at, key, D);
        store_row(vcache + at, v + m * Nk + kv * D, D);
      }
    }
    if (grouped) {
#pragma omp for schedule(static)
      for (long t = 0; t < M * kv_heads; t++) {
        const long m = t / kv_heads, kv = t % kv_heads;
        const long seq = seqs ? seqs[m] : m, at = (seq * kv_heads + kv) * capacity * D;
        const long first = m * Nq + kv * group_size * D;  // the group's heads, side by side
        grouped(q + first, kcache + at, vcache + at,
                mask ? mask + seq * mask_width : nullptr, (cols ? cols[m] : length) + 1, scale,
                scores.data(), att + first);
      }
    } else {
#pragma omp for schedule(static)
      for (long t = 0; t < M * heads; t++) {
        const long m = t / heads, head = t % heads, kv = head / group_size;
        const long seq = seqs ? seqs[m] : m, at = (seq * kv_heads + kv) * capacity * D;
        attend_head(q + m * Nq + head * D, kcache + at, vcache + at,
                    mask ? mask + seq * mask_width : nullptr, (cols ? cols[m] : length) + 1, D,
                    scale, scores.data(), att + m * Nq + head * D);
      }
    }
    project(shape, att, M, Nq, p + 3, 1, threads);
    rms_norm_rows(x, norm2, h, M, H, eps);
    project(shape, h, M, H, p + 4, 2, threads);
#pragma omp for schedule(static)
    for (long j = 0; j < M * I; j += VW) {  // silu(g) * u, M * I a multiple of VW or a rest
      if (j + VW <= M * I) {
        const vec a = vload(g + j);
        const vec e = vexp(vmul(a, vset(-1.0f)));
        vstore(g + j, vmul(vdiv(a, vadd(e, vset(1.0f))), vload(u + j)));
      } else {
        for (long i = j; i < M * I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
      }
    }
    project(shape, g, M, I, p + 6, 1, threads);
  }
}

// The C entry points, one signature for both types (T: the weights' and the caches').
#define DECODE_LAYER_ENTRY(name, T)                                                                \
  extern "C" void name(float *x, long M, long H, long heads, long kv_heads, long D, long I,        \
                       const float *norm1, const float *norm2, float eps, const T *const *w,       \
                       const float *const *ext_a, const float *const *ext_mask,                    \
                       const float *const *ext_bt, const long *ext_e, const float *cos,            \
                       const float *sin, T *kcache, T *vcache, long capacity, long length,         \
                       const int64_t *seqs, const int64_t *cols, const int64_t *mask,              \
                       long mask_width, float scale, int threads) {                                \
    decode_layer<T>(x, M, H, heads, kv_heads, D, I, norm1, norm2, eps, w, ext_a, ext_mask,         \
                    ext_bt, ext_e, cos, sin, kcache, vcache, capacity, length, seqs, cols,         \
                    mask, mask_width, scale, threads);                                             \
  }
DECODE_LAYER_ENTRY(skinny_decode_layer, float)
DECODE_LAYER_ENTRY(skinny_decode_layer_bf16, uint16_t)
#undef DECODE_LAYER_ENTRY

// The vector exp alone (its test: tests/test_engine_skinny.py): out[i] = e^in[i].
extern "C" void skinny_exp(const float *in, float *out, long n) { exps(in, out, n, 0.0f); }
