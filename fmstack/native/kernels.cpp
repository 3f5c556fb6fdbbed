// torch.ops.fmstack.block_linear: x float32 [M, K] @ a block-quantized weight of n rows, interleaved by
// 16 rows (fmstack/quant/blocks.py: pack_rows) -> float32 [M, n], and torch.ops.fmstack.block_linear_isa
// (which code path); torch.ops.fmstack.decode_attention (attention of a few query tokens over a
// masked KV cache, attention_kernels.h).
//
// M <= kGemvRows (decode): the weight is streamed once, a group of 16 rows at a time; each chunk of it
// meets every row of x while it is in registers. With int8_act, x is quantized per row and block
// exactly as blocks.quantize_activations does, the block sums are integer dot products (VNNI / AVX2 /
// scalar) of 16 rows at once, and one float multiply-add per block applies the scales of 16 rows.
// Without it (the exact mode) x keeps float32 precision as three int8 digits per value (block_kernels.h:
// split3, error <= 6.1e-8 of the block's largest value) through the same integer kernels, where
// dequantizing the weight in registers against float x was compute-bound (benchmarks/kernel_cycles.py;
// docs/quant-kernels.md). The scalar path computes in float. M > kGemvRows (prefill): tiles of
// ~1 MB of rows are dequantized to float32 and multiplied with at::mm (BLAS), in parallel over tiles.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FM_X86 1
#else
#define FM_X86 0
#endif

