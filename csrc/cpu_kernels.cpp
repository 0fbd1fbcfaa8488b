// CPU kernels: one fused pass per op, parallel over elements / pixels with at::parallel_for (OpenMP in
// torch's CPU builds). fp16/bf16 inputs are computed in fp32 (at::opmath_type), fp64 in fp64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "matnet_math.h"
#include "ops.h"

namespace matnet {

void check_elementwise(const char* op, const at::Tensor& ref, std::initializer_list<at::Tensor> others) {
  TORCH_CHECK(at::isFloatingType(ref.scalar_type()), op, ": expected floating-point tensors, got ",
              ref.scalar_type());
  int i = 1;
  for (const at::Tensor& t : others) {
    TORCH_CHECK(t.device() == ref.device(), op, ": argument ", i, " is on ", t.device(), ", argument 0 on ",
                ref.device());
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": argument ", i, " has dtype ", t.scalar_type(),
                ", argument 0 has ", ref.scalar_type());
    TORCH_CHECK(t.sizes() == ref.sizes(), op, ": argument ", i, " has shape ", t.sizes(), ", argument 0 has ",
                ref.sizes());
    ++i;
  }
}

std::array<int64_t, 5> check_mixture(const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
                                     const at::Tensor& log_scales, const at::Tensor& coeffs) {
  const char* op = "dlogistic_mix_nll";
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected floating-point tensors, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(logit_probs.dim() == 4, op, ": logit_probs must be [B, K, H, W], got shape ", logit_probs.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = logit_probs.size(1);
  TORCH_CHECK(C >= 1 && K >= 1, op, ": need C >= 1 channels and K >= 1 components, got C=", C, ", K=", K);
  const std::vector<int64_t> lp{B, K, H, W}, mc{B, K, C, H, W}, cc{B, K, C * (C - 1) / 2, H, W};
  TORCH_CHECK(logit_probs.sizes() == at::IntArrayRef(lp), op, ": logit_probs must have shape ", lp, ", got ",
              logit_probs.sizes());
  TORCH_CHECK(means.sizes() == at::IntArrayRef(mc), op, ": means must have shape ", mc, ", got ", means.sizes());
  TORCH_CHECK(log_scales.sizes() == at::IntArrayRef(mc), op, ": log_scales must have shape ", mc, ", got ",
              log_scales.sizes());
  TORCH_CHECK(coeffs.sizes() == at::IntArrayRef(cc), op, ": coeffs must have shape ", cc, ", got ",
              coeffs.sizes());
  for (const at::Tensor* t : {&logit_probs, &means, &log_scales, &coeffs}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": all inputs must share x's dtype and device (", x.scalar_type(), ", ", x.device(), "), got ",
                t->scalar_type(), ", ", t->device());
  }
  return {B, K, C, H, W};
}

at::ScalarType lse_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

namespace cpu {
namespace {

// Grain sizes: below these, threading costs more than it saves.
constexpr int64_t kGrainElems = 8192;
constexpr int64_t kGrainPixels = 256;

template <typename scalar_t>
void gaussian_fwd_kernel(const scalar_t* mu_q, const scalar_t* lq, const scalar_t* mu_p, const scalar_t* lp,
                         const scalar_t* eps, scalar_t* z, scalar_t* kl, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t zi, ki;
      math::gaussian_sample_kl_fwd<acc_t>(mu_q[i], lq[i], mu_p[i], lp[i], eps[i], zi, ki);
      z[i] = static_cast<scalar_t>(zi);
      kl[i] = static_cast<scalar_t>(ki);
    }
  });
}

template <typename scalar_t>
void gaussian_bwd_kernel(const scalar_t* gz, const scalar_t* gk, const scalar_t* mu_q, const scalar_t* lq,
                         const scalar_t* mu_p, const scalar_t* lp, const scalar_t* eps, scalar_t* g_mu_q,
                         scalar_t* g_lq, scalar_t* g_mu_p, scalar_t* g_lp, scalar_t* g_eps, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t a, b, c, d, e;
      math::gaussian_sample_kl_bwd<acc_t>(gz[i], gk[i], mu_q[i], lq[i], mu_p[i], lp[i], eps[i], a, b, c, d, e);
      g_mu_q[i] = static_cast<scalar_t>(a);
      g_lq[i] = static_cast<scalar_t>(b);
      g_mu_p[i] = static_cast<scalar_t>(c);
      g_lp[i] = static_cast<scalar_t>(d);
      g_eps[i] = static_cast<scalar_t>(e);
    }
  });
}

template <typename scalar_t>
void dlogistic_fwd_kernel(const scalar_t* x, const scalar_t* mean, const scalar_t* ls, scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<scalar_t>(-math::log_bin_prob<acc_t, false>(x[i], mean[i], ls[i]).logp);
    }
  });
}

