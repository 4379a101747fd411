// Training-mode BatchNorm (+ ReLU) on thin channels_last tensors, forward and backward.
//
// The GUNN units of the paper's models normalise 12 to 36 channels at a time. ATen's
// channels_last BatchNorm kernels are 1.7 to 4.4 times slower than these on such shapes
// (see gunn/bench). A tensor is seen as a (pixels, channels) matrix whose rows may be
// strided (a segment of the GUNN state) but whose channels are contiguous. Built on first
// use by gunn/layers/cpu_kernels.py; the numbers match aten::native_batch_norm(_backward)
// up to rounding (the tests compare both in float64).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGrain = 2048;  // rows per parallel task
constexpr int64_t kChunk = 256;   // rows summed in the tensor's own type before adding in double

struct Matrix {
  int64_t rows = 0, cols = 0, ld = 0;
};

// Rows read (or written) this many rows ahead of use are prefetched: the hardware
// prefetcher does not follow rows of a few dozen values spaced a state's width apart (a
// segment of the GUNN state, a unit's columns of a gradient block), and such reads ran
// 2-3 times slower than contiguous ones.
constexpr int64_t kAhead = 8;

// Prefetches the `cols` values at `row` (a row kAhead rows ahead, which may lie past the
// end of the tensor: a prefetch never faults, and the address is formed as an integer).
template <typename T>
inline void prefetch_row(const T* row, int64_t ld, int64_t cols, bool write = false) {
  const char* p = reinterpret_cast<const char*>(row + kAhead * ld);
  const int64_t bytes = cols * static_cast<int64_t>(sizeof(T));
  if (write) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 1);
  } else {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
  }
}

// A (pixels, channels) matrix, or a (B, C, H, W) channels_last tensor (a channel slice of
// one included) seen as its (B*H*W, C) matrix.
Matrix as_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "gunn cpu kernels: ", name, " must be on the CPU");
  if (t.dim() == 4) {
    const int64_t B = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
    // The row stride, from the first pixel dimension (innermost first) longer than 1.
    const int64_t ld = W > 1 ? t.stride(3) : H > 1 ? t.stride(2) : B > 1 ? t.stride(0) : C;
    TORCH_CHECK((C <= 1 || t.stride(1) == 1) && (W <= 1 || t.stride(3) == ld) && (H <= 1 || t.stride(2) == W * ld) &&
                    (B <= 1 || t.stride(0) == H * W * ld),
                "gunn cpu kernels: ", name, " must be channels_last, got strides ", t.strides());
    return {B * H * W, C, C ? ld : 0};
  }
  TORCH_CHECK(t.dim() == 2, "gunn cpu kernels: ", name, " must be a (pixels, channels) matrix or a 4-d ",
              "channels_last tensor, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "gunn cpu kernels: ", name, " needs contiguous channels");
  return {t.size(0), t.size(1), t.size(1) ? t.stride(0) : 0};
}

// Per-channel sums over the rows of a (rows, c) matrix of f(row, c), each thread its own
// partial sums, combined in double.
template <typename T, typename F>
std::vector<double> column_sums(int64_t rows, int64_t c, F f) {
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * c, 0.0);
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * c;
    std::vector<T> chunk(c);
    T* s = chunk.data();
    for (int64_t r0 = begin; r0 < end; r0 += kChunk) {
      std::fill(chunk.begin(), chunk.end(), T(0));
      const int64_t r1 = std::min(end, r0 + kChunk);
      for (int64_t r = r0; r < r1; ++r) f(r, s);
      for (int64_t j = 0; j < c; ++j) acc[j] += s[j];
    }
  });
  std::vector<double> out(c, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t j = 0; j < c; ++j) out[j] += partial[static_cast<size_t>(t) * c + j];
  return out;
}

