"""Likelihood and KL ops of `matnet.ops.reference` and the output distributions of
`matnet.distributions`, checked against independently written formulas (float64 where it matters)."""

import itertools
import math

import mpmath
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from matnet import MatNetConfig
from matnet.distributions import (
    Bernoulli,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    Gaussian,
    make_output_distribution,
    quantize,
)
from matnet.ops import reference as ref

BIN_CENTRES = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1


pytestmark = pytest.mark.usefixtures("one_thread")


def logistic_bin_prob(x, mean, scale):
    """P(bin of x) for logistic(mean, scale) discretized to 256 bins on [-1, 1]: CDF differences,
    with the first bin integrating the left tail and the last bin the right tail."""
    cdf = lambda v: torch.sigmoid((v - mean) / scale)
    last = torch.sigmoid(-(x - 1 / 255 - mean) / scale)  # 1 - cdf, without cancellation
    upper = torch.where(x > 1 - 1e-6, torch.ones_like(x * mean), cdf(x + 1 / 255))
    lower = torch.where(x < -1 + 1e-6, torch.zeros_like(x * mean), cdf(x - 1 / 255))
    return torch.where(x > 1 - 1e-6, last, upper - lower)


def mp_logistic_bin_nll(x, mean, log_scale):
    """-log P(bin of x) elementwise by the direct CDF (or survival function) difference in 40-digit arithmetic
    (mpmath), from the exact values of the float64 inputs: an independent truth even where fp64 would cancel."""
    with mpmath.workdps(40):
        hw = mpmath.mpf(1) / 255

        def one(v, m, ls):
            v, m, s = mpmath.mpf(v), mpmath.mpf(m), mpmath.exp(mpmath.mpf(ls))
            cdf = lambda t: 1 / (1 + mpmath.exp(-(t - m) / s))
            sf = lambda t: 1 / (1 + mpmath.exp((t - m) / s))  # 1 - cdf, tiny above the mean without cancelling
            if v > 1 - 1e-6:
                p = sf(v - hw)
            elif v < -1 + 1e-6:
                p = cdf(v + hw)
            else:  # the difference of the two tail masses on the bin's side of the mean: no 1 - 1e-50 left
                p = sf(v - hw) - sf(v + hw) if v > m else cdf(v + hw) - cdf(v - hw)
            return float(-mpmath.log(p))

        out = [one(*t) for t in zip(x.flatten().tolist(), mean.flatten().tolist(), log_scale.flatten().tolist())]
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


def py_logistic_bin_prob(x, mean, scale):
    """Scalar version with plain floats."""
    cdf = lambda v: 1 / (1 + math.exp(-(v - mean) / scale))
    if x > 1 - 1e-6:
        return 1 / (1 + math.exp((x - 1 / 255 - mean) / scale))  # 1 - cdf, without cancellation
    upper = cdf(x + 1 / 255)
    lower = 0.0 if x < -1 + 1e-6 else cdf(x - 1 / 255)
    return upper - lower


def random_bins(*shape, generator=None):
    k = torch.randint(0, 256, shape, generator=generator)
    return (k.double() * 2 / 255 - 1)


def assert_on_bin_centres(x):
    assert x.min() >= -1 and x.max() <= 1
    k = (x.double() + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-3), "values are not bin centres 2k/255 - 1"


# ---- gaussian_sample_kl -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_sample_kl_matches_torch_distributions(dtype):
    shape = (3, 4, 5)
    mu_q, mu_p = torch.randn(shape, dtype=dtype) * 2, torch.randn(shape, dtype=dtype) * 2
    lv_q, lv_p = torch.rand(shape, dtype=dtype) * 6 - 3, torch.rand(shape, dtype=dtype) * 6 - 3
    eps = torch.randn(shape, dtype=dtype)
    z, kl = ref.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, eps)
    assert z.shape == shape and kl.shape == shape and z.dtype == dtype and kl.dtype == dtype
    sd_q, sd_p = lv_q.double().exp().sqrt(), lv_p.double().exp().sqrt()
    want_kl = kl_divergence(Normal(mu_q.double(), sd_q), Normal(mu_p.double(), sd_p))
    want_z = mu_q.double() + sd_q * eps.double()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(kl.double(), want_kl, rtol=tol, atol=tol)
    torch.testing.assert_close(z.double(), want_z, rtol=tol, atol=tol)
    assert (kl >= 0).all()


