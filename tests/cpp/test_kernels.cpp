// Unit tests of the csrc/ CPU kernels against straightforward long-double math (direct formulas and central
// differences), called directly and through the dispatcher as torch.ops.matnet.*. Run by ctest; exits 1 on
// any failure and prints one line per failed check.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "matnet_math.h"
#include "ops.h"

namespace {

using ld = long double;
int n_passed = 0, n_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++n_passed;
  } else {
    ++n_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

void check_close(double got, ld want, double rtol, const std::string& what) {
  const bool ok =
      std::isfinite(got) && std::fabs(static_cast<ld>(got) - want) <= rtol * (1 + std::fabs(want));
  check(ok, what + ": got " + std::to_string(got) + ", want " + std::to_string(static_cast<double>(want)));
}

// ---- straightforward references ----

constexpr ld kH = 1.0L / 255.0L;

ld sigmoid(ld a) { return 1.0L / (1.0L + std::exp(-a)); }

// log P(bin of x): log(sigmoid(a) - sigmoid(b)), written as sigmoid(-b) - sigmoid(-a) in the upper tail so
// that long double does not cancel; tails integrate to the edges.
ld naive_log_prob(ld x, ld mean, ld log_scale) {
  const ld inv = std::exp(-log_scale);
  const ld a = inv * (x - mean + kH), b = inv * (x - mean - kH);
  if (x < -0.999L) return std::log(sigmoid(a));
  if (x > 0.999L) return std::log(sigmoid(-b));
  return std::log(b > 0 ? sigmoid(-b) - sigmoid(-a) : sigmoid(a) - sigmoid(b));
}

// Central difference of f at v with step h (about 1e-6 of the scale on which f varies).
ld diff(const std::function<ld(ld)>& f, ld v, ld h) { return (f(v + h) - f(v - h)) / (2 * h); }

at::Tensor tensor_of(const std::vector<double>& v, at::ScalarType dt) {
  return at::tensor(v, at::kDouble).to(dt);
}

double at_(const at::Tensor& t, int64_t i) { return t.reshape(-1)[i].item<double>(); }

// ---- the fp32 math of matnet_math.h against libm ----

void test_simd_math() {
  using namespace matnet::math;
  double worst = 0;
  for (double x = -87.3; x <= 88.72; x += 0.0137) {
    const float xf = static_cast<float>(x);
    worst =
        std::max(worst, static_cast<double>(std::fabs(simd::exp(xf) / std::exp(static_cast<ld>(xf)) - 1.0L)));
  }
  check(worst < 3e-7, "simd::exp relative error " + std::to_string(worst));
  worst = 0;
  for (double e = -37.5; e <= 37.5; e += 0.0113) {
    const float x = static_cast<float>(std::pow(10.0, e));
    const ld want = std::log(static_cast<ld>(x));
    worst = std::max(worst,
                     static_cast<double>(std::fabs(simd::log(x) - want) / std::max(1.0L, std::fabs(want))));
  }
  check(worst < 3e-7, "simd::log error " + std::to_string(worst));
  worst = 0;
  for (double x : {-0.9, -0.5, -1e-3, -1e-8, -1e-30, 1e-30, 1e-8, 1e-4, 0.3, 1.0, 5.0, 1e6}) {
    const float xf = static_cast<float>(x);
    worst = std::max(
        worst, static_cast<double>(std::fabs(simd::log1p(xf) / std::log1p(static_cast<ld>(xf)) - 1.0L)));
  }
  check(worst < 3e-7, "simd::log1p relative error " + std::to_string(worst));
  worst = 0;
  for (double x = -12.0; x <= 12.0; x += 0.00731) {
    const float xf = static_cast<float>(x);
    if (xf == 0.0f) continue;
    worst = std::max(
        worst, static_cast<double>(std::fabs(simd::expm1(xf) / std::expm1(static_cast<ld>(xf)) - 1.0L)));
  }
  for (double x : {1e-30, -1e-30, 1e-6, -1e-6}) {
    const float xf = static_cast<float>(x);
    worst = std::max(
        worst, static_cast<double>(std::fabs(simd::expm1(xf) / std::expm1(static_cast<ld>(xf)) - 1.0L)));
  }
  check(worst < 5e-7, "simd::expm1 relative error " + std::to_string(worst));
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  check(simd::exp(-inf) == 0.0f && simd::exp(-200.0f) == 0.0f, "exp underflows to 0");
  check(simd::exp(inf) == inf && simd::exp(100.0f) == inf && simd::exp(88.8f) == inf, "exp overflows to inf");
  check(std::isfinite(simd::exp(88.7f)) && simd::exp(88.7f) > 3.3e38f,
        "exp just below the overflow threshold");
  check(std::isnan(simd::exp(nan)) && std::isnan(simd::log(nan)), "NaN propagates");
  check(simd::log(0.0f) == -inf && std::isnan(simd::log(-1.0f)) && simd::log(inf) == inf, "log specials");
  check(std::fabs(simd::log(1e-40f) - std::log(1e-40L)) < 1e-4, "log of a subnormal");
}

// ---- gaussian sample + KL ----

ld naive_z(ld mu_q, ld lq, ld, ld, ld eps) { return mu_q + std::exp(lq / 2) * eps; }
ld naive_kl(ld mu_q, ld lq, ld mu_p, ld lp, ld) {
  return 0.5L * (lp - lq + (std::exp(lq) + (mu_q - mu_p) * (mu_q - mu_p)) * std::exp(-lp) - 1);
}

void test_gaussian(at::ScalarType dt, double rtol, double grad_rtol) {
  const std::vector<std::vector<double>> pts = {{0.3, -1.2, -0.4, 0.7, 1.1},
                                                {-2.0, 3.0, 1.0, -2.5, -0.3},
                                                {0.0, 0.0, 0.0, 0.0, 0.0},
                                                {1.5, -8.0, -1.5, 6.0, 2.0},
                                                {-0.7, 5.0, 0.2, -6.0, -1.7}};
  std::vector<std::vector<double>> cols(5);
  for (const auto& p : pts) {
    for (int i = 0; i < 5; ++i) cols[i].push_back(p[i]);
  }
  std::vector<at::Tensor> in;
  for (const auto& c : cols) in.push_back(tensor_of(c, dt));
  const auto [z, kl] = matnet::cpu::gaussian_sample_kl_fwd(in[0], in[1], in[2], in[3], in[4]);
  const at::Tensor gz = at::full_like(in[0], 0.75), gk = at::full_like(in[0], -1.25);
  const auto grads = matnet::cpu::gaussian_sample_kl_bwd(gz, gk, in[0], in[1], in[2], in[3], in[4]);
  const std::vector<at::Tensor> g = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                                     std::get<3>(grads), std::get<4>(grads)};
  const std::string tag = std::string("gaussian ") + c10::toString(dt);
  for (size_t n = 0; n < pts.size(); ++n) {
    std::vector<ld> v(5);
    for (int i = 0; i < 5; ++i) v[i] = static_cast<ld>(at_(in[i], n));  // the rounded inputs the kernel saw
    check_close(at_(z, n), naive_z(v[0], v[1], v[2], v[3], v[4]), rtol, tag + " z");
    check_close(at_(kl, n), naive_kl(v[0], v[1], v[2], v[3], v[4]), rtol, tag + " kl");
    for (int i = 0; i < 5; ++i) {
      auto f = [&](ld t) {
        std::vector<ld> w = v;
        w[i] = t;
        return 0.75L * naive_z(w[0], w[1], w[2], w[3], w[4]) - 1.25L * naive_kl(w[0], w[1], w[2], w[3], w[4]);
      };
      check_close(at_(g[i], n), diff(f, v[i], 1e-6L), grad_rtol, tag + " grad " + std::to_string(i));
    }
  }
}

