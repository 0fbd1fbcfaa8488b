"""channels_last end to end: every op keeps the layout of its first input (and its fake kernel says so),
and a channels_last FastMatNet computes what the NCHW one does, without converting between modules."""

import pytest
import torch
from helpers import assert_all_within_ref_error, conv_fp32_precision, needs_cuda, random_data
from test_fast_model import CASES, _pair, _ref_envelope, _run, _truth, assert_model_within_ref_error

import matnet
from matnet.ops import reference
from matnet.ops._dispatch import layout

CL = torch.channels_last


def _cl(t):
    return t.contiguous(memory_format=CL)


def _op_cases():
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * scale

    B, C, E, M, H, W = 3, 5, 3, 4, 6, 7
    yield ("residual_conv_block",
           [r(B, C, H, W), r(M, C + E, 3, 3, scale=0.3), r(M), r(C, M, 3, 3, scale=0.3), r(C), r(B, E, H, W), 0.1])
    yield ("masked_conv2d", [r(B, C, H, W), r(M, C + E, 3, 3, scale=0.3), r(M), "B", r(B, E, H, W)])
    yield ("gaussian_sample_kl", [r(B, C, H, W), r(B, C, H, W, scale=0.3), r(B, C, H, W), r(B, C, H, W, scale=0.3),
                                  r(B, C, H, W)])
    x = torch.round(torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 255) / 127.5 - 1
    yield ("discretized_logistic_nll", [x, r(B, C, H, W, scale=0.5), r(B, C, H, W, scale=0.3) - 2])


OP_CASES = list(_op_cases())


