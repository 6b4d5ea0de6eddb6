// W4A16 matmul on x86 CPUs with AVX-512 (BW + BF16), reading qatpass's canonical packed format.
//
//   y[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, k / g]) * scale[n, k / g]  (+ bias[n])
//
// Weights: qweight bytes [N, K/2], byte j of a row holds k = 2j (low nibble) and 2j + 1 (high);
// code = nibble - 8. Scales: [N, K/g] in bf16, fp16 or fp32 (scale_kind 0/1/2). Zeros: int8
// [N, K/g] (signed codes) or NULL (symmetric). Activations are pre-arranged by the caller
// (`qatpass.lowering.cpu_kernel`) so that each loaded vector of nibbles lines up with a plain
// vector load of x: even k first, then odd k.
//
// Per 64 weights (two groups of 32, 32 bytes): zero-extend the bytes to 16-bit lanes, map low
// and high nibbles to the bf16 / fp32 value of (code - zero) with one table permute each (the
// values are small integers, exact in bf16), take the dot product with x in fp32 (vdpbf16ps for
// bf16 x: bf16 x bf16 products are exact in fp32), and scale the partial sums of each group
// once. The weights of a row are decoded once per tile of up to MT rows of x; at M = 1, NS rows
// stream at once. Rows n are split across OpenMP threads; each output's sum has a fixed order,
// so results do not depend on the thread count.
//
// Built and loaded by qatpass/lowering/cpu_kernel.py (which checks qp_cpu_supported() first).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MT 8                // rows of x per pass over a weight row (accumulators in registers)
#define NS 2                // weight rows streamed at once when M == 1 (from the two halves)
_Static_assert(NS == 2, "the M = 1 path pairs row i with row i + n/2");
#define RB 64               // weight rows per block of work (one OpenMP task)
#define X_TILE_BYTES 32768  // x kept in L1/L2 while a block of weight rows streams past it
#define PREFETCH_BYTES 2048 // weights requested this far ahead (the stream runs past rows)

int qp_cpu_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("f16c");
}

static inline float load_scale(const void* scales, int64_t i, int kind) {
  if (kind == 2) return ((const float*)scales)[i];
  uint16_t h = ((const uint16_t*)scales)[i];
  if (kind == 1) return _cvtsh_ss(h);
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 -> bf16 bits, round to nearest even (as torch does), NaN kept quiet.
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if (isnan(f)) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

static inline void store(void* y, int out_kind, int64_t i, float v) {
  if (out_kind == 2) ((float*)y)[i] = v;
  else ((uint16_t*)y)[i] = to_bf16(v);
}

// Index of the scale group of k: g is a power of two (shift) or spans all of K (per channel).
static inline int64_t group_of(int64_t kk, int shift) { return shift < 0 ? 0 : kk >> shift; }

static int group_shift(int64_t g, int64_t k) {
  if (g >= k) return -1;
  int shift = 0;
  while (((int64_t)1 << shift) < g) ++shift;
  return shift;
}

// One weight row of the bf16 kernel: where it lives and how to read its groups.
typedef struct {
  const uint8_t* w;     // packed bytes of the row
  const char* scales;   // the row's scales
  const int8_t* zeros;  // the row's zeros, or NULL
} Row;

// Decoding state shared by all rows.
typedef struct {
  __m512i lut;    // symmetric: bf16(i % 16 - 8) for i < 32, indexed by a byte's low 5 bits
  __m512 base;    // asymmetric: fp32 codes -8..7, from which each chunk's table is built
  int64_t k;
  int shift;
  int kind;
} Decoder;

// Scale vector for a 64-weight chunk at k0: lanes 0-7 take group(k0), lanes 8-15 group(k0 + 32).
static inline __m512 chunk_scales(const Row* r, int64_t k0, const Decoder* d) {
  const float s0 = load_scale(r->scales, group_of(k0, d->shift), d->kind);
  const float s1 = k0 + 32 < d->k ? load_scale(r->scales, group_of(k0 + 32, d->shift), d->kind)
                                  : 0.0f;
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
}

// The 64 weights of chunk k0 as bf16 (code - zero): lo = even k, hi = odd k, 32 lanes each
// (lanes 0-15 the first group of 32, lanes 16-31 the second). ASYM is a compile-time constant
// after inlining: symmetric rows use one fixed table, asymmetric rows a table per chunk whose
// entries 16-31 hold the second group's values.
static inline __attribute__((always_inline)) void decode_chunk(const Row* r, int64_t k0,
                                                               const Decoder* d, __m512bh* lo,
                                                               __m512bh* hi, const int asym) {
  const __m256i bytes = k0 + 64 <= d->k ? _mm256_loadu_si256((const __m256i*)(r->w + k0 / 2))
                                        : _mm256_maskz_loadu_epi8(0xFFFF, r->w + k0 / 2);
  const __m512i wide = _mm512_cvtepu8_epi16(bytes);
  __m512i lo_idx = wide, hi_idx = _mm512_srli_epi16(wide, 4), table = d->lut;
  if (asym) {
    const float z0 = r->zeros[group_of(k0, d->shift)];
    const float z1 = k0 + 32 < d->k ? r->zeros[group_of(k0 + 32, d->shift)] : 0.0f;
    table = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(d->base, _mm512_set1_ps(z1)),
                                         _mm512_sub_ps(d->base, _mm512_set1_ps(z0)));
    const __m512i upper = _mm512_maskz_set1_epi16(0xFFFF0000u, 16);  // lanes 16-31 -> 16..31
    lo_idx = _mm512_or_si512(_mm512_and_si512(wide, _mm512_set1_epi16(0xF)), upper);
    hi_idx = _mm512_or_si512(hi_idx, upper);
  }
  *lo = (__m512bh)_mm512_permutexvar_epi16(lo_idx, table);
  *hi = (__m512bh)_mm512_permutexvar_epi16(hi_idx, table);
}

