// AVX2 kernels for RWKV on CPUs: decode steps and the prefill's wkv (built by rwkv_chat/kernels/cpu_kernels.py on first use).
// The integer products (int8, int4) have AVX512-VNNI variants, and the GEMMs AVX-VNNI ones too, each compiled for
// its instruction set alone and run only where Python picked them (set_int8_product).
//
// What this file promises:
// - rows_product(x, w, scale): out[M, N] = x[M, K] · Wᵀ for few rows, fp32 activations and fp32 accumulation;
//   W is fp32, bf16 or fp16 [N, K], or int8 [N, K] with an fp32 scale per row. Each weight is read from memory
//   once per call whatever M (for several rows of x, 8 weight rows at a time, or 16 for int8 on AVX512-VNNI, each
//   against as many rows of x as fit in L1 beside it, four at a time; every output's sum in the one-row loop's
//   order, so a row's result has the same bits whatever M), which is what bounds a decode step. The output columns
//   are split over PyTorch's intra-op threads (run_together: a layer's independent products share one
//   region). int8: the activations are rounded to int16 first and the sums are integer dot products (the comment
//   above kVnniBlock: the bound), in AVX512-VNNI under set_int8_product(1), else in AVX2 with the same bits
//   (int8_rows_avx2). W may also be int4: uint8 [N, K/2]
//   (two weights a byte) with fp16 scales and mins [N, 2, K/G] per group of G input columns (the comment above
//   kInt4Block: the layout, the arithmetic and its bound); its products are integer sums on int8 activations (a
//   step per 64 columns), in AVX2 everywhere and in AVX512-VNNI under set_int8_product(1). Where Python set a
//   distance (set_prefetch_bytes), every product of few rows (whose weight rows are shorter than its rows_below,
//   where set) asks for the weights that many bytes ahead of the row it reads, into L1 or, with to_l2, into L2 only
//   (software prefetch: no change to any result).
// - int8_gemm(x, w, scale) / int4_gemm(x, w, groups): the same product for many rows (a prefill) with int8 / int4
//   weights: the activations rounded to int8 a step per 32 columns (int8 weights) or 64 (int4 ones: the int4
//   decode products' blocks) and integer sums (the comments above kGemmBlock and kActBlock), on AVX512-VNNI under
//   set_int8_product(1), on AVX-VNNI under set_int8_product(2), else in AVX2, all with the same bits
//   (quantize_row_s8, gemm_tile_avxvnni). x fp32, or bf16 widened as it is read.
// - DecodeStack(layers, version, n_att).step(...): every layer of one decode step for B sequences in one call,
//   each layer by its version's layer step, which writes the layer's output over its input:
//   layer45: one token of one RWKV-4 or RWKV-5 layer, the same arithmetic as runtime/fast_path.py's
//   _decode_layer_torch (layer norms, token-shift mixes, the wkv recurrence, group norm and gate, channel mix), in
//   fp32, with rows_product's products (a layer's independent ones in one parallel region, run_together): one
//   call instead of ~70 PyTorch ops. layer_v6: the same for RWKV-6 (its token-shift and decay LoRAs in place).
//   layer_v7: RWKV-7 (models/rwkv7.py's time and channel mix), its four LoRAs as small fp32 products in place, the
//   wkv per head: instead of ~130 ops. Built with its ends (embedding, ln0, ln_out, head), its logits(ids, ...)
//   is the whole step from token ids to logits. Its refusals come back as a message, never as a C++ exception.
// - int4_widen(w, groups, bf16): int4 weights dequantised to bf16 or fp32 for a prefill's GEMM.
// - shift_mixes(xx, prev, mix): an RWKV-4/5 prefill's fp32 token-shift mixes, with PyTorch's bits, in one pass.
// - sigmoid_gate(r, y, residual), relu_square_(x), group_norm_gate(y, heads, w, b, eps, gate): an RWKV-4/5/6
//   prefill's gates, relu² and ln_x, fp32, each in one pass with the decode step's arithmetic (relu²: PyTorch's bits).
// - lora_shift_mixes(xx, prev, mix, lora, bf16): a prefill's token-shift mixes (RWKV-6/7), fp32 or bf16, in one pass.
// - lora(x, w1, w2, activation): a prefill's LoRA of a few rows (RWKV-7), the decode step's LowRank.
// - wkv4_scan / wkv5_scan (RWKV-5 and 6) / wkv7_scan: the wkv of a whole prefill segment of one sequence, token
//   by token with the decode step's own recurrence (the same signatures as triton_kernels' scans), channels or heads over threads.
// Inputs must be CPU tensors; the checks below say which must be contiguous.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// The rows [0, M) of x in groups: f(std::integral_constant<int, MB>{}, m) for rows m .. m + MB, four at a time,
// then the 3, 2 or 1 left (every product of few rows takes its rows of x so, each group's MB a compile-time count).
template <typename F>
__attribute__((always_inline)) inline void in_fours(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m);
  switch (M - m) {
    case 3: f(std::integral_constant<int, 3>{}, m); break;
    case 2: f(std::integral_constant<int, 2>{}, m); break;
    case 1: f(std::integral_constant<int, 1>{}, m); break;
    default: break;
  }
}

// 8 weights from memory as fp32.
struct Bf16Weights {
  using T = uint16_t;
  static inline __m256 load8(const T* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline float load1(const T* p) {
    uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

struct Fp32Weights {
  using T = float;
  static inline __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static inline float load1(const T* p) { return *p; }
};

struct Fp16Weights {
  using T = uint16_t;
  static inline __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline float load1(const T* p) { return _cvtsh_ss(*p); }
};

// How far ahead of the row being read the products ask for weights (software prefetch), in bytes; 0: not at all;
// the weight rows it is for: shorter than g_prefetch_rows_below bytes (0: every row); and where the weights go:
// into L2 only (prefetcht1) or into L1 too (prefetcht0). Set once from Python (cpu_kernels.configure, from
// cpu_features' prefetch_bytes, prefetch_rows_below and prefetch_to_l2), read by every product of few rows. A
// thread's rows are contiguous, so the bytes `ahead` past a row's start are the rows it reads next. On a Zen 4
// the products slowed with weights prefetched into L1 and ran faster with them prefetched into L2; the likely
// cause: the int16 activations every row reads again (2K bytes against a row of K int8 weights, 14 KB of a 32 KB
// L1 at K = 7,168) pushed out of L1 by the weights (the products' rates fall as K grows past 4,096 there).
std::atomic<int64_t> g_prefetch_bytes{0};
std::atomic<int64_t> g_prefetch_rows_below{0};
std::atomic<bool> g_prefetch_l2{false};

// The prefetch distance for a product whose weight rows are `row_bytes` long.
inline int64_t prefetch_distance(int64_t row_bytes) {
  const int64_t below = g_prefetch_rows_below.load(std::memory_order_relaxed);
  return below > 0 && row_bytes >= below ? 0 : g_prefetch_bytes.load(std::memory_order_relaxed);
}

// Whether a product prefetches inside a weight row's loop (into L2, a line at a time: lane_totals_vnni says why)
// instead of a row's whole prefetch at its start (prefetch_ahead): the one-row products (int8 VNNI, int4, float)
// and the batched int8 VNNI and float ones' first read of each row do.
inline bool prefetch_in_loop(int64_t ahead) { return ahead > 0 && g_prefetch_l2.load(std::memory_order_relaxed); }

inline void prefetch_ahead(const void* row, int64_t bytes, int64_t ahead) {
  if (ahead <= 0) return;
  const char* p = static_cast<const char*>(row) + ahead;
  if (g_prefetch_l2.load(std::memory_order_relaxed))
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T1);
  else
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch(p + offset, _MM_HINT_T0);
}

// MB rows of x (row stride K) against one weight row over its first `whole` columns (a multiple of 16): two
// accumulators a row, added, stored at sums[m * stride]: the vector whose horizontal sum is the row's dot product.
// With L2_AHEAD, the weights `ahead` bytes on are prefetched into L2 as the loop goes (lane_totals_vnni says why).
template <typename W, int MB, bool L2_AHEAD = false>
inline void dot_vectors(const typename W::T* w, const float* x, int64_t K, int64_t whole, __m256* sums,
                        int64_t stride, int64_t ahead = 0) {
  __m256 acc0[MB], acc1[MB];
  for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < whole; k += 16) {
    if constexpr (L2_AHEAD)  // 16 weights: 32 or 64 bytes (a line asked for twice in bf16 / fp16: cheap)
      _mm_prefetch(reinterpret_cast<const char*>(w + k) + ahead, _MM_HINT_T1);
    __m256 w0 = W::load8(w + k), w1 = W::load8(w + k + 8);
    for (int m = 0; m < MB; ++m) {
      acc0[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc0[m]);
      acc1[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc1[m]);
    }
  }
  for (int m = 0; m < MB; ++m) sums[m * stride] = _mm256_add_ps(acc0[m], acc1[m]);
}

// out[m, n] for MB rows of x (MB <= 4) against one weight row.
template <typename W, int MB, bool L2_AHEAD = false>
inline void dot_rows(const typename W::T* w, const float* x, int64_t K, float scale, float* out,
                     int64_t out_stride, int64_t ahead = 0) {
  const int64_t whole = K / 16 * 16;
  __m256 v[MB];
  dot_vectors<W, MB, L2_AHEAD>(w, x, K, whole, v, 1, ahead);
  for (int m = 0; m < MB; ++m) {
    float s = horizontal_sum(v[m]);
    for (int64_t j = whole; j < K; ++j) s += W::load1(w + j) * x[m * K + j];
    out[m * out_stride] = s * scale;
  }
}

// The horizontal sums of 8 vectors in one, each in horizontal_sum's order (its halves added, then lanes 0 + 2 and
// 1 + 3, then those two): a transposing tree of 7 additions. Lane j holds the sum of v[kSlotOf8[j]], so a caller
// that puts row r's vector at v[kSlotOf8[r]] gets row r's sum in lane r.
constexpr int kSlotOf8[8] = {0, 2, 4, 6, 1, 3, 5, 7};
inline __m256 lane_sums8(const __m256* v) {
  __m256 t[4];
  for (int i = 0; i < 4; ++i)  // [v(2i) low + high | v(2i + 1) low + high]
    t[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  const __m256 a = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], 0x44), _mm256_shuffle_ps(t[0], t[1], 0xEE));
  const __m256 b = _mm256_add_ps(_mm256_shuffle_ps(t[2], t[3], 0x44), _mm256_shuffle_ps(t[2], t[3], 0xEE));
  return _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x88), _mm256_shuffle_ps(a, b, 0xDD));
}

constexpr int64_t kFloatPassXBytes = 24 << 10;  // fp32 activations a pass over 8 weight rows keeps beside them
constexpr int64_t kFloatPanelXRows = 16;  // ... at most this many rows (their vectors: 4 KB)

// 8 consecutive weight rows (K a multiple of 16) against every row of x -> out[m, 0..8) (row stride N), each weight
// row read once for as many rows of x as fit beside it, right after the row before it; dot_rows' arithmetic, its
// horizontal sums taken eight at a time (lane_sums8) and stored as one vector: the bits dot_rows gives each output.
// Prefetching into L2 (prefetch_in_loop), the first read of each row asks for the weights `ahead` on as it goes.
template <typename W>
__attribute__((noinline)) void rows8(const float* x, const typename W::T* w, const float* scale, float* out,
                                     int64_t M, int64_t N, int64_t K, int64_t ahead) {
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(typename W::T));
  const bool spread = prefetch_in_loop(ahead);
  const __m256 w_scale = scale ? _mm256_loadu_ps(scale) : _mm256_set1_ps(1.0f);
  const int64_t per_pass = std::clamp<int64_t>(kFloatPassXBytes / (4 * K) / 4 * 4, 4, kFloatPanelXRows);
  for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
    const int64_t rows = std::min(per_pass, M - m0);
    __m256 sums[kFloatPanelXRows * 8];
    for (int r = 0; r < 8; ++r) {
      const typename W::T* row = w + r * K;
      if (m0 == 0 && !spread) prefetch_ahead(row, row_bytes, ahead);
      const float* xr = x + m0 * K;
      __m256* slot = sums + kSlotOf8[r];
      in_fours(rows, [&](auto group, int64_t m) {
        constexpr int G = decltype(group)::value;
        if (spread && m0 == 0 && m == 0)
          dot_vectors<W, G, true>(row, xr + m * K, K, K, slot + m * 8, 8, ahead);
        else
          dot_vectors<W, G>(row, xr + m * K, K, K, slot + m * 8, 8);
      });
    }
    for (int64_t m = 0; m < rows; ++m)
      _mm256_storeu_ps(out + (m0 + m) * N, _mm256_mul_ps(lane_sums8(sums + m * 8), w_scale));
  }
}

// Weight rows [begin, end) of out[M, N] = x[M, K] · Wᵀ, four activation rows at a time (eight weight rows at a time
// for several rows of x: rows8).
template <typename W>
void rows_range(const float* x, const typename W::T* w, const float* scale, float* out, int64_t M, int64_t N,
                int64_t K, int64_t begin, int64_t end) {
  const int64_t ahead = prefetch_distance(K * static_cast<int64_t>(sizeof(typename W::T)));
  if (M > 1 && K % 16 == 0)
    for (; begin + 8 <= end; begin += 8)
      rows8<W>(x, w + begin * K, scale ? scale + begin : nullptr, out + begin, M, N, K, ahead);
  const bool spread = M == 1 && prefetch_in_loop(ahead);
  for (int64_t n = begin; n < end; ++n) {
    const typename W::T* row = w + n * K;
    float s = scale ? scale[n] : 1.0f;
    if (spread) {
      dot_rows<W, 1, true>(row, x, K, s, out + n, N, ahead);
      continue;
    }
    prefetch_ahead(row, K * static_cast<int64_t>(sizeof(typename W::T)), ahead);
    in_fours(M, [&](auto group, int64_t m) {
      dot_rows<W, decltype(group)::value>(row, x + m * K, K, s, out + m * N + n, N);
    });
  }
}

// Which integer products run (int8_rows_avx2 or int8_rows_vnni, int4_rows's AVX2 or VNNI dot, the GEMMs' AVX2,
// AVX-VNNI or VNNI tiles): set once from Python (cpu_kernels.configure, from what the CPU has and RWKV_CPU_ISA),
// read by every product. kInt8AvxVnni (AVX2 CPUs with AVX-VNNI's 256-bit dot products, e.g. Intel's Alder Lake and
// later client CPUs): the GEMMs on the AVX-VNNI tiles, the products of few rows on the AVX2 ones.
enum Int8Product : int { kInt8Avx2 = 0, kInt8Vnni = 1, kInt8AvxVnni = 2 };
std::atomic<int> g_int8_product{kInt8Avx2};

// The AVX512-VNNI int8 product. Each row of x is first quantised to int16 with one fp32 step per row,
// xq = round_half_even(x * (32767 / max|x|)) (all zeros when max|x| is 0), so every weight meets its activation
// in one vpdpwssd (two int8·int16 products added into an int32 lane) instead of being widened to fp32 (three
// operations per eight weights on AVX2, which bound such a product below the memory's speed). The integer
// sums are exact over blocks of kVnniBlock columns: lane j of every accumulator takes columns 2j and 2j + 1 of
// each 32, and the accumulators' lanes, added as integers at the block's end, hold at most 2·256 products of
// |127·32767| (below 2³¹); each block's 16 lane sums are converted to fp32 once and added in fp32, then the lanes
// are added in _mm512_reduce_add_ps's order; out = sum · step(x) · scale(w). Every path (any number of rows, any
// unrolling, the one-row loop) does exactly these operations in this order, so a row's result has the same bits
// whatever else shares the call (a chat's logits do not depend on the batch it decodes in).
// Its only error beyond the fp32 additions is the activation's rounding: at most step/2 = max|x| / 65534 for
// each activation, i.e. |out - exact| ≤ scale(w) · Σ|q_w| · max|x| / 65534 (+ fp32 rounding of the sums).
constexpr int64_t kVnniBlock = 8192;
constexpr float kInt16Max = 32767.0f;

// x rows [M, K] -> int16 rows and their steps (the fp32 multiplier and its rounding as above). Sixteen columns at
// a time: the maximum does not depend on the order, and vcvtps2dq rounds as nearbyint does (to nearest even, the
// rounding mode never being changed), so the vector and scalar columns give the same integers.
void quantize_rows_int16(const float* x, int64_t M, int64_t K, int16_t* xq, float* step) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    __m256 amax8 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) amax8 = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(row + k), magnitude), amax8);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, amax8);
    float amax = 0.0f;
    for (float lane : lanes) amax = std::max(amax, lane);
    for (; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
    const float mult = amax > 0.0f ? kInt16Max / amax : 0.0f;
    step[m] = amax / kInt16Max;
    const __m256 mult8 = _mm256_set1_ps(mult);
    int16_t* out = xq + m * K;
    for (k = 0; k + 16 <= K; k += 16) {
      const __m256i low = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), mult8));
      const __m256i high = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k + 8), mult8));
      // packs interleaves the two by 128-bit lanes; the permutation puts the 16 back in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8));
    }
    for (; k < K; ++k) out[k] = static_cast<int16_t>(std::nearbyint(row[k] * mult));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline __m512i widened32(const int8_t* w) {  // 32 int8 weights -> int16
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// total[m] = the 16 fp32 lane sums of MB rows of int16 activations against one int8 weight row over its first
// K / 32 * 32 columns, U independent accumulators a row (vpdpwssd's latency is several cycles), in the blocks
// and order described above. Rows are read one after the other: reading several side by side halved the speed at
// which the hardware prefetchers streamed them from memory (measured on Zen 4). With L2_AHEAD, the weights `ahead`
// bytes on are prefetched into L2 a line at a time as the loop goes: on a Zen 4 (one row, 2 threads) that read
// rows of 14,336 columns at 27.5 GB/s instead of 21 (and 21 with the whole row's prefetch issued at its start),
// 7,168 at 40 instead of 34-38, shorter rows as fast as without.
template <int MB, int U, bool L2_AHEAD = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void lane_totals_vnni(const int8_t* w, const int16_t* xq, int64_t K, __m512* total, int64_t ahead = 0) {
  for (int m = 0; m < MB; ++m) total[m] = _mm512_setzero_ps();
  const int64_t whole = K / 32 * 32;
  for (int64_t begin = 0; begin < whole; begin += kVnniBlock) {
    const int64_t end = std::min(whole, begin + kVnniBlock);
    __m512i acc[MB][U];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_si512();
    int64_t k = begin;
    for (; k + 32 * U <= end; k += 32 * U) {
      if constexpr (L2_AHEAD)  // each 64 bytes `ahead` once, into L2, spread through the loop
        for (int line = 0; line < 32 * U; line += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w + k + ahead + line), _MM_HINT_T1);
      for (int u = 0; u < U; ++u) {
        const __m512i wv = widened32(w + k + 32 * u);
        for (int m = 0; m < MB; ++m)
          acc[m][u] = _mm512_dpwssd_epi32(acc[m][u], wv, _mm512_loadu_si512(xq + m * K + k + 32 * u));
      }
    }
    for (; k < end; k += 32) {
      const __m512i wv = widened32(w + k);
      for (int m = 0; m < MB; ++m) acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], wv, _mm512_loadu_si512(xq + m * K + k));
    }
    for (int m = 0; m < MB; ++m) {
      __m512i lanes = acc[m][0];
      for (int u = 1; u < U; ++u) lanes = _mm512_add_epi32(lanes, acc[m][u]);
      total[m] = _mm512_add_ps(total[m], _mm512_cvtepi32_ps(lanes));
    }
  }
}

// out[m, n] for MB rows against one weight row: lane_totals_vnni, the lanes reduced, the last K % 32 columns.
template <int MB, int U>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void dot_row_vnni(const int8_t* w, const int16_t* xq, int64_t K, const float* step, float scale, float* out,
                         int64_t out_stride) {
  __m512 total[MB];
  lane_totals_vnni<MB, U>(w, xq, K, total);
  for (int m = 0; m < MB; ++m) {
    int64_t tail = 0;
    for (int64_t j = K / 32 * 32; j < K; ++j) tail += static_cast<int64_t>(w[j]) * xq[m * K + j];
    out[m * out_stride] = (_mm512_reduce_add_ps(total[m]) + static_cast<float>(tail)) * step[m] * scale;
  }
}