namespace {

constexpr int64_t kGemvRows = 16;  // x rows up to which the weight is streamed once (decode)
constexpr int64_t kRows = 16;      // output rows per interleaved group (fmstack/quant/blocks.py: pack_rows)
constexpr int64_t kTileBytes = 1 << 20;  // dequantized float32 rows per prefill tile (tiled_mm)
constexpr int64_t kPrefetch = 4096;  // bytes ahead in the weight stream (block_kernels.h: prefetch)
constexpr int kDigits = 3;  // int8 digits per activation in the exact mode on VNNI (block_kernels.h: split3)

struct Args {
  const uint8_t* w;  // interleaved qweight [G, nb, QB / 4 chunks, 16 rows, 4 bytes], QB = block * bits / 8
  const void* sc;    // scales [G, nb, 16], float or Half (half == true)
  const void* mn;    // mins like scales, or nullptr
  bool half;
  int bits, block;
  int64_t M, N, K, nb, G;
  const float* x;       // float path: x [M, K]
  const int8_t* qx;     // int8 path: quantized x [M, K] (nullptr on the float path)
  const float* sx;      // its scales [M, nb]
  const float* xsum;    // sx * (sum of the block's q) [M, nb]: the mins' factor (int8 path)
  const float* xs;      // float path: the sum of x over each block [M, nb] (the mins' factor)
  float* out;           // [M, N]
  const int32_t* qsum = nullptr;  // exact mode on VNNI: x as kDigits int8 digits in qx/sx, their block sums
};

// ---- portable scalar path (non-x86, ATEN_CPU_CAPABILITY=default): also the layout's plain statement ----
namespace scalar {

inline float ld(const void* p, bool half, int64_t i) {
  return half ? static_cast<float>(static_cast<const c10::Half*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Stored value (unsigned: 4-bit 0..15, 8-bit q + 128) of row r (0..15) of group g, column k.
inline int q_at(const Args& a, int64_t g, int r, int64_t k) {
  const int64_t b = k / a.block, j = k % a.block, qb = a.block * a.bits / 8;
  const uint8_t* blk = a.w + (g * a.nb + b) * kRows * qb;
  if (a.bits == 8) return blk[(j / 4) * 64 + r * 4 + j % 4];
  const int jj = j & 15;  // byte jj of the row's block holds values jj (low) and jj + 16 (high)
  const uint8_t byte = blk[(jj / 4) * 64 + r * 4 + jj % 4];
  return j < 16 ? (byte & 0x0F) : (byte >> 4);
}

// Scale and min (zero point folded in for 8-bit) of row r of group g, block b.
inline void scale_min(const Args& a, int64_t g, int r, int64_t b, float& d, float& mv) {
  const int64_t i = (g * a.nb + b) * kRows + r;
  d = ld(a.sc, a.half, i);
  mv = a.mn ? ld(a.mn, a.half, i) : 0.f;
  if (a.bits == 8) mv = std::fma(-128.f, d, mv);
}

void gemv(const Args& a, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g)
    for (int r = 0; r < kRows && g * kRows + r < a.N; ++r)
      for (int64_t m = 0; m < a.M; ++m) {
        float acc = 0.f, d, mv;
        for (int64_t b = 0; b < a.nb; ++b) {
          scale_min(a, g, r, b, d, mv);
          if (a.qx) {
            int32_t dot = 0;
            for (int64_t k = b * a.block; k < (b + 1) * a.block; ++k) dot += q_at(a, g, r, k) * a.qx[m * a.K + k];
            acc += d * a.sx[m * a.nb + b] * (float)dot + mv * a.xsum[m * a.nb + b];
          } else {
            for (int64_t k = b * a.block; k < (b + 1) * a.block; ++k)
              acc += std::fma((float)q_at(a, g, r, k), d, mv) * a.x[m * a.K + k];
          }
        }
        a.out[m * a.N + g * kRows + r] = acc;
      }
}

// x in blocks: s = max|x| / 127 (1 for an all-zero block), q = round-half-even(x / s) in [-127, 127]:
// the same float operations as blocks.quantize_activations, so q is bit-identical. xsum = s * sum(q);
// xf (where not null) = q * s, the float round trip.
void quantize(const float* x, int64_t nblocks, int64_t block, int8_t* q, float* s, float* xsum, float* xf) {
  for (int64_t i = 0; i < nblocks; ++i) {
    const float* xb = x + i * block;
    float amax = 0.f;
    for (int64_t j = 0; j < block; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax == 0.f ? 1.f : amax / 127.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < block; ++j) {
      const float r = std::min(127.f, std::max(-127.f, std::nearbyint(xb[j] / scale)));
      q[i * block + j] = static_cast<int8_t>(r);
      sum += static_cast<int32_t>(r);
      if (xf) xf[i * block + j] = r * scale;
    }
    s[i] = scale;
    xsum[i] = scale * (float)sum;
  }
}

void dequant_groups(const Args& a, int64_t g0, int64_t g1, float* dst) {
  for (int64_t g = g0; g < g1; ++g)
    for (int r = 0; r < kRows; ++r)
      for (int64_t k = 0; k < a.K; ++k) {
        float d, mv;
        scale_min(a, g, r, k / a.block, d, mv);
        dst[((g - g0) * kRows + r) * a.K + k] = std::fma((float)q_at(a, g, r, k), d, mv);
      }
}

void attend_row(const float* q, const float* k, const float* v, const uint8_t* visible, int64_t S, int64_t D,
                float scale, float* sc, float* out) {
  float mx = -INFINITY, sum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!visible[s]) continue;
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * k[s * D + d];
    sc[s] = dot * scale;
    mx = std::max(mx, sc[s]);
  }
  std::fill(out, out + D, 0.f);
  if (mx == -INFINITY) return;
  for (int64_t s = 0; s < S; ++s) {
    if (!visible[s]) continue;
    const float p = std::exp(sc[s] - mx);
    sum += p;
    for (int64_t d = 0; d < D; ++d) out[d] += p * v[s * D + d];
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= sum;
}

}  // namespace scalar

#if FM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "block_kernels.h"
#include "attention_kernels.h"
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
namespace avxvnni {
#define FM_DPBUSD _mm256_dpbusd_avx_epi32
#include "block_kernels.h"
#include "attention_kernels.h"
#undef FM_DPBUSD
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512vnni {
#define FM_DPBUSD _mm256_dpbusd_epi32
#define FM_ZMM 1
#include "block_kernels.h"
#include "attention_kernels.h"
#undef FM_ZMM
#undef FM_DPBUSD
}
#pragma GCC pop_options
#endif

// ---- instruction-set choice ----
enum Isa { kScalar = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512Vnni = 3 };
const char* const kIsaNames[] = {"scalar", "avx2", "avxvnni", "avx512vnni"};

bool cpu_has(Isa isa) {
#if FM_X86
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  switch (isa) {
    case kScalar: return true;
    case kAvx2: return avx2;
    case kAvxVnni: return avx2 && __builtin_cpu_supports("avxvnni");
    case kAvx512Vnni:
      return avx2 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512bw");
  }
#endif
  return isa == kScalar;
}

Isa best_up_to(Isa cap) {
  for (int i = cap; i > kScalar; --i)
    if (cpu_has(static_cast<Isa>(i))) return static_cast<Isa>(i);
  return kScalar;
}

std::atomic<int> g_isa{-1};

Isa current_isa() {
  int v = g_isa.load();
  if (v < 0) g_isa.store(v = best_up_to(kAvx512Vnni));
  return static_cast<Isa>(v);
}

// request: "" (query), an ATen capability ("DEFAULT", "AVX2", "AVX512": the best path it allows) or a
// path name (kIsaNames; clamped to what this CPU has). Returns the path now in use.
std::string block_linear_isa(const std::string& request) {
  if (!request.empty()) {
    Isa cap = kAvx512Vnni;
    if (request == "DEFAULT" || request == "scalar") cap = kScalar;
    else if (request == "AVX2" || request == "avx2") cap = kAvx2;
    else if (request == "avxvnni") cap = kAvxVnni;
    else TORCH_CHECK(request == "AVX512" || request == "avx512vnni",
                     "block_linear_isa: unknown request '", request,
                     "' (allowed: DEFAULT, AVX2, AVX512, scalar, avx2, avxvnni, avx512vnni)");
    g_isa.store(best_up_to(cap));
  }
  return kIsaNames[current_isa()];
}

void run_gemv(Isa isa, const Args& a, int64_t g0, int64_t g1) {
  switch (isa) {
#if FM_X86
    case kAvx512Vnni: return avx512vnni::gemv(a, g0, g1);
    case kAvxVnni: return avxvnni::gemv(a, g0, g1);
    case kAvx2: return avx2::gemv(a, g0, g1);
#endif
    default: return scalar::gemv(a, g0, g1);
  }
}

void run_dequant(Isa isa, const Args& a, int64_t g0, int64_t g1, float* dst) {
  switch (isa) {
#if FM_X86
    case kAvx512Vnni: return avx512vnni::dequant_groups(a, g0, g1, dst);
    case kAvxVnni: return avxvnni::dequant_groups(a, g0, g1, dst);
    case kAvx2: return avx2::dequant_groups(a, g0, g1, dst);
#endif
    default: return scalar::dequant_groups(a, g0, g1, dst);
  }
}

void run_quantize(Isa isa, const float* x, int64_t nblocks, int64_t block, int8_t* q, float* s, float* xsum,
                  float* xf) {
  at::parallel_for(0, nblocks, 256, [&](int64_t i0, int64_t i1) {
    const int64_t o = i0 * block;
    switch (isa) {
#if FM_X86
      case kAvx512Vnni: return avx512vnni::quantize(x + o, i1 - i0, block, q + o, s + i0, xsum + i0, xf ? xf + o : xf);
      case kAvxVnni: return avxvnni::quantize(x + o, i1 - i0, block, q + o, s + i0, xsum + i0, xf ? xf + o : xf);
      case kAvx2: return avx2::quantize(x + o, i1 - i0, block, q + o, s + i0, xsum + i0, xf ? xf + o : xf);
#endif
      default: return scalar::quantize(x + o, i1 - i0, block, q + o, s + i0, xsum + i0, xf ? xf + o : xf);
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                  const c10::optional<at::Tensor>& mins, int64_t bits, int64_t block, int64_t n) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "block_linear: x must be a contiguous float32 CPU matrix [M, K], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK((bits == 8 && (block == 16 || block == 32)) || (bits == 4 && block == 32),
              "block_linear: bits=", bits, " block=", block, " is not supported (bits 8 with block 16 or 32; bits 4 with block 32)");
  const int64_t K = x.size(1), G = (n + kRows - 1) / kRows, row_bytes = K / block * kRows * block * bits / 8;
  TORCH_CHECK(n >= 0 && K % block == 0, "block_linear: n=", n, " must be >= 0 and K=", K, " a multiple of block=", block);
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && qweight.size(0) == G && qweight.size(1) == row_bytes &&
                  qweight.element_size() == 1,
              "block_linear: qweight must be a contiguous interleaved [G, ", row_bytes, "] byte tensor with G = ", G,
              ", got ", qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(scales.is_contiguous() && scales.numel() == G * K / block * kRows &&
                  (scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf),
              "block_linear: scales must be contiguous float32 or float16 [G, K/block, 16] = [", G, ", ", K / block,
              ", 16], got ", scales.scalar_type(), " ", scales.sizes());
  if (mins)
    TORCH_CHECK(mins->is_contiguous() && mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type(),
                "block_linear: mins must match scales (", scales.scalar_type(), " ", scales.sizes(), "), got ",
                mins->scalar_type(), " ", mins->sizes());
}

// Prefill: tiles of weight groups dequantized to float32, then BLAS; xf is x (or its int8 round trip).
void tiled_mm(Isa isa, const Args& a, const at::Tensor& xf) {
  // ~1 MB of dequantized rows per tile (in L2): each tile re-reads x, so narrow tiles made a long
  // prefill read x once per 64 rows (the 49152-row head of SmolLM2 at 1024 tokens, one thread: 797 ms
  // with 64-row tiles, 508 ms with 1 MB tiles (448 rows), 475-500 ms for BLAS on the fp32 weight;
  // a timing loop during development, not a kept benchmark)
  const int64_t tile_groups = std::max<int64_t>(4, kTileBytes / (kRows * a.K * (int64_t)sizeof(float)));
  const int64_t tiles = (a.G + tile_groups - 1) / tile_groups;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(tile_groups * kRows * a.K);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g0 = t * tile_groups, g1 = std::min(a.G, g0 + tile_groups);
      const int64_t n0 = g0 * kRows, n1 = std::min(a.N, g1 * kRows);
      run_dequant(isa, a, g0, g1, buf.data());
      const at::Tensor w = at::from_blob(buf.data(), {n1 - n0, a.K}, xf.options());
      const at::Tensor part = at::mm(xf, w.t()).contiguous();  // [M, n1 - n0]
      // copied by hand: an in-place copy_ into `out` is refused where the caller's tensors are
      // inference tensors (a compiled graph run outside inference mode on weights loaded inside it)
      const float* src = part.data_ptr<float>();
      for (int64_t m = 0; m < a.M; ++m) std::memcpy(a.out + m * a.N + n0, src + m * (n1 - n0), (n1 - n0) * sizeof(float));
    }
  });
}

