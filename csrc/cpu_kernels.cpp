// CPU kernels: one fused pass per op, parallel over elements / pixel tiles with at::parallel_for (OpenMP in
// torch's CPU builds) and vectorized inner loops (`#pragma omp simd` over the branch-free math of
// matnet_math.h). fp16/bf16 inputs are computed in fp32 (at::opmath_type), fp64 in fp64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

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

std::array<int64_t, 5> check_mixture(const at::Tensor& x, const at::Tensor& logit_probs,
                                     const at::Tensor& means, const at::Tensor& log_scales,
                                     const at::Tensor& coeffs) {
  const char* op = "discretized_logistic_mixture_nll";
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected floating-point tensors, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(logit_probs.dim() == 4, op, ": logit_probs must be [B, K, H, W], got shape ",
              logit_probs.sizes());
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = logit_probs.size(1);
  TORCH_CHECK(C >= 1 && K >= 1, op, ": need C >= 1 channels and K >= 1 components, got C=", C, ", K=", K);
  const std::vector<int64_t> lp{B, K, H, W}, mc{B, K, C, H, W}, cc{B, K, C * (C - 1) / 2, H, W};
  TORCH_CHECK(logit_probs.sizes() == at::IntArrayRef(lp), op, ": logit_probs must have shape ", lp, ", got ",
              logit_probs.sizes());
  TORCH_CHECK(means.sizes() == at::IntArrayRef(mc), op, ": means must have shape ", mc, ", got ",
              means.sizes());
  TORCH_CHECK(log_scales.sizes() == at::IntArrayRef(mc), op, ": log_scales must have shape ", mc, ", got ",
              log_scales.sizes());
  TORCH_CHECK(coeffs.sizes() == at::IntArrayRef(cc), op, ": coeffs must have shape ", cc, ", got ",
              coeffs.sizes());
  for (const at::Tensor* t : {&logit_probs, &means, &log_scales, &coeffs}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(), op,
                ": all inputs must share x's dtype and device (", x.scalar_type(), ", ", x.device(),
                "), got ", t->scalar_type(), ", ", t->device());
  }
  return {B, K, C, H, W};
}

