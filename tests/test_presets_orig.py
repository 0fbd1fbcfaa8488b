"""The *_orig presets (the original Theano code's settings): per-scale widths, orthogonal init, latent scale,
logit clip, two Adam groups with clipping and L2, the epoch schedule, fixed binarization and the
evaluation-time fine-tuning of the inference network."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from helpers import assert_all_within_ref_error, random_data
from test_train import make_fake_mnist

import matnet
from matnet import cli
from matnet.data import ImageDataset, load_dataset
from matnet.finetune import finetune_inference
from matnet.optim import apply_schedule, build_optimizer, clip_gradients, epoch_factors
from matnet.regularizers import generator_parameters, inference_parameters, split_parameters
from matnet.train import Trainer, TrainOptions

pytestmark = pytest.mark.usefixtures("one_thread")

# the mnist_orig layout shrunk: 2 scales of different widths, a 28x28 stage of its own width, all orig options
SMALL = matnet.MatNetConfig.preset("mnist_orig", modules_per_scale=(1, 2), channels=8, scale_channels=(8, 6),
                                   stem_channels=4, z_channels=2, nz0=4, fc_width=16, batch_size=8)


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


def _opts(out, data, **kw):
    base = dict(out_dir=str(out), data_dir=data, device="cpu", ops="reference", val_size=16, log_every=1,
                eval_every=0, iwae_k=0, ckpt_every=0, progress=False)
    return TrainOptions(**{**base, **kw})


def test_presets_carry_the_original_values():
    m = matnet.MatNetConfig.preset("mnist_orig")
    assert (m.scale_widths, m.stem_width, m.fc_width, m.modules_per_scale, m.stem_downsample) == \
        ((64, 64), 32, 128, (5, 5), 1)
    assert (m.adam_betas, m.adam_eps, m.separate_adams, m.grad_clip, m.l2_penalty) == \
        ((0.8, 0.98), 1e-4, True, 1000.0, 1e-5)
    assert (m.lr, m.batch_size, m.lr_schedule, m.lr_halve_epochs, m.adam_beta1_target, m.lr_linear_from_epoch) \
        == (1e-3, 100, "epochs", (5, 15, 30, 60, 100), 0.95, 151)
    assert (m.steps_per_epoch, m.steps, m.steps // m.steps_per_epoch) == (600, 180_000, 300)
    assert (m.ortho_init_gain, m.latent_scale, m.logit_clip, m.binarize) == (1.1, 0.2, 15.0, "fixed")
    o = matnet.MatNetConfig.preset("omniglot_orig")
    assert (o.dataset, o.scale_widths, o.stem_width, o.fc_width, o.binarize) == \
        ("omniglot", (128, 64), 32, 256, "dynamic")
    assert (o.lr_halve_epochs, o.steps // o.steps_per_epoch, o.lr_linear_from_epoch) == ((10, 25, 50, 150), 500, 251)
    assert (o.adam_betas, o.adam_eps, o.separate_adams, o.grad_clip, o.l2_penalty, o.adam_beta1_target) == \
        ((0.8, 0.98), 1e-4, True, 1000.0, 1e-5, 0.95)
    assert (o.ortho_init_gain, o.latent_scale, o.logit_clip) == (1.1, 0.2, 15.0)
    # the paper-spec preset keeps this library's defaults, and a checkpoint's config round-trips
    p = matnet.MatNetConfig.preset("mnist")
    assert (p.scale_widths, p.separate_adams, p.lr_schedule, p.ortho_init_gain, p.latent_scale, p.binarize) == \
        ((32, 32), False, "linear", 0.0, 0.0, "auto")
    assert matnet.MatNetConfig.from_dict(json.loads(m.to_json())) == m


@pytest.mark.parametrize("bad, says", [
    (dict(scale_channels=(8,)), "scale_channels"), (dict(stem_channels=4, stem_downsample=0), "stem_channels"),
    (dict(lr_schedule="linear"), "need lr_schedule"), (dict(steps_per_epoch=0), "steps_per_epoch"),
    (dict(binarize="sometimes"), "binarize"), (dict(adam_eps=0.0), "adam_eps"), (dict(latent_scale=-1.0), "latent"),
])
def test_bad_values_are_refused(bad, says):
    with pytest.raises(ValueError, match=says):
        SMALL.replace(**bad)


def test_parameter_count_of_mnist_orig():
    n = sum(p.numel() for p in matnet.MatNet(matnet.MatNetConfig.preset("mnist_orig")).parameters())
    assert n == 4_542_242  # about 4.4 M in the original (see README: this library's module shapes)


def test_fast_twins_match_and_share_state_dict_keys():
    ref, fast = matnet.MatNet(SMALL), matnet.FastMatNet(SMALL)
    assert list(ref.state_dict()) == list(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    truth = matnet.MatNet(SMALL).double()
    truth.load_state_dict(ref.state_dict())
    x = random_data(SMALL, 3)
    outs, grads = [], []
    for model, xx in ((fast, x), (ref, x), (truth, x.double())):
        torch.manual_seed(7)
        out = model(xx)
        out.loss.backward()
        outs.append({k: getattr(out, k) for k in ("loss", "kl", "recon_nll")})
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert_all_within_ref_error("output", *outs)
    assert_all_within_ref_error("grad", *grads)
    # the conditional MatNet and its fast twin build the same widths from the same code
    cref, cfast = matnet.ConditionalMatNet(SMALL), matnet.FastConditionalMatNet(SMALL)
    assert list(cref.state_dict()) == list(cfast.state_dict())
    cfast.load_state_dict(cref.state_dict())
    mask = torch.zeros(3, 1, 28, 28)
    mask[:, :, :14] = 1
    got = []
    for model in (cref, cfast):
        torch.manual_seed(3)
        got.append(model(x, mask).nll_bound)
    torch.testing.assert_close(got[0], got[1], rtol=1e-4, atol=1e-3)


def test_widths_per_scale_and_stem():
    m = matnet.MatNet(SMALL)
    assert m.stem[0].weight.shape[:2] == (4, 1) and m.stem[2][0].weight.shape[:2] == (6, 4)  # 28x28 stage: 4
    assert m.bu[0][0].conv1.weight.shape[0] == 8 and m.bu[1][0].conv1.weight.shape[0] == 6
    assert m.bu_down[0][0].weight.shape[:2] == (8, 6) and m.td_up[0][0].weight.shape[:2] == (8, 6)
    assert m.out_up[0][0].weight.shape[:2] == (6, 4) and m.out.weight.shape[:2] == (1, 4)
    assert m.top.bu_in.in_features == 8 * 7 * 7 and m.top.td_out.out_features == 8 * 7 * 7


def test_orthogonal_init_with_gain_and_zero_biases():
    assert _orthogonal_with_zero_biases(matnet.MatNet(SMALL)) > 20
    default = matnet.MatNet(SMALL.replace(ortho_init_gain=0.0))
    assert torch.count_nonzero(default.out.bias) == 1  # torch's default init: not orthogonal, biases not 0


def test_latent_scale_is_one_trainable_scalar_on_every_mean_and_logvar():
    m = matnet.MatNet(SMALL)
    assert m.latent_scale.requires_grad and m.latent_scale.shape == () and m.latent_scale.item() == pytest.approx(0.2)
    assert any(p is m.latent_scale for p in generator_parameters(m))
    heads, seen = [], []
    m.top.encode = (lambda enc: lambda h: heads.append(enc(h)) or heads[-1])(m.top.encode)
    for td, merge in zip(sum(map(list, m.td), []), sum(map(list, m.merge), [])):
        td.prior.register_forward_hook(lambda mod, i, o: heads.append(o))
        merge.register_forward_hook(lambda mod, i, o: heads.append(o[1:]))
    real = m._stochastic
    m._stochastic = lambda mq, lq, mp, lp, tr: seen.extend([(mq, lq), (mp, lp)]) or real(mq, lq, mp, lp, tr)
    m(random_data(SMALL, 2)).loss.backward()
    # z0's q (its prior is N(0, I), not a head), then per module q (merge head) and p (prior head)
    got = [seen[0]] + seen[2:]
    want = [heads[0]] + [heads[i + j] for i in range(1, len(heads), 2) for j in (1, 0)]
    assert len(got) == len(want) == 1 + 2 * sum(SMALL.modules_per_scale)
    for (mu, lv), (hmu, hlv) in zip(got, want):
        torch.testing.assert_close(mu, 0.2 * hmu)
        torch.testing.assert_close(lv, 0.2 * hlv)
    assert m.latent_scale.grad is not None and m.latent_scale.grad.abs() > 0
    assert "latent_scale" not in matnet.MatNet(SMALL.replace(latent_scale=0.0)).state_dict()


def test_logits_are_clipped():
    x = torch.zeros(2, 1, 28, 28)
    nll = {}
    for clip in (15.0, 0.0):
        m = matnet.MatNet(SMALL.replace(logit_clip=clip))
        with torch.no_grad():
            m.out.bias.fill_(100.0)  # every logit far above 15
        nll[clip] = m(x).recon_nll
        if clip:
            assert m.sample(2, mean=True).max() <= torch.sigmoid(torch.tensor(clip)) + 1e-7
    torch.testing.assert_close(nll[15.0], torch.full((2,), 784 * math.log1p(math.exp(15.0))), rtol=1e-4, atol=0)
    assert (nll[0.0] > 784 * 99).all()  # without the clip: about 100 nats per pixel


def test_two_adam_groups_partition_clip_separately_and_apply_l2():
    cfg = SMALL.replace(prior="gmm", prior_components=3)
    m = matnet.MatNet(cfg)
    opt = build_optimizer(m, cfg, 1e-3, torch.device("cpu"))
    assert [g["name"] for g in opt.param_groups] == ["generator", "inference"]
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(set(ids)) == len(ids)
    gen = {id(p) for p in opt.param_groups[0]["params"]}
    assert {id(m.latent_scale), id(m.z0_prior.means), id(m.z0_prior.logvars)} <= gen
    assert gen == {id(p) for p in generator_parameters(m)} and not gen & {id(p) for p in inference_parameters(m)}
    assert all(g["betas"] == (0.8, 0.98) and g["eps"] == 1e-4 for g in opt.param_groups)
    cm = matnet.ConditionalMatNet(SMALL)
    g_c, i_c = split_parameters(cm)
    assert len(g_c) + len(i_c) == len(list(cm.parameters())) and {id(p) for p in i_c} == \
        {id(p) for st in cm.stages for p in st.inf.parameters()}
    # per-group clipping: a huge generator gradient is cut to grad_clip, the inference one left alone
    for p in m.parameters():
        p.grad = torch.full_like(p, 100.0 if id(p) in gen else 1e-4)
    before = {id(p): p.grad.clone() for p in m.parameters()}
    norms = [torch.cat([before[id(p)].flatten() for p in g["params"]]).norm() for g in opt.param_groups]
    got = clip_gradients(opt, cfg.replace(l2_penalty=0.0))
    assert got == pytest.approx(float(torch.stack(norms).norm()), rel=1e-5)
    gen_norm = torch.cat([p.grad.flatten() for p in opt.param_groups[0]["params"]]).norm()
    assert gen_norm == pytest.approx(cfg.grad_clip, rel=1e-4)
    assert all(torch.equal(p.grad, before[id(p)]) for p in opt.param_groups[1]["params"])
    # L2: loss + l2 * sum(p^2) adds 2 * l2 * p to every gradient, biases included
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    clip_gradients(opt, cfg.replace(l2_penalty=1e-3, grad_clip=1e30))
    for p in m.parameters():
        torch.testing.assert_close(p.grad, 2e-3 * p.detach())


def _original_loop(epochs: int, niter: int, halve: tuple[int, ...]) -> list[tuple[float, float]]:
    """(lr, b1) used in each epoch by the original training script's end-of-epoch updates."""
    lr, b1, used = 1e-3, 0.8, []
    for epoch in range(1, epochs + 1):
        used.append((lr, b1))
        if epoch in halve:
            lr, b1 = lr / 2.0, b1 + (0.95 - b1) / 2.0
        if epoch > niter:
            lr = lr - lr / (epochs + 1 - epoch)
    return used


