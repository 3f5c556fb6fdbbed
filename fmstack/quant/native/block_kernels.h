// The x86 kernels of block_linear.cpp, written once and compiled once per instruction set: the .cpp
// includes this file inside a `#pragma GCC target(...)` region and a namespace per ISA, with
// FM_DPBUSD(acc, u8, s8) defined to that ISA's u8 x s8 -> int32 dot product (VNNI `vpdpbusd`), or
// undefined for AVX2 (`vpmaddubsw` + `vpmaddwd`; no int16 saturation here: |u8| <= 128, |s8| <= 127, a
// pair sums to at most 32512).
//
// One 256-bit vector holds 32 weights: one block of 32, or two blocks of 16 (int32 lanes 0-3 come from
// bytes 0-15, lanes 4-7 from bytes 16-31, so the two blocks keep separate sums).

static inline float ld(const float* p) { return *p; }
static inline float ld(const at::Half* p) { return _cvtsh_ss(p->x); }

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

// Integer path for rows m0..m0+MR of x against weight row n; 32 weights per step (`span` blocks).
template <int BITS, int BLOCK, typename S, int MR>
static void rows_i8(const Args& a, int64_t n, int64_t m0) {
  const uint8_t* w = a.w + n * a.wrow;
  const S* sc = static_cast<const S*>(a.sc) + n * a.nb;
  const S* mn = a.mn ? static_cast<const S*>(a.mn) + n * a.nb : nullptr;
  const int8_t* qx = a.qx + m0 * a.K;
  const float* sx = a.sx + m0 * a.nb;
  __m256 acc[2][MR];
  float macc[MR];
  for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps(), macc[m] = 0.f;
  constexpr int span = 32 / BLOCK;
  auto step = [&](int64_t b, int blocks, __m256* out) {  // blocks b..b+blocks-1 (blocks <= span)
    __m256i wu, wv = _mm256_setzero_si256();
    if (BITS == 4) {
      wu = unpack_q4(w + b * 16);
    } else {
      wv = blocks == 2 || BLOCK == 32 ? load32(w + b * BLOCK) : load16(w + b * BLOCK);
      wu = _mm256_abs_epi8(wv);  // -128 -> 0x80 = 128 as unsigned: still exact
    }
    const float d0 = ld(sc + b), d1 = blocks == 2 ? ld(sc + b + 1) : 0.f;
    for (int m = 0; m < MR; ++m) {
      const int8_t* xb = qx + m * a.K + b * BLOCK;
      __m256i xv = blocks == 2 || BLOCK == 32 ? load32(xb) : load16(xb);
      if (BITS == 8) xv = _mm256_sign_epi8(xv, wv);
      const __m256 f = _mm256_cvtepi32_ps(dot_u8s8(wu, xv));
      const float* s = sx + m * a.nb + b;
      const __m256 scale = span == 1 ? _mm256_set1_ps(d0 * s[0])
                                     : _mm256_set_m128(_mm_set1_ps(blocks == 2 ? d1 * s[1] : 0.f), _mm_set1_ps(d0 * s[0]));
      out[m] = _mm256_fmadd_ps(f, scale, out[m]);
    }
  };
  int64_t b = 0;
  for (; b + 2 * span <= a.nb; b += 2 * span) step(b, span, acc[0]), step(b + span, span, acc[1]);
  for (; b < a.nb; b += span) step(b, (int)std::min<int64_t>(span, a.nb - b), acc[0]);
  if (mn) {  // sum_j m * qx_j * sx = m * sx * isum
    for (int m = 0; m < MR; ++m) {
      const float* s = sx + m * a.nb;
      const int32_t* is = a.isum + (m0 + m) * a.nb;
      for (int64_t j = 0; j < a.nb; ++j) macc[m] += ld(mn + j) * s[j] * (float)is[j];
    }
  }
  for (int m = 0; m < MR; ++m) a.out[(m0 + m) * a.N + n] = hsum(_mm256_add_ps(acc[0][m], acc[1][m])) + macc[m];
}

// Weight block b of row w as float32 vectors of 8 (BLOCK / 8 of them): q * d + min, one rounding (fma).
template <int BITS, int BLOCK, typename S>
static inline void dequant_block(const uint8_t* w, const S* sc, const S* mn, int64_t b, __m256* v) {
  const __m256 d = _mm256_set1_ps(ld(sc + b)), mv = _mm256_set1_ps(mn ? ld(mn + b) : 0.f);
  if (BITS == 4) {
    const __m256i q = unpack_q4(w + b * 16);
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int g = 0; g < 4; ++g) v[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[g])), d, mv);
  } else {
    for (int g = 0; g < BLOCK / 8; ++g) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + b * BLOCK + g * 8));
      v[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d, mv);
    }
  }
}

// Float path for rows m0..m0+MR of x against weight row n: the weight dequantized in registers.
template <int BITS, int BLOCK, typename S, int MR>
static void rows_f32(const Args& a, int64_t n, int64_t m0) {
  const uint8_t* w = a.w + n * a.wrow;
  const S* sc = static_cast<const S*>(a.sc) + n * a.nb;
  const S* mn = a.mn ? static_cast<const S*>(a.mn) + n * a.nb : nullptr;
  __m256 acc[2][MR];
  for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
  __m256 v[BLOCK / 8];
  for (int64_t b = 0; b < a.nb; ++b) {
    dequant_block<BITS, BLOCK, S>(w, sc, mn, b, v);
    for (int m = 0; m < MR; ++m) {
      const float* xb = a.x + (m0 + m) * a.K + b * BLOCK;
      for (int g = 0; g < BLOCK / 8; ++g)
        acc[g & 1][m] = _mm256_fmadd_ps(v[g], _mm256_loadu_ps(xb + 8 * g), acc[g & 1][m]);
    }
  }
  for (int m = 0; m < MR; ++m) a.out[(m0 + m) * a.N + n] = hsum(_mm256_add_ps(acc[0][m], acc[1][m]));
}

template <int BITS, int BLOCK, typename S>
static void dequant_rows_t(const Args& a, int64_t n0, int64_t n1, float* dst) {
  __m256 v[BLOCK / 8];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = a.w + n * a.wrow;
    const S* sc = static_cast<const S*>(a.sc) + n * a.nb;
    const S* mn = a.mn ? static_cast<const S*>(a.mn) + n * a.nb : nullptr;
    float* row = dst + (n - n0) * a.K;
    for (int64_t b = 0; b < a.nb; ++b) {
      dequant_block<BITS, BLOCK, S>(w, sc, mn, b, v);
      for (int g = 0; g < BLOCK / 8; ++g) _mm256_storeu_ps(row + b * BLOCK + 8 * g, v[g]);
    }
  }
}

// All rows of x against weight rows n0..n1, in chunks of up to 4 rows (4 x 2 accumulators in registers).
template <int BITS, int BLOCK, typename S>
static void gemv_t(const Args& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    if (a.qx) {
      for (; m + 4 <= a.M; m += 4) rows_i8<BITS, BLOCK, S, 4>(a, n, m);
      for (; m < a.M; ++m) rows_i8<BITS, BLOCK, S, 1>(a, n, m);
    } else {
      for (; m + 4 <= a.M; m += 4) rows_f32<BITS, BLOCK, S, 4>(a, n, m);
      for (; m < a.M; ++m) rows_f32<BITS, BLOCK, S, 1>(a, n, m);
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