at::ScalarType lse_dtype(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

namespace cpu {
namespace {

// The hot loops are built twice, for baseline x86-64 and for AVX2 (8 fp32 lanes, about 3x faster here),
// and the dynamic loader picks the clone that the CPU supports. Helpers they call are always_inline so
// that they are compiled into each clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MATNET_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MATNET_SIMD_CLONES
#endif
#define MATNET_INLINE __attribute__((always_inline)) inline

// Work below these sizes runs on one thread: threading costs more than it saves.
constexpr int64_t kGrainElems = 16384;
constexpr int64_t kGrainTiles = 4;
// Elements per fp32 conversion tile of fp16/bf16 data.
constexpr int64_t kConvTile = 512;
// Pixels per mixture tile: the loops over a tile's pixels are the vectorized ones, and a tile's
// scratch (at most 3C + 10 rows of it) stays in L1.
constexpr int64_t kPixTile = 64;

// A row of `len` elements as acc type A: the data itself when the types agree, else converted into `buf`.
template <typename S, typename A>
MATNET_INLINE const A* load_row(const S* src, A* buf, int64_t len) {
  if constexpr (std::is_same_v<S, A>) {
    return src;
  } else {
    for (int64_t t = 0; t < len; ++t) buf[t] = static_cast<A>(src[t]);
    return buf;
  }
}

template <typename S, typename A>
MATNET_INLINE void store_row(S* dst, const A* src, int64_t len) {
  for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<S>(src[t]);
}

// Runs body(in, out, len) over n elements, in / out being NI / NO pointers to acc-type rows: the tensors'
// own memory for fp32/fp64, fp32 copies of kConvTile-element tiles for fp16/bf16.
template <typename S, size_t NI, size_t NO, typename F>
MATNET_INLINE void elementwise_tiles(const std::array<const S*, NI>& in, const std::array<S*, NO>& out,
                                     int64_t n, F&& body) {
  using A = at::opmath_type<S>;
  if constexpr (std::is_same_v<S, A>) {
    body(in, out, n);
  } else {
    A ibuf[NI][kConvTile], obuf[NO][kConvTile];
    std::array<const A*, NI> ip;
    std::array<A*, NO> op;
    for (int64_t t0 = 0; t0 < n; t0 += kConvTile) {
      const int64_t len = std::min(kConvTile, n - t0);
      for (size_t i = 0; i < NI; ++i) ip[i] = load_row(in[i] + t0, ibuf[i], len);
      for (size_t i = 0; i < NO; ++i) op[i] = obuf[i];
      body(ip, op, len);
      for (size_t i = 0; i < NO; ++i) store_row(out[i] + t0, obuf[i], len);
    }
  }
}

template <typename S, size_t NI, size_t NO>
using RangeFn = void (*)(const std::array<const S*, NI>&, const std::array<S*, NO>&, int64_t);

// Splits [0, n) over threads and runs `range` (a cloned kernel) on each chunk.
template <typename S, size_t NI, size_t NO>
void parallel_elementwise(const std::array<const S*, NI>& in, const std::array<S*, NO>& out, int64_t n,
                          RangeFn<S, NI, NO> range) {
  at::parallel_for(0, n, kGrainElems, [&](int64_t begin, int64_t end) {
    std::array<const S*, NI> ip;
    std::array<S*, NO> op;
    for (size_t i = 0; i < NI; ++i) ip[i] = in[i] + begin;
    for (size_t i = 0; i < NO; ++i) op[i] = out[i] + begin;
    range(ip, op, end - begin);
  });
}

template <typename S>
MATNET_SIMD_CLONES void gaussian_fwd_range(const std::array<const S*, 5>& in, const std::array<S*, 2>& out,
                                           int64_t n) {
  using A = at::opmath_type<S>;
  elementwise_tiles(in, out, n, [](const auto& i, const auto& o, int64_t len) __attribute__((always_inline)) {
    const A *mu_q = i[0], *lq = i[1], *mu_p = i[2], *lp = i[3], *eps = i[4];
    A *z = o[0], *kl = o[1];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t)
      math::gaussian_sample_kl_fwd<A>(mu_q[t], lq[t], mu_p[t], lp[t], eps[t], z[t], kl[t]);
  });
}

template <typename S>
MATNET_SIMD_CLONES void gaussian_bwd_range(const std::array<const S*, 7>& in, const std::array<S*, 5>& out,
                                           int64_t n) {
  using A = at::opmath_type<S>;
  elementwise_tiles(in, out, n, [](const auto& i, const auto& o, int64_t len) __attribute__((always_inline)) {
    const A *gz = i[0], *gk = i[1], *mu_q = i[2], *lq = i[3], *mu_p = i[4], *lp = i[5], *eps = i[6];
    A *g0 = o[0], *g1 = o[1], *g2 = o[2], *g3 = o[3], *g4 = o[4];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      math::gaussian_sample_kl_bwd<A>(gz[t], gk[t], mu_q[t], lq[t], mu_p[t], lp[t], eps[t], g0[t], g1[t],
                                      g2[t], g3[t], g4[t]);
    }
  });
}

template <typename S>
MATNET_SIMD_CLONES void dlogistic_fwd_range(const std::array<const S*, 3>& in, const std::array<S*, 1>& out,
                                            int64_t n) {
  using A = at::opmath_type<S>;
  elementwise_tiles(in, out, n, [](const auto& i, const auto& o, int64_t len) __attribute__((always_inline)) {
    const A *x = i[0], *mean = i[1], *ls = i[2];
    A* nll = o[0];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) nll[t] = -math::log_bin_prob<A, false>(x[t], mean[t], ls[t]).logp;
  });
}

template <typename S>
MATNET_SIMD_CLONES void dlogistic_bwd_range(const std::array<const S*, 4>& in, const std::array<S*, 2>& out,
                                            int64_t n) {
  using A = at::opmath_type<S>;
  elementwise_tiles(in, out, n, [](const auto& i, const auto& o, int64_t len) __attribute__((always_inline)) {
    const A *grad = i[0], *x = i[1], *mean = i[2], *ls = i[3];
    A *g_mean = o[0], *g_ls = o[1];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const math::BinTerms<A> r = math::log_bin_prob<A, true>(x[t], mean[t], ls[t]);
      g_mean[t] = -grad[t] * r.d_mean;  // nll = -L
      g_ls[t] = -grad[t] * r.d_lscale;
    }
  });
}

// ---- mixture: tiles of kPixTile pixels of one example; the loops over a tile's pixels vectorize ----

