"""Multi-process training under torchrun (gloo on CPU, two processes of one thread each): the result does not
depend on the number of processes, evaluation is split and all-reduced, kill -9 and SIGTERM resume exactly, and
a NaN on one rank makes every rank skip (and, when it persists, stop with exit 3).

Every launch has a timeout, so a deadlock fails its test instead of hanging the suite."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from helpers import SMOOTH_ADAM, assert_all_within_ref_error
from test_train import _opts, _tiny, make_fake_mnist

from matnet import cli, distributed
from matnet.checkpoint import load_checkpoint, load_model, save_checkpoint
from matnet.data import BatchLoader, ImageDataset, load_dataset
from matnet.distributed import Rows
from matnet.inpaint import InpaintTask
from matnet.train import POISON_ENV, MicroBatchNoise, Trainer, evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120  # seconds for one launch; a tiny run takes about 10
STEPS = 120  # runs to interrupt: long enough (~2 s) that an interruption sent after a step still lands mid-way
# Eq. 13 draws Bernoulli images (a uniform against p: discontinuous, and drawn in the model's dtype, so an fp64
# copy draws other images): its check compares step-1 values, before any update, within a few eps32 x
# sqrt(terms) of one process (~1e4 fp32 terms per image: 1e-5); a wrong share moves them by > 1e-3
INFER_REG, REDUCTION_RTOL = 0.5, 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


def _train_args(data, out, *extra):
    return ["train", "--preset", "tiny", "--data-dir", data, "--out", str(out), "--batch-size", "8",
            "--val-size", "40", "--eval-every", "0", "--device", "cpu", "--no-progress", "--threads", "1",
            "--log-every", "1", *extra]


def _launch(args, env=None):
    """`torchrun --standalone --nproc_per_node=2 -m matnet ARGS`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "matnet", *args]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _tree(pid):
    """pid and its descendants (torchrun starts each worker in a session of its own, so a process group or
    session signal would miss them)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids += _tree(int(d))
    return [pid, *kids]


def _kill_all(proc):
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc):
    """(exit code, stdout, stderr) of a launch; a run that outlives TIMEOUT is killed and fails the test."""
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        out, err = proc.communicate()
        pytest.fail(f"the 2-process run hung (killed after {TIMEOUT} s):\n{err[-3000:]}")
    return proc.returncode, out, err


def _run2(args, env=None):
    return _finish(_launch(args, env))


def _run_nodes(args_per_node, logs):
    """Two torchrun agents of one process each, meeting as two nodes at a c10d rendezvous on this machine (the
    README's multi-node command): [(exit code, stdout, stderr)] of each, their output kept in folder `logs` (no
    pipe to fill while the other agent is awaited). Which node gets rank 0 is the rendezvous's choice. An agent
    that outlives TIMEOUT fails the test, and no agent or worker is left running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=nodes{port}", "-m", "matnet"]
    logs.mkdir(exist_ok=True)
    files = [(logs / f"node{i}.out", logs / f"node{i}.err") for i in range(len(args_per_node))]
    procs = []
    try:
        for args, (out, err) in zip(args_per_node, files):
            with open(out, "w") as o, open(err, "w") as e:
                procs.append(subprocess.Popen([*launcher, *args], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                              stdout=o, stderr=e, text=True))
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the 2-node run hung (killed after {TIMEOUT} s):\n{files[0][1].read_text()[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_all(p)
                p.wait()
    return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, files)]


def _wait_for(proc, ready):
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.01)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _messages(err):
    """The one-line messages of `matnet train` (rank 0's, and any a rank > 0 prefixes with its rank)."""
    return [line for line in err.splitlines() if re.match(r"(\[rank \d+\] )?matnet \w+: ", line)]


def _worker_codes(err):
    """The workers' exit codes in torchrun's failure report."""
    return set(re.findall(r"exitcode\s*:\s*(-?\d+)", err))


def _assert_same_state(a, b, step):
    """The checkpoints of run folders a and b are at `step` and hold bit-identical weights and optimizer state."""
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert sa["step"] == sb["step"] == step
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["optimizer"]["state"].items():
        assert all(torch.equal(x, sb["optimizer"]["state"][k][n]) for n, x in v.items()), k


