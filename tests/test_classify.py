"""classify.py: image folders classified from frozen DINOv2 embeddings, by kNN and a linear probe."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.backbones.loading import load_backbone
from dinokit.classification import classifiers
from dinokit.classification.classifiers import knn_votes, ranked_classes, topk_accuracy, train_linear_probe
from dinokit.classification.embeddings import ClassificationTransform, extract, linear_input
from dinokit.classification.image_folders import read_class_folders
from dinokit.data.synthetic import make_image_folders
from tests.conftest import run_script

BACKBONE = ("--source", "timm", "--no-pretrained")
SMALL = ("--imgsz", "56", "--crop-pct", "1.0", "--workers", "0", "--k", "3", "5", "--epochs", "3", *BACKBONE)


def test_knn_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 0.0]])  # cosine similarity: 1, 0.6, 0, -1
    votes, neighbours, sims = knn_votes(train, labels, query, k=3, num_classes=2, temperature=0.5)
    assert neighbours.tolist() == [[0, 1, 2]] and sims[0].tolist() == pytest.approx([1.0, 0.6, 0.0])
    assert votes[0].tolist() == pytest.approx([math.exp(1 / 0.5), math.exp(0.6 / 0.5) + math.exp(0.0)])


def test_the_temperature_decides_between_one_near_and_two_far_neighbours():
    far = math.sqrt(1 - 0.9**2)
    train = torch.tensor([[1.0, 0.0, 0.0], [0.9, far, 0.0], [0.9, 0.0, far]])  # similarity 1.0, 0.9, 0.9
    labels, query = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0, 0.0]])
    sharp, _, _ = knn_votes(train, labels, query, k=3, num_classes=2, temperature=0.07)
    flat, _, _ = knn_votes(train, labels, query, k=3, num_classes=2, temperature=1.0)
    assert ranked_classes(sharp)[0, 0] == 0  # e^(1/0.07) > 2 e^(0.9/0.07): the nearest one wins
    assert ranked_classes(flat)[0, 0] == 1  # e^1 < 2 e^0.9: the majority wins


def test_equal_votes_rank_the_lower_class_first():
    train, labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0])
    votes, _, _ = knn_votes(train, labels, torch.tensor([[1.0, 0.0]]), k=2, num_classes=3)
    assert ranked_classes(votes)[0].tolist() == [0, 1, 2]
    assert topk_accuracy(votes, torch.tensor([1]), 1) == 0.0 and topk_accuracy(votes, torch.tensor([1]), 2) == 1.0


def test_knn_in_small_chunks_equals_knn_in_one(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train, labels, queries = (
        torch.randn(300, 8, generator=g),
        torch.randint(0, 4, (300,), generator=g),
        torch.randn(50, 8, generator=g),
    )
    whole = knn_votes(train, labels, queries, k=7, num_classes=4)
    monkeypatch.setattr(classifiers, "KNN_MEMORY", 4 * 300 * 3)  # 3 queries per chunk
    chunked = knn_votes(train, labels, queries, k=7, num_classes=4)
    assert torch.equal(whole[1], chunked[1])  # the same neighbours
    assert torch.allclose(whole[0], chunked[0], rtol=1e-5) and torch.allclose(whole[2], chunked[2], atol=1e-6)
    with pytest.raises(ValueError, match="--k 301: must be between 1 and the number of training images"):
        knn_votes(train, labels, queries, k=301, num_classes=4)


def test_the_linear_probe_separates_separable_embeddings_and_the_sweep_keeps_the_best():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 32, generator=g) * 4

    def sample(n):
        labels = torch.arange(3).repeat_interleave(n)
        return centres[labels] + torch.randn(len(labels), 32, generator=g), labels

    (train_x, train_y), (val_x, val_y) = sample(20), sample(10)
    result = train_linear_probe(train_x, train_y, val_x, val_y, 3, lrs=[1e-6, 1e-2], epochs=20, batch_size=16)
    assert (result.linear(val_x).argmax(1) == val_y).all()
    assert result.lr == 1e-2 and set(result.sweep) == {1e-6, 1e-2} and result.sweep[1e-2] == 1.0
    assert len(result.history) == 20 and result.history[result.epoch - 1]["val_top1"] == 1.0


def test_preprocessing_is_torchvisions_resize_and_centre_crop():
    transforms = pytest.importorskip("torchvision.transforms")
    image = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    reference = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    ours = ClassificationTransform(224, 0.875)(image)
    assert ours.shape == (3, 224, 224)
    assert torch.allclose(ours, reference(Image.fromarray(image)), atol=1e-6)


def test_stored_embeddings_are_the_models_class_tokens(tmp_path):
    # the last block's normalised class token is what timm's forward_features puts first
    make_image_folders(tmp_path, classes=2, n_train=2, n_val=1)
    files = read_class_folders(tmp_path).train.files
    torch.manual_seed(0)
    backbone = load_backbone("small", source="timm", pretrained=False).eval()
    transform = ClassificationTransform(56, 1.0)
    stored = extract(backbone, files, transform, device=torch.device("cpu"), batch_size=3)
    assert stored["cls"].shape == (4, 4, 384) and stored["avgpool"].shape == (4, 384)
    with torch.no_grad():
        tokens = backbone.vit.forward_features(
            torch.stack([transform(np.asarray(Image.open(f).convert("RGB"))) for f in files])
        )
    assert torch.allclose(stored["cls"][:, -1], tokens[:, 0], atol=1e-5)
    assert torch.allclose(stored["avgpool"], tokens[:, 1:].mean(1), atol=1e-5)
    assert linear_input(stored, "cls+avgpool", 4).shape == (4, 5 * 384) and linear_input(stored, "cls", 1).shape == (
        4,
        384,
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = make_image_folders(tmp_path_factory.mktemp("folders"), classes=3, n_train=6, n_val=2)
    (root / "train" / "class_0" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "class_0" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def classified(folders, tmp_path_factory):
    out = tmp_path_factory.mktemp("classify") / "run"
    result = run_script("classify.py", "--data-dir", folders, "--out-dir", out, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.slow
def test_a_run_writes_every_artefact_and_reports_each_method(classified):
    out, stdout = classified
    for name in (
        "embeddings_train.pt",
        "embeddings_val.pt",
        "metrics.json",
        "metrics.csv",
        "loss.png",
        "accuracy.png",
        "confusion_knn.png",
        "confusion_linear.png",
        "neighbours.png",
        "classifier.pth",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "3 classes; 18 training and 6 validation images; 2 non-image or hidden files skipped" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["knn"]) == {"3", "5"} and 0 <= metrics["linear"]["top1"] <= 1
    assert "top5" not in metrics["linear"]  # only 3 classes
    assert set(metrics["linear"]["per_class"]) == {"class_0", "class_1", "class_2"}
    with open(out / "metrics.csv") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == [1, 2, 3]
    assert not list(out.glob("*.tmp*"))


@pytest.mark.slow
def test_a_second_run_reuses_the_embeddings_until_a_file_changes(classified, folders):
    out, _ = classified
    again = run_script(
        "classify.py", "--data-dir", folders, "--out-dir", out, *SMALL, "--features", "cls+avgpool", "--layers", "4"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: 18 embeddings from the cache (embeddings_train.pt); extraction skipped" in again.stdout
    assert "Features: cls+avgpool, last 4 block(s), 1920 dimensions" in again.stdout
    changed = folders / "val" / "class_1" / "val_1_000.jpg"
    Image.fromarray(np.full((48, 64, 3), 30, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    third = run_script("classify.py", "--data-dir", folders, "--out-dir", out, *SMALL)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "train: 18 embeddings from the cache" in third.stdout
    assert "val: 6 embeddings extracted" in third.stdout and "cache: the files changed" in third.stdout


@pytest.mark.slow
def test_predict_on_a_folder_writes_one_row_per_image(classified, folders, tmp_path):
    out, _ = classified
    result = run_script(
        "classify.py",
        "--predict",
        "--model",
        out / "classifier.pth",
        "--input",
        folders / "val",
        "--out-dir",
        tmp_path / "pred",
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {
        "file",
        "linear_class",
        "linear_probability",
        "knn_class",
        "knn_vote_share",
    }
    assert {row["knn_class"] for row in rows} <= {"class_0", "class_1", "class_2"}
    assert "6 images ->" in result.stdout


@pytest.mark.slow
def test_val_fraction_splits_one_folder_per_class_reproducibly(tmp_path):
    make_image_folders(tmp_path / "made", classes=2, n_train=5, n_val=0)
    first, second = (
        read_class_folders(tmp_path / "made" / "train", 0.4, seed=1),
        read_class_folders(tmp_path / "made" / "train", 0.4, seed=1),
    )
    assert first.val.files == second.val.files and len(first.val) == 4 and len(first.train) == 6
    assert not set(first.val.files) & set(first.train.files)
    result = run_script(
        "classify.py",
        "--data-dir",
        tmp_path / "made" / "train",
        "--val-fraction",
        "0.4",
        "--out-dir",
        tmp_path / "run",
        "--method",
        "knn",
        *SMALL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert sum(len(files) for files in split["val"].values()) == 4


def broken_folders(tmp_path, problem):
    root = make_image_folders(tmp_path / "data", classes=2, n_train=3, n_val=1)
    if problem == "empty class":
        for path in (root / "train" / "class_1").iterdir():
            path.unlink()
    elif problem == "unknown val class":
        (root / "val" / "class_9").mkdir()
        (root / "val" / "class_0" / "val_0_000.jpg").rename(root / "val" / "class_9" / "x.jpg")
    elif problem == "one class":
        for split in ("train", "val"):
            for path in (root / split / "class_1").iterdir():
                path.unlink()
            (root / split / "class_1").rmdir()
    elif problem == "unreadable image":
        (root / "train" / "class_1" / "train_1_001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "problem, flags, message",
    [
        ("empty class", (), "class_1: class folder has no images"),
        ("unknown val class", (), "class_9: class not in"),
        ("one class", (), "1 class folder (class_0); classification needs at least 2"),
        ("unreadable image", (), "train_1_001.jpg"),
        ("none", ("--k", "7"), "--k 7: larger than the training set (6 images"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, problem, flags, message):
    root = broken_folders(tmp_path, problem)
    result = run_script("classify.py", "--data-dir", root, "--out-dir", tmp_path / "out", *SMALL, *flags)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".pth", ".pt", ".json", ".csv")]


@pytest.mark.slow
def test_classifiers_and_segmentation_checkpoints_are_not_mixed_up(classified, trained_run, tmp_path):
    out, _ = classified
    segmentation = trained_run[0] / "best_model_iou.pth"
    wrong_way = run_script("classify.py", "--predict", "--model", segmentation, "--input", tmp_path)
    assert (
        wrong_way.returncode == 1
        and "is a training checkpoint, not an image classifier; it goes to --model of" in wrong_way.stderr
    )
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    other_way = run_script(
        "infer_image.py", "--model", out / "classifier.pth", "--input", tmp_path / "a.png", "--out-dir", tmp_path / "o"
    )
    assert (
        other_way.returncode == 1
        and "is an image classifier, not a training checkpoint; it goes to classify.py --predict --model"
        in other_way.stderr
    )


@pytest.mark.slow
def test_bench_measures_extraction_and_knn_over_stored_embeddings():
    result = run_script(
        "bench.py",
        "--skip",
        "epochs",
        "inference",
        "modes",
        "memory",
        "export",
        "backbones",
        "eomt",
        "retrieval",
        "--cls-images",
        "8",
        "--cls-imgsz",
        "56",
        "--knn-stored",
        "5000",
        "--repeats",
        "2",
        "--batch",
        "2",
        "--workers",
        "0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| embedding extraction, 8 images" in result.stdout and "images/s" in result.stdout
    assert "| kNN, k=20, 1000 queries over 5,000 stored 384-d embeddings" in result.stdout
