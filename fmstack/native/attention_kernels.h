// Decode attention of block_linear.cpp's torch.ops.fmstack.decode_attention, compiled once per
// instruction set like block_kernels.h (FM_ZMM: 16 float lanes, else 8). One query head's rows against
// its kv head's cache: scores of the visible keys only, softmax, weighted sum of their values.

#ifdef FM_ZMM
using VF = __m512;
constexpr int kLanes = 16;
static inline VF vf_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float* p, VF v) { _mm512_storeu_ps(p, v); }
static inline VF vf_set1(float x) { return _mm512_set1_ps(x); }
static inline VF vf_zero() { return _mm512_setzero_ps(); }
static inline VF vf_fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static inline VF vf_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
static inline VF vf_add(VF a, VF b) { return _mm512_add_ps(a, b); }
static inline VF vf_sub(VF a, VF b) { return _mm512_sub_ps(a, b); }
static inline VF vf_max(VF a, VF b) { return _mm512_max_ps(a, b); }
static inline float vf_sum(VF v) { return _mm512_reduce_add_ps(v); }
static inline VF vf_round(VF v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline VF vf_pow2(VF p, VF n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
static inline VF vf_unpacklo(VF a, VF b) { return _mm512_unpacklo_ps(a, b); }  // per 128 bits: a0 b0 a1 b1
static inline VF vf_unpackhi(VF a, VF b) { return _mm512_unpackhi_ps(a, b); }  // a2 b2 a3 b3
static inline VF vf_pairlo(VF a, VF b) {  // per 128 bits: a's low 64-bit half, then b's
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
static inline VF vf_pairhi(VF a, VF b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
static inline __m128 vf_lanes_to_128(VF z) {  // the sum of the four 128-bit lanes
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#else
using VF = __m256;
constexpr int kLanes = 8;
static inline VF vf_load(const float* p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float* p, VF v) { _mm256_storeu_ps(p, v); }
static inline VF vf_set1(float x) { return _mm256_set1_ps(x); }
static inline VF vf_zero() { return _mm256_setzero_ps(); }
static inline VF vf_fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static inline VF vf_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
static inline VF vf_add(VF a, VF b) { return _mm256_add_ps(a, b); }
static inline VF vf_sub(VF a, VF b) { return _mm256_sub_ps(a, b); }
static inline VF vf_max(VF a, VF b) { return _mm256_max_ps(a, b); }
static inline float vf_sum(VF v) { return hsum(v); }
static inline VF vf_round(VF v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline VF vf_pow2(VF p, VF n) {  // p * 2^n for integral n in [-126, 127]: n added to the exponent bits
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
static inline VF vf_unpacklo(VF a, VF b) { return _mm256_unpacklo_ps(a, b); }
static inline VF vf_unpackhi(VF a, VF b) { return _mm256_unpackhi_ps(a, b); }
static inline VF vf_pairlo(VF a, VF b) { return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b))); }
static inline VF vf_pairhi(VF a, VF b) { return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b))); }
static inline __m128 vf_lanes_to_128(VF z) { return _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1)); }
#endif

// exp(x) for x <= 0 (scores minus their maximum): 2^(x log2 e) = 2^n * 2^f, |f| <= 1/2, 2^f by its
// Taylor series to degree 6 (relative error < 2e-7, float32's own rounding). x is clamped at -87 (the
// result is then ~1e-38, not 0: callers only use visible keys, whose x is >= the clamp in practice).
static inline VF vf_exp(VF x) {
  x = vf_max(x, vf_set1(-87.f));
  const VF t = vf_mul(x, vf_set1(1.44269504088896341f));
  const VF n = vf_round(t);
  const VF f = vf_sub(t, n);
  // ln2^k / k!, k = 6 .. 0
  VF p = vf_set1(1.5403530393381609e-4f);
  p = vf_fma(p, f, vf_set1(1.3333558146428443e-3f));
  p = vf_fma(p, f, vf_set1(9.6181291076284772e-3f));
  p = vf_fma(p, f, vf_set1(5.5504108664821580e-2f));
  p = vf_fma(p, f, vf_set1(2.4022650695910071e-1f));
  p = vf_fma(p, f, vf_set1(6.9314718055994531e-1f));
  p = vf_fma(p, f, vf_set1(1.0f));
  return vf_pow2(p, n);
}

