// bdh_fast::tensor_stats: schema and CPU kernel.
//
//   tensor_stats(Tensor x, int bins) -> (Tensor stats, Tensor hist)
//
// stats (float64[9]): count, sum, sum_sq, min, max, nonzero, absmax, nan_count, inf_count
// hist  (int64[bins]): equal-width buckets over [min, max] of the finite elements
//
// The rules (NaN/Inf/empty, bucket edges) are written once, in bdh_fast/ops.py; this kernel,
// the pure-PyTorch reference there and the Triton kernels in bdh_fast/triton_stats.py follow them
// and the tests hold them to it. In short: value statistics and the histogram see only finite
// elements; `count` and `nonzero` see every element; NaN and +-Inf are counted apart.
//
// Pass 1 (statistics) reads x once. The work is cut into fixed chunks of kChunk elements, so
// each chunk's partial, and so the result, is the same bit for bit whatever the thread count.
// A chunk is walked in blocks of kBlock elements held in vector lanes (min/max/counts in the
// input's float width, sums always in float64), folded into the chunk's float64 partial; the
// chunk partials are then combined in chunk order.
//
// Pass 2 (histogram) computes bucket indices in float64 with exactly the reference's arithmetic,
// so bucket assignment agrees bit for bit, and counts them into per-thread histograms (four
// interleaved copies, so runs of equal indices do not serialise on one counter) merged at the end.
//
// setup.py builds without -march flags, so the hot loops are compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2) and baseline x86-64 and the best one is picked at load time.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#include <immintrin.h>
#define BDH_X86_MULTIVERSION 1
// Auto-vectorised loops: GCC clones the function per target and picks one at load time.
#define BDH_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BDH_X86_MULTIVERSION 0
#define BDH_MULTIVERSION
#endif
#define BDH_INLINE inline __attribute__((always_inline))

namespace bdh_fast {
namespace {

constexpr int64_t kNumStats = 9;
constexpr int64_t kChunk = int64_t{1} << 16;  // elements per parallel work item
constexpr int64_t kBlock = 4096;              // elements per block (16 KiB of fp32: stays in L1)
constexpr int kLanes = 16;                    // accumulators of the auto-vectorised fp64 path

// Helpers instead of std::min/std::max/c10's conversions: GCC inlines a default-target function
// into the target_clones copies only when it is always_inline; otherwise every element would
// pay a call.
template <typename T>
BDH_INLINE T min_of(T a, T b) { return b < a ? b : a; }
template <typename T>
BDH_INLINE T max_of(T a, T b) { return b > a ? b : a; }
BDH_INLINE float abs_of(float v) { return __builtin_fabsf(v); }
BDH_INLINE double abs_of(double v) { return __builtin_fabs(v); }

BDH_INLINE float bits_to_float(uint32_t bits) {
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}
BDH_INLINE uint32_t float_to_bits(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof bits);
  return bits;
}

BDH_INLINE float to_float(float v) { return v; }
BDH_INLINE double to_float(double v) { return v; }

// bfloat16 is the top half of a float32.
BDH_INLINE float to_float(c10::BFloat16 h) { return bits_to_float(static_cast<uint32_t>(h.x) << 16); }

// IEEE half -> float without branches, so the widening loop vectorises. Normal numbers: shift
// exponent and mantissa into float position and rebias the exponent (15 -> 127) by adding 224 to
// it and multiplying by 2^-112; Inf/NaN come out with an all-ones exponent, which the multiply
// keeps. Subnormal halves (exponent 0) are built exactly as (0.5 + m * 2^-24) - 0.5.
BDH_INLINE float to_float(c10::Half h) {
  const uint32_t w = static_cast<uint32_t>(h.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // drops the sign
  const float normal = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(subnormal) : float_to_bits(normal);
  return bits_to_float(sign | magnitude);
}

// One chunk's (or the whole tensor's) share of pass 1.
struct Partial {
  double sum = 0.0;
  double sum_sq = 0.0;
  double min = std::numeric_limits<double>::infinity();   // finite elements only
  double max = -std::numeric_limits<double>::infinity();  // finite elements only
  int64_t nonzero = 0;
  int64_t nan = 0;
  int64_t nonfinite = 0;  // NaN and +-Inf
};

// One element, straight into p: block tails, and the rules of the vector paths in scalar form.
template <typename T>
BDH_INLINE void accumulate_one(T v, Partial& p) {
  const bool finite = abs_of(v) <= std::numeric_limits<T>::max();  // false for NaN and +-Inf
  const double d = finite ? static_cast<double>(v) : 0.0;
  p.sum += d;
  p.sum_sq += d * d;
  p.min = finite ? min_of(p.min, d) : p.min;
  p.max = finite ? max_of(p.max, d) : p.max;
  p.nonzero += static_cast<int64_t>(v != T(0));  // NaN counts as non-zero (torch.count_nonzero)
  p.nan += static_cast<int64_t>(v != v);
  p.nonfinite += static_cast<int64_t>(!finite);
}

// ---- pass 1, float32 blocks (fp32, and bf16/fp16 after widening) ------------------------------
//
// Written with GCC vector extensions: the auto-vectoriser will not mix float32 lanes with the
// float64 sums (a float32 square overflows above 1.8e19, so the sums must be float64). GCC lowers
// a vector type for the target the function is *parsed* for, and scalarises vectors wider than
// the target's registers, so target_clones (or a default-target helper inlined into the clones)
// would scalarise it. Instead this macro stamps out one copy per target, each with vectors of
// that target's register width, and a function pointer picks one at load time.
typedef float f32x16 __attribute__((vector_size(64)));  // x86-64-v4: AVX-512
typedef double f64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));  // x86-64-v3: AVX2
typedef double f64x4 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));  // baseline: SSE2 (and other CPUs)
typedef double f64x2 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));