@pytest.mark.parametrize("name, niter", [("mnist_orig", 150), ("omniglot_orig", 250)])
def test_epoch_schedule_equals_the_original_loop(name, niter):
    cfg = matnet.MatNetConfig.preset(name)
    epochs = cfg.steps // cfg.steps_per_epoch
    want = _original_loop(epochs, niter, cfg.lr_halve_epochs)
    for e, (lr, b1) in enumerate(want, start=1):
        for step in ((e - 1) * cfg.steps_per_epoch, e * cfg.steps_per_epoch - 1):  # first and last step of e
            f, got_b1 = epoch_factors(step, cfg.steps, cfg)
            assert 1e-3 * f == pytest.approx(lr, rel=1e-12) and got_b1 == pytest.approx(b1, rel=1e-12)
    # by hand, MNIST: epoch 6 is the first at half the lr; epoch 152 is the second of the linear decay
    if name == "mnist_orig":
        assert epoch_factors(5 * 600 - 1, cfg.steps, cfg) == (1.0, 0.8)
        assert epoch_factors(5 * 600, cfg.steps, cfg) == pytest.approx((0.5, 0.875))
        assert epoch_factors(101 * 600, cfg.steps, cfg) == pytest.approx((1 / 32, 0.9453125))
        assert epoch_factors(151 * 600, cfg.steps, cfg)[0] == pytest.approx(149 / 150 / 32)
        assert epoch_factors(cfg.steps - 1, cfg.steps, cfg)[0] == pytest.approx(1 / 150 / 32)
        opt = build_optimizer(matnet.MatNet(SMALL), cfg, 1e-3, torch.device("cpu"))
        assert apply_schedule(opt, 16 * 600, cfg.steps, 1e-3, cfg) == pytest.approx(2.5e-4)
        assert all(g["lr"] == pytest.approx(2.5e-4) and g["betas"] == pytest.approx((0.9125, 0.98))
                   for g in opt.param_groups)


