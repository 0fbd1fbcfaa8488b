"""matnet.cuda_graphs.graph_step: a whole training step of FastMatNet (fused kernels, both layouts) captured as one
CUDA graph gives the eager steps' parameters, follows the weights it updates and draws
fresh noise on every replay; bad arguments get one clear error (on any machine)."""

import pytest
import torch
from helpers import needs_cuda

from matnet import FastMatNet, MatNet, MatNetConfig
from matnet.cuda_graphs import graph_step


def _model(layout: str, noise: float | None) -> FastMatNet:
    """FastMatNet of the "mnist" preset (the small shapes graphs are for) with MatNet's seed-0 weights; `noise`:
    a constant in place of N(0, I) draws, so that two runs of the same steps must agree."""
    cfg = MatNetConfig.preset("mnist")
    torch.manual_seed(0)
    model = FastMatNet(cfg)
    model.load_state_dict(MatNet(cfg).state_dict())
    model = model.cuda()
    if noise is not None:
        model.noise = lambda shape, device: torch.full(shape, noise, device=device)
    return model.to(memory_format=torch.channels_last) if layout == "channels_last" else model


def _stepper(model: FastMatNet, lr: float = 1e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr, capturable=True)  # the same Adam code in both runs

    def step(x):
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), model.cfg.grad_clip)
        opt.step()
        return out.loss.detach()

    return step, opt


def _batches(n: int, layout: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return [torch.bernoulli(torch.full((16, 1, 28, 28), 0.3), generator=g).cuda().contiguous(memory_format=fmt)
            for _ in range(n)]


@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """The plain conv layers' weight gradients, the same in both runs."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


def _eval_loss(model: FastMatNet, x: torch.Tensor) -> float:
    with torch.no_grad():
        return model(x).loss.item()


@needs_cuda
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_graphed_steps_equal_eager_steps(layout):
    """3 warm-up steps on xs[0], then one replay per batch: the same updates as eager steps, loss by loss. A
    replay that reused the weights packed at capture would drift from the eager run from its second replay;
    an eager evaluation between replays must see the weights the replays wrote."""
    xs = _batches(7, layout)
    eager, graphed = _model(layout, 0.3), _model(layout, 0.3)
    step, _ = _stepper(eager)
    want = [step(x).item() for x in [xs[0]] * 3 + xs[1:3]]
    want_evals = [_eval_loss(eager, xs[0])]
    want += [step(x).item() for x in xs[3:5]]
    want_evals.append(_eval_loss(eager, xs[0]))
    want += [step(x).item() for x in xs[5:]]
    gstep, gopt = _stepper(graphed)
    replay = graph_step(gstep, gopt, xs[0], warmup=3)
    got = [replay(x).item() for x in xs[1:3]]
    got_evals = [_eval_loss(graphed, xs[0])]
    got += [replay(x).item() for x in xs[3:5]]
    got_evals.append(_eval_loss(graphed, xs[0]))
    got += [replay(x).item() for x in xs[5:]]
    torch.testing.assert_close(got, want[3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_evals, want_evals, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@needs_cuda
def test_graphed_step_draws_fresh_noise():
    model = _model("channels_last", None)
    step, opt = _stepper(model, lr=0.0)  # the weights stay: only the noise can change the loss
    x = _batches(1, "channels_last")[0]
    replay = graph_step(step, opt, x, warmup=2)
    losses = [replay(x).item() for _ in range(3)]
    assert len(set(losses)) == 3, f"the same loss on every replay: the noise was frozen at capture ({losses})"


def test_graph_step_rejects_what_cannot_be_captured():
    model = torch.nn.Linear(2, 2)
    x = torch.zeros(1, 2)
    for opt in (torch.optim.Adam(model.parameters()), torch.optim.Adam(model.parameters(), fused=True)):
        with pytest.raises(ValueError, match="capturable=True"):  # fused alone fails the capture health check
            graph_step(lambda x: model(x), opt, x)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA inputs"):
        graph_step(lambda x: model(x), torch.optim.Adam(model.parameters(), capturable=True), x)