// The low and high halves of float32 vector V, widened to float64 vectors A and B. For AVX-512,
// GCC 12 turns the generic form into four 128-bit conversions and shuffles; two intrinsics do it
// ~1.5x faster.
#define BDH_WIDEN_X16(V, A, B)                                                                        \
  const f64x8 A = (f64x8)_mm512_cvtps_pd(_mm512_castps512_ps256((__m512)V));                          \
  const f64x8 B = (f64x8)_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd((__m512d)V, 1)));
#define BDH_WIDEN_X8(V, A, B)                                                                         \
  const f64x4 A = __builtin_convertvector(__builtin_shufflevector(V, V, 0, 1, 2, 3), f64x4);          \
  const f64x4 B = __builtin_convertvector(__builtin_shufflevector(V, V, 4, 5, 6, 7), f64x4);
#define BDH_WIDEN_X4(V, A, B)                                                                         \
  const f64x2 A = __builtin_convertvector(__builtin_shufflevector(V, V, 0, 1), f64x2);                \
  const f64x2 B = __builtin_convertvector(__builtin_shufflevector(V, V, 2, 3), f64x2);

// Branch-free: a non-finite element adds 0 to the sums and leaves min/max alone. Comparisons
// give -1 (true) or 0 per lane.
#define BDH_DEFINE_ACCUMULATE_BLOCK_F32(NAME, TARGET_ATTR, LANES, F32, F64, I32, WIDEN)               \
  TARGET_ATTR void NAME(const float* x, int64_t n, Partial& p) {                                      \
    constexpr float kInf = std::numeric_limits<float>::infinity();                                    \
    F64 sum_a = {}, sum_b = {}, sum_sq_a = {}, sum_sq_b = {};                                         \
    F32 lo = F32{} + kInf;                                                                            \
    F32 hi = F32{} - kInf;                                                                            \
    I32 nonzero = {}, nan = {}, nonfinite = {};                                                       \
    int64_t i = 0;                                                                                    \
    for (; i + LANES <= n; i += LANES) {                                                              \
      F32 v;                                                                                          \
      __builtin_memcpy(&v, x + i, sizeof v);                                                          \
      const I32 bits = (I32)v;                                                                        \
      const I32 finite = (bits & 0x7fffffff) < 0x7f800000; /* exponent not all ones */                \
      const F32 v_sum = (F32)(bits & finite);               /* 0.0 where not finite */                \
      WIDEN(v_sum, a, b)                                                                              \
      sum_a += a;                                                                                     \
      sum_b += b;                                                                                     \
      sum_sq_a += a * a;                                                                              \
      sum_sq_b += b * b;                                                                              \
      lo = (finite & (v < lo)) ? v : lo;                                                              \
      hi = (finite & (v > hi)) ? v : hi;                                                              \
      nonzero -= (v != 0.0f); /* NaN counts as non-zero (torch.count_nonzero) */                      \
      nan -= (v != v);                                                                                \
      nonfinite += finite + 1; /* -1 + 1 for finite, 0 + 1 otherwise */                               \
    }                                                                                                 \
    for (int l = 0; l < LANES / 2; ++l) {                                                             \
      p.sum += sum_a[l] + sum_b[l];                                                                   \
      p.sum_sq += sum_sq_a[l] + sum_sq_b[l];                                                          \
    }                                                                                                 \
    for (int l = 0; l < LANES; ++l) {                                                                 \
      p.min = min_of(p.min, static_cast<double>(lo[l]));                                              \
      p.max = max_of(p.max, static_cast<double>(hi[l]));                                              \
      p.nonzero += nonzero[l];                                                                        \
      p.nan += nan[l];                                                                                \
      p.nonfinite += nonfinite[l];                                                                    \
    }                                                                                                 \
    for (; i < n; ++i) accumulate_one(x[i], p);                                                       \
  }

