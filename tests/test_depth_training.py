"""train.py --task depth: the losses by hand, augmentation that keeps metres true, the blocks a depth
head reads, and a run on a generated RGB-D folder (random-init ViT-S/14) whose checkpoint every
script reads: infer_image.py, evaluate.py, export.py, a resumed run."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dinokit.backbones.released_heads import HeadWeightsError, read_checked_head
from dinokit.data.synthetic import make_depth_dataset
from dinokit.tasks.depth.data import build_depth_datasets
from dinokit.tasks.depth.losses import MEAN_SHARE, gradient_loss, sig_loss
from dinokit.tasks.depth.released import depth_taps
from dinokit.training.feature_cache import FeatureCache
from tests.conftest import OFFLINE, run_script
from tests.test_inference import run_notebook

EPS = 1e-3  # Meta's, inside the logs


def test_sig_loss_by_hand():
    truth = torch.tensor([[1.0, 2.0, 4.0, 0.0]])
    pred = torch.tensor([[2.0, 2.0, 2.0, 9.0]])
    valid = truth > 0
    g = np.log(np.array([2.0, 2.0, 2.0]) + EPS) - np.log(np.array([1.0, 2.0, 4.0]) + EPS)
    expected = math.sqrt(np.var(g, ddof=1) + MEAN_SHARE * g.mean() ** 2)  # torch.var: unbiased, as Meta's
    assert sig_loss(pred, truth, valid).item() == pytest.approx(expected, rel=1e-5)
    pred[0, 3] = 0.5  # an unmeasured pixel never counts
    assert sig_loss(pred, truth, valid).item() == pytest.approx(expected, rel=1e-5)
    # a prediction off by one factor everywhere: no variance, only the mean share of the log error
    assert sig_loss(3 * truth[:, :3], truth[:, :3], valid[:, :3]).item() == pytest.approx(
        math.sqrt(MEAN_SHARE) * abs(math.log((3 + EPS / 1) / 1)), rel=1e-2
    )


def test_gradient_loss_runs_along_each_image_not_across_the_batch():
    rows = torch.linspace(1, 6, 12)[:, None].expand(12, 10)
    truth = torch.stack([rows, 2 * rows])  # two images of one batch
    valid = torch.ones_like(truth, dtype=torch.bool)
    # each image predicted off by its own factor: the log error is flat within each image
    assert gradient_loss(torch.stack([1.5 * rows, 4 * rows]), truth, valid).item() < 1e-3  # eps aside
    flat = torch.full_like(truth, 3.0)  # no slope where the truth has one
    assert gradient_loss(flat, truth, valid).item() > 0.05
    assert gradient_loss(flat, truth, torch.zeros_like(valid)).item() == 0  # nothing measured, nothing to learn


def test_depth_heads_read_metas_blocks():
    assert depth_taps("dinov2_vits14", 4) == (2, 5, 8, 11)
    assert depth_taps("large", 4) == (4, 11, 17, 23)
    assert depth_taps("giant", 4) == (9, 19, 29, 39)
    assert depth_taps("dinov3_vitl16", 4) == (5, 11, 17, 23)  # each quarter's last block
    assert depth_taps("dinov3_vitb16", 1) == (11,)


def test_augmentation_keeps_metres(tmp_path):
    """Flip, rotation and colour change the image; the depth map only moves (nearest neighbour),
    with unmeasured (0) corners, never blended or rescaled."""
    root = make_depth_dataset(tmp_path / "rgbd", n_train=3, n_valid=1, size=(70, 56))
    train, valid, spec, pixels = build_depth_datasets(root, (70, 56))
    assert spec.max_depth == 10 and pixels["valid"] > 0
    for epoch in range(6):
        for index in range(len(train)):
            image, depth = train.sample(index, epoch)
            _, original = train.load_pair(index)
            assert image.shape == (3, 56, 70) and depth.dtype == torch.float32
            assert set(np.unique(depth.numpy())) <= set(np.unique(original)) | {0.0}
    _, depth = valid[0]
    assert torch.equal(depth, torch.from_numpy(valid.load_pair(0)[1]))  # validation: untouched at its size


def test_feature_cache_keeps_depth_in_metres(tmp_path):
    cache = FeatureCache("valid", 0, tmp_path, target_dtype=torch.float32)  # budget 0: in a file
    depth = torch.rand(3, 8, 10) * 10
    cache.add(torch.randn(3, 4, 2, 3), depth, count=3, dtype=torch.float32)
    cache.finish()
    ((_, cached),) = cache.batches(3)
    assert cached.dtype == torch.float32 and torch.equal(cached, depth)
    cache.close()


def rmse_of_median(root):
    """The validation RMSE of predicting the training split's median depth everywhere."""
    train, valid, spec, _ = build_depth_datasets(root, (112, 84))
    measured = np.concatenate([d[d > 0] for d in (train.load_pair(i)[1] for i in range(len(train)))])
    median, errors = np.median(measured), []
    for index in range(len(valid)):
        truth = valid.load_pair(index)[1]
        errors.append(np.sqrt(np.mean((truth[truth > 0] - median) ** 2)))
    return float(np.mean(errors))


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    root = make_depth_dataset(tmp_path_factory.mktemp("rgbd"), n_train=16, n_valid=4, size=(112, 84))
    out = tmp_path_factory.mktemp("runs") / "depth"
    flags = ["--data-dir", root, "--imgsz", "112", "84", "--batch", "4", "--lr", "1e-2", "--out-dir", out]
    result = run_script("train.py", "--task", "depth", "--epochs", "6", *flags, *OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, out, flags, result.stdout


@pytest.mark.slow
def test_a_depth_head_learns_and_reports_depth_metrics(depth_run):
    root, out, _, stdout = depth_run
    assert {p.name for p in out.iterdir()} >= {"best_model_rmse.pth", "best_model_loss.pth", "last.pth", "rmse.png"}
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {"valid_rmse", "valid_abs_rel", "valid_delta1", "train_silog"} <= set(rows[0])
    best = json.loads((out / "best_validation.json").read_text())
    assert best["checkpoint"] == "best_model_rmse.pth" and best["images"] == 4
    assert best["rmse"] == pytest.approx(min(float(r["valid_rmse"]) for r in rows), rel=0.25)  # train vs full size
    # random-init features still carry where a pixel is (rows) and its shade: better than a constant
    assert best["rmse"] < 0.8 * rmse_of_median(root), stdout[-2000:]


@pytest.mark.slow
def test_every_script_reads_a_trained_depth_checkpoint(depth_run, tmp_path):
    root, out, _, _ = depth_run
    checkpoint = out / "best_model_rmse.pth"
    result = run_script(
        "infer_image.py",
        "--model",
        checkpoint,
        "--input",
        root / "valid_images",
        "--out-dir",
        tmp_path / "pred",
        "--save-npy",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    depth = np.load(tmp_path / "pred" / "valid_0000.npy")
    assert depth.shape == (84, 112) and depth.dtype == np.float32 and 0.001 <= depth.min() <= depth.max() <= 10
    result = run_script(
        "evaluate.py", "--model", checkpoint, "--data-dir", root, "--out-dir", tmp_path, "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (report,) = tmp_path.glob("eval_*.json")
    assert json.loads(report.read_text())["rmse"] == pytest.approx(
        json.loads((out / "best_validation.json").read_text())["rmse"], rel=1e-4
    )
    result = run_script("export.py", "--model", checkpoint, "--out", tmp_path / "depth.onnx", "--argmax")
    assert result.returncode != 0 and "is a depth model" in result.stderr and not (tmp_path / "depth.onnx").exists()
    result = run_script("export.py", "--model", checkpoint, "--out", tmp_path / "depth.onnx")
    assert result.returncode == 0 and "check passed" in result.stdout, result.stderr[-2000:]
    result = run_script(
        "infer_image.py",
        "--model",
        tmp_path / "depth.onnx",
        "--input",
        root / "valid_images",
        "--out-dir",
        tmp_path / "onnx",
        "--save-npy",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.abs(np.load(tmp_path / "onnx" / "valid_0000.npy") - depth).max() < 1e-3


@pytest.mark.slow
def test_the_notebook_shows_a_depth_run_with_the_cells_of_a_segmentation_run(depth_run):
    root, out, _, _ = depth_run
    outputs = run_notebook(
        f"DATA_DIR = {str(root)!r}\nCHECKPOINT = {str(out / 'best_model_rmse.pth')!r}\nHEAD_WEIGHTS = None\n"
        "NUM_SAMPLES = 2\nDEVICE = 'cpu'\nMODE = 'whole'\nSCALES = [1.0]\nFLIP = False"
    )
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # samples, curves, depth maps
    assert any("rmse" in o.get("text", "") and "(4 images" in o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_a_depth_run_resumes_in_its_folder(depth_run, tmp_path):
    _, out, _, _ = depth_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("last.pth", "metrics.csv", "best_model_rmse.pth", "best_model_loss.pth"):
        (copy / name).write_bytes((out / name).read_bytes())
    result = run_script("train.py", "--resume", copy / "last.pth", "--epochs", "7", "--workers", "0", "--no-pretrained")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(csv.DictReader(open(copy / "metrics.csv")))) == 7


@pytest.mark.slow
def test_a_resumed_depth_run_refuses_a_changed_depth_json(depth_run):
    """Metres read with another depth_scale are other targets: refused like a changed range."""
    import train
    from checkpoint import load_checkpoint
    from dinokit.runs.resume import check_model_matches
    from dinokit.tasks import get_task
    from dinokit.tasks.depth.files import load_depth_spec

    root, out, flags, _ = depth_run
    args = train.get_args_parser().parse_args(["--task", "depth", *map(str, flags), *OFFLINE])
    checkpoint = load_checkpoint(out / "last.pth")
    train.settle(args, checkpoint)
    train.resolve_backbone(args)
    spec = load_depth_spec(root)
    info, task = checkpoint["model_info"], get_task("depth")

    def check(spec):
        check_model_matches(info, checkpoint["args"], args, task.resume_fields(info, spec), "last.pth")

    check(spec)  # the same depth.json: resumes
    with pytest.raises(ValueError, match=r"trained with depth.json depth_scale 1000(\.0)? but this run has 500"):
        check(dataclasses.replace(spec, depth_scale=500))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--recipe", "paper"], "--recipe paper with --task depth"),
        (["--head-dropout", "0.1"], "--head-dropout applies to segmentation heads"),
        (["--backbone", "dinov3_convnext_tiny"], "depth heads read ViT blocks"),
    ],
)
def test_depth_runs_refuse_what_would_mislead(flags, message, tmp_path):
    root = make_depth_dataset(tmp_path / "rgbd", n_train=2, n_valid=1, size=(42, 42))
    result = run_script(
        "train.py", "--task", "depth", "--data-dir", root, "--out-dir", tmp_path / "run", *flags, *OFFLINE
    )
    assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "last.pth").exists()


def test_a_segmentation_folder_is_not_an_rgbd_folder(tiny_dataset, tmp_path):
    result = run_script(
        "train.py", "--task", "depth", "--data-dir", tiny_dataset, "--out-dir", tmp_path / "run", *OFFLINE
    )
    assert result.returncode != 0 and "depth.json: not found" in result.stderr.strip().splitlines()[-1]


def test_an_rgbd_folder_asks_for_task_depth(tmp_path):
    root = make_depth_dataset(tmp_path / "rgbd", n_train=2, n_valid=1, size=(42, 42))
    result = run_script("train.py", "--data-dir", root, "--out-dir", tmp_path / "run", *OFFLINE)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith("add --task depth")


def test_a_depth_head_name_is_not_a_segmentation_head():
    with pytest.raises(HeadWeightsError, match="nyu_linear4: one of Meta's depth heads, not a segmentation head"):
        read_checked_head("nyu_linear4", "small", False, 4)