// y = BatchNorm(x) with batch statistics. Columns [0, a) go through a ReLU into out_a;
// columns [a, C) go to out_b, plus `add` if given, added to out_b if `accumulate`.
// Updates the running statistics (if given) as aten::native_batch_norm does and returns
// the batch mean and inverse standard deviation.
std::tuple<at::Tensor, at::Tensor> bn_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    double momentum, double eps, const at::Tensor& out_a, const at::Tensor& out_b,
    const std::optional<at::Tensor>& add, bool accumulate) {
  const Matrix mx = as_matrix(x, "x"), ma = as_matrix(out_a, "out_a"), mb = as_matrix(out_b, "out_b");
  const int64_t P = mx.rows, C = mx.cols, A = ma.cols, B = mb.cols;
  TORCH_CHECK(A + B == C && (A == 0 || ma.rows == P) && (B == 0 || mb.rows == P),
              "gunn cpu kernels: out_a and out_b must split x's columns");
  Matrix md;
  if (add) {
    md = as_matrix(*add, "add");
    TORCH_CHECK(md.rows == P && md.cols == B, "gunn cpu kernels: add must match out_b");
  }
  auto mean = at::empty({C}, x.options());
  auto invstd = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gunn_bn_forward", [&] {
    using T = scalar_t;
    const T* X = x.const_data_ptr<T>();
    const int64_t ldx = mx.ld;
    auto sum = column_sums<T>(P, C, [&](int64_t r, T* s) {
      const T* row = X + r * ldx;
      prefetch_row(row, ldx, C);
      for (int64_t j = 0; j < C; ++j) s[j] += row[j];
    });
    std::vector<T> mu(C);
    for (int64_t j = 0; j < C; ++j) mu[j] = static_cast<T>(sum[j] / P);
    const T* M = mu.data();
    auto sq = column_sums<T>(P, C, [&](int64_t r, T* s) {  // two passes, like ATen: no cancellation
      const T* row = X + r * ldx;
      prefetch_row(row, ldx, C);
      for (int64_t j = 0; j < C; ++j) {
        const T d = row[j] - M[j];
        s[j] += d * d;
      }
    });
    std::vector<T> scale(C), shift(C);
    const T* G = gamma.const_data_ptr<T>();
    const T* Bt = beta.const_data_ptr<T>();
    T* out_mean = mean.mutable_data_ptr<T>();
    T* out_invstd = invstd.mutable_data_ptr<T>();
    for (int64_t j = 0; j < C; ++j) {
      const double var = sq[j] / P, is = 1.0 / std::sqrt(var + eps);
      out_mean[j] = mu[j];
      out_invstd[j] = static_cast<T>(is);
      scale[j] = static_cast<T>(is * G[j]);
      shift[j] = static_cast<T>(Bt[j] - mu[j] * is * G[j]);
    }
    if (running_mean && running_mean->defined()) {
      T* rm = running_mean->mutable_data_ptr<T>();
      T* rv = running_var->mutable_data_ptr<T>();
      for (int64_t j = 0; j < C; ++j) {
        rm[j] = static_cast<T>(momentum * mu[j] + (1 - momentum) * rm[j]);
        rv[j] = static_cast<T>(momentum * sq[j] / (P - 1) + (1 - momentum) * rv[j]);
      }
    }
    T* OA = A ? out_a.mutable_data_ptr<T>() : nullptr;
    T* OB = B ? out_b.mutable_data_ptr<T>() : nullptr;
    const T* D = (add && B) ? add->const_data_ptr<T>() : nullptr;
    const T* S = scale.data();
    const T* H = shift.data();
    at::parallel_for(0, P, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = X + r * ldx;
        prefetch_row(row, ldx, C);
        if (A) {
          T* o = OA + r * ma.ld;
          prefetch_row(o, ma.ld, A, true);
          for (int64_t j = 0; j < A; ++j) {
            const T v = row[j] * S[j] + H[j];
            o[j] = v > T(0) ? v : T(0);
          }
        }
        if (B) {
          T* o = OB + r * mb.ld;
          if (accumulate) {
            prefetch_row(o, mb.ld, B);
          } else {
            prefetch_row(o, mb.ld, B, true);
          }
          const T* xb = row + A;
          const T* sb = S + A;
          const T* hb = H + A;
          if (D) {
            const T* d = D + r * md.ld;
            prefetch_row(d, md.ld, B);
            if (accumulate) {
              for (int64_t j = 0; j < B; ++j) o[j] += xb[j] * sb[j] + hb[j] + d[j];
            } else {
              for (int64_t j = 0; j < B; ++j) o[j] = xb[j] * sb[j] + hb[j] + d[j];
            }
          } else if (accumulate) {
            for (int64_t j = 0; j < B; ++j) o[j] += xb[j] * sb[j] + hb[j];
          } else {
            for (int64_t j = 0; j < B; ++j) o[j] = xb[j] * sb[j] + hb[j];
          }
        }
      }
    });
  });
  return {mean, invstd};
}

