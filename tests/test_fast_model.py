"""FastMatNet against MatNet with the same weights and the same noise, judged against a float64 MatNet
(the noise is drawn in fp32 whatever the model's dtype, so the fp64 copy sees the same draws)."""

from unittest import mock

import pytest
import torch
from helpers import assert_all_within_ref_error, assert_within_ref_error, max_err, random_data, scale_of

import matnet


def _pair(cfg):
    ref = matnet.MatNet(cfg)
    fast = matnet.FastMatNet(cfg)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _truth(ref):
    truth = matnet.MatNet(ref.cfg).double()
    truth.load_state_dict(ref.state_dict())
    return truth


OUTPUTS = ("loss", "kl", "recon_nll")


def assert_model_within_ref_error(out_f, g_f, out_r, g_r, out_t, g_t):
    """Loss, per-module KL, reconstruction and every parameter gradient of the fast model: error against
    the fp64 model at most twice the fp32 reference's own."""
    outs = [{k: getattr(o, k) for k in OUTPUTS} for o in (out_f, out_r, out_t)]
    assert_all_within_ref_error("output", *outs)
    assert_all_within_ref_error("grad", g_f, g_r, g_t)


def _ref_envelope(ref, x, seed, out_t, g_t):
    """The fp32 reference at the noise as drawn and nudged by one fp32 ulp up and down, each group (outputs,
    gradients) from the run farthest from the fp64 truth. A MatNet's gradients jump where a leaky ReLU's input
    crosses zero, so where an fp32 pre-activation lies within rounding of one, rounding alone moves the reference
    that far (one cifar10-ar input: a 1-ulp nudge of the noise took the reference's worst gradient error from
    3.6e-6 to 3.5e-4, and the fast model, whose own rounding fell on the other side, lands there too). The fast
    model is held to twice this envelope, not to the side of the kink the reference happened to round to."""
    real = type(ref).noise
    runs = []
    for f in (1.0, 1.0 + 2.0**-23, 1.0 - 2.0**-23):
        with mock.patch.object(type(ref), "noise", lambda self, shape, device, _f=f: real(self, shape, device) * _f):
            runs.append(_run(ref, x, seed))

    def worst(group: dict, truth: dict) -> float:
        return max(max_err(group[k], truth[k]) / scale_of(truth[k]) for k in truth)

    outs_t = {k: getattr(out_t, k) for k in OUTPUTS}
    out_r = max((r[0] for r in runs), key=lambda o: worst({k: getattr(o, k) for k in OUTPUTS}, outs_t))
    g_r = max((r[1] for r in runs), key=lambda g: worst(g, g_t))
    return out_r, g_r


def _run(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.loss.backward()
    return out, {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}


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
    x = random_data(cfg, 3 if name != "mnist" else 4)
    out_f, g_f = _run(fast, x, seed=7)
    out_t, g_t = _run(_truth(ref), x.double(), seed=7)
    out_r, g_r = _ref_envelope(ref, x, 7, out_t, g_t)
    assert_model_within_ref_error(out_f, g_f, out_r, g_r, out_t, g_t)


def test_fast_iwae_and_sample_match_reference():
    cfg = CASES["tiny"]
    ref, fast = _pair(cfg)
    truth = _truth(ref)
    x = random_data(cfg, 2)

    def seeded(seed, f, *args, **kw):
        torch.manual_seed(seed)
        return f(*args, **kw)

    iwae = [seeded(3, m.iwae_nll, xx, k=5, chunk=2) for m, xx in ((fast, x), (ref, x), (truth, x.double()))]
    assert_within_ref_error("iwae", *iwae)
    samples = [seeded(4, m.sample, 3, mean=True) for m in (fast, ref, truth)]
    assert_within_ref_error("sample", *samples)


def test_force_reference_env_routes_fast_model_to_reference(monkeypatch):
    monkeypatch.setenv("MATNET_FORCE_REFERENCE", "1")
    cfg = CASES["logistic"]
    ref, fast = _pair(cfg)
    x = random_data(cfg, 2)
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
    x = random_data(cfg, 2)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    out_c, g_c = _run(compiled, x, seed=0)
    out_e, g_e = _run(fast, x, seed=0)
    truth = matnet.MatNet(cfg).double()
    truth.load_state_dict(fast.state_dict())
    out_t, g_t = _run(truth, x.double(), seed=0)
    assert_model_within_ref_error(out_c, g_c, out_e, g_e, out_t, g_t)