def test_gaussian_sample_kl_is_zero_for_equal_distributions_and_standard_prior():
    mu = torch.randn(10, dtype=torch.float64)
    lv = torch.randn(10, dtype=torch.float64)
    _, kl = ref.gaussian_sample_kl(mu, lv, mu, lv, torch.zeros_like(mu))
    torch.testing.assert_close(kl, torch.zeros_like(kl), atol=1e-12, rtol=0)
    # against N(0, 1): 0.5 * (mu^2 + var - 1 - log var)
    zeros = torch.zeros_like(mu)
    _, kl0 = ref.gaussian_sample_kl(mu, lv, zeros, zeros, zeros)
    torch.testing.assert_close(kl0, 0.5 * (mu**2 + lv.exp() - 1 - lv), rtol=1e-12, atol=1e-12)


def test_gaussian_sample_kl_is_monte_carlo_log_ratio():
    """KL(q || p) = E_q[log q(z) - log p(z)], with z from the returned reparametrized sample."""
    n = 200_000
    mu_q, lv_q, mu_p, lv_p = (torch.tensor(v, dtype=torch.float64).expand(n) for v in (0.3, -0.7, -0.4, 0.5))
    z, kl = ref.gaussian_sample_kl(mu_q, lv_q, mu_p, lv_p, torch.randn(n, dtype=torch.float64))
    q, p = Normal(0.3, math.exp(-0.35)), Normal(-0.4, math.exp(0.25))
    ratio = q.log_prob(z) - p.log_prob(z)
    se = ratio.std() / math.sqrt(n)
    assert abs(ratio.mean() - kl[0]) < 4 * se


# ---- Bernoulli / Gaussian densities ---------------------------------------------------------------


