"""The options of `matnet train` for speed at scale: precision, channels_last, compile, ops, gradient
accumulation, LR warm-up and scaling, time limits, and the on-device data loader with its logging."""

import pickle
import types

import numpy as np
import pytest
import torch
from helpers import SMOOTH_ADAM, assert_all_within_ref_error
from test_train import _opts, _tiny, make_fake_mnist

import matnet
from matnet import cli, plots
from matnet.checkpoint import load_checkpoint
from matnet.data import BatchLoader, ImageDataset, load_dataset
from matnet.train import (
    EXIT_TIME_LIMIT,
    LR_SCALING,
    CompileUnavailable,
    TimeLimitReached,
    Trainer,
    TrainOptions,
    scaled_lr,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """CIFAR-10 python batches with 24 random 32x32 RGB images each (120 train, 24 test)."""
    d = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (24, 3072), dtype=np.uint8), b"labels": list(range(24))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return str(d)


def _cifar_small(**kw):
    """The cifar10 preset shrunk to seconds on a CPU: same likelihood, scales and data, narrow layers."""
    return matnet.MatNetConfig.preset("cifar10", modules_per_scale=(1, 1, 1), channels=8, z_channels=2, nz0=8,
                                      fc_width=16, n_mixtures=2, batch_size=8, **kw)


def _quiet(tmp_path, data, **kw):
    """Options for short runs that only train: no evaluation, no checkpoint until the end."""
    return _opts(tmp_path, data, **{"eval_every": 0, "ckpt_every": 0, **kw})


def _params_after(out, data, steps, dtype=torch.float32, **kw):
    """The parameters after `steps` updates (no EMA), with the trainer's own batches cast to `dtype`; Adam made
    smooth in the gradients (SMOOTH_ADAM), so the accuracy rule can judge them."""
    tr = Trainer(_tiny(**SMOOTH_ADAM), _quiet(out, data, steps=steps, **kw))
    tr.model.to(dtype)  # before the first step: Adam has no state yet
    stream = tr.loader.forever()
    for _ in range(steps):
        row = tr.train_step(next(stream).to(dtype))
        assert row["skipped"] == 0
    tr.close()
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


# ---- the options and their flags ----

