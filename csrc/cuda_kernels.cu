// CUDA kernels: one thread per element (elementwise ops) or per pixel (mixture), grid-stride loops,
// fp32 math for fp16/bf16/fp32 storage and fp64 for fp64. The per-element math is matnet_math.h, shared
// with the CPU kernels. Depends on the CUDA runtime only (see cuda_kernels.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_kernels.h"
#include "matnet_math.h"

namespace matnet {
namespace math {
// torch compiles CUDA code with -D__CUDA_NO_HALF_CONVERSIONS__: convert explicitly.
template <>
MATNET_HD float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
MATNET_HD __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
MATNET_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
MATNET_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
}  // namespace math

namespace cuda_launch {
namespace {

using math::from_acc;
using math::to_acc;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename S>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

int64_t blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return b < kMaxBlocks ? b : kMaxBlocks;
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

#define MATNET_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename S>
__global__ void gaussian_fwd_kernel(const S* __restrict__ mu_q, const S* __restrict__ lq,
                                    const S* __restrict__ mu_p, const S* __restrict__ lp,
                                    const S* __restrict__ eps, S* __restrict__ z, S* __restrict__ kl,
                                    int64_t n) {
  using T = typename Acc<S>::type;
  MATNET_GRID_STRIDE(i, n) {
    T zi, ki;
    math::gaussian_sample_kl_fwd<T>(to_acc<T>(mu_q[i]), to_acc<T>(lq[i]), to_acc<T>(mu_p[i]),
                                    to_acc<T>(lp[i]), to_acc<T>(eps[i]), zi, ki);
    z[i] = from_acc<S>(zi);
    kl[i] = from_acc<S>(ki);
  }
}

template <typename S>
__global__ void gaussian_bwd_kernel(const S* __restrict__ gz, const S* __restrict__ gk,
                                    const S* __restrict__ mu_q, const S* __restrict__ lq,
                                    const S* __restrict__ mu_p, const S* __restrict__ lp,
                                    const S* __restrict__ eps, S* __restrict__ g_mu_q, S* __restrict__ g_lq,
                                    S* __restrict__ g_mu_p, S* __restrict__ g_lp, S* __restrict__ g_eps,
                                    int64_t n) {
  using T = typename Acc<S>::type;
  MATNET_GRID_STRIDE(i, n) {
    T a, b, c, d, e;
    math::gaussian_sample_kl_bwd<T>(to_acc<T>(gz[i]), to_acc<T>(gk[i]), to_acc<T>(mu_q[i]), to_acc<T>(lq[i]),
                                    to_acc<T>(mu_p[i]), to_acc<T>(lp[i]), to_acc<T>(eps[i]), a, b, c, d, e);
    g_mu_q[i] = from_acc<S>(a);
    g_lq[i] = from_acc<S>(b);
    g_mu_p[i] = from_acc<S>(c);
    g_lp[i] = from_acc<S>(d);
    g_eps[i] = from_acc<S>(e);
  }
}

template <typename S>
__global__ void dlogistic_fwd_kernel(const S* __restrict__ x, const S* __restrict__ mean,
                                     const S* __restrict__ ls, S* __restrict__ out, int64_t n) {
  using T = typename Acc<S>::type;
  MATNET_GRID_STRIDE(i, n) {
    out[i] = from_acc<S>(
        -math::log_bin_prob<T, false>(to_acc<T>(x[i]), to_acc<T>(mean[i]), to_acc<T>(ls[i])).logp);
  }
}

template <typename S>
__global__ void dlogistic_bwd_kernel(const S* __restrict__ grad, const S* __restrict__ x,
                                     const S* __restrict__ mean, const S* __restrict__ ls,
                                     S* __restrict__ g_mean, S* __restrict__ g_ls, int64_t n) {
  using T = typename Acc<S>::type;
  MATNET_GRID_STRIDE(i, n) {
    const math::BinTerms<T> t =
        math::log_bin_prob<T, true>(to_acc<T>(x[i]), to_acc<T>(mean[i]), to_acc<T>(ls[i]));
    const T g = to_acc<T>(grad[i]);
    g_mean[i] = from_acc<S>(-g * t.d_mean);  // nll = -L
    g_ls[i] = from_acc<S>(-g * t.d_lscale);
  }
}

template <typename S, int CT>
__global__ void mix_fwd_kernel(const S* __restrict__ x, const S* __restrict__ logit,
                               const S* __restrict__ means, const S* __restrict__ ls,
                               const S* __restrict__ coeffs, typename Acc<S>::type* __restrict__ pix_nll,
                               typename Acc<S>::type* __restrict__ lse, int64_t B, int K, int C, int64_t hw) {
  using T = typename Acc<S>::type;
  const int64_t P = C * (C - 1) / 2;
  MATNET_GRID_STRIDE(i, B * hw) {
    const int64_t b = i / hw, p = i % hw;
    const int64_t mo = b * K * C * hw + p;
    T l;
    pix_nll[i] = math::mixture_pixel_fwd<T, CT>(x + b * C * hw + p, logit + b * K * hw + p, means + mo,
                                                ls + mo, coeffs + b * K * P * hw + p, K, C, hw, l);
    lse[i] = l;
  }
}

template <typename S, int CT>
__global__ void mix_bwd_kernel(const typename Acc<S>::type* __restrict__ grad, const S* __restrict__ x,
                               const S* __restrict__ logit, const S* __restrict__ means,
                               const S* __restrict__ ls, const S* __restrict__ coeffs,
                               const typename Acc<S>::type* __restrict__ lse, S* __restrict__ g_logit,
                               S* __restrict__ g_means, S* __restrict__ g_ls, S* __restrict__ g_coeffs,
                               int64_t B, int K, int C, int64_t hw) {
  using T = typename Acc<S>::type;
  const int64_t P = C * (C - 1) / 2;
  MATNET_GRID_STRIDE(i, B * hw) {
    const int64_t b = i / hw, p = i % hw;
    const int64_t mo = b * K * C * hw + p, lo = b * K * hw + p, co = b * K * P * hw + p;
    math::mixture_pixel_bwd<T, CT>(grad[b], x + b * C * hw + p, logit + lo, means + mo, ls + mo,
                                   coeffs + co, K, C, hw, lse[i], g_logit + lo, g_means + mo, g_ls + mo,
                                   g_coeffs + co);
  }
}

// Calls body(S{}) with S the storage type of dt.
template <typename F>
const char* dispatch(DType dt, F&& body) {
  switch (dt) {
    case DType::kFloat32:
      body(float{});
      break;
    case DType::kFloat64:
      body(double{});
      break;
    case DType::kFloat16:
      body(__half{});
      break;
    case DType::kBFloat16:
      body(__nv_bfloat16{});
      break;
    default:
      return "matnet CUDA kernels: unsupported dtype";
  }
  return last_error();
}

template <typename S>
const S* cp(const void* p) {
  return static_cast<const S*>(p);
}
template <typename S>
S* mp(void* p) {
  return static_cast<S*>(p);
}

}  // namespace

const char* gaussian_sample_kl_fwd(DType dt, const void* mu_q, const void* logvar_q, const void* mu_p,
                                   const void* logvar_p, const void* eps, void* z, void* kl, int64_t n,
                                   void* stream) {
  if (n == 0) return nullptr;
  return dispatch(dt, [&](auto s) {
    using S = decltype(s);
    gaussian_fwd_kernel<S><<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        cp<S>(mu_q), cp<S>(logvar_q), cp<S>(mu_p), cp<S>(logvar_p), cp<S>(eps), mp<S>(z), mp<S>(kl), n);
  });
}

const char* gaussian_sample_kl_bwd(DType dt, const void* grad_z, const void* grad_kl, const void* mu_q,
                                   const void* logvar_q, const void* mu_p, const void* logvar_p,
                                   const void* eps, void* g_mu_q, void* g_logvar_q, void* g_mu_p,
                                   void* g_logvar_p, void* g_eps, int64_t n, void* stream) {
  if (n == 0) return nullptr;
  return dispatch(dt, [&](auto s) {
    using S = decltype(s);
    gaussian_bwd_kernel<S><<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        cp<S>(grad_z), cp<S>(grad_kl), cp<S>(mu_q), cp<S>(logvar_q), cp<S>(mu_p), cp<S>(logvar_p), cp<S>(eps),
        mp<S>(g_mu_q), mp<S>(g_logvar_q), mp<S>(g_mu_p), mp<S>(g_logvar_p), mp<S>(g_eps), n);
  });
}