// One weight row against mt rows of x, chunks [c0, c1) (mt a compile-time constant after
// inlining, so the accumulators stay in registers). Adds the sums to out[0..mt).
static inline __attribute__((always_inline)) void row_tile_bf16(
    const uint16_t* x, const Row* r, const Decoder* d, int64_t chunks, int64_t c0, int64_t c1,
    int64_t pf, float* out, const int mt, const int asym) {
  __m512 acc[MT];
  for (int i = 0; i < mt; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * 64;
    _mm_prefetch((const char*)(r->w + k0 / 2) + pf, _MM_HINT_T0);
    __m512bh lo, hi;
    decode_chunk(r, k0, d, &lo, &hi, asym);
    const __m512 sv = chunk_scales(r, k0, d);
    for (int i = 0; i < mt; ++i) {
      const uint16_t* xc = x + (i * chunks + c) * 64;
      __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xc));
      s = _mm512_dpbf16_ps(s, hi, (__m512bh)_mm512_loadu_si512(xc + 32));
      acc[i] = _mm512_fmadd_ps(s, sv, acc[i]);
    }
  }
  for (int i = 0; i < mt; ++i) out[i] += _mm512_reduce_add_ps(acc[i]);
}

// M = 1: ns weight rows at once, from far apart in memory (ns a compile-time constant after
// inlining): ns independent sums and ns memory streams for the prefetchers, where one row at a
// time leaves DRAM latency exposed.
static inline __attribute__((always_inline)) void rows_m1_bf16(const uint16_t* x, const Row* rows,
                                                               const Decoder* d, int64_t chunks,
                                                               float* const* out, const int ns,
                                                               const int asym) {
  __m512 acc[NS];
  for (int j = 0; j < ns; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * 64;
    const __m512bh xl = (__m512bh)_mm512_loadu_si512(x + c * 64);
    const __m512bh xh = (__m512bh)_mm512_loadu_si512(x + c * 64 + 32);
    for (int j = 0; j < ns; ++j) {
      _mm_prefetch((const char*)(rows[j].w + k0 / 2) + PREFETCH_BYTES, _MM_HINT_T0);
      __m512bh lo, hi;
      decode_chunk(&rows[j], k0, d, &lo, &hi, asym);
      __m512 s = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, xl);
      s = _mm512_dpbf16_ps(s, hi, xh);
      acc[j] = _mm512_fmadd_ps(s, chunk_scales(&rows[j], k0, d), acc[j]);
    }
  }
  for (int j = 0; j < ns; ++j) *out[j] += _mm512_reduce_add_ps(acc[j]);
}

static inline Row row_at(const uint8_t* qweight, const void* scales, const int8_t* zeros,
                         int64_t row, int64_t k, int64_t groups, int kind) {
  Row r = {qweight + row * (k / 2), (const char*)scales + row * groups * (kind == 2 ? 4 : 2),
           zeros ? zeros + row * groups : NULL};
  return r;
}

static inline __attribute__((always_inline)) void bf16_body(
    const uint16_t* x, const uint8_t* qweight, const void* scales, const int8_t* zeros,
    const Decoder* d, const float* bias, void* y, int out_kind, int64_t m, int64_t n,
    int64_t groups, int nthreads, const int asym) {
  const int64_t k = d->k, chunks = (k + 63) / 64;
  if (m == 1 && X_TILE_BYTES / 128 >= chunks) {
    // decode: rows i and i + half together, so each thread reads two long sequential streams
    const int64_t half = (n + 1) / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < half; ++i) {
      const int both = i + half < n;
      Row rows[NS] = {row_at(qweight, scales, zeros, i, k, groups, d->kind)};
      float acc[NS] = {0};
      float* o[NS] = {&acc[0], &acc[1]};
      if (both) {
        rows[1] = row_at(qweight, scales, zeros, i + half, k, groups, d->kind);
        rows_m1_bf16(x, rows, d, chunks, o, NS, asym);
        store(y, out_kind, i + half, acc[1] + (bias ? bias[i + half] : 0.0f));
      } else {
        rows_m1_bf16(x, rows, d, chunks, o, 1, asym);
      }
      store(y, out_kind, i, acc[0] + (bias ? bias[i] : 0.0f));
    }
    return;
  }
  const int64_t blocks = (n + RB - 1) / RB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * RB, r1 = r0 + RB < n ? r0 + RB : n;
    for (int64_t m0 = 0; m0 < m; m0 += MT) {
      const int mt = m - m0 < MT ? (int)(m - m0) : MT;
      const uint16_t* xt = x + m0 * chunks * 64;
      const int64_t span = X_TILE_BYTES / (128 * mt);  // chunks of x kept in L1 per pass
      // prefetch along the row when it is read whole, else the same spot of the next row
      const int64_t pf = span >= chunks ? PREFETCH_BYTES : k / 2;
      float out[RB][MT] = {{0}};
      for (int64_t c0 = 0; c0 < chunks; c0 += span) {
        const int64_t c1 = c0 + span < chunks ? c0 + span : chunks;
        for (int64_t row = r0; row < r1; ++row) {
          const Row r = row_at(qweight, scales, zeros, row, k, groups, d->kind);
          float* o = out[row - r0];
          switch (mt) {
#define TILE(T) \
  case T: row_tile_bf16(xt, &r, d, chunks, c0, c1, pf, o, T, asym); break;
            TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
          }
        }
      }
      for (int64_t row = r0; row < r1; ++row)
        for (int i = 0; i < mt; ++i)
          store(y, out_kind, (m0 + i) * n + row, out[row - r0][i] + (bias ? bias[row] : 0.0f));
    }
  }
}