// exp(sc[s] - mx) for s < S (vectorized).
static inline void exp_shifted(float* sc, int64_t S, float mx) {
  int64_t s = 0;
  for (; s + kLanes <= S; s += kLanes) vf_store(sc + s, vf_exp(vf_sub(vf_load(sc + s), vf_set1(mx))));
  for (; s < S; ++s) sc[s] = std::exp(sc[s] - mx);
}

// The horizontal sums of a, b, c, d in one vector [sum a, sum b, sum c, sum d]: 4 keys' scores with
// about a third of the shuffles of four separate reductions.
static inline __m128 sum4(VF a, VF b, VF c, VF d) {
  const VF x = vf_add(vf_unpacklo(a, b), vf_unpackhi(a, b));  // per 128 bits: a02 b02 a13 b13
  const VF y = vf_add(vf_unpacklo(c, d), vf_unpackhi(c, d));
  return vf_lanes_to_128(vf_add(vf_pairlo(x, y), vf_pairhi(x, y)));
}

template <int NV>
static inline VF key_dot(const VF* qv, const float* kr) {
  VF a = vf_mul(qv[0], vf_load(kr));
  for (int i = 1; i < NV; ++i) a = vf_fma(qv[i], vf_load(kr + i * kLanes), a);
  return a;
}

// out [D] = softmax over the visible keys of (q . k_s * scale) applied to v_s; k, v [S, D] of one kv
// head, visible [S] (bool bytes), sc a scratch buffer of 2 S floats. The visible keys are listed first
// (idx, in sc's second half), so scores, exponentials and the value sum cost what the filled part of
// the cache costs, not its allocation; scores come 4 keys at a time (sum4). D = NV * kLanes: q and
// the output stay in registers (a loop over D in memory made every key wait on the last key's stores).
template <int NV>
static void attend_row_t(const float* q, const float* k, const float* v, const uint8_t* visible, int64_t S,
                         float scale, float* sc, float* out) {
  constexpr int64_t D = NV * kLanes;
  int32_t* idx = reinterpret_cast<int32_t*>(sc + S);
  int64_t n = 0;
  for (int64_t s = 0; s < S; ++s) {
    idx[n] = static_cast<int32_t>(s);
    n += visible[s] != 0;
  }
  VF qv[NV], acc[NV];
  for (int i = 0; i < NV; ++i) qv[i] = vf_load(q + i * kLanes), acc[i] = vf_zero();
  __m128 mx4 = _mm_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const __m128 s4 = _mm_mul_ps(sum4(key_dot<NV>(qv, k + idx[j] * D), key_dot<NV>(qv, k + idx[j + 1] * D),
                                      key_dot<NV>(qv, k + idx[j + 2] * D), key_dot<NV>(qv, k + idx[j + 3] * D)),
                                 _mm_set1_ps(scale));
    _mm_storeu_ps(sc + j, s4);
    mx4 = _mm_max_ps(mx4, s4);
  }
  mx4 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
  float mx = _mm_cvtss_f32(_mm_max_ss(mx4, _mm_movehdup_ps(mx4)));
  for (; j < n; ++j) {
    sc[j] = vf_sum(key_dot<NV>(qv, k + idx[j] * D)) * scale;
    mx = std::max(mx, sc[j]);
  }
  float sum = 0.f;
  if (n > 0) {  // else no visible key: zeros (the caller never asks for such a row)
    exp_shifted(sc, n, mx);
    for (j = 0; j < n; ++j) {
      sum += sc[j];
      const VF p = vf_set1(sc[j]);
      for (int i = 0; i < NV; ++i) acc[i] = vf_fma(p, vf_load(v + idx[j] * D + i * kLanes), acc[i]);
    }
  }
  const VF inv = vf_set1(sum > 0.f ? 1.f / sum : 0.f);
  for (int i = 0; i < NV; ++i) vf_store(out + i * kLanes, vf_mul(acc[i], inv));
}

// attend_row_t for the head sizes models use (D / kLanes = 1, 2, 4, 8); false for another D.
static bool attend_row(const float* q, const float* k, const float* v, const uint8_t* visible, int64_t S,
                       int64_t D, float scale, float* sc, float* out) {
  switch (D) {
    case kLanes: attend_row_t<1>(q, k, v, visible, S, scale, sc, out); return true;
    case 2 * kLanes: attend_row_t<2>(q, k, v, visible, S, scale, sc, out); return true;
    case 4 * kLanes: attend_row_t<4>(q, k, v, visible, S, scale, sc, out); return true;
    case 8 * kLanes: attend_row_t<8>(q, k, v, visible, S, scale, sc, out); return true;
    default: return false;
  }
}
