// Registers the kernels as torch.ops.matnet.*: schemas, CPU and Meta (shape-only, for fake tensors and
// torch.compile) implementations, and CUDA ones when built with -DMATNET_WITH_CUDA. No Python here, so the
// C++ tests link this file as it is.
#include <torch/library.h>

#include "ops.h"

namespace matnet {
namespace {

bool cuda_enabled() {
#ifdef MATNET_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_meta(const char* op, const at::Tensor& ref, std::initializer_list<at::Tensor> others) {
  for (const at::Tensor& t : others) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": dtypes differ (", t.scalar_type(), " vs ",
                ref.scalar_type(), ")");
    TORCH_CHECK(t.sym_sizes() == ref.sym_sizes(), op, ": shapes differ (", t.sym_sizes(), " vs ",
                ref.sym_sizes(), ")");
  }
}

at::Tensor empty_like_sym(const at::Tensor& t) { return at::empty_symint(t.sym_sizes(), t.options()); }

std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl_fwd_meta(const at::Tensor& mu_q,
                                                               const at::Tensor& logvar_q,
                                                               const at::Tensor& mu_p,
                                                               const at::Tensor& logvar_p,
                                                               const at::Tensor& eps) {
  check_meta("gaussian_sample_kl_fwd", mu_q, {logvar_q, mu_p, logvar_p, eps});
  return {empty_like_sym(mu_q), empty_like_sym(mu_q)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_sample_kl_bwd_meta(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logvar_q,
    const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& eps) {
  check_meta("gaussian_sample_kl_bwd", mu_q, {grad_z, grad_kl, logvar_q, mu_p, logvar_p, eps});
  return {empty_like_sym(mu_q), empty_like_sym(mu_q), empty_like_sym(mu_q), empty_like_sym(mu_q),
          empty_like_sym(mu_q)};
}

at::Tensor discretized_logistic_nll_fwd_meta(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  check_meta("discretized_logistic_nll_fwd", x, {mean, log_scale});
  return empty_like_sym(x);
}

std::tuple<at::Tensor, at::Tensor> discretized_logistic_nll_bwd_meta(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& mean,
                                                          const at::Tensor& log_scale) {
  check_meta("discretized_logistic_nll_bwd", x, {grad, mean, log_scale});
  return {empty_like_sym(x), empty_like_sym(x)};
}

std::tuple<at::Tensor, at::Tensor> discretized_logistic_mixture_nll_fwd_meta(const at::Tensor& x,
                                                              const at::Tensor& logit_probs,
                                                              const at::Tensor& means,
                                                              const at::Tensor& log_scales,
                                                              const at::Tensor& coeffs) {
  TORCH_CHECK(x.dim() == 4 && logit_probs.dim() == 4 && means.dim() == 5 && log_scales.dim() == 5 &&
                  coeffs.dim() == 5,
              "discretized_logistic_mixture_nll_fwd: expected x, logit_probs 4-d and means, log_scales, coeffs 5-d");
  const auto acc = x.options().dtype(lse_dtype(x.scalar_type()));
  return {at::empty_symint({x.sym_size(0)}, acc), at::empty_symint({x.sym_size(0), x.sym_size(2), x.sym_size(3)}, acc)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discretized_logistic_mixture_nll_bwd_meta(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
    const at::Tensor& log_scales, const at::Tensor& coeffs, const at::Tensor& lse) {
  return {empty_like_sym(logit_probs), empty_like_sym(means), empty_like_sym(log_scales),
          empty_like_sym(coeffs)};
}

}  // namespace
}  // namespace matnet

TORCH_LIBRARY(matnet, m) {
  m.def("cuda_enabled() -> bool", &matnet::cuda_enabled);
  m.def(
      "gaussian_sample_kl_fwd(Tensor mu_q, Tensor logvar_q, Tensor mu_p, Tensor logvar_p, Tensor eps)"
      " -> (Tensor z, Tensor kl)");
  m.def(
      "gaussian_sample_kl_bwd(Tensor grad_z, Tensor grad_kl, Tensor mu_q, Tensor logvar_q, Tensor mu_p,"
      " Tensor logvar_p, Tensor eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("discretized_logistic_nll_fwd(Tensor x, Tensor mean, Tensor log_scale) -> Tensor");
  m.def("discretized_logistic_nll_bwd(Tensor grad, Tensor x, Tensor mean, Tensor log_scale) -> (Tensor, Tensor)");
  m.def(
      "discretized_logistic_mixture_nll_fwd(Tensor x, Tensor logit_probs, Tensor means, Tensor log_scales, Tensor coeffs)"
      " -> (Tensor nll, Tensor lse)");
  m.def(
      "discretized_logistic_mixture_nll_bwd(Tensor grad, Tensor x, Tensor logit_probs, Tensor means, Tensor log_scales,"
      " Tensor coeffs, Tensor lse) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(matnet, CPU, m) {
  m.impl("gaussian_sample_kl_fwd", &matnet::cpu::gaussian_sample_kl_fwd);
  m.impl("gaussian_sample_kl_bwd", &matnet::cpu::gaussian_sample_kl_bwd);
  m.impl("discretized_logistic_nll_fwd", &matnet::cpu::discretized_logistic_nll_fwd);
  m.impl("discretized_logistic_nll_bwd", &matnet::cpu::discretized_logistic_nll_bwd);
  m.impl("discretized_logistic_mixture_nll_fwd", &matnet::cpu::discretized_logistic_mixture_nll_fwd);
  m.impl("discretized_logistic_mixture_nll_bwd", &matnet::cpu::discretized_logistic_mixture_nll_bwd);
}

TORCH_LIBRARY_IMPL(matnet, Meta, m) {
  m.impl("gaussian_sample_kl_fwd", &matnet::gaussian_sample_kl_fwd_meta);
  m.impl("gaussian_sample_kl_bwd", &matnet::gaussian_sample_kl_bwd_meta);
  m.impl("discretized_logistic_nll_fwd", &matnet::discretized_logistic_nll_fwd_meta);
  m.impl("discretized_logistic_nll_bwd", &matnet::discretized_logistic_nll_bwd_meta);
  m.impl("discretized_logistic_mixture_nll_fwd", &matnet::discretized_logistic_mixture_nll_fwd_meta);
  m.impl("discretized_logistic_mixture_nll_bwd", &matnet::discretized_logistic_mixture_nll_bwd_meta);
}

#ifdef MATNET_WITH_CUDA
TORCH_LIBRARY_IMPL(matnet, CUDA, m) {
  m.impl("gaussian_sample_kl_fwd", &matnet::cuda::gaussian_sample_kl_fwd);
  m.impl("gaussian_sample_kl_bwd", &matnet::cuda::gaussian_sample_kl_bwd);
  m.impl("discretized_logistic_nll_fwd", &matnet::cuda::discretized_logistic_nll_fwd);
  m.impl("discretized_logistic_nll_bwd", &matnet::cuda::discretized_logistic_nll_bwd);
  m.impl("discretized_logistic_mixture_nll_fwd", &matnet::cuda::discretized_logistic_mixture_nll_fwd);
  m.impl("discretized_logistic_mixture_nll_bwd", &matnet::cuda::discretized_logistic_mixture_nll_bwd);
}
#endif
