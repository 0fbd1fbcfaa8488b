"""The mixture prior on z0 (paper section 2.3): Eq. 12 against its definition and against Monte Carlo, the exact
mixture density in the importance weights, the K = 1 reduction to N(0, I), clustering, the entropy penalty, the
k-means refit of the components and the fast twin."""

import math
import os
import signal

import pytest
import torch
from helpers import assert_all_within_ref_error, random_data
from torch import distributions as D

import matnet
from matnet.clustering import KMeansStopped, cluster_accuracy, cluster_report, kmeans
from matnet.config import field_default
from matnet.modules import MixturePrior

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only spin against each other

GMM = matnet.MatNetConfig.preset("tiny", prior="gmm", prior_components=3)


def _prior(k, d, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    p = MixturePrior(k, d).double()
    with torch.no_grad():
        p.means.copy_(spread * torch.randn(k, d, generator=g, dtype=torch.float64))
        p.logvars.copy_(0.5 * torch.randn(k, d, generator=g, dtype=torch.float64))
    return p


def _q(b, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    mu, lv = torch.randn(2, b, d, generator=g, dtype=torch.float64)
    return mu, 0.5 * lv


def _normal(mu, logvar):
    return D.Independent(D.Normal(mu, torch.exp(0.5 * logvar)), 1)


def _mixture(p):
    cat = D.Categorical(logits=torch.zeros(p.means.shape[0], dtype=torch.float64))
    return D.MixtureSameFamily(cat, _normal(p.means.detach(), p.logvars.detach()))


# ---- Eq. 12 ------------------------------------------------------------------------------------------------
def test_eq12_matches_its_definition():
    """Eq. 12 with uniform weights: -log sum_k (1/K) exp(-KL(q || p_k)), the KLs from torch.distributions."""
    p, (mu, lv) = _prior(5, 3), _q(4, 3)
    kl_k = torch.stack([D.kl_divergence(_normal(mu, lv), _normal(p.means[k], p.logvars[k])) for k in range(5)], 1)
    kl, log_r = p.kl(mu, lv)
    assert torch.allclose(p.component_kl(mu, lv), kl_k, rtol=1e-12, atol=1e-12)
    assert torch.allclose(kl, -torch.log(torch.exp(-kl_k).mean(1)), rtol=1e-12, atol=1e-12)
    r = torch.softmax(-kl_k, 1)  # the posterior over components, and Eq. 12 as the bound it attains
    assert torch.allclose(log_r.exp(), r, rtol=1e-12, atol=1e-14)
    assert torch.allclose(kl, (r * kl_k).sum(1) + (r * torch.log(5 * r)).sum(1), rtol=1e-12, atol=1e-12)


def test_eq12_bounds_the_monte_carlo_kl():
    """Eq. 12 is an upper bound on KL(q || mixture), tight when q sits on one of well-separated components."""
    torch.manual_seed(0)
    n = 200_000

    def mc(p, mu, lv):
        q = _normal(mu, lv)
        z = q.sample((n,))
        d = q.log_prob(z) - _mixture(p).log_prob(z)
        return d.mean(0), d.std(0) / math.sqrt(n)

    p, (mu, lv) = _prior(4, 2), _q(3, 2)
    est, se = mc(p, mu, lv)
    kl, _ = p.kl(mu, lv)
    assert (kl >= est - 5 * se).all(), (kl, est, se)
    assert (kl > est + 5 * se).any()  # overlapping components: the bound is strictly loose somewhere
    far = _prior(3, 2, spread=30.0)  # q = one component, others ~40 standard deviations away
    mu, lv = far.means.detach() + 0.1, far.logvars.detach() - 0.2
    est, se = mc(far, mu, lv)
    assert torch.allclose(far.kl(mu, lv)[0], est, atol=5 * se.max().item() + 1e-6)


def test_exact_log_density_and_sampling():
    p = _prior(4, 3)
    z = torch.randn(6, 3, dtype=torch.float64)
    assert torch.allclose(p.log_prob(z), _mixture(p).log_prob(z), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    s = p.sample(torch.randn(40_000, 3, dtype=torch.float64))
    mix = _mixture(p)
    assert torch.allclose(s.mean(0), mix.mean, atol=0.05)
    assert torch.allclose(s.var(0), mix.variance, rtol=0.05)


def test_gradients_reach_component_parameters():
    m = matnet.MatNet(GMM)
    m(random_data(GMM, 4)).loss.backward()
    for p in (m.z0_prior.means, m.z0_prior.logvars):
        assert p.grad is not None and p.grad.abs().max() > 0


# ---- the model ---------------------------------------------------------------------------------------------
def _seeded(seed, f, *args, **kw):
    torch.manual_seed(seed)
    return f(*args, **kw)


@pytest.mark.parametrize("fc", [False, True])
def test_one_standard_component_is_the_normal_prior(fc):
    cfg = matnet.MatNetConfig.preset("tiny", fully_connected=fc)
    normal = matnet.MatNet(cfg).double()
    gmm = matnet.MatNet(cfg.replace(prior="gmm", prior_components=1)).double()
    with torch.no_grad():
        gmm.z0_prior.means.zero_()
        gmm.z0_prior.logvars.zero_()
    gmm.load_state_dict(normal.state_dict(), strict=False)
    x = random_data(cfg, 3).double()
    a, b = _seeded(5, normal, x, return_log_weight=True), _seeded(5, gmm, x, return_log_weight=True)
    for k in ("loss", "nll_bound", "kl"):
        assert torch.allclose(getattr(a, k), getattr(b, k), rtol=1e-10, atol=1e-8), k
    fp32 = 16 * torch.finfo(torch.float32).eps  # log weights are accumulated in fp32 whatever the model's dtype
    assert torch.allclose(a.log_weight, b.log_weight, rtol=fp32)
    assert torch.allclose(_seeded(6, normal.iwae_nll, x, k=4), _seeded(6, gmm.iwae_nll, x, k=4), rtol=fp32)


def test_log_weight_uses_the_exact_mixture_density():
    """The importance weight of z0 is log p_mix(z0) - log q(z0 | x), not Eq. 12: against a direct computation
    from the same noise (z0's noise is the first draw of a forward pass), with the weights shared by a
    normal-prior twin so only the z0 term differs."""
    gmm = matnet.MatNet(GMM).double()
    normal = matnet.MatNet(GMM.replace(prior="normal", prior_components=field_default("prior_components"))).double()
    normal.load_state_dict(gmm.state_dict(), strict=False)
    x = random_data(GMM, 4).double()
    out_g, out_n = _seeded(3, gmm, x, return_log_weight=True), _seeded(3, normal, x, return_log_weight=True)
    eps = _seeded(3, torch.randn, 4, GMM.nz0).double()
    with torch.no_grad():
        mu0, lv0 = gmm.top.encode(gmm.bottom_up(x)[0][0])
        z0 = mu0 + torch.exp(0.5 * lv0) * eps
        std = D.Independent(D.Normal(torch.zeros_like(z0), torch.ones_like(z0)), 1)
        want = out_n.log_weight + _mixture(gmm.z0_prior).log_prob(z0) - std.log_prob(z0)
    assert torch.allclose(out_g.recon_nll, out_n.recon_nll, rtol=1e-12)
    fp32 = 16 * torch.finfo(torch.float32).eps  # log weights are accumulated in fp32 whatever the model's dtype
    assert torch.allclose(out_g.log_weight, want, rtol=fp32)
    assert torch.allclose(_seeded(3, gmm.iwae_nll, x, k=1), -out_g.log_weight, rtol=fp32)
    assert torch.allclose(out_g.kl[:, 0], gmm.z0_prior.kl(mu0, lv0)[0], rtol=1e-12)  # while the ELBO uses Eq. 12


def test_entropy_penalty_changes_loss_not_bound():
    x = random_data(GMM, 4)
    plain = matnet.MatNet(GMM)
    pen = matnet.MatNet(GMM.replace(prior_entropy_weight=0.4))
    pen.load_state_dict(plain.state_dict())
    a, b = _seeded(2, plain, x), _seeded(2, pen, x)
    assert torch.equal(a.nll_bound, b.nll_bound) and torch.equal(a.kl, b.kl)
    with torch.no_grad():
        mu0, lv0 = plain.top.encode(plain.bottom_up(x)[0][0])
        r = torch.softmax(-plain.z0_prior.component_kl(mu0, lv0), 1)
        entropy = -(r * r.log()).sum(1).mean()
    assert entropy > 0.01
    assert torch.allclose(b.loss - a.loss, 0.4 * entropy, rtol=1e-4, atol=1e-5)


def test_cluster_separates_two_groups_after_brief_training(tmp_path):
    """Two groups of images (mostly off vs mostly on), K = 4: after brief training on them, cluster() gives the
    argmax of the responsibilities at the posterior mean (computed directly) and no component mixes the groups."""
    cfg = GMM.replace(prior_components=4)
    m = matnet.MatNet(cfg)
    g = torch.Generator().manual_seed(0)
    flip = (torch.rand(20, 1, 28, 28, generator=g) < 0.05).float()
    x, labels = torch.cat([flip, 1 - flip]), torch.arange(40) // 20
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(80):
        opt.zero_grad()
        m(x).loss.backward()
        opt.step()
    assign = m.cluster(x)
    assert assign.dtype == torch.int64 and assign.shape == (40,)
    assert ((assign >= 0) & (assign < 4)).all()
    with torch.no_grad():
        mu0, _ = m.top.encode(m.bottom_up(x)[0][0])
        p = m.z0_prior
        dens = torch.stack([_normal(p.means[k].double(), p.logvars[k].double()).log_prob(mu0.double())
                            for k in range(4)], 1)
    assert torch.equal(assign, dens.argmax(1))
    rep = cluster_report(m, x, labels, out_png=tmp_path / "clusters.png", batch_size=16)
    assert rep["accuracy"] == 1.0 and rep["matching"] == "majority", rep  # K > 2 classes: majority label
    assert sum(rep["counts"]) == 40 and rep["n_used"] >= 2 and (tmp_path / "clusters.png").stat().st_size > 0


def test_cluster_needs_the_mixture_prior():
    with pytest.raises(ValueError, match="prior='gmm'"):
        matnet.MatNet(matnet.MatNetConfig.preset("tiny")).cluster(random_data(GMM, 2))


def test_sample_draws_from_the_mixture():
    m = matnet.MatNet(GMM)
    s = m.sample(3)
    assert s.shape == (3, 1, 28, 28) and set(s.unique().tolist()) <= {0.0, 1.0}


# ---- the k-means refit (prior_refit_step) -------------------------------------------------------------------
def _blobs(sizes, d=5, spread=0.1, seed=0):
    """Gaussian blobs of the given sizes around centres 10 apart (blob i at 10 * e_i): rows [N, d], labels [N]."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(len(sizes), d, dtype=torch.float64)
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return centres[labels] + spread * torch.randn(len(labels), d, generator=g, dtype=torch.float64), labels


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    z, labels = _blobs([30, 20, 25, 5])
    centres, assign = kmeans(z.float(), 4, seed=3)
    assert assign.dtype == torch.int64 and centres.dtype == torch.float64 and centres.shape == (4, 5)
    assert cluster_accuracy(assign, labels, 4) == 1.0
    for k in range(4):  # a fixed point of Lloyd's step: each centre is its members' mean
        assert torch.allclose(centres[k], z[assign == k].mean(0), atol=1e-6)
    again, assign2 = kmeans(z.float(), 4, seed=3)
    assert torch.equal(centres, again) and torch.equal(assign, assign2)
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        kmeans(z[:3], 4)
    with pytest.raises(ValueError, match="finite"):
        kmeans(torch.tensor([[0.0], [float("nan")]]), 1)
    asked = []
    with pytest.raises(KMeansStopped):  # asked before the first Lloyd step
        kmeans(z, 4, stop=lambda: asked.append(1) or True)
    assert asked == [1]


def test_kmeans_plus_plus_scales_to_many_centres():
    """k = N: every row its own centre (k-means++ never picks a row twice while another is away from all
    centres), drawn in O(N k D), not O(N k^2 D)."""
    z, _ = _blobs([400, 300, 300])
    centres, assign = kmeans(z, len(z), seed=0, restarts=1)
    assert torch.equal(assign.sort().values, torch.arange(len(z)))
    assert torch.equal(centres[assign], z)


def test_refit_moves_components_onto_the_posteriors():
    """Means = the clusters' centroids, variances = var(mu) + mean(exp(logvar)) of each cluster (its aggregate
    posterior); a component whose cluster is a single outlier keeps its values."""
    mu, labels = _blobs([40, 30, 1], d=4, spread=0.5)
    logvar = -1.0 + 0.3 * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = _prior(3, 4)
    before = {n: v.detach().clone() for n, v in p.named_parameters()}
    counts = p.refit_(mu, logvar, seed=0)
    assert sorted(counts.tolist()) == [1, 30, 40]
    comp = p.component_log_prob(mu).argmax(1)  # each blob's points are nearest to one component
    assert cluster_accuracy(comp[labels < 2], labels[labels < 2]) == 1.0
    for blob in range(2):
        k, rows = int(comp[labels == blob][0]), labels == blob
        want_var = mu[rows].var(0, unbiased=False) + logvar[rows].exp().mean(0)
        assert torch.allclose(p.means[k], mu[rows].mean(0)) and torch.allclose(p.logvars[k], want_var.log())
    lone = ({0, 1, 2} - {int(comp[labels == b][0]) for b in range(2)}).pop()
    assert torch.equal(p.means[lone], before["means"][lone]) and torch.equal(p.logvars[lone], before["logvars"][lone])


def test_trainer_refits_at_its_step_in_weights_and_ema_and_resumes_exactly(tmp_path):
    """prior_refit_step=2: the step-2 checkpoint predates the refit, so a run stopped there and resumed ends with
    the straight run's weights; the refit leaves every component at the mean of the posterior means it wins
    (k-means' fixed point) and the EMA copy of the prior equal to the weights'."""
    from test_train import _opts, _tiny, make_fake_mnist

    from matnet.train import Trainer

    (tmp_path / "mnist").mkdir()
    data = make_fake_mnist(tmp_path / "mnist")
    cfg = _tiny(prior="gmm", prior_components=3, prior_refit_step=2, ema_rate=0.9)
    straight = Trainer(cfg, _opts(tmp_path / "a", data, steps=4, eval_every=0))
    straight.run()
    first = Trainer(cfg, _opts(tmp_path / "b", data, steps=4, eval_every=0))
    first.run(until=2)
    resumed = Trainer(cfg, _opts(tmp_path / "b", data, steps=4, eval_every=0))
    assert resumed.step == 2
    resumed.refit_if_due()
    prior = resumed.model.z0_prior
    for net in (resumed.model, resumed.ema):
        assert torch.equal(net.z0_prior.means, prior.means) and torch.equal(net.z0_prior.logvars, prior.logvars)
    x = resumed.loader.dataset.to_float(resumed.loader.images, torch.Generator().manual_seed(0))
    mu = resumed.model.z0_posterior(x)[0].double()
    near = torch.cdist(mu, prior.means.double()).argmin(1)
    for k in near.unique():
        assert torch.allclose(prior.means[k].double(), mu[near == k].mean(0), atol=0.05)
    resumed.close()
    resumed = Trainer(cfg, _opts(tmp_path / "b", data, steps=4, eval_every=0))
    resumed.run()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_stop_signal_during_the_refit_checkpoints_before_it_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM while the k-means of the refit runs (a large prior_components can take minutes): the refit is
    abandoned at once, the checkpoint is the state before it (that of a run stopped at the step), and the same
    command resumes to the straight run's weights."""
    from test_train import _opts, _tiny, make_fake_mnist

    import matnet.clustering as clustering
    from matnet.checkpoint import load_checkpoint
    from matnet.train import Preempted, Trainer

    (tmp_path / "mnist").mkdir()
    data = make_fake_mnist(tmp_path / "mnist")
    cfg = _tiny(prior="gmm", prior_components=3, prior_refit_step=2, ema_rate=0.9)
    straight = Trainer(cfg, _opts(tmp_path / "a", data, steps=4, eval_every=0))
    straight.run()
    Trainer(cfg, _opts(tmp_path / "c", data, steps=4, eval_every=0)).run(until=2)
    real, calls = clustering.kmeans, []

    def signalled(*a, **k):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the run, which must stop within the k-means
        return real(*a, **k)

    monkeypatch.setattr(clustering, "kmeans", signalled)
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 2;"):
        Trainer(cfg, _opts(tmp_path / "b", data, steps=4, eval_every=0)).run()
    assert calls == [1]
    stopped, before = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("b", "c"))
    assert stopped["step"] == before["step"] == 2
    for key in ("model", "ema"):
        for name, v in before[key].items():
            assert torch.equal(stopped[key][name], v), (key, name)
    monkeypatch.undo()
    resumed = Trainer(cfg, _opts(tmp_path / "b", data, steps=4, eval_every=0))
    resumed.run()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_refit_of_a_diverged_model_stops_training(tmp_path, monkeypatch):
    from test_train import _opts, _tiny, make_fake_mnist

    from matnet.train import Trainer, TrainingDiverged

    (tmp_path / "mnist").mkdir()
    tr = Trainer(_tiny(prior="gmm", prior_components=3, prior_refit_step=1),
                 _opts(tmp_path / "run", make_fake_mnist(tmp_path / "mnist"), steps=2, eval_every=0, ckpt_every=1))
    nan = lambda x: (torch.full((len(x), 4), float("nan")),) * 2  # noqa: E731
    monkeypatch.setattr(tr.model, "z0_posterior", nan)
    with pytest.raises(TrainingDiverged, match="step 1: q\\(z0 \\| x\\) is non-finite.*step 1\\) is kept"):
        tr.run()


@pytest.mark.parametrize("kw, msg", [
    (dict(prior="vamp"), "prior must be"),
    (dict(prior_refit_step=5), "prior_refit_step needs the mixture prior"),
    (dict(prior="gmm", prior_refit_step=-1), "prior_refit_step must be"),
    (dict(prior="gmm", prior_components=0), "prior_components"),
    (dict(prior_entropy_weight=0.4), "needs the mixture prior"),
    (dict(prior="gmm", prior_entropy_weight=-1.0), "prior_entropy_weight"),
    (dict(infer_reg_weight=float("nan")), "infer_reg_weight"),
    (dict(infer_reg_start=-1), "infer_reg_start"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        matnet.MatNetConfig.preset("tiny", **kw)


# ---- the fast twin -----------------------------------------------------------------------------------------
def _run(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", [GMM.replace(prior_entropy_weight=0.4), GMM.replace(likelihood="logistic")],
                         ids=["bernoulli-entropy", "logistic"])
def test_fast_matches_reference(cfg):
    ref = matnet.MatNet(cfg)
    fast = matnet.FastMatNet(cfg)
    fast.load_state_dict(ref.state_dict())
    truth = matnet.MatNet(cfg).double()
    truth.load_state_dict(ref.state_dict())
    x = random_data(cfg, 3)
    runs = [_run(fast, x, 7), _run(ref, x, 7), _run(truth, x.double(), 7)]
    outs = [{k: getattr(o, k) for k in ("loss", "kl", "recon_nll")} for o, _ in runs]
    assert_all_within_ref_error("output", *outs)
    assert_all_within_ref_error("grad", *[g for _, g in runs])


def test_more_components_than_refit_images_is_refused_at_setup(tmp_path):
    from test_train import _opts, _tiny, make_fake_mnist

    from matnet.train import Trainer

    (tmp_path / "mnist").mkdir()
    data = make_fake_mnist(tmp_path / "mnist")
    opts = _opts(tmp_path / "a", data, steps=4, eval_every=0)
    with pytest.raises(ValueError, match=r"prior_refit_step clusters \d+ training images into prior_components"):
        Trainer(_tiny(prior="gmm", prior_components=100_000, prior_refit_step=2), opts)
