// W4A16 matmul on x86 CPUs with AVX-512 (BW + BF16), reading qatpass's canonical packed format.
//
//   y[m, n] = sum_k x[m, k] * code[n, k] * scale[n, k / g]  (+ bias[n]),  code = nibble - 8
//
// Weights: qweight bytes [N, K/2], byte j of a row holds k = 2j (low nibble) and 2j + 1 (high).
// Scales: [N, K/g] in bf16, fp16 or fp32 (scale_kind 0/1/2); symmetric only (no zeros).
// Activations are pre-arranged by the caller (`qatpass.lowering.cpu_kernel`) so that each loaded
// vector of nibbles lines up with a plain vector load of x: even k first, then odd k.
//
// Per 64 weights (two groups of 32, 32 bytes): zero-extend the bytes to 16-bit lanes, map low
// and high nibbles to the bf16 / fp32 value of their code with one table permute each, take the
// dot product with x in fp32 (vdpbf16ps for bf16 x: bf16 x bf16 products are exact in fp32),
// and scale the partial sums of each group once. The weights of a row are decoded once per tile
// of up to MT rows of x. Rows n are split across OpenMP threads.
//
// Built and loaded by qatpass/lowering/cpu_kernel.py (which checks qp_cpu_supported() first).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MT 8  // rows of x per pass over a weight row (accumulators held in registers)
#define RB 64  // weight rows per block of work (one OpenMP task)
#define X_TILE_BYTES 32768  // x kept in L1/L2 while a block of weight rows streams past it
#define PREFETCH_BYTES 2048  // weights requested this far ahead (the stream runs past rows)

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

// Scale vector for a 64-weight chunk at k0: lanes 0-7 take group(k0), lanes 8-15 group(k0 + 32).
static inline __m512 chunk_scales(const void* srow, int64_t k0, int64_t k, int shift, int kind) {
  float s0 = load_scale(srow, group_of(k0, shift), kind);
  float s1 = k0 + 32 < k ? load_scale(srow, group_of(k0 + 32, shift), kind) : 0.0f;
  return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
}

// One weight row against MT_ rows of x (MT_ a compile-time constant after inlining, so the
// accumulators stay in registers).
static inline __attribute__((always_inline)) void row_tile_bf16(
    const uint16_t* x, const uint8_t* w, const void* srow, int kind, __m512i lut, int64_t chunks,
    int64_t c0, int64_t c1, int64_t k, int shift, int64_t pf, float* out, const int mt) {
  __m512 acc[MT];
  for (int i = 0; i < mt; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t k0 = c * 64;
    _mm_prefetch((const char*)(w + k0 / 2) + pf, _MM_HINT_T0);
    const __m256i bytes = k0 + 64 <= k ? _mm256_loadu_si256((const __m256i*)(w + k0 / 2))
                                       : _mm256_maskz_loadu_epi8(0xFFFF, w + k0 / 2);
    const __m512i wide = _mm512_cvtepu8_epi16(bytes);
    const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(wide, lut);
    const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(wide, 4), lut);
    const __m512 sv = chunk_scales(srow, k0, k, shift, kind);
    for (int i = 0; i < mt; ++i) {
      const uint16_t* xc = x + (i * chunks + c) * 64;
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xc));
      d = _mm512_dpbf16_ps(d, hi, (__m512bh)_mm512_loadu_si512(xc + 32));
      acc[i] = _mm512_fmadd_ps(d, sv, acc[i]);
    }
  }
  for (int i = 0; i < mt; ++i) out[i] += _mm512_reduce_add_ps(acc[i]);
}