// Backward of bn_forward for the gradient g = [grad_a where relu_a > 0 (else 0), grad_b]
// of its output: writes the gradient of x into `out` and returns those of gamma and beta.
std::tuple<at::Tensor, at::Tensor> bn_backward(
    const at::Tensor& grad_a, const at::Tensor& relu_a, const at::Tensor& grad_b, const at::Tensor& x,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& gamma, const at::Tensor& out) {
  const Matrix mx = as_matrix(x, "x"), mga = as_matrix(grad_a, "grad_a"), mra = as_matrix(relu_a, "relu_a");
  const Matrix mgb = as_matrix(grad_b, "grad_b"), mo = as_matrix(out, "out");
  const int64_t P = mx.rows, C = mx.cols, A = mga.cols, B = mgb.cols;
  TORCH_CHECK(A + B == C && mra.cols == A && mo.rows == P && mo.cols == C &&
                  (A == 0 || (mga.rows == P && mra.rows == P)) && (B == 0 || mgb.rows == P),
              "gunn cpu kernels: grad_a, relu_a and grad_b must split x's columns");
  auto grad_gamma = at::empty({C}, x.options());
  auto grad_beta = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gunn_bn_backward", [&] {
    using T = scalar_t;
    const T* X = x.const_data_ptr<T>();
    const T* GA = A ? grad_a.const_data_ptr<T>() : nullptr;
    const T* RA = A ? relu_a.const_data_ptr<T>() : nullptr;
    const T* GB = B ? grad_b.const_data_ptr<T>() : nullptr;
    const T* M = mean.const_data_ptr<T>();
    // One pass for both sums: sum(g) in [0, C), sum(g * (x - mean)) in [C, 2C).
    auto sums = column_sums<T>(P, 2 * C, [&](int64_t r, T* s) {
      const T* xr = X + r * mx.ld;
      prefetch_row(xr, mx.ld, C);
      if (A) {
        const T* g = GA + r * mga.ld;
        const T* h = RA + r * mra.ld;
        prefetch_row(g, mga.ld, A);
        prefetch_row(h, mra.ld, A);
        for (int64_t j = 0; j < A; ++j) {
          const T gj = h[j] > T(0) ? g[j] : T(0);
          s[j] += gj;
          s[C + j] += gj * (xr[j] - M[j]);
        }
      }
      if (B) {
        const T* g = GB + r * mgb.ld;
        prefetch_row(g, mgb.ld, B);
        for (int64_t j = 0; j < B; ++j) {
          s[A + j] += g[j];
          s[C + A + j] += g[j] * (xr[A + j] - M[A + j]);
        }
      }
    });
    // dx = gamma * invstd * (g - sum(g) / P - (x - mean) * invstd^2 * sum(g * (x - mean)) / P)
    //    = g * k1 - x * k2 + k3
    std::vector<T> k1(C), k2(C), k3(C);
    const T* I = invstd.const_data_ptr<T>();
    const T* G = gamma.const_data_ptr<T>();
    T* gg = grad_gamma.mutable_data_ptr<T>();
    T* gb = grad_beta.mutable_data_ptr<T>();
    for (int64_t j = 0; j < C; ++j) {
      const double is = I[j], s1 = sums[j], s2 = sums[C + j];
      gg[j] = static_cast<T>(s2 * is);
      gb[j] = static_cast<T>(s1);
      const double a = G[j] * is, b = a * is * is * s2 / P;
      k1[j] = static_cast<T>(a);
      k2[j] = static_cast<T>(b);
      k3[j] = static_cast<T>(b * M[j] - a * s1 / P);
    }
    T* O = out.mutable_data_ptr<T>();
    const T *K1 = k1.data(), *K2 = k2.data(), *K3 = k3.data();
    at::parallel_for(0, P, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = X + r * mx.ld;
        T* o = O + r * mo.ld;
        prefetch_row(xr, mx.ld, C);
        prefetch_row(o, mo.ld, C, true);
        if (A) {
          const T* g = GA + r * mga.ld;
          const T* h = RA + r * mra.ld;
          prefetch_row(g, mga.ld, A);
          prefetch_row(h, mra.ld, A);
          for (int64_t j = 0; j < A; ++j) {
            const T gj = h[j] > T(0) ? g[j] : T(0);
            o[j] = gj * K1[j] - xr[j] * K2[j] + K3[j];
          }
        }
        if (B) {
          const T* g = GB + r * mgb.ld;
          prefetch_row(g, mgb.ld, B);
          for (int64_t j = A; j < C; ++j) o[j] = g[j - A] * K1[j] - xr[j] * K2[j] + K3[j];
        }
      }
    });
  });
  return {grad_gamma, grad_beta};
}

