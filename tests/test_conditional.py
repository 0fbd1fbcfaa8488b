"""Conditional MatNets (Eq. 3, 4, 6) and two-stage models (section 3): the objective counts missing pixels
only, the generator never reads x^u, imputations keep x^k, the IWAE bound, the fast twin, joint training."""

import math

import pytest
import torch
from helpers import assert_all_within_ref_error, assert_within_ref_error, random_data

import matnet
from matnet import masks
from matnet.conditional import masked_nll, stage_guess

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only spin against each other

TINY = matnet.MatNetConfig.preset("tiny")
CASES = {
    "tiny": TINY,
    "two-stage-logistic": TINY.replace(stages=2, likelihood="logistic"),
    "fc": TINY.replace(fully_connected=True),
    # the cifar10 layout, shrunk: RGB mixture likelihood with the AR reconstruction
    "cifar10-ar": matnet.MatNetConfig.preset("cifar10", image_size=8, modules_per_scale=(1, 1), channels=8, nz0=4,
                                             fc_width=16, n_mixtures=2, ar_layers=2, ar_channels=4),
}


def _mask(cfg, b, seed=2):
    s = cfg.image_size
    return masks.quadrant(s // 2)(b, s, s, generator=torch.Generator().manual_seed(seed))


def _change_missing(x, m, cfg, seed=3):
    """x with only its missing pixels redrawn."""
    return torch.where(m.bool(), random_data(cfg, x.shape[0], seed), x)


def _seeded(seed, f, *args, **kw):
    torch.manual_seed(seed)
    return f(*args, **kw)


# ---- Eq. 6: the likelihood term covers the missing pixels only ---------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "two-stage-logistic", "cifar10-ar"])
def test_masked_nll_scores_missing_pixels_only(name):
    cfg = CASES[name]
    dist = matnet.ConditionalMatNet(cfg).dist
    B, s = 3, cfg.image_size
    x, m = random_data(cfg, B).double(), _mask(cfg, B).bool()
    params = torch.randn(B, dist.n_params(), s, s, dtype=torch.float64)
    got = masked_nll(dist, x, params, m)
    x_known_changed = torch.where(m, x, random_data(cfg, B, seed=9).double())
    assert torch.equal(got, masked_nll(dist, x_known_changed, params, m))
    assert torch.equal(masked_nll(dist, x, params, torch.zeros_like(m)), torch.zeros(B, dtype=torch.float64))
    # all pixels missing: the distribution's own per-image NLL
    torch.testing.assert_close(masked_nll(dist, x, params, torch.ones_like(m)), dist.nll(x, params))
    # per pixel: the sum over the missing ones of NLL(all missing) - NLL(pixel known), pixel by pixel
    flip = m.clone()
    flip[0, 0, 0, 0] = ~flip[0, 0, 0, 0]
    delta = (masked_nll(dist, x, params, flip) - got)[0]
    one = torch.zeros_like(m)
    one[0, 0, 0, 0] = True
    single = masked_nll(dist, x, params, one)[0]
    torch.testing.assert_close(delta.abs(), single)


def test_api_arguments_are_checked_by_name():
    cfg = CASES["two-stage-logistic"]
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 2), _mask(cfg, 2)
    for call, err, says in ((lambda: cm(x[:0], m[:0]), ValueError, "batch size 0"),
                            (lambda: cm.impute(x, m, n=2.5), TypeError, "n must be an int, got 2.5"),
                            (lambda: cm.iwae_nll(x, m, k=3.0), TypeError, "k must be an int"),
                            (lambda: cm.iwae_nll(x, m, k=3, chunk=0), ValueError, "chunk must be >= 1"),
                            (lambda: matnet.ConditionalMatNet({"stages": 2}), TypeError, "cfg must be a MatNetConfig")):
        with pytest.raises(err, match=says):
            call()


def test_objective_bookkeeping_and_all_known_mask():
    cfg = CASES["two-stage-logistic"]
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 4), _mask(cfg, 4)
    out = _seeded(0, cm, x, m)
    assert out.kl.shape == (4, cfg.stages * cfg.n_stochastic)
    assert sum(c for _, c in cm.kl_groups()) == out.kl.shape[1]
    torch.testing.assert_close(out.nll_bound, out.recon_nll + out.kl.sum(1))
    assert out.loss > out.nll_bound.mean()  # two stages: the earlier stage's own term is added
    plain_model = matnet.ConditionalMatNet(cfg.replace(stage_recon_weight=0.0))
    plain_model.load_state_dict(cm.state_dict())
    plain = _seeded(0, plain_model, x, m)
    assert torch.equal(plain.nll_bound, out.nll_bound) and torch.equal(plain.loss, plain.nll_bound.mean())
    known = _seeded(0, cm, x, torch.zeros_like(m))
    assert torch.equal(known.recon_nll, torch.zeros(4))
    assert (known.kl >= 0).all() and torch.isfinite(known.loss)


