// INT4 quantize-and-pack on the CPU: the scheme's formulas (qatpass/scheme.py, `_int4_quantize`),
// bit for bit, in one pass over the weight.
//
// Input: a contiguous weight of `ngroups` groups of g consecutive values (the reduction dim last,
// rows flattened), fp32 / bf16 / fp16 (w_kind 0 / 1 / 2). Per group, as the torch formulas:
//   symmetric:  raw = amax|w| / divisor
//   asymmetric: lo = min(amin, 0), hi = max(amax, 0), raw = (hi - lo) / (qmax - qmin)
//   s = round_to_dtype(clamp(raw, tiny, smax))     (the scale dtype's bits, ties to even)
//   zero = clamp(qmin - rint(lo / s), qmin, qmax)  (asymmetric; 0 otherwise)
//   span = floor(wmax / s)                         (wmax: the weight dtype's finfo max)
//   code = clamp(rint(w / s) + zero, max(qmin, zero - span), min(qmax, zero + span))
// The last clamp is quantize_codes' two clamps in one: the dtype clamp leaves a group whose span
// is >= qmax - qmin alone, so applying it per group equals `_dtype_clamp_is_noop`'s choice.
// Divisions are IEEE (never a reciprocal multiply), rint rounds half to even (the default mode);
// build without -ffast-math and with -ffp-contract=off, so each value is the torch path's.
// Output: qweight uint32 words, 8 codes each, low nibble = lower k, nibble = code + 8 (as
// `pack_nibbles` after the +8 offset); scales in the scale dtype (s_kind 0 / 1 / 2: bf16, fp16,
// fp32), zeros int8 (asymmetric only). Groups are split across OpenMP threads; each group's
// result depends on its values only, so the thread count changes nothing.
//
// Paths: AVX-512 F + BW + VL (checked at run time) for group sizes divisible by 16, 16 values a
// vector, two passes over each group (min / max and the finiteness check, then the codes: the
// group is in L1 or L2 by then, so the weight is read from memory once); plain C otherwise
// (group size 8, K % 16 != 0 per channel, older CPUs), compiled for AVX2 and for baseline x86-64.
// amax|w| is max(-min, max), exact. allow_wide = 0 forces the plain C path (for its tests).
//
// Returns 0, or flags: 1 a non-finite value, 2 a raw scale above smax (the caller raises the
// scheme's error; outputs are then undefined). Built and loaded by qatpass/kernels/cpu/
// quant_native.py, which allocates the outputs for the sizes it passes: the code here trusts
// sizes and pointers.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { W_F32, W_BF16, W_F16 };
enum { S_BF16, S_F16, S_F32 };
enum { BAD_NONFINITE = 1, BAD_TOO_LARGE = 2 };

