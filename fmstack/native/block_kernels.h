// The x86 kernels of block_linear.cpp, written once and compiled once per instruction set: the .cpp
// includes this file inside a `#pragma GCC target(...)` region and a namespace per ISA, with
// FM_DPBUSD(acc, u8, s8) defined to that ISA's 256-bit u8 x s8 -> int32 dot product (VNNI
// `vpdpbusd`), or undefined for AVX2 (`vpmaddubsw` + `vpmaddwd`), and FM_ZMM defined for AVX-512.
//
// The weight is in the 16-row interleaved layout of fmstack/quant/blocks.py (`pack_rows`): for a group
// of 16 output rows and one block, 64-byte chunks [row 0..15][4 bytes], so one 512-bit load holds 4
// bytes of each of the 16 rows and one dot-product instruction against 4 broadcast activation bytes
// gives 16 rows' partial sums in 16 int32 lanes: no horizontal sum, one scale multiply per block for
// 16 rows. 8-bit values are stored + 128 (unsigned; the zero point is folded into the mins), 4-bit
// bytes keep ggml's nibble order (byte j: value j low, value j + 16 high).

static inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Software prefetch of the weight stream, kPrefetch bytes ahead of the chunk being read (about one
// 16-row group of a 576-wide Q4_1 matrix). The stream is sequential per thread, but the hardware
// prefetcher alone left one thread's pass over the default model's 94 MB at 1.3-1.6x the time of a plain
// read of the same bytes; with it 1.0-1.25x (benchmarks/quant_kernels.py --threads 1, busy machine).
static inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0); }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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

// x as three int8 digits per block (`kDigits`): q1 = round(x / s1) with s1 = amax / 127, then the
// residual's digits at s2 = s1 / 254 and s3 = s2 / 254, so |x - (s1 q1 + s2 q2 + s3 q3)| <= s3 / 2 =
// amax * 6.1e-8: fp32's own rounding of the block's largest value. Integer dot products of these digits
// with the stored weight bytes are exact, so the exact mode (no activation quantization a user could
// notice) runs on the integer kernels like the int8 one. q [M][kDigits][K], s and qsum (the digits'
// sum, for the 8-bit zero point) [M][kDigits][nb], xs (the float sum of x: the mins' factor) [M][nb].
static void split3(const float* x, int64_t M, int64_t K, int64_t block, int8_t* q, float* s, int32_t* qsum, float* xs) {
  const int64_t nb = K / block;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < nb; ++i) {
      const float* xb = x + m * K + i * block;
      __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < block; j += 8) {
        const __m256 v = _mm256_loadu_ps(xb + j);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
        sum = _mm256_add_ps(sum, v);
      }
      alignas(32) float t[8];
      _mm256_store_ps(t, mx);
      const float amax = *std::max_element(t, t + 8);
      xs[m * nb + i] = hsum(sum);
      float scale = amax == 0.f ? 1.f : amax / 127.f;
      for (int p = 0; p < kDigits; ++p, scale /= 254.f) s[(m * kDigits + p) * nb + i] = scale;
      __m256i dsum[kDigits] = {};
      for (int64_t j = 0; j < block; j += 8) {
        __m256 r = _mm256_loadu_ps(xb + j);
        for (int p = 0; p < kDigits; ++p) {
          const __m256 sv = _mm256_set1_ps(s[(m * kDigits + p) * nb + i]);
          __m256 d = _mm256_round_ps(_mm256_div_ps(r, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          d = _mm256_min_ps(hi, _mm256_max_ps(lo, d));
          r = _mm256_fnmadd_ps(d, sv, r);
          const __m256i di = _mm256_cvtps_epi32(d);
          dsum[p] = _mm256_add_epi32(dsum[p], di);
          const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(di), _mm256_extracti128_si256(di, 1));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(q + (m * kDigits + p) * K + i * block + j), _mm_packs_epi16(p16, p16));
        }
      }
      for (int p = 0; p < kDigits; ++p)
        qsum[(m * kDigits + p) * nb + i] = static_cast<int32_t>(hsum(_mm256_cvtepi32_ps(dsum[p])));
    }
}

