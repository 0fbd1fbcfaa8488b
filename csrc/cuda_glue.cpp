// Torch-facing side of the CUDA kernels: argument checks, output allocation, the current stream, then a
// call into cuda_kernels.cu. Uses c10's device-generic guard/stream API only (no ATen/cuda headers), so
// it compiles against any torch build; it is part of the extension only with -DMATNET_WITH_CUDA.
#ifdef MATNET_WITH_CUDA

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "cuda_kernels.h"
#include "ops.h"

namespace matnet {
namespace cuda {
namespace {

using cuda_launch::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "matnet CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", t.device());
}

void raise_if(const char* err, const char* op) { TORCH_CHECK(err == nullptr, op, ": CUDA error: ", err); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl_fwd(const at::Tensor& mu_q, const at::Tensor& logvar_q,
                                                          const at::Tensor& mu_p, const at::Tensor& logvar_p,
                                                          const at::Tensor& eps) {
  const char* op = "gaussian_sample_kl_fwd";
  check_cuda(op, mu_q);
  check_elementwise(op, mu_q, {logvar_q, mu_p, logvar_p, eps});
  c10::DeviceGuard guard(mu_q.device());
  const auto a = mu_q.contiguous(), b = logvar_q.contiguous(), c = mu_p.contiguous(),
             d = logvar_p.contiguous(), e = eps.contiguous();
  auto z = at::empty_like(a), kl = at::empty_like(a);
  raise_if(cuda_launch::gaussian_sample_kl_fwd(
               dtype_of(a), a.const_data_ptr(), b.const_data_ptr(), c.const_data_ptr(), d.const_data_ptr(),
               e.const_data_ptr(), z.mutable_data_ptr(), kl.mutable_data_ptr(), a.numel(), current_stream(a)),
           op);
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_sample_kl_bwd(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logvar_q,
    const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& eps) {
  const char* op = "gaussian_sample_kl_bwd";
  check_cuda(op, mu_q);
  check_elementwise(op, mu_q, {grad_z, grad_kl, logvar_q, mu_p, logvar_p, eps});
  c10::DeviceGuard guard(mu_q.device());
  const auto gz = grad_z.contiguous(), gk = grad_kl.contiguous(), a = mu_q.contiguous(),
             b = logvar_q.contiguous(), c = mu_p.contiguous(), d = logvar_p.contiguous(),
             e = eps.contiguous();
  auto g0 = at::empty_like(a), g1 = at::empty_like(a), g2 = at::empty_like(a), g3 = at::empty_like(a),
       g4 = at::empty_like(a);
  raise_if(cuda_launch::gaussian_sample_kl_bwd(
               dtype_of(a), gz.const_data_ptr(), gk.const_data_ptr(), a.const_data_ptr(), b.const_data_ptr(),
               c.const_data_ptr(), d.const_data_ptr(), e.const_data_ptr(), g0.mutable_data_ptr(),
               g1.mutable_data_ptr(), g2.mutable_data_ptr(), g3.mutable_data_ptr(), g4.mutable_data_ptr(),
               a.numel(), current_stream(a)),
           op);
  return {g0, g1, g2, g3, g4};
}

at::Tensor discretized_logistic_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  const char* op = "discretized_logistic_nll_fwd";
  check_cuda(op, x);
  check_elementwise(op, x, {mean, log_scale});
  c10::DeviceGuard guard(x.device());
  const auto xc = x.contiguous(), mc = mean.contiguous(), lc = log_scale.contiguous();
  auto out = at::empty_like(xc);
  raise_if(cuda_launch::discretized_logistic_nll_fwd(dtype_of(xc), xc.const_data_ptr(), mc.const_data_ptr(),
                                          lc.const_data_ptr(), out.mutable_data_ptr(), xc.numel(),
                                          current_stream(xc)),
           op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> discretized_logistic_nll_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& log_scale) {
  const char* op = "discretized_logistic_nll_bwd";
  check_cuda(op, x);
  check_elementwise(op, x, {grad, mean, log_scale});
  c10::DeviceGuard guard(x.device());
  const auto gc = grad.contiguous(), xc = x.contiguous(), mc = mean.contiguous(), lc = log_scale.contiguous();
  auto g_mean = at::empty_like(xc), g_ls = at::empty_like(xc);
  raise_if(cuda_launch::discretized_logistic_nll_bwd(dtype_of(xc), gc.const_data_ptr(), xc.const_data_ptr(),
                                          mc.const_data_ptr(), lc.const_data_ptr(), g_mean.mutable_data_ptr(),
                                          g_ls.mutable_data_ptr(), xc.numel(), current_stream(xc)),
           op);
  return {g_mean, g_ls};
}

std::tuple<at::Tensor, at::Tensor> discretized_logistic_mixture_nll_fwd(const at::Tensor& x, const at::Tensor& logit_probs,
                                                         const at::Tensor& means,
                                                         const at::Tensor& log_scales,
                                                         const at::Tensor& coeffs) {
  const char* op = "discretized_logistic_mixture_nll_fwd";
  check_cuda(op, x);
  const auto [B, K, C, H, W] = check_mixture(x, logit_probs, means, log_scales, coeffs);
  c10::DeviceGuard guard(x.device());
  const auto xc = x.contiguous(), lc = logit_probs.contiguous(), mc = means.contiguous(),
             sc = log_scales.contiguous(), cc = coeffs.contiguous();
  const auto acc = x.options().dtype(lse_dtype(x.scalar_type()));
  auto pix = at::empty({B, H * W}, acc), lse = at::empty({B, H, W}, acc);
  raise_if(cuda_launch::discretized_logistic_mixture_nll_fwd(
               dtype_of(xc), xc.const_data_ptr(), lc.const_data_ptr(), mc.const_data_ptr(),
               sc.const_data_ptr(), cc.const_data_ptr(), pix.mutable_data_ptr(), lse.mutable_data_ptr(), B,
               static_cast<int>(K), static_cast<int>(C), H * W, current_stream(xc)),
           op);
  return {pix.sum(1), lse};  // in fp32 (fp64): see cpu_kernels.cpp
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discretized_logistic_mixture_nll_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
    const at::Tensor& log_scales, const at::Tensor& coeffs, const at::Tensor& lse) {
  const char* op = "discretized_logistic_mixture_nll_bwd";
  check_cuda(op, x);
  const auto [B, K, C, H, W] = check_mixture(x, logit_probs, means, log_scales, coeffs);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B}) && grad.scalar_type() == lse_dtype(x.scalar_type()) &&
                  grad.device() == x.device(),
              op, ": grad must be [B] of the nll's dtype (fp32, fp64 for fp64 x) on x's device");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, W}) && lse.scalar_type() == lse_dtype(x.scalar_type()) &&
                  lse.device() == x.device(),
              op, ": lse must be [B, H, W] of dtype ", lse_dtype(x.scalar_type()), " on x's device");
  c10::DeviceGuard guard(x.device());
  const auto gc = grad.contiguous(), xc = x.contiguous(), lc = logit_probs.contiguous(),
             mc = means.contiguous(), sc = log_scales.contiguous(), cc = coeffs.contiguous(),
             ec = lse.contiguous();
  auto g_logit = at::empty_like(lc), g_means = at::empty_like(mc), g_ls = at::empty_like(sc),
       g_coeffs = at::empty_like(cc);
  raise_if(
      cuda_launch::discretized_logistic_mixture_nll_bwd(
          dtype_of(xc), gc.const_data_ptr(), xc.const_data_ptr(), lc.const_data_ptr(), mc.const_data_ptr(),
          sc.const_data_ptr(), cc.const_data_ptr(), ec.const_data_ptr(), g_logit.mutable_data_ptr(),
          g_means.mutable_data_ptr(), g_ls.mutable_data_ptr(), g_coeffs.mutable_data_ptr(), B,
          static_cast<int>(K), static_cast<int>(C), H * W, current_stream(xc)),
      op);
  return {g_logit, g_means, g_ls, g_coeffs};
}

}  // namespace cuda
}  // namespace matnet

#endif  // MATNET_WITH_CUDA
