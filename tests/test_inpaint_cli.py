"""The inpainting task end to end (train --task inpaint, eval's imputation NLL, the Fig. 5 grid, image folders)
and the cluster command, on tiny models and a small MNIST-format dataset."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import _opts, _tiny, make_fake_mnist

import matnet
from matnet import cli, plots
from matnet.checkpoint import load_checkpoint, load_model
from matnet.clustering import cluster_accuracy, kmeans
from matnet.data import load_dataset
from matnet.inpaint import data_mean, evaluate_inpaint, load_inpaint_model
from matnet.masks import fixed_masks
from matnet.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

SCALE, PAD = 2, 2  # plots.save_image_rows' defaults


@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("mnist"))


def _train(data, out, *extra):
    argv = ["train", "--preset", "tiny", "--data-dir", data, "--out", str(out), "--steps", "3", "--batch-size", "8",
            "--val-size", "40", "--eval-every", "0", "--log-every", "1", "--device", "cpu", "--no-progress", *extra]
    assert cli.main(argv) == 0
    return str(out / "checkpoint.pt")


@pytest.fixture(scope="module")
def inpaint_ckpt(fake_mnist, tmp_path_factory):
    return _train(fake_mnist, tmp_path_factory.mktemp("inpaint"), "--task", "inpaint", "--mask", "occluders:3x12")


@pytest.fixture(scope="module")
def density_ckpt(fake_mnist, tmp_path_factory):
    return _train(fake_mnist, tmp_path_factory.mktemp("density"))


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_train_inpaint_runs_and_resumes_exactly(tmp_path, fake_mnist):
    kw = dict(task="inpaint", mask="quadrant:14", eval_every=0)
    straight = Trainer(_tiny(), _opts(tmp_path / "a", fake_mnist, **kw))
    straight.run()
    assert isinstance(straight.model, matnet.ConditionalMatNet)
    torch.testing.assert_close(straight.model.fill.flatten(), torch.tensor(data_mean(straight.train_data)))
    Trainer(_tiny(), _opts(tmp_path / "b", fake_mnist, **kw)).run(until=3)
    resumed = Trainer(_tiny(), _opts(tmp_path / "b", fake_mnist, task=None, mask=None, eval_every=0))  # its own
    assert resumed.step == 3 and resumed.task is not None and resumed.task.gen.spec == "quadrant:14"
    resumed.run()
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k  # same masks after the resume: the mask generator's state was restored
    st = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert st["task"] == "inpaint" and st["mask"] == "quadrant:14" and st["step"] == 6
    assert (tmp_path / "b" / "samples.png").stat().st_size > 200  # the imputation grid
    with pytest.raises(ValueError, match="--task density"):
        Trainer(_tiny(), _opts(tmp_path / "b", fake_mnist, task="density"))
    with pytest.raises(ValueError, match="trains with --mask quadrant:14"):
        Trainer(_tiny(), _opts(tmp_path / "b", fake_mnist, task="inpaint", mask="drop:0.5"))


def test_density_checkpoints_record_their_task(density_ckpt):
    assert load_checkpoint(density_ckpt)["task"] == "density"


def test_eval_reports_the_imputation_nll(inpaint_ckpt, fake_mnist, tmp_path):
    def run(*extra):
        out = tmp_path / "e.json"
        assert cli.main(["eval", inpaint_ckpt, "--data-dir", fake_mnist, "--k", "3", "--n-images", "8",
                         "--iwae-images", "4", "--batch-size", "4", "--out", str(out), *extra]) == 0
        return json.loads(out.read_text())

    res = run()
    assert res["task"] == "inpaint" and res["mask"] == "occluders:3x12" and res["iwae_k"] == 3
    for key in ("imputation_elbo", "imputation_iwae"):
        assert np.isfinite(res[key]) and res[key] > 0, res
    assert 12 * 12 <= res["missing_pixels_per_image"] <= 3 * 12 * 12
    again = run()  # fixed seeded masks and noise: the same numbers
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in res.items() if k != "seconds"}
    masks = fixed_masks("occluders:3x12", 8, 28, 28, seed=0)  # --mask-seed 0: image i gets mask i
    assert res["missing_pixels_per_image"] == masks.sum().item() / 8
    assert res["iwae_missing_pixels_per_image"] == masks[:4].sum().item() / 4  # the IWAE images' own count
    quad = run("--mask", "quadrant")
    assert quad["mask"] == "quadrant:14" and quad["missing_pixels_per_image"] == 14 * 14
    low = run("--precision", "bf16", "--channels-last")  # as test_train's density case: within 0.05 nats
    assert res["precision"] == "fp32" and low["precision"] == "bf16"
    for key in ("imputation_elbo", "imputation_iwae"):
        assert 0 < abs(low[key] - res[key]) <= 0.05, (key, low, res)


def test_imputation_bits_per_dim_count_each_bounds_own_missing_pixels(fake_mnist, tmp_path):
    """A logistic-likelihood model's imputation bounds in bits per missing dimension: the ELBO over its images'
    missing pixels, the IWAE over its own (fewer) images' ones, which differ for random occluders."""
    ck = _train(fake_mnist, tmp_path / "run", "--task", "inpaint", "--mask", "occluders:3x12",
                "--set", 'likelihood="logistic"')
    out = tmp_path / "e.json"
    assert cli.main(["eval", ck, "--data-dir", fake_mnist, "--k", "2", "--n-images", "8", "--iwae-images", "3",
                     "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    masks = fixed_masks("occluders:3x12", 8, 28, 28, seed=0)
    elbo_px, iwae_px = masks.sum().item() / 8, masks[:3].sum().item() / 3
    assert elbo_px != iwae_px  # else this test could not tell them apart
    assert res["missing_pixels_per_image"] == elbo_px and res["iwae_missing_pixels_per_image"] == iwae_px
    assert res["imputation_elbo_bits_per_dim"] == pytest.approx(res["imputation_elbo"] / (elbo_px * math.log(2)))
    assert res["imputation_iwae_bits_per_dim"] == pytest.approx(res["imputation_iwae"] / (iwae_px * math.log(2)))


def test_image_i_gets_mask_i_whatever_the_batch_size(inpaint_ckpt, fake_mnist, monkeypatch):
    """The masks that reach the model's bounds, batch after batch, are the fixed masks in image order."""
    model, _ = load_inpaint_model(inpaint_ckpt, "cpu")
    data = load_dataset("mnist", "test", fake_mnist)
    want = fixed_masks("occluders:3x12", 7, 28, 28, seed=0)
    cls = type(model)

    def spy(method, seen_by):
        def wrapped(self, x, mask, *a, **k):
            seen_by.append(mask.clone())
            return method(self, x, mask, *a, **k)
        return wrapped

    for batch in (2, 3, 7):
        seen = {"forward": [], "iwae_nll": []}
        for name, seen_by in seen.items():
            monkeypatch.setattr(cls, name, spy(getattr(cls, name), seen_by))
        evaluate_inpaint(model, data, "occluders:3x12", 7, iwae_k=2, iwae_images=5, batch_size=batch)
        monkeypatch.undo()
        assert torch.equal(torch.cat(seen["forward"]), want), batch
        assert torch.equal(torch.cat(seen["iwae_nll"]), want[:5]), batch


def _cells(path, rows, cols, size):
    """The grid's cells as uint8 [rows, cols, size, size, 3], undoing the nearest-neighbour upscaling."""
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[:2] == (SCALE * (rows * (size + PAD) + PAD), SCALE * (cols * (size + PAD) + PAD))
    img = img[::SCALE, ::SCALE]
    return np.stack([np.stack([img[PAD + r * (size + PAD):][:size, PAD + c * (size + PAD):][:, :size]
                               for c in range(cols)]) for r in range(rows)])


def test_inpaint_grid_keeps_the_known_pixels(inpaint_ckpt, fake_mnist, tmp_path):
    out = tmp_path / "grid.png"
    assert cli.main(["inpaint", inpaint_ckpt, "--data-dir", fake_mnist, "--n", "3", "--images", "4",
                     "--seed", "5", "--out", str(out)]) == 0
    cells = _cells(out, 4, 2 + 3, 28)
    blue = np.round(np.array(plots.MISSING_RGB) * 255).astype(np.uint8)
    masks = fixed_masks("occluders:3x12", 4, 28, 28, seed=5)[:, 0].bool().numpy()
    for r in range(4):
        orig, occluded, imputations = cells[r, 0], cells[r, 1], cells[r, 2:]
        missing = (occluded == blue).all(-1)
        assert np.array_equal(missing, masks[r])  # the seeded masks, in order
        assert np.array_equal(occluded[~missing], orig[~missing])
        for imp in imputations:
            assert np.array_equal(imp[~missing], orig[~missing])


def test_bad_mask_spec_is_one_line_and_exit_2(fake_mnist, inpaint_ckpt, tmp_path, capsys):
    rc = cli.main(["train", "--preset", "tiny", "--data-dir", fake_mnist, "--out", str(tmp_path / "r"),
                   "--task", "inpaint", "--mask", "occluders:3"])
    assert rc == 2
    _one_error_line(capsys, "bad mask spec", "occluders:KxD")
    assert not (tmp_path / "r").exists()  # refused before anything was made
    assert cli.main(["inpaint", inpaint_ckpt, "--data-dir", fake_mnist, "--mask", "drop:2"]) == 2
    _one_error_line(capsys, "bad mask spec")
    assert cli.main(["inpaint", inpaint_ckpt, "--data-dir", fake_mnist, "--mask", "centre:40"]) == 2
    _one_error_line(capsys, "does not fit")
    assert cli.main(["train", "--preset", "tiny", "--data-dir", fake_mnist, "--out", str(tmp_path / "r"),
                     "--mask", "quadrant"]) == 2
    _one_error_line(capsys, "needs --task inpaint")


def test_density_and_inpaint_checkpoints_refuse_each_others_commands(density_ckpt, inpaint_ckpt, fake_mnist,
                                                                     capsys):
    assert cli.main(["inpaint", density_ckpt, "--data-dir", fake_mnist]) == 2
    _one_error_line(capsys, "density model")
    assert cli.main(["sample", inpaint_ckpt]) == 2
    _one_error_line(capsys, "matnet inpaint")
    assert cli.main(["eval", density_ckpt, "--data-dir", fake_mnist, "--mask", "quadrant"]) == 2
    _one_error_line(capsys, "density model")


def _write_pngs(folder, n, rng):
    folder.mkdir()
    for i in range(n):  # different sizes and aspect ratios: resized and centre-cropped to the model's size
        h, w = 20 + 7 * i, 24 + 5 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_image_folder_input(inpaint_ckpt, fake_mnist, tmp_path, capsys):
    rng = np.random.default_rng(0)
    _write_pngs(tmp_path / "faces", 5, rng)
    out = tmp_path / "grid.png"
    assert cli.main(["inpaint", inpaint_ckpt, "--folder", str(tmp_path / "faces"), "--n", "2", "--out",
                     str(out)]) == 0  # RGB files into a grey MNIST model
    _cells(out, 5, 4, 28)  # all 5 images (fewer than --images 8), at the model's size
    for asked in ("6", "8"):  # an explicit count must be there, the default's 8 included
        assert cli.main(["inpaint", inpaint_ckpt, "--folder", str(tmp_path / "faces"), "--images", asked]) == 2
        assert f"--images {asked} is more than the 5 images of {tmp_path / 'faces'}" in capsys.readouterr().err
    for extra, says in ((["--split", "val"], "give --folder or --split, not both"),
                        (["--dataset", "mnist"], "give --folder or --dataset, not both")):
        assert cli.main(["inpaint", inpaint_ckpt, "--folder", str(tmp_path / "faces"), *extra]) == 2
        assert says in capsys.readouterr().err
    assert cli.main(["inpaint", inpaint_ckpt, "--folder", str(tmp_path / "faces" / "img0.png"), "--out",
                     str(out)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    # an RGB (8-bit) model trained on an image folder, inpainted from another folder
    _write_pngs(tmp_path / "train", 20, rng)
    ck = _train(str(tmp_path / "train"), tmp_path / "rgb", "--task", "inpaint", "--mask", "centre:8", "--val-size",
                "2", "--set", 'dataset="folder"', "--set", "image_channels=3", "--set", "image_size=16",
                "--set", 'likelihood="logistic"')
    model, meta = load_inpaint_model(ck)
    assert model.cfg.image_channels == 3 and meta["mask"] == "centre:8"
    assert cli.main(["inpaint", ck, "--folder", str(tmp_path / "faces"), "--n", "2", "--images", "3", "--out",
                     str(out)]) == 0
    cells = _cells(out, 3, 4, 16)
    for r in range(3):
        known = ~(cells[r, 1] == np.round(np.array(plots.MISSING_RGB) * 255)).all(-1)
        assert known.sum() == 16 * 16 - 8 * 8
        assert all(np.array_equal(cells[r, c][known], cells[r, 0][known]) for c in (2, 3))


def test_cluster_needs_a_mixture_prior(density_ckpt, fake_mnist, capsys):
    assert cli.main(["cluster", density_ckpt, "--data-dir", fake_mnist]) == 2
    _one_error_line(capsys, "no mixture prior", "--kmeans K")
    assert cli.main(["cluster", density_ckpt, "--data-dir", fake_mnist, "--kmeans", "-1"]) == 2
    _one_error_line(capsys, "--kmeans must be >= 0")
    assert cli.main(["cluster", density_ckpt, "--data-dir", fake_mnist, "--kmeans", "3", "--n-images", "2"]) == 2
    _one_error_line(capsys, "--kmeans 3 needs at least as many images, got 2")


def test_cluster_kmeans_of_the_posterior_means(density_ckpt, fake_mnist, tmp_path, capsys):
    """--kmeans K: any density model's posterior means E[z0 | x] in K k-means clusters, scored as the mixture's."""
    out = tmp_path / "km.png"
    assert cli.main(["cluster", density_ckpt, "--data-dir", fake_mnist, "--kmeans", "4", "--out", str(out),
                     "--seed", "3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method"] == "kmeans" and res["n_components"] == 4 and sum(res["counts"]) == res["images"] == 40
    model = load_model(density_ckpt)
    data = load_dataset("mnist", "test", fake_mnist)
    x = data.to_float(data.images, generator=torch.Generator().manual_seed(3))
    assign = kmeans(model.z0_posterior(x)[0], 4, seed=3)[1]
    assert res["counts"] == torch.bincount(assign, minlength=4).tolist()
    assert res["accuracy"] == cluster_accuracy(assign, data.labels, 4, 10)
    assert Image.open(out).size[0] > 28


def test_cluster_writes_a_grid_and_the_accuracy(fake_mnist, tmp_path, capsys):
    ck = _train(fake_mnist, tmp_path / "gmm", "--set", 'prior="gmm"', "--set", "prior_components=3")
    out = tmp_path / "clusters.png"
    assert cli.main(["cluster", ck, "--data-dir", fake_mnist, "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= res["accuracy"] <= 1.0 and res["images"] == 40 and res["n_components"] == 3
    assert Image.open(out).size[0] > 28 and out.stat().st_size > 200
    # RGB files clustered by this grey, binary model: made grey and binarized as it reads them; no labels
    _write_pngs(tmp_path / "pics", 6, np.random.default_rng(1))
    assert cli.main(["cluster", ck, "--dataset", "folder", "--data-dir", str(tmp_path / "pics"), "--split", "train",
                     "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 6 and "accuracy" not in res


def test_split_val_is_the_runs_own_hold_out(density_ckpt, inpaint_ckpt, fake_mnist, tmp_path, capsys, caplog):
    """--split val (and train) take the images the checkpoint's run held out (--val-size 40 of the 120 here) in
    eval, cluster and inpaint, not the dataset's default hold-out; a checkpoint that does not record it takes
    the default and says so."""
    from matnet.checkpoint import save_checkpoint

    def last_json():
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    common = ["--data-dir", fake_mnist, "--device", "cpu"]
    assert cli.main(["eval", density_ckpt, "--split", "val", "--k", "0", *common]) == 0
    assert last_json()["elbo_images"] == 40
    assert cli.main(["eval", density_ckpt, "--split", "train", "--k", "0", *common]) == 0
    assert last_json()["elbo_images"] == 80
    assert cli.main(["cluster", density_ckpt, "--split", "val", "--kmeans", "2", "--out", str(tmp_path / "c.png"),
                     *common]) == 0
    assert last_json()["n_images"] == 40
    inpaint = ["inpaint", inpaint_ckpt, "--split", "val", "--n", "1", "--out", str(tmp_path / "i.png"), *common]
    assert cli.main([*inpaint, "--images", "40"]) == 0
    capsys.readouterr()
    assert cli.main([*inpaint, "--images", "41"]) == 2
    _one_error_line(capsys, "--images 41 is more than the 40 images of the val split")
    assert cli.main([*inpaint, "--images", "30", "--val-size", "30"]) == 0  # as given
    capsys.readouterr()
    assert cli.main(["cluster", density_ckpt, "--val-size", "30", *common]) == 2
    _one_error_line(capsys, "it has no effect on --split test")

    st = load_checkpoint(density_ckpt)
    del st["val_size"]  # as written before checkpoints recorded it
    old = str(tmp_path / "old.pt")
    save_checkpoint(old, st)
    assert cli.main(["eval", old, "--split", "val", "--k", "0", "--val-size", "40", *common]) == 0
    assert last_json()["elbo_images"] == 40
    assert cli.main(["eval", old, "--split", "val", "--k", "0", *common]) == 2  # mnist's default: 10,000 of 120
    assert "does not record its training run's --val-size" in caplog.text


def test_sigterm_outside_training_ends_a_command_with_one_line(density_ckpt, fake_mnist, monkeypatch, capsys):
    """SIGTERM during `matnet eval` (a scheduler's preemption; Ctrl-C's SIGINT likewise) ends it with one line and
    exit 143, not a silent kill, and leaves the command's handler as it was."""
    import os
    import signal

    def evaluate(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("not reached: the signal stops the evaluation")

    def outside(signum, frame):  # were the command's own handler missing, this one fails the test (not pytest)
        raise AssertionError("SIGTERM reached the handler from before the command")

    monkeypatch.setattr(matnet.train, "evaluate", evaluate)
    before = signal.signal(signal.SIGTERM, outside)
    try:
        assert cli.main(["eval", density_ckpt, "--data-dir", fake_mnist, "--device", "cpu", "--k", "0"]) == 143
        assert signal.getsignal(signal.SIGTERM) is outside
    finally:
        signal.signal(signal.SIGTERM, before)
    _one_error_line(capsys, "matnet eval: stopped by SIGTERM")