def test_inference_net_reads_missing_pixels():
    cfg = CASES["tiny"]
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 3), _mask(cfg, 3)
    kl_a = _seeded(0, cm, x, m).kl
    kl_b = _seeded(0, cm, _change_missing(x, m, cfg), m).kl
    assert not torch.equal(kl_a[:, 0], kl_b[:, 0])  # q(z0 | x^k, x^u) sees x^u (Eq. 4)


# ---- Eq. 3: the generator never reads x^u -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "two-stage-logistic", "fc", "cifar10-ar"])
def test_generator_never_reads_missing_pixels(name):
    cfg = CASES[name]
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 2), _mask(cfg, 2)
    others = [_change_missing(x, m, cfg), torch.where(m.bool(), torch.nan, x)]  # NaN anywhere read would spread
    prior = _seeded(5, cm.prior_params, x, m)
    assert len(prior) == cfg.stages * cfg.n_stochastic
    imp = _seeded(6, cm.impute, x, m, 2)
    for x2 in others:
        for (mu, lv), (mu2, lv2) in zip(prior, _seeded(5, cm.prior_params, x2, m)):
            assert torch.equal(mu, mu2) and torch.equal(lv, lv2)
        assert torch.equal(imp, _seeded(6, cm.impute, x2, m, 2))
    # training and the bound: the generator's encoder input (of stage 1) is the same whatever x^u
    seen = []
    bottom_up = cm.stages[0].gen.bottom_up
    cm.stages[0].gen.bottom_up = lambda v: (seen.append(v), bottom_up(v))[1]
    for x_ in [x, *others]:
        _seeded(7, cm, x_.nan_to_num(0.5), m)
        _seeded(7, cm.iwae_nll, x_.nan_to_num(0.5), m, k=2)
    assert len(seen) == 6 and all(torch.equal(v, seen[0]) for v in seen)
    del cm.stages[0].gen.bottom_up
    # p(z0 | x^k) does depend on the known pixels
    mu0 = _seeded(5, cm.prior_params, torch.where(m.bool(), x, random_data(cfg, 2, seed=8)), m)[0][0]
    assert not torch.equal(mu0, prior[0][0])


def test_second_stage_generates_from_the_first_stages_guess():
    """Generation conditions stage 2 as training does: on [m * guess + (1 - m) * x, mask], with the guess E[x | z]
    of stage 1's draw."""
    cfg = CASES["two-stage-logistic"]
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 2), _mask(cfg, 2).bool()
    params, seen = [], []
    out = cm.stages[0].output_params
    cm.stages[0].output_params = lambda h, xx: (params.append(out(h, xx)), params[-1])[1]
    bottom_up = cm.stages[1].gen.bottom_up
    cm.stages[1].gen.bottom_up = lambda v: (seen.append(v), bottom_up(v))[1]
    cm.impute(x, m, 1)
    guess = stage_guess(cm.dist, params[-1])
    want = torch.cat([torch.where(m, guess, x), m.float()], dim=1)
    assert torch.equal(seen[-1], want) and not torch.equal(guess[m.expand_as(x)], cm.fill.expand_as(x)[m.expand_as(x)])


@pytest.mark.parametrize("name", ["tiny", "two-stage-logistic", "cifar10-ar"])
@pytest.mark.parametrize("mean", [False, True])
def test_impute_keeps_known_pixels_exactly(name, mean):
    cfg = CASES[name]
    cm = matnet.ConditionalMatNet(cfg)
    B, n = 2, 3
    x, m = random_data(cfg, B), _mask(cfg, B).bool()
    imp = cm.impute(x, m, n, mean=mean)
    assert imp.shape == (B, n, *x.shape[1:])
    known = ~m.expand_as(x)
    for s in range(n):
        assert torch.equal(imp[:, s][known], x[known])
    lo, hi = (0, 1) if cfg.likelihood == "bernoulli" else (-1, 1)
    assert imp.min() >= lo and imp.max() <= hi
    if not mean:
        assert not torch.equal(imp[:, 0], imp[:, 1])  # independent draws
        if cfg.likelihood == "bernoulli":
            assert ((imp == 0) | (imp == 1)).all()


