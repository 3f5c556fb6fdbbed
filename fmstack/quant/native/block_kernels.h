// The x86 kernels of block_linear.cpp, written once and compiled once per instruction set: the .cpp
// includes this file inside a `#pragma GCC target(...)` region and a namespace per ISA, with
// FM_DPBUSD(acc, u8, s8) defined to that ISA's u8 x s8 -> int32 dot product (VNNI `vpdpbusd`), or
// undefined for AVX2 (`vpmaddubsw` + `vpmaddwd`; no int16 saturation here: |u8| <= 128, |s8| <= 127, a
// pair sums to at most 32512).
//
// One 256-bit vector holds 32 weights: one block of 32, or two blocks of 16 (int32 lanes 0-3 come from
// bytes 0-15, lanes 4-7 from bytes 16-31, so the two blocks keep separate sums).

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of one ggml 4-bit block -> its 32 values 0..15 in order (low nibbles, then high nibbles).
static inline __m256i unpack_q4(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

// scalar::quantize with 8 lanes (block a multiple of 8); _mm256_round_ps rounds half to even like torch.round.
static void quantize(const float* x, int64_t nblocks, int64_t block, int8_t* q, float* s, float* xsum, float* xf) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int64_t i = 0; i < nblocks; ++i) {
    const float* xb = x + i * block;
    __m256 mx = _mm256_setzero_ps();
    for (int64_t j = 0; j < block; j += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + j), absmask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float scale = amax == 0.f ? 1.f : amax / 127.0f;
    const __m256 sv = _mm256_set1_ps(scale);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t j = 0; j < block; j += 8) {
      __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xb + j), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
      const __m256i qi = _mm256_cvtps_epi32(r);
      sum = _mm256_add_epi32(sum, qi);
      const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i * block + j), _mm_packs_epi16(p16, p16));
      if (xf) _mm256_storeu_ps(xf + i * block + j, _mm256_mul_ps(r, sv));
    }
    s[i] = scale;
    xsum[i] = scale * hsum(_mm256_cvtepi32_ps(sum));
  }
}

static inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline __m256i load16(const void* p) {  // upper half zero
  return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef FM_DPBUSD
  return FM_DPBUSD(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Scales (or mins) of one weight row as float32, 8 at a time: no per-block conversion in the dot loops.
static inline void row_to_float(const float* p, int64_t nb, float* dst) { std::copy(p, p + nb, dst); }
static inline void row_to_float(const at::Half* p, int64_t nb, float* dst) {
  int64_t j = 0;
  for (; j + 8 <= nb; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j))));
  for (; j < nb; ++j) dst[j] = _cvtsh_ss(p[j].x);
}

static inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  float r = hsum(acc);
  for (; j < n; ++j) r += a[j] * b[j];
  return r;
}

// out[m0 + m, n] = the scaled block sums + sum_b min_b * sx_b * sum(qx in b).
template <int MR>
static inline void store_i8(const Args& a, int64_t n, int64_t m0, const float* mn, const float* sums) {
  for (int m = 0; m < MR; ++m)
    a.out[(m0 + m) * a.N + n] = sums[m] + (mn ? dot_f32(mn, a.xsum + (m0 + m) * a.nb, a.nb) : 0.f);
}

// Weight row n's bytes, and x's int8 rows and scales from row m0.
struct I8Rows {
  const uint8_t* w;
  const int8_t* qx;
  const float* sx;
};
static inline I8Rows i8_rows(const Args& a, int64_t n, int64_t m0) {
  return {a.w + n * a.wrow, a.qx + m0 * a.K, a.sx + m0 * a.nb};
}