// x: bf16 [M, C, 2, 32] with C = ceil(K / 64): chunk c holds x[64c + 2j] in [0][j] and
// x[64c + 2j + 1] in [1][j] (zero padded past K). K % 32 == 0; g % 32 == 0, a power of two or K.
void qp_w4a16_bf16(const uint16_t* x, const uint8_t* qweight, const void* scales, int scale_kind,
                   const int8_t* zeros, const float* bias, void* y, int out_kind, int64_t m,
                   int64_t n, int64_t k, int64_t g, int nthreads) {
  uint16_t table[32];
  float codes[16];
  for (int i = 0; i < 32; ++i) {
    const float v = (float)(i % 16 - 8);
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    table[i] = (uint16_t)(bits >> 16);  // bf16 of a small integer: its fp32 bits >> 16
    if (i < 16) codes[i] = v;
  }
  const Decoder d = {_mm512_loadu_si512(table), _mm512_loadu_ps(codes), k, group_shift(g, k),
                     scale_kind};
  if (zeros)
    bf16_body(x, qweight, scales, zeros, &d, bias, y, out_kind, m, n, k / g, nthreads, 1);
  else
    bf16_body(x, qweight, scales, NULL, &d, bias, y, out_kind, m, n, k / g, nthreads, 0);
}

// One weight row against mt rows of fp32 x (see row_tile_bf16).
static inline __attribute__((always_inline)) void row_tile_f32(
    const float* x, const Row* r, __m512 codes, int64_t blocks, int shift, int kind, float* out,
    const int mt) {
  __m512 acc[MT];
  for (int i = 0; i < mt; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t q = 0; q < blocks; ++q) {
    _mm_prefetch((const char*)(r->w + q * 16) + PREFETCH_BYTES, _MM_HINT_T0);
    const int64_t grp = group_of(q * 32, shift);
    const __m512 table = r->zeros ? _mm512_sub_ps(codes, _mm512_set1_ps(r->zeros[grp])) : codes;
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(r->w + q * 16)));
    const __m512 lo = _mm512_permutexvar_ps(idx, table);  // vpermps reads the low 4 index bits
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), table);
    const __m512 sv = _mm512_set1_ps(load_scale(r->scales, grp, kind));
    for (int i = 0; i < mt; ++i) {
      const float* xq = x + (i * blocks + q) * 32;
      __m512 s = _mm512_mul_ps(lo, _mm512_loadu_ps(xq));
      s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xq + 16), s);
      acc[i] = _mm512_fmadd_ps(s, sv, acc[i]);
    }
  }
  for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// x: fp32 [M, K/32, 2, 16]: group q holds x[32q + 2j] in [0][j] and x[32q + 2j + 1] in [1][j].
void qp_w4a16_f32(const float* x, const uint8_t* qweight, const void* scales, int scale_kind,
                  const int8_t* zeros, const float* bias, float* y, int64_t m, int64_t n,
                  int64_t k, int64_t g, int nthreads) {
  const int64_t groups = k / g, blocks = k / 32;
  const int shift = group_shift(g, k);
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = (float)(i - 8);
  const __m512 codes = _mm512_loadu_ps(table);
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    const Row r = row_at(qweight, scales, zeros, row, k, groups, scale_kind);
    for (int64_t m0 = 0; m0 < m; m0 += MT) {
      const int mt = m - m0 < MT ? (int)(m - m0) : MT;
      const float* xt = x + m0 * blocks * 32;
      float out[MT];
      switch (mt) {
#define TILE(T) \
  case T: row_tile_f32(xt, &r, codes, blocks, shift, scale_kind, out, T); break;
        TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
      }
      for (int i = 0; i < mt; ++i) y[(m0 + i) * n + row] = out[i] + (bias ? bias[row] : 0.0f);
    }
  }
}