// dst[j * ldd + i] = src[i * lds + j] for an 8x8 tile.
template <typename T>
inline void transpose_tile(const T* src, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < 8; ++i)
    for (int64_t j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
}

#ifdef __AVX2__
template <>
inline void transpose_tile<float>(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
  }
}
#endif

// dst[...] = src[...] for two (B, C, H, W) tensors (or channel slices of them) of which one
// is NCHW and the other channels_last: per image a transpose between (C, H*W) and (H*W, C),
// in 8x8 tiles. ATen's copy_ between the two layouts is 3 times slower on these shapes.
void copy_layout(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.dim() == 4 && src.sizes() == dst.sizes() && src.scalar_type() == dst.scalar_type(),
              "gunn cpu kernels: copy_layout needs two 4-d tensors of one size and dtype");
  TORCH_CHECK(dst.device().is_cpu() && src.device().is_cpu(), "gunn cpu kernels: copy_layout is for the CPU");
  const int64_t B = src.size(0), C = src.size(1), H = src.size(2), W = src.size(3), HW = H * W;
  auto pixels_merge = [&](const at::Tensor& t) { return H == 1 || t.stride(2) == W * t.stride(3); };
  const bool to_cl = src.stride(3) == 1 && dst.stride(1) == 1;    // NCHW -> channels_last
  const bool to_nchw = src.stride(1) == 1 && dst.stride(3) == 1;  // channels_last -> NCHW
  TORCH_CHECK((to_cl || to_nchw) && pixels_merge(src) && pixels_merge(dst),
              "gunn cpu kernels: copy_layout copies between NCHW and channels_last only");
  // As matrices: src (C, HW) or (HW, C) with leading dimension lds into its transpose.
  const int64_t lds = to_cl ? src.stride(1) : src.stride(3), ldd = to_cl ? dst.stride(3) : dst.stride(1);
  // Tiles of 8 channels x 8 pixels; a task takes 8 channels of one image and walks its
  // pixels: the NCHW side is read or written as 8 sequential streams (faster than walking
  // the channels_last side row after row; `python -m gunn.bench --only kernels` times the copy).
  const int64_t outer = (C + 7) / 8, inner = (HW + 7) / 8;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "gunn_copy_layout", [&] {
    using T = scalar_t;
    const T* S = src.const_data_ptr<T>();
    T* D = dst.mutable_data_ptr<T>();
    at::parallel_for(0, B * outer, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / outer, c0 = (t % outer) * 8, c1 = std::min(C, c0 + 8);
        const T* s = S + b * src.stride(0);
        T* d = D + b * dst.stride(0);
        for (int64_t k = 0; k < inner; ++k) {
          const int64_t p0 = k * 8, p1 = std::min(HW, p0 + 8);
          // (i, j) = (channel, pixel) when going to channels_last, (pixel, channel) otherwise.
          const int64_t i0 = to_cl ? c0 : p0, j0 = to_cl ? p0 : c0;
          if (p1 - p0 == 8 && c1 - c0 == 8) {
            transpose_tile<T>(s + i0 * lds + j0, lds, d + j0 * ldd + i0, ldd);
          } else {
            const int64_t i1 = to_cl ? c1 : p1, j1 = to_cl ? p1 : c1;
            for (int64_t i = i0; i < i1; ++i)
              for (int64_t j = j0; j < j1; ++j) d[j * ldd + i] = s[i * lds + j];
          }
        }
      }
    });
  });
}


