"""The trainer never fails silently and never loses work: divergence stops with exit 3 and keeps the
last good checkpoint, checkpoints are checksummed and load no code, one run per folder, SIGTERM /
SIGINT checkpoint and resume exactly, a full disk is named, and CLI values mean what they say."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import _opts, _tiny, make_fake_mnist

import matnet
from matnet import checkpoint, cli
from matnet.checkpoint import MAGIC, CheckpointError, FolderLockedError, RunLock, load_checkpoint, save_checkpoint
from matnet.train import (
    EXIT_DISK_FULL,
    EXIT_DIVERGED,
    PROGRESS_INTERVAL_NOT_TTY,
    Preempted,
    SkipGuard,
    Trainer,
    TrainingDiverged,
    TrainOptions,
    progress_bar,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


def _train_argv(data, out, *extra):
    return ["train", "--preset", "tiny", "--data-dir", data, "--out", str(out), "--batch-size", "8",
            "--val-size", "40", "--eval-every", "0", "--device", "cpu", "--no-progress", *extra]


def _strict_rows(path):
    """Every line parses as strict JSON (no NaN / Infinity) into an object."""
    def bad(c):
        raise AssertionError(f"non-strict JSON constant {c} in {path}")
    rows = [json.loads(line, parse_constant=bad) for line in path.read_text().splitlines()]
    assert all(isinstance(r, dict) for r in rows)
    return rows


def _nan_after(tr, monkeypatch, step):
    """From `step` on, the loss (and so every gradient) is NaN."""
    real = tr.model.forward

    def forward(*a, **k):
        out = real(*a, **k)
        if tr.step >= step:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", forward)


def _one_error_line(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---- 1. divergence ----

def test_persistent_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, fake_mnist, monkeypatch):
    opts = dict(steps=40, ckpt_every=2, eval_every=0, max_skips=3)
    Trainer(_tiny(ema_rate=0.9), _opts(tmp_path, fake_mnist, **opts)).run(until=4)
    ck = tmp_path / "checkpoint.pt"
    good = ck.read_bytes()
    tr = Trainer(_tiny(ema_rate=0.9), _opts(tmp_path, fake_mnist, **opts))
    _nan_after(tr, monkeypatch, 5)
    with pytest.raises(TrainingDiverged) as ei:
        tr.run()
    msg = str(ei.value)
    assert "3 consecutive updates were skipped" in msg and "recent grad norms" in msg and "nan" in msg
    assert "step 4" in msg and str(ck) in msg and ei.value.exit_code == EXIT_DIVERGED == 3
    assert tr.step == 8  # step 5 applied (its loss was made at step 4), 6-8 skipped, then the stop
    assert ck.read_bytes() == good  # the checkpoint due at step 6 was never written
    st = load_checkpoint(ck)
    assert st["step"] == 4
    # skipped steps touched neither the weights nor the EMA; what is on disk is finite
    tr5 = {k: v for k, v in tr.model.state_dict().items()}
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in tr5.values() if v.is_floating_point())
    ema_now = [p.detach().clone() for p in tr.ema.parameters()]
    tr.train_step(next(tr.loader.forever()))  # one more NaN step: EMA unchanged
    assert all(torch.equal(a, b) for a, b in zip(ema_now, tr.ema.parameters()))
    rows = _strict_rows(tmp_path / "metrics.jsonl")
    assert any(r["split"] == "train" and r["loss"] is None for r in rows)  # NaN logged as null


def test_a_skip_threshold_every_step_exceeds_ends_with_exit_3(tmp_path, fake_mnist, capsys):
    """vdvae#25: the gradient norm always above the threshold must stop the run, not loop."""
    rc = cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "500", "--set", "skip_threshold=1e-9",
                              "--max-skips", "4"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == EXIT_DIVERGED
    assert "4 consecutive updates were skipped" in line and "recent grad norms" in line
    assert "no checkpoint was written" in line and not (tmp_path / "checkpoint.pt").exists()