// The sums of 16 vectors' lanes, lane r holding v[r]'s: a transposing tree of 15 additions instead of 16
// horizontal reductions, which adds each vector's lanes in the same order as _mm512_reduce_add_ps (lanes i and
// i + 8, then + 4, + 2, + 1), so a row's result has the same bits as in the other paths of this product.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline __m512 lane_sums16(const __m512* v) {
  // the tree leaves its input p's sum in lane 4 (p % 4) + p / 4: input p is v[4 (p % 4) + p / 4]
  __m512 eights[8], fours[4], twos[2];
  for (int i = 0; i < 8; ++i) {  // 128-bit lanes [a(c0 + c2), a(c1 + c3), b(c0 + c2), b(c1 + c3)]
    const int p = 2 * i, q = 2 * i + 1;
    const __m512 a = v[4 * (p % 4) + p / 4], b = v[4 * (q % 4) + q / 4];
    eights[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i)  // 128-bit lane t: vector 4i + t's lanes i + (i + 4)
    fours[i] = _mm512_add_ps(_mm512_shuffle_f32x4(eights[2 * i], eights[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(eights[2 * i], eights[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane t: [8i + t: 0 + 2, 1 + 3; 8i + 4 + t: 0 + 2, 1 + 3]
    twos[i] = _mm512_add_ps(_mm512_shuffle_ps(fours[2 * i], fours[2 * i + 1], 0x44),
                            _mm512_shuffle_ps(fours[2 * i], fours[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(twos[0], twos[1], 0x88), _mm512_shuffle_ps(twos[0], twos[1], 0xDD));
}

// One weight row's lane totals against MB rows of x (lane_totals_vnni), stored as sums[m * 16].
template <int MB, int U, bool L2_AHEAD = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline void totals_into(const int8_t* row, const int16_t* xq, int64_t K, __m512* sums, int64_t ahead = 0) {
  __m512 total[MB];
  lane_totals_vnni<MB, U, L2_AHEAD>(row, xq, K, total, ahead);
  for (int m = 0; m < MB; ++m) sums[m * 16] = total[m];
}

constexpr int vnni_unroll(int rows) { return rows == 1 ? 4 : 2; }  // independent accumulators a row
constexpr int64_t kPanelXRows = 32;  // at most this many rows of x a pass over 16 weight rows (their totals: 32 KB)
constexpr int64_t kPassXBytes = 24 << 10;  // ... and their int16 activations about this many bytes (in L1 with the
                                            // weight row being read), but at least four rows

// 16 consecutive weight rows (K a multiple of 32) against every row of x -> out[m, 0..16) (row stride N). Each
// weight row is read once for up to kPanelXRows rows of x, right after the rows before it (as the one-row loop
// reads them, so the memory streams as evenly); the lane totals, reduced sixteen at a time by lane_sums16, are
// stored as one vector a row of x: a result has the bits of dot_row_vnni's for that row and weight row.
// Kept out of line, so that int8_rows_vnni's one-row loop compiles as before.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), noinline))
void rows16_vnni(const int8_t* w, const int16_t* xq, const float* step, const float* scale, float* out, int64_t M,
                 int64_t N, int64_t K, int64_t ahead) {
  const __m512 w_scale = _mm512_loadu_ps(scale);
  const int64_t per_pass = std::clamp<int64_t>(kPassXBytes / (2 * K) / 4 * 4, 4, kPanelXRows);
  const bool spread = prefetch_in_loop(ahead);
  for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
    const int64_t rows = std::min(per_pass, M - m0);
    __m512 sums[kPanelXRows * 16];
    for (int r = 0; r < 16; ++r) {
      const int8_t* row = w + r * K;
      if (m0 == 0 && !spread) prefetch_ahead(row, K, ahead);
      const int16_t* x = xq + m0 * K;
      in_fours(rows, [&](auto group, int64_t m) __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) {
        constexpr int MB = decltype(group)::value;
        if (spread && m0 == 0 && m == 0)  // the row's first read asks for the rows after it
          totals_into<MB, vnni_unroll(MB), true>(row, x + m * K, K, sums + m * 16 + r, ahead);
        else
          totals_into<MB, vnni_unroll(MB)>(row, x + m * K, K, sums + m * 16 + r);
      });
    }
    for (int64_t m = 0; m < rows; ++m)
      _mm512_storeu_ps(out + (m0 + m) * N, _mm512_mul_ps(_mm512_mul_ps(lane_sums16(sums + m * 16),
                                                                       _mm512_set1_ps(step[m0 + m])), w_scale));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void int8_rows_vnni(const int8_t* w, const int16_t* xq, const float* step, const float* scale, float* out, int64_t M,
                    int64_t N, int64_t K, int64_t begin, int64_t end) {
  const int64_t ahead = prefetch_distance(K);
  if (M == 1 && K % 32 == 0) {  // a decode step of one chat: 16 rows' lane totals, then one reduction
    const __m512 x_step = _mm512_set1_ps(step[0]);
    const bool spread = prefetch_in_loop(ahead);
    for (; begin + 16 <= end; begin += 16) {
      __m512 sums[16];
      for (int r = 0; r < 16; ++r) {
        const int8_t* row = w + (begin + r) * K;
        if (spread) {
          lane_totals_vnni<1, 4, true>(row, xq, K, &sums[r], ahead);
        } else {
          prefetch_ahead(row, K, ahead);
          lane_totals_vnni<1, 4>(row, xq, K, &sums[r]);
        }
      }
      _mm512_storeu_ps(out + begin, _mm512_mul_ps(_mm512_mul_ps(lane_sums16(sums), x_step),
                                                  _mm512_loadu_ps(scale + begin)));
    }
  }
  if (M > 1 && K % 32 == 0)  // a batched decode step: 16 weight rows at a time (rows16_vnni)
    for (; begin + 16 <= end; begin += 16)
      rows16_vnni(w + begin * K, xq, step, scale + begin, out + begin, M, N, K, ahead);
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = w + n * K;
    prefetch_ahead(row, K, ahead);
    in_fours(M, [&](auto group, int64_t m) __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) {
      constexpr int MB = decltype(group)::value;
      dot_row_vnni<MB, vnni_unroll(MB)>(row, xq + m * K, K, step + m, scale[n], out + m * N + n, N);
    });
  }
}

// The same int8 product on AVX2 (CPUs without AVX512-VNNI): the same int16 activations and steps, and each 32
// columns' 16 lanes held as two 8-lane halves, columns 0..15 and 16..31 of the 32 (lane j of the low half is the
// VNNI product's lane j, of the high half its lane 8 + j). vpmaddwd adds each lane's two products and vpaddd adds
// that into the lane's int32 sum: the same integer lane sums over the same blocks of kVnniBlock columns (the same
// bound), converted and added in fp32 block by block, and a row's halves added lane by lane, then reduced by
// horizontal_sum's tree (lanes i + 4, + 2, + 1): _mm512_reduce_add_ps's order. So every result has the VNNI
// product's bits, and it takes three instructions per 16 weights (widen, multiply-add, add) where widening to fp32
// took six per 16 (widen, convert, fma per 8), which bounded that product below the memory's speed.
inline __m256i widened16(const int8_t* w) {  // 16 int8 weights -> int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

// half[m] = the 8 fp32 sums of lanes (low half) + lanes (high half) of MB rows of int16 activations against one
// int8 weight row over its first K / 32 * 32 columns, in the blocks and order described above.
template <int MB>
inline void lane_halves_avx2(const int8_t* w, const int16_t* xq, int64_t K, __m256* half) {
  __m256 low[MB], high[MB];
  for (int m = 0; m < MB; ++m) low[m] = high[m] = _mm256_setzero_ps();
  const int64_t whole = K / 32 * 32;
  for (int64_t begin = 0; begin < whole; begin += kVnniBlock) {
    const int64_t end = std::min(whole, begin + kVnniBlock);
    __m256i lo[MB], hi[MB];
    for (int m = 0; m < MB; ++m) lo[m] = hi[m] = _mm256_setzero_si256();
    for (int64_t k = begin; k < end; k += 32) {
      const __m256i w_lo = widened16(w + k), w_hi = widened16(w + k + 16);
      for (int m = 0; m < MB; ++m) {
        const __m256i* x = reinterpret_cast<const __m256i*>(xq + m * K + k);
        lo[m] = _mm256_add_epi32(lo[m], _mm256_madd_epi16(w_lo, _mm256_loadu_si256(x)));
        hi[m] = _mm256_add_epi32(hi[m], _mm256_madd_epi16(w_hi, _mm256_loadu_si256(x + 1)));
      }
    }
    for (int m = 0; m < MB; ++m) {
      low[m] = _mm256_add_ps(low[m], _mm256_cvtepi32_ps(lo[m]));
      high[m] = _mm256_add_ps(high[m], _mm256_cvtepi32_ps(hi[m]));
    }
  }
  for (int m = 0; m < MB; ++m) half[m] = _mm256_add_ps(low[m], high[m]);
}

// out[m, n] for MB rows against one weight row: dot_row_vnni's arithmetic.
template <int MB>
inline void dot_row_avx2(const int8_t* w, const int16_t* xq, int64_t K, const float* step, float scale, float* out,
                         int64_t out_stride) {
  __m256 half[MB];
  lane_halves_avx2<MB>(w, xq, K, half);
  for (int m = 0; m < MB; ++m) {
    int64_t tail = 0;
    for (int64_t j = K / 32 * 32; j < K; ++j) tail += static_cast<int64_t>(w[j]) * xq[m * K + j];
    out[m * out_stride] = (horizontal_sum(half[m]) + static_cast<float>(tail)) * step[m] * scale;
  }
}

// One weight row's halves against MB rows of x, stored as sums[m * 8].
template <int MB>
inline void halves_into(const int8_t* row, const int16_t* xq, int64_t K, __m256* sums) {
  __m256 half[MB];
  lane_halves_avx2<MB>(row, xq, K, half);
  for (int m = 0; m < MB; ++m) sums[m * 8] = half[m];
}

// rows16_vnni on AVX2: 8 consecutive weight rows (K a multiple of 32) against every row of x -> out[m, 0..8), each
// weight row read once for up to kPanelXRows rows of x; their sums reduced eight at a time by lane_sums8
// (horizontal_sum's order): the bits of dot_row_avx2's, and so of the VNNI product's.
__attribute__((noinline)) void rows8_int16(const int8_t* w, const int16_t* xq, const float* step, const float* scale,
                                           float* out, int64_t M, int64_t N, int64_t K, int64_t ahead) {
  const __m256 w_scale = _mm256_loadu_ps(scale);
  const int64_t per_pass = std::clamp<int64_t>(kPassXBytes / (2 * K) / 4 * 4, 4, kPanelXRows);
  for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
    const int64_t rows = std::min(per_pass, M - m0);
    __m256 sums[kPanelXRows * 8];
    for (int r = 0; r < 8; ++r) {
      const int8_t* row = w + r * K;
      if (m0 == 0) prefetch_ahead(row, K, ahead);
      const int16_t* x = xq + m0 * K;
      __m256* slot = sums + kSlotOf8[r];
      in_fours(rows, [&](auto group, int64_t m) {
        halves_into<decltype(group)::value>(row, x + m * K, K, slot + m * 8);
      });
    }
    for (int64_t m = 0; m < rows; ++m)
      _mm256_storeu_ps(out + (m0 + m) * N, _mm256_mul_ps(_mm256_mul_ps(lane_sums8(sums + m * 8),
                                                                       _mm256_set1_ps(step[m0 + m])), w_scale));
  }
}

// int8_rows_vnni on AVX2, eight weight rows at a time.
void int8_rows_avx2(const int8_t* w, const int16_t* xq, const float* step, const float* scale, float* out, int64_t M,
                    int64_t N, int64_t K, int64_t begin, int64_t end) {
  const int64_t ahead = prefetch_distance(K);
  if (M == 1 && K % 32 == 0) {  // a decode step of one chat: 8 rows' halves, then one reduction
    const __m256 x_step = _mm256_set1_ps(step[0]);
    for (; begin + 8 <= end; begin += 8) {
      __m256 sums[8];
      for (int r = 0; r < 8; ++r) {
        const int8_t* row = w + (begin + r) * K;
        prefetch_ahead(row, K, ahead);
        lane_halves_avx2<1>(row, xq, K, &sums[kSlotOf8[r]]);
      }
      _mm256_storeu_ps(out + begin, _mm256_mul_ps(_mm256_mul_ps(lane_sums8(sums), x_step),
                                                  _mm256_loadu_ps(scale + begin)));
    }
  }
  if (M > 1 && K % 32 == 0)  // a batched decode step: 8 weight rows at a time (rows8_int16)
    for (; begin + 8 <= end; begin += 8)
      rows8_int16(w + begin * K, xq, step, scale + begin, out + begin, M, N, K, ahead);
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* row = w + n * K;
    prefetch_ahead(row, K, ahead);
    in_fours(M, [&](auto group, int64_t m) {
      dot_row_avx2<decltype(group)::value>(row, xq + m * K, K, step + m, scale[n], out + m * N + n, N);
    });
  }
}

// The int4 product. A weight row of K columns is K/2 bytes: each block of 64 columns is 32 bytes, byte j holding
// column j in its low nibble and column j + 32 in its high one (so that one 32-byte load, masked or shifted, gives
// two runs of 32 columns in order); q is 0..15. Each group of G columns (G a multiple of 64) has an fp16 scale and
// min, a row's K/G scales then its K/G mins ([N, 2, K/G]): w = q * scale + min (kernels/quant.py's quantize_int4
// writes them). The activations are rounded to int8 in blocks of 64 columns, each with its own step
// max|x_block| / 127 (round half to even of x * (127 / max|x_block|), the multiplier in fp32; all zeros when the
// block is), so each block's Σ q·xq is an exact integer sum of unsigned-by-signed byte products (vpdpbusd, or
// pmaddubsw: a 16-bit pair sum at most 2·15·127, no saturation), and
// out = Σ_b step_b · (scale_g(b) · Σ q·xq + min_g(b) · Σ xq) with the block sums in fp32.
// Its only error beyond the fp32 additions is the activations' rounding, at most step_b / 2 = max|x_block| / 254
// each: |out - exact| ≤ Σ_b Σ_{k in b} |w_k| · max|x_b| / 254 (+ fp32 rounding), w the dequantised weights: small
// beside the weights' own rounding (steps of 1/127 of a block's largest activation against 1/15 of a group's
// range; llama.cpp's and rwkv.cpp's quantised products round activations the same way). AVX2 (pmaddubsw,
// pmaddwd) serves every x86 CPU; the AVX512-VNNI variant (256-bit vpdpbusd) runs where Python picked the VNNI int8
// product: the integer sums are the same, so the two differ by the order of fp32 additions only.
constexpr int64_t kInt4Block = 64;
constexpr int64_t kInt4MaxBlocks = 1024;  // 64-column blocks a row (K ≤ 65,536): a row's factors fit on the stack

struct Int4Rows {  // a call's activations, as every int4 row product reads them
  const int8_t* xq;  // [M, K]
  const float* step;  // [M, K/64]: each block's step
  const float* gsum;  // [M, K/G]: Σ over each group's blocks of step · Σ xq
  int64_t K, G;
};

// One block of B fp32 activations (B a multiple of 8) -> out (int8 values, stored as T: int8_t or int16_t), rounded
// half to even to multiples of the block's step max|x| / 127 (the multiplier 127 / max|x| in fp32; all zeros when
// max|x| is 0). Returns the step; *sum = step · Σ q. The int4 decode products' blocks of 64 and the AVX2 GEMM's
// blocks (quantize_row_s8: 32 columns for int8 weights, 64 for int4) round their activations here.
template <int64_t B, typename T>
inline float quantize_block(const float* in, T* out, float* sum) {
  static_assert(B % 8 == 0, "whole vectors");
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < B; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(in + k)));
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  const float top = std::max(_mm_cvtss_f32(a), _mm_cvtss_f32(_mm_movehdup_ps(a)));
  const __m256 mult = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
  __m256i total = _mm256_setzero_si256();
  for (int64_t k = 0; k < B; k += 8) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(in + k), mult));  // half to even
    total = _mm256_add_epi32(total, q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    if constexpr (sizeof(T) == 2)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), q16);
    else
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(q16, q16));
  }
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  const float step = top / 127.0f;
  *sum = step * static_cast<float>(_mm_cvtsi128_si32(h));
  return step;
}

// x rows [M, K] -> int8 blocks of 64 (xq), their steps, and their step · Σ xq (bsum) (K a multiple of 64).
void quantize_blocks_int8(const float* x, int64_t M, int64_t K, int8_t* xq, float* step, float* bsum) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / kInt4Block; ++b) {
      const int64_t at = m * (K / kInt4Block) + b;
      step[at] = quantize_block<kInt4Block>(x + m * K + b * kInt4Block, xq + m * K + b * kInt4Block, &bsum[at]);
    }
}

// A weight row's groups (fp16 bits: K/G scales, then K/G mins) -> its scales in fp32 (scale[K/G]) and, for each of
// MB activation rows from m0, the min terms Σ_g min_g · gsum[m, g] (offset[MB]).
template <int MB>
inline void int4_row_groups(const uint16_t* groups, const Int4Rows& a, int64_t m0, float* scale, float* offset) {
  const int64_t n_groups = a.K / a.G;
  const uint16_t* mins = groups + n_groups;
  __m256 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= n_groups; g += 8) {
    _mm256_storeu_ps(scale + g, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(groups + g))));
    const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g)));
    for (int m = 0; m < MB; ++m)
      acc[m] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(a.gsum + (m0 + m) * n_groups + g), acc[m]);
  }
  for (int m = 0; m < MB; ++m) offset[m] = horizontal_sum(acc[m]);
  for (; g < n_groups; ++g) {
    scale[g] = _cvtsh_ss(groups[g]);
    const float mn = _cvtsh_ss(mins[g]);
    for (int m = 0; m < MB; ++m) offset[m] += mn * a.gsum[(m0 + m) * n_groups + g];
  }
}

// NR consecutive int4 weight rows' groups -> each row's scale a block (its group's, spread over the group's blocks)
// and, for MB activation rows from m0, its min terms (int4_row_groups).
template <int MB, int NR>
__attribute__((always_inline)) inline void int4_block_scales(const uint16_t* groups, const Int4Rows& a, int64_t m0,
                                                             float (*scale)[kInt4MaxBlocks], float (*offset)[MB]) {
  const int64_t blocks = a.K / kInt4Block, per_group = a.G / kInt4Block, row_groups = 2 * (a.K / a.G);
  for (int r = 0; r < NR; ++r) {
    int4_row_groups<MB>(groups + r * row_groups, a, m0, scale[r], offset[r]);
    if (per_group > 1)
      for (int64_t g = blocks / per_group - 1; g >= 0; --g)  // from the last: scale[g] is read before it is written
        std::fill(scale[r] + g * per_group, scale[r] + (g + 1) * per_group, scale[r][g]);
  }
}

// out[m, n + r] for MB activation rows against NR consecutive int4 weight rows (each K/2 bytes of w, then 2·K/G fp16
// values of groups, a row after the other); BlockSum(q_low, q_high, x) is a 64-column block's integer sums in 8 int32
// lanes. Always inlined, so that it is compiled for its caller's instruction set (the VNNI one's included). Even and
// odd blocks add into two totals: one chain of fmadds a block was the bound on one activation row. Each weight row's
// sums are added in the same order whatever NR: two rows side by side (one activation row) only interleave two
// independent chains. `ahead` > 0: each pair of blocks (a 64-byte line) asks for the line `ahead` bytes further into
// L2 (prefetch_in_loop).
template <int MB, int NR, typename BlockSum>
__attribute__((always_inline)) inline void int4_dot(const uint8_t* w, const uint16_t* groups, const Int4Rows& a,
                                                    int64_t m0, float* out, int64_t out_stride, int64_t ahead,
                                                    BlockSum block_sum) {
  const int64_t K = a.K, blocks = K / kInt4Block, row_bytes = K / 2;
  float scale[NR][kInt4MaxBlocks], offset[NR][MB];
  int4_block_scales<MB, NR>(groups, a, m0, scale, offset);
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  __m256 even[NR][MB], odd[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m) even[r][m] = odd[r][m] = _mm256_setzero_ps();
  auto add_block = [&](int64_t b, __m256 (*total)[MB]) __attribute__((always_inline)) {
    for (int r = 0; r < NR; ++r) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + b * 32));
      const __m256i low = _mm256_and_si256(packed, low_nibble);  // columns 0..31 of the block
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibble);  // columns 32..63
      for (int m = 0; m < MB; ++m) {
        const __m256i sum = block_sum(low, high, a.xq + (m0 + m) * K + b * kInt4Block);
        const __m256 factor = _mm256_set1_ps(scale[r][b] * a.step[(m0 + m) * blocks + b]);
        total[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), factor, total[r][m]);
      }
    }
  };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    if (ahead > 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + b * 32 + ahead),
                                                _MM_HINT_T1);
    add_block(b, even);
    add_block(b + 1, odd);
  }
  if (b < blocks) add_block(b, even);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m)
      out[m * out_stride + r] = horizontal_sum(_mm256_add_ps(even[r][m], odd[r][m])) + offset[r][m];
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

template <int MB, int NR = 1>
struct Int4DotAvx2 {
  static void run(const uint8_t* w, const uint16_t* g, const Int4Rows& a, int64_t m, float* out, int64_t stride,
                  int64_t ahead) {
    const __m256i ones = _mm256_set1_epi16(1);
    int4_dot<MB, NR>(w, g, a, m, out, stride, ahead, [&](__m256i low, __m256i high, const int8_t* x) {
      const __m256i pairs =
          _mm256_add_epi16(_mm256_maddubs_epi16(low, load32(x)), _mm256_maddubs_epi16(high, load32(x + 32)));
      return _mm256_madd_epi16(pairs, ones);  // |pairs| ≤ 4·15·127: no 16-bit overflow
    });
  }
};

// int4_dot on AVX512-VNNI, a pair of blocks a 512-bit vector: lanes 0-7 hold block b's sums and lanes 8-15 block
// b + 1's, each lane the integers and the fp32 step of int4_dot's lane (its even and odd totals side by side), and
// a last odd block runs as int4_dot runs it: the same bits as int4_dot with Int4DotVnni's block sums, in about half
// the instructions (one weight load, one nibble split and one step product for 128 columns, not 64).
template <int MB, int NR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
inline void int4_dot_pairs(const uint8_t* w, const uint16_t* groups, const Int4Rows& a, int64_t m0, float* out,
                           int64_t out_stride, int64_t ahead) {
  const int64_t K = a.K, blocks = K / kInt4Block, row_bytes = K / 2;
  float scale[NR][kInt4MaxBlocks], offset[NR][MB];
  int4_block_scales<MB, NR>(groups, a, m0, scale, offset);
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  auto pair = [&](const float* two) __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) {
    // [two[0] x 8, two[1] x 8]
    return _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castsi128_ps(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(two)))));
  };
  __m512 total[NR][MB];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m) total[r][m] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    if (ahead > 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + b * 32 + ahead),
                                                _MM_HINT_T1);
    __m512i low_x[MB], high_x[MB];  // columns 0..31 of both blocks, and 32..63
    __m512 step[MB];
    for (int m = 0; m < MB; ++m) {
      const int8_t* x = a.xq + (m0 + m) * K + b * kInt4Block;
      const __m512i first = _mm512_loadu_si512(x), second = _mm512_loadu_si512(x + kInt4Block);
      low_x[m] = _mm512_shuffle_i64x2(first, second, 0x44);
      high_x[m] = _mm512_shuffle_i64x2(first, second, 0xee);
      step[m] = pair(a.step + (m0 + m) * blocks + b);
    }
    for (int r = 0; r < NR; ++r) {
      const __m512i packed = _mm512_loadu_si512(w + r * row_bytes + b * 32);
      const __m512i low = _mm512_and_si512(packed, low_nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibble);
      const __m512 scales = pair(scale[r] + b);
      for (int m = 0; m < MB; ++m) {
        const __m512i sum =
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), low, low_x[m]), high, high_x[m]);
        total[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(scales, step[m]), total[r][m]);
      }
    }
  }
  const __m256i low_nibble256 = _mm256_set1_epi8(0x0F);
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MB; ++m) {
      __m256 even = _mm512_castps512_ps256(total[r][m]);
      const __m256 odd = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(total[r][m]), 1));
      if (b < blocks) {  // the last block of an odd count, into the even total as int4_dot adds it
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + b * 32));
        const __m256i low = _mm256_and_si256(packed, low_nibble256);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibble256);
        const int8_t* x = a.xq + (m0 + m) * K + b * kInt4Block;
        const __m256i sum = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), low, load32(x)), high,
                                                load32(x + 32));
        const __m256 factor = _mm256_set1_ps(scale[r][b] * a.step[(m0 + m) * blocks + b]);
        even = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), factor, even);
      }
      out[m * out_stride + r] = horizontal_sum(_mm256_add_ps(even, odd)) + offset[r][m];
    }
}

template <int MB, int NR = 1>
struct Int4DotVnni {
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
  static void run(const uint8_t* w, const uint16_t* g, const Int4Rows& a, int64_t m, float* out, int64_t stride,
                  int64_t ahead) {
    int4_dot_pairs<MB, NR>(w, g, a, m, out, stride, ahead);
  }
};

// Rows [begin, end) of the output for every activation row, four at a time, with the row product Dot. One activation
// row runs two weight rows side by side, and with the prefetch level L2 (a Zen 4) prefetches inside the rows' loop,
// as the one-row int8 product does.
template <template <int, int> class Dot>
void int4_rows(const uint8_t* w, const uint16_t* groups, const Int4Rows& a, float* out, int64_t M, int64_t N,
               int64_t begin, int64_t end) {
  const int64_t row_bytes = a.K / 2, row_groups = 2 * (a.K / a.G);
  const int64_t ahead = prefetch_distance(row_bytes);
  const int64_t in_loop = M == 1 && prefetch_in_loop(ahead) ? ahead : 0;
  auto prefetch = [&](int64_t n, int64_t rows) {  // weight rows n .. n + rows - 1 and their groups
    if (!in_loop) prefetch_ahead(w + n * row_bytes, rows * row_bytes, ahead);
    prefetch_ahead(groups + n * row_groups, rows * 2 * row_groups, ahead / 8);  // 2 fp16 a group: 32 bytes of w
  };
  int64_t n = begin;
  if (M == 1)
    for (; n + 2 <= end; n += 2) {
      prefetch(n, 2);
      Dot<1, 2>::run(w + n * row_bytes, groups + n * row_groups, a, 0, out + n, N, in_loop);
    }
  for (; n < end; ++n) {
    prefetch(n, 1);
    in_fours(M, [&](auto group, int64_t m) {
      Dot<decltype(group)::value, 1>::run(w + n * row_bytes, groups + n * row_groups, a, m, out + m * N + n, N,
                                          in_loop);
    });
  }
}

