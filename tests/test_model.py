"""The reference MatNet: each module's equation (paper section 2.2) written out independently, the
masked convolutions of the autoregressive decoder, and the model's objective, importance-sampled
bound, sampling, causality, input validation and configuration."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from matnet import PRESETS, MatNet, MatNetConfig
from matnet.autoregressive import ARDecoder
from matnet.modules import (
    BUModule,
    FCTop,
    GRUMergeModule,
    GRUTDModule,
    MergeModule,
    TDModule,
    downsample,
    upsample,
)
from matnet.ops import reference as ref

SLOPE = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- independent building blocks ------------------------------------------------------------------


def lrelu(x):
    return torch.where(x >= 0, x, SLOPE * x)


def conv_same(x, w, b=None):
    """Zero-padded, stride-1, shape-preserving convolution written with unfold + matmul."""
    k = w.shape[-1]
    p = k // 2
    B, _, H, W = x.shape
    cols = F.unfold(F.pad(x, (p, p, p, p)), k)  # [B, Cin*k*k, H*W]
    out = torch.einsum("ol,blp->bop", w.flatten(1), cols).view(B, w.shape[0], H, W)
    return out if b is None else out + b.view(1, -1, 1, 1)


def linear(x, lin):
    return x @ lin.weight.T + lin.bias


def gru(x, h, cell):
    """h' = (1 - u) * n + u * h, r/u = sigmoid(W x + U h + b), n = tanh(W_n x + b + r * (U_n h + b'))."""
    wr, wu, wn = cell.weight_ih.chunk(3, 0)
    ur, uu, un = cell.weight_hh.chunk(3, 0)
    br, bu, bn = cell.bias_ih.chunk(3)
    cr, cu, cn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ wr.T + br + h @ ur.T + cr)
    u = torch.sigmoid(x @ wu.T + bu + h @ uu.T + cu)
    n = torch.tanh(x @ wn.T + bn + r * (h @ un.T + cn))
    return (1 - u) * n + u * h


def residual(h, extra, c1, c2):
    """lrelu(h + conv(lrelu(conv([h; extra], v)), w)) with the weights of two conv modules."""
    inp = h if extra is None else torch.cat([h, extra], 1)
    return lrelu(h + conv_same(lrelu(conv_same(inp, c1.weight, c1.bias)), c2.weight, c2.bias))


def rnd(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def check(got, want, tol=1e-10):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


# ---- modules, equation by equation ----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_bu_module_eq9(k):
    mod = BUModule(6, k, SLOPE).double()
    h = rnd(2, 6, 5, 4)
    c1, c2 = mod.conv1, mod.conv2
    want = lrelu(h + conv_same(lrelu(conv_same(h, c1.weight, c1.bias)), c2.weight, c2.bias))
    check(mod(h), want)
    assert (mod(h) < 0).any()  # the leaky part is exercised


def test_td_module_eq7_and_prior_eq8():
    C, Z = 5, 3
    mod = TDModule(C, Z, 3, SLOPE).double()
    h, z = rnd(2, C, 4, 4), rnd(2, Z, 4, 4)
    u1, u2 = mod.update.conv1, mod.update.conv2
    assert u1.weight.shape == (C, C + Z, 3, 3)
    want = lrelu(h + conv_same(lrelu(conv_same(torch.cat([h, z], 1), u1.weight, u1.bias)),
                               u2.weight, u2.bias))
    check(mod(h, z), want)
    p1, p2 = mod.prior.conv1, mod.prior.conv2
    out = conv_same(lrelu(conv_same(h, p1.weight, p1.bias)), p2.weight, p2.bias)
    mu, logvar = mod.prior(h)
    assert mu.shape == logvar.shape == (2, Z, 4, 4)
    check(mu, out[:, :Z])
    check(logvar, out[:, Z:])


def test_merge_module_eq10_eq11():
    C, Z = 4, 2
    mod = MergeModule(C, Z, 3, SLOPE).double()
    h_m, h_b, h_t = rnd(2, C, 3, 5), rnd(2, C, 3, 5), rnd(2, C, 3, 5)
    u1, u2 = mod.update.conv1, mod.update.conv2
    assert u1.weight.shape == (C, 3 * C, 3, 3)
    # Eq. 10: the stack is [h_m; h_b; h_t] in this order
    want_m = lrelu(h_m + conv_same(lrelu(conv_same(torch.cat([h_m, h_b, h_t], 1), u1.weight, u1.bias)),
                                   u2.weight, u2.bias))
    want_head = conv_same(want_m, mod.head.weight, mod.head.bias)  # Eq. 11 reads the updated state
    got_m, mu, logvar = mod(h_m, h_b, h_t)
    check(got_m, want_m)
    check(mu, want_head[:, :Z])
    check(logvar, want_head[:, Z:])


def test_gru_td_module():
    W, Z = 6, 3
    mod = GRUTDModule(W, Z, SLOPE).double()
    h, z = rnd(4, W, 1, 1), rnd(4, Z, 1, 1)
    out = mod(h, z)
    assert out.shape == (4, W, 1, 1)
    check(out.flatten(1), gru(z.flatten(1), h.flatten(1), mod.update))
    # its prior head is Eq. 8 with 1x1 kernels
    p1, p2 = mod.prior.conv1, mod.prior.conv2
    assert p1.kernel_size == (1, 1) and p2.kernel_size == (1, 1)
    hv = h.flatten(1)
    want = lrelu(hv @ p1.weight.flatten(1).T + p1.bias) @ p2.weight.flatten(1).T + p2.bias
    mu, logvar = mod.prior(h)
    check(mu.flatten(1), want[:, :Z])
    check(logvar.flatten(1), want[:, Z:])


def test_gru_merge_module():
    W, Z = 5, 2
    mod = GRUMergeModule(W, Z).double()
    h_m, h_b, h_t = rnd(3, W, 1, 1), rnd(3, W, 1, 1), rnd(3, W, 1, 1)
    new = gru(torch.cat([h_b, h_t], 1).flatten(1), h_m.flatten(1), mod.update)
    head = new @ mod.head.weight.flatten(1).T + mod.head.bias
    got_m, mu, logvar = mod(h_m, h_b, h_t)
    check(got_m.flatten(1), new)
    check(mu.flatten(1), head[:, :Z])
    check(logvar.flatten(1), head[:, Z:])


def test_fc_top_encode_decode():
    C, r, nz0, width = 3, 2, 4, 7
    top = FCTop(C, r, nz0, width, SLOPE).double()
    h_b = rnd(2, C, r, r)

    def res_fc(v, block):  # the residual module on vectors (1x1 kernels)
        w1, w2 = block.conv1.weight.flatten(1), block.conv2.weight.flatten(1)
        return lrelu(v + lrelu(v @ w1.T + block.conv1.bias) @ w2.T + block.conv2.bias)

    v = lrelu(linear(h_b.flatten(1), top.bu_in))
    enc = linear(res_fc(v, top.bu_module), top.bu_out)
    mu0, logvar0 = top.encode(h_b)
    check(mu0, enc[:, :nz0])
    check(logvar0, enc[:, nz0:])
    z0 = rnd(2, nz0)
    dec = lrelu(linear(res_fc(lrelu(linear(z0, top.td_in)), top.td_module), top.td_out))
    got = top.decode(z0)
    assert got.shape == (2, C, r, r)
    check(got, dec.view(2, C, r, r))


def test_scale_joins_and_slope():
    d, u = downsample(4, SLOPE), upsample(4, SLOPE)
    x = torch.randn(2, 4, 8, 8)
    assert d(x).shape == (2, 4, 4, 4) and u(x).shape == (2, 4, 16, 16)
    assert d[1].negative_slope == SLOPE and u[1].negative_slope == SLOPE
    assert MatNetConfig().slope == SLOPE


# ---- masked convolutions --------------------------------------------------------------------------


def my_mask(k, mask_type):
    m = torch.zeros(k, k, dtype=torch.float64)
    c = k // 2
    for i in range(k):
        for j in range(k):
            if i < c or (i == c and j < c) or (i == c and j == c and mask_type == "B"):
                m[i, j] = 1
    return m


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("with_cond", [False, True])
def test_masked_conv2d_matches_explicit_mask(k, mask_type, with_cond):
    cx, cc, co = 2, 3, 4
    x = rnd(2, cx, 6, 5)
    cond = rnd(2, cc, 6, 5) if with_cond else None
    w = rnd(co, cx + (cc if with_cond else 0), k, k)
    b = rnd(co)
    mask = torch.ones_like(w)
    mask[:, :cx] = my_mask(k, mask_type)
    inp = x if cond is None else torch.cat([x, cond], 1)
    check(ref.masked_conv2d(x, w, b, mask_type, cond), conv_same(inp, w * mask, b))
    check(ref.causal_mask(k, mask_type, torch.float64), my_mask(k, mask_type))


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv2d_receptive_field(mask_type):
    """Output (i, j) reads x only at raster positions before (i, j) ('B': and (i, j) itself);
    the conditioning input is read over the whole k x k window."""
    k, H, W = 5, 7, 7
    x = torch.randn(1, 2, H, W, requires_grad=True)
    cond = torch.randn(1, 1, H, W, requires_grad=True)
    w = torch.randn(3, 3, k, k)
    i0, j0 = 3, 2
    ref.masked_conv2d(x, w, None, mask_type, cond)[0, :, i0, j0].sum().backward()
    dep_x = x.grad[0].abs().sum(0) > 0
    dep_c = cond.grad[0, 0] != 0
    for i in range(H):
        for j in range(W):
            in_window = abs(i - i0) <= k // 2 and abs(j - j0) <= k // 2
            before = i < i0 or (i == i0 and j < j0) or (mask_type == "B" and (i, j) == (i0, j0))
            assert bool(dep_x[i, j]) == (in_window and before), (i, j)
            assert bool(dep_c[i, j]) == in_window, (i, j)


def test_causal_mask_rejects_unknown_type():
    with pytest.raises(ValueError, match="mask_type"):
        ref.causal_mask(3, "C")


def test_ar_decoder_layers():
    ar = ARDecoder(3, 8, 20, layers=4, channels=6)
    kinds = [(c.mask_type, c.weight.shape[-1]) for c in ar.convs]
    assert kinds == [("A", 5), ("B", 3), ("B", 3), ("B", 3)]
    assert ar(torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, 8)).shape == (2, 20, 8, 8)
    with pytest.raises(ValueError, match="at least 2 layers"):
        ARDecoder(1, 4, 1, layers=1)


# ---- model-level objective ------------------------------------------------------------------------


def data(cfg, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, cfg.image_channels, cfg.image_size, cfg.image_size)
    if cfg.likelihood == "bernoulli":
        return torch.bernoulli(torch.full(shape, 0.3), generator=g)
    return torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1


CASES = {
    "tiny": ("tiny", {}, 4),
    "mnist": ("mnist", {}, 2),
    "mnist_fc": ("mnist_fc", {}, 2),
    "mnist_fc_residual": ("mnist_fc", dict(fc_update="residual", fc_width=64, z_channels=8), 2),
    "cifar10": ("cifar10", {}, 2),
    "cifar10_ar": ("cifar10", dict(ar_layers=3, channels=16, ar_channels=8, fc_width=64), 2),
}


@pytest.fixture(scope="module")
def preset_runs():
    cache = {}

    def get(name):
        if name not in cache:
            preset, kw, B = CASES[name]
            torch.manual_seed(1)
            cfg = MatNetConfig.preset(preset, **kw)
            model = MatNet(cfg)
            x = data(cfg, B)
            out = model(x)
            out.loss.backward()
            cache[name] = (cfg, model, x, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_objective_bookkeeping(preset_runs, name):
    cfg, model, x, out = preset_runs(name)
    B = x.shape[0]
    assert out.recon_nll.shape == (B,) and out.nll_bound.shape == (B,)
    assert out.kl.shape == (B, cfg.n_stochastic)
    assert sum(n for _, n in model.kl_groups()) == cfg.n_stochastic
    assert torch.equal(out.nll_bound, out.recon_nll + out.kl.sum(1))
    assert (out.kl >= 0).all()
    assert torch.isfinite(out.nll_bound).all() and out.log_weight is None
    assert torch.equal(out.loss, out.nll_bound.mean())
    with torch.no_grad():
        out3 = model(x, kl_weight=0.3)
    torch.testing.assert_close(out3.loss, (out3.recon_nll + 0.3 * out3.kl.sum(1)).mean(), rtol=1e-6, atol=0)
    assert torch.equal(out3.nll_bound, out3.recon_nll + out3.kl.sum(1))


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_reach_every_parameter(preset_runs, name):
    cfg, model, _, _ = preset_runs(name)
    assert (model.ar is None) == (cfg.ar_layers == 0)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("ar.") for n in names) == (cfg.ar_layers > 0)
    # the first merge state is zero, so the first GRU merge module's recurrent weights cannot matter
    zero_ok = {"merge.0.0.update.weight_hh"} if cfg.fully_connected and cfg.fc_update == "gru" else set()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} gets no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert n in zero_ok or p.grad.abs().sum() > 0, f"{n} has an all-zero gradient"


def test_fc_models_use_gru_updates(preset_runs):
    _, model, _, _ = preset_runs("mnist_fc")
    assert all(isinstance(m, GRUTDModule) for g in model.td for m in g)
    assert all(isinstance(m, GRUMergeModule) for g in model.merge for m in g)
    _, model, _, _ = preset_runs("mnist_fc_residual")
    assert all(isinstance(m, TDModule) for g in model.td for m in g)


def test_fully_connected_ar_decoder_is_used_or_rejected():
    """A fully-connected MatNet with ar_layers > 0 must either be refused by the config or
    actually use its AR decoder (train it and sample through it)."""
    try:
        cfg = MatNetConfig.preset("mnist_fc", ar_layers=2, fc_width=32, z_channels=4, ar_channels=4,
                                  image_size=8)
    except ValueError:
        return
    model = MatNet(cfg)
    model(data(cfg, 2)).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters never used by the forward pass: {unused}"
    assert model.sample(2).shape == (2, 1, 8, 8)


def small_cfg(**kw):
    base = dict(modules_per_scale=(3, 2), channels=4, z_channels=2, nz0=3, fc_width=8, image_size=8,
                stem_downsample=1)
    return MatNetConfig(**{**base, **kw})


def _check_kl_columns(cfg):
    model = MatNet(cfg)
    seen = {"top": [], "prior": [], "merge": []}
    enc = model.top.encode
    model.top.encode = lambda h: seen["top"].append(enc(h)) or seen["top"][-1]
    for g in model.td:
        for m in g:
            m.prior.register_forward_hook(lambda mod, i, o: seen["prior"].append(o))
    for g in model.merge:
        for m in g:
            m.register_forward_hook(lambda mod, i, o: seen["merge"].append(o[1:]))
    with torch.no_grad():
        out = model(data(cfg, 3))
    (mu0, lv0), = seen["top"]
    n = cfg.n_stochastic - 1
    assert len(seen["prior"]) == len(seen["merge"]) == n
    cols = [kl_divergence(Normal(mu0, (0.5 * lv0).exp()), Normal(0.0, 1.0)).sum(1)]
    for (mu_p, lv_p), (mu_q, lv_q) in zip(seen["prior"], seen["merge"]):
        d = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp()))
        cols.append(d.flatten(1).sum(1))
    torch.testing.assert_close(out.kl, torch.stack(cols, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fc", [False, True])
def test_kl_columns_match_module_distributions(fc):
    """Column 0 is KL(q(z0) || N(0, I)); then one column per TD module, top-down, each
    KL(q from its merge module || p from its prior head), summed over the module's latents."""
    torch.manual_seed(3)
    cfg = MatNetConfig.preset("mnist_fc", fc_width=16, z_channels=3, nz0=4) if fc else small_cfg()
    _check_kl_columns(cfg)


