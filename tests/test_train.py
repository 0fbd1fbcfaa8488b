"""Training loop, checkpoints, resume, plots and the CLI, on a small MNIST-format dataset."""

import gzip
import json
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import matnet
from matnet import cli, plots
from matnet.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from matnet.optim import lr_factor
from matnet.train import Trainer, TrainOptions, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def _write_idx(path, arr):
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def make_fake_mnist(d):
    """120 train / 40 test 28x28 'digits' in folder `d`: bright blobs at random places."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("t10k", 40)):
        img = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            r, c = rng.integers(4, 20, size=2)
            img[i, r:r + 8, c:c + 6] = rng.integers(150, 256)
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", img)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return str(d)


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


def _opts(tmp_path, data, **kw):
    base = dict(out_dir=str(tmp_path), data_dir=data, device="cpu", steps=6, val_size=40, log_every=1,
                eval_every=3, eval_images=16, iwae_k=4, iwae_images=4, ckpt_every=3, progress=False)
    return TrainOptions(**{**base, **kw})


def _tiny(**kw):
    return matnet.MatNetConfig.preset("tiny", batch_size=8, **kw)


def test_lr_schedule_constant_then_linear():
    assert lr_factor(0, 100, 0.5, 0.0) == 1.0
    assert lr_factor(49, 100, 0.5, 0.0) == 1.0
    assert lr_factor(75, 100, 0.5, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0.5, 0.1) == pytest.approx(0.1)


def test_checkpoint_atomic_and_errors(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"config": {}, "model": {"w": torch.ones(2)}})
    assert list(tmp_path.iterdir()) == [p]  # no temp file left behind
    assert torch.equal(load_checkpoint(p)["model"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    raw = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save([1, 2], tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a matnet checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_checkpoint_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"config": {}, "model": {"v": 1}})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(p, {"config": {}, "model": {"v": 2}})
    monkeypatch.undo()
    assert load_checkpoint(p)["model"]["v"] == 1
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]


def test_resume_continues_exactly(tmp_path, fake_mnist):
    cfg = _tiny()
    straight = Trainer(cfg, _opts(tmp_path / "a", fake_mnist))
    straight.run()
    first = Trainer(cfg, _opts(tmp_path / "b", fake_mnist))
    first.run(until=3)  # an interrupted run: checkpoint at step 3, schedule of 6 steps
    resumed = Trainer(cfg, _opts(tmp_path / "b", fake_mnist))
    assert resumed.step == 3
    resumed.run()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    rows_a = [r for r in plots.read_metrics(tmp_path / "a" / "metrics.jsonl") if r["split"] == "train"]
    rows_b = [r for r in plots.read_metrics(tmp_path / "b" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    st = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert st["step"] == 6 and st["config"] == cfg.to_dict()
    assert {"optimizer", "rng", "loader"} <= set(st)
    for name in ("nll.png", "samples.png", "kl_per_module.png"):
        assert (tmp_path / "b" / name).stat().st_size > 1000


def test_non_finite_gradient_skips_update(tmp_path, fake_mnist, monkeypatch):
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist))
    before = [p.detach().clone() for p in tr.model.parameters()]
    x = next(tr.loader.forever())
    real_forward = tr.model.forward

    def nan_forward(*a, **k):
        out = real_forward(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", nan_forward)
    row = tr.train_step(x)
    assert row["skipped"] == 1 and tr.skipped == 1
    assert all(torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))
    monkeypatch.undo()
    tr.train_step(x)
    assert tr.skipped == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.model.parameters()))


def test_ema_weights_track_the_model(tmp_path, fake_mnist):
    tr = Trainer(_tiny(ema_rate=0.9), _opts(tmp_path, fake_mnist))
    p0 = [p.detach().clone() for p in tr.model.parameters()]
    tr.train_step(next(tr.loader.forever()))
    for e, a, p in zip(tr.ema.parameters(), p0, tr.model.parameters()):
        torch.testing.assert_close(e, 0.9 * a + 0.1 * p)


def test_evaluate_is_reproducible_and_leaves_rng_alone(tmp_path, fake_mnist):
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist))
    state = torch.get_rng_state()
    a = evaluate(tr.model, tr.val_data, 16, iwae_k=3, iwae_images=4)
    b = evaluate(tr.model, tr.val_data, 16, iwae_k=3, iwae_images=4)
    assert a == b
    assert torch.equal(state, torch.get_rng_state())
    assert a["iwae"] <= a["elbo"] + 50  # same ballpark; IWAE uses a subset


def test_evaluate_builds_no_autograd_graph(tmp_path, fake_mnist, monkeypatch):
    """Evaluation batches must not keep graphs alive (memory grows with the number of images otherwise)."""
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist))
    real, grad_on = tr.model.forward, []

    def forward(*a, **k):
        grad_on.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(tr.model, "forward", forward)
    evaluate(tr.model, tr.val_data, 16, batch_size=8)
    assert grad_on == [False, False] and torch.is_grad_enabled()


def test_config_mismatch_with_dataset_is_clear(tmp_path, fake_mnist):
    with pytest.raises(ValueError, match="shape"):
        Trainer(matnet.MatNetConfig.preset("tiny", image_size=32, stem_downsample=2),
                _opts(tmp_path, fake_mnist))


def test_cli_train_eval_sample(tmp_path, fake_mnist, capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--preset", "tiny", "--data-dir", fake_mnist, "--out", str(out), "--steps", "4",
                   "--batch-size", "8", "--val-size", "40", "--eval-every", "4", "--eval-images", "8",
                   "--iwae-k", "2", "--iwae-images", "2", "--device", "cpu"])
    assert rc == 0
    ck = out / "checkpoint.pt"
    rc = cli.main(["eval", str(ck), "--data-dir", fake_mnist, "--k", "3", "--n-images", "8",
                   "--iwae-images", "4", "--batch-size", "4", "--out", str(tmp_path / "e.json")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["split"] == "test" and res["iwae_k"] == 3 and res["elbo"] > 0
    rc = cli.main(["sample", str(ck), "--n", "9", "--out", str(tmp_path / "s.png")])
    assert rc == 0 and (tmp_path / "s.png").stat().st_size > 200
    rc = cli.main(["eval", str(tmp_path / "nope.pt"), "--data-dir", fake_mnist])
    assert rc == 2 and "nope.pt" in capsys.readouterr().err
    m = load_model(ck)
    assert isinstance(m, matnet.MatNet) and not m.training


def test_cli_eval_precision_and_layout(tmp_path, fake_mnist):
    """eval --precision bf16 runs the passes under autocast and records it; the bounds stay within 0.05 nats of
    the fp32 ones (issue 10's target; the sums are fp32). --channels-last changes the layout, not the bounds."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data-dir", fake_mnist, "--out", str(out), "--steps", "4",
                     "--batch-size", "8", "--val-size", "40", "--eval-every", "0", "--device", "cpu"]) == 0

    def ev(*flags):
        path = tmp_path / "e.json"
        assert cli.main(["eval", str(out / "checkpoint.pt"), "--data-dir", fake_mnist, "--k", "3", "--n-images", "8",
                         "--iwae-images", "4", "--batch-size", "4", "--device", "cpu", "--out", str(path),
                         *flags]) == 0
        return json.loads(path.read_text())

    fp32, cl = ev(), ev("--channels-last")
    assert fp32["precision"] == cl["precision"] == "fp32"
    for key in ("elbo", "iwae"):
        assert cl[key] == pytest.approx(fp32[key], rel=1e-5)
    for flags in (["--precision", "bf16", "--channels-last"], ["--precision", "bf16", "--ops", "reference"]):
        low = ev(*flags)
        assert low["precision"] == "bf16"
        for key in ("elbo", "iwae"):
            assert 0 < abs(low[key] - fp32[key]) <= 0.05, (flags, key, low[key], fp32[key])