// The int8 GEMM of a prefill (many rows) on AVX512-VNNI: out[M, N] = x[M, K] · (W · scale)ᵀ with int8 activations.
// Each row of x is cut into blocks of kGemmBlock columns, each rounded to int8 with its own step max|x_block| / 127
// (half to even; llama.cpp's q8_0 has the same blocks), stored offset by 128 as uint8 because vpdpbusd multiplies
// unsigned by signed bytes. The weights are read a panel of kPanelRows rows at a time, repacked so that one vector
// holds 4 columns of 16 rows, with -128 · Σ of each row over each block (which undoes the offset). A block's sums
// are exact in int32 (at most 32 · 255 · 127 a lane); each block adds sum · step in fp32, in block order, and the
// row's scale multiplies at the end: the only error beyond fp32 rounding is the activations' rounding, at most
// step / 2 = max|x_block| / 254 each. A row's result depends on that row alone, whatever M or the thread count.
// Measured on a Zen 4 (2 threads, M = 128): 480-600 GOP/s against 290-340 for widening the weights to bf16 and
// PyTorch's bf16 GEMM; on the trained tiny models the argmax agreement with fp32 stays above 98%.
constexpr int64_t kGemmBlock = 32;
constexpr int64_t kPanelRows = 32;  // two vectors of 16 lanes
// The activations' blocks of the GEMM: kGemmBlock columns for int8 weights; for int4 ones kInt4Block, the decode
// products' blocks (quantize_block<kInt4Block>: the same rounded activations) and the weights' smallest group, so
// that the fp32 steps come once a 64-column block: with a step every 32 columns, the int4 tiles' conversions and
// FMAs took the VNNI ports from the integer products (int4 ran at ~0.83x the int8 GEMM on a Xeon).
template <bool INT4>
constexpr int64_t kActBlock = INT4 ? kInt4Block : kGemmBlock;
constexpr int kTileRows = 6;        // rows of x a tile: 12 int32 and 12 fp32 accumulators, 2 weight vectors

// One row of x (K a multiple of B, 32 or 64) -> xq (uint8, offset 128), a step a block of B columns and, where
// `sums` is given, each block's Σ of the rounded activations, step · Σ q (an int4 weight's min multiplies it).
template <int64_t B>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void quantize_row_u8(const float* x, int64_t K, uint8_t* xq, float* step, float* sums) {
  static_assert(B == 32 || B == 64, "blocks of 2 or 4 vectors");
  constexpr int V = B / 16;
  const __m512i offset = _mm512_set1_epi32(128);
  for (int64_t b = 0; b < K / B; ++b) {
    const float* in = x + b * B;
    __m512 v[V];
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < V; ++i) {
      v[i] = _mm512_loadu_ps(in + 16 * i);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    }
    const float top = _mm512_reduce_max_ps(amax);
    const __m512 mult = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    __m512i total = _mm512_setzero_si512();
    for (int i = 0; i < V; ++i) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], mult));
      total = _mm512_add_epi32(total, q);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + b * B + 16 * i),
                       _mm512_cvtusepi32_epi8(_mm512_add_epi32(q, offset)));
    }
    step[b] = top / 127.0f;
    if (sums != nullptr) sums[b] = step[b] * static_cast<float>(_mm512_reduce_add_epi32(total));
  }
}

// 16 vectors of 16 int32 (rows) -> their transpose, in place: v[j] holds element j of every input row.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void transpose16(__m512i* v) {
  __m512i t[16], r[16];
  for (int i = 0; i < 8; ++i) {  // lane L of t[2i]: rows 2i, 2i + 1 at columns 4L, 4L + 1; of t[2i + 1]: 4L + 2, 4L + 3
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // lane L of r[4g + j]: rows 4g .. 4g + 3 at column 4L + j
    r[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    r[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    r[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // t[j]: rows 0-7 at columns j and 8 + j, t[4 + j]: at 4 + j and 12 + j; t[8 + ...]: rows 8-15
    t[j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    v[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
    v[4 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0x88);
    v[12 + j] = _mm512_shuffle_i32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

// kPanelRows weight rows -> packed [K/4][kPanelRows][4] (each 4 columns' bytes of the rows side by side), 16 rows by
// 16 column quads at a time (load(r, q): 64 bytes of row r from column 4q, for 16-quad steps; tail(r, q): 4 bytes
// from column 4q, for the quads after the last whole step), and neg [K/B][kPanelRows] = -128 · Σ of each row's
// weights over each block of B columns (from the packed panel: vpdpbusd of all-ones bytes sums 4 weights a lane).
template <int64_t B, typename Load, typename Tail>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))
inline void pack_panel_rows(Load load, Tail tail, int64_t K, int8_t* packed, int32_t* neg) {
  const int64_t quads = K / 4;
  int32_t* out = reinterpret_cast<int32_t*>(packed);
  for (int64_t half = 0; half < kPanelRows / 16; ++half) {
    int64_t q = 0;
    for (; q + 16 <= quads; q += 16) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = load(half * 16 + r, q);
      transpose16(v);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + (q + j) * kPanelRows + half * 16, v[j]);
    }
    for (; q < quads; ++q)
      for (int r = 0; r < 16; ++r) out[q * kPanelRows + half * 16 + r] = tail(half * 16 + r, q);
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = 0; b < K / B; ++b)
    for (int64_t half = 0; half < kPanelRows / 16; ++half) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t q = b * B / 4; q < (b + 1) * B / 4; ++q)
        sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(out + q * kPanelRows + half * 16));
      _mm512_storeu_si512(neg + b * kPanelRows + half * 16, _mm512_sub_epi32(_mm512_setzero_si512(),
                                                                           _mm512_slli_epi32(sum, 7)));
    }
}

// pack_panel_rows for kPanelRows rows of an int8 W [., K].
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void pack_panel(const int8_t* w, int64_t K, int8_t* packed, int32_t* neg) {
  pack_panel_rows<kGemmBlock>(
      [&](int64_t r, int64_t q) __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) {
        return _mm512_loadu_si512(w + r * K + 4 * q);
      },
      [&](int64_t r, int64_t q) {
        int32_t four;
        std::memcpy(&four, w + r * K + 4 * q, 4);
        return four;
      },
      K, packed, neg);
}

// pack_panel_rows for kPanelRows rows of an int4 W (uint8 [., K/2], kernels/quant.py's packing: each 64-column block
// is 32 bytes, columns k .. k + 31 in the low nibbles, k + 32 .. k + 63 in the high ones; K a multiple of 64), the
// nibbles unpacked to bytes 0..15 on the way (one 16-quad step is one such block): no unpacked copy of the rows.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void pack_panel_int4(const uint8_t* w, int64_t K, int8_t* packed, int32_t* neg) {
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  pack_panel_rows<kInt4Block>(
      [&](int64_t r, int64_t q) __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) {
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * (K / 2) + 2 * q));
        const __m256i low = _mm256_and_si256(bytes, low_nibble);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble);
        return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
      },
      [](int64_t, int64_t) -> int32_t { return 0; },  // never called: K / 4 is a multiple of 16
      K, packed, neg);
}

// The fp16 (scale, min) groups of kPanelRows int4 weight rows (each row: n_groups scales, then n_groups mins) ->
// scales and mins [n_groups][kPanelRows] in fp32, as the tiles read them: 16 rows by 16 groups a transpose.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void panel_groups(const uint16_t* groups, int64_t n_groups, float* scales, float* mins) {
  for (int part = 0; part < 2; ++part) {
    float* dst = part == 0 ? scales : mins;
    for (int64_t half = 0; half < kPanelRows / 16; ++half) {
      int64_t g = 0;
      for (; g + 16 <= n_groups; g += 16) {
        __m512i v[16];
        for (int r = 0; r < 16; ++r)
          v[r] = _mm512_castps_si512(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              groups + (half * 16 + r) * 2 * n_groups + part * n_groups + g))));
        transpose16(v);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (g + j) * kPanelRows + half * 16, v[j]);
      }
      for (; g < n_groups; ++g)
        for (int r = 0; r < 16; ++r)
          dst[g * kPanelRows + half * 16 + r] = _cvtsh_ss(groups[(half * 16 + r) * 2 * n_groups + part * n_groups + g]);
    }
  }
}

// A tile's rows of x, as quantize_row_u8 left them: xq [., K], a step a block [., K / kActBlock].
struct GemmRows {
  const uint8_t* xq;
  const float* step;
  const float* group_sums;  // int4 weights only: each group's Σ of step · Σ q over its blocks [., groups]
  int64_t K;
};

// A packed panel of kPanelRows weight rows and what turns its integer sums into the product: int8, a scale a row
// (`scale`); int4 (w = q · scale + min a group of `group_blocks` blocks), a scale and a min a row and group
// (`group_scales`, `group_mins` [K / G][kPanelRows], fp32).
struct GemmPanel {
  const int8_t* packed;
  const int32_t* neg;
  const float* scale;
  const float* group_scales;
  const float* group_mins;
  int64_t group_blocks;
};

// MT rows of x against one packed panel -> out[t, 0 .. kPanelRows) (row stride N). int8: out = Σ_b sum_b · step_b,
// times the row's scale at the end; int4: Σ_g (scale_g · Σ_{b in g} sum_b · step_b + min_g · Σ_{b in g} x̃_b), the
// weights' scale and min applied once a group: a step of each per block (with the int8 form's per-block step in
// between) made the int4 GEMM ~20 % slower than the int8 one (Xeon, AVX512-VNNI); once a group, 5-10 % faster.
// Blocks of kActBlock<INT4> columns. GB > 0: int4 groups of GB blocks, known to the compiler (the default group of
// 64 columns is one block, GB = 1; a count known so measured ~3 % faster than the same code reading it at run time,
// with 32-column blocks and GB = 2).
template <int MT, bool INT4, int GB = 0>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void gemm_tile(const GemmRows& x, const GemmPanel& p, float* out, int64_t N) {
  constexpr int64_t B = kActBlock<INT4>;
  const int64_t blocks = x.K / B;
  const int64_t span = INT4 ? (GB > 0 ? GB : p.group_blocks) : blocks;  // blocks between two fp32 steps of the weights
  __m512 total[MT][2];
  for (int t = 0; t < MT; ++t) total[t][0] = total[t][1] = _mm512_setzero_ps();
  for (int64_t first = 0, g = 0; first < blocks; first += span, ++g) {
    __m512 part[MT][2];  // int4: the group's Σ_b sum_b · step_b
    for (int t = 0; t < MT; ++t) part[t][0] = part[t][1] = _mm512_setzero_ps();
    for (int64_t b = first; b < first + span; ++b) {
      __m512i acc[MT][2];
      const __m512i neg0 = _mm512_loadu_si512(p.neg + b * kPanelRows);
      const __m512i neg1 = _mm512_loadu_si512(p.neg + b * kPanelRows + 16);
      for (int t = 0; t < MT; ++t) {
        acc[t][0] = neg0;
        acc[t][1] = neg1;
      }
      const int8_t* panel = p.packed + b * B * kPanelRows;
#pragma GCC unroll 16
      for (int64_t q = 0; q < B / 4; ++q) {
        const __m512i w0 = _mm512_loadu_si512(panel + q * 4 * kPanelRows);
        const __m512i w1 = _mm512_loadu_si512(panel + q * 4 * kPanelRows + 64);
        for (int t = 0; t < MT; ++t) {
          int32_t four;  // the row's 4 activations of these columns, in every lane
          std::memcpy(&four, x.xq + t * x.K + b * B + q * 4, 4);
          const __m512i a = _mm512_set1_epi32(four);
          acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], a, w0);
          acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], a, w1);
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 s = _mm512_set1_ps(x.step[t * blocks + b]);
        if constexpr (INT4) {
          part[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][0]), s, part[t][0]);
          part[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][1]), s, part[t][1]);
        } else {
          total[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][0]), s, total[t][0]);
          total[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][1]), s, total[t][1]);
        }
      }
    }
    if constexpr (INT4) {
      const __m512 scale0 = _mm512_loadu_ps(p.group_scales + g * kPanelRows);
      const __m512 scale1 = _mm512_loadu_ps(p.group_scales + g * kPanelRows + 16);
      const __m512 min0 = _mm512_loadu_ps(p.group_mins + g * kPanelRows);
      const __m512 min1 = _mm512_loadu_ps(p.group_mins + g * kPanelRows + 16);
      for (int t = 0; t < MT; ++t) {
        const __m512 sum = _mm512_set1_ps(x.group_sums[t * (blocks / span) + g]);
        total[t][0] = _mm512_fmadd_ps(min0, sum, _mm512_fmadd_ps(part[t][0], scale0, total[t][0]));
        total[t][1] = _mm512_fmadd_ps(min1, sum, _mm512_fmadd_ps(part[t][1], scale1, total[t][1]));
      }
    }
  }
  if constexpr (!INT4) {  // int8: the row scales
    const __m512 scale0 = _mm512_loadu_ps(p.scale), scale1 = _mm512_loadu_ps(p.scale + 16);
    for (int t = 0; t < MT; ++t) {
      total[t][0] = _mm512_mul_ps(total[t][0], scale0);
      total[t][1] = _mm512_mul_ps(total[t][1], scale1);
    }
  }
  for (int t = 0; t < MT; ++t) {
    _mm512_storeu_ps(out + t * N, total[t][0]);
    _mm512_storeu_ps(out + t * N + 16, total[t][1]);
  }
}

using GemmTile = void (*)(const GemmRows&, const GemmPanel&, float*, int64_t);
template <bool INT4>
constexpr GemmTile kGemmTiles[kTileRows + 1] = {nullptr, gemm_tile<1, INT4>, gemm_tile<2, INT4>, gemm_tile<3, INT4>,
                                                gemm_tile<4, INT4>, gemm_tile<5, INT4>, gemm_tile<6, INT4>};
constexpr GemmTile kGemmTilesGroup1[kTileRows + 1] = {nullptr, gemm_tile<1, true, 1>, gemm_tile<2, true, 1>,
                                                      gemm_tile<3, true, 1>, gemm_tile<4, true, 1>,
                                                      gemm_tile<5, true, 1>, gemm_tile<6, true, 1>};

// The same GEMM on AVX2 alone (every x86 CPU this file runs on; picked where the int8 product is AVX2's), with the
// same integers: each row's blocks rounded exactly as quantize_row_u8 rounds them, but kept signed, and the same
// block sums Σ q·w in int32, so the fp32 steps that follow, in the same order, give the VNNI GEMM's bits.
// int8 weights: the activations are stored as int16 and the weights widened to int16 in the panel, and vpmaddwd
// multiplies two columns a 32-bit lane (|q·w| ≤ 127 · 128: exact). int4 weights (q 0..15) stay bytes: vpmaddubsw
// multiplies them (unsigned) by the int8 activations into 16-bit pair sums of at most 2 · 15 · 127 (no saturation),
// which add up in 16 bits over 32 columns (at most 30,480), and one vpmaddwd against ones every 32 columns adds the
// pairs into the block's int32 lanes: the same integers. int8 takes two multiplier instructions for 32 products,
// where fp32 takes four FMAs; int4 about one. The 8-bit form of the int8 product (|q| by the weights with q's sign,
// vpsignb) needs a third instruction on the same ports; on a Zen 4 its whole prefills measured 0.8-1.0x this form's
// (noisy VM).
constexpr int64_t kPanelBytesAvx2 = 2 * kPanelRows;  // a panel's bytes a column: int16 weights (int4: half used)

// One row of x (K a multiple of B) -> xq as T (int8_t for int4 weights, int16_t for int8 ones), a step a block of
// B columns and, where `sums` is given, each block's step · Σ q: quantize_row_u8's values, signed (quantize_block).
template <int64_t B, typename T>
void quantize_row_s8(const float* x, int64_t K, T* xq, float* step, float* sums) {
  for (int64_t b = 0; b < K / B; ++b) {
    float sum;
    step[b] = quantize_block<B>(x + b * B, xq + b * B, &sum);
    if (sums != nullptr) sums[b] = sum;
  }
}

// 8 vectors of 8 int32 (rows) -> their transpose, in place: v[j] holds element j of every input row.
inline void transpose8(__m256i* v) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + j]: rows i .. i + 3 at elements j and 4 + j
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    v[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// kPanelRows rows of W [., K] -> packed, one 32-bit lane a row and L columns (L = 4 bytes, or WIDEN: L = 2 columns
// widened to int16), [K/L][kPanelRows] lanes: 8 rows by 8 lanes at a time (transpose8; K is a multiple of
// kGemmBlock, so K/L of 8).
template <bool WIDEN>
void pack_panel_avx2(const int8_t* w, int64_t K, int8_t* packed) {
  constexpr int64_t L = WIDEN ? 2 : 4;
  static_assert(kGemmBlock % (8 * L) == 0, "whole groups of 8 lanes");
  int32_t* out = reinterpret_cast<int32_t*>(packed);
  for (int64_t group = 0; group < kPanelRows / 8; ++group) {
    const int8_t* rows = w + group * 8 * K;
    for (int64_t q = 0; q < K / L; q += 8) {
      __m256i v[8];
      for (int i = 0; i < 8; ++i) {
        const int8_t* at = rows + i * K + L * q;
        v[i] = WIDEN ? _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)))
                     : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
      }
      transpose8(v);
      for (int j = 0; j < 8; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (q + j) * kPanelRows + group * 8), v[j]);
    }
  }
}

// The fp32 side of the 8-lane GEMM tiles (gemm_tile_avx2, gemm_tile_avxvnni): gemm_tile's steps in the same order.
// Each block's int32 sums times the row's step are added into `part` (int4: a group's) or `total` (int8); an int4
// group's part meets the weights' scale and min at the group's end; the int8 row scales multiply at the end.
template <int MT, bool INT4>
struct TileSums8 {
  static constexpr int V = kPanelRows / 8;
  __m256 total[MT][V], part[MT][V];
  TileSums8() {
    for (int t = 0; t < MT; ++t)
      for (int v = 0; v < V; ++v) total[t][v] = _mm256_setzero_ps();
  }
  __attribute__((always_inline)) void start_group() {
    for (int t = 0; t < MT; ++t)
      for (int v = 0; v < V; ++v) part[t][v] = _mm256_setzero_ps();
  }
  __attribute__((always_inline)) void add_block(const __m256i (&acc)[MT][V], const GemmRows& x, int64_t blocks,
                                                int64_t b) {
    for (int t = 0; t < MT; ++t) {
      const __m256 s = _mm256_set1_ps(x.step[t * blocks + b]);
      for (int v = 0; v < V; ++v) {
        if constexpr (INT4)
          part[t][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][v]), s, part[t][v]);
        else
          total[t][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t][v]), s, total[t][v]);
      }
    }
  }
  __attribute__((always_inline)) void end_group(const GemmRows& x, const GemmPanel& p, int64_t groups, int64_t g) {
    if constexpr (INT4)
      for (int t = 0; t < MT; ++t) {
        const __m256 sum = _mm256_set1_ps(x.group_sums[t * groups + g]);
        for (int v = 0; v < V; ++v) {
          const __m256 scale = _mm256_loadu_ps(p.group_scales + g * kPanelRows + 8 * v);
          const __m256 min = _mm256_loadu_ps(p.group_mins + g * kPanelRows + 8 * v);
          total[t][v] = _mm256_fmadd_ps(min, sum, _mm256_fmadd_ps(part[t][v], scale, total[t][v]));
        }
      }
  }
  __attribute__((always_inline)) void store(const GemmPanel& p, float* out, int64_t N) const {
    for (int t = 0; t < MT; ++t)
      for (int v = 0; v < V; ++v) {
        const __m256 result = INT4 ? total[t][v] : _mm256_mul_ps(total[t][v], _mm256_loadu_ps(p.scale + 8 * v));
        _mm256_storeu_ps(out + t * N + 8 * v, result);
      }
  }
};

// run += the products of w and a in place: int8 weights (int16 w and a) vpmaddwd into 32-bit pair sums, int4 ones
// (w the unsigned bytes, a the signed) vpmaddubsw into 16-bit pair sums, then one add into run. Written out because
// GCC, left to the intrinsics, read w again from memory for every row (two loads where one does) and added into a
// fresh register and moved it back (a third instruction a product). On a Zen 3 (1 thread, 256 rows) the int4 GEMM
// ran 12-19 % faster so; the int8 one the same (it stays near its pairs' rate: vpmaddwd + vpaddd, ~1.6 a cycle).
template <bool INT4>
__attribute__((always_inline)) inline void multiply_add(__m256i& run, __m256i w, __m256i a) {
  __m256i product;
  if constexpr (INT4)
    asm("vpmaddubsw %[a], %[w], %[p]\n\tvpaddw %[p], %[run], %[run]"
        : [run] "+x"(run), [p] "=&x"(product) : [w] "x"(w), [a] "x"(a));
  else
    asm("vpmaddwd %[a], %[w], %[p]\n\tvpaddd %[p], %[run], %[run]"
        : [run] "+x"(run), [p] "=&x"(product) : [w] "x"(w), [a] "x"(a));
}