def test_skipped_fraction_over_a_window_stops():
    g = SkipGuard(max_consecutive=100, window=10, max_fraction=0.3)
    reasons = [g.record(1.0, i % 2 == 0) for i in range(10)]  # every other step skipped
    assert reasons[:9] == [None] * 9 and reasons[9] == "5 of the last 10 updates were skipped"
    g = SkipGuard(max_consecutive=100, window=10, max_fraction=0.5)
    assert all(g.record(1.0, i % 3 == 0) is None for i in range(50))  # a third skipped: below the limit


def test_non_finite_weights_are_never_saved(tmp_path, fake_mnist):
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=6, eval_every=0)).run(until=2)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=6, eval_every=0))
    with torch.no_grad():
        next(tr.model.parameters())[0].fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="non-finite weights"):
        tr.save()
    tr.close()
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_weights_whose_loss_overflows_are_never_saved(tmp_path, fake_mnist):
    """Finite weights can still give a non-finite loss on every batch (e.g. after an update at a huge lr): such a
    state is not a good checkpoint either, and checking it draws nothing from the run's RNG."""
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=6, eval_every=0, ckpt_every=0))
    tr.run(until=1)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=6, eval_every=0, ckpt_every=0))
    tr.train_step(next(tr.loader.forever()))
    state = torch.get_rng_state()
    tr.save()  # healthy: saved, RNG untouched
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        tr.model.out.weight.fill_(3e38)  # finite, but every logit overflows
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        tr.save()
    tr.close()
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved != good


def test_a_skipped_last_step_still_ends_with_a_checkpoint(tmp_path, fake_mnist, monkeypatch):
    """One bad batch skips its update; the weights are the last applied step's and are checked on that step's
    batch, so the run ends normally (the probe must not re-run the skipped batch)."""
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=3, eval_every=0, ckpt_every=0))
    real, bad = tr.model.forward, []

    def forward(x, *a, **k):
        out = real(x, *a, **k)
        if tr.step == 2 and not bad:
            bad.append(x.data_ptr())  # the third batch (the step counter reads 2 during it)
        if bad and x.data_ptr() == bad[0]:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", forward)
    res = tr.run()
    assert res["step"] == 3 and res["skipped"] == 1
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_resuming_with_another_config_or_past_its_steps_is_refused(tmp_path, fake_mnist, capsys):
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "2")) == 0
    capsys.readouterr()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "3", "--set", "slope=0.2")) == 2
    assert "slope=0.2 (the run's: 0.1)" in _one_error_line(capsys.readouterr().err)
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "1")) == 2
    assert "already at step 2, past --steps 1" in _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resuming_with_another_seed_or_lr_rule_is_refused(tmp_path, fake_mnist, capsys):
    """--seed and the LR rule set a run's course like its config: a resume must be given the run's own."""
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "2", "--seed", "3", "--warmup-steps", "2")) == 0
    capsys.readouterr()
    for extra, says in ((["--seed", "4", "--warmup-steps", "2"], "--seed 4 (the run's: 3)"),
                        (["--seed", "3"], "--warmup-steps 0 (the run's: 2)"),
                        (["--seed", "3", "--warmup-steps", "2", "--lr-scaling", "sqrt"], "--lr-scaling sqrt")):
        assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "3", *extra)) == 2
        assert says in _one_error_line(capsys.readouterr().err)
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "3", "--seed", "3", "--warmup-steps", "2")) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3


def test_no_validation_images_with_eval_every_is_said(tmp_path, fake_mnist, caplog):
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "1", "--val-size", "0", "--eval-every", "1")) == 0
    assert "--val-size 0 holds out no validation images: --eval-every 1 evaluates nothing" in caplog.text


def test_skipped_updates_are_reported(tmp_path, fake_mnist, monkeypatch, caplog):
    """Steps 2 and 3 of 4 skipped, after a resume at step 2: the run ends as a straight one would (its applied
    updates are counted over the whole run, not this session's)."""
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=4, eval_every=0)).run(until=2)
    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=4, eval_every=0))
    real = tr.model.forward

    def forward(*a, **k):  # NaN in the updates of steps 2 and 3 (not in save()'s no-grad check of the weights)
        out = real(*a, **k)
        if tr.step >= 2 and torch.is_grad_enabled():
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(tr.model, "forward", forward)
    assert tr.run()["skipped"] == 2
    assert "2 of the run's 4 updates were skipped" in caplog.text
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_a_run_too_short_for_max_skips_with_no_update_applied_has_diverged(tmp_path, fake_mnist, capsys):
    rc = cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "2", "--set", "skip_threshold=1e-9"))
    line = _one_error_line(capsys.readouterr().err)
    assert rc == EXIT_DIVERGED and "none of the run's 2 updates was applied" in line
    assert "no checkpoint was written" in line and not (tmp_path / "checkpoint.pt").exists()