def test_cli_eval_low_precision_overflow_is_an_error(tmp_path, fake_mnist, monkeypatch, capsys):
    """A bound that is not finite under --precision bf16 ends in one line naming the fix, not a null in the JSON;
    in fp32 it is reported as it is."""
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data-dir", fake_mnist, "--out", str(out), "--steps", "2",
                     "--batch-size", "8", "--val-size", "40", "--eval-every", "0", "--device", "cpu"]) == 0
    monkeypatch.setattr(matnet.train, "evaluate", lambda *a, **k: {"elbo": float("inf"), "kl_per_module": []})
    argv = ["eval", str(out / "checkpoint.pt"), "--data-dir", fake_mnist, "--k", "0", "--n-images", "8"]
    assert cli.main([*argv, "--precision", "bf16"]) == 2
    assert "not finite under --precision bf16" in capsys.readouterr().err
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["elbo"] is None
    with pytest.raises(ValueError, match="--precision must be one of"):  # options built in code are checked too
        cli.EvalOptions(checkpoint=str(out / "checkpoint.pt"), precision="fp8")


def test_cli_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "matnet", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "eval" in r.stdout


def test_kl_plot_groups_follow_meta_modules(tmp_path):
    m = matnet.MatNet(matnet.MatNetConfig.preset("tiny"))
    groups = m.kl_groups()
    assert groups == [("z0", 1), ("7x7", 1), ("14x14", 2)]
    rows = [{"step": s, "kl_per_module": [1.0, 2.0, 0.5, 0.5]} for s in range(1, 5)]
    plots.plot_kl_per_module(rows, groups, tmp_path / "kl.png")
    assert (tmp_path / "kl.png").stat().st_size > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a one-step run has one row: no "identical low and high xlims" warning
        plots.plot_kl_per_module(rows[:1], groups, tmp_path / "kl1.png")