struct MixDims {
  int64_t B, K, C, P, hw;
  int64_t tiles_per_example() const { return (hw + kPixTile - 1) / kPixTile; }
};

template <typename S>
struct MixArgs {
  const S *x, *logit, *means, *log_scales, *coeffs;
  const at::opmath_type<S>* grad;                  // backward: upstream gradient [B], like the nll
  const at::opmath_type<S>* lse_in;                // backward: saved lse_joint [B, hw]
  at::opmath_type<S>*pix_nll, *lse_out;            // forward outputs [B, hw]
  S *g_logit, *g_means, *g_log_scales, *g_coeffs;  // backward outputs
  MixDims d;
};

// mean'_kc for the tile into `m`: means_kc + sum_{j<c} coeffs_k,pair(j,c) * x_j.
template <typename S, typename A>
MATNET_INLINE void tile_channel_mean(const S* means_kc, const S* coeffs_k, const A* const* xs, int64_t c,
                                     int64_t hw, int64_t len, A* m, A* buf) {
  const A* mr = load_row(means_kc, buf, len);
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) m[t] = mr[t];
  for (int64_t j = 0; j < c; ++j) {
    const A* cr =
        load_row(coeffs_k + math::pair_index(static_cast<int>(j), static_cast<int>(c)) * hw, buf, len);
    const A* xj = xs[j];
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) m[t] += cr[t] * xj[t];
  }
}

// Forward over tiles [tile_begin, tile_end): pix_nll = lse_logit - lse_joint and lse_out = lse_joint per
// pixel.
template <typename S>
MATNET_SIMD_CLONES void mix_fwd_tiles(const MixArgs<S>& g, int64_t tile_begin, int64_t tile_end) {
  using A = at::opmath_type<S>;
  const MixDims& d = g.d;
  const int64_t tpe = d.tiles_per_example();
  // rows of kPixTile: C for x, then lp, mj, sj, ml, sl, m, buf, buf2
  std::vector<A> scratch(static_cast<size_t>((d.C + 8) * kPixTile));
  std::vector<const A*> xs(static_cast<size_t>(d.C));
  A* row0 = scratch.data() + d.C * kPixTile;
  A *lp = row0, *mj = row0 + kPixTile, *sj = row0 + 2 * kPixTile, *ml = row0 + 3 * kPixTile,
    *sl = row0 + 4 * kPixTile, *m = row0 + 5 * kPixTile, *buf = row0 + 6 * kPixTile,
    *buf2 = row0 + 7 * kPixTile;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t b = tile / tpe, p0 = (tile % tpe) * kPixTile, len = std::min(kPixTile, d.hw - p0);
    for (int64_t c = 0; c < d.C; ++c) {
      xs[c] = load_row(g.x + (b * d.C + c) * d.hw + p0, scratch.data() + c * kPixTile, len);
    }
    for (int64_t t = 0; t < len; ++t) {
      mj[t] = ml[t] = math::lse_start<A>();
      sj[t] = sl[t] = A(0);
    }
    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t bk = b * d.K + k;
      for (int64_t t = 0; t < len; ++t) lp[t] = A(0);
      for (int64_t c = 0; c < d.C; ++c) {
        tile_channel_mean(g.means + (bk * d.C + c) * d.hw + p0, g.coeffs + bk * d.P * d.hw + p0, xs.data(), c,
                          d.hw, len, m, buf);
        const A* lr = load_row(g.log_scales + (bk * d.C + c) * d.hw + p0, buf, len);
        const A* xc = xs[c];
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) lp[t] += math::log_bin_prob<A, false>(xc[t], m[t], lr[t]).logp;
      }
      const A* lg = load_row(g.logit + bk * d.hw + p0, buf2, len);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        math::lse_push(lp[t] + lg[t], mj[t], sj[t]);
        math::lse_push(lg[t], ml[t], sl[t]);
      }
    }
    A* lse_out = g.lse_out + b * d.hw + p0;
    A* nll_out = g.pix_nll + b * d.hw + p0;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const A joint = math::lse_value(mj[t], sj[t]);
      lse_out[t] = joint;
      nll_out[t] = math::lse_value(ml[t], sl[t]) - joint;
    }
  }
}