// MT rows of x (quantize_row_s8's: int16 for int8 weights, int8 for int4) against one packed panel -> out[t, 0 ..
// kPanelRows): gemm_tile's arithmetic (the same block sums, the same fp32 steps in the same order) in 8-lane vectors.
// (Cutting K into chunks whose panel part stays in L1 across the tiles measured the same on a Zen 4, 3-15 % slower
// on a Zen 3.)
template <int MT, bool INT4, int GB = 0>
void gemm_tile_avx2(const GemmRows& x, const GemmPanel& p, float* out, int64_t N) {
  constexpr int V = kPanelRows / 8;
  constexpr int L = INT4 ? 4 : 2;  // columns a 32-bit lane
  using Act = std::conditional_t<INT4, int8_t, int16_t>;
  constexpr int64_t B = kActBlock<INT4>;
  const Act* xq = reinterpret_cast<const Act*>(x.xq);
  const int64_t blocks = x.K / B;
  const int64_t span = INT4 ? (GB > 0 ? GB : p.group_blocks) : blocks;  // as in gemm_tile
  const __m256i ones = _mm256_set1_epi16(1);
  TileSums8<MT, INT4> sums;
  for (int64_t first = 0, g = 0; first < blocks; first += span, ++g) {
    sums.start_group();
    for (int64_t b = first; b < first + span; ++b) {
      __m256i acc[MT][V];  // the block's int32 sums
      const int8_t* panel = p.packed + b * B * 4 / L * kPanelRows;
      // int8: one pass over the block; int4: one a 32-column half, its 16-bit pair sums then added into acc
      for (int half = 0; half < (INT4 ? B / 32 : 1); ++half) {
        __m256i run[MT][V];  // int8: int32 sums; int4: 16-bit pair sums, at most 8 · 2 · 15 · 127 = 30,480
        for (int t = 0; t < MT; ++t)
          for (int v = 0; v < V; ++v) run[t][v] = _mm256_setzero_si256();
        constexpr int kSteps = (INT4 ? 32 : B) / L;
        static_assert(!INT4 || kSteps * 2 * 15 * 127 <= 32767, "32 columns' 16-bit pair sums cannot overflow");
#pragma GCC unroll 4
        for (int i = 0; i < kSteps; ++i) {
          const int q = half * kSteps + i;
          __m256i a[MT];  // the row's L activations of these columns, in every lane
          for (int t = 0; t < MT; ++t) {
            int32_t lane;
            std::memcpy(&lane, xq + t * x.K + b * B + q * L, 4);
            a[t] = _mm256_set1_epi32(lane);
          }
          for (int v = 0; v < V; ++v) {
            const __m256i w =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 4 * kPanelRows + 32 * v));
            for (int t = 0; t < MT; ++t) multiply_add<INT4>(run[t][v], w, a[t]);
          }
        }
        for (int t = 0; t < MT; ++t)
          for (int v = 0; v < V; ++v) {
            const __m256i pairs = INT4 ? _mm256_madd_epi16(run[t][v], ones) : run[t][v];  // int4: into int32
            acc[t][v] = half == 0 ? pairs : _mm256_add_epi32(acc[t][v], pairs);
          }
      }
      sums.add_block(acc, x, blocks, b);
    }
    sums.end_group(x, p, blocks / span, g);
  }
  sums.store(p, out, N);
}

constexpr int kTileRowsAvx2 = 2;  // 3 and 4 rows spill accumulators and measured slower on a Zen 4
template <bool INT4>
constexpr GemmTile kGemmTilesAvx2[kTileRowsAvx2 + 1] = {nullptr, gemm_tile_avx2<1, INT4>, gemm_tile_avx2<2, INT4>};
constexpr GemmTile kGemmTilesAvx2Group1[kTileRowsAvx2 + 1] = {nullptr, gemm_tile_avx2<1, true, 1>,
                                                              gemm_tile_avx2<2, true, 1>};

// The same GEMM on AVX-VNNI (256-bit vpdpbusd: AVX2 CPUs that have it, where Python picked kInt8AvxVnni): the VNNI
// tiles' integers and fp32 steps in 8-lane vectors, on pack_panel_avx2<false>'s panels (the VNNI tiles' layout: 4
// columns of a row a 32-bit lane). The activations are quantize_row_s8's int8 ones. int8 weights: run_gemm offsets
// them by 128 (each byte's sign bit flipped: q + 128 as an unsigned byte, quantize_row_u8's bytes) to meet the signed
// weights, each block's sums starting from the panel's -128 · Σ w (pack_neg_avxvnni), as on the VNNI tiles; int4
// weights (0..15) are the unsigned operand and the activations the signed one, so nothing to undo. One instruction
// a lane's 4 products, where the AVX2 tiles take two a pair (int8) or about one and a quarter a quad (int4); the
// integers are the same, so are the results' bits.
#if (defined(__clang__) && !defined(__apple_build_version__) && __clang_major__ >= 12) || \
    (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define RWKV_AVX_VNNI 1
#define RWKV_AVX_VNNI_TARGET __attribute__((target("avx2,fma,avxvnni")))
// a[lane] + the 4 products of u's unsigned bytes by s's signed ones in each 32-bit lane
RWKV_AVX_VNNI_TARGET inline __m256i dot_bytes(__m256i a, __m256i u, __m256i s) {
  return _mm256_dpbusd_avx_epi32(a, u, s);
}
#else  // a compiler without AVX-VNNI's intrinsics (GCC 10, clang 11): the AVX-VNNI tiles are compiled, never run
#define RWKV_AVX_VNNI 0
#define RWKV_AVX_VNNI_TARGET
inline __m256i dot_bytes(__m256i, __m256i, __m256i) { __builtin_trap(); }  // set_int8_product(2) is refused
#endif

template <int MT, bool INT4, int GB = 0>
RWKV_AVX_VNNI_TARGET
void gemm_tile_avxvnni(const GemmRows& x, const GemmPanel& p, float* out, int64_t N) {
  constexpr int V = kPanelRows / 8;
  constexpr int64_t B = kActBlock<INT4>;
  const int64_t blocks = x.K / B;
  const int64_t span = INT4 ? (GB > 0 ? GB : p.group_blocks) : blocks;  // as in gemm_tile
  TileSums8<MT, INT4> sums;
  for (int64_t first = 0, g = 0; first < blocks; first += span, ++g) {
    sums.start_group();
    for (int64_t b = first; b < first + span; ++b) {
      __m256i acc[MT][V];  // the block's int32 sums
      for (int v = 0; v < V; ++v) {
        const __m256i* neg = reinterpret_cast<const __m256i*>(p.neg + b * kPanelRows + 8 * v);
        const __m256i start = INT4 ? _mm256_setzero_si256() : _mm256_loadu_si256(neg);
        for (int t = 0; t < MT; ++t) acc[t][v] = start;
      }
      const int8_t* panel = p.packed + b * B * kPanelRows;
#pragma GCC unroll 16
      for (int64_t q = 0; q < B / 4; ++q) {
        __m256i a[MT];  // the row's 4 activations of these columns, in every lane
        for (int t = 0; t < MT; ++t) {
          int32_t four;
          std::memcpy(&four, x.xq + t * x.K + b * B + q * 4, 4);
          a[t] = _mm256_set1_epi32(four);
        }
        for (int v = 0; v < V; ++v) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + q * 4 * kPanelRows + 32 * v));
          for (int t = 0; t < MT; ++t)  // int4: the weights are the unsigned bytes; int8: the activations
            acc[t][v] = INT4 ? dot_bytes(acc[t][v], w, a[t]) : dot_bytes(acc[t][v], a[t], w);
        }
      }
      sums.add_block(acc, x, blocks, b);
    }
    sums.end_group(x, p, blocks / span, g);
  }
  sums.store(p, out, N);
}

// neg [K/kGemmBlock][kPanelRows] = -128 · Σ of each row's int8 weights over each block, from a panel that
// pack_panel_avx2<false> packed (vpdpbusd of all-ones bytes sums a lane's 4 weights, as pack_panel_rows does).
RWKV_AVX_VNNI_TARGET
void pack_neg_avxvnni(const int8_t* packed, int64_t K, int32_t* neg) {
  const __m256i ones = _mm256_set1_epi8(1);
  constexpr int64_t quad = 4 * kPanelRows;  // a panel's bytes for 4 columns
  for (int64_t b = 0; b < K / kGemmBlock; ++b)
    for (int64_t v = 0; v < kPanelRows / 8; ++v) {
      __m256i sum = _mm256_setzero_si256();
      for (int64_t q = b * kGemmBlock / 4; q < (b + 1) * kGemmBlock / 4; ++q)
        sum = dot_bytes(sum, ones, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + q * quad + 32 * v)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(neg + b * kPanelRows + 8 * v),
                          _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, 7)));
    }
}

constexpr int kTileRowsAvxVnni = 3;  // 12 int32 accumulators, 3 activation vectors and a weight vector
template <bool INT4>
constexpr GemmTile kGemmTilesAvxVnni[kTileRowsAvxVnni + 1] = {nullptr, gemm_tile_avxvnni<1, INT4>,
                                                              gemm_tile_avxvnni<2, INT4>, gemm_tile_avxvnni<3, INT4>};
constexpr GemmTile kGemmTilesAvxVnniGroup1[kTileRowsAvxVnni + 1] = {
    nullptr, gemm_tile_avxvnni<1, true, 1>, gemm_tile_avxvnni<2, true, 1>, gemm_tile_avxvnni<3, true, 1>};

// The rows a GEMM reads: fp32 as they are, or bf16 (a prefill's token-shift mixes, rounded to bf16 for the bf16
// products beside the GEMM) widened a row at a time, exactly (a bf16 number is the top half of an fp32 one), so
// the GEMM's bits are those of the widened tensor without the tensor.
struct GemmInput {
  const float* f32;
  const uint16_t* bf16;
  // Row m [K] in fp32: in place, or widened into `wide` [K].
  const float* row(int64_t m, int64_t K, float* wide) const {
    if (bf16 == nullptr) return f32 + m * K;
    const uint16_t* src = bf16 + m * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
      _mm256_storeu_ps(wide + k, _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16)));
    }
    for (; k < K; ++k) {
      const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
      std::memcpy(wide + k, &bits, sizeof(float));
    }
    return wide;
  }
};

// x [M, K] against every panel of an [N, K] weight: prepare(n0, panel) packs the panel of rows n0 .. n0 + 31 (into
// buffers it owns, one set a thread; pack_panel for the VNNI tiles, pack_panel_avx2 for the AVX2 and AVX-VNNI ones)
// and fills `panel`. The rows of x are quantised once, panels split over PyTorch's intra-op threads. P (an
// Int8Product) picks the tiles and the activations' form: uint8 for the VNNI tiles, int8 for the AVX-VNNI ones and
// the AVX2 int4 ones, int16 for the AVX2 int8 ones.
// INT4: group_blocks blocks a group of the weights' (scale, min); each row's group sums of step · Σ q are formed here.
template <bool INT4, int P, typename Prepare>
void run_gemm(const GemmInput& input, int64_t M, int64_t K, int64_t N, float* out, Prepare prepare,
              int64_t group_blocks = 1) {
  constexpr bool VNNI = P == kInt8Vnni, AVX2 = P == kInt8Avx2;
  constexpr int64_t tile_rows = VNNI ? kTileRows : AVX2 ? kTileRowsAvx2 : kTileRowsAvxVnni;
  constexpr int64_t width = AVX2 && !INT4 ? 2 : 1;  // bytes an activation: int16 for the AVX2 int8 tiles
  constexpr int64_t B = kActBlock<INT4>;
  const int64_t blocks = K / B, groups = blocks / group_blocks;
  std::vector<uint8_t> xq(M * K * width);
  std::vector<float> step(M * blocks), sums(INT4 ? M * blocks : 0), group_sums(INT4 ? M * groups : 0);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(input.bf16 != nullptr ? K : 0);
    for (int64_t m = begin; m < end; ++m) {
      const float* x = input.row(m, K, wide.data());
      float* row_sums = INT4 ? sums.data() + m * blocks : nullptr;
      if constexpr (VNNI)
        quantize_row_u8<B>(x, K, xq.data() + m * K, step.data() + m * blocks, row_sums);
      else if constexpr (width == 1) {
        quantize_row_s8<B>(x, K, reinterpret_cast<int8_t*>(xq.data() + m * K), step.data() + m * blocks, row_sums);
        if constexpr (P == kInt8AvxVnni && !INT4)  // q + 128 as unsigned bytes, the AVX-VNNI int8 tiles' operand
          for (int64_t k = 0; k < K; ++k) xq[m * K + k] ^= 0x80;
      } else
        quantize_row_s8<B>(x, K, reinterpret_cast<int16_t*>(xq.data() + m * K * width), step.data() + m * blocks,
                           row_sums);
      if constexpr (INT4)
        for (int64_t g = 0; g < groups; ++g) {
          float sum = 0.0f;
          for (int64_t b = g * group_blocks; b < (g + 1) * group_blocks; ++b) sum += sums[m * blocks + b];
          group_sums[m * groups + g] = sum;
        }
    }
  });
  const bool group1 = INT4 && group_blocks == 1;
  const GemmTile* tiles = VNNI ? (group1 ? kGemmTilesGroup1 : kGemmTiles<INT4>)
                          : AVX2 ? (group1 ? kGemmTilesAvx2Group1 : kGemmTilesAvx2<INT4>)
                                 : (group1 ? kGemmTilesAvxVnniGroup1 : kGemmTilesAvxVnni<INT4>);
  at::parallel_for(0, N / kPanelRows, 1, [&](int64_t first, int64_t last) {
    GemmPanel panel{};
    auto buffers = prepare.buffers();
    for (int64_t index = first; index < last; ++index) {
      const int64_t n0 = index * kPanelRows;
      prepare(n0, buffers, panel);
      for (int64_t m = 0; m < M; m += tile_rows) {
        const int64_t rows = std::min<int64_t>(tile_rows, M - m);
        const GemmRows tile{xq.data() + m * K * width, step.data() + m * blocks,
                            INT4 ? group_sums.data() + m * groups : nullptr, K};
        tiles[rows](tile, panel, out + m * N + n0, N);
      }
    }
  });
}

// The input width of a weight matrix: int4 ones hold two columns a byte.
inline int64_t in_features(const torch::Tensor& w) {
  return w.scalar_type() == torch::kByte ? 2 * w.size(1) : w.size(1);
}

// Every refusal's message is a literal (TORCH_CHECK with one string argument) or built here: a TORCH_CHECK that streams
// values into its message (c10::str) crashed the process instead of raising on one machine (torch 2.11+cu130, GCC
// 13.3; the literal ones raised there). std::runtime_error reaches Python as a RuntimeError all the same.
[[noreturn]] void refuse(const std::string& message) { throw std::runtime_error(message); }

// A weight the products read: a contiguous CPU matrix in fp32, bf16 or fp16, int8 with its fp32 scales, or int4 with
// its fp16 (scale, min) groups.
void check_weight(const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "cpu_kernels: weights must be contiguous CPU matrices");
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == torch::kInt8 || dtype == torch::kByte || dtype == torch::kBFloat16 || dtype == torch::kHalf ||
                  dtype == torch::kFloat32, "cpu_kernels: weights must be fp32, bf16, fp16, int8 or int4 (uint8)");
  TORCH_CHECK(dtype != torch::kInt8 || (scale.defined() && scale.numel() == w.size(0) &&
                                        scale.scalar_type() == torch::kFloat32 && scale.is_contiguous()),
              "cpu_kernels: int8 weights need a contiguous fp32 scale per row");
  if (dtype == torch::kByte) {
    const int64_t K = in_features(w);
    TORCH_CHECK(scale.defined() && scale.dim() == 3 && scale.size(0) == w.size(0) && scale.size(1) == 2 &&
                    scale.scalar_type() == torch::kHalf && scale.is_contiguous(),
                "cpu_kernels: int4 weights need contiguous fp16 groups [N, 2, K/G] (scales, then mins)");
    const int64_t groups = scale.size(2);
    static_assert(kInt4Block == 64 && kInt4MaxBlocks * kInt4Block == 65536, "the message below names these");
    TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % kInt4Block == 0 && K / kInt4Block <= kInt4MaxBlocks,
                "cpu_kernels: int4 groups must be a multiple of 64 columns that divides K, K at most 65536");
  }
}

// bf16 rows: the GEMMs take them too (gemm_output).
void check_operands(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, bool bf16 = false) {
  TORCH_CHECK(x.device().is_cpu(), "cpu_kernels: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == in_features(w), "cpu_kernels: x [M, K] and w [N, K]");
  if (bf16) {
    TORCH_CHECK((x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) && x.is_contiguous(),
                "cpu_kernels: x must be contiguous fp32 or bf16");
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "cpu_kernels: x must be contiguous fp32");
  }
  check_weight(w, scale);
}

// A piece of parallel work: `units` pieces, each done whole by one thread (run(begin, end) does units [begin,
// end)), each reading about `unit_bytes`; `after`, if set, runs on the calling thread once every unit is done.
struct Task {
  int64_t units;
  int64_t unit_bytes;
  std::function<void(int64_t, int64_t)> run;
  std::function<void()> after;
};

// One thread's share of a region's units (units numbered over the tasks laid end to end): [front, back), taken
// from the front by its owner and from the back by a thread that has finished its own share. Both ends live in one
// 64-bit word (front in the low half), so that a take is one compare-and-swap; a share a cache line.
struct alignas(64) Share {
  std::atomic<uint64_t> ends{0};
};

// Takes a quarter of what is left of `share` (at least one unit) from its front or its back into [begin, end);
// false when nothing is left. A quarter: a thread's own share goes in a few takes, and what a thief takes near the
// end is small.
inline bool take(Share& share, bool from_front, int64_t* begin, int64_t* end) {
  uint64_t ends = share.ends.load(std::memory_order_relaxed);
  for (;;) {
    const int64_t front = static_cast<int64_t>(ends & 0xFFFFFFFFu), back = static_cast<int64_t>(ends >> 32);
    if (front >= back) return false;
    const int64_t n = std::max<int64_t>(1, (back - front) / 4);
    *begin = from_front ? front : back - n;
    *end = from_front ? front + n : back;
    const uint64_t left = from_front ? (static_cast<uint64_t>(back) << 32) | static_cast<uint64_t>(front + n)
                                     : (static_cast<uint64_t>(back - n) << 32) | static_cast<uint64_t>(front);
    if (share.ends.compare_exchange_weak(ends, left, std::memory_order_relaxed)) return true;
  }
}

// Independent tasks in one parallel region: one fork and one join for all of them, instead of one each (a decode
// step of a small model runs ~10 products a layer of a few hundred KB each; on a Zen 4 with 2 threads, 0.1B,
// sharing regions gave a few per cent: the products' own streaming from memory is most of a step). The units
// are cut into one contiguous share per thread by the bytes they read, so a thread streams its share of one weight
// into the next one's; a thread done with its share then takes units from the back of the others' (work stealing),
// so that no thread waits at the join while units are left: units whose bytes cost more time than others' (the
// LoRAs' float factors beside int8 rows) or a thread the machine slows do not hold the region. Which thread does a
// unit never changes what the unit computes (each is whole on one thread), so the results do not depend on the
// number of threads, on who took what, or on the other tasks of the call.
void run_together(const std::vector<Task>& tasks) {
  auto size = [](const Task& t) { return std::max<int64_t>(t.unit_bytes, 1); };
  int64_t total = 0, units = 0;
  for (const Task& t : tasks) {
    total += t.units * size(t);
    units += t.units;
  }
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), units);
  if (threads <= 1 || at::in_parallel_region()) {
    for (const Task& t : tasks)
      if (t.units > 0) t.run(0, t.units);
  } else {
    TORCH_CHECK(units < (int64_t{1} << 31), "cpu_kernels: too many units in one region");
    // thread t's share: the units whose first byte, in the tasks laid end to end, falls in [total t/T, total (t+1)/T)
    auto units_before = [&](int64_t byte) {
      int64_t offset = 0, count = 0;
      for (const Task& t : tasks) {
        count += byte <= offset ? 0 : std::min<int64_t>((byte - offset + size(t) - 1) / size(t), t.units);
        offset += t.units * size(t);
      }
      return count;
    };
    std::vector<Share> shares(threads);
    for (int64_t t = 0; t < threads; ++t) {
      const uint64_t front = units_before(total * t / threads), back = units_before(total * (t + 1) / threads);
      shares[t].ends.store((back << 32) | front, std::memory_order_relaxed);
    }
    auto run_units = [&](int64_t begin, int64_t end) {  // units [begin, end) of the tasks laid end to end
      int64_t first = 0;
      for (const Task& t : tasks) {
        const int64_t lo = std::max(begin, first), hi = std::min(end, first + t.units);
        if (lo < hi) t.run(lo - first, hi - first);
        first += t.units;
      }
    };
    at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
      for (int64_t thread = first; thread < last; ++thread) {
        int64_t begin, end;
        while (take(shares[thread], true, &begin, &end)) run_units(begin, end);
        for (int64_t other = 1; other < threads; ++other)
          while (take(shares[(thread + other) % threads], false, &begin, &end)) run_units(begin, end);
      }
    });
  }
  for (const Task& t : tasks)
    if (t.after) t.after();
}

// out[M, row_end - row_begin] = x[M, K] · W[row_begin:row_end]ᵀ, whatever W's dtype, as a Task of 16 weight rows
// a unit. Integer weights' activations are quantised when it is made. It must outlive the region it runs in and
// stays where it was made (its task points at it).
class Product {
 public:
  static constexpr int64_t kRows = 16;

  Product(const float* x, int64_t M, const torch::Tensor& w, const torch::Tensor& scale, int64_t row_begin,
          int64_t row_end, float* out)
      : x_(x), M_(M), N_(row_end - row_begin), K_(in_features(w)), row_begin_(row_begin), w_(w), scale_(scale),
        out_(out), vnni_(g_int8_product.load(std::memory_order_relaxed) == kInt8Vnni) {
    if (w.scalar_type() == torch::kByte) {  // int4: int8 activations in blocks of 64, and each group's Σ step·xq
      const int64_t G = K_ / scale.size(2), blocks = K_ / kInt4Block, n_groups = K_ / G;
      xq8_.resize(M * K_);
      step_.resize(M * blocks);
      std::vector<float> bsum(M * blocks);
      gsum_.assign(M * n_groups, 0.0f);
      quantize_blocks_int8(x, M, K_, xq8_.data(), step_.data(), bsum.data());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t b = 0; b < blocks; ++b) gsum_[m * n_groups + b / (G / kInt4Block)] += bsum[m * blocks + b];
      int4_ = Int4Rows{xq8_.data(), step_.data(), gsum_.data(), K_, G};
    } else if (w.scalar_type() == torch::kInt8) {  // int8: int16 activations, one step a row
      xq16_.resize(M * K_);
      step_.resize(M);
      quantize_rows_int16(x, M, K_, xq16_.data(), step_.data());
    }
  }
  Product(const Product&) = delete;
  Product& operator=(const Product&) = delete;

  Task task() const {
    const int64_t row_bytes = w_.scalar_type() == torch::kByte ? K_ / 2 : K_ * w_.element_size();
    return {(N_ + kRows - 1) / kRows, kRows * row_bytes,
            [this](int64_t begin, int64_t end) { rows(begin * kRows, std::min(N_, end * kRows)); }, nullptr};
  }

  // Output columns [begin, end) (weight rows row_begin + begin ...).
  void rows(int64_t begin, int64_t end) const {
    const int64_t M = M_, N = N_, K = K_, r0 = row_begin_;
    switch (w_.scalar_type()) {
      case torch::kByte: {
        const uint8_t* w = w_.data_ptr<uint8_t>() + r0 * (K / 2);
        const uint16_t* groups = reinterpret_cast<const uint16_t*>(scale_.data_ptr()) + r0 * 2 * (K / int4_.G);
        if (vnni_)
          int4_rows<Int4DotVnni>(w, groups, int4_, out_, M, N, begin, end);
        else
          int4_rows<Int4DotAvx2>(w, groups, int4_, out_, M, N, begin, end);
        break;
      }
      case torch::kInt8:
        (vnni_ ? int8_rows_vnni : int8_rows_avx2)(w_.data_ptr<int8_t>() + r0 * K, xq16_.data(), step_.data(),
                                                  scale_.data_ptr<float>() + r0, out_, M, N, K, begin, end);
        break;
      case torch::kHalf:
        rows_range<Fp16Weights>(x_, reinterpret_cast<const uint16_t*>(w_.data_ptr()) + r0 * K, nullptr, out_, M,
                                N, K, begin, end);
        break;
      case torch::kFloat32:
        rows_range<Fp32Weights>(x_, w_.data_ptr<float>() + r0 * K, nullptr, out_, M, N, K, begin, end);
        break;
      default:
        rows_range<Bf16Weights>(x_, reinterpret_cast<const uint16_t*>(w_.data_ptr()) + r0 * K, nullptr, out_, M,
                                N, K, begin, end);
    }
  }

 private:
  const float* x_;
  int64_t M_, N_, K_, row_begin_;
  const torch::Tensor& w_;
  const torch::Tensor& scale_;
  float* out_;
  bool vnni_;
  std::vector<int16_t> xq16_;  // int8: the activations in int16, one step a row
  std::vector<int8_t> xq8_;  // int4: the activations in int8, one step a block of 64
  std::vector<float> step_, gsum_;
  Int4Rows int4_{};
};

