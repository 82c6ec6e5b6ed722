// Fused CPU kernels for the Kronecker-sum weight W = Σ_t A_t ⊗ F_t and its backward (kronify/cpu_kernel.py).
//
// Layout (kronify/kron.py): A (t, n, n), F (t, p, Q) with Q = q·kernel, W viewed as (n, p, n, Q):
//   W[a, i, b, :] = Σ_t A[t, a, b] · F[t, i, :]
// The forward writes each row of W once. The backward reads each row of G = dL/dW once and, from it,
// accumulates dF[t, i, :] += A[t, a, b] · G[a, i, b, :] and dA[t, a, b] += <G[a, i, b, :], F[t, i, :]>.
// torch's composite makes several passes over |W|-sized buffers for the same sums. (_Pragma, not #pragma: the
// loops sit inside AT_DISPATCH's macro argument.)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kBlockEntries = 1 << 15;  // entries of W per parallel task: small weights stay on one thread

int64_t rows_per_block(int64_t row_entries) {
  return std::max<int64_t>(1, kBlockEntries / std::max<int64_t>(1, row_entries));
}

void check_factors(const torch::Tensor& A, const torch::Tensor& F) {
  TORCH_CHECK(A.device().is_cpu() && F.device().is_cpu(), "kron_cpu: A and F must be CPU tensors");
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "kron_cpu: A must be (terms, n, n), got ", A.sizes());
  TORCH_CHECK(F.dim() == 3 && F.size(0) == A.size(0), "kron_cpu: F must be (terms, p, Q), got ", F.sizes());
  TORCH_CHECK(A.size(0) >= 1, "kron_cpu: at least one term is needed (the forward starts from term 0)");
  TORCH_CHECK(A.scalar_type() == F.scalar_type(), "kron_cpu: A and F must share a dtype");
  TORCH_CHECK(A.is_contiguous() && F.is_contiguous(), "kron_cpu: A and F must be contiguous");
}

}  // namespace

// W (n, p, n, Q) from A (t, n, n) and F (t, p, Q), written into `out` when given (contiguous, that shape).
torch::Tensor kron_forward(const torch::Tensor& A, const torch::Tensor& F, c10::optional<torch::Tensor> out) {
  check_factors(A, F);
  const int64_t t = A.size(0), n = A.size(1), p = F.size(1), Q = F.size(2);
  torch::Tensor W = out.has_value() ? *out : torch::empty({n, p, n, Q}, F.options());
  TORCH_CHECK(W.is_contiguous() && W.numel() == n * p * n * Q && W.scalar_type() == F.scalar_type(),
              "kron_cpu: out must be a contiguous (n, p, n, Q) tensor of F's dtype");
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "kron_forward", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* f = F.data_ptr<scalar_t>();
    scalar_t* w = W.data_ptr<scalar_t>();
    at::parallel_for(0, n * p, rows_per_block(n * Q), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {  // r = a·p + i
        const int64_t row_a = r / p, i = r % p;
        for (int64_t b = 0; b < n; ++b) {
          scalar_t* dst = w + (r * n + b) * Q;
          const scalar_t c0 = a[row_a * n + b];
          const scalar_t* f0 = f + i * Q;
_Pragma("omp simd")
          for (int64_t j = 0; j < Q; ++j) dst[j] = c0 * f0[j];
          for (int64_t k = 1; k < t; ++k) {
            const scalar_t c = a[(k * n + row_a) * n + b];
            const scalar_t* fk = f + (k * p + i) * Q;
_Pragma("omp simd")
            for (int64_t j = 0; j < Q; ++j) dst[j] += c * fk[j];
          }
        }
      }
    });
  });
  return W;
}

// (dA (t, n, n), dF (t, p, Q)) from G = dL/dW (n, p, n, Q, contiguous); an undefined tensor where not needed.
std::vector<torch::Tensor> kron_backward(const torch::Tensor& G, const torch::Tensor& A, const torch::Tensor& F,
                                         bool need_A, bool need_F) {
  check_factors(A, F);
  const int64_t t = A.size(0), n = A.size(1), p = F.size(1), Q = F.size(2);
  TORCH_CHECK(G.is_contiguous() && G.numel() == n * p * n * Q && G.scalar_type() == F.scalar_type(),
              "kron_cpu: the weight's gradient must be a contiguous (n, p, n, Q) tensor of F's dtype");
  const int64_t rows = rows_per_block(n * n * Q);  // rows i of F per task
  const int64_t blocks = (p + rows - 1) / rows;
  // one dA partial per block of rows, summed in block order afterwards: the result does not depend on threads
  torch::Tensor dA_parts = need_A ? torch::zeros({blocks, t, n, n}, A.options()) : torch::Tensor();
  torch::Tensor dF = need_F ? torch::empty_like(F) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(F.scalar_type(), "kron_backward", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* f = F.data_ptr<scalar_t>();
    const scalar_t* g = G.data_ptr<scalar_t>();
    scalar_t* df = need_F ? dF.data_ptr<scalar_t>() : nullptr;
    scalar_t* parts = need_A ? dA_parts.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        scalar_t* da = need_A ? parts + blk * t * n * n : nullptr;
        for (int64_t i = blk * rows; i < std::min(p, (blk + 1) * rows); ++i) {
          if (need_F) {
            for (int64_t k = 0; k < t; ++k) std::fill_n(df + (k * p + i) * Q, Q, scalar_t(0));
          }
          for (int64_t row_a = 0; row_a < n; ++row_a) {
            for (int64_t b = 0; b < n; ++b) {
              const scalar_t* gr = g + ((row_a * p + i) * n + b) * Q;
              for (int64_t k = 0; k < t; ++k) {
                const int64_t ab = (k * n + row_a) * n + b;
                if (need_F) {
                  const scalar_t c = a[ab];
                  scalar_t* dfr = df + (k * p + i) * Q;
_Pragma("omp simd")
                  for (int64_t j = 0; j < Q; ++j) dfr[j] += c * gr[j];
                }
                if (need_A) {
                  const scalar_t* fr = f + (k * p + i) * Q;
                  scalar_t acc = 0;
_Pragma("omp simd reduction(+ : acc)")
                  for (int64_t j = 0; j < Q; ++j) acc += gr[j] * fr[j];
                  da[ab] += acc;
                }
              }
            }
          }
        }
      }
    });
  });
  torch::Tensor dA = !need_A ? torch::Tensor() : (blocks == 1 ? dA_parts.select(0, 0) : dA_parts.sum(0));
  return {dA, dF};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kron_forward", &kron_forward, "W = sum_t A_t kron F_t, (n, p, n, Q) layout");
  m.def("kron_backward", &kron_backward, "(dA, dF) from dL/dW");
}