// ---- discretized logistic ----

void test_dlogistic(at::ScalarType dt, double rtol, double grad_rtol) {
  std::vector<double> xs, ms, ss;
  for (double x : {-1.0, -1.0 + 2.0 / 255, -0.5, 0.0, 0.5, 1.0 - 2.0 / 255, 1.0}) {
    for (double off : {-0.5, -0.01, 0.0, 0.003, 0.2}) {
      for (double ls : {-10.0, -7.0, -4.0, -1.0, 0.5}) {
        if (ls < -8 && std::fabs(off) > 0.25) continue;  // keeps the long-double reference in range
        xs.push_back(x);
        ms.push_back(x + off);
        ss.push_back(ls);
      }
    }
  }
  const at::Tensor x = tensor_of(xs, dt), mean = tensor_of(ms, dt), ls = tensor_of(ss, dt);
  const at::Tensor nll = matnet::cpu::discretized_logistic_nll_fwd(x, mean, ls);
  const at::Tensor grad = at::full_like(x, 1.5);
  const auto [g_mean, g_ls] = matnet::cpu::discretized_logistic_nll_bwd(grad, x, mean, ls);
  const std::string tag = std::string("dlogistic ") + c10::toString(dt);
  for (int64_t n = 0; n < x.numel(); ++n) {
    const ld xv = at_(x, n), mv = at_(mean, n), sv = at_(ls, n);
    const std::string at_pt = tag + " at x=" + std::to_string(at_(x, n)) +
                              " mean=" + std::to_string(at_(mean, n)) +
                              " log_scale=" + std::to_string(at_(ls, n));
    check_close(at_(nll, n), -naive_log_prob(xv, mv, sv), rtol, at_pt + " nll");
    // gradients of 1.5 * nll; relative to the inverse scale, which bounds them
    const ld scale = std::exp(-sv);
    const ld dm = -1.5L * diff([&](ld t) { return naive_log_prob(xv, t, sv); }, mv, 1e-6L / scale);
    const ld ds = -1.5L * diff([&](ld t) { return naive_log_prob(xv, mv, t); }, sv, 1e-6L);
    check_close(at_(g_mean, n) / scale, dm / scale, grad_rtol, at_pt + " d/dmean");
    check_close(at_(g_ls, n), ds, grad_rtol * (1 + std::fabs(xv - mv) * scale), at_pt + " d/dlog_scale");
  }
}

