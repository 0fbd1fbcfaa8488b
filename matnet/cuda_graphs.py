"""A whole training step as one CUDA graph, for the small shapes (the "mnist" preset) where kernel launches, not
arithmetic, bound the step: hundreds of launches become one replay.

    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), capturable=True)

    def step(x):
        out = model(x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1000.0)
        opt.step()
        return out.loss.detach()

    run = graph_step(step, opt, x)  # x: a batch of the shape every later batch has
    for x in batches:
        loss = run(x)               # copies x into the captured input, replays, returns the captured outputs

The step must keep its shapes, never synchronize with the host (no .item(), no data-dependent Python branch),
and draw its noise on the GPU (torch's CUDA generator is graph-safe: every replay draws fresh noise); under
autocast pass `cache_enabled=False`, or the replays reuse the weights' casts made at capture. A float
learning rate is frozen into the graph: to change it between replays, give the optimizer a tensor lr and
fill it in place. The gradients live in the graph's memory: the step overwrites them, it does not
accumulate. After each replay the parameters' version counters are bumped, so autograd sees that the
replay changed them in place.
`matnet train` gets graphs through `--compile --compile-mode reduce-overhead` instead, which keeps its
host-side guards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def graph_step(step: Callable[..., Any], opt: torch.optim.Optimizer, *inputs: torch.Tensor,
               warmup: int = 3) -> Callable[..., Any]:
    """step(*inputs) captured as one CUDA graph after `warmup` eager calls (Triton autotuning, cuDNN plans and
    lazily built optimizer state happen there, each a real training step). The returned function copies its
    arguments into the captured inputs, replays the graph and returns step's outputs, overwritten by the next
    call."""
    if not all(g.get("capturable") for g in opt.param_groups):
        raise ValueError("graph_step: build the optimizer with capturable=True, so that its step count stays on "
                         "the GPU")
    if not all(t.is_cuda for t in inputs):
        raise ValueError("graph_step: CUDA graphs need CUDA inputs")
    params = [p for g in opt.param_groups for p in g["params"]]
    static = [t.clone() for t in inputs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step(*static)

    def replay(*new: torch.Tensor) -> Any:
        if len(new) != len(static) or any(a.shape != b.shape or a.device != b.device for a, b in zip(new, static)):
            raise ValueError(f"graph_step: captured for inputs {[(list(t.shape), str(t.device)) for t in static]}, "
                             f"got {[(list(t.shape), str(t.device)) for t in new]}")
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        for p in params:  # the replay changed them in place behind autograd's back
            torch.autograd.graph.increment_version(p)
        return outputs

    return replay