def _check_posterior_feeds_td(cfg, eps):
    model = MatNet(cfg)
    zs, qs, tops, decoded = [], [], [], []
    for g in model.td:
        for m in g:
            m.register_forward_hook(lambda mod, i, o: zs.append(i[1]))
    for g in model.merge:
        for m in g:
            m.register_forward_hook(lambda mod, i, o: qs.append(o[1:]))
    enc, dec = model.top.encode, model.top.decode
    model.top.encode = lambda h: tops.append(enc(h)) or tops[-1]
    model.top.decode = lambda z: decoded.append(z) or dec(z)
    with torch.no_grad():
        model(data(cfg, 2))
    assert len(zs) == len(qs) == cfg.n_stochastic - 1
    assert len(eps) == cfg.n_stochastic  # one draw per stochastic module, z0 first
    mu0, lv0 = tops[0]
    torch.testing.assert_close(decoded[0], mu0 + (0.5 * lv0).exp() * eps[0], rtol=1e-6, atol=1e-6)
    for z, (mu, lv), e in zip(zs, qs, eps[1:]):
        torch.testing.assert_close(z, mu + (0.5 * lv).exp() * e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fc", [False, True])
def test_inference_feeds_posterior_samples_to_the_td_network(monkeypatch, fc):
    """z0 fed to the top decoder, and z_i fed to TD module i, are the reparametrized samples
    mu_q + sigma_q * eps of q (the merge module's posterior), not prior or posterior means."""
    torch.manual_seed(4)
    eps = []
    noise = MatNet.noise
    monkeypatch.setattr(MatNet, "noise", lambda self, shape, device: eps.append(noise(self, shape, device)) or eps[-1])
    cfg = MatNetConfig.preset("mnist_fc", fc_width=16, z_channels=3, nz0=4) if fc else small_cfg()
    _check_posterior_feeds_td(cfg, eps)


def test_merge_modules_read_bu_states_in_mirror_order():
    """BU modules are numbered in reverse order of evaluation: at each scale, the first merge
    module (top-down) reads the last BU state computed at that scale, and so on."""
    torch.manual_seed(5)
    cfg = small_cfg()
    model = MatNet(cfg)
    bu_out = [[] for _ in model.counts]
    for j, g in enumerate(model.bu):
        for m in g:
            m.register_forward_hook(lambda mod, i, o, j=j: bu_out[j].append(o))
    merge_hb = [[] for _ in model.counts]
    for j, g in enumerate(model.merge):
        for m in g:
            m.register_forward_hook(lambda mod, i, o, j=j: merge_hb[j].append(i[1]))
    with torch.no_grad():
        model(data(cfg, 2))
    for j, m in enumerate(cfg.modules_per_scale):
        assert len(bu_out[j]) == len(merge_hb[j]) == m
        for k in range(m):
            assert torch.equal(merge_hb[j][k], bu_out[j][m - 1 - k]), (j, k)
        assert merge_hb[j][0].shape[-1] == cfg.scale_sizes[j]


@pytest.mark.parametrize("preset", ["mnist", "small"])
def test_z0_posterior_reads_final_bu_state(preset):
    """Paper sec. 2.2 / DESIGN.md: the final BU module f_0 gives q(z0 | x) from the *last* BU state,
    i.e. the output of the last BU module evaluated (the last module of the coarsest scale)."""
    torch.manual_seed(6)
    cfg = MatNetConfig.preset("mnist") if preset == "mnist" else small_cfg()
    model = MatNet(cfg)
    order = []
    for g in model.bu:
        for m in g:
            m.register_forward_hook(lambda mod, i, o: order.append(o))
    enc_in = []
    enc = model.top.encode
    model.top.encode = lambda h, enc=enc: enc_in.append(h) or enc(h)
    with torch.no_grad():
        model(data(cfg, 2))
    assert len(order) == sum(cfg.modules_per_scale)
    assert len(enc_in) == 1
    which = [torch.equal(enc_in[0], o) for o in order].index(True) + 1
    assert torch.equal(enc_in[0], order[-1]), f"q(z0|x) reads BU state #{which} of {len(order)}"


# ---- importance weights and IWAE -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(7)
    cfg = MatNetConfig.preset("tiny")
    return cfg, MatNet(cfg)


@pytest.mark.parametrize("which", ["tiny", "mnist_fc", "mixture"])
def test_log_weight_is_unbiased_for_the_kl(tiny_model, which):
    """E_q[-log w] = E_q[recon] + E_q[log q - log p] = E[nll_bound] (the analytic KL)."""
    if which == "tiny":
        cfg, model = tiny_model
    elif which == "mnist_fc":
        torch.manual_seed(8)
        cfg = MatNetConfig.preset("mnist_fc", fc_width=32, z_channels=4, nz0=8)
        model = MatNet(cfg)
    else:
        torch.manual_seed(9)
        cfg = small_cfg(image_channels=3, likelihood="logistic_mixture", n_mixtures=2)
        model = MatNet(cfg)
    n = 600
    x = data(cfg, 1).repeat(n, 1, 1, 1)
    with torch.no_grad():
        out = model(x, return_log_weight=True)
    assert out.log_weight.shape == (n,)
    d = (-out.log_weight - out.nll_bound).double()  # = log q - log p - KL, mean zero
    assert d.std() > 0
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(n), (d.mean(), d.std())


def test_iwae_matches_independent_logsumexp(tiny_model):
    """iwae_nll draws, chunk by chunk, exactly what forward() on repeated inputs draws, so it must
    equal log k - logsumexp of those log-weights (computed here independently, in numpy)."""
    cfg, model = tiny_model
    x = data(cfg, 3, seed=1)
    k = 8
    for chunk in (8, 3, 1, 4):
        torch.manual_seed(11)
        got = model.iwae_nll(x, k=k, chunk=chunk)
        torch.manual_seed(11)
        logw = []
        done = 0
        with torch.no_grad():
            while done < k:
                c = min(chunk, k - done)
                lw = model(x.repeat(c, 1, 1, 1), return_log_weight=True).log_weight
                logw.append(lw.view(c, 3).double().numpy())
                done += c
        lw = np.concatenate(logw, 0)  # [k, B]
        mx = lw.max(0)
        want = math.log(k) - (mx + np.log(np.exp(lw - mx).sum(0)))
        assert got.shape == (3,) and got.dtype == x.dtype
        np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-6, atol=1e-3)