// x: bf16 [M, C, 2, 32] with C = ceil(K / 64): chunk c holds x[64c + 2j] in [0][j] and
// x[64c + 2j + 1] in [1][j] (zero padded past K). K % 32 == 0; g % 32 == 0, a power of two or K.
void qp_w4a16_bf16(const uint16_t* x, const uint8_t* qweight, const void* scales, int scale_kind,
                   const float* bias, void* y, int out_kind, int64_t m, int64_t n, int64_t k,
                   int64_t g, int nthreads) {
  const int64_t chunks = (k + 63) / 64, row_bytes = k / 2, groups = k / g;
  const int shift = group_shift(g, k);
  // 32-entry table indexed by the low 5 bits of a byte: entry i is bf16(i % 16 - 8), so the
  // low nibble needs no mask; bf16 of a small integer is its fp32 bits >> 16.
  uint16_t table[32];
  for (int i = 0; i < 32; ++i) {
    float v = (float)(i % 16 - 8);
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    table[i] = (uint16_t)(bits >> 16);
  }
  const __m512i lut = _mm512_loadu_si512(table);
  const int64_t blocks = (n + RB - 1) / RB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * RB, r1 = r0 + RB < n ? r0 + RB : n;
    for (int64_t m0 = 0; m0 < m; m0 += MT) {
      const int mt = m - m0 < MT ? (int)(m - m0) : MT;
      const uint16_t* xt = x + m0 * chunks * 64;
      const int64_t span = X_TILE_BYTES / (128 * mt);  // chunks of x kept in L1 per pass
      // prefetch along the row when it is read whole, else the same spot of the next row
      const int64_t pf = span >= chunks ? PREFETCH_BYTES : row_bytes;
      float out[RB][MT] = {{0}};
      for (int64_t c0 = 0; c0 < chunks; c0 += span) {
        const int64_t c1 = c0 + span < chunks ? c0 + span : chunks;
        for (int64_t row = r0; row < r1; ++row) {
          const uint8_t* w = qweight + row * row_bytes;
          const char* srow = (const char*)scales + row * groups * (scale_kind == 2 ? 4 : 2);
          float* o = out[row - r0];
          switch (mt) {
#define TILE(T)                                                                            \
  case T:                                                                                  \
    row_tile_bf16(xt, w, srow, scale_kind, lut, chunks, c0, c1, k, shift, pf, o, T); \
    break;
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

// One weight row against MT_ rows of fp32 x (see row_tile_bf16).
static inline __attribute__((always_inline)) void row_tile_f32(
    const float* x, const uint8_t* w, const void* srow, int kind, __m512 lut, int64_t blocks,
    int shift, float* out, const int mt) {
  __m512 acc[MT];
  for (int i = 0; i < mt; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t q = 0; q < blocks; ++q) {
    _mm_prefetch((const char*)(w + q * 16) + PREFETCH_BYTES, _MM_HINT_T0);
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + q * 16)));
    const __m512 lo = _mm512_permutexvar_ps(idx, lut);
    const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), lut);
    const __m512 sv = _mm512_set1_ps(load_scale(srow, group_of(q * 32, shift), kind));
    for (int i = 0; i < mt; ++i) {
      const float* xq = x + (i * blocks + q) * 32;
      __m512 d = _mm512_mul_ps(lo, _mm512_loadu_ps(xq));
      d = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xq + 16), d);
      acc[i] = _mm512_fmadd_ps(d, sv, acc[i]);
    }
  }
  for (int i = 0; i < mt; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}

// x: fp32 [M, K/32, 2, 16]: group q holds x[32q + 2j] in [0][j] and x[32q + 2j + 1] in [1][j].
void qp_w4a16_f32(const float* x, const uint8_t* qweight, const void* scales, int scale_kind,
                  const float* bias, float* y, int64_t m, int64_t n, int64_t k, int64_t g,
                  int nthreads) {
  const int64_t row_bytes = k / 2, groups = k / g, blocks = k / 32;
  const int shift = group_shift(g, k);
  float table[16];
  for (int i = 0; i < 16; ++i) table[i] = (float)(i - 8);
  const __m512 lut = _mm512_loadu_ps(table);  // vpermps reads the low 4 bits of each index
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    const uint8_t* w = qweight + row * row_bytes;
    const char* srow = (const char*)scales + row * groups * (scale_kind == 2 ? 4 : 2);
    for (int64_t m0 = 0; m0 < m; m0 += MT) {
      const int mt = m - m0 < MT ? (int)(m - m0) : MT;
      const float* xt = x + m0 * blocks * 32;
      float out[MT];
      switch (mt) {
#define TILE(T) case T: row_tile_f32(xt, w, srow, scale_kind, lut, blocks, shift, out, T); break;
        TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8)
#undef TILE
      }
      for (int i = 0; i < mt; ++i) y[(m0 + i) * n + row] = out[i] + (bias ? bias[row] : 0.0f);
    }
  }
}
