// qatpass's CPU FP4 (NVFP4, MXFP4) linear: y[m, n] = sum_k x[m, k] * W[n, k], fp32 accumulation,
// W decoded in registers from the canonical packed format (qatpass/scheme_fp4.py):
//   qweight bytes [N, K/2]: E2M1 codes, low nibble = even k (sign bit 8 | magnitude index);
//   scales bytes [N, K/B]: NVFP4 (B = 16) FP8 E4M3, element scale = e4m3 / global_scale (an
//   fp32 division, as the scheme's dequantize); MXFP4 (B = 32) E8M0, element scale = 2**(e - 127).
// The 16 code values live in one zmm register and `vpermps` is the table lookup; each decoded
// weight is value * element scale in fp32, exactly the scheme's fp32 dequantized weight, so the
// result equals x @ dequantize(p, float32).T up to summation order.
// x: fp32 rows (row stride in elements; the caller widens bf16 exactly); y: fp32 [M, N] (the
// caller casts and adds the bias).
//
// Built and loaded by qatpass/kernels/cpu/fp4_native.py, which checks qp_fp4_supported() first and
// validates every argument: the code here trusts shapes, strides and pointers.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MT 8  // rows of x per pass over a weight row (accumulators in registers)

int qp_fp4_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

static float bits_to_float(uint32_t b) {
  float f;
  memcpy(&f, &b, 4);
  return f;
}

// FP8 E4M3 (fn) byte -> fp32 (exact); the NaN pattern never occurs (qatpass never writes it)
static float e4m3_to_float(uint8_t v) {
  uint32_t sign = (uint32_t)(v >> 7) << 31, e = (v >> 3) & 0xF, m = v & 7;
  if (e == 0) {  // subnormal: m * 2**-9
    float f = (float)m * (1.0f / 512.0f);
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((e + 120) << 23) | (m << 20));
}

// E8M0 byte -> 2**(e - 127) as fp32 (2**-127 is an fp32 subnormal)
static float e8m0_to_float(uint8_t e) {
  return e == 0 ? bits_to_float(1u << 22) : bits_to_float((uint32_t)e << 23);
}

// 16 codes from 8 bytes, in k order, as int32 lane indices: lane j holds byte j/2 shifted right
// by 4 * (j % 2); vpermps reads only the low 4 bits of each index
static inline __m512i nibbles16(const uint8_t *p) {
  __m128i b = _mm_loadl_epi64((const __m128i *)p);
  __m512i d = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  return _mm512_srlv_epi32(d, _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4));
}

static inline __m512 decode16(const uint8_t *wq, int64_t kk, float s, __m512 table) {
  // the scheme's fp32 weight: E2M1 value * element scale
  return _mm512_mul_ps(_mm512_permutexvar_ps(nibbles16(wq + kk / 2), table), _mm512_set1_ps(s));
}

// fmt: 0 NVFP4 (block 16, global_scale used), 1 MXFP4 (block 32). x: fp32 [M, K] rows.
int qp_fp4_linear(const float *x, int64_t x_stride, const uint8_t *qweight,
                  const uint8_t *scales, float global_scale, int fmt, float *y, int64_t m,
                  int64_t n, int64_t k, int threads) {
  const int64_t block = fmt == 0 ? 16 : 32, nblocks = k / block;
  const __m512 table = _mm512_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f,
                                      -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f);
  float stab[256];  // element scale of each scale byte
  for (int v = 0; v < 256; v++)
    stab[v] = fmt == 0 ? e4m3_to_float((uint8_t)v) / global_scale : e8m0_to_float((uint8_t)v);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < n; row++) {
    const uint8_t *wq = qweight + row * (k / 2);
    const uint8_t *ws = scales + row * nblocks;
    if (m == 1) {  // GEMV: four accumulators hide the FMA latency
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t kk = 0;
      for (; kk + 64 <= k; kk += 64) {
        a0 = _mm512_fmadd_ps(decode16(wq, kk, stab[ws[kk / block]], table),
                             _mm512_loadu_ps(x + kk), a0);
        a1 = _mm512_fmadd_ps(decode16(wq, kk + 16, stab[ws[(kk + 16) / block]], table),
                             _mm512_loadu_ps(x + kk + 16), a1);
        a2 = _mm512_fmadd_ps(decode16(wq, kk + 32, stab[ws[(kk + 32) / block]], table),
                             _mm512_loadu_ps(x + kk + 32), a2);
        a3 = _mm512_fmadd_ps(decode16(wq, kk + 48, stab[ws[(kk + 48) / block]], table),
                             _mm512_loadu_ps(x + kk + 48), a3);
      }
      for (; kk < k; kk += 16)
        a0 = _mm512_fmadd_ps(decode16(wq, kk, stab[ws[kk / block]], table),
                             _mm512_loadu_ps(x + kk), a0);
      y[row] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      continue;
    }
    for (int64_t m0 = 0; m0 < m; m0 += MT) {
      const int64_t mt = m - m0 < MT ? m - m0 : MT;
      __m512 acc[MT];
      for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < k; kk += 16) {
        const __m512 w = decode16(wq, kk, stab[ws[kk / block]], table);
        for (int64_t i = 0; i < mt; i++)
          acc[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (m0 + i) * x_stride + kk), acc[i]);
      }
      for (int64_t i = 0; i < mt; i++) y[(m0 + i) * n + row] = _mm512_reduce_add_ps(acc[i]);
    }
  }
  return 0;
}