def test_resume_mid_schedule_is_exact(tmp_path, fake_mnist):
    # 4 epochs of 2 steps: halvings after epochs 1 and 2 (beta1 raised), linear decay from epoch 3
    cfg = SMALL.replace(steps_per_epoch=2, lr_halve_epochs=(1, 2), lr_linear_from_epoch=3, steps=8)
    straight = Trainer(cfg, _opts(tmp_path / "a", fake_mnist))
    straight.run()
    first = Trainer(cfg, _opts(tmp_path / "b", fake_mnist))
    first.run(until=5)
    resumed = Trainer(cfg, _opts(tmp_path / "b", fake_mnist))
    assert resumed.step == 5
    resumed.run()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [g["betas"] for g in resumed.opt.param_groups] == [pytest.approx((0.9125, 0.98))] * 2
    rows = [json.loads(r) for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3] * 2 + [5e-4] * 2 + [2.5e-4, 2.5e-4, 1.25e-4, 1.25e-4])
    assert all(math.isfinite(r["grad_norm"]) for r in rows)


def test_an_epoch_schedule_that_miscounts_the_epochs_is_said(tmp_path, fake_mnist, caplog):
    """mnist_orig counts epochs of 600 steps (60,000 images): with a validation split held out, a pass over the
    training images is fewer steps, and training says so."""
    with caplog.at_level(logging.WARNING, logger="matnet.train"):
        tr = Trainer(SMALL, _opts(tmp_path / "a", fake_mnist))
    steps = len(tr.loader)
    tr.close()
    n = len(tr.train_data)
    assert f"epochs of steps_per_epoch=600 steps, but a pass over these {n} training images is {steps}" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="matnet.train"):
        Trainer(SMALL.replace(steps_per_epoch=steps), _opts(tmp_path / "b", fake_mnist)).close()
    assert "steps_per_epoch" not in caplog.text