# ---- 2. checkpoints ----

def test_flipped_byte_is_refused_by_name_and_never_overwritten(tmp_path, fake_mnist, capsys):
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=4, eval_every=0)).run(until=2)
    ck = tmp_path / "checkpoint.pt"
    raw = bytearray(ck.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    ck.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checkpoint.pt is damaged"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match="damaged"):
        Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=4, eval_every=0))
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "4")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(ck) in line and "damaged" in line
    assert cli.main(["eval", str(ck), "--data-dir", fake_mnist, "--k", "0", "--n-images", "4"]) == 2
    assert str(ck) in _one_error_line(capsys.readouterr().err)
    assert ck.read_bytes() == bytes(raw)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_runs_no_code_even_with_a_valid_checksum(tmp_path):
    marker = str(tmp_path / "pwned")
    save_checkpoint(tmp_path / "c.pt", {"config": {}, "model": {}, "evil": _RunsCode(marker)})
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "c.pt")
    assert not os.path.exists(marker)
    assert (tmp_path / "c.pt").read_bytes().startswith(MAGIC)
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the payload would indeed have run code
    assert os.path.exists(marker)


def test_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path, fake_mnist, capsys, monkeypatch):
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "2")) == 0
    ck = tmp_path / "checkpoint.pt"
    good = ck.read_bytes()

    def full(f, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write", full)
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "4", "--ckpt-every", "1")) == EXIT_DISK_FULL == 4
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full" in line and "the previous checkpoint is kept" in line
    assert ck.read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


def test_orphaned_temp_files_are_removed_at_start(tmp_path, fake_mnist):
    orphan = tmp_path / "checkpoint.pt.abc123.tmp"
    orphan.write_bytes(b"x" * 1000)
    Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=1, eval_every=0)).close()
    assert not orphan.exists()


# ---- 3. one run per folder ----

def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path, fake_mnist, capsys):
    with RunLock(tmp_path):
        assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "1")) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "in use by another run" in line and f"pid {os.getpid()}" in line
    assert not (tmp_path / "checkpoint.pt").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")  # left by a run that is gone
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "1")) == 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1


# ---- 4. preemption ----

def _params(path):
    return load_checkpoint(path)["model"]


def test_sigterm_checkpoints_exits_143_and_resume_is_exact(tmp_path, fake_mnist, capsys):
    steps = "150"
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    argv = _train_argv(fake_mnist, run_a, "--steps", steps, "--log-every", "1", "--ckpt-every", "1000",
                       "--threads", "1")
    proc = subprocess.Popen([sys.executable, "-m", "matnet", *argv], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    metrics = run_a / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # the folder is held by a live process: a second run is refused
    assert cli.main(_train_argv(fake_mnist, run_a, "--steps", steps)) == 2
    assert "in use by another run" in capsys.readouterr().err
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t < 30, "SIGTERM must end the run within seconds"
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    stopped_at = load_checkpoint(run_a / "checkpoint.pt")["step"]
    assert 1 <= stopped_at < int(steps)
    # re-running the same command resumes exactly
    assert cli.main(argv) == 0
    assert cli.main(_train_argv(fake_mnist, run_b, "--steps", steps, "--log-every", "1", "--ckpt-every", "1000",
                                "--threads", "1")) == 0
    a, b = _params(run_a / "checkpoint.pt"), _params(run_b / "checkpoint.pt")
    assert load_checkpoint(run_a / "checkpoint.pt")["step"] == int(steps)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    losses = [[r["loss"] for r in _strict_rows(d / "metrics.jsonl") if r["split"] == "train"] for d in (run_a, run_b)]
    assert losses[0] == losses[1] and len(losses[0]) == int(steps)


def test_sigint_checkpoints_and_exits_130(tmp_path, fake_mnist, monkeypatch, capsys):
    real = Trainer.train_step

    def step_then_ctrl_c(self, x):
        row = real(self, x)
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return row

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    rc = cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "50", "--ckpt-every", "1000"))
    assert rc == 130
    assert "stopped by SIGINT at step 2" in _one_error_line(capsys.readouterr().err)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert issubclass(Preempted, Exception) and not issubclass(Preempted, RuntimeError)


