// Arithmetic ceilings of an x86-64 AVX2 CPU, for benchmarks/bench_cpu_bound.py (built only by that benchmark).
//
// What this file promises:
// - Each *_peak(iters, threads) runs a register-only loop of one instruction pattern on `threads` OpenMP
//   threads and returns the multiply-accumulates per second of all threads together, in GMAC/s. The loops
//   are inline assembly, so no compiler can hoist, merge or spill them: 10 independent accumulators, every
//   instruction a different destination. The patterns are the inner loops a matrix product can use on AVX2:
//     fp32_fma_peak    vfmadd231ps              8 MACs an instruction (fp32)
//     int16_madd_peak  vpmaddwd + vpaddd        16 MACs a pair (16-bit operands, exact 32-bit sums)
//     u8s8_madd_peak   vpmaddubsw + vpaddw      32 MACs a pair (8-bit operands, saturating 16-bit sums: an
//                                               upper bound for any 8-bit product, not a usable one)
// - int16_tile_rate(reps, threads) runs a complete 4×24 int16 GEMM micro-kernel (12 accumulators, one
//   broadcast and three product loads a row and pair, K = 768) on operands that stay in L1, checks its sums
//   against a scalar loop once, and returns GMAC/s. It is what a real int16 GEMM could at best sustain here.
#include <torch/extension.h>
#include <omp.h>

#include <chrono>
#include <cstdint>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <vector>