// One GUNN update unit of the paper (1x1 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv, BN,
// plus the projection's 1x1 conv and BN), forward and backward, in channels_last. What
// gunn/layers/fastpath.py computes op by op for the ATen backend, as one call: per unit that
// saves about 15 calls from Python, whose interpreter and dispatch cost exceeds the
// arithmetic on small feature maps (docs/benchmark.md).

at::Tensor empty_channels_last(const at::Tensor& like, int64_t channels) {
  return at::empty({like.size(0), channels, like.size(2), like.size(3)},
                   like.options().memory_format(at::MemoryFormat::ChannelsLast));
}

// A contiguous channels_last (B, C, H, W) tensor as its (B*H*W, C) matrix, and back.
at::Tensor pixels(const at::Tensor& t) { return t.permute({0, 2, 3, 1}).reshape({-1, t.size(1)}); }

at::Tensor image(const at::Tensor& m, const at::Tensor& like) {
  return m.view({like.size(0), like.size(2), like.size(3), m.size(1)}).permute({0, 3, 1, 2});
}

// Writes the unit's update into `state` (segment [start, start + width) += or = bn3 +
// projection) and returns what its backward needs: a1, mean1, invstd1, h1, a2, mean2,
// invstd2, h2, a3, mean3, invstd3. w1 (and its BatchNorm's parameters and statistics) holds
// the first conv's rows, then the projection's; the first `hidden` of them feed the 3x3 conv.
std::vector<at::Tensor> unit_forward(
    const at::Tensor& state, const at::Tensor& w1, const at::Tensor& gamma1, const at::Tensor& beta1,
    const std::optional<at::Tensor>& mean1, const std::optional<at::Tensor>& var1, double momentum1, double eps1,
    int64_t hidden, const at::Tensor& w2, const at::Tensor& gamma2, const at::Tensor& beta2,
    const std::optional<at::Tensor>& mean2, const std::optional<at::Tensor>& var2, double momentum2, double eps2,
    const at::Tensor& w3, const at::Tensor& gamma3, const at::Tensor& beta3,
    const std::optional<at::Tensor>& mean3, const std::optional<at::Tensor>& var3, double momentum3, double eps3,
    int64_t start, bool residual) {
  TORCH_CHECK(state.dim() == 4 && state.is_contiguous(at::MemoryFormat::ChannelsLast),
              "gunn cpu kernels: unit_forward needs a channels_last state");
  TORCH_CHECK(start >= 0 && start + w3.size(0) <= state.size(1), "gunn cpu kernels: the unit's segment [", start,
              ", ", start + w3.size(0), ") exceeds the state's ", state.size(1), " channels");
  auto a1 = at::conv2d(state, w1);
  auto h1 = empty_channels_last(a1, hidden);
  auto projected = empty_channels_last(a1, a1.size(1) - hidden);
  auto [m1, v1] = bn_forward(a1, gamma1, beta1, mean1, var1, momentum1, eps1, h1, projected, std::nullopt, false);
  auto a2 = at::conv2d(h1, w2, std::nullopt, 1, 1);
  auto h2 = empty_channels_last(a2, a2.size(1));
  auto nothing = empty_channels_last(a2, 0);
  auto [m2, v2] = bn_forward(a2, gamma2, beta2, mean2, var2, momentum2, eps2, h2, nothing, std::nullopt, false);
  auto a3 = image(at::mm(pixels(h2), w3.view({w3.size(0), -1}).t()), h2);
  auto segment = state.narrow(1, start, a3.size(1));
  std::optional<at::Tensor> add;
  if (projected.size(1)) add = projected;
  auto [m3, v3] = bn_forward(a3, gamma3, beta3, mean3, var3, momentum3, eps3, nothing, segment, add, residual);
  return {a1, m1, v1, h1, a2, m2, v2, h2, a3, m3, v3};
}