static inline uint32_t f2u(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float u2f(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// fp16 bits -> fp32, exact (subnormals, infinities and NaN included)
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  if (e == 0x1F) return u2f(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    float f = (float)m * 0x1p-24f;  // exact: m < 2^10
    return sign ? -f : f;
  }
  return u2f(sign | ((e + 112) << 23) | (m << 13));
}

// a normal fp16 value held exactly in fp32 -> its fp16 bits
static inline uint16_t f32_to_f16_exact(float f) {
  uint32_t u = f2u(f);
  return (uint16_t)(((u >> 16) & 0x8000) | ((((u >> 23) & 0xFF) - 112) << 10) | ((u >> 13) & 0x3FF));
}

static inline __attribute__((always_inline)) float load(const void *w, int64_t i, int w_kind) {
  if (w_kind == W_F32) return ((const float *)w)[i];
  if (w_kind == W_BF16) return u2f((uint32_t)((const uint16_t *)w)[i] << 16);
  return f16_to_f32(((const uint16_t *)w)[i]);
}

// `round_to_dtype`: fp32 x (positive, in the scale dtype's normal range) rounded to `drop` fewer
// mantissa bits, ties to even, by the same integer ops on the bits
static inline float round_bits(float x, int drop) {
  if (drop == 0) return x;
  uint32_t b = f2u(x);
  b = b + ((1u << (drop - 1)) - 1) + ((b >> drop) & 1);
  return u2f(b & ~((1u << drop) - 1));
}

// the arguments every group shares
struct qargs {
  const void *w;
  int64_t g;
  int w_kind, symmetric, s_kind, drop;
  float qmin, qmax, divisor, stiny, smax, wmax;
  uint32_t *qweight;
  void *scales;
  int8_t *zeros;
};

// group gi's scale, zero and code bounds from its min and max (written to scales / zeros);
// 0 or a BAD_ flag
static inline int group_params(const struct qargs *a, int64_t gi, float mn, float mx, float *s_out,
                               float *z_out, float *cmin_out, float *cmax_out) {
  float lo = 0.0f, raw;
  if (a->symmetric) {
    float amax = -mn > mx ? -mn : mx;  // amax|w|, exact
    raw = amax / a->divisor;
  } else {
    lo = mn < 0.0f ? mn : 0.0f;
    float hi = mx > 0.0f ? mx : 0.0f;
    raw = (hi - lo) / (a->qmax - a->qmin);
  }
  if (raw > a->smax) return BAD_TOO_LARGE;
  float s = round_bits(raw < a->stiny ? a->stiny : raw, a->drop);
  float z = 0.0f;
  if (!a->symmetric) {
    z = a->qmin - nearbyintf(lo / s);
    z = z < a->qmin ? a->qmin : z > a->qmax ? a->qmax : z;
    a->zeros[gi] = (int8_t)z;
  }
  if (a->s_kind == S_BF16) ((uint16_t *)a->scales)[gi] = (uint16_t)(f2u(s) >> 16);
  else if (a->s_kind == S_F16) ((uint16_t *)a->scales)[gi] = f32_to_f16_exact(s);
  else ((float *)a->scales)[gi] = s;
  float span = floorf(a->wmax / s), cmin = z - span, cmax = z + span;
  *s_out = s;
  *z_out = z;
  *cmin_out = cmin > a->qmin ? cmin : a->qmin;
  *cmax_out = cmax < a->qmax ? cmax : a->qmax;
  return 0;
}

// groups [g0, g1) in plain C (any group size; the compiler vectorises what it can)
static inline __attribute__((always_inline)) int range_c(const struct qargs *a, int64_t g0,
                                                         int64_t g1, int w_kind) {
  const int64_t g = a->g;
  for (int64_t gi = g0; gi < g1; gi++) {
    const int64_t base = gi * g;
    uint32_t nonfinite = 0;
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t i = 0; i < g; i++) {
      float v = load(a->w, base + i, w_kind);
      nonfinite |= (f2u(v) & 0x7F800000u) == 0x7F800000u;
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
    if (nonfinite) return BAD_NONFINITE;
    float s, z, cmin, cmax;
    int bad = group_params(a, gi, mn, mx, &s, &z, &cmin, &cmax);
    if (bad) return bad;
    uint32_t *out = a->qweight + base / 8;
    for (int64_t j = 0; j < g / 8; j++) {
      uint32_t word = 0;
      for (int i = 0; i < 8; i++) {
        float q = nearbyintf(load(a->w, base + 8 * j + i, w_kind) / s) + z;
        q = q < cmin ? cmin : q;
        q = q > cmax ? cmax : q;
        word |= ((uint32_t)((int32_t)q + 8) & 0xFu) << (4 * i);
      }
      out[j] = word;
    }
  }
  return 0;
}

__attribute__((target_clones("avx2", "default"))) static int range_generic(const struct qargs *a,
                                                                          int64_t g0, int64_t g1) {
  if (a->w_kind == W_F32) return range_c(a, g0, g1, W_F32);
  if (a->w_kind == W_BF16) return range_c(a, g0, g1, W_BF16);
  return range_c(a, g0, g1, W_F16);
}

// AVX-512 (F + BW + VL), group sizes divisible by 16: 16 values per vector, the same operations
// (vdivps is the IEEE quotient, vrndscaleps rounds half to even, the min/max see no NaN)
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 static inline __attribute__((always_inline)) __m512 load16(const void *w, int64_t i,
                                                                  int w_kind) {
  if (w_kind == W_F32) return _mm512_loadu_ps((const float *)w + i);
  __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
  if (w_kind == W_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);  // exact, subnormals included
}

AVX512 static inline __attribute__((always_inline)) int range_avx512_kind(const struct qargs *a,
                                                                          int64_t g0, int64_t g1,
                                                                          int w_kind) {
  const int64_t g = a->g;
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t gi = g0; gi < g1; gi++) {
    const int64_t base = gi * g;
    __m512 vmn = _mm512_set1_ps(INFINITY), vmx = _mm512_set1_ps(-INFINITY);
    __mmask16 nonfinite = 0;
    for (int64_t i = 0; i < g; i += 16) {
      __m512 v = load16(a->w, base + i, w_kind);
      __m512i e = _mm512_and_si512(_mm512_castps_si512(v), exp_mask);
      nonfinite |= _mm512_cmpeq_epi32_mask(e, exp_mask);
      vmn = _mm512_min_ps(vmn, v);
      vmx = _mm512_max_ps(vmx, v);
    }
    if (nonfinite) return BAD_NONFINITE;
    float s, z, cmin, cmax;
    int bad = group_params(a, gi, _mm512_reduce_min_ps(vmn), _mm512_reduce_max_ps(vmx), &s, &z,
                           &cmin, &cmax);
    if (bad) return bad;
    const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
    const __m512 vcmin = _mm512_set1_ps(cmin), vcmax = _mm512_set1_ps(cmax);
    uint8_t *out = (uint8_t *)a->qweight + base / 2;
    for (int64_t i = 0; i < g; i += 16) {
      __m512 q = _mm512_div_ps(load16(a->w, base + i, w_kind), vs);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), vcmin), vcmax);
      // nibbles 0..15 as bytes; each 16-bit pair (b0 | b1 << 8) -> b0 | b1 << 4
      __m128i b = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), eight));
      __m128i p = _mm_cvtepi16_epi8(_mm_or_si128(b, _mm_srli_epi16(b, 4)));
      _mm_storel_epi64((__m128i *)(out + i / 2), p);
    }
  }
  return 0;
}