template <typename scalar_t>
void dlogistic_bwd_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* mean, const scalar_t* ls,
                          scalar_t* g_mean, scalar_t* g_ls, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto t = math::log_bin_prob<acc_t, true>(x[i], mean[i], ls[i]);
      const acc_t g = grad[i];
      g_mean[i] = static_cast<scalar_t>(-g * t.d_mean);  // nll = -L
      g_ls[i] = static_cast<scalar_t>(-g * t.d_lscale);
    }
  });
}

struct MixturePtrs {
  int64_t K, C, P, hw;
  // Offsets of pixel (b, p) in each input: b * (per-example size) + p.
  int64_t x_off(int64_t b) const { return b * C * hw; }
  int64_t l_off(int64_t b) const { return b * K * hw; }
  int64_t m_off(int64_t b) const { return b * K * C * hw; }
  int64_t c_off(int64_t b) const { return b * K * P * hw; }
};

template <typename scalar_t, int CT>
void mix_fwd_kernel(const scalar_t* x, const scalar_t* logit, const scalar_t* means, const scalar_t* ls,
                    const scalar_t* coeffs, at::opmath_type<scalar_t>* pix_nll, at::opmath_type<scalar_t>* lse,
                    const MixturePtrs& d, int64_t n_pix) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n_pix, kGrainPixels, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / d.hw, p = i % d.hw;
      pix_nll[i] = math::mixture_pixel_fwd<acc_t, CT>(x + d.x_off(b) + p, logit + d.l_off(b) + p,
                                                      means + d.m_off(b) + p, ls + d.m_off(b) + p,
                                                      coeffs + d.c_off(b) + p, d.K, d.C, d.hw, lse[i]);
    }
  });
}

template <typename scalar_t, int CT>
void mix_bwd_kernel(const scalar_t* grad, const scalar_t* x, const scalar_t* logit, const scalar_t* means,
                    const scalar_t* ls, const scalar_t* coeffs, const at::opmath_type<scalar_t>* lse,
                    scalar_t* g_logit, scalar_t* g_means, scalar_t* g_ls, scalar_t* g_coeffs, const MixturePtrs& d,
                    int64_t n_pix) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n_pix, kGrainPixels, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / d.hw, p = i % d.hw;
      const int64_t mo = d.m_off(b) + p;
      math::mixture_pixel_bwd<acc_t, CT>(static_cast<acc_t>(grad[b]), x + d.x_off(b) + p, logit + d.l_off(b) + p,
                                         means + mo, ls + mo, coeffs + d.c_off(b) + p, d.K, d.C, d.hw, lse[i],
                                         g_logit + d.l_off(b) + p, g_means + mo, g_ls + mo,
                                         g_coeffs + d.c_off(b) + p);
    }
  });
}

// Runs `body` with CT set to the compile-time channel count (1, 3) or 0 (any C).
template <typename F>
void dispatch_channels(int64_t C, F&& body) {
  if (C == 3) {
    body(std::integral_constant<int, 3>{});
  } else if (C == 1) {
    body(std::integral_constant<int, 1>{});
  } else {
    body(std::integral_constant<int, 0>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl_fwd(const at::Tensor& mu_q, const at::Tensor& logvar_q,
                                                          const at::Tensor& mu_p, const at::Tensor& logvar_p,
                                                          const at::Tensor& eps) {
  check_elementwise("gaussian_sample_kl_fwd", mu_q, {logvar_q, mu_p, logvar_p, eps});
  const auto a = mu_q.contiguous(), b = logvar_q.contiguous(), c = mu_p.contiguous(), d = logvar_p.contiguous(),
             e = eps.contiguous();
  auto z = at::empty_like(a, at::MemoryFormat::Contiguous);
  auto kl = at::empty_like(a, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gaussian_sample_kl_fwd", [&] {
    gaussian_fwd_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                  c.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
                                  e.const_data_ptr<scalar_t>(), z.mutable_data_ptr<scalar_t>(),
                                  kl.mutable_data_ptr<scalar_t>(), a.numel());
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_sample_kl_bwd(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logvar_q,
    const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& eps) {
  check_elementwise("gaussian_sample_kl_bwd", mu_q, {grad_z, grad_kl, logvar_q, mu_p, logvar_p, eps});
  const auto gz = grad_z.contiguous(), gk = grad_kl.contiguous(), a = mu_q.contiguous(), b = logvar_q.contiguous(),
             c = mu_p.contiguous(), d = logvar_p.contiguous(), e = eps.contiguous();
  auto g_mu_q = at::empty_like(a, at::MemoryFormat::Contiguous), g_lq = at::empty_like(g_mu_q),
       g_mu_p = at::empty_like(g_mu_q), g_lp = at::empty_like(g_mu_q), g_eps = at::empty_like(g_mu_q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gaussian_sample_kl_bwd", [&] {
    gaussian_bwd_kernel<scalar_t>(
        gz.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
        e.const_data_ptr<scalar_t>(), g_mu_q.mutable_data_ptr<scalar_t>(), g_lq.mutable_data_ptr<scalar_t>(),
        g_mu_p.mutable_data_ptr<scalar_t>(), g_lp.mutable_data_ptr<scalar_t>(), g_eps.mutable_data_ptr<scalar_t>(),
        a.numel());
  });
  return {g_mu_q, g_lq, g_mu_p, g_lp, g_eps};
}

at::Tensor dlogistic_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  check_elementwise("dlogistic_nll_fwd", x, {mean, log_scale});
  const auto xc = x.contiguous(), mc = mean.contiguous(), lc = log_scale.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dlogistic_nll_fwd", [&] {
    dlogistic_fwd_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(),
                                   lc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), xc.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dlogistic_nll_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& log_scale) {
  check_elementwise("dlogistic_nll_bwd", x, {grad, mean, log_scale});
  const auto gc = grad.contiguous(), xc = x.contiguous(), mc = mean.contiguous(), lc = log_scale.contiguous();
  auto g_mean = at::empty_like(xc, at::MemoryFormat::Contiguous), g_ls = at::empty_like(g_mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dlogistic_nll_bwd", [&] {
    dlogistic_bwd_kernel<scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                   mc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(),
                                   g_mean.mutable_data_ptr<scalar_t>(), g_ls.mutable_data_ptr<scalar_t>(),
                                   xc.numel());
  });
  return {g_mean, g_ls};
}