@pytest.mark.data
def test_few_hundred_steps_on_real_mnist_lower_the_loss(tmp_path, mnist_dir):
    cfg = matnet.MatNetConfig.preset("tiny", batch_size=32)
    tr = Trainer(cfg, _opts(tmp_path, mnist_dir, steps=300, eval_every=0, ckpt_every=1000, log_every=10,
                            val_size=10000))
    before = evaluate(tr.model, tr.val_data, 500)["elbo"]
    tr.run()
    after = evaluate(tr.model, tr.val_data, 500)["elbo"]
    rows = [r["loss"] for r in plots.read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert np.mean(rows[-5:]) < np.mean(rows[:5]) - 100
    assert after < before - 200 and after < 250, (before, after)


def test_fresh_run_restarts_the_metrics_log(tmp_path, fake_mnist):
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=2, eval_every=0)).run()
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=2, eval_every=0, resume=False)).run()
    steps = [r["step"] for r in plots.read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2]


def test_resume_keeps_the_runs_own_config_and_schedule(tmp_path, fake_mnist):
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=6)).run(until=3)
    with pytest.raises(ValueError, match=r"another config: channels=4 \(the run's: 8\)"):
        Trainer(_tiny(channels=4), _opts(tmp_path, fake_mnist, steps=None))
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=None))
    assert tr.cfg.channels == 8 and tr.total == 6 and tr.step == 3
    tr.close()


