"""The inference regulariser (paper Eq. 13): the negative ELBO on the model's own samples, whose gradient reaches
the inference parameters only; the inference / generator split is a partition of the parameters."""

import math

import pytest
import torch
from helpers import random_data

import matnet
from matnet.regularizers import generator_parameters, inference_parameters, inference_regularizer

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: threads only spin against each other

TINY = matnet.MatNetConfig.preset("tiny")
CASES = {
    "tiny": TINY,
    "logistic-8bit": TINY.replace(likelihood="logistic"),
    "gaussian": TINY.replace(likelihood="gaussian"),  # unbounded draws: clamped to data space
    "gmm": TINY.replace(prior="gmm", prior_components=3),
    "fc-gru": TINY.replace(fully_connected=True, fc_modules=2),
    # the cifar10 layout, shrunk: RGB mixture likelihood with the AR reconstruction
    "cifar10-ar": matnet.MatNetConfig.preset("cifar10", image_size=8, modules_per_scale=(1, 1), channels=8, nz0=4,
                                             fc_width=16, n_mixtures=2, ar_layers=2, ar_channels=4),
}
INFERENCE = ("stem.", "bu.", "bu_down.", "top.bu_", "merge.", "merge_up.")


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_split_is_a_partition(name):
    m = matnet.MatNet(CASES[name])
    inf, gen = inference_parameters(m), generator_parameters(m)
    ids_i, ids_g = {id(p) for p in inf}, {id(p) for p in gen}
    assert len(ids_i) == len(inf) and len(ids_g) == len(gen) and not ids_i & ids_g
    assert ids_i | ids_g == {id(p) for p in m.parameters()}
    assert inf and gen
    for n, p in m.named_parameters():
        assert (id(p) in ids_i) == n.startswith(INFERENCE), n
    if m.z0_prior is not None:
        assert id(m.z0_prior.means) in ids_g


def _grads(model, params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("cls", [matnet.MatNet, matnet.FastMatNet], ids=["reference", "fast"])
def test_gradient_reaches_inference_parameters_only(name, cls):
    """Eq. 13's gradient is the ELBO's gradient on the same samples, restricted to q: the generator's .grad
    stay untouched (here: a sentinel), the inference parameters get the plain ELBO gradient, nonzero."""
    cfg = CASES[name]
    m = cls(cfg)
    inf, gen = inference_parameters(m), generator_parameters(m)
    seen = []
    check = m.check_input
    m.check_input = lambda x: (seen.append(x), check(x))[1]
    for p in gen:
        p.grad = torch.full_like(p, 7.0)
    torch.manual_seed(3)
    reg = inference_regularizer(m, 3)
    reg.backward()
    assert reg.dim() == 0 and torch.isfinite(reg)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in gen)
    got = _grads(m, inf)

    # the samples it trained on: in data space
    x = seen[-1]
    assert x.shape == (3, cfg.image_channels, cfg.image_size, cfg.image_size) and not x.requires_grad
    if cfg.likelihood == "bernoulli":
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    else:
        assert x.min() >= -1 and x.max() <= 1
    if cfg.likelihood in ("logistic", "logistic_mixture"):
        assert torch.allclose(torch.round((x + 1) * 127.5), (x + 1) * 127.5, atol=1e-4)  # 8-bit bin centres

    # the same draw and forward noise through the plain ELBO: the same inference gradients
    m.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    m(m.sample(3)).nll_bound.mean().backward()
    want = _grads(m, inf)
    # the first GRU merge reads h_m = 0, so its recurrent weights get no gradient from any loss
    names = [n for n, p in m.named_parameters() if any(p is q for q in inf)]
    for n, g, w in zip(names, got, want):
        assert g is not None, n
        torch.testing.assert_close(g, w, msg=n)  # the same fp32 computation, only the graph differs
        assert n == "merge.0.0.update.weight_hh" or g.abs().max() > 0, n


@pytest.mark.parametrize("name", list(CASES))
def test_runs_under_autocast(name):
    """Under bf16 autocast the samples come back as data in the parameters' dtype (fp32, 8-bit values exactly on
    their bins), so the model accepts them; the gradient still reaches the inference parameters only."""
    cfg = CASES[name]
    m = matnet.FastMatNet(cfg)
    inf, gen = inference_parameters(m), generator_parameters(m)
    seen = []
    check = m.check_input
    m.check_input = lambda x: (seen.append(x), check(x))[1]
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reg = inference_regularizer(m, 3)
    reg.backward()
    assert torch.isfinite(reg) and all(p.grad is None for p in gen)
    assert sum(p.grad is not None and bool(p.grad.abs().max() > 0) for p in inf) > len(inf) // 2
    x = seen[-1]
    assert x.dtype == torch.float32
    if cfg.likelihood in ("logistic", "logistic_mixture"):
        assert torch.equal(torch.round((x + 1) * 127.5) / 127.5 - 1, x)