def test_fixed_binarization_is_one_draw_per_image(fake_mnist):
    a = load_dataset("mnist", "train", fake_mnist, binarize="fixed", val_size=16)
    b = load_dataset("mnist", "train", fake_mnist, binarize="fixed", val_size=16)
    everything = load_dataset("mnist", "train", fake_mnist, binarize="fixed", val_size=0)
    assert torch.equal(a.images, b.images) and set(a.images.unique().tolist()) == {0, 255}
    assert torch.equal(a.images, everything.images[:len(a)])  # the held-out split does not change a draw
    x = a.to_float(a.images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, a.to_float(a.images, generator=torch.Generator().manual_seed(2)))  # every epoch
    dyn = load_dataset("mnist", "train", fake_mnist, binarize="dynamic", val_size=16)
    assert not torch.equal(x, dyn.to_float(dyn.images, generator=torch.Generator().manual_seed(1)))
    test = load_dataset("mnist", "test", fake_mnist, binarize="fixed")
    assert set(test.images.unique().tolist()) == {0, 255}


def test_trainer_uses_the_configs_binarization(tmp_path, fake_mnist):
    tr = Trainer(SMALL.replace(steps=1), _opts(tmp_path, fake_mnist, seed=3))
    ref = load_dataset("mnist", "train", fake_mnist, binarize="fixed", val_size=16)
    assert tr.train_data.binarize == "fixed" and torch.equal(tr.train_data.images, ref.images)  # any --seed
    tr.close()