// ---- PixelCNN++ mixture ----

struct Mix {
  int64_t B, C, H, W, K;
  std::vector<double> x, logit, means, ls, coeffs;  // flat, NCHW / NKCHW layouts
};

Mix make_mixture(int64_t B, int64_t C, int64_t H, int64_t W, int64_t K, uint64_t seed) {
  Mix m{B, C, H, W, K, {}, {}, {}, {}, {}};
  uint64_t s = seed;
  auto uni = [&]() {  // a small LCG: the test needs no torch RNG and is the same everywhere
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<double>(s >> 11) / 9007199254740992.0;
  };
  const int64_t P = C * (C - 1) / 2, hw = H * W;
  for (int64_t i = 0; i < B * C * hw; ++i) {
    int64_t k = static_cast<int64_t>(uni() * 256);
    if (i % 7 == 0) k = (i % 2) ? 255 : 0;  // edge bins
    m.x.push_back(2.0 * k / 255 - 1);
  }
  for (int64_t i = 0; i < B * K * hw; ++i) m.logit.push_back(4 * uni() - 2);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t p = 0; p < hw; ++p) {
          m.means.push_back(m.x[(b * C + c) * hw + p] + 0.6 * uni() - 0.3);
          m.ls.push_back(-6 + 6 * uni());
        }
      }
    }
  }
  for (int64_t i = 0; i < B * K * P * hw; ++i) m.coeffs.push_back(2 * uni() - 1);
  return m;
}