at::Tensor block_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& mins, int64_t bits, int64_t block, int64_t n, bool int8_act) {
  check_inputs(x, qweight, scales, mins, bits, block, n);
  const int64_t M = x.size(0), K = x.size(1), nb = K / block, G = qweight.size(0);
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0 || n == 0) return out;
  Args a{static_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr(), mins ? mins->data_ptr() : nullptr,
         scales.scalar_type() == at::kHalf, (int)bits, (int)block, M, n, K, nb, G, x.data_ptr<float>(), nullptr,
         nullptr, nullptr, nullptr, out.data_ptr<float>()};
  const Isa isa = current_isa();
  std::vector<int8_t> q;
  std::vector<float> s, xsum;
  if (int8_act) {
    q.resize(M * K), s.resize(M * nb), xsum.resize(M * nb);
    a.qx = q.data(), a.sx = s.data(), a.xsum = xsum.data();
  }
  if (M > kGemvRows) {  // with int8_act, x is replaced by its int8 round trip, in float
    const at::Tensor xf = int8_act ? at::empty({M, K}, x.options()) : x;
    if (int8_act) run_quantize(isa, a.x, M * nb, block, q.data(), s.data(), xsum.data(), xf.data_ptr<float>());
    tiled_mm(isa, a, xf);
    return out;
  }
  if (int8_act) run_quantize(isa, a.x, M * nb, block, q.data(), s.data(), xsum.data(), nullptr);
  std::vector<float> xs;  // the exact mode: sum(x) per block (the mins' factor) ...
  std::vector<int32_t> qsum;
  if (!int8_act) {
    xs.resize(M * nb);
    a.xs = xs.data();
#if FM_X86
    if (isa != kScalar) {  // ... and on x86 x as exact int8 digits for the integer kernels
      q.resize(M * kDigits * K), s.resize(M * kDigits * nb), qsum.resize(M * kDigits * nb);
      avx2::split3(a.x, M, K, block, q.data(), s.data(), qsum.data(), xs.data());
      a.qx = q.data(), a.sx = s.data(), a.qsum = qsum.data();
    }
#endif
    if (!a.qsum)
      for (int64_t i = 0; i < M * nb; ++i) xs[i] = std::accumulate(a.x + i * block, a.x + (i + 1) * block, 0.f);
  }
  // a few groups per task: one group of a 576-wide Q4_1 matrix is 5.8 KB, too little to hand a thread alone
  at::parallel_for(0, G, 4, [&](int64_t g0, int64_t g1) { run_gemv(isa, a, g0, g1); });
  return out;
}


