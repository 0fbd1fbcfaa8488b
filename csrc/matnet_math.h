// Per-element math shared by the CPU (cpu_kernels.cpp) and CUDA (cuda_kernels.cu) kernels.
//
// Header-only, no torch: every function works on one element in the accumulation type T (float for
// fp16/bf16/fp32 inputs, double for fp64) and compiles as host and device code. On the host, fp32
// exp/log/log1p/expm1 are branch-free polynomial versions (namespace simd) so that the CPU loops
// vectorize; the GPU uses its own. The semantics are those of matnet/ops/reference.py.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

// Always inlined: the CPU loops only vectorize when every call in their body is inlined.
#if defined(__CUDACC__)
#define MATNET_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define MATNET_HD inline __attribute__((always_inline))
#else
#define MATNET_HD inline
#endif

namespace matnet {
namespace math {

// 256 bins on [-1, 1]: half a bin width, and the threshold past which x is an edge bin.
constexpr double kBinHalfWidth = 1.0 / 255.0;
constexpr double kEdge = 0.999;

#if !defined(__CUDA_ARCH__)
// Host fp32 math without libm calls or branches, so that loops under `#pragma omp simd` vectorize.
// exp/log are the Cephes single-precision algorithms (about 1 ulp); results below FLT_MIN flush to 0.
namespace simd {

MATNET_HD float as_float(int32_t i) {
  float f;
  memcpy(&f, &i, sizeof f);
  return f;
}
MATNET_HD int32_t as_int(float f) {
  int32_t i;
  memcpy(&i, &f, sizeof i);
  return i;
}

MATNET_HD float exp(float x) {
  const float hi = 88.7228391f, lo = -87.3365448f;  // exp(lo) = FLT_MIN
  float xc = x > hi ? hi : x;                       // NaN passes through both clamps
  xc = xc < lo ? lo : xc;
  // x = n*ln2 + r, |r| <= ln2/2; n rounded by the 1.5*2^23 trick (default rounding mode, no fast-math)
  float fn = xc * 1.44269504088896341f;
  fn = (fn + 12582912.0f) - 12582912.0f;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  // scale by 2^n in two halves: n reaches 128 just below the overflow threshold
  const int32_t n = static_cast<int32_t>(fn);
  const int32_t n1 = n >> 1;
  const float y = (p * r * r + r + 1.0f) * as_float((n1 + 127) << 23) * as_float((n - n1 + 127) << 23);
  return x > hi ? INFINITY : (x < lo ? 0.0f : y);
}

MATNET_HD float log(float x) {
  const bool sub = x < 1.17549435e-38f;  // subnormal (or <= 0): scale into the normal range first
  const float xs = sub ? x * 8388608.0f : x;
  const int32_t bits = as_int(xs);
  int32_t e = ((bits >> 23) & 0xff) - (sub ? 149 : 126);
  float m = as_float((bits & 0x007fffff) | 0x3f000000);  // xs = m * 2^e, m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  float r = m + y + 0.693359375f * fe;
  r = x >= 0.0f ? r : NAN;  // negative or NaN
  r = x == 0.0f ? -INFINITY : r;
  return x == INFINITY ? INFINITY : r;
}

// log(1 + x) = log(u) * x / (u - 1) with u = 1 + x rounded: exact to a few ulp even for tiny x.
MATNET_HD float log1p(float x) {
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  return d == 0.0f ? x : (u == INFINITY ? INFINITY : log(u) * (x / d));
}

// Taylor series (degree 8, error < 1e-8 relative) where exp(x) - 1 would cancel.
MATNET_HD float expm1(float x) {
  float p = 1.0f + x * (1.0f / 8.0f);
  p = 1.0f + x * (1.0f / 7.0f) * p;
  p = 1.0f + x * (1.0f / 6.0f) * p;
  p = 1.0f + x * (1.0f / 5.0f) * p;
  p = 1.0f + x * (1.0f / 4.0f) * p;
  p = 1.0f + x * (1.0f / 3.0f) * p;
  p = 1.0f + x * 0.5f * p;
  const float big = exp(x) - 1.0f;
  const float ax = x < 0.0f ? -x : x;
  return ax < 0.5f ? x * p : big;
}

}  // namespace simd
#endif

// fp32: hardware/libdevice functions on the GPU, the vectorizable ones above on the host.
// fp64 (tests, gradcheck): libm / libdevice.
#if defined(__CUDA_ARCH__)
MATNET_HD float exp_(float x) { return expf(x); }
MATNET_HD float log_(float x) { return logf(x); }
MATNET_HD float log1p_(float x) { return log1pf(x); }
MATNET_HD float expm1_(float x) { return expm1f(x); }
#else
MATNET_HD float exp_(float x) { return simd::exp(x); }
MATNET_HD float log_(float x) { return simd::log(x); }
MATNET_HD float log1p_(float x) { return simd::log1p(x); }
MATNET_HD float expm1_(float x) { return simd::expm1(x); }
#endif
MATNET_HD double exp_(double x) { return ::exp(x); }
MATNET_HD double log_(double x) { return ::log(x); }
MATNET_HD double log1p_(double x) { return ::log1p(x); }
MATNET_HD double expm1_(double x) { return ::expm1(x); }
template <typename T>
MATNET_HD T max_(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
MATNET_HD T min_(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
MATNET_HD T tiny_();
template <>
MATNET_HD float tiny_<float>() {
  return 1.17549435e-38f;
}
template <>
MATNET_HD double tiny_<double>() {
  return 2.2250738585072014e-308;
}

// ---- reparametrized Gaussian sample and KL(q || p) ----
//
// s = exp(lq / 2), d = mu_q - mu_p
// z  = mu_q + s * eps
// kl = (lp - lq + (s^2 + d^2) * exp(-lp) - 1) / 2
template <typename T>
MATNET_HD void gaussian_sample_kl_fwd(T mu_q, T lq, T mu_p, T lp, T eps, T& z, T& kl) {
  const T s = exp_(T(0.5) * lq);
  const T d = mu_q - mu_p;
  z = mu_q + s * eps;
  kl = T(0.5) * (lp - lq + (s * s + d * d) * exp_(-lp) - T(1));
}

// Chain rule of the above for upstream gradients gz (of z) and gk (of kl):
// dz/dmu_q = 1, dz/dlq = s*eps/2, dz/deps = s;
// dkl/dmu_q = -dkl/dmu_p = d*exp(-lp), dkl/dlq = (s^2*exp(-lp) - 1)/2, dkl/dlp = (1 - (s^2+d^2)*exp(-lp))/2.
template <typename T>
MATNET_HD void gaussian_sample_kl_bwd(T gz, T gk, T mu_q, T lq, T mu_p, T lp, T eps, T& g_mu_q, T& g_lq,
                                      T& g_mu_p, T& g_lp, T& g_eps) {
  const T s = exp_(T(0.5) * lq);
  const T ip = exp_(-lp);
  const T d = mu_q - mu_p;
  const T v_ip = s * s * ip;
  const T dkl_dmu = d * ip;
  g_mu_q = gz + gk * dkl_dmu;
  g_mu_p = -gk * dkl_dmu;
  g_lq = T(0.5) * (gz * s * eps + gk * (v_ip - T(1)));
  g_lp = T(0.5) * gk * (T(1) - v_ip - d * dkl_dmu);
  g_eps = gz * s;
}

// ---- discretized logistic: log P(bin of x) and its gradient ----
//
// inv_s = exp(-log_scale), a = inv_s*(x - mean + h), b = inv_s*(x - mean - h), h = 1/255.
// first bin (x < -0.999): L = log sigmoid(a)
// last bin  (x >  0.999): L = log(1 - sigmoid(b)) = -softplus(b)
// interior:  L = log(sigmoid(a) - sigmoid(b)) = a + log(-expm1(b - a)) - softplus(a) - softplus(b)
//              = min(a,0) - max(b,0) + log(-expm1(-u) / ((1 + e^-|a|)(1 + e^-|b|))),  u = a - b = 2h*inv_s
// The last form needs one log, has no cancellation for any scale, and u is taken as 2h*inv_s rather than
// the difference of a and b (which loses digits when |x - mean| >> h). u is floored at the smallest
// normal number, as the reference clamps b - a.
// Gradient (interior), with r = 1/expm1(u): dL/da = sigmoid(-a) + r, dL/db = -sigmoid(b) - r, so
//   dL/dmean     = -inv_s * (sigmoid(-a) - sigmoid(b))        (r cancels)
//   dL/dlogscale = -(a*sigmoid(-a) - b*sigmoid(b) + u*r),     u*r = u/expm1(u) = -u*(1 + expm1(-u))/expm1(-u)
template <typename T>
struct BinTerms {
  T logp;      // L
  T d_mean;    // dL/dmean
  T d_lscale;  // dL/dlog_scale
};

template <typename T, bool kGrad>
MATNET_HD BinTerms<T> log_bin_prob(T x, T mean, T log_scale) {
  // Branch-free (the CPU loops vectorize): the interior terms cover both edge cases, which then select.
  const T h = T(kBinHalfWidth);
  const T inv_s = exp_(-log_scale);
  const T c = x - mean;
  const T a = inv_s * (c + h);
  const T b = inv_s * (c - h);
  const T u = max_(T(2) * h * inv_s, tiny_<T>());
  const T em = expm1_(-u);  // in [-1, 0)
  const T ea = exp_(-(a < T(0) ? -a : a));
  const T eb = exp_(-(b < T(0) ? -b : b));
  const T pa = T(1) + ea;
  const T pb = T(1) + eb;
  const bool first = x < T(-kEdge);
  const bool last = x > T(kEdge);
  // first: log sigmoid(a) = min(a,0) - log(1 + ea); last: -softplus(b) = -max(b,0) - log(1 + eb); one log
  const T lead = first ? min_(a, T(0)) : (last ? -max_(b, T(0)) : min_(a, T(0)) - max_(b, T(0)));
  const T arg = first ? T(1) / pa : (last ? T(1) / pb : -em / (pa * pb));
  BinTerms<T> r{};
  r.logp = lead + log_(arg);
  if (kGrad) {
    const T sig_neg_a = a >= T(0) ? ea / pa : T(1) / pa;  // 1 - sigmoid(a)
    const T sig_b = b >= T(0) ? T(1) / pb : eb / pb;
    const T ur = -u * (T(1) + em) / em;
    // first bin: dL/da = sigmoid(-a); last bin: dL/db = -sigmoid(b); interior: both plus the r terms
    const T da = last ? T(0) : sig_neg_a;
    const T db = first ? T(0) : sig_b;
    const T dur = first ? T(0) : (last ? T(0) : ur);
    r.d_mean = -inv_s * (da - db);
    r.d_lscale = -(a * da - b * db + dur);
  }
  return r;
}

// Index of the coefficient pair (j, c), j < c, in the order (0,1), (0,2), (1,2), (0,3), ...
MATNET_HD int pair_index(int j, int c) { return c * (c - 1) / 2 + j; }

// Streaming log-sum-exp: (m, s) represent log(sum) = m + log(s). Start from (lse_start<T>(), 0): the lowest
// finite number rather than -inf, so that v - m is never (-inf) - (-inf) and no test is needed for it.
template <typename T>
MATNET_HD T lse_start();
template <>
MATNET_HD float lse_start<float>() {
  return -3.402823466e38f;
}
template <>
MATNET_HD double lse_start<double>() {
  return -1.7976931348623157e308;
}

template <typename T>
MATNET_HD void lse_push(T v, T& m, T& s) {
  const T d = v - m;
  const T e = exp_(-(d < T(0) ? -d : d));
  const bool up = d > T(0);
  s = up ? s * e + T(1) : s + e;
  m = up ? v : m;
}

template <typename T>
MATNET_HD T lse_value(T m, T s) {
  return m + log_(s);
}

// ---- element conversion: storage type S <-> accumulation type T ----
// The CUDA file specializes these for __half / __nv_bfloat16 (torch builds CUDA code with the implicit
// half conversions switched off); c10::Half / c10::BFloat16 convert with static_cast.
template <typename T, typename S>
MATNET_HD T to_acc(S v) {
  return static_cast<T>(v);
}
template <typename S, typename T>
MATNET_HD S from_acc(T v) {
  return static_cast<S>(v);
}

// ---- PixelCNN++ discretized logistic mixture, one pixel ----
//
// Pointers are offset to the pixel (b, :, i, j); consecutive channels / mixture components are `hw` apart:
//   x[c*hw]                      x:           [B, C, H, W]
//   logit[k*hw]                  logit_probs: [B, K, H, W]
//   means[(k*C + c)*hw]          means, log_scales: [B, K, C, H, W]
//   coeffs[(k*P + pair)*hw]      coeffs:      [B, K, P, H, W], P = C*(C-1)/2
// mean'_kc = means_kc + sum_{j<c} coeffs_k,pair(j,c) * x_j
// lp_k = sum_c L(x_c; mean'_kc, log_scales_kc)      (L from log_bin_prob)
// lse_joint = logsumexp_k(lp_k + logit_k),  lse_logit = logsumexp_k(logit_k)
// -log p(x_pixel) = lse_logit - lse_joint
// CT is the channel count when known at compile time (1, 3), or 0 for any C (given as c_dyn).

template <typename T, int CT, typename S>
MATNET_HD T load_x(const T* xv, const S* x, int c, long long hw) {
  if constexpr (CT > 0) {
    return xv[c];
  } else {
    return to_acc<T>(x[c * hw]);
  }
}

template <typename T, int CT, typename S>
MATNET_HD T channel_mean(const S* means, const S* coeffs, const T* xv, const S* x, int k, int c, int C, int P,
                         long long hw) {
  T m = to_acc<T>(means[(static_cast<long long>(k) * C + c) * hw]);
  for (int j = 0; j < c; ++j) {
    m += to_acc<T>(coeffs[(static_cast<long long>(k) * P + pair_index(j, c)) * hw]) *
         load_x<T, CT>(xv, x, j, hw);
  }
  return m;
}

// Forward: returns -log p(x_pixel) and writes lse_joint (kept for the backward).
template <typename T, int CT, typename S>
MATNET_HD T mixture_pixel_fwd(const S* x, const S* logit, const S* means, const S* log_scales,
                              const S* coeffs, int K, int c_dyn, long long hw, T& lse_joint) {
  const int C = CT > 0 ? CT : c_dyn;
  const int P = C * (C - 1) / 2;
  T xv[CT > 0 ? CT : 1];
  if constexpr (CT > 0) {
    for (int c = 0; c < C; ++c) xv[c] = to_acc<T>(x[c * hw]);
  }
  T mj = lse_start<T>(), sj = T(0), ml = lse_start<T>(), sl = T(0);
  for (int k = 0; k < K; ++k) {
    T lp = T(0);
    for (int c = 0; c < C; ++c) {
      const T m = channel_mean<T, CT>(means, coeffs, xv, x, k, c, C, P, hw);
      const T ls = to_acc<T>(log_scales[(static_cast<long long>(k) * C + c) * hw]);
      lp += log_bin_prob<T, false>(load_x<T, CT>(xv, x, c, hw), m, ls).logp;
    }
    const T lg = to_acc<T>(logit[k * hw]);
    lse_push(lp + lg, mj, sj);
    lse_push(lg, ml, sl);
  }
  lse_joint = lse_value(mj, sj);
  return lse_value(ml, sl) - lse_joint;
}

// Backward for an upstream gradient g of -log p(x_pixel). With responsibilities w_k = exp(lp_k + logit_k -
// lse_joint) and mixture weights pi_k = softmax(logit)_k:
//   d/dlogit_k = g*(pi_k - w_k),  d/dmeans_kc = -g*w_k*dL_kc/dmean',  d/dlog_scales_kc =
//   -g*w_k*dL_kc/dlog_scale, d/dcoeffs_k,pair(j,c) = d/dmeans_kc * x_j.   x gets no gradient.
// With CT known the per-channel derivatives stay in registers; for any C they are recomputed in a second
// pass.
template <typename T, int CT, typename S>
MATNET_HD void mixture_pixel_bwd(T g, const S* x, const S* logit, const S* means, const S* log_scales,
                                 const S* coeffs, int K, int c_dyn, long long hw, T lse_joint, S* g_logit,
                                 S* g_means, S* g_log_scales, S* g_coeffs) {
  const int C = CT > 0 ? CT : c_dyn;
  const int P = C * (C - 1) / 2;
  constexpr int kBuf = CT > 0 ? CT : 1;
  T xv[kBuf], dm[kBuf], dls[kBuf];
  if constexpr (CT > 0) {
    for (int c = 0; c < C; ++c) xv[c] = to_acc<T>(x[c * hw]);
  }
  T ml = lse_start<T>(), sl = T(0);
  for (int k = 0; k < K; ++k) lse_push(to_acc<T>(logit[k * hw]), ml, sl);
  const T lse_logit = lse_value(ml, sl);

  for (int k = 0; k < K; ++k) {
    T lp = T(0);
    for (int c = 0; c < C; ++c) {
      const T m = channel_mean<T, CT>(means, coeffs, xv, x, k, c, C, P, hw);
      const T ls = to_acc<T>(log_scales[(static_cast<long long>(k) * C + c) * hw]);
      const T xc = load_x<T, CT>(xv, x, c, hw);
      if constexpr (CT > 0) {
        const BinTerms<T> t = log_bin_prob<T, true>(xc, m, ls);
        lp += t.logp;
        dm[c] = t.d_mean;
        dls[c] = t.d_lscale;
      } else {
        lp += log_bin_prob<T, false>(xc, m, ls).logp;
      }
    }
    const T lg = to_acc<T>(logit[k * hw]);
    const T w = exp_(lp + lg - lse_joint);
    const T pi = exp_(lg - lse_logit);
    g_logit[k * hw] = from_acc<S>(g * (pi - w));
    const T gw = -g * w;
    for (int c = 0; c < C; ++c) {
      T d_mean, d_ls;
      if constexpr (CT > 0) {
        d_mean = dm[c];
        d_ls = dls[c];
      } else {
        const T m = channel_mean<T, CT>(means, coeffs, xv, x, k, c, C, P, hw);
        const T ls = to_acc<T>(log_scales[(static_cast<long long>(k) * C + c) * hw]);
        const BinTerms<T> t = log_bin_prob<T, true>(load_x<T, CT>(xv, x, c, hw), m, ls);
        d_mean = t.d_mean;
        d_ls = t.d_lscale;
      }
      const long long kc = (static_cast<long long>(k) * C + c) * hw;
      const T gm = gw * d_mean;
      g_means[kc] = from_acc<S>(gm);
      g_log_scales[kc] = from_acc<S>(gw * d_ls);
      for (int j = 0; j < c; ++j) {
        g_coeffs[(static_cast<long long>(k) * P + pair_index(j, c)) * hw] =
            from_acc<S>(gm * load_x<T, CT>(xv, x, j, hw));
      }
    }
  }
}

}  // namespace math
}  // namespace matnet
