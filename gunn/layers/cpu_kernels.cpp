// Training-mode BatchNorm (+ ReLU) on thin channels_last tensors, forward and backward.
//
// The GUNN units of the paper's models normalise 12 to 36 channels at a time. ATen's
// channels_last BatchNorm kernels are 2 to 6 times slower than these on such shapes
// (see gunn/bench). A tensor is seen as a (pixels, channels) matrix whose rows may be
// strided (a segment of the GUNN state) but whose channels are contiguous. Built on first
// use by gunn/layers/cpu_kernels.py; the numbers match aten::native_batch_norm(_backward)
// up to rounding (the tests compare both in float64).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGrain = 2048;  // rows per parallel task
constexpr int64_t kChunk = 256;   // rows summed in the tensor's own type before adding in double

struct Matrix {
  int64_t rows = 0, cols = 0, ld = 0;
};

Matrix as_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "gunn cpu kernels: ", name, " must be a (pixels, channels) matrix, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "gunn cpu kernels: ", name, " needs contiguous channels");
  TORCH_CHECK(t.device().is_cpu(), "gunn cpu kernels: ", name, " must be on the CPU");
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
      for (int64_t j = 0; j < C; ++j) s[j] += row[j];
    });
    std::vector<T> mu(C);
    for (int64_t j = 0; j < C; ++j) mu[j] = static_cast<T>(sum[j] / P);
    const T* M = mu.data();
    auto sq = column_sums<T>(P, C, [&](int64_t r, T* s) {  // two passes, like ATen: no cancellation
      const T* row = X + r * ldx;
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
        if (A) {
          T* o = OA + r * ma.ld;
          for (int64_t j = 0; j < A; ++j) {
            const T v = row[j] * S[j] + H[j];
            o[j] = v > T(0) ? v : T(0);
          }
        }
        if (B) {
          T* o = OB + r * mb.ld;
          const T* xb = row + A;
          const T* sb = S + A;
          const T* hb = H + A;
          if (D) {
            const T* d = D + r * md.ld;
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
      if (A) {
        const T* g = GA + r * mga.ld;
        const T* h = RA + r * mra.ld;
        for (int64_t j = 0; j < A; ++j) {
          const T gj = h[j] > T(0) ? g[j] : T(0);
          s[j] += gj;
          s[C + j] += gj * (xr[j] - M[j]);
        }
      }
      if (B) {
        const T* g = GB + r * mgb.ld;
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
        if (A) {
          const T* g = GA + r * mga.ld;
          const T* h = RA + r * mra.ld;
          for (int64_t j = 0; j < A; ++j) {
            const T gj = h[j] > T(0) ? g[j] : T(0);
            o[j] = gj * K1[j] - xr[j] * K2[j] + K3[j];
          }
        }
        if (B) {
          const T* g = GB + r * mgb.ld;
          for (int64_t j = A; j < C; ++j) o[j] = g[j - A] * K1[j] - xr[j] * K2[j] + K3[j];
        }
      }
    });
  });
  return {grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY(gunn_cpu, m) {
  m.def("bn_forward", bn_forward);
  m.def("bn_backward", bn_backward);
}