using AccumulateBlockF32 = void (*)(const float*, int64_t, Partial&);

BDH_DEFINE_ACCUMULATE_BLOCK_F32(accumulate_block_f32_baseline, , 4, f32x4, f64x2, i32x4, BDH_WIDEN_X4)
#if BDH_X86_MULTIVERSION
#define BDH_TARGET(ISA) __attribute__((target("arch=" ISA)))
BDH_DEFINE_ACCUMULATE_BLOCK_F32(accumulate_block_f32_v3, BDH_TARGET("x86-64-v3"), 8, f32x8, f64x4, i32x8, BDH_WIDEN_X8)
BDH_DEFINE_ACCUMULATE_BLOCK_F32(accumulate_block_f32_v4, BDH_TARGET("x86-64-v4"), 16, f32x16, f64x8, i32x16,
                                BDH_WIDEN_X16)
#endif

// The best copy this CPU runs. BDH_FAST_CPU_ISA=baseline or x86-64-v3 picks a lower one, so
// the tests can check every copy on one machine.
AccumulateBlockF32 pick_accumulate_block_f32() {
  const char* forced = std::getenv("BDH_FAST_CPU_ISA");
  const std::string cap = forced ? forced : "";
  if (cap == "baseline") return accumulate_block_f32_baseline;
#if BDH_X86_MULTIVERSION
  __builtin_cpu_init();
  if (cap != "x86-64-v3" && __builtin_cpu_supports("x86-64-v4")) return accumulate_block_f32_v4;
  if (__builtin_cpu_supports("x86-64-v3")) return accumulate_block_f32_v3;
#endif
  return accumulate_block_f32_baseline;
}

const AccumulateBlockF32 accumulate_block_f32 = pick_accumulate_block_f32();

// ---- pass 1, float64 blocks ---------------------------------------------------------------------
// All lanes are float64 (counters int64), one width throughout: a shape GCC vectorises by itself.
BDH_INLINE void accumulate_block_f64(const double* x, int64_t n, Partial& p) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  constexpr double kMaxFinite = std::numeric_limits<double>::max();
  double sum[kLanes], sum_sq[kLanes], lo[kLanes], hi[kLanes];
  int64_t nonzero[kLanes], nan[kLanes], nonfinite[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    sum[l] = sum_sq[l] = 0.0;
    lo[l] = kInf;
    hi[l] = -kInf;
    nonzero[l] = nan[l] = nonfinite[l] = 0;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = x[i + l];
      const bool finite = abs_of(v) <= kMaxFinite;
      const double v_sum = finite ? v : 0.0;
      sum[l] += v_sum;
      sum_sq[l] += v_sum * v_sum;
      lo[l] = min_of(lo[l], finite ? v : kInf);
      hi[l] = max_of(hi[l], finite ? v : -kInf);
      nonzero[l] += static_cast<int64_t>(v != 0.0);
      nan[l] += static_cast<int64_t>(v != v);
      nonfinite[l] += static_cast<int64_t>(!finite);
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    p.sum += sum[l];
    p.sum_sq += sum_sq[l];
    p.min = min_of(p.min, lo[l]);
    p.max = max_of(p.max, hi[l]);
    p.nonzero += nonzero[l];
    p.nan += nan[l];
    p.nonfinite += nonfinite[l];
  }
  for (; i < n; ++i) accumulate_one(x[i], p);
}