def test_iwae_chunk_reproducible_and_within_noise(tiny_model):
    cfg, model = tiny_model
    x = data(cfg, 2, seed=2)
    torch.manual_seed(12)
    a = model.iwae_nll(x, k=10, chunk=3)
    torch.manual_seed(12)
    b = model.iwae_nll(x, k=10, chunk=3)
    assert torch.equal(a, b)
    runs = {c: [] for c in (10, 3)}
    for c in runs:
        for s in range(6):
            torch.manual_seed(100 + s)
            runs[c].append(model.iwae_nll(x, k=10, chunk=c).double())
    r10, r3 = torch.stack(runs[10]), torch.stack(runs[3])
    se = torch.sqrt(r10.var(0) / 6 + r3.var(0) / 6)
    assert ((r10.mean(0) - r3.mean(0)).abs() < 4.5 * se + 1e-3).all(), (r10.mean(0), r3.mean(0), se)


def test_iwae_k1_matches_elbo_in_expectation(tiny_model):
    cfg, model = tiny_model
    n = 400
    x = data(cfg, 1, seed=3).repeat(n, 1, 1, 1)
    torch.manual_seed(13)
    iw = model.iwae_nll(x, k=1).double()
    with torch.no_grad():
        elbo = model(x).nll_bound.double()
    se = math.sqrt(iw.var() / n + elbo.var() / n)
    assert abs(iw.mean() - elbo.mean()) < 4 * se, (iw.mean(), elbo.mean(), se)