// One product on its own (the tasks of a layer that have nothing to share a region with).
void product(const float* x, int64_t M, const torch::Tensor& w, const torch::Tensor& scale, int64_t row_begin,
             int64_t row_end, float* out) {
  const Product p(x, M, w, scale, row_begin, row_end, out);
  run_together({p.task()});
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

// exp of 8 floats: n = round(x·log2 e), r = x - n·ln 2 (ln 2 in two parts), a degree-7 polynomial for e^r on
// |r| ≤ ln2/2, times 2^n: within 1 ulp of exp on [-87.3, 88] (0.93 ulp at most, checked against double exp in
// steps of 1e-4 when written), e^0 = 1 exactly; 0 below -87.3 (where exp is subnormal or 0), and inputs above 88
// are taken as 88. The wkv scan tests hold its users to the float64 recurrence.
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 below = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, low), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2's first part: exact in n·
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // e^r = 1 + r + r²/2! + ... + r⁷/7! (Horner; the truncation is below 2e-9 on |r| ≤ 0.347)
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(below, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

// (e^(a - max), e^(b - max)) for max = max(a, b): one of the two is e^0 = 1, so one exp serves both.
inline void exp_pair8(__m256 a, __m256 b, __m256* ea, __m256* eb) {
  const __m256 a_wins = _mm256_cmp_ps(a, b, _CMP_GE_OQ);
  const __m256 e = exp8(_mm256_sub_ps(_mm256_min_ps(a, b), _mm256_max_ps(a, b)));
  const __m256 one = _mm256_set1_ps(1.0f);
  *ea = _mm256_blendv_ps(e, one, a_wins);
  *eb = _mm256_blendv_ps(one, e, a_wins);
}

// Eight lanes of an element-wise loop over a row: all eight, or the row's last n % 8 through masked loads and
// stores. An element's arithmetic is the same either way, so its result does not depend on where it falls.
struct Lanes {
  __m256i mask;
  bool full;
  __m256 load(const float* p) const { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask); }
  void store(float* p, __m256 v) const {
    if (full)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, mask, v);
  }
};

// f(i, lanes) for i = 0, 8, 16, ... below n: an element-wise loop eight floats at a time.
template <typename F>
inline void each8(int64_t n, F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) f(i, Lanes{_mm256_set1_epi32(-1), true});
  if (i < n) f(i, Lanes{_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), false});
}

// 1 / (1 + e^-x) with exp8 (the decode steps' gates and decays: a scalar exp a channel cost a Zen 4 ~5 ns, ~13 µs
// of an RWKV-7 0.1B layer's 390).
inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f)))));
}

// relu(x)² in place: max(x, 0) squared, which is x > 0 ? x · x : 0 for every x (a NaN or -0 gives 0 either way)
// without a branch an element: the branch mispredicted on about half of a row's signs, 15 µs of a 3,072-wide row on
// a Zen 4 where this takes under one.
inline void relu_squared(float* x, int64_t n) {
  each8(n, [&](int64_t i, Lanes l) {
    const __m256 v = _mm256_max_ps(l.load(x + i), _mm256_setzero_ps());  // max returns 0 for a NaN x
    l.store(x + i, _mm256_mul_ps(v, v));
  });
}

inline double horizontal_sum(__m256d v) {
  const __m128d a = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(a, _mm_unpackhi_pd(a, a)));
}

// (x - mean) / sqrt(var + eps) * w + b over n values, the mean and the variance summed in float64 (eight columns
// at a time in two four-lane sums, then the last n % 8 one by one: the same order for every row of a width).
inline void normalize(const float* x, int64_t n, const float* w, const float* b, float eps, float* out) {
  const int64_t whole = n / 8 * 8;
  __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  double mean = horizontal_sum(_mm256_add_pd(low, high));
  for (int64_t i = whole; i < n; ++i) mean += x[i];
  mean /= n;
  const __m256d mean4 = _mm256_set1_pd(mean);
  low = high = _mm256_setzero_pd();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d dl = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), mean4);
    const __m256d dh = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), mean4);
    low = _mm256_fmadd_pd(dl, dl, low);
    high = _mm256_fmadd_pd(dh, dh, high);
  }
  double var = horizontal_sum(_mm256_add_pd(low, high));
  for (int64_t i = whole; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= n;
  const float inv = 1.0f / std::sqrt(static_cast<float>(var) + eps);
  const float m = static_cast<float>(mean);
  const __m256 m8 = _mm256_set1_ps(m), inv8 = _mm256_set1_ps(inv);
  each8(n, [&](int64_t i, Lanes l) {
    l.store(out + i, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(l.load(x + i), m8), inv8), l.load(w + i),
                                     l.load(b + i)));
  });
}

// One token of RWKV-4's wkv for channels [begin, end): out = the wkv average (before the receptance gate),
// and the new (aa, bb, pp). Each channel is read before it is written, so the new state may overwrite the old.
// Eight channels at a time with exp8 (two exps a channel instead of four: one of each pair is e^0); the last
// few with std::exp.
inline void wkv4_token(const float* decay, const float* first, const float* k, const float* v, const float* aa,
                       const float* bb, const float* pp, float* out, float* aa_out, float* bb_out, float* pp_out,
                       int64_t begin, int64_t end) {
  int64_t c = begin;
  for (; c + 8 <= end; c += 8) {
    const __m256 kc = _mm256_loadu_ps(k + c), vc = _mm256_loadu_ps(v + c), a = _mm256_loadu_ps(aa + c),
                 b = _mm256_loadu_ps(bb + c), p = _mm256_loadu_ps(pp + c);
    __m256 e1, e2;
    exp_pair8(p, _mm256_add_ps(_mm256_loadu_ps(first + c), kc), &e1, &e2);
    _mm256_storeu_ps(out + c, _mm256_div_ps(_mm256_fmadd_ps(e1, a, _mm256_mul_ps(e2, vc)), _mm256_fmadd_ps(e1, b, e2)));
    const __m256 ww = _mm256_add_ps(_mm256_loadu_ps(decay + c), p);
    exp_pair8(ww, kc, &e1, &e2);
    _mm256_storeu_ps(aa_out + c, _mm256_fmadd_ps(e1, a, _mm256_mul_ps(e2, vc)));
    _mm256_storeu_ps(bb_out + c, _mm256_fmadd_ps(e1, b, e2));
    _mm256_storeu_ps(pp_out + c, _mm256_max_ps(ww, kc));
  }
  for (; c < end; ++c) {
    float ww = first[c] + k[c];
    float p = std::max(pp[c], ww);
    float e1 = std::exp(pp[c] - p), e2 = std::exp(ww - p);
    out[c] = (e1 * aa[c] + e2 * v[c]) / (e1 * bb[c] + e2);
    ww = decay[c] + pp[c];
    p = std::max(ww, k[c]);
    e1 = std::exp(ww - p);
    e2 = std::exp(k[c] - p);
    const float a = e1 * aa[c] + e2 * v[c], b = e1 * bb[c] + e2;
    aa_out[c] = a;
    bb_out[c] = b;
    pp_out[c] = p;
  }
}

// Whether a head's new state goes to memory with streaming stores: a decode step writes it to another buffer
// than the one it reads (s_out != s), and nothing reads it before the next step, by which time a step's weights
// have pushed it out of the caches; a plain store first reads each line it writes (a third of a head's traffic:
// RWKV-7 0.1B int8, the heads' region 22.4 -> 18.6 us a layer on a Zen 4). A prefill's scan updates its state in
// place and reads it again at once: plain stores there. The head functions fence after their streamed stores.
inline bool streams_state(const float* s, const float* s_out, int64_t row) {
  return s != s_out && reinterpret_cast<uintptr_t>(s_out) % 32 == 0 && row % 8 == 0;
}

inline void store_state(float* p, __m256 v, bool stream) {
  if (stream)
    _mm256_stream_ps(p, v);
  else
    _mm256_storeu_ps(p, v);
}

inline void end_stream(bool stream) {
  if (stream) _mm_sfence();
}

// One token of one RWKV-5 head of size S: o[j] = Σ_i r_i (u_i k_i v_j + s_ij) (before the group norm), and
// s_out_ij = k_i v_j + w_i s_ij, where w is the decay factor. s_out may be s (each row is read, then written: a
// prefill's scan). Sizes that are multiples of 8 run in 8-lane vectors, o[j] += fma(r_i u_i k_i, v_j, r_i s_ij) row
// after row, one order for decode steps and scans alike; heads of 64 (every released RWKV-5/6 model) keep o in
// eight registers over the rows (the same sums), which made a prefill's scan 1.5x faster than the plain loop it ran
// before (Zen 3, 12 heads of 64, 256 tokens: 1.0 -> 0.66 ms). Other sizes run the plain loop.
inline void wkv5_head_token(const float* r, const float* k, const float* v, const float* u, const float* w,
                            const float* s, float* s_out, float* o, int64_t S) {
  const bool stream = streams_state(s, s_out, S);
  auto row_vectors = [&](int64_t i, auto&& add_term) {  // row i's state and its terms of o, 8 columns at a time
    const float ri = r[i], ki = k[i], rui = ri * u[i] * ki, wi = w[i];
    const __m256 r8 = _mm256_set1_ps(ri), k8 = _mm256_set1_ps(ki), ru8 = _mm256_set1_ps(rui), w8 = _mm256_set1_ps(wi);
    const float* si = s + i * S;
    float* soi = s_out + i * S;
    for (int64_t j = 0; j < S; j += 8) {
      const __m256 vj = _mm256_loadu_ps(v + j), sij = _mm256_loadu_ps(si + j);
      add_term(j, _mm256_fmadd_ps(ru8, vj, _mm256_mul_ps(r8, sij)));
      store_state(soi + j, _mm256_fmadd_ps(w8, sij, _mm256_mul_ps(k8, vj)), stream);
    }
  };
  if (S == 64) {
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    for (int64_t i = 0; i < 64; ++i)
      row_vectors(i, [&](int64_t j, __m256 term) { acc[j / 8] = _mm256_add_ps(acc[j / 8], term); });
    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(o + 8 * q, acc[q]);
  } else if (S % 8 == 0) {
    std::fill(o, o + S, 0.0f);
    for (int64_t i = 0; i < S; ++i)
      row_vectors(i, [&](int64_t j, __m256 term) {
        _mm256_storeu_ps(o + j, _mm256_add_ps(_mm256_loadu_ps(o + j), term));
      });
  } else {
    std::fill(o, o + S, 0.0f);
    for (int64_t i = 0; i < S; ++i) {
      const float ri = r[i], ki = k[i], rui = ri * u[i] * ki, wi = w[i];
      const float* si = s + i * S;
      float* soi = s_out + i * S;
      for (int64_t j = 0; j < S; ++j) {
        const float a = ki * v[j];
        o[j] += rui * v[j] + ri * si[j];
        soi[j] = a + wi * si[j];
      }
    }
  }
  end_stream(stream);
}

void check_scan_operand(const torch::Tensor& t, const char* name) {
  if (!(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous()))
    refuse(std::string("cpu_kernels scan: ") + name + " must be a contiguous fp32 CPU tensor");
}

// For each of B rows of h [B, C]: xx = layer_norm(h) (also written to the shift state out, at shift_out +
// b * shift_stride), and P token-shift mixes of xx with the previous token's (prev + b * prev_stride):
// mixed[p, b] = xx * mix[p] + prev * (1 - mix[p]).
void norm_and_mix(const float* h, int64_t B, int64_t C, const float* ln_w, const float* ln_b, const float* prev,
                  int64_t prev_stride, float* shift_out, int64_t shift_stride, const float* mix, int64_t P,
                  float* xx, float* mixed) {
  for (int64_t b = 0; b < B; ++b) {
    float* row = xx + b * C;
    normalize(h + b * C, C, ln_w, ln_b, 1e-5f, row);
    std::copy(row, row + C, shift_out + b * shift_stride);
    const float* before = prev + b * prev_stride;
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; ++c) {
        const float m = mix[p * C + c];
        mixed[(p * B + b) * C + c] = row[c] * m + before[c] * (1 - m);
      }
  }
}

// A layer's weights and constants, in the order fast.cpu_layer_tensors lists them.
struct LayerWeights {
  const float *ln1_w, *ln1_b, *ln2_w, *ln2_b, *att_mix, *ffn_mix, *decay, *first, *ln_x_w, *ln_x_b;
  torch::Tensor att, att_scale, out, out_scale, ffn, ffn_scale, value, value_scale;
};

LayerWeights unpack(const std::vector<torch::Tensor>& t) {
  TORCH_CHECK(t.size() == 18, "cpu_kernels.decode_layer: 18 layer tensors expected");
  auto f = [](const torch::Tensor& v) -> const float* {
    if (v.numel() == 0) return nullptr;
    TORCH_CHECK(v.scalar_type() == torch::kFloat32 && v.is_contiguous(), "layer constants: contiguous fp32");
    return v.data_ptr<float>();
  };
  for (int i : {5, 7, 10, 14}) check_weight(t[i], t[i + 1]);  // each weight, followed by its scale
  return LayerWeights{f(t[0]), f(t[1]), f(t[2]), f(t[3]), f(t[4]), f(t[9]), f(t[12]), f(t[13]), f(t[16]), f(t[17]),
                      t[5], t[6], t[7], t[8], t[10], t[11], t[14], t[15]};
}


// out[M, N] = x[M, K] · W[K, N] for a small fp32 matrix stored input-major (a LoRA's factors, x @ W): each
// input row adds x[m, k] · W[k, :] to the output row. One row of x streams W row by row (a loop the compiler
// vectorises over N, loading and storing the outputs at every input row); several rows (a batch) take 64 outputs at
// a time, held in registers over the input rows while W comes from the cache: the same multiply-adds in the same
// order, written alike so that the compiler contracts both or neither, so the same bits (RWKV-7 0.1B whole steps,
// Zen 5: 1.06-1.09x at 4-16 chats; for one row this order read W in strided passes and lost ~5%).
// Over the threads: by chunks of input rows (kKnChunk for a narrow W, kKnWideChunk for one of at least
// kKnWide columns), each a contiguous run of W summed into its own partial sums, which are added in chunk order,
// so the result depends on K alone, never on the thread count. One thread read these at ~half the memory's speed
// on the Intel Xeon measured (1.8 MB a layer at RWKV-7 0.1B: 15% of an int8 decode step). A wide W was split by
// blocks of 128 output columns before, each unit reading 512 bytes of every input row: on a Zen 4 the LoRAs'
// second factors of a decode step (RWKV-7 0.1B, 0.88 MB a layer) then streamed at ~14 GB/s against ~29 for a
// plain read.
constexpr int64_t kKnChunk = 128, kKnWideChunk = 32, kKnWide = 256;

// A LoRA factor as stored: fp32, or bf16 (models whose prefill multiplies their LoRAs in bf16 keep them so: see
// models/layers.py's lora_storage_dtype), read widened to fp32: the same products, in the same order, as an fp32
// factor holding the same values.
struct Factor {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  Factor(const float* w) : f32(w) {}  // NOLINT: an fp32 factor wherever a pointer was passed
  Factor(const float* w32, const uint16_t* w16) : f32(w32), bf16(w16) {}
  Factor at(int64_t offset) const { return bf16 ? Factor(nullptr, bf16 + offset) : Factor(f32 + offset); }
};

template <typename W>
void kn_range(const float* x, int64_t x_stride, int64_t M, const typename W::T* w, int64_t N, int64_t k0,
              int64_t k1, int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  constexpr int64_t kLanes = 8, kBlock = 8 * kLanes;  // 64 outputs: 8 accumulators held in registers over k
  for (int64_t m = 0; m < M; ++m) {
    float* o = out + m * out_stride;
    const float* xm = x + m * x_stride;
    int64_t n = n0;  // one row streams W row by row (the loop at the end); several re-read it from the cache
    for (; M > 1 && n + kBlock <= n1; n += kBlock) {
      __m256 acc[8];
      for (auto& a : acc) a = _mm256_setzero_ps();
      for (int64_t k = k0; k < k1; ++k) {
        const __m256 xk = _mm256_set1_ps(xm[k]);
        const typename W::T* wk = w + k * N + n;
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(xk, W::load8(wk + j * kLanes)));
      }
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(o + n + j * kLanes, acc[j]);
    }
    std::fill(o + n, o + n1, 0.0f);
    const int64_t rest_bytes = (n1 - n) * static_cast<int64_t>(sizeof(typename W::T));
    const int64_t ahead = M == 1 ? prefetch_distance(N * static_cast<int64_t>(sizeof(typename W::T))) : 0;
    for (int64_t k = k0; k < k1; ++k) {
      const float xk = xm[k];
      const typename W::T* wk = w + k * N;
      prefetch_ahead(wk + n, rest_bytes, ahead);  // one row streams W: the rows `ahead` bytes on (none: ahead 0)
      for (int64_t c = n; c < n1; ++c) o[c] += xk * W::load1(wk + c);
    }
  }
}

void product_kn_range(const float* x, int64_t x_stride, int64_t M, Factor w, int64_t N, int64_t k0, int64_t k1,
                      int64_t n0, int64_t n1, float* out, int64_t out_stride) {
  if (w.bf16)
    kn_range<Bf16Weights>(x, x_stride, M, w.bf16, N, k0, k1, n0, n1, out, out_stride);
  else
    kn_range<Fp32Weights>(x, x_stride, M, w.f32, N, k0, k1, n0, n1, out, out_stride);
}

// x [M, K] (rows x_stride apart) · W [K, N] as a Task: a chunk of input rows a unit (kKnChunk, or kKnWideChunk
// where N >= kKnWide), each into its own partial sums, which the task's `after` adds in chunk order (so the result
// depends on K alone). Stays where it was made (its task points at it).
class KnProduct {
 public:
  KnProduct(const float* x, int64_t M, Factor w, int64_t K, int64_t N, float* out, int64_t x_stride = 0)
      : x_(x), M_(M), w_(w), K_(K), N_(N), out_(out), x_stride_(x_stride ? x_stride : K),
        chunk_(N >= kKnWide ? kKnWideChunk : kKnChunk), chunks_(std::max<int64_t>((K + chunk_ - 1) / chunk_, 1)) {
    if (chunks_ > 1) partial_.reset(new float[chunks_ * M * N]);  // not zeroed: each chunk's range zeroes its own
  }
  KnProduct(const KnProduct&) = delete;
  KnProduct& operator=(const KnProduct&) = delete;

  Task task() {
    if (chunks_ == 1)
      return {1, K_ * N_ * bytes(),
              [this](int64_t, int64_t) { product_kn_range(x_, x_stride_, M_, w_, N_, 0, K_, 0, N_, out_, N_); },
              nullptr};
    return {chunks_, chunk_ * N_ * bytes(),
            [this](int64_t begin, int64_t end) {
              for (int64_t c = begin; c < end; ++c)
                product_kn_range(x_, x_stride_, M_, w_, N_, c * chunk_, std::min(K_, (c + 1) * chunk_), 0, N_,
                                 partial_.get() + c * M_ * N_, N_);
            },
            [this]() {
              std::copy(partial_.get(), partial_.get() + M_ * N_, out_);
              for (int64_t c = 1; c < chunks_; ++c)
                for (int64_t i = 0; i < M_ * N_; ++i) out_[i] += partial_[c * M_ * N_ + i];
            }};
  }

 private:
  int64_t bytes() const { return w_.bf16 ? 2 : 4; }
  const float* x_;
  int64_t M_;
  Factor w_;
  int64_t K_, N_;
  float* out_;
  int64_t x_stride_;
  int64_t chunk_, chunks_;
  std::unique_ptr<float[]> partial_;  // chunks_ x [M, N] partial sums, or none
};

void product_kn(const float* x, int64_t M, Factor w, int64_t K, int64_t N, float* out, int64_t x_stride = 0) {
  KnProduct p(x, M, w, K, N, out, x_stride);
  run_together({p.task()});
}

inline const float* constant(const torch::Tensor& t, int64_t n, const char* name) {
  if (!(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n))
    refuse(std::string("cpu_kernels: ") + name + " must be a contiguous fp32 tensor of " + std::to_string(n) +
           " values");
  return t.data_ptr<float>();
}

inline Factor factor(const torch::Tensor& t, int64_t n, const char* name) {
  if (t.is_contiguous() && t.numel() == n) {
    if (t.scalar_type() == torch::kFloat32) return Factor(t.data_ptr<float>());
    if (t.scalar_type() == torch::kBFloat16) return Factor(nullptr, reinterpret_cast<const uint16_t*>(t.data_ptr()));
  }
  refuse(std::string("cpu_kernels: ") + name + " must be a contiguous fp32 or bf16 tensor of " + std::to_string(n) +
         " values");
}

// The LoRA activation(x @ W1) @ W2 for B rows: x [B, C] (row stride C), W1 [C, R], W2 [R, A] -> out [B, A].
// activation: 0 none, 1 tanh, 2 sigmoid. Two tasks, the second reading what the first wrote: first() can share a
// region with other products of the same input, second() with others that follow them.
class LowRank {
 public:
  LowRank(const float* x, int64_t B, int64_t C, const torch::Tensor& w1, const torch::Tensor& w2, int activation,
          float* out)
      : R_(w1.size(1)), A_(w2.size(1)), activation_(activation), hidden_(B * R_),
        first_(x, B, factor(w1, C * R_, "a LoRA's first factor"), C, R_, hidden_.data()),
        second_(hidden_.data(), B, factor(w2, R_ * A_, "a LoRA's second factor"), R_, A_, out) {
    TORCH_CHECK(w1.size(0) == C && w2.size(0) == R_, "cpu_kernels: LoRA shapes [C, R] and [R, A]");
  }

  Task first() {  // x @ W1, then the activation
    Task t = first_.task();
    std::function<void()> sum = t.after;
    t.after = [this, sum]() {
      if (sum) sum();
      if (activation_ == 1)
        for (float& v : hidden_) v = std::tanh(v);
      else if (activation_ == 2)
        for (float& v : hidden_) v = sigmoid(v);
    };
    return t;
  }
  Task second() { return second_.task(); }

 private:
  int64_t R_, A_;
  int activation_;
  std::vector<float> hidden_;
  KnProduct first_, second_;
};

// One token of one RWKV-7 head of size N: s [N(value), N(key)] becomes s diag(w) + (s (-kk)) (kk a)ᵀ + v kᵀ and
// y = s r. s_out may be s (each row is read, then written). Both sums of a row run over the keys, its contiguous
// dimension: eight keys a lane (two chains each, added at the end) where N is a multiple of 8 and at most
// WKV7_VECTOR_MAX, which the compiler does not vectorise by itself (a float sum in order); any other N goes key by
// key. Measured on a Zen 4 (2 threads, 256 tokens, 12 heads of 64): 9.1-9.4 ms a layer key by key, 1.6-1.9 vectorised.
constexpr int64_t WKV7_VECTOR_MAX = 256;