BDH_MULTIVERSION void chunk_stats_f64(const double* x, int64_t n, Partial& p) {
  for (int64_t i = 0; i < n; i += kBlock) accumulate_block_f64(x + i, min_of(kBlock, n - i), p);
}

// bf16/fp16 are widened a block at a time into a float32 buffer on the stack.
BDH_MULTIVERSION void widen_block(const c10::BFloat16* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(x[i]);
}
BDH_MULTIVERSION void widen_block(const c10::Half* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_float(x[i]);
}

void chunk_stats(const float* x, int64_t n, Partial& p) {
  for (int64_t i = 0; i < n; i += kBlock) accumulate_block_f32(x + i, min_of(kBlock, n - i), p);
}
void chunk_stats(const double* x, int64_t n, Partial& p) { chunk_stats_f64(x, n, p); }
template <typename Half>
void chunk_stats(const Half* x, int64_t n, Partial& p) {
  float buf[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = min_of(kBlock, n - i);
    widen_block(x + i, m, buf);
    accumulate_block_f32(buf, m, p);
  }
}

// ---- pass 2 -----------------------------------------------------------------------------------

// Where pass 2 puts each element: bucket floor((v - lo) * scale) clamped to [0, bins - 1] for a
// finite v, the discard slot `bins` otherwise. Same float64 arithmetic as the reference.
struct BucketMap {
  double lo;
  double scale;  // bins / (max - min), or 0 when max == min (everything in bucket 0)
  int32_t bins;
  bool all_finite;  // no NaN/Inf anywhere in x (pass 1 says so): skip the per-element check
};

template <bool kAllFinite, typename T>
BDH_INLINE void bucket_indices(const T* x, int64_t n, const BucketMap& map, int32_t* out) {
  constexpr double kMaxFinite = std::numeric_limits<T>::max();
  const double last = static_cast<double>(map.bins - 1);
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    double t = (v - map.lo) * map.scale;  // >= 0 for finite v (v >= lo, scale >= 0)
    // Written so that a NaN t (only from an fp64 range wider than DBL_MAX) lands in the last bucket.
    t = t < last ? t : last;
    if constexpr (kAllFinite) {
      out[i] = static_cast<int32_t>(t);
    } else {
      const bool finite = abs_of(v) <= kMaxFinite;
      out[i] = finite ? static_cast<int32_t>(finite ? t : 0.0) : map.bins;
    }
  }
}

// Counts n <= kBlock elements into `copies` (1 or 4) interleaved histograms of stride bins + 1.
template <typename T>
BDH_INLINE void count_block(const T* x, int64_t n, const BucketMap& map, int64_t* hist, int copies) {
  int32_t idx[kBlock];
  if (map.all_finite) {
    bucket_indices<true>(x, n, map, idx);
  } else {
    bucket_indices<false>(x, n, map, idx);
  }
  const int64_t stride = map.bins + 1;
  int64_t i = 0;
  if (copies == 4) {
    int64_t* h1 = hist + stride;
    int64_t* h2 = hist + 2 * stride;
    int64_t* h3 = hist + 3 * stride;
    for (; i + 4 <= n; i += 4) {
      ++hist[idx[i]];
      ++h1[idx[i + 1]];
      ++h2[idx[i + 2]];
      ++h3[idx[i + 3]];
    }
  }
  for (; i < n; ++i) ++hist[idx[i]];
}

BDH_MULTIVERSION void chunk_hist(const float* x, int64_t n, const BucketMap& map, int64_t* hist, int copies) {
  for (int64_t i = 0; i < n; i += kBlock) count_block(x + i, min_of(kBlock, n - i), map, hist, copies);
}
BDH_MULTIVERSION void chunk_hist(const double* x, int64_t n, const BucketMap& map, int64_t* hist, int copies) {
  for (int64_t i = 0; i < n; i += kBlock) count_block(x + i, min_of(kBlock, n - i), map, hist, copies);
}
template <typename Half>
void chunk_hist(const Half* x, int64_t n, const BucketMap& map, int64_t* hist, int copies) {
  float buf[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = min_of(kBlock, n - i);
    widen_block(x + i, m, buf);
    chunk_hist(static_cast<const float*>(buf), m, map, hist, copies);
  }
}