// The scales of group g as float32 [nb][16] into d, and its mins into mn (0 without mins), with the
// 8-bit zero point folded in where `zero_point`: mn - 128 d (exact without mins: a power of two times d).
static inline void group_scales(const Args& a, int64_t g, bool zero_point, float* d, float* mn) {
  const int64_t n = a.nb * kRows, o = g * n;  // a multiple of 16
  const auto* sh = static_cast<const at::Half*>(a.sc) + o;
  const auto* mh = static_cast<const at::Half*>(a.mn) + o;
  const auto* sf = static_cast<const float*>(a.sc) + o;
  const auto* mf = static_cast<const float*>(a.mn) + o;
  const __m256 z = _mm256_set1_ps(-128.f);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 dv = a.half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sh + i)))
                             : _mm256_loadu_ps(sf + i);
    __m256 mv = !a.mn ? _mm256_setzero_ps()
                : a.half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mh + i)))
                         : _mm256_loadu_ps(mf + i);
    if (zero_point) mv = _mm256_fmadd_ps(z, dv, mv);
    _mm256_storeu_ps(d + i, dv);
    _mm256_storeu_ps(mn + i, mv);
  }
}

// Group g dequantized to float32 rows [16][K] (row r at dst + r * K, rows past N too): prefill tiles.
template <int BITS, int BLOCK>
static void dequant_group_t(const Args& a, int64_t g, const float* d, const float* mn, float* dst) {
  constexpr int QB = BLOCK * BITS / 8, CH = QB / 4;
  const __m128i nib = _mm_set1_epi32(0x0F);
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wq = a.w + (g * a.nb + b) * kRows * QB;
    for (int c = 0; c < CH; ++c)
      for (int r = 0; r < kRows; ++r) {
        const __m128i q = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(load_i32(wq + 64 * c + 4 * r)));
        const __m128 dv = _mm_set1_ps(d[b * kRows + r]), mv = _mm_set1_ps(mn[b * kRows + r]);
        float* row = dst + r * a.K + b * BLOCK + 4 * c;
        if (BITS == 4) {
          _mm_storeu_ps(row, _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_and_si128(q, nib)), dv, mv));
          _mm_storeu_ps(row + 16, _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_srli_epi32(q, 4)), dv, mv));
        } else {
          _mm_storeu_ps(row, _mm_fmadd_ps(_mm_cvtepi32_ps(q), dv, mv));
        }
      }
  }
}

// ---- integer path: x as P int8 digits per value, integer dot products ----
// P = 1: the int8 mode (x quantized per block, `quantize`), the zero point of 8-bit weights folded into
// the mins and the mins' factor sx * sum(q) (xsum). P = kDigits: the exact mode (`split3`): each digit's
// integer sums are exact; 128 x the digit's block sum is taken off in int32 (8-bit weights stored + 128)
// before anything is rounded; the digits meet at their scales in float, the mins' factor is the float
// sum of x (xs).

#ifdef FM_DPBUSD
constexpr bool kZeroPointI8 = true;  // dot products of the stored (+ 128) bytes
#else
constexpr bool kZeroPointI8 = false;  // AVX2 makes the 8-bit values signed before the dot product
#endif