inline void wkv7_head_token_scalar(const float* r, const float* w, const float* k, const float* v, const float* kk,
                                   const float* a, const float* s, float* s_out, float* y, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const float* si = s + i * N;
    float* so = s_out + i * N;
    float sa = 0.0f;
    for (int64_t j = 0; j < N; ++j) sa += si[j] * kk[j];
    const float vi = v[i];
    float yi = 0.0f;
    for (int64_t j = 0; j < N; ++j) {
      const float value = si[j] * w[j] - sa * (kk[j] * a[j]) + vi * k[j];
      so[j] = value;
      yi += value * r[j];
    }
    y[i] = yi;
  }
}

// The sum of 8·n floats of x times y, in two chains of 8 lanes.
inline float dot8(const float* x, const float* y, int64_t n8) {
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n8; j += 16) {
    even = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), even);
    odd = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(y + j + 8), odd);
  }
  if (j < n8) even = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), even);
  return horizontal_sum(_mm256_add_ps(even, odd));
}

inline void wkv7_head_token(const float* r, const float* w, const float* k, const float* v, const float* kk,
                            const float* a, const float* s, float* s_out, float* y, int64_t N) {
  if (N % 8 != 0 || N > WKV7_VECTOR_MAX) {
    wkv7_head_token_scalar(r, w, k, v, kk, a, s, s_out, y, N);
    return;
  }
  const bool stream = streams_state(s, s_out, N);
  alignas(32) float kka[WKV7_VECTOR_MAX];  // kk * a, the rank-one update's key side
  for (int64_t j = 0; j < N; j += 8)
    _mm256_store_ps(kka + j, _mm256_mul_ps(_mm256_loadu_ps(kk + j), _mm256_loadu_ps(a + j)));
  for (int64_t i = 0; i < N; ++i) {
    const float* si = s + i * N;
    float* so = s_out + i * N;
    const __m256 sa = _mm256_set1_ps(dot8(si, kk, N));  // (s kk)_i, from the row before it is written
    const __m256 vi = _mm256_set1_ps(v[i]);
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    for (int64_t j = 0; j < N; j += 8) {
      // s_ij w_j - sa kka_j + v_i k_j, then y_i += s_ij r_j
      const __m256 decayed = _mm256_mul_ps(_mm256_loadu_ps(si + j), _mm256_loadu_ps(w + j));
      const __m256 value =
          _mm256_fmadd_ps(vi, _mm256_loadu_ps(k + j), _mm256_fnmadd_ps(sa, _mm256_load_ps(kka + j), decayed));
      store_state(so + j, value, stream);
      if ((j / 8) % 2 == 0)
        even = _mm256_fmadd_ps(value, _mm256_loadu_ps(r + j), even);
      else
        odd = _mm256_fmadd_ps(value, _mm256_loadu_ps(r + j), odd);
    }
    y[i] = horizontal_sum(_mm256_add_ps(even, odd));
  }
  end_stream(stream);
}

// A decode step's state: shift and wkv read, shift_out and wkv_out written; the batch first (it may be strided),
// each sequence's block contiguous.
struct StepState {
  const float* sh;
  const float* wk;
  float* sh_out;
  float* wk_out;
  int64_t ss, ws, sso, wso;  // the batch strides of the four
};

// Whether t[b] is contiguous for every b, from the strides (a select() would make a tensor, which costs a decode
// layer microseconds).
bool block_is_contiguous(const torch::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// head(h) for each of H heads of one decode step, the heads split over PyTorch's intra-op threads (at 1.5B one
// token's wkv reads 32 states of 64x64 a layer: on one thread it was a sixth of an RWKV-5 int8 step).
template <typename Head>
void each_head(int64_t H, Head head) {
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) head(h);
  });
}

// A prefill's wkv for one sequence: heads split over PyTorch's intra-op threads, each head token by token;
// token(t, h, sh) runs token t of head h on that head's S x S state sh (updated in place).
template <typename Token>
void scan_heads(int64_t H, int64_t T, int64_t S, float* state, Token token) {
  each_head(H, [&](int64_t h) {
    for (int64_t t = 0; t < T; ++t) token(t, h, state + h * S * S);
  });
}

}  // namespace

// One decode step of one RWKV-4/5 layer for B sequences (runtime/fast_path.py's _decode_layer_torch, in one
// call). h [B, C], overwritten with the new x; st: the layer's state, shift [2, C] and wkv v4 [3, C] (aa, bb, pp)
// or v5 [H, S, S] a sequence; S: v5's head size. tensors in the order fast_path's cpu_layer_tensors lists them.
void layer45(float* h, int64_t B, int64_t C, const StepState& st, int64_t S,
             const std::vector<torch::Tensor>& tensors, int64_t version, int64_t n_att, bool halve) {
  const LayerWeights L = unpack(tensors);
  const int64_t A = in_features(L.out), F = in_features(L.value);
  const auto [sh, wk, sh_out, wk_out, ss, ws, sso, wso] = st;

  std::vector<float> xx(B * C), mixed(n_att * B * C), proj(n_att * B * A), y(B * A), tmp(B * std::max(C, F));
  // time mix
  norm_and_mix(h, B, C, L.ln1_w, L.ln1_b, sh, ss, sh_out, sso, L.att_mix, n_att, xx.data(), mixed.data());
  {
    std::deque<Product> att;
    std::vector<Task> tasks;
    for (int64_t p = 0; p < n_att; ++p) {
      att.emplace_back(mixed.data() + p * B * C, B, L.att, L.att_scale, p * A, (p + 1) * A, proj.data() + p * B * A);
      tasks.push_back(att.back().task());
    }
    run_together(tasks);
  }
  auto projection = [&](int64_t p, int64_t b) { return proj.data() + (p * B + b) * A; };  // r k v g
  if (version == 4) {
    for (int64_t b = 0; b < B; ++b) {
      const float* state = wk + b * ws;
      float* state_out = wk_out + b * wso;
      float* out = y.data() + b * A;
      wkv4_token(L.decay, L.first, projection(1, b), projection(2, b), state, state + A, state + 2 * A, out,
                 state_out, state_out + A, state_out + 2 * A, 0, A);
      const float* r = projection(0, b);
      each8(A, [&](int64_t c, Lanes l) { l.store(out + c, _mm256_mul_ps(sigmoid8(l.load(r + c)), l.load(out + c))); });
    }
  } else {
    const int64_t H = A / S;
    each_head(B * H, [&](int64_t bh) {  // every sequence's heads in one region
      const int64_t b = bh / H, o = (bh % H) * S;
      float* out = y.data() + b * A + o;
      wkv5_head_token(projection(0, b) + o, projection(1, b) + o, projection(2, b) + o, L.first + o, L.decay + o,
                      wk + b * ws + o * S, wk_out + b * wso + o * S, out, S);
      normalize(out, S, L.ln_x_w + o, L.ln_x_b + o, 64e-5f, out);
    });
    if (n_att == 4)
      for (int64_t b = 0; b < B; ++b) {
        const float* g = projection(3, b);
        float* out = y.data() + b * A;
        each8(A, [&](int64_t c, Lanes l) {  // silu(g)
          const __m256 gc = l.load(g + c);
          l.store(out + c, _mm256_mul_ps(l.load(out + c), _mm256_mul_ps(gc, sigmoid8(gc))));
        });
      }
  }
  product(y.data(), B, L.out, L.out_scale, 0, C, tmp.data());
  for (int64_t i = 0; i < B * C; ++i) h[i] += tmp[i];
  // channel mix
  std::vector<float> mixed2(2 * B * C), key(B * F), rec(B * C);
  norm_and_mix(h, B, C, L.ln2_w, L.ln2_b, sh + C, ss, sh_out + C, sso, L.ffn_mix, 2, xx.data(), mixed2.data());
  {
    const Product pk(mixed2.data(), B, L.ffn, L.ffn_scale, 0, F, key.data());
    const Product pr(mixed2.data() + B * C, B, L.ffn, L.ffn_scale, F, F + C, rec.data());
    run_together({pk.task(), pr.task()});
  }
  relu_squared(key.data(), B * F);
  product(key.data(), B, L.value, L.value_scale, 0, C, tmp.data());
  const __m256 factor = _mm256_set1_ps(halve ? 0.5f : 1.0f);
  each8(B * C, [&](int64_t i, Lanes l) {
    l.store(h + i, _mm256_mul_ps(_mm256_fmadd_ps(sigmoid8(l.load(rec.data() + i)), l.load(tmp.data() + i),
                                                 l.load(h + i)), factor));
  });
}

// One decode step of one RWKV-6 layer for B sequences (models/rwkv6.py's TimeMixV6 and ChannelMixV6 for one
// token, in one call). h [B, C], overwritten with the new x; st: the layer's state, shift [2, C] and wkv
// [H, N, N] (key by value) a sequence. t, in the order models/rwkv6.py's cpu_layer_tensors lists them: ln1 w/b,
// ln2 w/b, time_maa_x, time_maa_w k v r g [C], time_maa_w1 [C, 5D], time_maa_w2 [5, D, C], time_decay [A],
// time_decay_w1 [C, D2], time_decay_w2 [D2, A], time_faaaa [A], ln_x w/b, receptance, key, value, gate, output
// (each weight then its scale, empty unless int8), ffn time_maa_k, time_maa_r, ffn key, receptance, value (weight,
// scale). Everything but the eight weights and the four LoRA factors (fp32 or bf16) is fp32.
void layer_v6(float* h, int64_t B, int64_t C, const StepState& st, int64_t H, int64_t N,
              const std::vector<torch::Tensor>& t) {
  TORCH_CHECK(t.size() == 36, "cpu_kernels: an RWKV-6 layer has 36 tensors");
  for (int i : {18, 20, 22, 24, 26, 30, 32, 34}) check_weight(t[i], t[i + 1]);
  const torch::Tensor &Wr = t[18], &Wr_s = t[19], &Wk = t[20], &Wk_s = t[21], &Wv = t[22], &Wv_s = t[23];
  const torch::Tensor &Wg = t[24], &Wg_s = t[25], &Wo = t[26], &Wo_s = t[27];
  const torch::Tensor &Fk = t[30], &Fk_s = t[31], &Fr = t[32], &Fr_s = t[33], &Fv = t[34], &Fv_s = t[35];
  const int64_t A = Wr.size(0), F = Fk.size(0);
  TORCH_CHECK(t[11].dim() == 3 && t[11].size(0) == 5 && t[11].size(2) == C, "time_maa_w2: [5, D, C]");
  const int64_t D = t[11].size(1);
  TORCH_CHECK(H * N == A && in_features(Wo) == A && in_features(Fv) == F && t[10].size(1) == 5 * D,
              "cpu_kernels: an RWKV-6 layer's shapes disagree");
  const char* what = "an RWKV-6 layer constant";
  const float *ln1_w = constant(t[0], C, what), *ln1_b = constant(t[1], C, what);
  const float *ln2_w = constant(t[2], C, what), *ln2_b = constant(t[3], C, what);
  const float* maa_x = constant(t[4], C, what);
  const float* maa[5];
  for (int p = 0; p < 5; ++p) maa[p] = constant(t[5 + p], C, what);
  const Factor maa_w2 = factor(t[11], 5 * D * C, "time_maa_w2");
  const float* time_decay = constant(t[12], A, what);
  const float *u = constant(t[15], A, what), *lnx_w = constant(t[16], A, what), *lnx_b = constant(t[17], A, what);
  const float *ffn_k = constant(t[28], C, what), *ffn_r = constant(t[29], C, what);
  const auto [sh, wk, sh_out, wk_out, ss, ws, sso, wso] = st;

  // time mix: the data-dependent token shift xx + sx * (time_maa_* + lora_*), sx = prev - xx, in the order w k v r g
  std::vector<float> xx(B * C), sx(B * C), base(B * C), hidden(B * 5 * D), mixed(5 * B * C);
  for (int64_t b = 0; b < B; ++b) {
    float* row = xx.data() + b * C;
    normalize(h + b * C, C, ln1_w, ln1_b, 1e-5f, row);
    std::copy(row, row + C, sh_out + b * sso);
    const float* prev = sh + b * ss;
    for (int64_t c = 0; c < C; ++c) {
      sx[b * C + c] = prev[c] - row[c];
      base[b * C + c] = row[c] + sx[b * C + c] * maa_x[c];
    }
  }
  product_kn(base.data(), B, factor(t[10], C * 5 * D, "time_maa_w1"), C, 5 * D, hidden.data());
  for (float& value : hidden) value = std::tanh(value);
  std::vector<float> part(5 * B * C);  // [5, B, C]
  {
    std::deque<KnProduct> second;  // each second factor read once for all B rows
    std::vector<Task> tasks;
    for (int p = 0; p < 5; ++p) {
      second.emplace_back(hidden.data() + p * D, B, maa_w2.at(p * D * C), D, C, part.data() + p * B * C, 5 * D);
      tasks.push_back(second.back().task());
    }
    run_together(tasks);
  }
  for (int p = 0; p < 5; ++p)
    for (int64_t b = 0; b < B; ++b) {
      float* out = mixed.data() + (p * B + b) * C;
      const float* lora = part.data() + (p * B + b) * C;
      for (int64_t c = 0; c < C; ++c) out[c] = xx[b * C + c] + sx[b * C + c] * (maa[p][c] + lora[c]);
    }
  const float *xw = mixed.data(), *xk = xw + B * C, *xv = xk + B * C, *xr = xv + B * C, *xg = xr + B * C;
  std::vector<float> r(B * A), k(B * A), v(B * A), g(B * A), w(B * A), y(B * A);
  {
    const Product pr(xr, B, Wr, Wr_s, 0, A, r.data()), pk(xk, B, Wk, Wk_s, 0, A, k.data());
    const Product pv(xv, B, Wv, Wv_s, 0, A, v.data()), pg(xg, B, Wg, Wg_s, 0, A, g.data());
    LowRank decay(xw, B, C, t[13], t[14], 1, w.data());
    run_together({pr.task(), pk.task(), pv.task(), pg.task(), decay.first()});
    run_together({decay.second()});
  }
  for (int64_t b = 0; b < B; ++b) {
    float* wb = w.data() + b * A;
    each8(A, [&](int64_t i, Lanes l) {  // the decay factor e^-e^(time_decay + lora)
      const __m256 e = exp8(_mm256_add_ps(l.load(time_decay + i), l.load(wb + i)));
      l.store(wb + i, exp8(_mm256_xor_ps(e, _mm256_set1_ps(-0.0f))));
    });
  }
  each_head(B * H, [&](int64_t bh) {  // every sequence's heads in one region
    const int64_t b = bh / H, o = (bh % H) * N, at = b * A + o;
    wkv5_head_token(r.data() + at, k.data() + at, v.data() + at, u + o, w.data() + at, wk + b * ws + o * N,
                    wk_out + b * wso + o * N, y.data() + at, N);
    normalize(y.data() + at, N, lnx_w + o, lnx_b + o, 64e-5f, y.data() + at);
  });
  each8(B * A, [&](int64_t i, Lanes l) {  // silu(g)
    const __m256 gi = l.load(g.data() + i);
    l.store(y.data() + i, _mm256_mul_ps(l.load(y.data() + i), _mm256_mul_ps(gi, sigmoid8(gi))));
  });
  std::vector<float> tmp(B * C);
  product(y.data(), B, Wo, Wo_s, 0, C, tmp.data());
  for (int64_t i = 0; i < B * C; ++i) h[i] += tmp[i];
  // channel mix: sigmoid(r(xx + sx * maa_r)) * value(relu(key(xx + sx * maa_k))^2)
  std::vector<float> key(B * F), rec(B * C);
  for (int64_t b = 0; b < B; ++b) {
    float* row = xx.data() + b * C;
    normalize(h + b * C, C, ln2_w, ln2_b, 1e-5f, row);
    std::copy(row, row + C, sh_out + b * sso + C);
    const float* prev = sh + b * ss + C;
    for (int64_t c = 0; c < C; ++c) {
      const float d = prev[c] - row[c];
      mixed[b * C + c] = row[c] + d * ffn_k[c];
      mixed[(B + b) * C + c] = row[c] + d * ffn_r[c];
    }
  }
  {
    const Product pk(mixed.data(), B, Fk, Fk_s, 0, F, key.data());
    const Product pr(mixed.data() + B * C, B, Fr, Fr_s, 0, C, rec.data());
    run_together({pk.task(), pr.task()});
  }
  relu_squared(key.data(), B * F);
  product(key.data(), B, Fv, Fv_s, 0, C, tmp.data());
  each8(B * C, [&](int64_t i, Lanes l) {
    l.store(h + i, _mm256_fmadd_ps(sigmoid8(l.load(rec.data() + i)), l.load(tmp.data() + i), l.load(h + i)));
  });
}

// Prefill of one sequence through RWKV-4's wkv, token by token (the decode step's recurrence): decay, first
// [C]; k, v [T, C]; state [3, C] (aa, bb, pp). Returns (wkv [T, C] before the receptance gate, new state).
// Channels are split over PyTorch's intra-op threads.
std::vector<torch::Tensor> wkv4_scan(torch::Tensor decay, torch::Tensor first, torch::Tensor k, torch::Tensor v,
                                     torch::Tensor state) {
  for (auto [t, name] : {std::pair{&decay, "decay"}, {&first, "first"}, {&k, "k"}, {&v, "v"}, {&state, "state"}})
    check_scan_operand(*t, name);
  TORCH_CHECK(k.dim() == 2 && v.sizes() == k.sizes(), "wkv4_scan: k and v must be [T, C]");
  const int64_t T = k.size(0), C = k.size(1);
  TORCH_CHECK(decay.numel() == C && first.numel() == C && state.numel() == 3 * C,
              "wkv4_scan: decay and first must be [C], state [3, C]");
  torch::Tensor y = torch::empty_like(k), new_state = state.clone();
  const float *w = decay.data_ptr<float>(), *u = first.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *s = new_state.data_ptr<float>();
  at::parallel_for(0, C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = 0; t < T; ++t)
      wkv4_token(w, u, kp + t * C, vp + t * C, s, s + C, s + 2 * C, yp + t * C, s, s + C, s + 2 * C, begin, end);
  });
  return {y, new_state};
}

// Prefill of one sequence through RWKV-5's wkv, token by token: w (decay factor) [H, S], or one per token
// [T, H·S] (RWKV-6); u [H, S]; r, k, v [T, H·S]; state [H, S, S]. Returns (out [T, H·S] before the group norm,
// new state). Heads are split over threads.
std::vector<torch::Tensor> wkv5_scan(torch::Tensor w, torch::Tensor u, torch::Tensor r, torch::Tensor k,
                                     torch::Tensor v, torch::Tensor state) {
  for (auto [t, name] : {std::pair{&w, "w"}, {&u, "u"}, {&r, "r"}, {&k, "k"}, {&v, "v"}, {&state, "state"}})
    check_scan_operand(*t, name);
  TORCH_CHECK(state.dim() == 3 && state.size(1) == state.size(2), "wkv5_scan: state must be [H, S, S]");
  const int64_t H = state.size(0), S = state.size(1), A = H * S;
  TORCH_CHECK(r.dim() == 2 && r.size(1) == A && k.sizes() == r.sizes() && v.sizes() == r.sizes(),
              "wkv5_scan: r, k and v must be [T, H*S]");
  const int64_t T = r.size(0);
  TORCH_CHECK((w.numel() == A || w.numel() == T * A) && u.numel() == A,
              "wkv5_scan: u must be [H, S], w [H, S] or [T, H*S]");
  const int64_t w_step = w.numel() == A ? 0 : A;  // RWKV-6: a decay per token
  torch::Tensor y = torch::empty_like(r), new_state = state.clone();
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>();
  const float *rp = r.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *s = new_state.data_ptr<float>();
  scan_heads(H, T, S, s, [&](int64_t t, int64_t h, float* sh) {
    const int64_t at = t * A + h * S;
    wkv5_head_token(rp + at, kp + at, vp + at, up + h * S, wp + t * w_step + h * S, sh, sh, yp + at, S);
  });
  return {y, new_state};
}