def _assert_same_run(a, b):
    """Bit-identical weights, optimizer state and logged losses."""
    _assert_same_state(a, b, STEPS)
    losses = [[r["loss"] for r in _rows(d) if r["split"] == "train"] for d in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS


def _params_after(out, data, steps, dtype, cfg_kw=None, **opts):
    """One process: the parameters after `steps` updates of `two_process_run`'s command without --grad-accum
    (other options: `opts`, other config values: `cfg_kw`), in `dtype`."""
    cfg = _tiny(**SMOOTH_ADAM, **(cfg_kw or {}))
    tr = Trainer(cfg, _opts(out, data, steps=steps, **{"val_size": 101, **opts}, eval_every=0, ckpt_every=0,
                            log_every=0))
    tr.model.to(dtype)  # before the first step: Adam has no state yet
    stream = tr.loader.forever()
    for _ in range(steps):
        assert tr.train_step(next(stream).to(dtype))["skipped"] == 0
    tr.close()
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, fake_mnist):
    """3 steps with --grad-accum 2 on 2 processes (so each micro-batch is a quarter of the global batch), then a
    validation whose ELBO has a batch without an image for rank 0 (101 images, 100
    per batch)."""
    out = tmp_path_factory.mktemp("two")
    rc, _, err = _run2(_train_args(fake_mnist, out, "--steps", "3", "--grad-accum", "2", "--val-size", "101",
                                   "--lr", str(SMOOTH_ADAM["lr"]), "--set", f"adam_eps={SMOOTH_ADAM['adam_eps']}",
                                   "--eval-every", "3", "--eval-images", "101", "--iwae-k", "4", "--iwae-images", "5"))
    assert rc == 0, err[-3000:]
    return out


# ---- the pieces, in one process ----

def test_rank_shards_of_a_batch_make_up_the_one_process_batch(fake_mnist):
    """Order, flips and binarization are drawn for the global batch: two ranks' rows are the one-process batch;
    so are the inpainting masks."""
    ds = load_dataset("mnist", "train", fake_mnist, val_size=40)
    whole = BatchLoader(ds, 8, seed=3, hflip=True)
    halves = [BatchLoader(ds, 8, seed=3, hflip=True, rows=slice(0, 4)),
              BatchLoader(ds, 8, seed=3, hflip=True, rows=slice(4, 8))]
    for _ in range(len(whole) + 2):  # into the second epoch
        assert torch.equal(next(iter(whole)), torch.cat([next(iter(h)) for h in halves]))
    assert distributed.shard(8) == Rows(0, 8, 8) and Rows(4, 8, 8).part(1, 2) == Rows(6, 8, 8)
    masks = InpaintTask("quadrant", 28, seed=0).inputs(torch.zeros(8, 1, 28, 28))[1]
    assert torch.equal(InpaintTask("quadrant", 28, seed=0).inputs(torch.zeros(3, 1, 28, 28), Rows(2, 5, 8))[1],
                       masks[2:5])


def test_noise_rows_are_the_one_process_draws():
    model = torch.nn.Module()
    model.noise = lambda shape, device: torch.randn(shape, device=device)
    noise = MicroBatchNoise(model)
    torch.manual_seed(1)
    want = torch.randn(3, 8, 2)  # 3 stacked copies of a batch of 8 (the IWAE bound's layout)
    noise.rows = Rows(5, 7, 8)
    torch.manual_seed(1)
    assert torch.equal(model.noise((6, 2), "cpu"), want[:, 5:7].reshape(6, 2))
    with pytest.raises(RuntimeError, match="cannot be rows"):
        model.noise((3, 2), "cpu")


def test_a_batch_the_processes_cannot_share_is_one_error_line(tmp_path, fake_mnist, monkeypatch, capsys):
    """The check itself, in one process that takes itself for one of 2 (no process group needed to fail it)."""
    def agree(err, what):
        if err is not None:
            raise err

    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "agree", agree)
    assert cli.main(_train_args(fake_mnist, tmp_path, "--steps", "1", "--batch-size", "6", "--grad-accum", "2")) == 2
    assert _messages(capsys.readouterr().err) == [
        "matnet train: error: --batch-size 6 (the global batch) must be divisible by the 2 processes x "
        "--grad-accum 2 = 4"]


# ---- two processes ----