std::tuple<at::Tensor, at::Tensor> dlogistic_mix_nll_fwd(const at::Tensor& x, const at::Tensor& logit_probs,
                                                         const at::Tensor& means, const at::Tensor& log_scales,
                                                         const at::Tensor& coeffs) {
  const auto [B, K, C, H, W] = check_mixture(x, logit_probs, means, log_scales, coeffs);
  const auto xc = x.contiguous(), lc = logit_probs.contiguous(), mc = means.contiguous(),
             sc = log_scales.contiguous(), cc = coeffs.contiguous();
  const auto acc = x.options().dtype(lse_dtype(x.scalar_type()));
  auto lse = at::empty({B, H, W}, acc);
  auto pix = at::empty({B, H * W}, acc);
  const MixturePtrs d{K, C, C * (C - 1) / 2, H * W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dlogistic_mix_nll_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_channels(C, [&](auto ct) {
      mix_fwd_kernel<scalar_t, decltype(ct)::value>(
          xc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(),
          sc.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(), pix.mutable_data_ptr<acc_t>(),
          lse.mutable_data_ptr<acc_t>(), d, B * H * W);
    });
  });
  // Per-pixel terms are summed by torch's reduction: deterministic, and accumulated in fp32 or better.
  return {pix.sum(1).to(x.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dlogistic_mix_nll_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
    const at::Tensor& log_scales, const at::Tensor& coeffs, const at::Tensor& lse) {
  const auto [B, K, C, H, W] = check_mixture(x, logit_probs, means, log_scales, coeffs);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B}) && grad.scalar_type() == x.scalar_type(),
              "dlogistic_mix_nll_bwd: grad must be [B] of x's dtype, got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, W}) && lse.scalar_type() == lse_dtype(x.scalar_type()),
              "dlogistic_mix_nll_bwd: lse must be [B, H, W] of dtype ", lse_dtype(x.scalar_type()), ", got ",
              lse.sizes(), " ", lse.scalar_type());
  const auto gc = grad.contiguous(), xc = x.contiguous(), lc = logit_probs.contiguous(), mc = means.contiguous(),
             sc = log_scales.contiguous(), cc = coeffs.contiguous(), ec = lse.contiguous();
  auto g_logit = at::empty_like(lc), g_means = at::empty_like(mc), g_ls = at::empty_like(sc),
       g_coeffs = at::empty_like(cc);
  const MixturePtrs d{K, C, C * (C - 1) / 2, H * W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "dlogistic_mix_nll_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_channels(C, [&](auto ct) {
      mix_bwd_kernel<scalar_t, decltype(ct)::value>(
          gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>(),
          mc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(),
          ec.const_data_ptr<acc_t>(), g_logit.mutable_data_ptr<scalar_t>(), g_means.mutable_data_ptr<scalar_t>(),
          g_ls.mutable_data_ptr<scalar_t>(), g_coeffs.mutable_data_ptr<scalar_t>(), d, B * H * W);
    });
  });
  return {g_logit, g_means, g_ls, g_coeffs};
}

}  // namespace cpu
}  // namespace matnet