// -log p(x) of example b, straight from the definition: -log sum_k softmax(logit)_k prod_c P(x_c | k).
ld naive_mixture_nll(const Mix& m, int64_t b) {
  const int64_t hw = m.H * m.W, P = m.C * (m.C - 1) / 2;
  ld total = 0;
  for (int64_t p = 0; p < hw; ++p) {
    ld zsum = 0, psum = 0;
    for (int64_t k = 0; k < m.K; ++k) zsum += std::exp(static_cast<ld>(m.logit[(b * m.K + k) * hw + p]));
    for (int64_t k = 0; k < m.K; ++k) {
      ld lprob = 0;
      for (int64_t c = 0; c < m.C; ++c) {
        const int64_t kc = ((b * m.K + k) * m.C + c) * hw + p;
        ld mean = m.means[kc];
        for (int64_t j = 0; j < c; ++j) {
          mean += static_cast<ld>(m.coeffs[((b * m.K + k) * P + c * (c - 1) / 2 + j) * hw + p]) *
                  m.x[(b * m.C + j) * hw + p];
        }
        lprob += naive_log_prob(m.x[(b * m.C + c) * hw + p], mean, m.ls[kc]);
      }
      psum += std::exp(static_cast<ld>(m.logit[(b * m.K + k) * hw + p])) / zsum * std::exp(lprob);
    }
    total -= std::log(psum);
  }
  return total;
}

void test_mixture(int64_t C, int64_t K, at::ScalarType dt, double rtol, double grad_rtol) {
  const int64_t B = 2, H = 3, W = 5;
  Mix m = make_mixture(B, C, H, W, K, 1234 + C * 10 + K);
  const auto t = [&](const std::vector<double>& v, std::vector<int64_t> shape) {
    return tensor_of(v, dt).reshape(shape);
  };
  const int64_t P = C * (C - 1) / 2;
  const at::Tensor x = t(m.x, {B, C, H, W}), logit = t(m.logit, {B, K, H, W}),
                   means = t(m.means, {B, K, C, H, W}), ls = t(m.ls, {B, K, C, H, W}),
                   coeffs = t(m.coeffs, {B, K, P, H, W});
  // the long-double reference sees the values the kernel sees
  auto back = [](const at::Tensor& v) {
    const at::Tensor d = v.to(at::kDouble).contiguous();
    return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  };
  m.x = back(x), m.logit = back(logit), m.means = back(means), m.ls = back(ls), m.coeffs = back(coeffs);

  const auto [nll, lse] = matnet::cpu::discretized_logistic_mixture_nll_fwd(x, logit, means, ls, coeffs);
  const std::string tag =
      "mixture C=" + std::to_string(C) + " K=" + std::to_string(K) + " " + c10::toString(dt);
  check(lse.sizes() == at::IntArrayRef({B, H, W}), tag + " lse shape");
  for (int64_t b = 0; b < B; ++b) check_close(at_(nll, b), naive_mixture_nll(m, b), rtol, tag + " nll");

  check(nll.scalar_type() == matnet::lse_dtype(dt), tag + " nll in fp32 (fp64 for fp64 inputs)");
  const at::Tensor grad = tensor_of({0.5, -2.0}, matnet::lse_dtype(dt));
  const auto grads = matnet::cpu::discretized_logistic_mixture_nll_bwd(grad, x, logit, means, ls, coeffs, lse);
  const std::vector<std::pair<std::vector<double>*, at::Tensor>> params = {{&m.logit, std::get<0>(grads)},
                                                                           {&m.means, std::get<1>(grads)},
                                                                           {&m.ls, std::get<2>(grads)},
                                                                           {&m.coeffs, std::get<3>(grads)}};
  const char* names[] = {"logit_probs", "means", "log_scales", "coeffs"};
  for (size_t q = 0; q < params.size(); ++q) {
    std::vector<double>& vals = *params[q].first;
    const at::Tensor& g = params[q].second;
    check(g.numel() == static_cast<int64_t>(vals.size()), tag + " grad size");
    for (size_t i = 0; i < vals.size(); i += 3) {  // every third entry keeps the test quick
      const double v0 = vals[i];
      auto f = [&](ld v) {
        vals[i] = static_cast<double>(v);
        const ld r = 0.5L * naive_mixture_nll(m, 0) - 2.0L * naive_mixture_nll(m, 1);
        vals[i] = v0;
        return r;
      };
      const ld h = 1e-6L;
      const ld fd = (f(v0 + h) - f(v0 - h)) / (2 * h);
      check_close(at_(g, i), fd, grad_rtol, tag + " d/d" + names[q] + "[" + std::to_string(i) + "]");
    }
  }
}