// Backward over tiles [tile_begin, tile_end) (formulas in matnet_math.h, mixture_pixel_bwd).
template <typename S>
MATNET_SIMD_CLONES void mix_bwd_tiles(const MixArgs<S>& g, int64_t tile_begin, int64_t tile_end) {
  using A = at::opmath_type<S>;
  const MixDims& d = g.d;
  const int64_t tpe = d.tiles_per_example();
  // rows of kPixTile: C for x, C for dL/dmean', C for dL/dlog_scale, then 10 temporaries
  std::vector<A> scratch(static_cast<size_t>((3 * d.C + 10) * kPixTile));
  std::vector<const A*> xs(static_cast<size_t>(d.C));
  A *dm_rows = scratch.data() + d.C * kPixTile, *dls_rows = scratch.data() + 2 * d.C * kPixTile;
  A* row0 = scratch.data() + 3 * d.C * kPixTile;
  A *lp = row0, *ml = row0 + kPixTile, *sl = row0 + 2 * kPixTile, *lse_l = row0 + 3 * kPixTile,
    *m = row0 + 4 * kPixTile, *buf = row0 + 5 * kPixTile, *buf2 = row0 + 6 * kPixTile,
    *gw = row0 + 7 * kPixTile, *out = row0 + 8 * kPixTile, *gm = row0 + 9 * kPixTile;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t b = tile / tpe, p0 = (tile % tpe) * kPixTile, len = std::min(kPixTile, d.hw - p0);
    const A gb = static_cast<A>(g.grad[b]);
    const A* lse_j = g.lse_in + b * d.hw + p0;
    for (int64_t c = 0; c < d.C; ++c) {
      xs[c] = load_row(g.x + (b * d.C + c) * d.hw + p0, scratch.data() + c * kPixTile, len);
    }
    for (int64_t t = 0; t < len; ++t) {
      ml[t] = math::lse_start<A>();
      sl[t] = A(0);
    }
    for (int64_t k = 0; k < d.K; ++k) {
      const A* lg = load_row(g.logit + (b * d.K + k) * d.hw + p0, buf, len);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) math::lse_push(lg[t], ml[t], sl[t]);
    }
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) lse_l[t] = math::lse_value(ml[t], sl[t]);

    for (int64_t k = 0; k < d.K; ++k) {
      const int64_t bk = b * d.K + k;
      for (int64_t t = 0; t < len; ++t) lp[t] = A(0);
      for (int64_t c = 0; c < d.C; ++c) {
        tile_channel_mean(g.means + (bk * d.C + c) * d.hw + p0, g.coeffs + bk * d.P * d.hw + p0, xs.data(), c,
                          d.hw, len, m, buf);
        const A* lr = load_row(g.log_scales + (bk * d.C + c) * d.hw + p0, buf, len);
        const A* xc = xs[c];
        A *dm = dm_rows + c * kPixTile, *dls = dls_rows + c * kPixTile;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          const math::BinTerms<A> r = math::log_bin_prob<A, true>(xc[t], m[t], lr[t]);
          lp[t] += r.logp;
          dm[t] = r.d_mean;
          dls[t] = r.d_lscale;
        }
      }
      // responsibilities w = exp(lp + logit - lse_joint), mixture weights pi = exp(logit - lse_logit)
      const A* lg = load_row(g.logit + bk * d.hw + p0, buf2, len);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        const A w = math::exp_(lp[t] + lg[t] - lse_j[t]);
        out[t] = gb * (math::exp_(lg[t] - lse_l[t]) - w);
        gw[t] = -gb * w;
      }
      store_row(g.g_logit + bk * d.hw + p0, out, len);
      for (int64_t c = 0; c < d.C; ++c) {
        const int64_t kc = (bk * d.C + c) * d.hw + p0;
        const A *dm = dm_rows + c * kPixTile, *dls = dls_rows + c * kPixTile;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) {
          gm[t] = gw[t] * dm[t];
          out[t] = gw[t] * dls[t];
        }
        store_row(g.g_means + kc, gm, len);
        store_row(g.g_log_scales + kc, out, len);
        for (int64_t j = 0; j < c; ++j) {
          const A* xj = xs[j];
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) out[t] = gm[t] * xj[t];
          const int64_t pair = math::pair_index(static_cast<int>(j), static_cast<int>(c));
          store_row(g.g_coeffs + (bk * d.P + pair) * d.hw + p0, out, len);
        }
      }
    }
  }
}