# ---- the IWAE bound ------------------------------------------------------------------------------------------
def test_iwae_is_finite_and_below_the_elbo():
    cfg = CASES["two-stage-logistic"]
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 4), _mask(cfg, 4)
    iwae = cm.iwae_nll(x, m, k=16, chunk=8)
    assert iwae.shape == (4,) and torch.isfinite(iwae).all()
    with torch.no_grad():
        elbo = torch.stack([cm(x, m).nll_bound for _ in range(8)]).mean(0)
    assert iwae.mean() <= elbo.mean()


@pytest.mark.parametrize("name", ["tiny", "two-stage-logistic"])
def test_iwae_matches_independent_logsumexp(name):
    """iwae_nll draws, chunk by chunk, what forward() on repeated inputs draws: it must equal log k - logsumexp of
    those log-weights, whatever the chunk."""
    cfg = CASES[name]
    cm = matnet.ConditionalMatNet(cfg)
    B, k = 3, 7
    x, m = random_data(cfg, B), _mask(cfg, B)
    for chunk in (7, 3, 1):
        got = _seeded(11, cm.iwae_nll, x, m, k=k, chunk=chunk)
        torch.manual_seed(11)
        lw = []
        with torch.no_grad():
            for c in [min(chunk, k - d) for d in range(0, k, chunk)]:
                rep = [t.repeat(c, 1, 1, 1) for t in (x, m)]
                lw.append(cm(*rep, return_log_weight=True).log_weight.double().view(c, B))
        want = math.log(k) - torch.logsumexp(torch.cat(lw), dim=0)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-3)


def test_log_weight_is_unbiased_for_the_kl():
    """E_q[-log w] = E_q[-log p(x^u | z, x^k) + log q - log p] = the Eq. 6 bound: the KL terms are its means."""
    cfg = CASES["two-stage-logistic"]
    cm = matnet.ConditionalMatNet(cfg)
    n = 400
    x, m = random_data(cfg, 1).repeat(n, 1, 1, 1), _mask(cfg, 1).repeat(n, 1, 1, 1)
    with torch.no_grad():
        out = _seeded(4, cm, x, m, return_log_weight=True)
    d = (-out.log_weight - out.nll_bound).double()  # = log q - log p - KL: mean zero
    assert abs(d.mean()) < 4 * d.std() / math.sqrt(n), (d.mean(), d.std())


# ---- the fast twin -------------------------------------------------------------------------------------------
def _run(model, x, m, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, m)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def _truth(model):
    truth = matnet.ConditionalMatNet(model.cfg).double()
    truth.load_state_dict(model.state_dict())
    return truth


@pytest.mark.parametrize("name", ["tiny", "two-stage-logistic", "cifar10-ar"])
def test_fast_twin_matches_reference(name):
    cfg = CASES[name]
    ref, fast = matnet.ConditionalMatNet(cfg), matnet.FastConditionalMatNet(cfg)
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    ref.set_fill(0.25 if cfg.likelihood == "bernoulli" else -0.1)
    ref.load_state_dict(fast.state_dict())  # both ways; the fill buffer travels with the weights
    assert torch.equal(ref.fill, fast.fill)
    x, m = random_data(cfg, 3), _mask(cfg, 3)
    out_r, g_r = _run(ref, x, m, seed=7)
    out_f, g_f = _run(fast, x, m, seed=7)
    out_t, g_t = _run(_truth(ref), x.double(), m, seed=7)
    outs = [{k: getattr(o, k) for k in ("loss", "kl", "recon_nll")} for o in (out_f, out_r, out_t)]
    assert_all_within_ref_error("output", *outs)
    assert g_r.keys() == g_f.keys() and all(g is not None for g in g_f.values())
    assert_all_within_ref_error("grad", g_f, g_r, g_t)


def test_fast_twin_iwae_and_impute_match_reference():
    cfg = CASES["tiny"].replace(stages=2)
    ref = matnet.ConditionalMatNet(cfg)
    fast = matnet.FastConditionalMatNet(cfg)
    fast.load_state_dict(ref.state_dict())
    truth = _truth(ref)
    x, m = random_data(cfg, 2), _mask(cfg, 2)
    iwae = [_seeded(3, mod.iwae_nll, xx, m, k=5, chunk=2) for mod, xx in ((fast, x), (ref, x), (truth, x.double()))]
    assert_within_ref_error("iwae", *iwae)
    imps = [_seeded(4, mod.impute, xx, m, 2, mean=True) for mod, xx in ((fast, x), (ref, x), (truth, x.double()))]
    assert_within_ref_error("impute", *imps)