// ---- the op -----------------------------------------------------------------------------------

template <typename scalar_t>
void tensor_stats_cpu_impl(const scalar_t* x, int64_t numel, int64_t bins, double* stats, int64_t* hist_out) {
  const int64_t num_chunks = (numel + kChunk - 1) / kChunk;

  // Pass 1: one partial per chunk, combined in chunk order (deterministic for any thread count).
  std::vector<Partial> partials(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t offset = c * kChunk;
      chunk_stats(x + offset, min_of(kChunk, numel - offset), partials[c]);
    }
  });
  Partial total;
  for (const Partial& p : partials) {
    total.sum += p.sum;
    total.sum_sq += p.sum_sq;
    total.min = min_of(total.min, p.min);
    total.max = max_of(total.max, p.max);
    total.nonzero += p.nonzero;
    total.nan += p.nan;
    total.nonfinite += p.nonfinite;
  }
  const bool any_finite = total.nonfinite < numel;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double lo = any_finite ? total.min : nan;
  const double hi = any_finite ? total.max : nan;
  stats[0] = static_cast<double>(numel);
  stats[1] = total.sum;
  stats[2] = total.sum_sq;
  stats[3] = lo;
  stats[4] = hi;
  stats[5] = static_cast<double>(total.nonzero);
  stats[6] = any_finite ? max_of(-lo, hi) : nan;
  stats[7] = static_cast<double>(total.nan);
  stats[8] = static_cast<double>(total.nonfinite - total.nan);
  if (!any_finite) return;  // the histogram stays all zero

  // Pass 2: per-thread histograms (plus the discard slot for non-finite elements), merged under
  // a lock. Four interleaved copies while they fit comfortably in L2.
  const BucketMap map{lo, hi > lo ? static_cast<double>(bins) / (hi - lo) : 0.0, static_cast<int32_t>(bins),
                      total.nonfinite == 0};
  const int copies = bins <= 16384 ? 4 : 1;
  const int64_t stride = bins + 1;
  std::mutex merge_mutex;
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> local(copies * stride, 0);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t offset = c * kChunk;
      chunk_hist(x + offset, min_of(kChunk, numel - offset), map, local.data(), copies);
    }
    std::lock_guard<std::mutex> guard(merge_mutex);
    for (int k = 0; k < copies; ++k) {
      for (int64_t b = 0; b < bins; ++b) hist_out[b] += local[k * stride + b];
    }
  });
}

std::tuple<at::Tensor, at::Tensor> tensor_stats_cpu(const at::Tensor& x_in, int64_t bins) {
  TORCH_CHECK(bins >= 1 && bins < std::numeric_limits<int32_t>::max(),
              "bdh_fast::tensor_stats: bins must be in [1, 2**31 - 1), got ", bins);
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()),
              "bdh_fast::tensor_stats: expected a floating-point tensor (fp32, bf16, fp16, fp64), got ",
              x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  at::Tensor stats = at::empty({kNumStats}, x.options().dtype(at::kDouble));
  at::Tensor hist = at::zeros({bins}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bdh_fast::tensor_stats", [&] {
    tensor_stats_cpu_impl<scalar_t>(x.const_data_ptr<scalar_t>(), x.numel(), bins, stats.data_ptr<double>(),
                                    hist.data_ptr<int64_t>());
  });
  return {stats, hist};
}

}  // namespace

// FRAGMENT rather than TORCH_LIBRARY: csrc/ holds one file per op, all in the bdh_fast namespace,
// and a namespace may have only one plain TORCH_LIBRARY block.
TORCH_LIBRARY_FRAGMENT(bdh_fast, m) {
  m.def("tensor_stats(Tensor x, int bins) -> (Tensor stats, Tensor hist)");
}

TORCH_LIBRARY_IMPL(bdh_fast, CPU, m) {
  m.impl("tensor_stats", &tensor_stats_cpu);
}

}  // namespace bdh_fast

// `import bdh_fast._C` loads this library, which runs the registrations above; the module itself
// exports nothing. The extension's only PYBIND11_MODULE: other csrc/ files must not add one.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