AVX512 static int range_avx512(const struct qargs *a, int64_t g0, int64_t g1) {
  if (a->w_kind == W_F32) return range_avx512_kind(a, g0, g1, W_F32);
  if (a->w_kind == W_BF16) return range_avx512_kind(a, g0, g1, W_BF16);
  return range_avx512_kind(a, g0, g1, W_F16);
}

int qp_quant_int4(const void *w, int w_kind, int64_t ngroups, int64_t g, int symmetric, int qmin,
                  int qmax, float divisor, int s_kind, float stiny, float smax, float wmax,
                  uint32_t *qweight, void *scales, int8_t *zeros, int nthreads, int allow_wide) {
  const struct qargs a = {w, g, w_kind, symmetric, s_kind,
                          s_kind == S_BF16 ? 16 : s_kind == S_F16 ? 13 : 0,
                          (float)qmin, (float)qmax, divisor, stiny, smax, wmax,
                          qweight, scales, zeros};
  __builtin_cpu_init();
  const int wide = allow_wide && g % 16 == 0 && __builtin_cpu_supports("avx512f") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  // chunks of about 64 KiB of weights, a few per thread
  int64_t chunk = (16384 + g - 1) / g;
  int64_t nchunks = (ngroups + chunk - 1) / chunk;
  int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(| : bad)
  for (int64_t c = 0; c < nchunks; c++) {
    int64_t g0 = c * chunk, g1 = g0 + chunk < ngroups ? g0 + chunk : ngroups;
    bad |= wide ? range_avx512(&a, g0, g1) : range_generic(&a, g0, g1);
  }
  return bad;
}