#ifdef FM_ZMM
// Rows m0..m0+MR of x against the 16 rows of group g, 512-bit VNNI; acc lane r = output row 16 g + r.
// A independent integer sums per row of x and digit (4 for one row: a single chain of dependent
// `vpdpbusd`s waits 5 cycles each and made the kernel latency-bound, 12 GB/s on one core in cache).
template <int BITS, int BLOCK, int MR, int P>
static void group_dot(const Args& a, int64_t g, int64_t m0, const float* d, const float* mn, __m512* acc) {
  constexpr int QB = BLOCK * BITS / 8, CH = QB / 4, A = MR == 1 ? 4 : 2;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc_min[MR];
  for (int m = 0; m < MR; ++m) acc[m] = acc_min[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wq = a.w + (g * a.nb + b) * kRows * QB;
    __m512i dot[MR][P][A];
    for (int m = 0; m < MR; ++m)
      for (int p = 0; p < P; ++p)
        for (int i = 0; i < A; ++i) dot[m][p][i] = _mm512_setzero_si512();
    for (int c = 0; c < CH; ++c) {
      const __m512i v = _mm512_loadu_si512(wq + 64 * c);
      prefetch(wq + 64 * c);
      const __m512i lo = BITS == 4 ? _mm512_and_si512(v, nib) : v;
      const __m512i hi = BITS == 4 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), nib) : v;
      for (int m = 0; m < MR; ++m)
        for (int p = 0; p < P; ++p) {
          const int8_t* xb = a.qx + ((m0 + m) * P + p) * a.K + b * BLOCK + 4 * c;
          if (BITS == 4) {
            __m512i& dl = dot[m][p][(2 * c) % A];
            __m512i& dh = dot[m][p][(2 * c + 1) % A];
            dl = _mm512_dpbusd_epi32(dl, lo, _mm512_set1_epi32(load_i32(xb)));
            dh = _mm512_dpbusd_epi32(dh, hi, _mm512_set1_epi32(load_i32(xb + 16)));
          } else {
            dot[m][p][c % A] = _mm512_dpbusd_epi32(dot[m][p][c % A], v, _mm512_set1_epi32(load_i32(xb)));
          }
        }
    }
    const __m512 dv = _mm512_loadu_ps(d + b * kRows), mv = _mm512_loadu_ps(mn + b * kRows);
    for (int m = 0; m < MR; ++m) {
      __m512 t = _mm512_setzero_ps();
      for (int p = 0; p < P; ++p) {
        const int64_t o = ((m0 + m) * P + p) * a.nb + b;
        __m512i sum = dot[m][p][0];
        for (int i = 1; i < A; ++i) sum = _mm512_add_epi32(sum, dot[m][p][i]);
        if (P > 1 && BITS == 8) sum = _mm512_sub_epi32(sum, _mm512_set1_epi32(128 * a.qsum[o]));
        t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.sx[o]), t);
      }
      const int64_t xb = (m0 + m) * a.nb + b;
      acc[m] = _mm512_fmadd_ps(t, dv, acc[m]);
      acc_min[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(P > 1 ? a.xs[xb] : a.xsum[xb]), acc_min[m]);
    }
  }
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_add_ps(acc[m], acc_min[m]);
}
#else
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef FM_DPBUSD
  return FM_DPBUSD(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// Rows m0..m0+MR of x against 8 rows (half h) of group g with 256-bit vectors: acc lane r = row 16 g + 8 h + r.
// Without VNNI, 8-bit values are made signed again and the sign moved onto x (`vpmaddubsw` would saturate
// on 255 * 127 pairs; a 4-bit value times a digit, summed in pairs, stays below int16's limit). A chains
// as in group_dot, fewer with more digits (16 vector registers).
template <int BITS, int BLOCK, int MR, int P>
static void half_dot(const Args& a, int64_t g, int h, int64_t m0, const float* d, const float* mn, __m256* acc) {
  constexpr int QB = BLOCK * BITS / 8, CH = QB / 4, A = (MR == 1 ? 4 : 2) / (P == 1 ? 1 : 2);
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 acc_min[MR];
  for (int m = 0; m < MR; ++m) acc[m] = acc_min[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const uint8_t* wq = a.w + (g * a.nb + b) * kRows * QB + 32 * h;
    __m256i dot[MR][P][A];
    for (int m = 0; m < MR; ++m)
      for (int p = 0; p < P; ++p)
        for (int i = 0; i < A; ++i) dot[m][p][i] = _mm256_setzero_si256();
    for (int c = 0; c < CH; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 64 * c));
      if (h == 0) prefetch(wq + 64 * c);
#ifndef FM_DPBUSD
      const __m256i ws = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80))), wu = _mm256_abs_epi8(ws);
#endif
      for (int m = 0; m < MR; ++m)
        for (int p = 0; p < P; ++p) {
          const int8_t* xb = a.qx + ((m0 + m) * P + p) * a.K + b * BLOCK + 4 * c;
          if (BITS == 4) {
            __m256i& dl = dot[m][p][(2 * c) % A];
            __m256i& dh = dot[m][p][(2 * c + 1) % A];
            dl = dot_u8s8(dl, _mm256_and_si256(v, nib), _mm256_set1_epi32(load_i32(xb)));
            dh = dot_u8s8(dh, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib), _mm256_set1_epi32(load_i32(xb + 16)));
          } else {
#ifdef FM_DPBUSD
            dot[m][p][c % A] = dot_u8s8(dot[m][p][c % A], v, _mm256_set1_epi32(load_i32(xb)));
#else
            dot[m][p][c % A] = dot_u8s8(dot[m][p][c % A], wu, _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xb)), ws));
