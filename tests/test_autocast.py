"""Every fast op, and FastMatNet, under torch.autocast: convolution-like ops run in the autocast dtype,
likelihoods and KL compute and return fp32, parameter gradients come back in the parameters' dtype, and
the results are as accurate as the reference's under the same autocast (judged against fp64)."""

import pytest
import torch
from helpers import assert_all_within_ref_error, assert_within_ref_error, needs_cuda, random_data

import matnet
from matnet import ops
from matnet.ops import reference

AUTOCAST_DTYPES = {"cpu": [torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}
CASES = [(d, t) for d in ("cpu", "cuda") for t in AUTOCAST_DTYPES[d]]
CASE_PARAMS = [pytest.param(d, t, marks=[needs_cuda] if d == "cuda" else [], id=f"{d}-{str(t)[6:]}")
               for d, t in CASES]


def _residual_args(device):
    g = torch.Generator().manual_seed(0)
    B, C, E, M, H, W = 2, 6, 3, 8, 5, 7
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    return [r(B, C, H, W), r(M, C + E, 3, 3, scale=0.2), r(M, scale=0.5), r(C, M, 3, 3, scale=0.2),
            r(C, scale=0.5), r(B, E, H, W)]


def _masked_args(device):
    g = torch.Generator().manual_seed(1)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    return [r(2, 3, 5, 6), r(4, 5, 5, 5, scale=0.2), r(4, scale=0.5), r(2, 2, 5, 6)]


def _gaussian_args(device, low):
    g = torch.Generator().manual_seed(2)
    t = [torch.randn(3, 4, 5, generator=g).to(device) for _ in range(5)]
    return [t[0].to(low), t[1].to(low), t[2], t[3], t[4]]  # mixed: q from a low-precision conv, p and eps fp32


def _call(name, args, direct):
    """The wrapper, or the registered op itself (whose extra outputs are dropped)."""
    if name == "residual_conv_block":
        return torch.ops.matnet.residual_conv_block(*args, 0.1)[0] if direct else ops.residual_conv_block(*args)
    if name == "masked_conv2d":
        x, w, b, c = args
        return torch.ops.matnet.masked_conv2d(x, w, b, "A", c) if direct else ops.masked_conv2d(x, w, b, "A", c)
    return getattr(torch.ops.matnet, name)(*args) if direct else getattr(ops, name)(*args)


CONV_OPS = {"residual_conv_block": (_residual_args, reference.residual_conv_block),
            "masked_conv2d": (_masked_args, lambda x, w, b, c: reference.masked_conv2d(x, w, b, "A", c))}


@pytest.mark.parametrize("direct", [False, True], ids=["wrapper", "torch.ops"])
@pytest.mark.parametrize("name", list(CONV_OPS))
@pytest.mark.parametrize("device,dtype", CASE_PARAMS)
def test_conv_ops_run_in_autocast_dtype(name, device, dtype, direct):
    make, ref_fn = CONV_OPS[name]
    args = [a.requires_grad_() for a in make(device)]
    with torch.autocast(device, dtype=dtype):
        out = _call(name, args, direct)
        ref = ref_fn(*[a.detach() for a in args])
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.float32 for a in args)  # the parameters' dtype
    truth = ref_fn(*[a.detach().double() for a in args])
    assert_within_ref_error(name, out.detach(), ref, truth)


@pytest.mark.parametrize("direct", [False, True], ids=["wrapper", "torch.ops"])
@pytest.mark.parametrize("device,dtype", CASE_PARAMS)
def test_gaussian_sample_kl_is_fp32_under_autocast(device, dtype, direct):
    args = [a.requires_grad_() for a in _gaussian_args(device, dtype)]
    with torch.autocast(device, dtype=dtype):
        z, kl = _call("gaussian_sample_kl", args, direct)
    assert z.dtype == torch.float32 and kl.dtype == torch.float32
    (z.sum() + kl.sum()).backward()
    assert [a.grad.dtype for a in args] == [a.dtype for a in args]
    truth = reference.gaussian_sample_kl(*[a.detach().double() for a in args])
    for got, t in zip((z, kl), truth):  # the same fp32 math on the same (rounded) inputs
        assert_within_ref_error("gaussian_sample_kl", got.detach(), t.float(), t)


def _likelihood_args(device, low):
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 256, (2, 3, 4, 5), generator=g)
    x = (k.float() * 2 / 255 - 1).to(device)
    elem = [x, (x + 0.1 * torch.randn(x.shape, generator=g).to(device)).to(low),
            (-3 + torch.rand(x.shape, generator=g).to(device)).to(low)]
    K = 4
    mix = [x, torch.randn(2, K, 4, 5, generator=g).to(device).to(low),
           (x.unsqueeze(1) + 0.2 * torch.randn(2, K, 3, 4, 5, generator=g).to(device)).to(low),
           (-4 + 2 * torch.rand(2, K, 3, 4, 5, generator=g).to(device)).to(low),
           torch.tanh(torch.randn(2, K, 3, 4, 5, generator=g)).to(device)]
    return {"discretized_logistic_nll": elem, "discretized_logistic_mixture_nll": mix}


@pytest.mark.parametrize("direct", [False, True], ids=["wrapper", "torch.ops"])
@pytest.mark.parametrize("name", ["discretized_logistic_nll", "discretized_logistic_mixture_nll"])
@pytest.mark.parametrize("device,dtype", CASE_PARAMS)
def test_likelihoods_are_fp32_under_autocast(name, device, dtype, direct):
    args = _likelihood_args(device, dtype)[name]
    args = [args[0]] + [a.requires_grad_() for a in args[1:]]
    with torch.autocast(device, dtype=dtype):
        out = _call(name, args, direct)
    out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.float32
    out.sum().backward()
    assert [a.grad.dtype for a in args[1:]] == [a.dtype for a in args[1:]]
    truth = getattr(reference, name)(*[a.detach().double() for a in args])
    assert_within_ref_error(name, out.detach(), truth.float(), truth)


