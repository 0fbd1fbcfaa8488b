"""The channels-last engine of kernels/conv_nhwc.py: its TMA and pointer paths, every autotuned config,
in-place channel chunks, tile shapes, and weights changed behind the version counter. The block-level
comparisons against the reference over odd shapes (both engines) are in test_ops_residual.py and
test_ops_masked_conv.py."""

import inspect

import pytest
import torch
from helpers import assert_within_ref_error, triton_devices
from test_ops_residual import make_inputs, reference_with_grads, run_kernels

try:
    from matnet.kernels import conv_nhwc as E
    from matnet.kernels import masked_conv as MC
    from matnet.kernels import residual_conv as RC
except ImportError:  # no triton
    E = MC = RC = None

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(E is None, reason="needs triton")]
CL = torch.channels_last
# (B, C, E, M, H, W, k, bias) with 8 channels everywhere: every pixel stride is a multiple of 16 bytes
ALIGNED = (3, 8, 8, 16, 7, 6, 3, True)


def _check(case, dtype, device, **kw):
    inputs, grad = make_inputs(case, dtype, device)
    out, _, grads = run_kernels(inputs, grad, dtype, device, fmt=CL, **kw)
    truth_out, truth_grads = reference_with_grads(inputs, grad, torch.float64)
    ref_out, ref_grads = reference_with_grads(inputs, grad, dtype)
    assert_within_ref_error("out", out, ref_out, truth_out)
    for name, truth in truth_grads.items():
        assert_within_ref_error(f"grad {name}", grads[name], ref_grads[name], truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_aligned_sources_use_tma(dtype):
    x = torch.zeros(2, 8, 5, 5, dtype=dtype).contiguous(memory_format=CL)
    args, tma, strides = E._sources([x, x.clone()], None)
    assert tma and all(isinstance(a, E.TensorDescriptor) for a in args) and strides == (200, 40, 8)
    odd = torch.zeros(2, 5 if dtype == torch.float32 else 4, 5, 5, dtype=dtype).contiguous(memory_format=CL)
    assert not E._sources([odd], None)[1]  # 20 / 8-byte pixel strides: pointer loads
    assert not E._sources([x], False)[1]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tma_path_matches_reference(dtype, device):
    _check(ALIGNED, dtype, device)


@pytest.mark.parametrize("device", triton_devices())
def test_tma_and_pointer_paths_agree(device, monkeypatch):
    """The same launch with TMA descriptors and with pointer loads (forced) gives the same result."""
    inputs, grad = make_inputs(ALIGNED, torch.float32, device)
    with_tma = run_kernels(inputs, grad, torch.float32, device, fmt=CL)
    real = E._sources
    monkeypatch.setattr(E, "_sources", lambda ts, use_tma: real(ts, False))
    pointers = run_kernels(inputs, grad, torch.float32, device, fmt=CL)
    torch.testing.assert_close(with_tma[0], pointers[0], atol=1e-6, rtol=1e-6)
    for name, g in with_tma[2].items():
        torch.testing.assert_close(g, pointers[2][name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("config", E._fwd_configs() if E else [], ids=str)
def test_every_autotuned_config_is_right(config, device):
    """Each GPU config's tile (TB x TH x TW) and blocks, with its own warps and stages on a GPU: on 7x6 maps
    with a batch of 3 the 64- and 128-pixel tiles straddle images and leave partial rows."""
    _check(ALIGNED, torch.float32, device, block_sizes=config)


@pytest.mark.parametrize("device", triton_devices())
def test_small_maps_tile_over_images(device):
    """1x1 and 2x3 maps: a tile covers many images (TB > 1), the last one partly empty."""
    assert E.tile_shape(64, 1, 1) == (64, 1, 1) and E.tile_shape(64, 2, 4) == (8, 2, 4)
    assert E.tile_shape(64, 8, 8) == (1, 8, 8) and E.tile_shape(128, 32, 32) == (1, 4, 32)
    _check((37, 8, 0, 8, 2, 3, 3, True), torch.float32, device, block_sizes=(64, 16, 16))


@pytest.mark.parametrize("device", triton_devices())
def test_channel_chunks_read_in_place(device):
    """Sources that are channel chunks of one channels_last tensor (as torch.chunk of a merged state
    gives) are read through their strides, TMA included, and give the contiguous result."""
    B, H, W = 2, 5, 6
    g = torch.Generator().manual_seed(3)
    big = torch.randn(B, 24, H, W, generator=g).to(device).contiguous(memory_format=CL)
    h, extra = big[:, :8], big[:, 8:16]
    assert h.stride(1) == 1 and not h.is_contiguous(memory_format=CL)
    assert E._sources([h], None)[1]
    w1 = torch.randn(16, 16, 3, 3, generator=g).to(device) * 0.1
    w2 = torch.randn(8, 16, 3, 3, generator=g).to(device) * 0.1
    b1, b2 = torch.randn(16, generator=g).to(device), torch.randn(8, generator=g).to(device)
    out, a1 = RC.residual_conv_block_fwd(h, w1, b1, w2, b2, extra, 0.1)
    ref, _ = RC.residual_conv_block_fwd(h.contiguous(memory_format=CL), w1, b1, w2, b2,
                                        extra.contiguous(memory_format=CL), 0.1)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_engine_follows_the_layout():
    x = torch.zeros(2, 4, 5, 5)
    assert RC.engine(x)[0] is RC.launch_conv
    assert RC.engine(x.contiguous(memory_format=CL))[0] is E.launch_conv
    assert RC.engine(x.contiguous(memory_format=CL)[:, 1:3])[0] is E.launch_conv  # a channel chunk
    assert RC.engine(torch.zeros(2, 4, 1, 1).contiguous(memory_format=CL))[0] is RC.launch_conv  # both


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
def test_weights_changed_without_a_version_bump_are_used(fmt, device):
    """Adam(fused=True) and writes through .data change weights in place without bumping their version:
    the next launches (forward, input gradient, masked conv) must use the new values, as launches on fresh
    copies of them do."""
    x = {k: None if v is None else v.to(device) for k, v in make_inputs(ALIGNED, torch.float32, device)[0].items()}
    h, extra = (x[k].contiguous(memory_format=fmt) for k in ("h", "extra"))
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(device).contiguous(memory_format=fmt)
    w1, w2 = (torch.nn.Parameter(x[k]) for k in ("w1", "w2"))

    def launches(w1, w2):
        out, a1 = RC.residual_conv_block_fwd(h, w1, x["b1"], w2, x["b2"], extra, 0.1)
        grads = RC.residual_conv_block_bwd(g, h, extra, w1, w2, out, a1, 0.1)
        return out, grads[0], MC.masked_conv2d_fwd(h, w1, x["b1"], "B", cond=extra)

    launches(w1, w2)
    versions = w1._version, w2._version
    w1.data.mul_(-0.5)
    w2.grad = torch.randn_like(w2)
    torch.optim.Adam([w2], lr=0.1, fused=True).step()
    assert (w1._version, w2._version) == versions  # neither change is seen by the version counter
    for a, b in zip(launches(w1, w2), launches(w1.detach().clone(), w2.detach().clone())):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_autotune_key_holds_every_constexpr():
    """A config tuned for one epilogue must not be reused for another of the same shape."""
    params = inspect.signature(E._conv_nhwc_kernel.fn).parameters.values()
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert "SGN" in constexprs and "BLOCK_P" in constexprs
    tuned = {"BLOCK_P", "BLOCK_N", "BLOCK_K"}
    derived = {"H_P2", "W_P2"}  # functions of H and W, which are in the key
    assert constexprs - tuned - derived <= set(E.FWD_KEY)
    assert set(E._conv_nhwc_tuned.keys) == set(E.FWD_KEY)