// One decode step of one RWKV-7 layer for B sequences (models/rwkv7.py's TimeMixV7 and ChannelMixV7 for one
// token, in one call). h [B, C], overwritten with the new x; st: the layer's state, shift [2, C] and wkv [H, N, N]
// (value by key) a sequence; vf [B, A]: layer 0 writes its value there, later layers read it. t, in the order
// models/rwkv7.py's cpu_layer_tensors lists them: ln1 w/b, ln2 w/b, the mixes x_r x_w x_k x_v x_a x_g [C],
// receptance, key, value, output (each weight then its scale, empty unless int8), w0 w1 w2, a0 a1 a2,
// v0 v1 v2 (empty in layer 0), g1 g2, k_k, k_a, r_k, ln_x w/b, ffn x_k, ffn key, ffn value (weight, scale).
// Everything but the eight weights and the LoRA factors (w1 ... g2: fp32 or bf16) is fp32.
void layer_v7(float* h, int64_t B, int64_t C, const StepState& st, int64_t H, int64_t N, float* vf,
              const std::vector<torch::Tensor>& t, bool first_layer) {
  TORCH_CHECK(t.size() == 39, "cpu_kernels: an RWKV-7 layer has 39 tensors");
  for (int i : {10, 12, 14, 16, 35, 37}) check_weight(t[i], t[i + 1]);
  const torch::Tensor &Wr = t[10], &Wr_s = t[11], &Wk = t[12], &Wk_s = t[13], &Wv = t[14], &Wv_s = t[15];
  const torch::Tensor &Wo = t[16], &Wo_s = t[17], &Fk = t[35], &Fk_s = t[36], &Fv = t[37], &Fv_s = t[38];
  const int64_t A = Wr.size(0), F = Fk.size(0);
  TORCH_CHECK(H * N == A && in_features(Wo) == A && in_features(Fv) == F,
              "cpu_kernels: an RWKV-7 layer's shapes disagree");
  const float *ln1_w = constant(t[0], C, "ln1 weight"), *ln1_b = constant(t[1], C, "ln1 bias");
  const float *ln2_w = constant(t[2], C, "ln2 weight"), *ln2_b = constant(t[3], C, "ln2 bias");
  const float* mix[6];
  for (int i = 0; i < 6; ++i) mix[i] = constant(t[4 + i], C, "a token-shift mix");
  const float *w0 = constant(t[18], A, "w0"), *a0 = constant(t[21], A, "a0");
  const float* v0 = first_layer ? nullptr : constant(t[24], A, "v0");
  const float *k_k = constant(t[29], A, "k_k"), *k_a = constant(t[30], A, "k_a"), *r_k = constant(t[31], A, "r_k");
  const float *lnx_w = constant(t[32], A, "ln_x weight"), *lnx_b = constant(t[33], A, "ln_x bias");
  const float* ffn_mix = constant(t[34], C, "ffn x_k");
  const auto [sh, wk, sh_out, wk_out, ss, ws, sso, wso] = st;

  // time mix: layer norm, the six token-shift mixes xx + (prev - xx) * x_*, in the order r w k v a g
  std::vector<float> xx(B * C), mixed(6 * B * C);
  for (int64_t b = 0; b < B; ++b) {
    float* row = xx.data() + b * C;
    normalize(h + b * C, C, ln1_w, ln1_b, 1e-5f, row);
    std::copy(row, row + C, sh_out + b * sso);
    const float* prev = sh + b * ss;
    for (int p = 0; p < 6; ++p)
      for (int64_t c = 0; c < C; ++c) mixed[(p * B + b) * C + c] = row[c] + (prev[c] - row[c]) * mix[p][c];
  }
  const float *xr = mixed.data(), *xw = xr + B * C, *xk = xw + B * C, *xv = xk + B * C, *xa = xv + B * C,
              *xg = xa + B * C;
  std::vector<float> r(B * A), k(B * A), v(B * A), w(B * A), a(B * A), g(B * A), vmix(B * A), y(B * A);
  {  // the three products and the LoRAs' first factors in one region, their second factors in another
    const Product pr(xr, B, Wr, Wr_s, 0, A, r.data()), pk(xk, B, Wk, Wk_s, 0, A, k.data());
    const Product pv(xv, B, Wv, Wv_s, 0, A, v.data());
    std::deque<LowRank> loras;
    loras.emplace_back(xw, B, C, t[19], t[20], 1, w.data());
    loras.emplace_back(xa, B, C, t[22], t[23], 0, a.data());
    loras.emplace_back(xg, B, C, t[27], t[28], 2, g.data());
    if (!first_layer) loras.emplace_back(xv, B, C, t[25], t[26], 0, vmix.data());
    std::vector<Task> firsts{pr.task(), pk.task(), pv.task()}, seconds;
    for (LowRank& lora : loras) {
      firsts.push_back(lora.first());
      seconds.push_back(lora.second());
    }
    run_together(firsts);
    run_together(seconds);
  }
  const __m256 minus_decay_scale = _mm256_set1_ps(-std::exp(-0.5f));
  std::vector<float> kk(B * A);
  for (int64_t b = 0; b < B; ++b) {
    float *kb = k.data() + b * A, *vb = v.data() + b * A, *wb = w.data() + b * A;
    float *ab = a.data() + b * A, *kkb = kk.data() + b * A;
    each8(A, [&](int64_t i, Lanes l) {
      const __m256 log_w = _mm256_mul_ps(minus_decay_scale, sigmoid8(_mm256_add_ps(l.load(wb + i), l.load(w0 + i))));
      l.store(wb + i, exp8(log_w));  // the decay factor e^log_w
      l.store(ab + i, sigmoid8(_mm256_add_ps(l.load(ab + i), l.load(a0 + i))));
      l.store(kkb + i, _mm256_mul_ps(l.load(kb + i), l.load(k_k + i)));
    });
    for (int64_t hd = 0; hd < H; ++hd) {  // kk = k * k_k normalised per head (F.normalize: eps 1e-12)
      float norm = 0.0f;
      for (int64_t j = 0; j < N; ++j) norm += kkb[hd * N + j] * kkb[hd * N + j];
      const float inv = 1.0f / std::max(std::sqrt(norm), 1e-12f);
      for (int64_t j = 0; j < N; ++j) kkb[hd * N + j] *= inv;
    }
    for (int64_t i = 0; i < A; ++i) kb[i] *= 1.0f + (ab[i] - 1.0f) * k_a[i];
    float* first_v = vf + b * A;
    if (first_layer) {
      std::copy(vb, vb + A, first_v);
    } else {
      const float* vm = vmix.data() + b * A;
      each8(A, [&](int64_t i, Lanes l) {
        const __m256 vi = l.load(vb + i);
        l.store(vb + i, _mm256_fmadd_ps(_mm256_sub_ps(l.load(first_v + i), vi),
                                        sigmoid8(_mm256_add_ps(l.load(vm + i), l.load(v0 + i))), vi));
      });
    }
  }
  each_head(B * H, [&](int64_t bh) {  // every sequence's heads in one region
    const int64_t b = bh / H, o = (bh % H) * N, at = b * A + o;
    const float *rb = r.data() + at, *kb = k.data() + at, *vb = v.data() + at;
    float* yb = y.data() + at;
    wkv7_head_token(rb, w.data() + at, kb, vb, kk.data() + at, a.data() + at, wk + b * ws + o * N,
                    wk_out + b * wso + o * N, yb, N);
    normalize(yb, N, lnx_w + o, lnx_b + o, 64e-5f, yb);
    float bonus = 0.0f;
    for (int64_t j = 0; j < N; ++j) bonus += rb[j] * kb[j] * r_k[o + j];
    for (int64_t j = 0; j < N; ++j) yb[j] += bonus * vb[j];
  });
  for (int64_t i = 0; i < B * A; ++i) y[i] *= g[i];
  std::vector<float> tmp(B * C);
  product(y.data(), B, Wo, Wo_s, 0, C, tmp.data());
  for (int64_t i = 0; i < B * C; ++i) h[i] += tmp[i];
  // channel mix: relu(key(xx + (prev - xx) * x_k))^2 @ value
  std::vector<float> key(B * F);
  for (int64_t b = 0; b < B; ++b) {
    float* row = xx.data() + b * C;
    normalize(h + b * C, C, ln2_w, ln2_b, 1e-5f, row);
    std::copy(row, row + C, sh_out + b * sso + C);
    const float* prev = sh + b * ss + C;
    for (int64_t c = 0; c < C; ++c) mixed[b * C + c] = row[c] + (prev[c] - row[c]) * ffn_mix[c];
  }
  product(mixed.data(), B, Fk, Fk_s, 0, F, key.data());
  relu_squared(key.data(), B * F);
  product(key.data(), B, Fv, Fv_s, 0, C, tmp.data());
  for (int64_t i = 0; i < B * C; ++i) h[i] += tmp[i];
}

// Every layer of one decode step in one call (what runtime/fast_path.py and runtime/cpu_decode.py run): the
// layers' tensors, each in the order its version's layer step reads them, held for the model's life, so that a
// step crosses from Python into C++ once, not once a layer with its ~40 tensors converted and four state views
// made each time. step(x, shift, wkv, shift_out, wkv_out, rescale_every): x [B, C] fp32 after ln0, overwritten with
// the residual stream after the last layer, halved after every rescale_every layers (0: never); shift and
// shift_out [B, L, 2, C], wkv and wkv_out v4 [B, L, 3, C], v5-7 [B, L, H, N, N]; the batch dimension may be strided,
// each sequence's block must be contiguous. It returns "" or why it refused (the states are checked before
// anything is written, a layer's tensors when its turn comes): no error leaves it as a C++ exception, the Python
// wrapper (kernels/cpu_kernels.py) raises it. (An exception thrown through an earlier stack of this kind killed the
// process on the GPU machine's toolchain, while the per-layer functions it called raised theirs from Python.)
class DecodeStack {
 public:
  DecodeStack(std::vector<std::vector<torch::Tensor>> layers, int64_t version, int64_t n_att,
              std::vector<torch::Tensor> ends)
      : layers_(std::move(layers)), version_(version), n_att_(n_att), ends_(std::move(ends)) {}

  std::string step(torch::Tensor x, torch::Tensor shift, torch::Tensor wkv, torch::Tensor shift_out,
                   torch::Tensor wkv_out, int64_t rescale_every) const {
    try {
      run(x, shift, wkv, shift_out, wkv_out, rescale_every);
    } catch (const c10::Error& e) {
      return e.what_without_backtrace();
    } catch (const std::exception& e) {
      return e.what();
    }
    return {};
  }

  // The whole step from token ids (ends: the embedding [V, C] fp32, bf16 or fp16, ln0's weight and bias, ln_out's,
  // the head's weight and its scale as stored): each id's row widened to fp32, ln0, the layers as step() runs them,
  // ln_out and the head's product (rows_product's, whatever its dtype) -> ("", logits [B, V]) or (why, None).
  std::tuple<std::string, torch::Tensor> logits(torch::Tensor ids, torch::Tensor shift, torch::Tensor wkv,
                                                torch::Tensor shift_out, torch::Tensor wkv_out,
                                                int64_t rescale_every) const {
    try {
      TORCH_CHECK(ends_.size() == 7, "cpu_kernels.DecodeStack: built without the embedding, norms and head");
      const torch::Tensor &emb = ends_[0], &head = ends_[5], &head_scale = ends_[6];
      TORCH_CHECK(ids.scalar_type() == torch::kLong && ids.dim() == 1 && ids.is_contiguous(),
                  "ids: contiguous int64 [B]");
      TORCH_CHECK(emb.dim() == 2 && emb.is_contiguous() &&
                      (emb.scalar_type() == torch::kFloat32 || emb.scalar_type() == torch::kBFloat16 ||
                       emb.scalar_type() == torch::kHalf),
                  "cpu_kernels.DecodeStack: the embedding must be a contiguous fp32, bf16 or fp16 matrix");
      check_weight(head, head_scale);
      const int64_t B = ids.size(0), V = emb.size(0), C = emb.size(1);
      TORCH_CHECK(in_features(head) == C, "cpu_kernels.DecodeStack: the head must read the embedding's width");
      const float *ln0_w = constant(ends_[1], C, "ln0 weight"), *ln0_b = constant(ends_[2], C, "ln0 bias");
      const float *out_w = constant(ends_[3], C, "ln_out weight"), *out_b = constant(ends_[4], C, "ln_out bias");
      const int64_t* id = ids.data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b) TORCH_CHECK(id[b] >= 0 && id[b] < V, "ids: token ids in [0, V)");
      torch::Tensor x = torch::empty({B, C}, torch::dtype(torch::kFloat32));
      float* h = x.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        float* row = h + b * C;
        const int64_t at = id[b] * C;
        switch (emb.scalar_type()) {
          case torch::kFloat32: std::copy(emb.data_ptr<float>() + at, emb.data_ptr<float>() + at + C, row); break;
          case torch::kBFloat16: widen<Bf16Weights>(reinterpret_cast<const uint16_t*>(emb.data_ptr()) + at, C, row);
            break;
          default: widen<Fp16Weights>(reinterpret_cast<const uint16_t*>(emb.data_ptr()) + at, C, row);
        }
        normalize(row, C, ln0_w, ln0_b, 1e-5f, row);
      }
      run(x, shift, wkv, shift_out, wkv_out, rescale_every);
      std::vector<float> normed(B * C);
      for (int64_t b = 0; b < B; ++b) normalize(h + b * C, C, out_w, out_b, 1e-5f, normed.data() + b * C);
      torch::Tensor out = torch::empty({B, head.size(0)}, torch::dtype(torch::kFloat32));
      if (B > 0) product(normed.data(), B, head, head_scale, 0, head.size(0), out.data_ptr<float>());
      return {std::string(), out};
    } catch (const c10::Error& e) {
      return {e.what_without_backtrace(), torch::Tensor()};
    } catch (const std::exception& e) {
      return {e.what(), torch::Tensor()};
    }
  }

  int64_t layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  template <typename W>
  static void widen(const typename W::T* p, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = W::load1(p + i);
  }

  void run(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& wkv,
           const torch::Tensor& shift_out, const torch::Tensor& wkv_out, int64_t rescale_every) const {
    const int64_t L = layers();
    TORCH_CHECK(version_ >= 4 && version_ <= 7, "cpu_kernels.DecodeStack: version 4, 5, 6 or 7");
    TORCH_CHECK(L > 0 && rescale_every >= 0, "cpu_kernels.DecodeStack: no layers, or rescale_every < 0");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous fp32 [B, C]");
    const int64_t B = x.size(0), C = x.size(1), wkv_dim = version_ == 4 ? 4 : 5;
    for (const torch::Tensor* t : {&shift, &wkv, &shift_out, &wkv_out}) {
      TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->dim() >= 2 && t->size(0) == B,
                  "state: fp32 with the batch first");
      TORCH_CHECK(block_is_contiguous(*t), "state: each sequence's block must be contiguous");
    }
    TORCH_CHECK(shift.dim() == 4 && shift.size(1) == L && shift.size(2) == 2 && shift.size(3) == C &&
                    shift_out.sizes() == shift.sizes(),
                "state: shift and shift_out [B, L, 2, C] for the stack's layers");
    TORCH_CHECK(wkv.dim() == wkv_dim && wkv.size(1) == L && wkv_out.sizes() == wkv.sizes() &&
                    (version_ == 4 ? wkv.size(2) == 3 : wkv.size(3) == wkv.size(4)),
                "state: wkv and wkv_out [B, L, 3, A] (RWKV-4) or [B, L, H, N, N] for the stack's layers");
    const int64_t H = version_ == 4 ? 1 : wkv.size(2), N = wkv.size(3);
    float* h = x.data_ptr<float>();
    std::vector<float> v_first(version_ == 7 ? B * H * N : 0);  // RWKV-7: layer 0's value, read by the others
    for (int64_t i = 0; i < L; ++i) {
      const StepState st{shift.data_ptr<float>() + i * shift.stride(1), wkv.data_ptr<float>() + i * wkv.stride(1),
                         shift_out.data_ptr<float>() + i * shift_out.stride(1),
                         wkv_out.data_ptr<float>() + i * wkv_out.stride(1), shift.stride(0), wkv.stride(0),
                         shift_out.stride(0), wkv_out.stride(0)};
      const std::vector<torch::Tensor>& t = layers_[i];
      const bool halve = rescale_every && (i + 1) % rescale_every == 0;
      if (version_ <= 5) {
        TORCH_CHECK(t.size() == 18 && t[5].dim() == 2 && t[7].dim() == 2 && in_features(t[5]) == C &&
                        in_features(t[7]) == H * N,
                    "cpu_kernels: an RWKV-4/5 layer's widths must be the state's");
        layer45(h, B, C, st, N, t, version_, n_att_, halve);
        continue;
      }
      if (version_ == 7)
        layer_v7(h, B, C, st, H, N, v_first.data(), t, i == 0);
      else
        layer_v6(h, B, C, st, H, N, t);
      if (halve)
        for (int64_t j = 0; j < B * C; ++j) h[j] *= 0.5f;  // the plain path's x / 2, exactly
    }
  }

  std::vector<std::vector<torch::Tensor>> layers_;
  int64_t version_, n_att_;
  std::vector<torch::Tensor> ends_;  // empty, or what logits() reads besides the layers
};

// Prefill of one sequence through RWKV-7's wkv, token by token (the decode step's recurrence): w (decay factor),
// r, k (scaled by k_a), v, kk (normalised), a: [T, H·N]; state [H, N, N] (value by key). Returns (y [T, H·N]
// before the group norm, new state). Heads are split over threads.
std::vector<torch::Tensor> wkv7_scan(torch::Tensor w, torch::Tensor r, torch::Tensor k, torch::Tensor v,
                                     torch::Tensor kk, torch::Tensor a, torch::Tensor state) {
  for (auto [t, name] : {std::pair{&w, "w"}, {&r, "r"}, {&k, "k"}, {&v, "v"}, {&kk, "kk"}, {&a, "a"},
                         {&state, "state"}})
    check_scan_operand(*t, name);
  TORCH_CHECK(state.dim() == 3 && state.size(1) == state.size(2), "wkv7_scan: state must be [H, N, N]");
  const int64_t H = state.size(0), N = state.size(1), A = H * N;
  TORCH_CHECK(r.dim() == 2 && r.size(1) == A, "wkv7_scan: r must be [T, H*N]");
  for (const torch::Tensor* t : {&w, &k, &v, &kk, &a})
    TORCH_CHECK(t->sizes() == r.sizes(), "wkv7_scan: w, r, k, v, kk and a must all be [T, H*N]");
  const int64_t T = r.size(0);
  torch::Tensor y = torch::empty_like(r), new_state = state.clone();
  const float *wp = w.data_ptr<float>(), *rp = r.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *kkp = kk.data_ptr<float>(), *ap = a.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *s = new_state.data_ptr<float>();
  scan_heads(H, T, N, s, [&](int64_t t, int64_t h, float* sh) {
    const int64_t at = t * A + h * N;
    wkv7_head_token(rp + at, wp + at, kp + at, vp + at, kkp + at, ap + at, sh, sh, yp + at, N);
  });
  return {y, new_state};
}

// 8 floats -> 8 bf16 (round to nearest even; the weights are finite).
inline __m128i to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

// int4 weights (w, groups as rows_product reads them) widened for a prefill's GEMM: [N, K] of q * scale + min, in
// bf16 (rounded to nearest even) or fp32. Rows are split over PyTorch's intra-op threads.
torch::Tensor int4_widen(torch::Tensor w, torch::Tensor groups, bool bf16) {
  TORCH_CHECK(w.scalar_type() == torch::kByte, "cpu_kernels.int4_widen: int4 (uint8) weights");
  check_weight(w, groups);
  const int64_t N = w.size(0), K = in_features(w), n_groups = groups.size(2), G = K / n_groups;
  torch::Tensor out = torch::empty({N, K}, w.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* packed = w.data_ptr<uint8_t>();
  const uint16_t* scales = reinterpret_cast<const uint16_t*>(groups.data_ptr());
  const __m256i low_nibble = _mm256_set1_epi32(0x0F);
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* src = packed + n * (K / 2);
      const uint16_t* g = scales + n * 2 * n_groups;
      for (int64_t k = 0; k < K; k += kInt4Block) {
        const __m256 scale = _mm256_set1_ps(_cvtsh_ss(g[k / G])), min = _mm256_set1_ps(_cvtsh_ss(g[n_groups + k / G]));
        for (int64_t j = 0; j < 32; j += 8) {  // bytes j..j+7 of the block: columns k+j.. and k+32+j..
          const __m256i bytes =
              _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k / 2 + j)));
          const __m256 low = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low_nibble)), scale, min);
          const __m256 high = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), scale, min);
          const int64_t at = n * K + k + j;
          if (bf16) {
            uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr()) + at;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), to_bf16(low));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), to_bf16(high));
          } else {
            _mm256_storeu_ps(out.data_ptr<float>() + at, low);
            _mm256_storeu_ps(out.data_ptr<float>() + at + 32, high);
          }
        }
      }
    }
  });
  return out;
}

// row[c] = now[c] · mix[c] + last[c] · keep[c] (keep = 1 - mix) over C channels: two products and a sum, each
// rounded as PyTorch's separate operators round them. Compiled with fp-contract off, so that no fused multiply-add
// replaces a product and the sum (GCC's default contracts them, and an attribute on a caller does not reach the
// lambdas it hands to parallel_for: this function is what they call).
__attribute__((optimize("fp-contract=off"), noinline))
void shift_mix_row(const float* now, const float* last, const float* mix, const float* keep, float* row, int64_t C) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    _mm256_storeu_ps(row + c, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(now + c), _mm256_loadu_ps(mix + c)),
                                            _mm256_mul_ps(_mm256_loadu_ps(last + c), _mm256_loadu_ps(keep + c))));
  for (; c < C; ++c) {
    const float a = now[c] * mix[c], b = last[c] * keep[c];
    row[c] = a + b;
  }
}

// out[p, t, c] = xx[t, c] · mix[p, c] + s[t, c] · (1 - mix[p, c]) in fp32, s the token before (prev for t = 0): the
// token-shift mixes of an RWKV-4/5 prefill (one sequence) with the bits of PyTorch's `xx * mix + shifted * (1 -
// mix)` (shift_mix_row), in one pass over xx instead of seven PyTorch operators and their [P, T, C] temporaries.
// Rows t over the threads.
torch::Tensor shift_mixes(torch::Tensor xx, torch::Tensor prev, torch::Tensor mix) {
  TORCH_CHECK(xx.dim() == 2 && xx.scalar_type() == torch::kFloat32 && xx.is_contiguous(),
              "cpu_kernels.shift_mixes: xx contiguous fp32 [T, C]");
  const int64_t T = xx.size(0), C = xx.size(1);
  TORCH_CHECK(prev.scalar_type() == torch::kFloat32 && prev.dim() == 1 && prev.size(0) == C && prev.is_contiguous(),
              "cpu_kernels.shift_mixes: prev contiguous fp32 [C]");
  TORCH_CHECK(mix.scalar_type() == torch::kFloat32 && mix.dim() == 2 && mix.size(1) == C && mix.is_contiguous(),
              "cpu_kernels.shift_mixes: mix contiguous fp32 [P, C]");
  const int64_t P = mix.size(0);
  torch::Tensor out = torch::empty({P, T, C}, xx.options());
  std::vector<float> keep(P * C);  // 1 - mix, rounded as PyTorch's subtraction rounds it
  const float* m = mix.data_ptr<float>();
  for (int64_t i = 0; i < P * C; ++i) keep[i] = 1.0f - m[i];
  const float *x = xx.data_ptr<float>(), *before = prev.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t p = 0; p < P; ++p)
        shift_mix_row(x + t * C, t == 0 ? before : x + (t - 1) * C, m + p * C, keep.data() + p * C,
                      dst + (p * T + t) * C, C);
  });
  return out;
}

// An element-wise operand of the prefill's gates (a floating CPU tensor of `like`'s shape), as a contiguous fp32 one.
torch::Tensor rows_operand(const torch::Tensor& t, const torch::Tensor& like, const std::string& what) {
  if (t.device().type() != torch::kCPU || !t.is_floating_point() || t.sizes() != like.sizes())
    refuse(what + ": floating CPU tensors of one shape");
  return t.to(torch::kFloat32).contiguous();
}

// [residual +] sigmoid(r) · y computed in fp32 from inputs of any float dtype, in one pass, the result in out_dtype
// (fp32 by default): Triton's sigmoid_gate on CPUs, the same signature. RWKV-4's receptance gate and the RWKV-4/5
// channel mix's (and RWKV-6's), with the decode step's sigmoid8 and products (layer45), so that a prefill's gates
// and a decode step's agree. Elements over the threads.
torch::Tensor sigmoid_gate(torch::Tensor r, torch::Tensor y, c10::optional<torch::Tensor> residual,
                           c10::optional<at::ScalarType> out_dtype) {
  r = rows_operand(r, y, "cpu_kernels.sigmoid_gate");
  y = rows_operand(y, y, "cpu_kernels.sigmoid_gate");
  if (residual.has_value()) residual = rows_operand(*residual, y, "cpu_kernels.sigmoid_gate");
  torch::Tensor out = torch::empty_like(y);
  const float *gate = r.data_ptr<float>(), *value = y.data_ptr<float>();
  const float* add = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, (y.numel() + 7) / 8, 2048, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * 8;
    each8(std::min(end * 8, y.numel()) - first, [&](int64_t i, Lanes l) {
      const int64_t at = first + i;
      const __m256 s = sigmoid8(l.load(gate + at));
      l.store(dst + at, add != nullptr ? _mm256_fmadd_ps(s, l.load(value + at), l.load(add + at))
                                       : _mm256_mul_ps(s, l.load(value + at)));
    });
  });
  return out_dtype.has_value() ? out.to(*out_dtype) : out;
}