template <typename S>
void parallel_tiles(const MixArgs<S>& g, void (*tiles)(const MixArgs<S>&, int64_t, int64_t)) {
  at::parallel_for(0, g.d.B * g.d.tiles_per_example(), kGrainTiles,
                   [&](int64_t begin, int64_t end) { tiles(g, begin, end); });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gaussian_sample_kl_fwd(const at::Tensor& mu_q, const at::Tensor& logvar_q,
                                                          const at::Tensor& mu_p, const at::Tensor& logvar_p,
                                                          const at::Tensor& eps) {
  check_elementwise("gaussian_sample_kl_fwd", mu_q, {logvar_q, mu_p, logvar_p, eps});
  const auto a = mu_q.contiguous(), b = logvar_q.contiguous(), c = mu_p.contiguous(),
             d = logvar_p.contiguous(), e = eps.contiguous();
  auto z = at::empty_like(a, at::MemoryFormat::Contiguous);
  auto kl = at::empty_like(a, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gaussian_sample_kl_fwd", [&] {
    parallel_elementwise<scalar_t, 5, 2>(
        {a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
         d.const_data_ptr<scalar_t>(), e.const_data_ptr<scalar_t>()},
        {z.mutable_data_ptr<scalar_t>(), kl.mutable_data_ptr<scalar_t>()}, a.numel(),
        &gaussian_fwd_range<scalar_t>);
  });
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_sample_kl_bwd(
    const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& mu_q, const at::Tensor& logvar_q,
    const at::Tensor& mu_p, const at::Tensor& logvar_p, const at::Tensor& eps) {
  check_elementwise("gaussian_sample_kl_bwd", mu_q, {grad_z, grad_kl, logvar_q, mu_p, logvar_p, eps});
  const auto gz = grad_z.contiguous(), gk = grad_kl.contiguous(), a = mu_q.contiguous(),
             b = logvar_q.contiguous(), c = mu_p.contiguous(), d = logvar_p.contiguous(),
             e = eps.contiguous();
  auto g_mu_q = at::empty_like(a, at::MemoryFormat::Contiguous), g_lq = at::empty_like(g_mu_q),
       g_mu_p = at::empty_like(g_mu_q), g_lp = at::empty_like(g_mu_q), g_eps = at::empty_like(g_mu_q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "gaussian_sample_kl_bwd", [&] {
    parallel_elementwise<scalar_t, 7, 5>(
        {gz.const_data_ptr<scalar_t>(), gk.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
         b.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
         e.const_data_ptr<scalar_t>()},
        {g_mu_q.mutable_data_ptr<scalar_t>(), g_lq.mutable_data_ptr<scalar_t>(),
         g_mu_p.mutable_data_ptr<scalar_t>(), g_lp.mutable_data_ptr<scalar_t>(),
         g_eps.mutable_data_ptr<scalar_t>()},
        a.numel(), &gaussian_bwd_range<scalar_t>);
  });
  return {g_mu_q, g_lq, g_mu_p, g_lp, g_eps};
}

at::Tensor discretized_logistic_nll_fwd(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& log_scale) {
  check_elementwise("discretized_logistic_nll_fwd", x, {mean, log_scale});
  const auto xc = x.contiguous(), mc = mean.contiguous(), lc = log_scale.contiguous();
  auto out = at::empty_like(xc, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "discretized_logistic_nll_fwd", [&] {
    parallel_elementwise<scalar_t, 3, 1>(
        {xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(), lc.const_data_ptr<scalar_t>()},
        {out.mutable_data_ptr<scalar_t>()}, xc.numel(), &dlogistic_fwd_range<scalar_t>);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> discretized_logistic_nll_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& log_scale) {
  check_elementwise("discretized_logistic_nll_bwd", x, {grad, mean, log_scale});
  const auto gc = grad.contiguous(), xc = x.contiguous(), mc = mean.contiguous(), lc = log_scale.contiguous();
  auto g_mean = at::empty_like(xc, at::MemoryFormat::Contiguous), g_ls = at::empty_like(g_mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "discretized_logistic_nll_bwd", [&] {
    parallel_elementwise<scalar_t, 4, 2>(
        {gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), mc.const_data_ptr<scalar_t>(),
         lc.const_data_ptr<scalar_t>()},
        {g_mean.mutable_data_ptr<scalar_t>(), g_ls.mutable_data_ptr<scalar_t>()}, xc.numel(),
        &dlogistic_bwd_range<scalar_t>);
  });
  return {g_mean, g_ls};
}

std::tuple<at::Tensor, at::Tensor> discretized_logistic_mixture_nll_fwd(const at::Tensor& x, const at::Tensor& logit_probs,
                                                         const at::Tensor& means,
                                                         const at::Tensor& log_scales,
                                                         const at::Tensor& coeffs) {
  const auto [B, K, C, H, W] = check_mixture(x, logit_probs, means, log_scales, coeffs);
  const auto xc = x.contiguous(), lc = logit_probs.contiguous(), mc = means.contiguous(),
             sc = log_scales.contiguous(), cc = coeffs.contiguous();
  const auto acc = x.options().dtype(lse_dtype(x.scalar_type()));
  auto lse = at::empty({B, H, W}, acc);
  auto pix = at::empty({B, H * W}, acc);
  const MixDims d{B, K, C, C * (C - 1) / 2, H * W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "discretized_logistic_mixture_nll_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    MixArgs<scalar_t> g{};
    g.x = xc.const_data_ptr<scalar_t>();
    g.logit = lc.const_data_ptr<scalar_t>();
    g.means = mc.const_data_ptr<scalar_t>();
    g.log_scales = sc.const_data_ptr<scalar_t>();
    g.coeffs = cc.const_data_ptr<scalar_t>();
    g.pix_nll = pix.mutable_data_ptr<acc_t>();
    g.lse_out = lse.mutable_data_ptr<acc_t>();
    g.d = d;
    parallel_tiles<scalar_t>(g, &mix_fwd_tiles<scalar_t>);
  });
  // Per-pixel terms are summed by torch's reduction: deterministic, and accumulated in fp32 or better.
  // The nll stays in that dtype: a bf16 total of ~4000 nats would be rounded to 16 nats.
  return {pix.sum(1), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> discretized_logistic_mixture_nll_bwd(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& logit_probs, const at::Tensor& means,
    const at::Tensor& log_scales, const at::Tensor& coeffs, const at::Tensor& lse) {
  const auto [B, K, C, H, W] = check_mixture(x, logit_probs, means, log_scales, coeffs);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({B}) && grad.scalar_type() == lse_dtype(x.scalar_type()),
              "discretized_logistic_mixture_nll_bwd: grad must be [B] of the nll's dtype ",
              lse_dtype(x.scalar_type()), ", got ", grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, H, W}) && lse.scalar_type() == lse_dtype(x.scalar_type()),
              "discretized_logistic_mixture_nll_bwd: lse must be [B, H, W] of dtype ", lse_dtype(x.scalar_type()), ", got ",
              lse.sizes(), " ", lse.scalar_type());
  const auto gc = grad.contiguous(), xc = x.contiguous(), lc = logit_probs.contiguous(),
             mc = means.contiguous(), sc = log_scales.contiguous(), cc = coeffs.contiguous(),
             ec = lse.contiguous();
  auto g_logit = at::empty_like(lc), g_means = at::empty_like(mc), g_ls = at::empty_like(sc),
       g_coeffs = at::empty_like(cc);
  const MixDims d{B, K, C, C * (C - 1) / 2, H * W};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "discretized_logistic_mixture_nll_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    MixArgs<scalar_t> g{};
    g.grad = gc.const_data_ptr<acc_t>();
    g.x = xc.const_data_ptr<scalar_t>();
    g.logit = lc.const_data_ptr<scalar_t>();
    g.means = mc.const_data_ptr<scalar_t>();
    g.log_scales = sc.const_data_ptr<scalar_t>();
    g.coeffs = cc.const_data_ptr<scalar_t>();
    g.lse_in = ec.const_data_ptr<acc_t>();
    g.g_logit = g_logit.mutable_data_ptr<scalar_t>();
    g.g_means = g_means.mutable_data_ptr<scalar_t>();
    g.g_log_scales = g_ls.mutable_data_ptr<scalar_t>();
    g.g_coeffs = g_coeffs.mutable_data_ptr<scalar_t>();
    g.d = d;
    parallel_tiles<scalar_t>(g, &mix_bwd_tiles<scalar_t>);
  });
  return {g_logit, g_means, g_ls, g_coeffs};
}

}  // namespace cpu
}  // namespace matnet