def test_two_processes_give_the_parameters_of_one(tmp_path, fake_mnist, two_process_run):
    """The same global batch on 1 process and on 2 with 2 micro-batches each: the 2-process parameters after 3
    steps are within twice the 1-process run's own fp32 error of the fp64 truth (the repo's accuracy rule: the
    summation order is all that differs, so no tolerance is tuned to a machine)."""
    st = load_checkpoint(two_process_run / "checkpoint.pt")
    got = {n: v for n, v in st["model"].items() if v.is_floating_point()}
    one = _params_after(tmp_path / "one", fake_mnist, 3, torch.float32)
    truth = _params_after(tmp_path / "truth", fake_mnist, 3, torch.float64)
    assert_all_within_ref_error("2 processes x --grad-accum 2", got, one, truth)
    assert not torch.distributed.is_initialized()  # one process never joins a process group
    rows = _rows(two_process_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and rows[-1]["split"] == "val"  # rank 0 alone logs


def test_two_nodes_give_the_run_of_two_processes_on_one(tmp_path, fake_mnist, two_process_run):
    """The multi-node launch (two torchrun agents at a c10d rendezvous, one process each, --out shared) runs the
    command of `two_process_run` bit for bit: same weights, optimizer state and logged values."""
    out = tmp_path / "nodes"
    args = _train_args(fake_mnist, out, "--steps", "3", "--grad-accum", "2", "--val-size", "101",
                       "--lr", str(SMOOTH_ADAM["lr"]), "--set", f"adam_eps={SMOOTH_ADAM['adam_eps']}",
                       "--eval-every", "3", "--eval-images", "101", "--iwae-k", "4", "--iwae-images", "5")
    for rc, _, err in _run_nodes([args, args], tmp_path / "logs"):
        assert rc == 0, err[-3000:]
    _assert_same_state(out, two_process_run, 3)
    timing = ("time", "images_per_s", "peak_mem_mb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in _rows(out)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _rows(two_process_run)]


def test_nodes_that_do_not_share_out_refuse_to_resume(tmp_path, fake_mnist):
    """Each node with its own --out: a fresh run trains (rank 0's folder gets the checkpoint), but resuming finds a
    checkpoint on one node only. Every rank stops with one line that says what to fix, and the checkpoint is kept
    as it was."""
    outs = [tmp_path / "node_a", tmp_path / "node_b"]
    for rc, _, err in _run_nodes([_train_args(fake_mnist, o, "--steps", "2") for o in outs], tmp_path / "logs1"):
        assert rc == 0, err[-3000:]
    ck = [o / "checkpoint.pt" for o in outs if (o / "checkpoint.pt").exists()]
    assert len(ck) == 1
    before = ck[0].read_bytes()
    ran = _run_nodes([_train_args(fake_mnist, o, "--steps", "4") for o in outs], tmp_path / "logs2")
    assert all(rc != 0 for rc, _, _ in ran)
    assert [m for _, _, err in ran for m in _messages(err)] == [
        "matnet train: error: the 2 processes disagree on the starting state (a resumed run needs --out on a file "
        "system that every node shares)"]
    assert ck[0].read_bytes() == before


def test_from_on_two_processes_continues_like_a_resume(tmp_path, fake_mnist, two_process_run):
    """`--from` a 2-process run's checkpoint, under the same command on 2 processes, continues bit for bit as
    resuming that run does (each rank loads the source; weights, Adam moments, data order and RNG carry over)."""
    resumed, started = tmp_path / "resumed", tmp_path / "started"
    shutil.copytree(two_process_run, resumed)
    args = ["--steps", "5", "--grad-accum", "2", "--val-size", "101", "--lr", str(SMOOTH_ADAM["lr"]),
            "--set", f"adam_eps={SMOOTH_ADAM['adam_eps']}", "--eval-every", "3", "--eval-images", "101",
            "--iwae-k", "4", "--iwae-images", "5"]
    for argv in (_train_args(fake_mnist, resumed, *args),
                 _train_args(fake_mnist, started, *args, "--from", str(two_process_run / "checkpoint.pt"))):
        rc, _, err = _run2(argv)
        assert rc == 0, err[-3000:]
    _assert_same_state(started, resumed, 5)
    losses = [[r["loss"] for r in _rows(d) if r["split"] == "train" and r["step"] > 3] for d in (started, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_inpainting_in_fp16_on_two_processes_matches_one(tmp_path, fake_mnist):
    """A conditional model (masks drawn per global row) under fp16 autocast with its GradScaler, on 2 processes:
    the parameters after 3 steps are within twice one fp16 process's own error of the fp64 truth (no autocast),
    and the loss scale is the one process's."""
    task = dict(task="inpaint", mask="quadrant:14", val_size=40)
    out = tmp_path / "two"
    rc, _, err = _run2(_train_args(fake_mnist, out, "--steps", "3", "--task", "inpaint", "--mask", "quadrant:14",
                                   "--precision", "fp16", "--loss-scale", "256", "--lr", str(SMOOTH_ADAM["lr"]),
                                   "--set", f"adam_eps={SMOOTH_ADAM['adam_eps']}"))
    assert rc == 0, err[-3000:]
    st = load_checkpoint(out / "checkpoint.pt")
    assert st["skipped"] == 0 and st["scaler"]["scale"] == 256.0
    one = _params_after(tmp_path / "one", fake_mnist, 3, torch.float32, precision="fp16", loss_scale=256.0, **task)
    truth = _params_after(tmp_path / "truth", fake_mnist, 3, torch.float64, **task)
    got = {n: st["model"][n] for n in truth}
    assert_all_within_ref_error("inpainting, fp16, 2 processes", got, one, truth)


def test_mixture_prior_refit_on_two_processes_matches_one(tmp_path, fake_mnist):
    """A mixture prior refit to k-means clusters at step 1 (rank 0's result broadcast): the parameters after 3
    steps on 2 processes are within twice one process's own fp32 error of the fp64 truth."""
    gmm = dict(prior="gmm", prior_components=3, prior_refit_step=1)
    out = tmp_path / "two"
    rc, said, err = _run2(_train_args(fake_mnist, out, "--steps", "3", "--lr", str(SMOOTH_ADAM["lr"]),
                                      "--set", f"adam_eps={SMOOTH_ADAM['adam_eps']}", "--set", "prior=\"gmm\"",
                                      "--set", "prior_components=3", "--set", "prior_refit_step=1"))
    assert rc == 0, err[-3000:]
    assert said.count("step 1: mixture prior refit") == 1  # rank 0 alone reports it
    st = load_checkpoint(out / "checkpoint.pt")
    one = _params_after(tmp_path / "one", fake_mnist, 3, torch.float32, cfg_kw=gmm, val_size=40)
    truth = _params_after(tmp_path / "truth", fake_mnist, 3, torch.float64, cfg_kw=gmm, val_size=40)
    got = {n: st["model"][n] for n in truth}
    assert_all_within_ref_error("mixture prior refit, 2 processes", got, one, truth)


def test_an_error_alike_on_every_rank_is_said_once(tmp_path, fake_mnist, two_process_run):
    """Bad options, a batch the processes cannot share, too many images: every rank fails with the same message
    (and agrees on it before any rank leaves), so rank 0 alone prints it."""
    ck = str(two_process_run / "checkpoint.pt")
    for args, says in ((_train_args(fake_mnist, tmp_path / "t", "--steps", "1", "--batch-size", "7"),
                        "--batch-size 7 (the global batch) must be divisible by the 2 processes"),
                       (_train_args(fake_mnist, tmp_path / "t", "--lr", "0"), "lr must be a finite number > 0"),
                       (_train_args(fake_mnist, tmp_path / "t", "--seed", "-1"), "--seed must be an integer"),
                       (["eval", ck, "--data-dir", fake_mnist, "--device", "cpu", "--k", "-1"], "--k must be >= 0"),
                       (["eval", ck, "--data-dir", fake_mnist, "--device", "cpu", "--mask-seed", "3"],
                        "--mask-seed is for inpainting checkpoints"),
                       (["eval", ck, "--data-dir", fake_mnist, "--device", "cpu", "--n-images", "41"],
                        "--n-images 41 is more than the 40 images of the test split")):
        rc, _, err = _run2(args)
        assert rc != 0 and _worker_codes(err) == {"2"}, err[-3000:]
        msg = _messages(err)
        assert len(msg) == 1 and msg[0].startswith(f"matnet {args[0]}: error: ") and says in msg[0], err[-3000:]


def test_distributed_evaluation_equals_one_process(tmp_path, fake_mnist, two_process_run):
    """The validation of the 2-process run (a batch with no image for rank 0: 101 images, 100 per batch) and
    `matnet eval` under torchrun (uneven shares, batches of 2 then 1) give the one-process numbers for the same
    weights, judged by the same rule against fp64."""
    ck = two_process_run / "checkpoint.pt"
    rc, out, err = _run2(["eval", str(ck), "--data-dir", fake_mnist, "--split", "val", "--val-size", "101",
                          "--device", "cpu", "--threads", "1", "--n-images", "15", "--k", "100", "--iwae-images", "5",
                          "--batch-size", "2"])
    assert rc == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone prints
    val = load_dataset("mnist", "val", fake_mnist, val_size=101)
    model = load_model(ck, "cpu", fast=True)

    def one_process(dtype, **kw):
        val.to_float = lambda *a, **k: ImageDataset.to_float(val, *a, **k).to(dtype)
        try:
            return evaluate(model.to(dtype), val, device=torch.device("cpu"), **kw)
        finally:
            del val.to_float

    runs = {"val": (_rows(two_process_run)[-1], dict(n_images=101, iwae_k=4, iwae_images=5), "val_"),
            "eval": (json.loads(lines[0]), dict(n_images=15, iwae_k=100, iwae_images=5, batch_size=2, seed=0), "")}
    got, ref, truth = {}, {}, {}
    for name, (res, kw, prefix) in runs.items():
        one, exact = one_process(torch.float32, **kw), one_process(torch.float64, **kw)
        for k in ("elbo", "iwae", "kl_per_module"):
            if prefix + k in res:
                got[f"{name} {k}"] = torch.tensor(res[prefix + k], dtype=torch.float32).reshape(-1)
                ref[f"{name} {k}"] = torch.tensor(one[k], dtype=torch.float32).reshape(-1)
                truth[f"{name} {k}"] = torch.tensor(exact[k], dtype=torch.float64).reshape(-1)
    assert len(got) == 5
    assert_all_within_ref_error("distributed evaluation", got, ref, truth)


def test_low_precision_evaluation_on_two_processes(tmp_path, fake_mnist, two_process_run, capsys):
    """`matnet eval --precision bf16 --channels-last` under torchrun gives one process's bf16 bounds, judged
    against the fp32 ones (the error bf16 adds dwarfs fp32's) by the repo's rule; a bound that overflows fp16
    is one error line, from rank 0 alone, and every worker exits 2."""
    ck = str(two_process_run / "checkpoint.pt")
    argv = ["eval", ck, "--data-dir", fake_mnist, "--split", "val", "--val-size", "101", "--device", "cpu",
            "--threads", "1", "--n-images", "15", "--k", "20", "--iwae-images", "5", "--batch-size", "2"]

    def one(*flags):
        assert cli.main([*argv, *flags]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    rc, out, err = _run2([*argv, "--precision", "bf16", "--channels-last"])
    assert rc == 0, err[-3000:]
    two = json.loads([line for line in out.splitlines() if line.startswith("{")][0])
    bounds = {"got": two, "ref": one("--precision", "bf16", "--channels-last"), "truth": one()}  # ref: same kernels
    assert two["precision"] == "bf16" and bounds["truth"]["precision"] == "fp32"
    got, ref, truth = ({k: torch.tensor([b[k]], dtype=torch.float64) for k in ("elbo", "iwae")}
                       for b in bounds.values())
    assert all(ref[k] != truth[k] != got[k] for k in truth)  # bf16 did run, on one process and on two
    assert_all_within_ref_error("bf16 evaluation, 2 processes", got, ref, truth)

    st = load_checkpoint(ck)
    st["model"]["out.weight"] *= 1e6  # logits past fp16's 65504: finite in fp32, inf under fp16 autocast
    save_checkpoint(tmp_path / "big.pt", st)
    argv[1] = str(tmp_path / "big.pt")
    one()  # fp32: finite
    rc, _, err = _run2([*argv, "--precision", "fp16"])
    assert rc != 0 and _worker_codes(err) == {"2"}, err[-3000:]
    assert _messages(err) == ["matnet eval: error: the elbo and iwae bounds are not finite under --precision fp16 "
                              "(an overflow in low precision); evaluate with --precision fp32"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, fake_mnist):
    """An uninterrupted 2-process run of STEPS steps: what an interrupted and resumed one must equal."""
    out = tmp_path_factory.mktemp("straight")
    rc, _, err = _run2(_train_args(fake_mnist, out, "--steps", str(STEPS), "--ckpt-every", "2"))
    assert rc == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, fake_mnist):
    """The same command three times in one folder: stopped by SIGTERM to torchrun (a scheduler's preemption;
    Ctrl-C's SIGINT likewise), which forwards it to the workers; then resumed and killed with kill -9 (torchrun
    and both workers at once, as a node failure would) after its next checkpoint; then resumed to the end."""
    out = tmp_path_factory.mktemp("interrupted")
    args = _train_args(fake_mnist, out, "--steps", str(STEPS), "--ckpt-every", "2")
    ck, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    proc = _launch(args)
    _wait_for(proc, lambda: metrics.exists() and metrics.read_text())
    proc.send_signal(signal.SIGTERM)
    sigterm = _finish(proc)
    term_step, term_mtime = load_checkpoint(ck)["step"], ck.stat().st_mtime_ns
    proc = _launch(args)
    _wait_for(proc, lambda: ck.stat().st_mtime_ns != term_mtime)
    _kill_all(proc)
    _finish(proc)
    kill_step = load_checkpoint(ck)["step"]
    rc, _, err = _run2(args)
    assert rc == 0, err[-3000:]
    return {"out": out, "sigterm": sigterm, "term_step": term_step, "kill_step": kill_step}


def test_sigterm_checkpoints_on_every_rank_and_resumes_exactly(interrupted, straight):
    """The ranks agree on the step to stop at, rank 0 checkpoints and says so, once (its worker then exits 143;
    torchrun, signalled itself, reports no worker codes and exits 1); the re-run resumes exactly."""
    rc, _, err = interrupted["sigterm"]
    stopped = interrupted["term_step"]
    assert rc == 1 and 1 <= stopped < STEPS, err[-3000:]
    assert _messages(err) == [f"matnet train: stopped by SIGTERM at step {stopped}; checkpoint written, "
                              "run the same command again to resume"]
    _assert_same_run(interrupted["out"], straight)


def test_kill_9_mid_run_then_the_same_command_resumes_exactly(interrupted, straight):
    assert interrupted["term_step"] < interrupted["kill_step"] < STEPS  # killed mid-way, after a checkpoint
    _assert_same_run(interrupted["out"], straight)


def test_a_nan_on_one_rank_makes_every_rank_skip_and_a_persistent_one_stops_all(tmp_path, fake_mnist):
    """Rank 1's gradient is NaN at step 2, and from step 4 on: every rank skips step 2 (rank 0, whose own gradient
    was fine, logs the skip, and the checkpoint of step 3 finds both ranks' weights and RNG states equal); steps
    4 and 5 are skipped and all ranks stop with exit 3, keeping the checkpoint of step 3. With Eq. 13 on, step 1
    (no NaN yet) logs the loss, regulariser and gradient norm of one process."""
    out = tmp_path / "two"
    rc, _, err = _run2(_train_args(fake_mnist, out, "--steps", "20", "--ckpt-every", "1", "--max-skips", "2",
                                   "--set", f"infer_reg_weight={INFER_REG}"), env={POISON_ENV: "1:2,1:4-"})
    assert rc == 1 and _worker_codes(err) == {"3"}, err[-3000:]
    msg = _messages(err)
    assert len(msg) == 1 and msg[0].startswith("matnet train: error: training stopped at step 5: 2 consecutive")
    assert "recent grad norms" in msg[0] and "nan" in msg[0] and "(step 3) is kept" in msg[0]
    rows = _rows(out)
    assert [r["skipped"] for r in rows] == [0, 1, 1, 2, 3]
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    tr = Trainer(_tiny(infer_reg_weight=INFER_REG), _opts(tmp_path / "one", fake_mnist, log_every=0))
    one = tr.train_step(next(tr.loader.forever()))
    tr.close()
    for k in ("loss", "infer_reg", "grad_norm"):
        assert rows[0][k] == pytest.approx(one[k], rel=REDUCTION_RTOL, abs=0), k