// Integer path for rows m0..m0+MR of x against weight row n, 32 weights (one block of 32, two of 16)
// per step; d and mn are the row's scales and mins as float32.
template <int BITS, int BLOCK, int MR>
static void rows_i8(const Args& a, int64_t n, int64_t m0, const float* d, const float* mn) {
  const auto [w, qx, sx] = i8_rows(a, n, m0);
  __m256 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
  constexpr int span = 32 / BLOCK;
  const int64_t full = a.nb / span * span;
  for (int64_t b = 0; b < full; b += span) {
    __m256i wu, wv = _mm256_setzero_si256();
    if (BITS == 4) {
      wu = unpack_q4(w + b * 16);
    } else {
      wv = load32(w + b * BLOCK);
      wu = _mm256_abs_epi8(wv);  // -128 -> 0x80 = 128 as unsigned: still exact
    }
    const __m256 dv = span == 1 ? _mm256_broadcast_ss(d + b)
                                : _mm256_set_m128(_mm_broadcast_ss(d + b + 1), _mm_broadcast_ss(d + b));
    for (int m = 0; m < MR; ++m) {
      __m256i xv = load32(qx + m * a.K + b * BLOCK);
      if (BITS == 8) xv = _mm256_sign_epi8(xv, wv);
      const float* s = sx + m * a.nb + b;
      const __m256 sv = span == 1 ? _mm256_broadcast_ss(s) : _mm256_set_m128(_mm_broadcast_ss(s + 1), _mm_broadcast_ss(s));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(wu, xv)), _mm256_mul_ps(dv, sv), acc[m]);
    }
  }
  float tail[MR] = {};
  if (full < a.nb) {  // a last lone block of 16
    const __m256i wv = load16(w + full * BLOCK), wu = _mm256_abs_epi8(wv);
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_sign_epi8(load16(qx + m * a.K + full * BLOCK), wv);
      tail[m] = hsum(_mm256_cvtepi32_ps(dot_u8s8(wu, xv))) * d[full] * sx[m * a.nb + full];
    }
  }
  for (int m = 0; m < MR; ++m) tail[m] += hsum(acc[m]);
  store_i8<MR>(a, n, m0, mn, tail);
}

#ifdef FM_ZMM
// Two floats p[0], p[1] -> lanes 0-7 p[0], lanes 8-15 p[1] (one scale per 32-weight block of a zmm).
static inline __m512 pair_ps(const float* p) {
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)))));
}

// rows_i8 for blocks of 32 with 512-bit VNNI: two blocks (64 weights) per step, half the instructions.
// 8-bit q: no 512-bit vpsignb, so qx is negated (masked subtract) where q < 0.
template <int BITS, int MR>
static void rows_i8_zmm(const Args& a, int64_t n, int64_t m0, const float* d, const float* mn) {
  const auto [w, qx, sx] = i8_rows(a, n, m0);
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t full = a.nb & ~int64_t(1);
  for (int64_t b = 0; b < full; b += 2) {
    __m512i wu;
    __mmask64 neg = 0;
    if (BITS == 4) {  // [lo0 | lo1 | hi0 | hi1] -> [lo0 | hi0 | lo1 | hi1]: each block's 32 values in order
      const __m256i v = load32(w + b * 16), mask = _mm256_set1_epi8(0x0F);
      const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, mask)),
                                           _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), 1);
      wu = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
    } else {
      const __m512i v = _mm512_loadu_si512(w + b * 32);
      wu = _mm512_abs_epi8(v);
      neg = _mm512_movepi8_mask(v);
    }
    const __m512 dv = pair_ps(d + b);
    for (int m = 0; m < MR; ++m) {
      __m512i xv = _mm512_loadu_si512(qx + m * a.K + b * 32);
      if (BITS == 8) xv = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);
      const __m512 f = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, xv));
      acc[m] = _mm512_fmadd_ps(f, _mm512_mul_ps(dv, pair_ps(sx + m * a.nb + b)), acc[m]);
    }
  }
  float sums[MR];
  for (int m = 0; m < MR; ++m) sums[m] = _mm512_reduce_add_ps(acc[m]);
  if (full < a.nb) {  // an odd last block
    const __m256i wv = BITS == 4 ? _mm256_setzero_si256() : load32(w + full * 32);
    const __m256i wu = BITS == 4 ? unpack_q4(w + full * 16) : _mm256_abs_epi8(wv);
    for (int m = 0; m < MR; ++m) {
      __m256i xv = load32(qx + m * a.K + full * 32);
      if (BITS == 8) xv = _mm256_sign_epi8(xv, wv);
      sums[m] += hsum(_mm256_cvtepi32_ps(dot_u8s8(wu, xv))) * d[full] * sx[m * a.nb + full];
    }
  }
  store_i8<MR>(a, n, m0, mn, sums);
}
#endif

// Weight block b of row w as float32 vectors of 8 (BLOCK / 8 of them): q * d + min, one rounding (fma).
template <int BITS, int BLOCK>
static inline void dequant_block(const uint8_t* w, const float* d, const float* mn, int64_t b, __m256* v) {
  const __m256 dv = _mm256_broadcast_ss(d + b), mv = mn ? _mm256_broadcast_ss(mn + b) : _mm256_setzero_ps();
  if (BITS == 4) {
    const __m256i q = unpack_q4(w + b * 16);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int g = 0; g < 4; ++g) v[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[g])), dv, mv);
  } else {
    for (int g = 0; g < BLOCK / 8; ++g) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + b * BLOCK + g * 8));
      v[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), dv, mv);
    }
  }
}