def test_iwae_is_tighter_than_the_elbo(tiny_model):
    cfg, model = tiny_model
    x = data(cfg, 3, seed=4)
    torch.manual_seed(14)
    iw = model.iwae_nll(x, k=64).double()
    with torch.no_grad():
        elbo = model(x.repeat(64, 1, 1, 1)).nll_bound.view(64, 3).double()
    se = elbo.std(0) / 8
    assert (iw <= elbo.mean(0) + 3 * se).all(), (iw, elbo.mean(0))
    assert (iw < elbo.mean(0)).float().mean() >= 2 / 3


def test_iwae_rejects_k_below_one(tiny_model):
    cfg, model = tiny_model
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            model.iwae_nll(data(cfg, 1), k=k)


# ---- sampling -------------------------------------------------------------------------------------


def test_sample_bernoulli(tiny_model):
    cfg, model = tiny_model
    m = model.sample(5, mean=True)
    assert m.shape == (5, 1, 28, 28)
    assert m.min() >= 0 and m.max() <= 1
    assert ((m > 0) & (m < 1)).any()  # probabilities, not draws
    s = model.sample(5)
    assert s.shape == (5, 1, 28, 28) and set(s.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("which", ["tiny", "mixture", "fc"])
def test_sample_temperature_zero_is_deterministic(tiny_model, which):
    if which == "tiny":
        _, model = tiny_model
    elif which == "mixture":
        torch.manual_seed(15)
        model = MatNet(small_cfg(image_channels=3, likelihood="logistic_mixture", n_mixtures=2))
    else:
        torch.manual_seed(16)
        model = MatNet(MatNetConfig.preset("mnist_fc", fc_width=16, z_channels=3, nz0=4))
    torch.manual_seed(1)
    a = model.sample(3, temperature=0.0, mean=True)
    torch.manual_seed(2)
    b = model.sample(3, temperature=0.0, mean=True)
    assert torch.equal(a, b)
    assert torch.equal(a[0], a[1])  # every z is the prior mean: all samples coincide
    torch.manual_seed(2)
    c = model.sample(3, temperature=1.0, mean=True)
    assert not torch.equal(a, c)


def ar_cfg(likelihood="logistic_mixture", **kw):
    base = dict(image_channels=3 if likelihood != "bernoulli" else 1, image_size=8, likelihood=likelihood,
                modules_per_scale=(1, 1), stem_downsample=0, channels=8, z_channels=2, nz0=4,
                fc_width=16, n_mixtures=2, ar_layers=3, ar_channels=8)
    return MatNetConfig(**{**base, **kw})


def assert_on_bin_centres(x):
    assert x.min() >= -1 and x.max() <= 1
    k = (x.double() + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-3)


def test_sample_logistic_mixture_with_ar_decoder():
    torch.manual_seed(17)
    model = MatNet(ar_cfg())
    for mean in (False, True):
        s = model.sample(3, mean=mean)
        assert s.shape == (3, 3, 8, 8)
        assert_on_bin_centres(s)
    torch.manual_seed(17)
    flat = MatNet(ar_cfg(ar_layers=0))
    s = flat.sample(3)
    assert s.shape == (3, 3, 8, 8)
    assert_on_bin_centres(s)


def test_sample_logistic():
    torch.manual_seed(18)
    model = MatNet(small_cfg(image_channels=3, likelihood="logistic"))
    for mean in (False, True):
        s = model.sample(2, mean=mean)
        assert s.shape == (2, 3, 8, 8)
        assert_on_bin_centres(s)


AR_SAMPLE_CASES = {
    "mixture": dict(),
    "bernoulli_upsampled": dict(likelihood="bernoulli", stem_downsample=1),
    "mixture_5_layers": dict(ar_layers=5, ar_channels=6),
}


@pytest.mark.parametrize("name", list(AR_SAMPLE_CASES))
@pytest.mark.parametrize("mean", [False, True])
def test_ar_sampling_uses_full_image_parameters(monkeypatch, name, mean):
    """The crop-based sampling loop must, for each pixel, use exactly the parameters that the AR
    decoder gives that pixel on the full final image."""
    torch.manual_seed(19)
    model = MatNet(ar_cfg(**AR_SAMPLE_CASES[name]))
    feats, used = [], []
    gen = model.generate_features
    monkeypatch.setattr(model, "generate_features", lambda *a, **k: feats.append(gen(*a, **k)) or feats[-1])
    attr = "mean" if mean else "sample"
    pick = getattr(model.dist, attr)
    monkeypatch.setattr(model.dist, attr, lambda p: used.append(p.clone()) or pick(p))
    n, S = 2, model.cfg.image_size
    drawn = []
    if mean and model.dist.binary:  # the loop conditions on draws and shows means: record the draws
        draw = model.dist.sample
        monkeypatch.setattr(model.dist, "sample", lambda p: drawn.append(draw(p)) or drawn[-1])
    x = model.sample(n, mean=mean)
    assert len(used) == S * S
    if drawn:
        shown, x = x, torch.zeros_like(x)
        for t, d in enumerate(drawn):
            i, j = divmod(t, S)
            x[:, :, i, j] = d[:, :, i, j]
        assert set(x.unique().tolist()) <= {0.0, 1.0} and not torch.equal(shown, x)
    with torch.no_grad():
        full = model.output_params(feats[0], x)
    for t, p in enumerate(used):
        i, j = divmod(t, S)
        torch.testing.assert_close(p[:, :, i, j], full[:, :, i, j], rtol=1e-5, atol=1e-5,
                                   msg=f"pixel ({i}, {j})")
    if mean and not drawn:
        # mode decoding of the final image reproduces it exactly
        assert torch.equal(pick(full), x)


def test_ar_mode_sample_is_reproduced_by_full_decoding():
    torch.manual_seed(20)
    model = MatNet(ar_cfg())
    torch.manual_seed(21)
    x = model.sample(3, mean=True)
    torch.manual_seed(21)
    with torch.no_grad():
        h = model.generate_features(3)
        assert torch.equal(model.dist.mean(model.output_params(h, x)), x)
    torch.manual_seed(21)
    assert torch.equal(model.sample(3, mean=True), x)


@pytest.mark.parametrize("layers", [3, 5])
def test_ar_decoder_is_causal(layers):
    torch.manual_seed(22)
    cfg = ar_cfg(ar_layers=layers)
    model = MatNet(cfg)
    S = cfg.image_size
    x = data(cfg, 2, seed=5)
    h = torch.randn(2, cfg.channels, S, S)
    with torch.no_grad():
        for conv in model.ar.convs:  # larger weights, so that a change reaches far through the layers
            conv.weight.mul_(3.0)
        base = model.output_params(h, x).flatten(2)
        base_ar = model.ar(x, h).flatten(2)
        for j in (0, 1, S - 1, S, 2 * S - 1, 3 * S + 4, S * S - S, S * S - 1):
            x2 = x.clone()
            x2[:, :, j // S, j % S] = -x2[:, :, j // S, j % S] + 0.5  # every channel changes
            assert (x2 != x).flatten(2)[:, :, j].all()
            p2 = model.output_params(h, x2).flatten(2)
            a2 = model.ar(x2, h).flatten(2)
            for got, want in ((p2, base), (a2, base_ar)):
                torch.testing.assert_close(got[:, :, : j + 1], want[:, :, : j + 1], rtol=0, atol=1e-6,
                                           msg=f"changing pixel {j} changed an earlier pixel")
                if j < S * S - 1:
                    assert (got[:, :, j + 1:] - want[:, :, j + 1:]).abs().max() > 1e-4, j


# ---- input validation ------------------------------------------------------------------------------


def test_input_validation(tiny_model):
    cfg, model = tiny_model
    good = data(cfg, 2)
    bad = [
        (good[:, :, :, :27], ValueError, "shape"),
        (good[0], ValueError, "shape"),
        (torch.zeros(2, 3, 28, 28), ValueError, "shape"),
        (good.long(), TypeError, "floating"),
        (good.numpy(), TypeError, "torch.Tensor"),
        (good.tolist(), TypeError, "torch.Tensor"),
        (torch.full_like(good, 2.0), ValueError, r"\[0\.0, 1\.0\]"),
        (good - 0.5, ValueError, "bernoulli"),
        (torch.full_like(good, float("nan")), ValueError, "lie in"),
        (torch.zeros(2, 1, 28, 28, device="meta"), ValueError, "meta"),
    ]
    for x, err, msg in bad:
        with pytest.raises(err, match=msg):
            model(x)
        with pytest.raises(err, match=msg):
            model.iwae_nll(x, k=2)


def test_api_arguments_are_checked_by_name(tiny_model):
    """Counts of the public API are ints >= 1 (no silent chunk 0 = default, k=True = 1, or torch's own errors); an
    empty batch has no mean loss; a config is a MatNetConfig."""
    cfg, model = tiny_model
    x = data(cfg, 2)
    for call, err, says in ((lambda: model.iwae_nll(x, k=2.5), TypeError, "k must be an int, got 2.5"),
                            (lambda: model.iwae_nll(x, k=True), TypeError, "k must be an int, got True"),
                            (lambda: model.iwae_nll(x, k=0), ValueError, "k must be >= 1"),
                            (lambda: model.iwae_nll(x, k=4, chunk=0), ValueError, "chunk must be >= 1, got 0"),
                            (lambda: model.iwae_nll(x, k=4, chunk=-2), ValueError, "chunk must be >= 1, got -2"),
                            (lambda: model.sample(-1), ValueError, "n must be >= 1, got -1"),
                            (lambda: model.sample(2.0), TypeError, "n must be an int, got 2.0"),
                            (lambda: model.sample("2"), TypeError, "n must be an int"),
                            (lambda: model(x[:0]), ValueError, "batch size 0"),
                            (lambda: MatNet({"channels": 8}), TypeError, "cfg must be a MatNetConfig"),
                            (lambda: MatNet("tiny"), TypeError, "cfg must be a MatNetConfig"),
                            (lambda: cfg.replace(ar_layers=2, ar_channels=0), ValueError, "ar_channels must be >= 1"),
                            (lambda: model.sample(np.float64(2.0)), TypeError, "n must be an int")):
        with pytest.raises(err, match=says):
            call()
    assert model.sample(np.int64(2)).shape[0] == 2  # numpy's ints are ints
    assert model.iwae_nll(x[:0], k=2).shape == (0,)  # an empty batch has empty bounds
    with torch.no_grad():  # e.g. a rank's empty share of a sharded evaluation
        assert model(x[:0]).nll_bound.shape == (0,)


def test_input_range_for_8bit_likelihoods():
    torch.manual_seed(23)
    for lik in ("logistic", "logistic_mixture"):
        model = MatNet(small_cfg(image_channels=3, likelihood=lik, n_mixtures=2))
        x = data(model.cfg, 2)
        x[0, 0, 0, 0] = -1.5
        with pytest.raises(ValueError, match=r"\[-1\.0, 1\.0\]"):
            model(x)
        x[0, 0, 0, 0] = 1.01
        with pytest.raises(ValueError, match=lik):
            model(x)
        x[0, 0, 0, 0] = -1.0
        assert torch.isfinite(model(x).loss)


# ---- configuration ---------------------------------------------------------------------------------


def test_preset_names_and_unknown_preset():
    assert {"tiny", "mnist", "omniglot", "cifar10", "mnist_fc"} <= set(PRESETS)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        MatNetConfig.preset("nope")
    assert MatNetConfig.preset("mnist", channels=16).channels == 16


def test_mnist_and_cifar10_presets():
    m = MatNetConfig.preset("mnist")
    assert (m.modules_per_scale, m.channels, m.z_channels, m.nz0, m.fc_width) == ((5, 5), 32, 4, 32, 128)
    assert m.scale_sizes == (7, 14) and m.likelihood == "bernoulli" and m.image_size == 28
    c = MatNetConfig.preset("cifar10")
    assert c.modules_per_scale == (2, 4, 4) and c.scale_sizes == (8, 16, 32)
    assert c.likelihood == "logistic_mixture" and c.image_channels == 3 and c.image_size == 32
    fc = MatNetConfig.preset("mnist_fc")
    assert fc.fully_connected and fc.fc_update == "gru"


@pytest.mark.parametrize("name,n", [("tiny", 4), ("mnist", 11), ("omniglot", 11), ("cifar10", 11),
                                    ("mnist_fc", 5)])
def test_n_stochastic_and_kl_groups(name, n):
    cfg = MatNetConfig.preset(name)
    assert cfg.n_stochastic == n
    if name in ("tiny", "mnist", "mnist_fc"):
        groups = MatNet(cfg).kl_groups()
        assert groups[0] == ("z0", 1)
        assert sum(k for _, k in groups) == n
    if name == "mnist":
        assert MatNet(cfg).kl_groups() == [("z0", 1), ("7x7", 5), ("14x14", 5)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trip(name):
    cfg = MatNetConfig.preset(name)
    d = cfg.to_dict()
    assert isinstance(d["modules_per_scale"], list)
    assert MatNetConfig.from_dict(d) == cfg
    assert MatNetConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="unknown MatNetConfig fields"):
        MatNetConfig.from_dict({**d, "bogus": 1})


@pytest.mark.parametrize("kw,msg", [
    (dict(likelihood="poisson"), "likelihood"),
    (dict(image_size=30), "not divisible"),
    (dict(image_size=28, modules_per_scale=(1, 1, 1)), "not divisible"),
    (dict(kernel_size=4), "kernel_size must be odd"),
    (dict(fc_update="lstm"), "fc_update"),
    (dict(modules_per_scale=(2, 0)), "modules_per_scale"),
    (dict(likelihood="gaussian", ar_layers=3), "discrete likelihood"),
    (dict(image_channels=3, ar_layers=3), "1 channel"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MatNetConfig(**kw)
    with pytest.raises(ValueError, match=msg):
        MatNetConfig.preset("tiny").replace(**kw)