void run_attend_row(Isa isa, const float* q, const float* k, const float* v, const uint8_t* visible, int64_t S,
                    int64_t D, float scale, float* sc, float* out) {
  switch (isa) {  // a head size the vector path has no variant for falls through to the scalar loop
#if FM_X86
    case kAvx512Vnni:
      if (avx512vnni::attend_row(q, k, v, visible, S, D, scale, sc, out)) return;
      [[fallthrough]];
    case kAvxVnni:
      if (avxvnni::attend_row(q, k, v, visible, S, D, scale, sc, out)) return;
      [[fallthrough]];
    case kAvx2:
      if (avx2::attend_row(q, k, v, visible, S, D, scale, sc, out)) return;
      [[fallthrough]];
#endif
    default: return scalar::attend_row(q, k, v, visible, S, D, scale, sc, out);
  }
}

// q [B, H, T, D] over one layer's cache k, v [B, Hkv, S, D] (query head h reads kv head h / (H / Hkv)),
// visible [B, 1, T, S] bool: which keys query token t sees. Softmax over the visible keys only, so the
// cost follows the filled part of the cache, not its allocation. -> [B, H, T, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& visible,
                            double scale) {
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 4 && t->is_contiguous(),
                "decode_attention: q, k and v must be contiguous float32 CPU tensors [B, heads, length, D], got ",
                t->scalar_type(), " ", t->sizes());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "decode_attention: k and v must be [B, Hkv, S, D] with H a multiple of Hkv; q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(visible.scalar_type() == at::kBool && visible.is_contiguous() &&
                  visible.sizes() == at::IntArrayRef({B, 1, T, S}),
              "decode_attention: visible must be a contiguous bool [B, 1, T, S] = [", B, ", 1, ", T, ", ", S, "], got ",
              visible.scalar_type(), " ", visible.sizes());
  at::Tensor out = at::empty(q.sizes(), q.options());
  const Isa isa = current_isa();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const auto* mp = reinterpret_cast<const uint8_t*>(visible.data_ptr<bool>());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc(2 * S);  // scores, then the visible keys' indices (attention_kernels.h)
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, kv = (b * Hkv + (i % H) / (H / Hkv)) * S * D;
      for (int64_t t = 0; t < T; ++t)
        run_attend_row(isa, qp + (i * T + t) * D, kp + kv, vp + kv, mp + (b * T + t) * S, S, D, (float)scale,
                       sc.data(), op + (i * T + t) * D);
    }
  });
  return out;
}