def _outputs(name, args, fmt, ops=matnet.ops, **to):
    """The op's outputs (from `ops`: the dispatching ops, or `reference`) and the gradients of their sum of
    squares wrt every float tensor argument, with the 4-d tensors in layout fmt (and moved/cast by `to`)."""
    args = [(a.to(**to).contiguous(memory_format=fmt) if a.dim() == 4 else a.to(**to)).detach().requires_grad_()
            if isinstance(a, torch.Tensor) else a for a in args]
    out = getattr(ops, name)(*args)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.pow(2).sum() for o in outs).backward()
    return outs, [a.grad for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize(("name", "args"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_keeps_channels_last(name, args):
    outs_cl, grads_cl = _outputs(name, args, CL)
    outs, grads = _outputs(name, args, torch.contiguous_format)
    for o_cl, o in zip(outs_cl, outs):
        assert layout(o_cl) is CL, f"{name}: output is not channels_last, strides {o_cl.stride()}"
        assert layout(o) is torch.contiguous_format
        # fp64: a different summation order changes the last bits only
        torch.testing.assert_close(o_cl, o, rtol=1e-12, atol=1e-12)
    for g_cl, g in zip(grads_cl, grads):
        torch.testing.assert_close(g_cl, g, rtol=1e-12, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize(("name", "args"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_keeps_channels_last_cuda(name, args):
    """fp32 on the GPU backends (Triton, CUDA extension): channels_last inputs keep their layout, and the
    values are as close to the fp64 truth as the reference's in fp32 (the convolutions run another engine,
    with other tiles and summation orders, on channels_last)."""
    with conv_fp32_precision("ieee"):
        outs_cl, grads_cl = _outputs(name, args, CL, device="cuda", dtype=torch.float32)
        outs, grads = _outputs(name, args, torch.contiguous_format, reference, device="cuda", dtype=torch.float32)
    truth_outs, truth_grads = _outputs(name, args, torch.contiguous_format)  # fp64 on the CPU
    for o_cl in outs_cl:
        assert layout(o_cl) is CL, f"{name}: output is not channels_last, strides {o_cl.stride()}"
    for what, got, ref, truth in (("outputs", outs_cl, outs, truth_outs), ("grads", grads_cl, grads, truth_grads)):
        assert_all_within_ref_error(f"{name} {what}", *({i: t.cpu() for i, t in enumerate(ts) if t is not None}
                                                         for ts in (got, ref, truth)))


@pytest.mark.parametrize(("name", "args"), OP_CASES, ids=[c[0] for c in OP_CASES])
@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
def test_fake_kernel_strides_match_real(name, args, fmt):
    """torch.compile plans with the fake kernels' strides: they must be the real ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.matnet, name).default
    real_args = [a.contiguous(memory_format=fmt) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args]
    real = op(*real_args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in real_args])
    real, fake = (r if isinstance(r, (tuple, list)) else (r,) for r in (real, fake))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride(), (name, r.stride(), f.stride())


def _spy_layouts(monkeypatch):
    """Records the layout of the feature map of every residual block and sample + KL call."""
    seen = []
    for name in ("residual_conv_block", "gaussian_sample_kl"):
        real = getattr(matnet.ops, name)

        def spy(t, *a, _real=real, _name=name, **k):
            if t.dim() == 4 and t.shape[-1] > 1:  # z0 and the [B, C, 1, 1] FC states have one layout only
                seen.append((_name, tuple(t.shape), layout(t)))
            return _real(t, *a, **k)

        monkeypatch.setattr(matnet.ops, name, spy)
    return seen


@pytest.mark.parametrize("name", ["mnist", "cifar10-ar"])
def test_fast_model_channels_last_matches_nchw(name, monkeypatch):
    """Same loss, KL and gradients as the NCHW models by the fp64-truth rule; every feature map that the
    fused ops see is channels_last (no conversion between modules); gradients keep the weights' layout."""
    cfg = CASES[name]
    ref, fast = _pair(cfg)
    fast = fast.to(memory_format=CL)
    truth = _truth(ref)
    x = random_data(cfg, 3)
    seen = _spy_layouts(monkeypatch)
    out_f, g_f = _run(fast, _cl(x), 5)
    assert seen and all(fmt is CL for *_, fmt in seen), [s for s in seen if s[2] is not CL][:3]
    monkeypatch.undo()
    for n, p in fast.named_parameters():
        assert layout(p.grad) is layout(p), f"{n}.grad is not in its weight's layout"
    out_t, g_t = _run(truth, x.double(), 5)
    out_r, g_r = _ref_envelope(ref, x, 5, out_t, g_t)
    assert_model_within_ref_error(out_f, g_f, out_r, g_r, out_t, g_t)


def test_sample_and_iwae_channels_last():
    cfg = CASES["mnist"]
    ref, fast = _pair(cfg)
    fast = fast.to(memory_format=CL)
    torch.manual_seed(3)
    s_ref = ref.sample(4, mean=True)
    torch.manual_seed(3)
    s_fast = fast.sample(4, mean=True)
    torch.testing.assert_close(s_fast, s_ref, rtol=1e-4, atol=1e-4)  # probabilities in [0, 1]
    x = random_data(cfg, 2)
    torch.manual_seed(4)
    b_ref = ref.iwae_nll(x, k=4)
    torch.manual_seed(4)
    b_fast = fast.iwae_nll(_cl(x), k=4)
    torch.manual_seed(4)
    b_truth = _truth(ref).iwae_nll(x.double(), k=4)
    assert_all_within_ref_error("iwae", {"b": b_fast}, {"b": b_ref}, {"b": b_truth})


def test_reference_conv_backward_keeps_layout():
    """The reference backward (the CPU backend of the conv ops) returns grad_extra without forcing NCHW."""
    h, extra = _cl(torch.randn(2, 4, 5, 5)), _cl(torch.randn(2, 3, 5, 5))
    w1, w2 = _cl(torch.randn(4, 7, 3, 3)), _cl(torch.randn(4, 4, 3, 3))
    out, a1 = reference.residual_conv_block_fwd(h, w1, None, w2, None, extra, 0.1)
    gh, gextra, *_ = torch.ops.matnet.residual_conv_block_backward(torch.ones_like(out), h, extra, w1, w2, out,
                                                                   a1, 0.1)
    assert layout(gh) is CL and layout(gextra) is CL