def test_bernoulli_nll_formula():
    logits = torch.randn(4, 1, 3, 3, dtype=torch.float64) * 4
    x = torch.bernoulli(torch.full_like(logits, 0.5))
    p = 1 / (1 + torch.exp(-logits))
    want = -(x * torch.log(p) + (1 - x) * torch.log(1 - p))
    torch.testing.assert_close(ref.bernoulli_nll(x, logits), want, rtol=1e-10, atol=1e-12)
    # extreme logits stay finite and exact
    big = torch.tensor([60.0, -60.0], dtype=torch.float64)
    torch.testing.assert_close(ref.bernoulli_nll(torch.tensor([0.0, 1.0], dtype=torch.float64), big),
                               torch.tensor([60.0, 60.0], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_gaussian_nll_and_log_prob_formula():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    mean = torch.randn_like(x)
    logvar = torch.rand_like(x) * 4 - 2
    want = -Normal(mean, (0.5 * logvar).exp()).log_prob(x)
    torch.testing.assert_close(ref.gaussian_nll(x, mean, logvar), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref.gaussian_log_prob(x, mean, logvar), -want, rtol=1e-10, atol=1e-12)


# ---- discretized logistic -------------------------------------------------------------------------


def test_discretized_logistic_nll_matches_cdf_differences():
    x = BIN_CENTRES.view(1, 256).expand(40, 256)
    mean = (torch.rand(40, 1, dtype=torch.float64) * 2.4 - 1.2).expand(40, 256)
    log_scale = (torch.rand(40, 1, dtype=torch.float64) * 5 - 4).expand(40, 256)
    nll = ref.discretized_logistic_nll(x, mean, log_scale)
    # the direct difference, in 40 digits: to the last bit of fp64 for every bin, far tails included
    truth = mp_logistic_bin_nll(x, mean, log_scale)
    assert (truth > 23).sum() > 1000  # probabilities under 1e-10: the direct difference in fp64 would be no truth
    torch.testing.assert_close(nll, truth, rtol=1e-12, atol=1e-12)
    # float32 agrees where the probability is not negligible
    nll32 = ref.discretized_logistic_nll(x.float(), mean.float(), log_scale.float()).double()
    ok32 = truth < -math.log(1e-5)
    torch.testing.assert_close(nll32[ok32], truth[ok32], rtol=1e-4, atol=2e-4)


def test_discretized_logistic_edge_bins_integrate_the_tails():
    mean = torch.tensor([-3.0, -0.9, 0.0, 0.9, 3.0], dtype=torch.float64)
    log_scale = torch.full_like(mean, math.log(0.2))
    for edge in (-1.0, 1.0):
        x = torch.full_like(mean, edge)
        nll = ref.discretized_logistic_nll(x, mean, log_scale)
        want = [-math.log(py_logistic_bin_prob(edge, m, 0.2)) for m in mean.tolist()]
        torch.testing.assert_close(nll, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    # far beyond the edge, the edge bin holds (almost) all the mass, a single bin would hold ~none
    far = ref.discretized_logistic_nll(torch.tensor([-1.0, 1.0], dtype=torch.float64),
                                       torch.tensor([-5.0, 5.0], dtype=torch.float64),
                                       torch.tensor([math.log(0.1)] * 2, dtype=torch.float64))
    assert (far < 1e-15).all() and (far >= 0).all()


@pytest.mark.parametrize(
    "dtype,tol,log_scale",
    # float64: F.softplus switches to the identity above 20, dropping up to exp(-20) ~ 2e-9 per bin
    [(torch.float64, 1e-8, s) for s in (-16.0, -9.0, -7.0, -4.0, -1.0, 0.0, 3.0, 9.0)]
    # float32 resolves a bin boundary only to ~6e-8, so its scales start at the model's clamp (-7)
    + [(torch.float32, 1e-4, s) for s in (-7.0, -4.0, -1.0, 0.0, 3.0, 9.0)],
)
def test_discretized_logistic_probabilities_sum_to_one(dtype, tol, log_scale):
    g = torch.Generator().manual_seed(int(log_scale * 10) + 200)
    means = torch.rand(12, 1, generator=g, dtype=torch.float64) * 3 - 1.5
    means[0, 0], means[1, 0] = 0.0, BIN_CENTRES[17]  # exactly on a bin boundary / centre
    means[2, 0] = -1.0 + 1 / 255  # the first boundary
    x = BIN_CENTRES.view(1, 256).expand(12, 256).to(dtype)
    nll = ref.discretized_logistic_nll(x, means.expand(12, 256).to(dtype),
                                       torch.full((12, 256), log_scale, dtype=dtype))
    assert torch.isfinite(nll).all() and (nll >= -tol).all()
    total = torch.exp(-nll.double()).sum(1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=tol)


def test_discretized_logistic_tiny_scale_is_a_point_mass_at_the_mean_bin():
    mean = BIN_CENTRES[[0, 50, 128, 255]] + torch.tensor([0.0, 1e-3, -1e-3, 0.0], dtype=torch.float64)
    x = BIN_CENTRES[[0, 50, 128, 255]]
    nll = ref.discretized_logistic_nll(x, mean, torch.full_like(x, -12.0))
    torch.testing.assert_close(nll, torch.zeros_like(nll), atol=1e-12, rtol=0)


# ---- PixelCNN++ discretized logistic mixture ------------------------------------------------------


def slow_mixture_nll(x, logits, means, log_scales, coeffs):
    """Per-pixel loop with plain floats: p(x_ij) = sum_k pi_k prod_c DLogistic(x_c; mean'_kc, s_kc),
    with mean'_g = mean_g + c0 * x_r and mean'_b = mean_b + c1 * x_r + c2 * x_g (PixelCNN++)."""
    B, C, H, W = x.shape
    K = logits.shape[1]
    out = []
    for b in range(B):
        total = 0.0
        for i, j in itertools.product(range(H), range(W)):
            lg = [logits[b, k, i, j].item() for k in range(K)]
            mx = max(lg)
            zsum = sum(math.exp(v - mx) for v in lg)
            p = 0.0
            for k in range(K):
                xv = [x[b, c, i, j].item() for c in range(C)]
                mu = [means[b, k, c, i, j].item() for c in range(C)]
                if C >= 2:
                    mu[1] += coeffs[b, k, 0, i, j].item() * xv[0]
                if C >= 3:
                    mu[2] += coeffs[b, k, 1, i, j].item() * xv[0] + coeffs[b, k, 2, i, j].item() * xv[1]
                pk = math.exp(lg[k] - mx) / zsum
                for c in range(C):
                    pk *= py_logistic_bin_prob(xv[c], mu[c], math.exp(log_scales[b, k, c, i, j].item()))
                p += pk
            total -= math.log(p)
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def random_mixture_params(B, K, C, H, W, scale_range=(-3.0, -0.5), dtype=torch.float64):
    logits = torch.randn(B, K, H, W, dtype=dtype)
    means = torch.rand(B, K, C, H, W, dtype=dtype) * 1.6 - 0.8
    lo, hi = scale_range
    log_scales = torch.rand(B, K, C, H, W, dtype=dtype) * (hi - lo) + lo
    coeffs = torch.tanh(torch.randn(B, K, C * (C - 1) // 2, H, W, dtype=dtype))
    return logits, means, log_scales, coeffs


@pytest.mark.parametrize("C,K", [(3, 3), (1, 2), (2, 4)])
def test_mixture_nll_matches_per_pixel_loop(C, K):
    B, H, W = 2, 2, 3
    x = random_bins(B, C, H, W)
    x[0, :, 0, 0] = -1.0
    x[1, :, 1, 2] = 1.0  # edge bins in every channel
    params = random_mixture_params(B, K, C, H, W)
    nll = ref.discretized_logistic_mixture_nll(x, *params)
    assert nll.shape == (B,)
    torch.testing.assert_close(nll, slow_mixture_nll(x, *params), rtol=1e-8, atol=1e-8)
    nll32 = ref.discretized_logistic_mixture_nll(x.float(), *(t.float() for t in params))
    torch.testing.assert_close(nll32.double(), nll, rtol=1e-4, atol=1e-3)


def test_mixture_channel_coefficient_pair_order():
    """coeffs hold (r->g, r->b, g->b): only c0 moves the green mean, c1 and c2 the blue one."""
    x = torch.tensor([0.5, -0.25, 0.0]).view(1, 3, 1, 1)
    means = torch.zeros(1, 1, 3, 1, 1)
    coeffs = torch.tensor([0.1, 0.2, 0.4]).view(1, 1, 3, 1, 1)
    m = ref.mixture_channel_means(x, means, coeffs).flatten()
    torch.testing.assert_close(m, torch.tensor([0.0, 0.1 * 0.5, 0.2 * 0.5 + 0.4 * -0.25]))


@pytest.mark.parametrize("scale_range", [(-2.5, -1.0), (-9.0, -6.0), (1.0, 4.0)])
def test_mixture_probabilities_of_all_pixel_values_sum_to_one(scale_range):
    """C=2, K=3 on a 1x1 pixel: exp(-nll) summed over all 256^2 values is 1."""
    K, C = 3, 2
    logits, means, log_scales, coeffs = random_mixture_params(1, K, C, 1, 1, scale_range)
    coeffs = torch.tensor([0.9, -0.6, 0.3], dtype=torch.float64).view(1, K, 1, 1, 1)
    r, g = torch.meshgrid(BIN_CENTRES, BIN_CENTRES, indexing="ij")
    x = torch.stack([r.flatten(), g.flatten()], 1).view(-1, 2, 1, 1)
    n = x.shape[0]
    nll = ref.discretized_logistic_mixture_nll(
        x, logits.expand(n, -1, -1, -1), means.expand(n, -1, -1, -1, -1),
        log_scales.expand(n, -1, -1, -1, -1), coeffs.expand(n, -1, -1, -1, -1))
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(torch.exp(-nll).sum(), torch.tensor(1.0, dtype=torch.float64),
                               rtol=0, atol=1e-8)


# ---- output distributions -------------------------------------------------------------------------


def make_dists():
    return {
        "bernoulli1": Bernoulli(1),
        "bernoulli3": Bernoulli(3),
        "gaussian": Gaussian(3),
        "logistic": DiscretizedLogistic(3),
        "mixture_rgb": DiscretizedLogisticMixture(3, 4),
        "mixture_gray": DiscretizedLogisticMixture(1, 3),
    }


def data_for(dist, B, H, W):
    if dist.binary:
        return torch.bernoulli(torch.full((B, dist.channels, H, W), 0.5))
    if isinstance(dist, Gaussian):
        return torch.randn(B, dist.channels, H, W)
    return random_bins(B, dist.channels, H, W).float()


@pytest.mark.parametrize("name", list(make_dists()))
def test_n_params_matches_what_nll_and_sample_consume(name):
    dist = make_dists()[name]
    want = {"bernoulli1": 1, "bernoulli3": 3, "gaussian": 6, "logistic": 6,
            "mixture_rgb": 4 * (1 + 3 + 3 + 3), "mixture_gray": 3 * (1 + 1 + 1)}[name]
    assert dist.n_params() == want
    B, H, W = 3, 4, 5
    params = (torch.randn(B, want, H, W) * 0.5).requires_grad_()
    x = data_for(dist, B, H, W)
    nll = dist.nll(x, params)
    assert nll.shape == (B,) and torch.isfinite(nll).all()
    nll.sum().backward()
    per_channel = params.grad.abs().sum(dim=(0, 2, 3))
    assert (per_channel > 0).all(), f"parameter channels unused by nll: {torch.nonzero(per_channel == 0)}"
    with torch.no_grad():
        for draw in (dist.sample(params), dist.mean(params)):
            assert draw.shape == (B, dist.channels, H, W) and draw.dtype == params.dtype


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic", "logistic_mixture"])
def test_make_output_distribution(likelihood):
    cfg = MatNetConfig(image_channels=3 if likelihood != "bernoulli" else 1, likelihood=likelihood,
                       n_mixtures=5)
    dist = make_output_distribution(cfg)
    kind = {"bernoulli": Bernoulli, "gaussian": Gaussian, "logistic": DiscretizedLogistic,
            "logistic_mixture": DiscretizedLogisticMixture}[likelihood]
    assert type(dist) is kind and dist.channels == cfg.image_channels
    assert dist.binary == (likelihood == "bernoulli")
    if likelihood == "logistic_mixture":
        assert dist.n_params() == 5 * 10  # PixelCNN++: 10 numbers per component for RGB


def test_bernoulli_sample_and_mean():
    dist = Bernoulli(1)
    logits = torch.tensor([-2.0, 0.0, 1.5]).view(1, 3, 1, 1).repeat(20000, 1, 1, 1).transpose(0, 1)
    s = dist.sample(logits)
    assert set(s.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(torch.tensor([-2.0, 0.0, 1.5]))
    freq = s.flatten(1).mean(1)
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / 20000)
    m = dist.mean(logits)
    torch.testing.assert_close(m, torch.sigmoid(logits))
    assert m.min() >= 0 and m.max() <= 1


def test_quantize_snaps_to_bin_centres():
    v = torch.linspace(-1.3, 1.3, 1001, dtype=torch.float64)
    q = quantize(v)
    assert_on_bin_centres(q)
    # nearest bin centre, computed by brute force
    want = BIN_CENTRES[(v.clamp(-1, 1)[:, None] - BIN_CENTRES[None]).abs().argmin(1)]
    torch.testing.assert_close(q, want, rtol=0, atol=1e-12)


def test_discretized_logistic_sample_matches_bin_probabilities():
    dist = DiscretizedLogistic(1)
    n = 40000
    mean, log_scale = 0.85, math.log(0.05)  # much of the mass piles into the last (tail) bin
    params = torch.tensor([mean, log_scale]).view(1, 2, 1, 1).expand(n, 2, 1, 1)
    s = dist.sample(params)
    assert_on_bin_centres(s)
    k = ((s.double().flatten() + 1) * 127.5).round().long()
    freq = torch.bincount(k, minlength=256).double() / n
    p = logistic_bin_prob(BIN_CENTRES, torch.tensor(mean, dtype=torch.float64), math.exp(log_scale))
    assert abs(p.sum().item() - 1) < 1e-9
    assert 0.5 * (freq - p).abs().sum() < 0.03  # total variation
    assert abs(freq[255] - p[255]) < 4 * math.sqrt(p[255] * (1 - p[255]) / n)
    # mean(): the bin of the location parameter
    m = dist.mean(torch.tensor([0.1234, 0.0, 5.0, 0.0, -3.0, 0.0]).view(3, 2, 1, 1))
    torch.testing.assert_close(m.flatten(), torch.tensor([quantize(torch.tensor(0.1234)).item(), 1.0, -1.0]))


def test_logistic_samples_lie_in_data_space_for_wild_parameters():
    for dist in (DiscretizedLogistic(3), DiscretizedLogisticMixture(3, 2)):
        p = torch.randn(16, dist.n_params(), 4, 4) * 5
        for draw in (dist.sample(p), dist.mean(p)):
            assert_on_bin_centres(draw)


def _mixture_params(K, C, logits, means, log_scales, raw_coeffs, shape=(1, 1, 1)):
    """Assemble a [N, P, H, W] parameter map in the documented layout: K logits, K*C means,
    K*C log-scales, K*C(C-1)/2 raw coefficients (tanh is applied by the distribution)."""
    N, H, W = shape
    parts = (logits, means, log_scales, raw_coeffs)
    flat = torch.cat([torch.as_tensor(t, dtype=torch.float32).reshape(-1) for t in parts])
    assert flat.numel() == K * (1 + 2 * C + C * (C - 1) // 2)
    return flat.view(1, -1, 1, 1).expand(N, -1, H, W).contiguous()


def test_mixture_sample_respects_channel_coefficients():
    K, C = 1, 3
    dist = DiscretizedLogisticMixture(C, K, min_log_scale=-20.0)
    H = W = 6
    means = torch.rand(1, C, H, W) * 0.8 - 0.4
    p = torch.cat([
        torch.zeros(1, 1, H, W),  # logit
        means,
        torch.full((1, C, H, W), -20.0),  # tiny scale
        torch.tensor([20.0, math.atanh(0.5), math.atanh(-0.25)]).view(1, 3, 1, 1).expand(1, 3, H, W),
    ], dim=1)
    assert p.shape[1] == dist.n_params()
    red = quantize(means[:, 0])
    green = quantize(means[:, 1] + red)  # coefficient r->g is tanh(20) = 1
    blue = quantize(means[:, 2] + 0.5 * red - 0.25 * green)
    want = torch.stack([red, green, blue], 1)
    for draw in (dist.sample(p), dist.mean(p)):
        torch.testing.assert_close(draw, want, rtol=0, atol=1e-5)
    # green is (up to one bin) mean_g + red
    assert (dist.mean(p)[:, 1] - (means[:, 1] + red)).abs().max() <= 1 / 255 + 1e-6


def test_mixture_sample_component_frequencies():
    """Components are drawn with probabilities softmax(logits) (K=3: a K=2 check cannot tell
    Gumbel noise from its negative)."""
    dist = DiscretizedLogisticMixture(1, 3)
    n = 30000
    probs = [0.1, 0.3, 0.6]
    p = _mixture_params(3, 1, [math.log(q) for q in probs], [-0.6, 0.0, 0.6], [-6.0] * 3, [],
                        shape=(n, 1, 1))
    s = dist.sample(p).flatten()
    assert_on_bin_centres(s)
    comp = torch.bucketize(s, torch.tensor([-0.3, 0.3]))
    freq = torch.bincount(comp, minlength=3).double() / n
    for f, q in zip(freq.tolist(), probs):
        assert abs(f - q) < 4 * math.sqrt(q * (1 - q) / n), (freq, probs)
    # the mode picks the most probable component
    assert torch.all(dist.mean(p[:1]) == quantize(torch.tensor(0.6)))


def test_mixture_sample_agrees_with_mixture_nll():
    """Moments of samples (C=2, K=2, coefficient r->g) equal those of the exact table exp(-nll)."""
    K, C = 2, 2
    dist = DiscretizedLogisticMixture(C, K)
    p1 = _mixture_params(K, C, [0.2, -0.4], [[-0.3, 0.1], [0.4, -0.2]], [[-2.3, -2.0], [-2.6, -1.9]],
                         [0.8, -1.2])
    # exact distribution over all 256^2 values
    r, g = torch.meshgrid(BIN_CENTRES.float(), BIN_CENTRES.float(), indexing="ij")
    x = torch.stack([r.flatten(), g.flatten()], 1).view(-1, 2, 1, 1)
    prob = torch.exp(-dist.nll(x, p1.expand(x.shape[0], -1, -1, -1)).double())
    assert abs(prob.sum().item() - 1) < 1e-4
    xr, xg = x[:, 0].flatten().double(), x[:, 1].flatten().double()
    exact = torch.stack([(prob * xr).sum(), (prob * xg).sum(), (prob * xr * xg).sum()])
    n = 40000
    s = dist.sample(p1.expand(n, -1, -1, -1)).double()
    assert_on_bin_centres(s)
    sr, sg = s[:, 0].flatten(), s[:, 1].flatten()
    stats = torch.stack([sr, sg, sr * sg])
    se = stats.std(1) / math.sqrt(n)
    assert ((stats.mean(1) - exact).abs() < 4.5 * se).all(), (stats.mean(1), exact, se)