const char* discretized_logistic_nll_fwd(DType dt, const void* x, const void* mean, const void* log_scale, void* out,
                              int64_t n, void* stream) {
  if (n == 0) return nullptr;
  return dispatch(dt, [&](auto s) {
    using S = decltype(s);
    dlogistic_fwd_kernel<S><<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        cp<S>(x), cp<S>(mean), cp<S>(log_scale), mp<S>(out), n);
  });
}

const char* discretized_logistic_nll_bwd(DType dt, const void* grad, const void* x, const void* mean,
                              const void* log_scale, void* g_mean, void* g_log_scale, int64_t n,
                              void* stream) {
  if (n == 0) return nullptr;
  return dispatch(dt, [&](auto s) {
    using S = decltype(s);
    dlogistic_bwd_kernel<S><<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        cp<S>(grad), cp<S>(x), cp<S>(mean), cp<S>(log_scale), mp<S>(g_mean), mp<S>(g_log_scale), n);
  });
}

const char* discretized_logistic_mixture_nll_fwd(DType dt, const void* x, const void* logit_probs, const void* means,
                                  const void* log_scales, const void* coeffs, void* pix_nll, void* lse,
                                  int64_t B, int K, int C, int64_t hw, void* stream) {
  const int64_t n = B * hw;
  if (n == 0) return nullptr;
  return dispatch(dt, [&](auto s) {
    using S = decltype(s);
    using T = typename Acc<S>::type;
    const auto cs = static_cast<cudaStream_t>(stream);
    const auto args = [&](auto kernel) {
      kernel<<<blocks_for(n), kThreads, 0, cs>>>(cp<S>(x), cp<S>(logit_probs), cp<S>(means),
                                                 cp<S>(log_scales), cp<S>(coeffs), static_cast<T*>(pix_nll),
                                                 static_cast<T*>(lse), B, K, C, hw);
    };
    if (C == 3) {
      args(mix_fwd_kernel<S, 3>);
    } else if (C == 1) {
      args(mix_fwd_kernel<S, 1>);
    } else {
      args(mix_fwd_kernel<S, 0>);
    }
  });
}