// Backward of unit_forward for the gradient of its update (grad_delta): writes the gradient
// of the first conv's output (its rows, then the projection's) into `out` and returns the
// gradients of gamma1, beta1, w2, gamma2, beta2, w3, gamma3, beta3 and, with a projection,
// of its BatchNorm's gamma and beta (the order of gunn/layers/fastpath.py).
std::vector<at::Tensor> unit_backward(
    at::TensorList saved, const at::Tensor& grad_delta, const at::Tensor& out, const at::Tensor& gamma1,
    const at::Tensor& w2, const at::Tensor& gamma2, const at::Tensor& w3, const at::Tensor& gamma3) {
  TORCH_CHECK(saved.size() == 11, "gunn cpu kernels: unit_backward needs unit_forward's 11 tensors");
  const at::Tensor &a1 = saved[0], &m1 = saved[1], &v1 = saved[2], &h1 = saved[3], &a2 = saved[4];
  const at::Tensor &m2 = saved[5], &v2 = saved[6], &h2 = saved[7], &a3 = saved[8], &m3 = saved[9], &v3 = saved[10];
  auto none = at::empty({0, 0}, a1.options());
  auto g3 = empty_channels_last(a3, a3.size(1));
  auto [gw_bn3, gb_bn3] = bn_backward(none, none, grad_delta, a3, m3, v3, gamma3, g3);
  auto g3m = pixels(g3);
  auto w3m = w3.view({w3.size(0), -1});
  auto gh2 = image(at::mm(g3m, w3m), h2);
  auto gw3 = at::mm(g3m.t(), pixels(h2)).view(w3.sizes());
  auto g2 = empty_channels_last(a2, a2.size(1));
  auto [gw_bn2, gb_bn2] = bn_backward(gh2, h2, none, a2, m2, v2, gamma2, g2);
  auto gh1_gw2 = at::convolution_backward(g2, h1, w2, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1,
                                          {true, true, false});
  // delta = bottleneck + projection: the projection's BatchNorm gets delta's gradient.
  const bool projection = a1.size(1) > h1.size(1);
  auto [gw_bn1, gb_bn1] =
      bn_backward(std::get<0>(gh1_gw2), h1, projection ? grad_delta : none, a1, m1, v1, gamma1, out);
  const int64_t hidden = h1.size(1), rest = a1.size(1) - hidden;
  std::vector<at::Tensor> grads = {gw_bn1.narrow(0, 0, hidden), gb_bn1.narrow(0, 0, hidden), std::get<1>(gh1_gw2),
                                   gw_bn2, gb_bn2, gw3, gw_bn3, gb_bn3};
  if (projection) {
    grads.push_back(gw_bn1.narrow(0, hidden, rest));
    grads.push_back(gb_bn1.narrow(0, hidden, rest));
  }
  return grads;
}

}  // namespace

TORCH_LIBRARY(gunn_cpu, m) {
  m.def("bn_forward", bn_forward);
  m.def("bn_backward", bn_backward);
  m.def("copy_layout", copy_layout);
  m.def("unit_forward", unit_forward);
  m.def("unit_backward", unit_backward);
}