def test_finetuning_changes_only_the_inference_network_and_lowers_the_loss():
    rng = np.random.default_rng(0)
    images = np.zeros((16, 1, 28, 28), np.uint8)
    for i in range(16):
        r, c = rng.integers(4, 20, size=2)
        images[i, 0, r:r + 8, c:c + 6] = 230
    data = ImageDataset(images, binarize="fixed", seed=0)
    model = matnet.MatNet(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = data.to_float(data.images)

    def mean_loss(m):  # the negative ELBO and its KL part, averaged over 8 fixed noise draws
        with torch.no_grad():
            outs = []
            for s in range(8):
                torch.manual_seed(100 + s)
                outs.append(m(x))
            return (torch.stack([o.nll_bound.mean() for o in outs]).mean().item(),
                    torch.stack([o.kl.sum(1).mean() for o in outs]).mean().item())

    tuned = finetune_inference(model, data, epochs=30, lr=1e-2, batch_size=16, seed=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    inf = {n for n, p in tuned.named_parameters() if any(p is q for q in inference_parameters(tuned))}
    changed = {n for n, v in tuned.state_dict().items() if not torch.equal(v, before[n])}
    assert changed and changed <= inf  # generator parameters bitwise unchanged
    (loss0, kl0), (loss1, kl1) = mean_loss(model), mean_loss(tuned)
    assert loss1 < loss0 - 0.5 and kl1 < 0.5 * kl0  # an untrained model: the KL is most of what q can cut
    assert all(p.requires_grad for p in tuned.parameters())


def test_finetuning_minimises_the_bound_itself():
    """The fine-tuning objective is the mean negative ELBO, not the training loss: with a mixture prior and an
    entropy penalty, one full-batch step equals one Adam step on nll_bound.mean() alone."""
    cfg = SMALL.replace(prior="gmm", prior_components=3, prior_entropy_weight=100.0)
    data = ImageDataset(np.random.default_rng(1).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8), binarize="fixed")
    model = matnet.MatNet(cfg)
    tuned = finetune_inference(model, data, epochs=1, lr=1e-2, batch_size=8, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = data.to_float(data.images[torch.randperm(8, generator=gen)], generator=gen)
    params = inference_parameters(model)
    opt = torch.optim.Adam(params, lr=1e-2, betas=cfg.adam_betas, eps=cfg.adam_eps)
    torch.manual_seed(0)
    model(x).nll_bound.mean().backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    for (n, a), b in zip(tuned.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_eval_cli_reports_finetuned_bounds_separately(tmp_path, fake_mnist):
    cfg = SMALL.replace(steps=2)
    Trainer(cfg, _opts(tmp_path / "run", fake_mnist)).run()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    raw = ckpt.read_bytes()
    out = tmp_path / "eval.json"
    code = cli.main(["eval", str(ckpt), "--data-dir", fake_mnist, "--device", "cpu", "--ops", "reference",
                     "--k", "3", "--n-images", "8", "--batch-size", "8", "--finetune-inference-epochs", "2",
                     "--finetune-lr", "1e-3", "--out", str(out)])
    assert code == 0 and ckpt.read_bytes() == raw
    res = json.loads(out.read_text())
    assert {"elbo", "iwae", "elbo_finetuned", "iwae_finetuned", "bounds"} <= set(res)
    assert res["finetune_inference_epochs"] == 2 and res["finetune_images"] == 8
    assert res["iwae"] != res["iwae_finetuned"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", str(ckpt), "--finetune-inference-epochs", "x"])
    assert cli.main(["eval", str(ckpt), "--data-dir", fake_mnist, "--finetune-lr", "0"]) == 2


def test_eval_cli_says_when_finetuning_hurts_and_keeps_the_plain_bounds_when_it_diverges(
        tmp_path, fake_mnist, monkeypatch, caplog, capsys):
    import copy

    import matnet.finetune

    Trainer(SMALL.replace(steps=2), _opts(tmp_path / "run", fake_mnist)).run()
    ckpt, out = tmp_path / "run" / "checkpoint.pt", tmp_path / "eval.json"
    argv = ["eval", str(ckpt), "--data-dir", fake_mnist, "--device", "cpu", "--k", "2", "--n-images", "8",
            "--batch-size", "8", "--finetune-inference-epochs", "1", "--out", str(out)]

    def tuned_by(change):
        def fake(model, *a, **k):
            tuned = copy.deepcopy(model)
            with torch.no_grad():
                change(tuned.top.bu_out.bias)  # the z0 head of q: the inference network only
            return tuned
        return fake

    monkeypatch.setattr(matnet.finetune, "finetune_inference", tuned_by(lambda b: b.add_(30.0)))
    assert cli.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["elbo_finetuned"] > res["elbo"]
    assert "fine-tuning made the -ELBO worse" in caplog.text
    monkeypatch.setattr(matnet.finetune, "finetune_inference", tuned_by(lambda b: b.fill_(float("nan"))))
    capsys.readouterr()
    assert cli.main(argv) == 3
    assert "fine-tuning the inference network diverged" in capsys.readouterr().err
    res = json.loads(out.read_text())  # the bounds computed before it are kept
    assert res["finetune_diverged"] is True and {"elbo", "iwae"} <= set(res) and "elbo_finetuned" not in res


def _orthogonal_with_zero_biases(module: torch.nn.Module) -> int:
    """Asserts gain 1.1 orthogonality and zero biases on every conv and linear layer; returns how many."""
    checked = 0
    for mod in module.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)):
            w = mod.weight.detach().flatten(1)
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, 1.21 * torch.eye(len(gram)), atol=1e-5, rtol=0)
            assert torch.count_nonzero(mod.bias) == 0
            checked += 1
    return checked


def test_conditional_stages_carry_the_original_options():
    """ConditionalMatNet under an *_orig config: every stage orthogonally initialised, its means and
    log-variances scaled by a trainable scalar of its own (0.2), and its logits clipped at +-15."""
    cfg = SMALL.replace(stages=2)
    cm = matnet.ConditionalMatNet(cfg)
    x = random_data(cfg, 2)
    m = torch.zeros(2, 1, 28, 28)
    m[:, :, 14:, :14] = 1
    for stage in cm.stages:
        assert _orthogonal_with_zero_biases(stage) > 20
        assert stage.latent_scale.requires_grad and stage.latent_scale.item() == pytest.approx(0.2)

    def priors():
        torch.manual_seed(5)
        return cm.prior_params(x, m)

    scaled = priors()
    for s, stage in enumerate(cm.stages):  # stage s unscaled, the stages before it as they were
        with torch.no_grad():
            stage.latent_scale.fill_(1.0)
        unscaled = priors()[s * cfg.n_stochastic]  # the stage's z0: p(z0 | x^k, earlier stages' guess)
        with torch.no_grad():
            stage.latent_scale.fill_(0.2)
        for a, b in zip(scaled[s * cfg.n_stochastic], unscaled):
            torch.testing.assert_close(a, 0.2 * b)
    cm(x, m).loss.backward()
    assert all(stage.latent_scale.grad.abs() > 0 for stage in cm.stages)
    assert not any("latent_scale" in k for k in matnet.ConditionalMatNet(cfg.replace(latent_scale=0.0)).state_dict())
    with torch.no_grad():
        for stage in cm.stages:
            stage.out.bias.fill_(100.0)  # every logit far above 15
    nll = cm(torch.zeros(2, 1, 28, 28), m).recon_nll  # the 196 missing pixels, each at softplus(15) nats
    torch.testing.assert_close(nll, torch.full((2,), 196 * math.log1p(math.exp(15.0))), rtol=1e-4, atol=0)