#endif
          }
        }
    }
    const __m256 dv = _mm256_loadu_ps(d + b * kRows + 8 * h), mv = _mm256_loadu_ps(mn + b * kRows + 8 * h);
    for (int m = 0; m < MR; ++m) {
      __m256 t = _mm256_setzero_ps();
      for (int p = 0; p < P; ++p) {
        const int64_t o = ((m0 + m) * P + p) * a.nb + b;
        __m256i sum = dot[m][p][0];
        for (int i = 1; i < A; ++i) sum = _mm256_add_epi32(sum, dot[m][p][i]);
        if (P > 1 && BITS == 8 && kZeroPointI8) sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(128 * a.qsum[o]));
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(a.sx[o]), t);
      }
      const int64_t xb = (m0 + m) * a.nb + b;
      acc[m] = _mm256_fmadd_ps(t, dv, acc[m]);
      acc_min[m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(P > 1 ? a.xs[xb] : a.xsum[xb]), acc_min[m]);
    }
  }
  for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_ps(acc[m], acc_min[m]);
}
#endif

// ---- dispatch over one range of groups ----

static inline void store_rows(const Args& a, int64_t g, int64_t m, const float* v) {
  const int64_t n0 = g * kRows, n = std::min<int64_t>(kRows, a.N - n0);
  std::memcpy(a.out + m * a.N + n0, v, n * sizeof(float));
}

template <int BITS, int BLOCK, int MR, int P>
static void tile(const Args& a, int64_t g, int64_t m0, const float* d, const float* mn) {
#ifdef FM_ZMM
  alignas(64) float v[kRows];
  __m512 acc[MR];
  group_dot<BITS, BLOCK, MR, P>(a, g, m0, d, mn, acc);
  for (int m = 0; m < MR; ++m) {
    _mm512_store_ps(v, acc[m]);
    store_rows(a, g, m0 + m, v);
  }
#else
  float res[MR][kRows];
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MR];
    half_dot<BITS, BLOCK, MR, P>(a, g, h, m0, d, mn, acc);
    for (int m = 0; m < MR; ++m) _mm256_storeu_ps(res[m] + 8 * h, acc[m]);
  }
  for (int m = 0; m < MR; ++m) store_rows(a, g, m0 + m, res[m]);
#endif
}

template <int BITS, int BLOCK>
static void gemv_t(const Args& a, int64_t g0, int64_t g1) {
  std::vector<float> buf(2 * a.nb * kRows);
  float *d = buf.data(), *mn = d + a.nb * kRows;
  for (int64_t g = g0; g < g1; ++g) {
    group_scales(a, g, BITS == 8 && !a.qsum && kZeroPointI8, d, mn);
    int64_t m = 0;
    if (a.qsum) {  // the exact mode as digits (split3); the zero point is taken off in the kernel
      for (; m + 2 <= a.M; m += 2) tile<BITS, BLOCK, 2, kDigits>(a, g, m, d, mn);
      for (; m < a.M; ++m) tile<BITS, BLOCK, 1, kDigits>(a, g, m, d, mn);
    } else {
      for (; m + 4 <= a.M; m += 4) tile<BITS, BLOCK, 4, 1>(a, g, m, d, mn);
      for (; m < a.M; ++m) tile<BITS, BLOCK, 1, 1>(a, g, m, d, mn);
    }
  }
}

static void gemv(const Args& a, int64_t g0, int64_t g1) {
  if (a.bits == 4) gemv_t<4, 32>(a, g0, g1);
  else if (a.block == 32) gemv_t<8, 32>(a, g0, g1);
  else gemv_t<8, 16>(a, g0, g1);
}

// Groups g0..g1 dequantized into dst [(g1 - g0) * 16, K].
static void dequant_groups(const Args& a, int64_t g0, int64_t g1, float* dst) {
  std::vector<float> buf(2 * a.nb * kRows);
  float *d = buf.data(), *mn = d + a.nb * kRows;
  for (int64_t g = g0; g < g1; ++g) {
    group_scales(a, g, a.bits == 8, d, mn);
    float* rows = dst + (g - g0) * kRows * a.K;
    if (a.bits == 4) dequant_group_t<4, 32>(a, g, d, mn, rows);
    else if (a.block == 32) dequant_group_t<8, 32>(a, g, d, mn, rows);
    else dequant_group_t<8, 16>(a, g, d, mn, rows);
  }
}