# ---- 5. CLI values ----

@pytest.mark.parametrize("extra, says", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "-5"], "--steps must be >= 1"),
    (["--ckpt-every", "-1"], "--ckpt-every must be >= 0"),
    (["--log-every", "-1"], "--log-every must be >= 0"),
    (["--eval-images", "0"], "--eval-images must be >= 1"),
    (["--max-skips", "0"], "--max-skips must be >= 1"),
    (["--steps", "abc"], "invalid int value"),
    (["--set", 'channels="8"'], "channels must be int, got '8'"),
    (["--set", "channels=8,"], "--set channels:"),
    (["--set", "channels"], "expected KEY=JSON"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--set", "grad_clip=-1"], "grad_clip must be a finite number > 0"),
    (["--set", "bogus=1"], "bogus"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63)"),
    (["--seed", "99999999999999999999"], "--seed must be an integer in [0, 2**63)"),
    (["--lr-base-batch", "16"], "--lr-base-batch has no effect without --lr-scaling"),
    (["--out", ""], "--out is empty"),
    (["--from", ""], "--from is empty"),
    (["--set", 'modules_per_scale={"a": 1}'], "modules_per_scale must be tuple[int, ...], got {'a': 1}"),
    (["--set", "adam_betas=[0.9]"], "adam_betas must be tuple[float, float], got (0.9,)"),
])
def test_bad_train_values_are_one_line_errors(tmp_path, extra, says, capsys):
    assert _rc(_train_argv(str(tmp_path / "none"), tmp_path / "run", *extra)) == 2
    assert says in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _rc(argv):
    """The exit code of `matnet ARGV`, whether main returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_out_pointing_at_a_file_is_refused(tmp_path, fake_mnist, capsys):
    f = tmp_path / "file"
    f.write_text("keep")
    assert cli.main(_train_argv(fake_mnist, f, "--steps", "1")) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err)
    assert f.read_text() == "keep"


def test_a_run_refused_at_setup_leaves_no_new_folder(tmp_path, fake_mnist, capsys):
    out = tmp_path / "a" / "b"
    assert cli.main(_train_argv(fake_mnist, out, "--steps", "1", "--grad-accum", "3")) == 2
    assert "must divide the batch size" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # both folders it made are gone
    out.mkdir(parents=True)  # folders that were there before stay, empty or not
    assert cli.main(_train_argv(fake_mnist, out, "--steps", "1", "--grad-accum", "3")) == 2
    assert out.is_dir()
    (out / "notes.txt").write_text("keep")
    assert cli.main(_train_argv(fake_mnist, out / "c", "--steps", "1", "--grad-accum", "3")) == 2
    assert not (out / "c").exists() and (out / "notes.txt").read_text() == "keep"
    # "new/../keep/run": keep was there before, whatever the unnormalised path says
    keep = tmp_path / "keep"
    keep.mkdir()
    assert cli.main(_train_argv(fake_mnist, tmp_path / "new" / ".." / "keep" / "run", "--steps", "1",
                                "--grad-accum", "3")) == 2
    assert keep.is_dir() and not (keep / "run").exists()


def test_a_refused_run_leaves_another_runs_folder_and_lock(tmp_path, fake_mnist, capsys):
    """Run B holds x (made a moment ago, empty but for its lock); run A, refused, cleans up x/y only."""
    x = tmp_path / "x"
    x.mkdir()
    with RunLock(x):
        assert cli.main(_train_argv(fake_mnist, x / "y", "--steps", "1", "--grad-accum", "3")) == 2
        assert sorted(p.name for p in x.iterdir()) == [".lock"]
        with pytest.raises(FolderLockedError):
            RunLock(x).acquire()  # B's lock still works


def test_zero_periods_mean_off(tmp_path, fake_mnist, capsys):
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "3", "--log-every", "0", "--ckpt-every", "0")) == 0
    listed = capsys.readouterr().out.splitlines()[-1].split(": ", 1)[1].split()
    assert listed and all((tmp_path / name).exists() for name in listed)  # only files that were written
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3  # written at the end
    assert not (tmp_path / "metrics.jsonl").exists() or not [
        r for r in _strict_rows(tmp_path / "metrics.jsonl") if r["split"] == "train"]


def test_a_non_dict_line_in_metrics_is_dropped(tmp_path, fake_mnist):
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "2", "--log-every", "1")) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n3\n")
    assert cli.main(_train_argv(fake_mnist, tmp_path, "--steps", "4", "--log-every", "1")) == 0
    assert [r["step"] for r in _strict_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fake_mnist):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(_train_argv(fake_mnist, out, "--steps", "1")) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("argv, says", [
    (["eval", "--n-images", "0"], "--n-images must be >= 1"),
    (["eval", "--k", "-1"], "--k must be >= 0 (0: off)"),
    (["eval", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["sample", "--n", "0"], "--n must be >= 1"),
    (["sample", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["sample", "--out", "."], "is a folder"),
    (["sample", "--out", "grid.xyz"], "not an image file name"),
    (["eval", "--out", "."], "is a folder"),
    (["eval", "--finetune-lr", "1e39"], "--finetune-lr must be a number in (0, 1]"),
    (["eval", "--finetune-lr", "1e-4"], "--finetune-lr needs --finetune-inference-epochs"),
    (["eval", "--mask-seed", "3"], "--mask-seed is for inpainting checkpoints"),
    (["eval", "--val-size", "7"], "it has no effect on --split test"),
    (["eval", "--seed", "-2"], "--seed must be an integer in [0, 2**63)"),
    (["sample", "--temperature", "1e30"], "generation overflowed at temperature 1e+30"),
    (["sample", "--n", "10001"], "--n must be <= 10000 (a grid of 100 x 100)"),
    (["eval", "--n-images", "100000"], "--n-images 100000 is more than the 40 images of the test split"),
    (["eval", "--n-images", "4", "--iwae-images", "5"], "--iwae-images 5 is more than the 4 images of the ELBO"),
    (["eval", "--iwae-images", "100000"], "--iwae-images 100000 is more than the 40 images of the test split"),
    (["cluster", "--kmeans", "2", "--n-images", "65"], "--n-images 65 is more than the 40 images of the test split"),
])
def test_bad_eval_and_sample_values_are_one_line_errors(trained, fake_mnist, argv, says, capsys):
    rc = cli.main([argv[0], str(trained), "--data-dir", fake_mnist, *argv[1:]])
    assert rc == 2
    assert says in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("cmd", ["eval", "sample", "inpaint", "cluster"])
def test_an_empty_checkpoint_path_is_named(cmd, fake_mnist, capsys):
    assert cli.main([cmd, "", "--data-dir", fake_mnist]) == 2
    assert "the checkpoint path is empty" in _one_error_line(capsys.readouterr().err)


def test_a_data_dir_that_is_a_file_or_empty_is_named(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for data_dir, says in ((str(tmp_path / "f"), "is a file, not a folder"),
                           ("", "the data directory given is empty")):
        assert cli.main(_train_argv(data_dir, tmp_path / "run")) == 2
        assert says in _one_error_line(capsys.readouterr().err)


def test_sample_draws_a_large_grid_in_passes(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SAMPLE_CHUNK", 3)
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(trained), "--n", "7", "--out", str(out)]) == 0
    assert "wrote 7 samples" in capsys.readouterr().out


@pytest.mark.parametrize("off", [["--k", "0"], ["--iwae-images", "0"]])
def test_eval_zero_iwae_means_no_iwae(trained, fake_mnist, off, capsys):
    assert cli.main(["eval", str(trained), "--data-dir", fake_mnist, "--n-images", "4", *off]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["elbo_images"] == 4 and "iwae" not in res


def test_config_validate_checks_lr_grad_clip_and_types():
    for bad, says in ((dict(lr=float("nan")), "lr"), (dict(lr=-1e-3), "lr"), (dict(grad_clip=0), "grad_clip"),
                      (dict(channels=8.0), "channels must be int"), (dict(ema_rate="0.9"), "ema_rate must be float"),
                      (dict(fully_connected=1), "fully_connected must be bool"),
                      (dict(adam_betas=(0.9, 1.0)), "betas"), (dict(slope=float("nan")), "slope"),
                      (dict(slope=-0.1), "slope"), (dict(kernel_size=-1), "kernel_size"),
                      (dict(min_log_scale=float("nan")), "min_log_scale"),
                      (dict(prior_components=10), "prior_components needs the mixture prior")):
        with pytest.raises(ValueError, match=says):
            matnet.MatNetConfig.preset("tiny", **bad)
    assert matnet.MatNetConfig.preset("tiny", lr=1).lr == 1  # an int is a fine float
    with pytest.raises(ValueError, match="steps"):
        TrainOptions(steps=0)


# ---- 6. logs ----

def test_progress_bars_refresh_rarely_into_a_log_file(capsys):
    assert not sys.stderr.isatty()
    bar = progress_bar(total=10, disable=False)
    assert bar.mininterval == PROGRESS_INTERVAL_NOT_TTY >= 2
    bar.close()


def test_outputs_are_written_atomically(tmp_path, monkeypatch):
    """A PNG or JSON write that fails half-way leaves the previous file whole, and the error names the file."""
    from PIL import Image

    from matnet.plots import save_image_grid

    png = tmp_path / "grid.png"
    save_image_grid(torch.rand(4, 1, 8, 8), png)
    good = png.read_bytes()
    mask = os.umask(0)
    os.umask(mask)
    assert png.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() makes it, not mkstemp's 0600

    def torn(self, f, *a, **k):
        f.write(b"\x89PNG partial")
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(Image.Image, "save", torn)
    with pytest.raises(OSError, match=f"could not write {png}"):
        save_image_grid(torch.rand(4, 1, 8, 8), png)
    assert png.read_bytes() == good and os.listdir(tmp_path) == ["grid.png"]


def test_non_finite_images_are_refused_not_written(tmp_path):
    """A cast to uint8 would turn NaN into a colour and write a corrupt grid without a word."""
    from matnet.plots import save_image_grid, save_image_rows

    png = tmp_path / "grid.png"
    for bad in (float("nan"), float("inf")):
        x = torch.rand(4, 1, 8, 8)
        x[1, 0, 2, 3] = bad
        with pytest.raises(ValueError, match="non-finite values"):
            save_image_grid(x, png)
        with pytest.raises(ValueError, match="non-finite values"):
            save_image_rows([x.expand(-1, 3, -1, -1)], png)
    assert not png.exists()


def test_a_samples_grid_that_cannot_be_drawn_is_a_warning_not_a_failed_run(tmp_path, fake_mnist, monkeypatch,
                                                                           caplog):
    """The grid comes after the checkpoint: overflowing draws or NaN images leave samples.png out, with a warning,
    and the run still ends as done (a failure here would also leave other ranks waiting)."""
    from matnet.model import GenerationOverflow

    tr = Trainer(_tiny(), _opts(tmp_path, fake_mnist, steps=1, eval_every=0))

    def overflow(*a, **k):
        raise GenerationOverflow("generation overflowed at temperature 1")

    monkeypatch.setattr(tr.model, "sample", overflow)
    assert tr.run()["step"] == 1
    assert not (tmp_path / "samples.png").exists() and (tmp_path / "checkpoint.pt").exists()
    assert "samples.png not written at step 1: generation overflowed" in caplog.text
    monkeypatch.setattr(tr.model, "sample", lambda n, **k: torch.full((n, 1, 28, 28), float("nan")))
    tr.save_samples(tmp_path / "samples.png")
    assert not (tmp_path / "samples.png").exists() and "non-finite values" in caplog.text