# ---- two-stage models ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_two_stage_gradient_reaches_both_stages(weight):
    cfg = CASES["tiny"].replace(stages=2, stage_recon_weight=weight)
    cm = matnet.ConditionalMatNet(cfg)
    x, m = random_data(cfg, 3), _mask(cfg, 3)
    cm(x, m).loss.backward()
    for s, stage in enumerate(cm.stages):
        grads = {n: p.grad for n, p in stage.named_parameters()}
        missing = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
        assert not missing, f"stage {s + 1}: no gradient for {missing}"


def test_two_stage_model_trains(one_thread):
    torch.manual_seed(0)
    cfg = CASES["tiny"].replace(stages=2)
    cm = matnet.ConditionalMatNet(cfg)
    # a tiny synthetic set: 8 images made of a few bars, so the missing quadrant is predictable from the rest
    x = torch.zeros(8, 1, 28, 28)
    for i in range(8):
        x[i, 0, :, 3 * i: 3 * i + 2] = 1
        x[i, 0, 3 * i: 3 * i + 2, :] = 1
    m = masks.quadrant(14)(8, 28, 28, generator=torch.Generator().manual_seed(0))
    cm.set_fill(x.mean().item())
    opt = torch.optim.Adam(cm.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = cm(x, m)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.nll_bound.mean().item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)


# ---- configuration and input checks --------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    (dict(stages=0), "stages"),
    (dict(cond_fill=(0.1, 0.2)), "cond_fill"),
    (dict(cond_fill=(1.5,)), "cond_fill"),
    (dict(likelihood="logistic", cond_fill=(-2.0,)), "cond_fill"),
    (dict(stage_recon_weight=-1.0), "stage_recon_weight"),
    (dict(stage_recon_weight=float("nan")), "stage_recon_weight"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        matnet.MatNetConfig.preset("tiny", **kw)


@pytest.mark.parametrize("kw", [dict(stages=2), dict(cond_fill=(0.3,)), dict(stage_recon_weight=0.0)])
def test_density_model_refuses_conditional_fields(kw):
    """A field only a conditional MatNet reads is an error on a density model, not silently ignored."""
    with pytest.raises(ValueError, match=f"'{next(iter(kw))}'.* are conditional-MatNet settings"):
        matnet.MatNet(CASES["tiny"].replace(**kw))
    matnet.ConditionalMatNet(CASES["tiny"].replace(**kw))


def test_config_round_trip_and_fill():
    cfg = matnet.MatNetConfig.preset("cifar10", stages=2, cond_fill=[0.1, -0.2, 0.3])
    assert cfg.cond_fill == (0.1, -0.2, 0.3)
    assert matnet.MatNetConfig.from_dict(cfg.to_dict()) == cfg
    assert matnet.MatNetConfig.preset("tiny").stages == 1
    cm = matnet.ConditionalMatNet(matnet.MatNetConfig.preset("tiny", cond_fill=(0.13,)))
    assert torch.allclose(cm.fill, torch.tensor(0.13))
    assert matnet.ConditionalMatNet(TINY).fill.item() == 0.5  # mid-range until set from data
    with pytest.raises(ValueError, match="fill"):
        cm.set_fill((0.1, 0.2))


def test_mask_validation():
    cm = matnet.ConditionalMatNet(TINY)
    x = random_data(TINY, 2)
    with pytest.raises(ValueError, match="mask must have shape"):
        cm(x, torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="mask must have shape"):
        cm(x, torch.zeros(3, 1, 28, 28))
    with pytest.raises(ValueError, match="0 \\(known\\) or 1"):
        cm(x, torch.full((2, 1, 28, 28), 0.5))
    with pytest.raises(ValueError, match="shape"):
        cm.impute(torch.zeros(2, 1, 27, 28), torch.zeros(2, 1, 27, 28))
    with pytest.raises(ValueError, match="lie in"):  # known pixels out of range are still rejected
        cm.impute(torch.full((2, 1, 28, 28), 2.0), _mask(TINY, 2))
    out = cm(x, _mask(TINY, 1))  # one mask for the whole batch
    assert out.nll_bound.shape == (2,)