// A prefill's LoRA of a few rows: activation(x @ W1) @ W2 for x [M, C] (contiguous fp32), W1 [C, R] and W2 [R, A]
// as stored (fp32 or bf16, contiguous) -> out [M, A] fp32; activation 0 none, 1 tanh, 2 sigmoid. The decode step's
// LowRank (the same products in the same order), so a bf16 factor is widened as it is read instead of copied to fp32
// for a GEMM whose set-up outweighs its few rows (RWKV-7 0.1B: ~60-70 us a product at 16 rows on a Zen 3).
torch::Tensor lora(torch::Tensor x, torch::Tensor w1, torch::Tensor w2, int64_t activation) {
  if (x.device().type() != torch::kCPU || x.scalar_type() != torch::kFloat32 || !x.is_contiguous() || x.dim() != 2)
    refuse("cpu_kernels.lora: x must be a contiguous fp32 CPU tensor [M, C]");
  if (w1.dim() != 2 || w2.dim() != 2 || w1.size(0) != x.size(1) || w2.size(0) != w1.size(1))
    refuse("cpu_kernels.lora: the factors must be [C, R] and [R, A] for x [M, C]");
  if (activation < 0 || activation > 2) refuse("cpu_kernels.lora: activation 0 (none), 1 (tanh) or 2 (sigmoid)");
  auto out = torch::empty({x.size(0), w2.size(1)}, x.options());
  LowRank low_rank(x.data_ptr<float>(), x.size(0), x.size(1), w1, w2, static_cast<int>(activation),
                   out.data_ptr<float>());
  run_together({low_rank.first()});
  run_together({low_rank.second()});
  return out;
}

// relu(x)² written over x (fp32, contiguous): relu_squared's bits, which are relu(x).square()'s, in one pass.
torch::Tensor relu_square_(torch::Tensor x) {
  if (x.device().type() != torch::kCPU || x.scalar_type() != torch::kFloat32 || !x.is_contiguous())
    refuse("cpu_kernels.relu_square_: a contiguous fp32 CPU tensor");
  float* data = x.data_ptr<float>();
  at::parallel_for(0, (x.numel() + 7) / 8, 2048, [&](int64_t begin, int64_t end) {
    relu_squared(data + begin * 8, std::min(end * 8, x.numel()) - begin * 8);
  });
  return x;
}

// An RWKV-5/6 prefill's ln_x and gate over y [T, A] (heads of A / heads values): each head of each row normalised as
// the decode step normalises it (normalize: float64 mean and variance), times silu(gate) where a gate [T, A] is
// given (RWKV-5.2, 6), the decode step's products; one pass instead of PyTorch's group norm, silu and product. Rows'
// heads over the threads.
torch::Tensor group_norm_gate(torch::Tensor y, int64_t heads, torch::Tensor weight, torch::Tensor bias, double eps,
                              c10::optional<torch::Tensor> gate) {
  if (y.dim() != 2 || heads <= 0 || y.size(1) % heads != 0)
    refuse("cpu_kernels.group_norm_gate: y [T, A] with A a multiple of heads");
  y = rows_operand(y, y, "cpu_kernels.group_norm_gate");
  const int64_t T = y.size(0), A = y.size(1), S = A / heads;
  if (weight.dim() != 1 || weight.size(0) != A) refuse("cpu_kernels.group_norm_gate: weight and bias [A]");
  weight = rows_operand(weight, weight, "cpu_kernels.group_norm_gate: weight and bias [A]");
  bias = rows_operand(bias, weight, "cpu_kernels.group_norm_gate: weight and bias [A]");
  if (gate.has_value()) gate = rows_operand(*gate, y, "cpu_kernels.group_norm_gate");
  torch::Tensor out = torch::empty_like(y);
  const float *src = y.data_ptr<float>(), *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  const float* g = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, T * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const int64_t at = (th / heads) * A + (th % heads) * S, o = (th % heads) * S;
      normalize(src + at, S, w + o, b + o, static_cast<float>(eps), dst + at);
      if (g != nullptr)
        each8(S, [&](int64_t c, Lanes l) {  // silu(g), as layer45 applies it
          const __m256 gc = l.load(g + at + c);
          l.store(dst + at + c, _mm256_mul_ps(l.load(dst + at + c), _mm256_mul_ps(gc, sigmoid8(gc))));
        });
    }
  });
  return out;
}

// 8 fp32 values stored as fp32, or rounded once to bf16 (to_bf16's rounding).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16(v)); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  *p = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// One row (b, t) of lora_shift_mixes: for each part p, dst[p · plane] = fma(last - now, mix[p] + lora[p · plane],
// now), every step in fp32 (torch.addcmul's bits where PyTorch's CPU kernel fuses them, as torch 2.13's AVX2 one
// does), the sum once rounded to Out. Lora: Fp32Weights or Bf16Weights rows, a plane apart; lora null: none (0).
template <typename Lora, typename Out>
void lora_shift_mix_row(const float* now, const float* last, const float* mix, const typename Lora::T* lora,
                        int64_t P, int64_t C, int64_t plane, Out* dst) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const __m256 x = _mm256_loadu_ps(now + c), shift = _mm256_sub_ps(_mm256_loadu_ps(last + c), x);
    for (int64_t p = 0; p < P; ++p) {
      __m256 weight = _mm256_loadu_ps(mix + p * C + c);
      if (lora != nullptr) weight = _mm256_add_ps(weight, Lora::load8(lora + p * plane + c));
      store8(dst + p * plane + c, _mm256_fmadd_ps(shift, weight, x));
    }
  }
  for (; c < C; ++c) {
    const float shift = last[c] - now[c];
    for (int64_t p = 0; p < P; ++p) {
      const float weight = lora != nullptr ? mix[p * C + c] + Lora::load1(lora + p * plane + c) : mix[p * C + c];
      store1(dst + p * plane + c, std::fma(shift, weight, now[c]));
    }
  }
}

// The token-shift mixes of an RWKV-6/7 prefill: out[p, b, t, c] = xx + (s - xx) · (mix[p, c] + lora[p, b, t, c]),
// s the token before (prev[b] for t = 0), lora fp32 or bf16 or absent (0), out fp32 or bf16 (bf16 = true: for
// products that read bf16). fp32 arithmetic, the product and sum fused and rounded once (lora_shift_mix_row): in
// one pass what PyTorch's token shift, subtraction, addition and addcmul give in four. Rows (b, t) over the threads.
torch::Tensor lora_shift_mixes(torch::Tensor xx, torch::Tensor prev, torch::Tensor mix,
                               c10::optional<torch::Tensor> lora_opt, bool bf16) {
  TORCH_CHECK(xx.dim() == 3 && xx.scalar_type() == torch::kFloat32 && xx.is_contiguous(),
              "cpu_kernels.lora_shift_mixes: xx contiguous fp32 [B, T, C]");
  const int64_t B = xx.size(0), T = xx.size(1), C = xx.size(2);
  TORCH_CHECK(prev.scalar_type() == torch::kFloat32 && prev.dim() == 2 && prev.size(0) == B && prev.size(1) == C &&
                  prev.stride(1) == 1,
              "cpu_kernels.lora_shift_mixes: prev fp32 [B, C], channels contiguous");
  TORCH_CHECK(mix.scalar_type() == torch::kFloat32 && mix.dim() == 2 && mix.size(1) == C && mix.is_contiguous(),
              "cpu_kernels.lora_shift_mixes: mix contiguous fp32 [P, C]");
  const int64_t P = mix.size(0);
  const torch::Tensor* lora = lora_opt.has_value() ? &*lora_opt : nullptr;
  if (lora != nullptr)
    TORCH_CHECK((lora->scalar_type() == torch::kFloat32 || lora->scalar_type() == torch::kBFloat16) &&
                    lora->is_contiguous() && lora->dim() == 4 && lora->size(0) == P && lora->size(1) == B &&
                    lora->size(2) == T && lora->size(3) == C,
                "cpu_kernels.lora_shift_mixes: lora contiguous fp32 or bf16 [P, B, T, C]");
  torch::Tensor out = torch::empty({P, B, T, C}, xx.options().dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const float *x = xx.data_ptr<float>(), *m = mix.data_ptr<float>(), *before = prev.data_ptr<float>();
  const int64_t plane = B * T * C, prev_stride = prev.stride(0);
  const bool bf16_lora = lora != nullptr && lora->scalar_type() == torch::kBFloat16;
  const float* lora32 = lora != nullptr && !bf16_lora ? lora->data_ptr<float>() : nullptr;
  const uint16_t* lora16 = bf16_lora ? reinterpret_cast<const uint16_t*>(lora->data_ptr()) : nullptr;
  float* out32 = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* out16 = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T, at = row * C;
      const float* last = t == 0 ? before + b * prev_stride : x + at - C;
      if (bf16_lora) {
        if (bf16) lora_shift_mix_row<Bf16Weights>(x + at, last, m, lora16 + at, P, C, plane, out16 + at);
        else lora_shift_mix_row<Bf16Weights>(x + at, last, m, lora16 + at, P, C, plane, out32 + at);
      } else {
        const float* l = lora32 != nullptr ? lora32 + at : nullptr;
        if (bf16) lora_shift_mix_row<Fp32Weights>(x + at, last, m, l, P, C, plane, out16 + at);
        else lora_shift_mix_row<Fp32Weights>(x + at, last, m, l, P, C, plane, out32 + at);
      }
    }
  });
  return out;
}

// What both GEMMs refuse (the operands as every product checks them, the weight's dtype, rows or columns in part
// panels or blocks), and their output [M, N] (not initialised: every tile writes its part).
torch::Tensor gemm_output(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale,
                          torch::ScalarType dtype, const std::string& name) {
  check_operands(x, w, scale, true);
  if (w.scalar_type() != dtype) refuse(name + ": " + (dtype == torch::kInt8 ? "int8" : "int4 (uint8)") + " weights only");
  if (x.size(1) % kGemmBlock != 0 || w.size(0) % kPanelRows != 0)
    refuse(name + ": K and N must be multiples of 32");
  return torch::empty({x.size(0), w.size(0)}, x.options().dtype(torch::kFloat32));
}

// A GEMM's rows as run_gemm reads them (x checked by gemm_output).
GemmInput gemm_input(const torch::Tensor& x) {
  if (x.scalar_type() == torch::kBFloat16) return {nullptr, reinterpret_cast<const uint16_t*>(x.data_ptr())};
  return {x.data_ptr<float>(), nullptr};
}

// The int8 GEMM above, for a prefill's many rows: x fp32 or bf16 [M, K] (GemmInput), w int8 [N, K] with its fp32
// scale per row; K and N multiples of 32; on the VNNI tiles under set_int8_product(1), the AVX-VNNI ones under
// set_int8_product(2), else on the AVX2 ones (the same bits). Panels of W are split over PyTorch's intra-op threads.
torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  torch::Tensor out = gemm_output(x, w, scale, torch::kInt8, "cpu_kernels.int8_gemm");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (out.numel() == 0 || K == 0) return out.zero_();
  struct Prepare {
    const int8_t* w;
    const float* scale;
    int64_t K;
    int path;
    std::pair<std::vector<int8_t>, std::vector<int32_t>> buffers() const {
      return {std::vector<int8_t>(kPanelBytesAvx2 * K), std::vector<int32_t>(kPanelRows * (K / kGemmBlock))};
    }
    void operator()(int64_t n0, std::pair<std::vector<int8_t>, std::vector<int32_t>>& b, GemmPanel& panel) const {
      if (path == kInt8Vnni) {
        pack_panel(w + n0 * K, K, b.first.data(), b.second.data());
      } else if (path == kInt8AvxVnni) {
        pack_panel_avx2<false>(w + n0 * K, K, b.first.data());
        pack_neg_avxvnni(b.first.data(), K, b.second.data());
      } else {
        pack_panel_avx2<true>(w + n0 * K, K, b.first.data());
      }
      panel = {b.first.data(), b.second.data(), scale + n0, nullptr, nullptr, 1};
    }
  };
  const Prepare prepare{w.data_ptr<int8_t>(), scale.data_ptr<float>(), K, g_int8_product.load()};
  if (prepare.path == kInt8Vnni)
    run_gemm<false, kInt8Vnni>(gemm_input(x), M, K, N, out.data_ptr<float>(), prepare);
  else if (prepare.path == kInt8AvxVnni)
    run_gemm<false, kInt8AvxVnni>(gemm_input(x), M, K, N, out.data_ptr<float>(), prepare);
  else
    run_gemm<false, kInt8Avx2>(gemm_input(x), M, K, N, out.data_ptr<float>(), prepare);
  return out;
}

// The same GEMM for int4 weights (uint8 [N, K/2] with fp16 (scale, min) groups [N, 2, K/G], kernels/quant.py's
// packing): each panel's nibbles unpacked to int8 (0..15) and packed as int8 weights are, its groups' scales and
// mins widened to fp32; N a multiple of 32; the activations' blocks 64 columns (kActBlock), their rounding that
// of the int4 decode products (int4_rows: a prompt and a decode step round a row alike). Both terms of
// w = q · scale + min meet the same rounded activations (the min's through each block's step · Σ q), so the result
// is the product of the rounded activations with the dequantised weights, and the bound is int8_gemm's with w in
// place of the int8 weight and blocks of 64 columns. (Exact Σ x for the min's
// term left the error at (x̃ - x) · q · scale, all of one sign for q · scale ≥ 0: on the trained RWKV-4 tiny model
// the argmax agreement with fp32 fell 0.979 -> 0.968.)
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor groups) {
  torch::Tensor out = gemm_output(x, w, groups, torch::kByte, "cpu_kernels.int4_gemm");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), n_groups = groups.size(2);
  if (out.numel() == 0 || K == 0) return out.zero_();
  struct Buffers {
    std::vector<int8_t> rows, packed;
    std::vector<int32_t> neg;
    std::vector<float> scales, mins;
  };
  struct Prepare {
    const uint8_t* w;
    const uint16_t* groups;
    int64_t K, n_groups;
    int path;
    Buffers buffers() const {
      return {std::vector<int8_t>(path == kInt8Vnni ? 0 : kPanelRows * K), std::vector<int8_t>(kPanelRows * K),
              std::vector<int32_t>(kPanelRows * (K / kInt4Block)), std::vector<float>(kPanelRows * n_groups),
              std::vector<float>(kPanelRows * n_groups)};
    }
    void operator()(int64_t n0, Buffers& b, GemmPanel& panel) const {
      if (path == kInt8Vnni) {
        pack_panel_int4(w + n0 * (K / 2), K, b.packed.data(), b.neg.data());
        panel_groups(groups + n0 * 2 * n_groups, n_groups, b.scales.data(), b.mins.data());
      } else {
        const __m256i low_nibble = _mm256_set1_epi8(0x0F);
        for (int64_t r = 0; r < kPanelRows; ++r) {
          const uint8_t* src = w + (n0 + r) * (K / 2);
          int8_t* dst = b.rows.data() + r * K;
          for (int64_t k = 0; k < K; k += kInt4Block) {  // 32 bytes: columns k .. k + 31 low, k + 32 .. k + 63 high
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k / 2));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm256_and_si256(bytes, low_nibble));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k + 32),
                                _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibble));
          }
          const uint16_t* g = groups + (n0 + r) * 2 * n_groups;
          for (int64_t i = 0; i < n_groups; ++i) {
            b.scales[i * kPanelRows + r] = _cvtsh_ss(g[i]);
            b.mins[i * kPanelRows + r] = _cvtsh_ss(g[n_groups + i]);
          }
        }
        pack_panel_avx2<false>(b.rows.data(), K, b.packed.data());
      }
      panel = {b.packed.data(), b.neg.data(), nullptr, b.scales.data(), b.mins.data(), K / n_groups / kInt4Block};
    }
  };
  const Prepare prepare{w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(groups.data_ptr()), K, n_groups,
                        g_int8_product.load()};
  const int64_t group_blocks = K / n_groups / kInt4Block;
  if (prepare.path == kInt8Vnni)
    run_gemm<true, kInt8Vnni>(gemm_input(x), M, K, N, out.data_ptr<float>(), prepare, group_blocks);
  else if (prepare.path == kInt8AvxVnni)
    run_gemm<true, kInt8AvxVnni>(gemm_input(x), M, K, N, out.data_ptr<float>(), prepare, group_blocks);
  else
    run_gemm<true, kInt8Avx2>(gemm_input(x), M, K, N, out.data_ptr<float>(), prepare, group_blocks);
  return out;
}

torch::Tensor rows_product(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale_opt) {
  torch::Tensor scale = scale_opt.has_value() ? *scale_opt : torch::Tensor();
  check_operands(x, w, scale);
  const int64_t M = x.size(0), N = w.size(0);
  torch::Tensor out = torch::empty({M, N}, x.options());
  if (M > 0 && N > 0) product(x.data_ptr<float>(), M, w, scale, 0, N, out.data_ptr<float>());
  return out;
}

// Whether the AVX-VNNI tiles can run here: compiled with the instructions (RWKV_AVX_VNNI) and the CPU has them
// (CPUID leaf 7, subleaf 1: EAX bit 4; the OS's AVX state is the AVX2 this whole file needs).
// Asked once (a CPUID is a VM exit in a guest; runs_gemm asks before every product of many rows).
bool avx_vnni_runs() {
#if RWKV_AVX_VNNI
  static const bool runs = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 4)) != 0;
  }();
  return runs;
#else
  return false;
#endif
}

// Which integer products run (0: AVX2, int8 through vpmaddwd and int4 through pmaddubsw; 1: AVX512-VNNI, int8
// through vpdpwssd, int4 through vpdpbusd; 2: the GEMMs on AVX-VNNI's vpdpbusd, the rest as 0); the caller checks
// that the CPU has what it picks (cpu_kernels.configure), and 2 is refused here on a CPU without AVX-VNNI.
void set_int8_product(int64_t which) {
  TORCH_CHECK(which == kInt8Avx2 || which == kInt8Vnni || which == kInt8AvxVnni,
              "cpu_kernels: int8 product 0 (avx2), 1 (vnni) or 2 (avx_vnni)");
  TORCH_CHECK(which != kInt8AvxVnni || avx_vnni_runs(), "cpu_kernels: AVX-VNNI needs a CPU and a compiler with it");
  g_int8_product.store(static_cast<int>(which));
}

int64_t int8_product() { return g_int8_product.load(); }

void set_prefetch_bytes(int64_t bytes, int64_t rows_below, bool to_l2) {
  TORCH_CHECK(bytes >= 0 && bytes <= (1 << 20), "cpu_kernels: the prefetch distance is 0..1 MiB");
  TORCH_CHECK(rows_below >= 0, "cpu_kernels: rows_below must be >= 0 (0: every row)");
  g_prefetch_rows_below.store(rows_below);
  g_prefetch_bytes.store(bytes);
  g_prefetch_l2.store(to_l2);
}

int64_t prefetch_bytes() { return g_prefetch_bytes.load(); }

int64_t prefetch_rows_below() { return g_prefetch_rows_below.load(); }

bool prefetch_to_l2() { return g_prefetch_l2.load(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("avx_vnni_runs", &avx_vnni_runs, "whether set_int8_product(2) (the AVX-VNNI GEMMs) can run here");
  m.def("set_int8_product", &set_int8_product, "which int8/int4 products run: 0 AVX2, 1 AVX512-VNNI, 2 AVX-VNNI GEMMs");
  m.def("int8_product", &int8_product, "which int8 product runs now");
  m.def("set_prefetch_bytes", &set_prefetch_bytes, py::arg("bytes"), py::arg("rows_below") = 0,
        py::arg("to_l2") = false,
        "how far ahead the products of few rows prefetch weights (0: off), for weight rows shorter than rows_below "
        "bytes (0: every row), into L2 only with to_l2 (else into L1 too)");
  m.def("prefetch_bytes", &prefetch_bytes, "the prefetch distance now, in bytes");
  m.def("prefetch_to_l2", &prefetch_to_l2, "whether the prefetches fill L2 only (prefetcht1), not L1 too");
  m.def("prefetch_rows_below", &prefetch_rows_below, "the weight rows prefetched: shorter than this (0: all)");
  py::class_<DecodeStack>(m, "DecodeStack", "every layer of a decode step in one call")
      .def(py::init<std::vector<std::vector<torch::Tensor>>, int64_t, int64_t, std::vector<torch::Tensor>>(),
           py::arg("layers"), py::arg("version"), py::arg("n_att") = 0,
           py::arg("ends") = std::vector<torch::Tensor>())
      .def("step", &DecodeStack::step, py::arg("x"), py::arg("shift"), py::arg("wkv"), py::arg("shift_out"),
           py::arg("wkv_out"), py::arg("rescale_every") = 0,
           "x [B, C] after ln0 (overwritten), states [B, L, ...] -> '' or why it refused")
      .def("logits", &DecodeStack::logits, py::arg("ids"), py::arg("shift"), py::arg("wkv"), py::arg("shift_out"),
           py::arg("wkv_out"), py::arg("rescale_every") = 0,
           "token ids [B], states [B, L, ...] -> ('', logits [B, V]) or (why it refused, None)")
      .def_property_readonly("layers", &DecodeStack::layers);
  m.def("wkv4_scan", &wkv4_scan, "RWKV-4 wkv over T tokens of one sequence: (wkv [T, C], new state [3, C])");
  m.def("wkv5_scan", &wkv5_scan, "RWKV-5 wkv over T tokens of one sequence: (out [T, A], new state [H, S, S])");
  m.def("wkv7_scan", &wkv7_scan, "RWKV-7 wkv over T tokens of one sequence: (y [T, A], new state [H, N, N])");
  m.def("int4_widen", &int4_widen, "int4 weights -> [N, K] bf16 (bf16=True) or fp32, for a prefill's GEMM");
  m.def("shift_mixes", &shift_mixes, py::arg("xx"), py::arg("prev"), py::arg("mix"),
        "fp32 [P, T, C] token-shift mixes xx * mix[p] + shifted * (1 - mix[p]) of an RWKV-4/5 prefill");
  m.def("sigmoid_gate", &sigmoid_gate, py::arg("r"), py::arg("y"), py::arg("residual") = py::none(),
        py::arg("out_dtype") = py::none(), "fp32 [residual +] sigmoid(r) * y in one pass (a prefill's gates)");
  m.def("relu_square_", &relu_square_, py::arg("x"), "relu(x)^2 written over fp32 x, in one pass");
  m.def("lora", &lora, py::arg("x"), py::arg("w1"), py::arg("w2"), py::arg("activation"),
        "a prefill's LoRA of a few rows: activation(x @ w1) @ w2, fp32 or bf16 factors as stored (0 none, 1 tanh, "
        "2 sigmoid)");
  m.def("group_norm_gate", &group_norm_gate, py::arg("y"), py::arg("heads"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("gate") = py::none(),
        "an RWKV-5 prefill's ln_x (each head of each row normalised) times silu(gate) where given, in one pass");
  m.def("lora_shift_mixes", &lora_shift_mixes, py::arg("xx"), py::arg("prev"), py::arg("mix"), py::arg("lora"),
        py::arg("bf16"), "fp32/bf16 [P, B, T, C] token-shift mixes xx + (shift - xx) * (mix[p] + lora[p]) (RWKV-6/7)");
  m.def("int8_gemm", &int8_gemm,
        "out[M, N] = x[M, K] · (W · scale)ᵀ for many rows: int8 weights, int8 activations a step per 32 columns");
  m.def("int4_gemm", &int4_gemm, "int8_gemm for int4 weights with their (scale, min) groups");
  m.def("rows_product", &rows_product,
        "out[M, N] = x[M, K] · Wᵀ for few rows (fp32/bf16/fp16, int8 with row scales, int4 with group scale/min)");
}
