"""FastMatNet against MatNet with the same weights and the same noise."""

import pytest
import torch

import matnet


def _data(cfg, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (b, cfg.image_channels, cfg.image_size, cfg.image_size)
    if cfg.likelihood == "bernoulli":
        return torch.bernoulli(torch.rand(shape, generator=g), generator=g)
    return torch.round(torch.rand(shape, generator=g) * 255) / 127.5 - 1


def _pair(cfg):
    ref = matnet.MatNet(cfg)
    fast = matnet.FastMatNet(cfg)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


CASES = {
    "tiny": matnet.MatNetConfig.preset("tiny"),
    "mnist": matnet.MatNetConfig.preset("mnist"),
    "cifar10-ar": matnet.MatNetConfig.preset("cifar10", channels=16, ar_layers=3, ar_channels=8, nz0=8,
                                             fc_width=32),
    "logistic": matnet.MatNetConfig.preset("tiny", likelihood="logistic", image_channels=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_matches_reference(name):
    cfg = CASES[name]
    ref, fast = _pair(cfg)
    assert list(ref.state_dict()) == list(fast.state_dict())
    x = _data(cfg, 3 if name != "mnist" else 4)
    out_r, g_r = _run(ref, x, seed=7)
    out_f, g_f = _run(fast, x, seed=7)
    tol = dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out_f.loss, out_r.loss, **tol)
    torch.testing.assert_close(out_f.kl, out_r.kl, **tol)
    torch.testing.assert_close(out_f.recon_nll, out_r.recon_nll, **tol)
    for n in g_r:
        scale = g_r[n].abs().max().clamp(min=1.0)
        torch.testing.assert_close(g_f[n] / scale, g_r[n] / scale, rtol=1e-3, atol=1e-4, msg=n)


def test_fast_iwae_and_sample_match_reference():
    cfg = CASES["tiny"]
    ref, fast = _pair(cfg)
    x = _data(cfg, 2)
    torch.manual_seed(3)
    a = ref.iwae_nll(x, k=5, chunk=2)
    torch.manual_seed(3)
    b = fast.iwae_nll(x, k=5, chunk=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    torch.manual_seed(4)
    s_r = ref.sample(3, mean=True)
    torch.manual_seed(4)
    s_f = fast.sample(3, mean=True)
    torch.testing.assert_close(s_r, s_f, rtol=1e-5, atol=1e-5)


def test_force_reference_env_routes_fast_model_to_reference(monkeypatch):
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "1")
    cfg = CASES["logistic"]
    ref, fast = _pair(cfg)
    x = _data(cfg, 2)
    out_r, _ = _run(ref, x, seed=5)
    out_f, _ = _run(fast, x, seed=5)
    assert torch.equal(out_r.nll_bound, out_f.nll_bound)  # bit-identical: the very same code runs


def test_fast_model_validates_input():
    fast = matnet.FastMatNet(CASES["tiny"])
    with pytest.raises(ValueError, match="shape"):
        fast(torch.zeros(2, 1, 27, 28))
    with pytest.raises(TypeError, match="floating"):
        fast(torch.zeros(2, 1, 28, 28, dtype=torch.int64))


def test_torch_compile_fullgraph_traces_fast_model():
    cfg = matnet.MatNetConfig.preset("tiny", likelihood="logistic")
    fast = matnet.FastMatNet(cfg)
    x = _data(cfg, 2)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    out_c = compiled(x)
    out_c.loss.backward()
    torch.manual_seed(0)
    out_e = fast(x)
    torch.testing.assert_close(out_c.nll_bound, out_e.nll_bound, rtol=1e-4, atol=1e-3)
    assert all(p.grad is not None for p in fast.parameters())
