"""The static sm_90 report's checks catch what they claim to catch. Runs in a subprocess: the report
compiles for a GPU, so it must import Triton without TRITON_INTERPRET (which this session sets)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

PROBE = """
import json, sys, torch
sys.path.insert(0, {here!r})
import kernel_report as kr
from matnet.kernels import residual_conv as RC

def wgrad(dtype, blocks):
    g = torch.empty(100, 32, 28, 28, dtype=dtype, device="meta")
    x = torch.empty(100, 32, 28, 28, dtype=dtype, device="meta")
    sink = {{}}
    with kr.capturing(sink, {{"op": "probe"}}):
        RC.weight_grad(g, [(x, 9)], 3, g_gate=g, block_sizes=blocks)
    (launch,) = sink.values()
    return kr.analyse(launch, kr.triton_kernels(), 90).problems

def nhwc_fwd():
    from matnet.kernels import conv_nhwc as CN
    cl = torch.channels_last
    x = torch.empty(64, 64, 16, 16, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
    sink = {{}}
    with kr.capturing(sink, {{"op": "probe"}}):
        CN.launch_conv(x, torch.empty(9, 64, 64, dtype=torch.bfloat16, device="meta"), torch.empty_like(x), k=3)
    out = []
    for launch in sink.values():
        c = launch.constexprs
        box = list(CN.tile_shape(c["BLOCK_P"], 16, 16)) + [c["BLOCK_K"]]
        out.append([launch.signature["x1"], "tensordesc<bf16[" + ", ".join(map(str, box)) + "]>"])
    row = kr.analyse(next(iter(sink.values())), kr.triton_kernels(), 90)
    return {{"boxes": out, "tma": row.tma, "wgmma": row.tensor_core_mma, "problems": row.problems}}

def chunk(first):
    # the weight gradient of a 32-channel chunk of a 48-channel channels_last source, read in place: starting
    # at channel 16 its base is 32-byte aligned, at channel 1 it is 2 bytes off
    from matnet.kernels import conv_nhwc as CN
    cl = torch.channels_last
    g = torch.empty(100, 32, 28, 28, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
    x = torch.empty(100, 48, 28, 28, dtype=torch.bfloat16, device="meta").contiguous(memory_format=cl)
    sink = {{}}
    with kr.capturing(sink, {{"op": "probe"}}):
        CN.weight_grad(g, [(x[:, first:first + 32], 9)], 3)
    (launch,) = sink.values()
    row = kr.analyse(launch, kr.triton_kernels(), 90)
    ptx = kr.compile_launch(launch, kr.triton_kernels(), 90).asm["ptx"]
    return {{"x_aligned": "x_ptr" in launch.aligned, "g_aligned": "g_ptr" in launch.aligned,
             "block_p": launch.constexprs["BLOCK_P"], "problems": row.problems,
             "vector_copies": ptx.count("cp.async.cg.shared.global"), "scalar_loads": ptx.count("ld.global.b16")}}

print(json.dumps({{
    "chunk16": chunk(16),
    "chunk1": chunk(1),
    "nhwc": nhwc_fwd(),
    "bf16_default": wgrad(torch.bfloat16, None),
    "bf16_m32": wgrad(torch.bfloat16, (64, 32, 32)),
    "fp32_huge": wgrad(torch.float32, (256, 128, 64)),
}}))
"""


def test_report_flags_spills_shared_memory_and_missing_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", PROBE.format(here=here)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    problems = json.loads(out.stdout.strip().splitlines()[-1])
    assert problems["bf16_default"] == []  # what the launcher picks on a GPU is clean
    # an autotuned launch is recorded once per config its pruning keeps, each with its own TMA box
    nhwc = problems["nhwc"]
    assert len(nhwc["boxes"]) > 1 and all(got == want for got, want in nhwc["boxes"])
    assert nhwc["tma"] and nhwc["wgmma"] and nhwc["problems"] == []
    # arguments are specialised as the launcher does: an aligned source is read by 16-byte cp.async copies
    # in 32-pixel blocks, with no scalar load; one two bytes off is gathered by 2-byte loads through
    # registers, in 16-pixel blocks so that it does not spill
    aligned, odd = problems["chunk16"], problems["chunk1"]
    assert aligned["x_aligned"] and aligned["g_aligned"] and aligned["block_p"] == 32
    assert aligned["vector_copies"] > 0 and aligned["scalar_loads"] == 0
    assert not odd["x_aligned"] and odd["g_aligned"] and odd["block_p"] == 16
    assert odd["scalar_loads"] > 0
    assert aligned["problems"] == odd["problems"] == []
    # a 32-row tile cannot use wgmma (M >= 64), so the bf16 weight gradient falls back to mma.sync
    assert any("without tensor-core MMA" in p for p in problems["bf16_m32"])
    # 256x128 + 256x64 fp32 tiles with a gate need far more than 227 KB of shared memory, or spill
    assert any("shared memory" in p or "spills" in p for p in problems["fp32_huge"])