// ---- registration: the dispatcher finds the ops, with CPU and Meta kernels ----

void test_dispatcher() {
  auto& d = c10::Dispatcher::singleton();
  for (const char* name :
       {"matnet::gaussian_sample_kl_fwd", "matnet::gaussian_sample_kl_bwd", "matnet::discretized_logistic_nll_fwd",
        "matnet::discretized_logistic_nll_bwd", "matnet::discretized_logistic_mixture_nll_fwd", "matnet::discretized_logistic_mixture_nll_bwd",
        "matnet::cuda_enabled"}) {
    check(d.findSchema({name, ""}).has_value(), std::string("registered: ") + name);
  }
  const auto cuda_enabled = d.findSchemaOrThrow("matnet::cuda_enabled", "").typed<bool()>();
  check(!cuda_enabled.call(), "cuda_enabled() is false in a CPU-only build");

  const auto fwd = d.findSchemaOrThrow("matnet::discretized_logistic_nll_fwd", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const at::Tensor x = at::tensor({-1.0f, 0.0f, 1.0f}), m = at::zeros({3}), s = at::full({3}, -2.0f);
  const at::Tensor out = fwd.call(x, m, s);
  check_close(at_(out, 1), -naive_log_prob(0, 0, -2), 1e-5, "dispatcher discretized_logistic_nll_fwd");
  const at::Tensor meta = fwd.call(x.to(at::kMeta), m.to(at::kMeta), s.to(at::kMeta));
  check(meta.is_meta() && meta.sizes() == x.sizes(), "Meta kernel of discretized_logistic_nll_fwd");

  const auto mix =
      d.findSchemaOrThrow("matnet::discretized_logistic_mixture_nll_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&)>();
  const auto o = at::TensorOptions().device(at::kMeta).dtype(at::kHalf);
  const auto [nll, lse] =
      mix.call(at::empty({2, 3, 4, 5}, o), at::empty({2, 6, 4, 5}, o), at::empty({2, 6, 3, 4, 5}, o),
               at::empty({2, 6, 3, 4, 5}, o), at::empty({2, 6, 3, 4, 5}, o));
  check(nll.sizes() == at::IntArrayRef({2}) && nll.scalar_type() == at::kFloat,
        "Meta mixture nll: [B] fp32");
  check(lse.sizes() == at::IntArrayRef({2, 4, 5}) && lse.scalar_type() == at::kFloat,
        "Meta mixture lse: [B,H,W] fp32");

  bool threw = false;
  try {
    fwd.call(x, m, at::zeros({4}));
  } catch (const c10::Error&) {
    threw = true;
  }
  check(threw, "shape mismatch raises");
}

}  // namespace

int main() {
  test_simd_math();
  test_gaussian(at::kDouble, 1e-14, 1e-8);  // ~50 ulp: a dozen rounded operations, exp within ~1 ulp on any ISA
  test_gaussian(at::kFloat, 1e-6, 1e-4);
  test_dlogistic(at::kDouble, 1e-12, 1e-6);
  test_dlogistic(at::kFloat, 2e-5, 5e-3);
  test_dlogistic(at::kHalf, 2e-3, 3e-2);
  for (int64_t C : {1, 3, 4}) {
    test_mixture(C, 3, at::kDouble, 1e-12, 1e-6);
    test_mixture(C, 3, at::kFloat, 2e-5, 5e-3);
  }
  test_mixture(3, 1, at::kDouble, 1e-12, 1e-6);
  test_dispatcher();
  std::printf("%d passed, %d failed\n", n_passed, n_failed);
  return n_failed == 0 ? 0 : 1;
}