def test_flags_come_from_the_options_and_bad_values_are_refused():
    p = cli.build_parser()
    a = p.parse_args(["train"])
    for name in ("ops", "precision", "channels_last", "compile", "grad_accum", "warmup_steps", "lr_scaling",
                 "lr_base_batch", "time_limit", "ckpt_minutes", "augment"):
        assert getattr(a, name) == getattr(TrainOptions(), name), name
    a = p.parse_args(["train", "--precision", "bf16", "--channels-last", "--compile", "--ops", "reference",
                      "--grad-accum", "2", "--warmup-steps", "5", "--lr-scaling", "sqrt", "--time-limit", "1.5",
                      "--ckpt-minutes", "2", "--augment", "none"])
    o = cli.from_args(TrainOptions, a)
    assert (o.precision, o.channels_last, o.compile, o.ops, o.grad_accum, o.warmup_steps, o.lr_scaling,
            o.time_limit, o.ckpt_minutes, o.augment) == ("bf16", True, True, "reference", 2, 5, "sqrt", 1.5, 2.0,
                                                        "none")
    assert p.parse_args(["train", "--fast"]).ops == "fast"  # the deprecated flag still works
    assert p.parse_args(["eval", "c.pt", "--ops", "reference"]).ops == "reference"
    for bad, msg in ((dict(grad_accum=0), "--grad-accum must be >= 1"),
                     (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
                     (dict(time_limit=-1.0), "--time-limit must be"),
                     (dict(ckpt_minutes=float("inf")), "--ckpt-minutes must be"),
                     (dict(loss_scale=0.0), "--loss-scale must be a finite number > 0"),
                     (dict(precision="fp8"), "--precision must be one of"),
                     (dict(ops="turbo"), "--ops must be one of")):
        with pytest.raises(ValueError, match=msg):
            TrainOptions(**bad)


def test_grad_accum_must_divide_the_batch(tmp_path, fake_mnist):
    with pytest.raises(ValueError, match="--grad-accum 3 must divide the batch size 8"):
        Trainer(_tiny(), _quiet(tmp_path, fake_mnist, grad_accum=3))


def test_ops_auto_is_fast_and_adam_is_fused_on_cpu(tmp_path, fake_mnist):
    tr = Trainer(_tiny(), _quiet(tmp_path / "a", fake_mnist))
    assert isinstance(tr.model, matnet.FastMatNet) and tr.opt.defaults["fused"]
    tr.close()
    tr = Trainer(_tiny(), _quiet(tmp_path / "b", fake_mnist, ops="reference"))
    assert type(tr.model) is matnet.MatNet
    tr.close()


def test_lr_rule_and_warmup(tmp_path, fake_mnist):
    assert LR_SCALING == {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
    assert scaled_lr(1e-3, 256, 64, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 256, 64, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 256, 64, "none") == 1e-3
    cfg = _tiny(lr=1e-3, lr_decay_start=1.0)  # no decay: the lr is warm-up x scaling alone
    Trainer(cfg, _quiet(tmp_path, fake_mnist, steps=6, warmup_steps=4, lr_scaling="linear", lr_base_batch=4)).run()
    lrs = [r["lr"] for r in plots.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert lrs == pytest.approx([2e-3 * f for f in (0.25, 0.5, 0.75, 1, 1, 1)])  # batch 8 = 2 x the base


# ---- equivalences ----

def test_grad_accum_gives_the_parameters_of_one_big_batch(tmp_path, fake_mnist):
    """Noise is drawn per example of the global batch, so splitting it changes only the summation order:
    the accumulated run is within twice the fp32 run's own error of the fp64 truth."""
    whole = _params_after(tmp_path / "a", fake_mnist, 3)
    split = _params_after(tmp_path / "b", fake_mnist, 3, grad_accum=2)
    truth = _params_after(tmp_path / "c", fake_mnist, 3, torch.float64)
    assert_all_within_ref_error("grad-accum 2", split, whole, truth)


def test_channels_last_matches_nchw(tmp_path, fake_mnist):
    nchw = _params_after(tmp_path / "a", fake_mnist, 3)
    cl = _params_after(tmp_path / "b", fake_mnist, 3, channels_last=True)
    truth = _params_after(tmp_path / "c", fake_mnist, 3, torch.float64)
    assert_all_within_ref_error("channels_last", cl, nchw, truth)


@pytest.mark.parametrize("precision,accum", [("fp32", 2), ("bf16", 1), ("fp16", 1)])
def test_resume_is_exact_and_keeps_the_grad_scaler(tmp_path, fake_mnist, precision, accum):
    kw = dict(steps=4, precision=precision, grad_accum=accum, ckpt_every=2)
    straight = Trainer(_tiny(), _quiet(tmp_path / "a", fake_mnist, **kw))
    straight.run()
    Trainer(_tiny(), _quiet(tmp_path / "b", fake_mnist, **kw)).run(until=2)
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    resumed = Trainer(_tiny(), _quiet(tmp_path / "b", fake_mnist, **kw))
    if precision == "fp16":
        assert saved["scaler"]["scale"] == resumed.scaler.get_scale()
        assert saved["scaler"] == resumed.scaler.state_dict()
    else:
        assert saved["scaler"] is None and resumed.scaler is None
    resumed.run()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    if precision == "fp16":
        assert straight.scaler.state_dict() == resumed.scaler.state_dict()


def test_bf16_run_of_a_shrunk_cifar10_preset(tmp_path, fake_cifar):
    Trainer(_cifar_small(), _opts(tmp_path, fake_cifar, steps=3, val_size=24, eval_every=3, eval_images=8,
                                  iwae_k=0, precision="bf16")).run()
    rows = plots.read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in train)
    assert np.isfinite([r for r in rows if r["split"] == "val"][-1]["val_elbo"])


# ---- data on the device ----

def test_flips_are_seeded_and_resume_exactly(fake_cifar):
    ds = load_dataset("cifar10", "train", fake_cifar, val_size=0)
    plain = BatchLoader(ds, 8, seed=3)
    flipped = BatchLoader(ds, 8, seed=3, hflip=True)
    a, b = next(iter(plain)), next(iter(flipped))
    same = [torch.equal(x, y) for x, y in zip(a, b)]
    mirrored = [torch.equal(x.flip(-1), y) for x, y in zip(a, b)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)
    assert flipped.images.dtype == torch.uint8  # held as bytes, converted per batch
    for _ in range(7):  # into the second epoch
        next(iter(flipped))
    state = flipped.state_dict()
    want = [next(iter(flipped)) for _ in range(4)]
    restored = BatchLoader(ds, 8, seed=99, hflip=True)
    restored.load_state_dict(state)
    assert all(torch.equal(x, next(iter(restored))) for x in want)
    with pytest.raises(ValueError, match="hflip"):
        BatchLoader(ds, 8).load_state_dict(state)


def test_binarized_batches_are_made_from_bytes_on_the_loader_device(fake_mnist):
    ds = load_dataset("mnist", "train", fake_mnist, val_size=40)
    x = next(iter(BatchLoader(ds, 8, seed=0)))
    assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    ds8 = ImageDataset(ds.images)  # 8-bit data space
    assert next(iter(BatchLoader(ds8, 8, seed=0))).min() >= -1.0


def test_images_per_second_and_peak_memory_are_logged(tmp_path, fake_mnist):
    Trainer(_tiny(), _quiet(tmp_path, fake_mnist, steps=2)).run()
    train = [r for r in plots.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in train)


# ---- compile ----

def test_compile_runs_the_training_step_through_torch_compile(tmp_path, fake_mnist, monkeypatch):
    """The plumbing, with dynamo's eager backend: code generation is torch's to test, and slow on a CPU."""
    real, calls = torch.compile, []

    def eager_compile(fn, **kw):
        calls.append(fn)
        return real(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    Trainer(_tiny(), _quiet(tmp_path, fake_mnist, steps=2, compile=True)).run()
    assert len(calls) == 1
    train = [r for r in plots.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)


def test_compile_traces_one_graph_through_the_kl_warm_up(tmp_path, fake_mnist, monkeypatch):
    """The warm-up changes the KL weight every step: the compiled step must take it as an input, not recompile
    (dynamo's recompile limit would then drop to eager) or bake a stale value into the graph."""
    torch._dynamo.reset()
    real, graphs = torch.compile, []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=counting_backend))
    rows = {}
    for name, kw in (("eager", {}), ("compiled", dict(compile=True))):
        Trainer(_tiny(kl_warmup_steps=4), _quiet(tmp_path / name, fake_mnist, steps=6, **kw)).run()
        rows[name] = [r for r in plots.read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"]
    assert len(graphs) == 1
    assert [r["kl_weight"] for r in rows["compiled"]] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for got, want in zip(rows["compiled"], rows["eager"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_compile_mode_with_cuda_graphs_keeps_every_micro_batch(tmp_path, fake_mnist, monkeypatch):
    """reduce-overhead replays CUDA graphs: each call overwrites the memory of the last call's outputs and of the
    gradients its backward handed over. Stand-in: a compiled function that fills those with NaN at each call.
    With 2 micro-batches the trainer reads the first's outputs after the second ran, and the second's backward
    adds to the first's gradients: the run equals the eager one only if the trainer copied both out."""
    real, modes, marks = torch.compile, [], []

    def graph_like_compile(fn, **kw):
        modes.append(kw.get("mode"))
        eager, graph_memory = real(fn, backend="eager"), []
        for p in fn.__self__.model.parameters():  # gradients set by the backward, as a graph's backward hands them
            p.register_post_accumulate_grad_hook(lambda p: graph_memory.append(p.grad))

        def run(*a, **k):
            with torch.no_grad():
                for t in graph_memory:
                    t.fill_(float("nan"))
            graph_memory.clear()
            out = eager(*a, **k)
            graph_memory.extend(v for v in vars(out).values() if isinstance(v, torch.Tensor))
            return out

        return run

    monkeypatch.setattr(torch, "compile", graph_like_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    rows = {}
    for name, kw in (("eager", {}), ("graphs", dict(compile=True, compile_mode="reduce-overhead"))):
        Trainer(_tiny(), _quiet(tmp_path / name, fake_mnist, steps=2, grad_accum=2, **kw)).run()
        rows[name] = [r for r in plots.read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"]
    assert modes == ["reduce-overhead"] and len(marks) == 4  # one step begins per micro-batch
    for got, want in zip(rows["graphs"], rows["eager"]):
        assert got["skipped"] == 0
        for key in ("loss", "nll_bound", "recon", "kl", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_compile_mode_needs_compile(tmp_path, fake_mnist):
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs --compile"):
        _quiet(tmp_path, fake_mnist, compile_mode="reduce-overhead")


def test_compile_unavailable_is_one_clear_line(tmp_path, fake_mnist, monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("Python 3.99 is not supported\nby torch.compile")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(CompileUnavailable, match="--compile: torch.compile is unavailable here"):
        Trainer(_tiny(), _quiet(tmp_path / "a", fake_mnist, compile=True))
    rc = cli.main(["train", "--preset", "tiny", "--data-dir", fake_mnist, "--out", str(tmp_path / "b"),
                   "--device", "cpu", "--no-progress", "--val-size", "40", "--compile"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "torch.compile is unavailable here (Python 3.99 is not supported by torch.compile)" in err


# ---- wall-clock limits ----

def test_time_limit_checkpoints_and_exits_with_code_5(tmp_path, fake_mnist, monkeypatch, capsys):
    """The command, on a fake clock (each step 1 s, the limit 6 s): after step 1 (checkpointed, to time one), a
    step starts while t + 2 x 1 < 6, so the run stops at step 4 with a checkpoint, one line and exit 5."""
    import matnet.train as train_mod

    now = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: now[0]))
    real_step = Trainer.train_step

    def step(self, batch):
        now[0] += 1.0
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    argv = ["train", "--preset", "tiny", "--batch-size", "8", "--data-dir", fake_mnist, "--out", str(tmp_path),
            "--device", "cpu", "--no-progress", "--val-size", "40", "--eval-every", "0", "--steps", "100000",
            "--time-limit", "0.1"]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_TIME_LIMIT == TimeLimitReached.exit_code == 5
    assert err == ("matnet train: stopped at step 4 before the 0.1-minute --time-limit; checkpoint written, run the "
                   "same command again to resume")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    monkeypatch.undo()
    resumed = Trainer(_tiny(), _quiet(tmp_path, fake_mnist, steps=None))  # its own schedule
    assert resumed.step == 4
    resumed.close()


def test_time_limit_reserves_two_slowest_steps_and_a_checkpoint(tmp_path, fake_mnist, monkeypatch):
    """The stopping rule on a fake clock (a step takes 1 s, a checkpoint 3 s, the limit is 20 s): the first
    applied step is checkpointed to time one (t = 4 s; that iteration took 4 s). A step then starts only while
    t + 2 x 4 + 3 < 20: steps 2-6 run (t = 9 s), the run stops before step 7, and its last checkpoint ends at
    12 s, before the limit. Without the timed first checkpoint it would start steps until t + 2 >= 20 and end at
    21 s."""
    import matnet.train as train_mod

    now = [0.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(monotonic=lambda: now[0], time=lambda: now[0]))
    real_write = train_mod.save_checkpoint

    def slow_write(*a):
        now[0] += 3.0
        real_write(*a)

    monkeypatch.setattr(train_mod, "save_checkpoint", slow_write)
    tr = Trainer(_tiny(), _quiet(tmp_path, fake_mnist, steps=100000, time_limit=20 / 60))
    real_step, real_save, saves = tr.train_step, tr.save, []

    def step(batch):
        now[0] += 1.0
        return real_step(batch)

    monkeypatch.setattr(tr, "train_step", step)
    monkeypatch.setattr(tr, "save", lambda: (saves.append(tr.step), real_save()))
    with pytest.raises(TimeLimitReached, match="stopped at step 6 "):
        tr.run()
    assert saves == [1, 6] and now[0] == 12.0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6


def test_time_limit_too_short_for_one_step_is_an_error(tmp_path, fake_mnist, capsys):
    """Not exit 5 (a scheduler's script would re-run it forever, each time at step 0): one error line, exit 2."""
    argv = ["train", "--preset", "tiny", "--batch-size", "8", "--data-dir", fake_mnist, "--out", str(tmp_path),
            "--device", "cpu", "--no-progress", "--val-size", "40", "--eval-every", "0", "--time-limit", "1e-6"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("matnet train: error: --time-limit 1e-06 ran out before the first step (the set-up took ")
    assert len(err.splitlines()) == 1 and not (tmp_path / "checkpoint.pt").exists()


def test_warmup_longer_than_the_run_is_said(tmp_path, fake_mnist, caplog):
    Trainer(_tiny(), _quiet(tmp_path, fake_mnist, steps=3, warmup_steps=5)).close()
    assert "--warmup-steps 5 is more than the run's 3 steps" in caplog.text


def test_ckpt_minutes_checkpoints_on_wall_time(tmp_path, fake_mnist, monkeypatch):
    tr = Trainer(_tiny(), _quiet(tmp_path, fake_mnist, steps=4, ckpt_minutes=1e-6))
    saved, real = [], tr.save
    monkeypatch.setattr(tr, "save", lambda: (saved.append(tr.step), real()))
    tr.run()
    assert saved == [1, 2, 3, 4, 4]  # every step (the period is tiny), and at the end
