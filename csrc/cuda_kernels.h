// Launchers of the CUDA kernels (cuda_kernels.cu). Plain pointers and the CUDA runtime only, so the .cu
// compiles without torch's headers; cuda_glue.cpp turns tensors into these calls.
#pragma once

#include <cstdint>

namespace matnet {
namespace cuda_launch {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Each returns nullptr on success, else the CUDA error message. `stream` is a cudaStream_t.
// Elementwise ops: every pointer holds n contiguous elements of `dt`.
const char* gaussian_sample_kl_fwd(DType dt, const void* mu_q, const void* logvar_q, const void* mu_p,
                                   const void* logvar_p, const void* eps, void* z, void* kl, int64_t n,
                                   void* stream);
const char* gaussian_sample_kl_bwd(DType dt, const void* grad_z, const void* grad_kl, const void* mu_q,
                                   const void* logvar_q, const void* mu_p, const void* logvar_p,
                                   const void* eps, void* g_mu_q, void* g_logvar_q, void* g_mu_p,
                                   void* g_logvar_p, void* g_eps, int64_t n, void* stream);
const char* discretized_logistic_nll_fwd(DType dt, const void* x, const void* mean, const void* log_scale, void* out,
                              int64_t n, void* stream);
const char* discretized_logistic_nll_bwd(DType dt, const void* grad, const void* x, const void* mean,
                              const void* log_scale, void* g_mean, void* g_log_scale, int64_t n,
                              void* stream);
// Mixture: contiguous x [B,C,H,W], logit_probs [B,K,H,W], means/log_scales [B,K,C,H,W], coeffs
// [B,K,C(C-1)/2,H,W] of `dt`; pix_nll [B,H,W] and lse [B,H,W] are fp64 for fp64 inputs, else fp32; grad is
// [B] of that same dtype.
const char* discretized_logistic_mixture_nll_fwd(DType dt, const void* x, const void* logit_probs, const void* means,
                                  const void* log_scales, const void* coeffs, void* pix_nll, void* lse,
                                  int64_t B, int K, int C, int64_t hw, void* stream);
const char* discretized_logistic_mixture_nll_bwd(DType dt, const void* grad, const void* x, const void* logit_probs,
                                  const void* means, const void* log_scales, const void* coeffs,
                                  const void* lse, void* g_logit_probs, void* g_means, void* g_log_scales,
                                  void* g_coeffs, int64_t B, int K, int C, int64_t hw, void* stream);

}  // namespace cuda_launch
}  // namespace matnet
