// Torch-facing entry points of matnet's kernels (no Python): the CPU kernels (cpu_kernels.cpp), the
// shape-only Meta kernels used by fake tensors / torch.compile (registration.cpp), and the CUDA glue
// (cuda_glue.cpp, built with -DMATNET_WITH_CUDA). registration.cpp registers them as torch.ops.matnet.*.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <initializer_list>
#include <tuple>

namespace matnet {

// Argument checks shared by every backend (the Python wrappers check first, with friendlier messages).
void check_elementwise(const char* op, const at::Tensor& ref, std::initializer_list<at::Tensor> others);
// Returns {B, K, C, H, W}.
std::array<int64_t, 5> check_mixture(const at::Tensor& x, const at::Tensor& logit_probs,
                                     const at::Tensor& means, const at::Tensor& log_scales,
                                     const at::Tensor& coeffs);
// dtype of the saved per-pixel log-sum-exp: fp32 for fp16/bf16 inputs (it feeds exp() in the backward).
at::ScalarType lse_dtype(at::ScalarType t);

namespace cpu {
std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl_fwd(const at::Tensor& mu_q, const at::Tensor& logvar_q,
                                                          const at::Tensor& mu_p, const at::Tensor& logvar_p,
                                                          const at::Tensor& eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_sample_kl_bwd(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logvar_q,
    const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& eps);
at::Tensor discretized_logistic_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale);
std::tuple<at::Tensor, at::Tensor> discretized_logistic_nll_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& log_scale);
std::tuple<at::Tensor, at::Tensor> discretized_logistic_mixture_nll_fwd(const at::Tensor& x, const at::Tensor& logit_probs,
                                                         const at::Tensor& means,
                                                         const at::Tensor& log_scales,
                                                         const at::Tensor& coeffs);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discretized_logistic_mixture_nll_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
    const at::Tensor& log_scales, const at::Tensor& coeffs, const at::Tensor& lse);
}  // namespace cpu

#ifdef MATNET_WITH_CUDA
namespace cuda {
std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl_fwd(const at::Tensor& mu_q, const at::Tensor& logvar_q,
                                                          const at::Tensor& mu_p, const at::Tensor& logvar_p,
                                                          const at::Tensor& eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_sample_kl_bwd(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logvar_q,
    const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& eps);
at::Tensor discretized_logistic_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale);
std::tuple<at::Tensor, at::Tensor> discretized_logistic_nll_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& log_scale);
std::tuple<at::Tensor, at::Tensor> discretized_logistic_mixture_nll_fwd(const at::Tensor& x, const at::Tensor& logit_probs,
                                                         const at::Tensor& means,
                                                         const at::Tensor& log_scales,
                                                         const at::Tensor& coeffs);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discretized_logistic_mixture_nll_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
    const at::Tensor& log_scales, const at::Tensor& coeffs, const at::Tensor& lse);
}  // namespace cuda
#endif

}  // namespace matnet