def test_from_starts_a_new_run_from_another_runs_state(tmp_path, fake_mnist, capsys):
    """--from: a new run in a new folder continues another run's state exactly under the same config, under
    another training config it trains on from there (Eq. 13 switched on at the source's step), a model of
    another shape is one error line, and re-running the same command resumes --out's own checkpoint."""
    cfg = _tiny()
    straight = Trainer(cfg, _opts(tmp_path / "a", fake_mnist))
    straight.run()
    Trainer(cfg, _opts(tmp_path / "b", fake_mnist)).run(until=3)
    src = str(tmp_path / "b" / "checkpoint.pt")
    same = Trainer(cfg, _opts(tmp_path / "c", fake_mnist, start_from=src))
    assert same.step == 3 and same.total == 6
    same.run()
    for (k, a), b in zip(straight.model.state_dict().items(), same.model.state_dict().values()):
        assert torch.equal(a, b), k
    rows = [r for r in plots.read_metrics(tmp_path / "c" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [4, 5, 6]  # its own log, from the source's step on
    reg = _tiny(infer_reg_weight=1.0, infer_reg_start=3)
    other = Trainer(reg, _opts(tmp_path / "d", fake_mnist, start_from=src))
    other.run()
    st = load_checkpoint(tmp_path / "d" / "checkpoint.pt")
    assert st["step"] == 6 and st["config"] == reg.to_dict()
    assert not all(torch.equal(a, b) for a, b in zip(straight.model.state_dict().values(), st["model"].values()))
    again = Trainer(reg, _opts(tmp_path / "d", fake_mnist, start_from=src))  # the same command once more
    assert again.step == 6 and again.started_from is None
    assert again.origin == {"started_from": str((tmp_path / "b" / "checkpoint.pt").resolve())}
    again.close()
    # --from on an --out that holds another run: an error, not a silent resume of that run
    with pytest.raises(ValueError, match=r"holds a run that started from .*b/checkpoint.pt, not from --from"):
        Trainer(reg, _opts(tmp_path / "d", fake_mnist, start_from=str(tmp_path / "a" / "checkpoint.pt")))
    with pytest.raises(ValueError, match="holds a run that did not start from a checkpoint, not from --from"):
        Trainer(cfg, _opts(tmp_path / "b", fake_mnist, start_from=str(tmp_path / "a" / "checkpoint.pt")))
    # a checkpoint from before runs recorded where they began: resumed with its --from, it records that one;
    # resumed without, it records nothing (unknown), so the --from command still resumes it later
    legacy = {k: v for k, v in load_checkpoint(tmp_path / "d" / "checkpoint.pt").items() if k != "started_from"}
    for start, recorded in ((None, "absent"), (src, str((tmp_path / "b" / "checkpoint.pt").resolve()))):
        save_checkpoint(tmp_path / "d" / "checkpoint.pt", legacy)
        tr = Trainer(reg, _opts(tmp_path / "d", fake_mnist, start_from=start, steps=7))
        tr.run()
        assert load_checkpoint(tmp_path / "d" / "checkpoint.pt").get("started_from", "absent") == recorded
    # the command's Adam settings and length, not the source's (its 6 steps would leave nothing to do)
    adam = _tiny(adam_eps=1e-3, adam_betas=(0.9, 0.5))
    tr = Trainer(adam, _opts(tmp_path / "f", fake_mnist, start_from=str(tmp_path / "a" / "checkpoint.pt"),
                             steps=None))
    assert tr.step == 6 and tr.total == adam.steps > 6
    assert [(g["eps"], g["betas"][1]) for g in tr.opt.param_groups] == [(1e-3, 0.5)] * len(tr.opt.param_groups)
    assert tr.opt.state  # the moments came along
    tr.close()
    with pytest.raises(ValueError, match="is at step 6, not before this run's last step 6: give a larger --steps"):
        Trainer(cfg, _opts(tmp_path / "g", fake_mnist, start_from=str(tmp_path / "a" / "checkpoint.pt")))
    with pytest.raises(ValueError, match="--out's own checkpoint; give a new --out"):
        Trainer(cfg, _opts(tmp_path / "d", fake_mnist, start_from=str(tmp_path / "d" / "checkpoint.pt"),
                           resume=False))
    with pytest.raises(ValueError, match=r"does not fit this run .*batch_size"):
        Trainer(cfg.replace(batch_size=4), _opts(tmp_path / "h", fake_mnist, start_from=src))
    argv = ["train", "--preset", "tiny", "--batch-size", "8", "--channels", "4", "--data-dir", fake_mnist,
            "--out", str(tmp_path / "e"), "--from", src, "--val-size", "40", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--from {src} does not fit this run" in err, err
    assert not (tmp_path / "e" / "checkpoint.pt").exists()


def test_unknown_config_override_is_a_value_error():
    with pytest.raises(ValueError, match="bogus"):
        matnet.MatNetConfig.preset("tiny", bogus=1)
    assert cli.main(["train", "--preset", "tiny", "--set", "bogus=1"]) == 2