const char* discretized_logistic_mixture_nll_bwd(DType dt, const void* grad, const void* x, const void* logit_probs,
                                  const void* means, const void* log_scales, const void* coeffs,
                                  const void* lse, void* g_logit_probs, void* g_means, void* g_log_scales,
                                  void* g_coeffs, int64_t B, int K, int C, int64_t hw, void* stream) {
  const int64_t n = B * hw;
  if (n == 0) return nullptr;
  return dispatch(dt, [&](auto s) {
    using S = decltype(s);
    using T = typename Acc<S>::type;
    const auto cs = static_cast<cudaStream_t>(stream);
    const auto args = [&](auto kernel) {
      kernel<<<blocks_for(n), kThreads, 0, cs>>>(static_cast<const T*>(grad), cp<S>(x), cp<S>(logit_probs), cp<S>(means),
                                                 cp<S>(log_scales), cp<S>(coeffs), static_cast<const T*>(lse),
                                                 mp<S>(g_logit_probs), mp<S>(g_means), mp<S>(g_log_scales),
                                                 mp<S>(g_coeffs), B, K, C, hw);
    };
    if (C == 3) {
      args(mix_bwd_kernel<S, 3>);
    } else if (C == 1) {
      args(mix_bwd_kernel<S, 1>);
    } else {
      args(mix_bwd_kernel<S, 0>);
    }
  });
}

}  // namespace cuda_launch
}  // namespace matnet