// Float path for rows m0..m0+MR of x against weight row n: the weight dequantized in registers.
template <int BITS, int BLOCK, int MR>
static void rows_f32(const Args& a, int64_t n, int64_t m0, const float* d, const float* mn) {
  const uint8_t* w = a.w + n * a.wrow;
  __m256 acc[2][MR];
  for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
  __m256 v[BLOCK / 8];
  for (int64_t b = 0; b < a.nb; ++b) {
    dequant_block<BITS, BLOCK>(w, d, mn, b, v);
    for (int m = 0; m < MR; ++m) {
      const float* xb = a.x + (m0 + m) * a.K + b * BLOCK;
      for (int g = 0; g < BLOCK / 8; ++g)
        acc[g & 1][m] = _mm256_fmadd_ps(v[g], _mm256_loadu_ps(xb + 8 * g), acc[g & 1][m]);
    }
  }
  for (int m = 0; m < MR; ++m) a.out[(m0 + m) * a.N + n] = hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
}

// Scales and mins of weight row n as float32 into buf[0, nb) and buf[nb, 2 nb); returns the mins or nullptr.
template <typename S>
static inline const float* row_scales(const Args& a, int64_t n, float* buf) {
  row_to_float(static_cast<const S*>(a.sc) + n * a.nb, a.nb, buf);
  if (!a.mn) return nullptr;
  row_to_float(static_cast<const S*>(a.mn) + n * a.nb, a.nb, buf + a.nb);
  return buf + a.nb;
}

template <int BITS, int BLOCK, typename S>
static void dequant_rows_t(const Args& a, int64_t n0, int64_t n1, float* dst) {
  std::vector<float> buf(2 * a.nb);
  __m256 v[BLOCK / 8];
  for (int64_t n = n0; n < n1; ++n) {
    const float* mn = row_scales<S>(a, n, buf.data());
    float* row = dst + (n - n0) * a.K;
    for (int64_t b = 0; b < a.nb; ++b) {
      dequant_block<BITS, BLOCK>(a.w + n * a.wrow, buf.data(), mn, b, v);
      for (int g = 0; g < BLOCK / 8; ++g) _mm256_storeu_ps(row + b * BLOCK + 8 * g, v[g]);
    }
  }
}

// All rows of x against weight rows n0..n1, in chunks of up to 4 rows (4 x 2 accumulators in registers).
template <int BITS, int BLOCK, typename S>
static void gemv_t(const Args& a, int64_t n0, int64_t n1) {
  std::vector<float> buf(2 * a.nb);
  const float* d = buf.data();
  for (int64_t n = n0; n < n1; ++n) {
    const float* mn = row_scales<S>(a, n, buf.data());
    int64_t m = 0;
    if (a.qx) {
#ifdef FM_ZMM
      if (BLOCK == 32) {
        for (; m + 4 <= a.M; m += 4) rows_i8_zmm<BITS, 4>(a, n, m, d, mn);
        for (; m < a.M; ++m) rows_i8_zmm<BITS, 1>(a, n, m, d, mn);
        continue;
      }
#endif
      for (; m + 4 <= a.M; m += 4) rows_i8<BITS, BLOCK, 4>(a, n, m, d, mn);
      for (; m < a.M; ++m) rows_i8<BITS, BLOCK, 1>(a, n, m, d, mn);
    } else {
      for (; m + 4 <= a.M; m += 4) rows_f32<BITS, BLOCK, 4>(a, n, m, d, mn);
      for (; m < a.M; ++m) rows_f32<BITS, BLOCK, 1>(a, n, m, d, mn);
    }
  }
}

template <typename S>
static void gemv_s(const Args& a, int64_t n0, int64_t n1) {
  if (a.bits == 4) gemv_t<4, 32, S>(a, n0, n1);
  else if (a.block == 32) gemv_t<8, 32, S>(a, n0, n1);
  else gemv_t<8, 16, S>(a, n0, n1);
}

template <typename S>
static void dequant_s(const Args& a, int64_t n0, int64_t n1, float* dst) {
  if (a.bits == 4) dequant_rows_t<4, 32, S>(a, n0, n1, dst);
  else if (a.block == 32) dequant_rows_t<8, 32, S>(a, n0, n1, dst);
  else dequant_rows_t<8, 16, S>(a, n0, n1, dst);
}

static void gemv(const Args& a, int64_t n0, int64_t n1) {
  a.half ? gemv_s<at::Half>(a, n0, n1) : gemv_s<float>(a, n0, n1);
}

static void dequant_rows(const Args& a, int64_t n0, int64_t n1, float* dst) {
  a.half ? dequant_s<at::Half>(a, n0, n1, dst) : dequant_s<float>(a, n0, n1, dst);
}