def test_adds_to_the_training_loss():
    """loss + lambda * Eq. 13: generator gradients are those of the loss alone."""
    m = matnet.MatNet(TINY)
    x = random_data(TINY, 4)
    gen = generator_parameters(m)
    torch.manual_seed(0)
    m(x).loss.backward()
    alone = _grads(m, gen)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    (m(x).loss + 0.5 * inference_regularizer(m, 2)).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(alone, gen))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        inference_regularizer(matnet.MatNet(TINY), 0)
    with pytest.raises(TypeError, match="MatNet"):
        inference_parameters(matnet.ConditionalMatNet(TINY))


def test_trainer_applies_eq13_from_its_start_step_to_the_inference_parameters(tmp_path):
    """infer_reg_weight in training: no term before infer_reg_start; from then on the logged value, and an update
    that moves the inference parameters differently while the generator's are exactly those of a run without it
    (the regulariser draws its samples after the step's own noise, so the first such step sees the same batch)."""
    from test_train import _opts, _tiny, make_fake_mnist

    from matnet.regularizers import generator_parameters, inference_parameters
    from matnet.train import Trainer

    (tmp_path / "mnist").mkdir()
    data = make_fake_mnist(tmp_path / "mnist")

    def run(weight, out):
        # no clipping: one global norm would couple the two parameter groups
        tr = Trainer(_tiny().replace(infer_reg_weight=weight, infer_reg_start=1, grad_clip=1e30),
                     _opts(tmp_path / out, data, steps=2, eval_every=0, ckpt_every=0))
        stream = tr.loader.forever()
        rows = [tr.train_step(next(stream)) for _ in range(2)]
        return tr, rows

    with_reg, rows = run(0.5, "reg")
    without, _ = run(0.0, "plain")
    assert "infer_reg" not in rows[0] and rows[1]["infer_reg"] > 0
    # step 1 (the first with the term) starts from the same weights and noise in both runs
    gen = zip(generator_parameters(with_reg.model), generator_parameters(without.model))
    assert all(torch.equal(a, b) for a, b in gen)
    inf = zip(inference_parameters(with_reg.model), inference_parameters(without.model))
    assert not all(torch.equal(a, b) for a, b in inf)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_weights_eq13(tmp_path, precision):
    """The trainer adds weight x Eq. 13's gradient, under autocast too: halving the weight halves the inference
    gradients (exactly: a power of two), and the logged value is the unweighted regulariser."""
    from test_train import _opts, _tiny, make_fake_mnist

    from matnet.train import Trainer

    (tmp_path / "mnist").mkdir()
    data = make_fake_mnist(tmp_path / "mnist")

    def grads(weight):
        tr = Trainer(_tiny().replace(infer_reg_weight=weight, infer_reg_start=0),
                     _opts(tmp_path / str(weight), data, steps=1, eval_every=0, ckpt_every=0, precision=precision))
        tr.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        reg = tr.inference_regularizer_grads(4)
        assert all(p.grad is None for p in generator_parameters(tr.model))
        return reg, [p.grad for p in inference_parameters(tr.model)]

    reg1, g1 = grads(1.0)
    reg2, g2 = grads(0.5)
    assert reg1 == reg2 and reg1 > 0
    assert all((a is None) == (b is None) for a, b in zip(g1, g2))
    assert all(torch.equal(0.5 * a, b) for a, b in zip(g1, g2) if a is not None)


def test_overflowing_draws_skip_the_step_instead_of_stopping_the_run(tmp_path, monkeypatch, caplog):
    """Draws of the model that overflow make Eq. 13's term NaN: the skip guard skips that update (and would stop
    a run that keeps overflowing) rather than the run failing with an error; infer_reg_start without a weight
    is said to do nothing."""
    from test_train import _opts, _tiny, make_fake_mnist

    from matnet.model import GenerationOverflow
    from matnet.train import Trainer

    (tmp_path / "mnist").mkdir()
    data = make_fake_mnist(tmp_path / "mnist")
    tr = Trainer(_tiny().replace(infer_reg_weight=1.0), _opts(tmp_path / "r", data, steps=2, eval_every=0))

    def overflow(*a, **k):
        raise GenerationOverflow("generation overflowed")

    monkeypatch.setattr(tr.model, "sample", overflow)
    before = [p.detach().clone() for p in tr.model.parameters()]
    row = tr.train_step(next(tr.loader.forever()))
    assert row["skipped"] == 1 and math.isnan(row["infer_reg"])
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    Trainer(_tiny().replace(infer_reg_start=3), _opts(tmp_path / "w", data, steps=5, eval_every=0))
    assert "infer_reg_start=3 has no effect: infer_reg_weight is 0" in caplog.text