// Rows `ids` of an interleaved block weight (n rows, the layout of block_linear), dequantized to float32
// [len(ids), K]: a quantized embedding's lookup, one extern call in a compiled graph instead of the
// gather-and-dequantize expression Inductor would generate code for.
at::Tensor block_rows(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                      int64_t bits, int64_t block, int64_t n, const at::Tensor& ids) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1,
              "block_rows: ids must be a 1-D int64 CPU tensor, got ", ids.scalar_type(), " ", ids.sizes());
  TORCH_CHECK(scales.dim() == 3 && scales.size(2) == kRows, "block_rows: scales must be [G, K/block, 16], got ",
              scales.sizes());
  const int64_t K = scales.size(1) * block;
  check_inputs(at::empty({0, K}, scales.options().dtype(at::kFloat)), qweight, scales, mins, bits, block, n);
  const at::Tensor idc = ids.contiguous();
  const int64_t T = idc.size(0), *id = idc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(id[t] >= 0 && id[t] < n, "block_rows: id ", id[t], " at position ", t, " is out of range [0, ", n, ")");
  at::Tensor out = at::empty({T, K}, scales.options().dtype(at::kFloat));
  Args a{static_cast<const uint8_t*>(qweight.data_ptr()), scales.data_ptr(), mins ? mins->data_ptr() : nullptr,
         scales.scalar_type() == at::kHalf, (int)bits, (int)block, 0, n, K, K / block, qweight.size(0), nullptr,
         nullptr, nullptr, nullptr, nullptr, out.data_ptr<float>()};
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = id[t] / kRows;
      const int r = static_cast<int>(id[t] % kRows);
      for (int64_t k = 0; k < K; ++k) {
        float d, mv;
        scalar::scale_min(a, g, r, k / block, d, mv);
        a.out[t * K + k] = std::fma((float)scalar::q_at(a, g, r, k), d, mv);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fmstack, m) {
  m.def("block_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? mins, int bits, int block, int n, bool int8_act) -> Tensor");
  m.def("block_linear_isa(str request) -> str", &block_linear_isa);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor visible, float scale) -> Tensor");
  m.def("block_rows(Tensor qweight, Tensor scales, Tensor? mins, int bits, int block, int n, Tensor ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(fmstack, CPU, m) {
  m.impl("block_linear", &block_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("block_rows", &block_rows);
}