def _step(model, x, device, dtype, seed=11):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if device == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out = model(x)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["tiny", "cifar10-small"])
@pytest.mark.parametrize("device,dtype", CASE_PARAMS)
def test_fast_model_training_step_under_autocast(preset, device, dtype):
    """FastMatNet and MatNet under the same autocast: fp32 parameter gradients, and the same loss and
    gradients within the autocast dtype's error (each judged against the fp64 model without autocast)."""
    cfg = (matnet.MatNetConfig.preset("tiny") if preset == "tiny" else
           matnet.MatNetConfig.preset("cifar10", channels=16, ar_layers=2, ar_channels=8, nz0=8, fc_width=32))
    ref = matnet.MatNet(cfg).to(device)
    fast = matnet.FastMatNet(cfg).to(device)
    fast.load_state_dict(ref.state_dict())
    truth = matnet.MatNet(cfg).double().to(device)
    truth.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(5)
    shape = (3, cfg.image_channels, cfg.image_size, cfg.image_size)
    x = (torch.bernoulli(torch.rand(shape, generator=g)) if cfg.likelihood == "bernoulli"
         else torch.round(torch.rand(shape, generator=g) * 255) / 127.5 - 1).to(device)
    out_f, g_f = _step(fast, x, device, dtype)
    out_r, g_r = _step(ref, x, device, dtype)
    out_t, g_t = _step(truth, x.double(), device, None)
    for out in (out_f, out_r):  # MatNet's KL too: summed in bf16 it was biased by nats (see test_ops_gaussian)
        assert out.loss.dtype == out.kl.dtype == out.recon_nll.dtype == torch.float32
    assert all(gr.dtype == torch.float32 for gr in g_f.values())
    outs = [{k: getattr(o, k) for k in ("loss", "kl", "recon_nll")} for o in (out_f, out_r, out_t)]
    assert_all_within_ref_error("output", *outs)
    assert_all_within_ref_error("grad", g_f, g_r, g_t)


@pytest.mark.parametrize("device,dtype", CASE_PARAMS)
def test_iwae_under_autocast(device, dtype):
    """The IWAE bound with low-precision networks: fp32 result, log-densities summed in fp32, FastMatNet as
    close to the fp64 bound as MatNet under the same autocast."""
    cfg = matnet.MatNetConfig.preset("tiny")
    ref = matnet.MatNet(cfg).to(device)
    fast = matnet.FastMatNet(cfg).to(device).to(memory_format=torch.channels_last)
    fast.load_state_dict(ref.state_dict())
    truth = matnet.MatNet(cfg).double().to(device)
    truth.load_state_dict(ref.state_dict())
    x = random_data(cfg, 3).to(device)

    def bound(model, xx, autocast):
        torch.manual_seed(2)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            return model.iwae_nll(xx, k=6, chunk=4)

    b_f, b_r, b_t = bound(fast, x, True), bound(ref, x, True), bound(truth, x.double(), False)
    assert b_f.dtype == torch.float32 and torch.isfinite(b_f).all()
    assert_all_within_ref_error("iwae", {"b": b_f}, {"b": b_r}, {"b": b_t})


@pytest.mark.parametrize("kind", ["normal", "gmm", "conditional"])
def test_iwae_of_a_bf16_model(kind):
    """A model cast to bf16 (no autocast): the bound runs, comes back in fp32 (not rounded to bf16's ~4-nat steps
    at 500 nats) and stays near the fp64 bound of the same weights (bf16 keeps ~3 significant digits)."""
    cfg = matnet.MatNetConfig.preset("tiny", **({"prior": "gmm", "prior_components": 3} if kind == "gmm" else {}))
    cls = matnet.ConditionalMatNet if kind == "conditional" else matnet.MatNet
    half = cls(cfg).to(torch.bfloat16)
    truth = cls(cfg).double()
    truth.load_state_dict(half.state_dict())
    x = random_data(cfg, 3)
    args = (torch.ones_like(x[:, :1]).tril(),) if kind == "conditional" else ()
    torch.manual_seed(2)
    got = half.iwae_nll(x.bfloat16(), *args, k=6, chunk=4)
    torch.manual_seed(2)
    want = truth.iwae_nll(x.double(), *args, k=6, chunk=4)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert ((got.double() - want).abs() < 0.02 * want.abs()).all(), (got, want)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "logistic", "logistic_mixture"])
def test_samples_under_autocast_are_data(likelihood):
    """model.sample under bf16 autocast returns data in the parameters' dtype: fp32, in range, 8-bit values exactly
    on their bins (bf16 cannot hold 2k/255 - 1), so the model accepts its own samples."""
    rgb = {"image_channels": 3, "dataset": "cifar10"} if likelihood == "logistic_mixture" else {}
    cfg = matnet.MatNetConfig.preset("tiny", likelihood=likelihood, n_mixtures=2, **rgb)
    model = matnet.FastMatNet(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = model.sample(4)
        model(x)  # check_input: dtype and range
    assert x.dtype == torch.float32
    if likelihood in ("logistic", "logistic_mixture"):
        assert torch.equal(torch.round((x + 1) * 127.5) / 127.5 - 1, x)


def test_mixed_dtypes_outside_autocast_are_rejected():
    args = _gaussian_args("cpu", torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        ops.gaussian_sample_kl(*args)