namespace {

#if !defined(__x86_64__)
#error "cpu_bounds.cpp measures x86-64 AVX2 instructions"
#endif

using Clock = std::chrono::steady_clock;

#define RWKV_TEN(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9)
#define RWKV_CLOBBER_ALL "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                         "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

// A registers-only loop, n times: `setup`, then `pattern(i)` into accumulator i for i = 0..9.
#define RWKV_PEAK_LOOP(function, setup, pattern)                                                      \
  void function(int64_t n) {                                                                         \
    __asm__ volatile(setup "1:\n" RWKV_TEN(pattern) "dec %0\n jnz 1b\n" : "+r"(n) : : RWKV_CLOBBER_ALL); \
  }

#define RWKV_FMA(i) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #i "\n"
// vpmaddwd into a temporary, vpaddd into accumulator i
#define RWKV_MADD(i) "vpmaddwd %%ymm14, %%ymm15, %%ymm12\n vpaddd %%ymm12, %%ymm" #i ", %%ymm" #i "\n"
// vpmaddubsw into a temporary, vpaddw into accumulator i
#define RWKV_MADDUBS(i) "vpmaddubsw %%ymm14, %%ymm15, %%ymm12\n vpaddw %%ymm12, %%ymm" #i ", %%ymm" #i "\n"
#define RWKV_ZERO_OPERANDS "vpxor %%ymm14, %%ymm14, %%ymm14\n vpxor %%ymm15, %%ymm15, %%ymm15\n"

RWKV_PEAK_LOOP(fp32_fma_loop, RWKV_ZERO_OPERANDS, RWKV_FMA)
RWKV_PEAK_LOOP(int16_madd_loop, RWKV_ZERO_OPERANDS, RWKV_MADD)
RWKV_PEAK_LOOP(u8s8_madd_loop, RWKV_ZERO_OPERANDS, RWKV_MADDUBS)

// out[4][24] = Σ_p a[p][m] (two int16) · b[p][column pair] (48 int16): A pairs broadcast, B read from memory.
void int16_tile(const int32_t* a, const int16_t* b, int64_t pairs, int32_t* out) {
  __asm__ volatile(
#define RWKV_ZERO(i) "vpxor %%ymm" #i ", %%ymm" #i ", %%ymm" #i "\n"
      RWKV_ZERO(0) RWKV_ZERO(1) RWKV_ZERO(2) RWKV_ZERO(3) RWKV_ZERO(4) RWKV_ZERO(5)
      RWKV_ZERO(6) RWKV_ZERO(7) RWKV_ZERO(8) RWKV_ZERO(9) RWKV_ZERO(10) RWKV_ZERO(11)
      "1:\n"
#define RWKV_ROW(m, c0, c1, c2)                                                            \
      "vpbroadcastd " #m "*4(%0), %%ymm12\n"                                               \
      "vpmaddwd (%1), %%ymm12, %%ymm13\n vpaddd %%ymm13, %%ymm" #c0 ", %%ymm" #c0 "\n"     \
      "vpmaddwd 32(%1), %%ymm12, %%ymm14\n vpaddd %%ymm14, %%ymm" #c1 ", %%ymm" #c1 "\n"   \
      "vpmaddwd 64(%1), %%ymm12, %%ymm15\n vpaddd %%ymm15, %%ymm" #c2 ", %%ymm" #c2 "\n"
      RWKV_ROW(0, 0, 1, 2) RWKV_ROW(1, 3, 4, 5) RWKV_ROW(2, 6, 7, 8) RWKV_ROW(3, 9, 10, 11)
      "add $16, %0\n add $96, %1\n dec %2\n jnz 1b\n"
#define RWKV_STORE(i) "vmovdqu %%ymm" #i ", " #i "*32(%3)\n"
      RWKV_STORE(0) RWKV_STORE(1) RWKV_STORE(2) RWKV_STORE(3) RWKV_STORE(4) RWKV_STORE(5)
      RWKV_STORE(6) RWKV_STORE(7) RWKV_STORE(8) RWKV_STORE(9) RWKV_STORE(10) RWKV_STORE(11)
      : "+r"(a), "+r"(b), "+r"(pairs) : "r"(out) : "memory", RWKV_CLOBBER_ALL);
}

template <typename Loop>
double rate(Loop loop, int64_t iters, int64_t threads, double macs_per_iter) {
  if (iters < 1 || threads < 1) throw std::invalid_argument("iters and threads must be positive");
  const auto start = Clock::now();
#pragma omp parallel num_threads(static_cast<int>(threads))
  loop(iters);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return static_cast<double>(threads) * static_cast<double>(iters) * macs_per_iter / seconds / 1e9;
}

constexpr int64_t kTilePairs = 384;  // K = 768

struct TileOperands {  // cache-line aligned, as a packed GEMM panel would be: no load splits a line
  alignas(64) int32_t a[kTilePairs * 4];
  alignas(64) int16_t b[kTilePairs * 48];
  TileOperands() {
    for (size_t i = 0; i < std::size(a); ++i) a[i] = static_cast<int32_t>((i * 2654435761u) & 0x3fff3fffu) - 0x20002000;
    for (size_t i = 0; i < std::size(b); ++i) b[i] = static_cast<int16_t>(static_cast<int>((i * 40503u) % 16384) - 8192);
  }
};

void check_tile(const TileOperands& ops) {
  std::vector<int32_t> out(96);
  int16_tile(ops.a, ops.b, kTilePairs, out.data());
  for (int m = 0; m < 4; ++m) {
    for (int c = 0; c < 24; ++c) {
      int64_t sum = 0;
      for (int64_t p = 0; p < kTilePairs; ++p) {
        const auto* pair = reinterpret_cast<const int16_t*>(&ops.a[p * 4 + m]);
        const int16_t* col = &ops.b[p * 48 + (c / 8) * 16 + 2 * (c % 8)];
        sum += int64_t{pair[0]} * col[0] + int64_t{pair[1]} * col[1];
      }
      if (static_cast<int32_t>(sum) != out[m * 24 + c]) throw std::runtime_error("int16 tile: wrong sums");
    }
  }
}

double fp32_fma_peak(int64_t iters, int64_t threads) { return rate(fp32_fma_loop, iters, threads, 10 * 8); }
double int16_madd_peak(int64_t iters, int64_t threads) { return rate(int16_madd_loop, iters, threads, 10 * 16); }
double u8s8_madd_peak(int64_t iters, int64_t threads) { return rate(u8s8_madd_loop, iters, threads, 10 * 32); }

double int16_tile_rate(int64_t reps, int64_t threads) {
  const auto holder = std::make_unique<TileOperands>();
  const TileOperands& ops = *holder;
  check_tile(ops);
  auto loop = [&ops](int64_t n) {
    std::vector<int32_t> out(96);
    for (int64_t r = 0; r < n; ++r) int16_tile(ops.a, ops.b, kTilePairs, out.data());
  };
  return rate(loop, reps, threads, 4.0 * 24 * 2 * kTilePairs);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fp32_fma_peak", &fp32_fma_peak, "GMAC/s of a register-only vfmadd231ps loop");
  m.def("int16_madd_peak", &int16_madd_peak, "GMAC/s of a register-only vpmaddwd + vpaddd loop");
  m.def("u8s8_madd_peak", &u8s8_madd_peak, "GMAC/s of a register-only vpmaddubsw + vpaddw loop");
  m.def("int16_tile_rate", &int16_tile_rate, "GMAC/s of a 4x24 int16 GEMM micro-kernel on L1 operands");
}
