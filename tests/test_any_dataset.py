"""Datasets other than VOC: description files, every mask format, VOC release conversion."""

import json
import socket
import tarfile

import cv2
import numpy as np
import pytest
from PIL import Image

import config
from checkpoint import load_checkpoint
from dinokit.data.image_files import DatasetError
from dinokit.data.labels import VOC, ColorMap, load_dataset_spec, read_mask
from dinokit.data.synthetic import make_dataset
from tests.conftest import OFFLINE, dead_pid, run_script

VOC_MAP = ColorMap(config.COLORS, config.IGNORE_COLORS)
INDEX = np.array([[0, 15, 255, 3], [20, 0, 1, 255]], dtype=np.uint8)


def palette_png(index, path):
    image = Image.fromarray(index)
    palette = np.zeros((256, 3), np.uint8)
    palette[:21], palette[255] = config.COLORS, config.IGNORE_COLORS[0]
    image.putpalette(palette.flatten().tolist())
    image.save(path)


def test_every_mask_format_reads_to_the_same_index_map(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(VOC_MAP.decode(INDEX), cv2.COLOR_RGB2BGR))
    palette_png(INDEX, tmp_path / "palette.png")
    Image.fromarray(INDEX).save(tmp_path / "index8.png")
    Image.fromarray(INDEX.astype(np.uint16)).save(tmp_path / "index16.png")
    rgba = cv2.cvtColor(VOC_MAP.decode(INDEX), cv2.COLOR_RGB2BGRA)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert Image.open(tmp_path / "palette.png").mode == "P" and Image.open(tmp_path / "index8.png").mode == "L"
    for name in ("rgb", "palette", "index8", "index16", "rgba"):
        assert np.array_equal(read_mask(tmp_path / f"{name}.png", VOC_MAP), INDEX), name


def test_index_mask_with_unknown_values_is_an_error(tmp_path):
    Image.fromarray(np.array([[0, 30, 30, 255]], np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(
        DatasetError, match=r"m\.png: index mask values outside the 21 classes and ignore index 255 .*30 x2"
    ):
        read_mask(tmp_path / "m.png", VOC_MAP)


def test_mask_format_color_reads_binary_grayscale_masks_by_colour(tmp_path):
    Image.fromarray(np.array([[0, 255, 255]], np.uint8)).save(tmp_path / "m.png")
    binary = ColorMap([(0, 0, 0), (255, 255, 255)])
    assert read_mask(tmp_path / "m.png", binary, "color").tolist() == [[0, 1, 1]]


def test_no_description_means_voc(tmp_path):
    assert load_dataset_spec(tmp_path) is VOC


def write_description(folder, **fields):
    description = {
        "classes": [
            {"name": "road", "color": [128, 64, 128]},
            {"name": "car", "color": [64, 0, 128]},
            {"name": "person", "color": [64, 64, 0]},
        ],
        "ignore_color": [0, 0, 0],
        **fields,
    }
    (folder / "classes.json").write_text(json.dumps(description))
    return folder / "classes.json"


def test_description_file_is_read(tmp_path):
    write_description(tmp_path, ignore_index=100, mask_format="index")
    spec = load_dataset_spec(tmp_path)
    assert spec.classes == ["road", "car", "person"] and spec.colors[1] == (64, 0, 128)
    assert spec.ignore_colors == [(0, 0, 0)] and spec.ignore_index == 100 and spec.mask_format == "index"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": []}, '"classes" must be a non-empty list'),
        ({"classes": [{"name": "a"}]}, r'classes\[0\] must be \{"name": str, "color": \[r, g, b\]\}'),
        ({"classes": [{"name": "a", "color": [1, 2]}]}, r"classes\[0\].color must be \[r, g, b\] with integers 0-255"),
        (
            {"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [1, 2, 3]}]},
            "the same colour is listed twice",
        ),
        ({"ignore_index": 1}, r'"ignore_index" must be an integer in \[3, 255\]'),
        ({"mask_format": "jpeg"}, '"mask_format" must be one of auto, color, index'),
        ({"ignore_colors": [[0, 0, 0]]}, 'give "ignore_color" or "ignore_colors", not both'),
    ],
)
def test_bad_description_fields_name_file_and_field(tmp_path, change, message):
    write_description(tmp_path, **change)
    with pytest.raises(DatasetError, match=f"classes.json: {message}"):
        load_dataset_spec(tmp_path)


def test_unreadable_or_missing_description_file(tmp_path):
    (tmp_path / "classes.json").write_text("{not json")
    with pytest.raises(DatasetError, match="classes.json: not a readable JSON file"):
        load_dataset_spec(tmp_path)
    with pytest.raises(DatasetError, match="other.json: dataset description file not found"):
        load_dataset_spec(tmp_path, tmp_path / "other.json")


@pytest.mark.slow
def test_three_class_dataset_trains_end_to_end(tmp_path):
    colors = [(128, 64, 128), (64, 0, 128), (64, 64, 0)]
    data = make_dataset(
        tmp_path / "street",
        n_train=6,
        n_valid=3,
        size=(70, 56),
        class_ids=(1, 2),
        colors=colors,
        void_color=(0, 0, 0),
        seed=2,
    )
    write_description(data)
    out = tmp_path / "run"
    result = run_script(
        "train.py",
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "3",
        "--out-dir",
        out,
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 classes from" in result.stdout
    assert any(line.startswith("road ") for line in result.stdout.splitlines())  # the per-class table
    checkpoint = load_checkpoint(out / "final_model.pth")
    assert checkpoint["model_info"]["classes"] == ["road", "car", "person"]
    assert checkpoint["model"]["head.classifier.weight"].shape[0] == 3


def make_devkit(root, stems=("2007_000001", "2007_000002", "2007_000003", "2007_000004", "2007_000005", "2008_000009")):
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in stems:
        cv2.imwrite(str(voc / "JPEGImages" / f"{stem}.jpg"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    for stem in stems[:5]:
        index = rng.choice([0, 1, 15, 255], size=(40, 50)).astype(np.uint8)
        palette_png(index, voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(stems[:3]) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(stems[3:5]) + "\n")
    return root / "VOCdevkit"


@pytest.mark.slow
def test_voc_tar_conversion(tmp_path):
    devkit = make_devkit(tmp_path / "src")
    with tarfile.open(tmp_path / "VOCtrainval_11-May-2012.tar", "w") as tar:
        tar.add(devkit, arcname="VOCdevkit")
    out = tmp_path / "input" / "voc"
    stale = tmp_path / "input" / f".voc.tmp-{socket.gethostname()}-{dead_pid()}-abcd1234"  # a conversion killed midway
    (stale / "train_images").mkdir(parents=True)
    result = run_script("prepare_voc.py", "--source", tmp_path / "VOCtrainval_11-May-2012.tar", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Removed .voc.tmp-" in result.stdout
    assert "Wrote 3 training and 2 validation pairs" in result.stdout
    assert sorted(p.name for p in (out / "train_images").iterdir()) == [
        "2007_000001.jpg",
        "2007_000002.jpg",
        "2007_000003.jpg",
    ]
    assert sorted(p.name for p in (out / "valid_labels").iterdir()) == ["2007_000004.png", "2007_000005.png"]
    assert Image.open(out / "valid_labels" / "2007_000004.png").mode == "P"  # official masks copied as they are
    assert [p.name for p in out.parent.iterdir()] == ["voc"]  # no staging folder left
    again = run_script("prepare_voc.py", "--source", tmp_path / "VOCtrainval_11-May-2012.tar", "--out", out)
    assert again.returncode == 1 and "already exists and is not empty" in again.stderr


@pytest.mark.slow
def test_extracted_devkit_with_sbd_augmented_masks_trains(tmp_path):
    devkit = make_devkit(tmp_path / "src")
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    for stem in ("2007_000001", "2007_000004", "2008_000009", "2011_999999"):  # a val stem, one without image
        Image.fromarray(np.random.default_rng(1).choice([0, 7, 255], size=(40, 50)).astype(np.uint8)).save(
            aug / f"{stem}.png"
        )
    out = tmp_path / "voc_aug"
    result = run_script("prepare_voc.py", "--source", devkit, "--aug-masks", aug, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    # train = augmented masks minus the validation list, where the image exists
    assert sorted(p.stem for p in (out / "train_labels").iterdir()) == ["2007_000001", "2008_000009"]
    assert Image.open(out / "train_labels" / "2008_000009.png").mode == "L"
    trained = run_script(
        "train.py",
        "--data-dir",
        out,
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "2",
        "--out-dir",
        tmp_path / "run",
        *OFFLINE,
    )  # palette and index masks side by side
    assert trained.returncode == 0, trained.stderr[-2000:]


@pytest.mark.slow
def test_prepare_voc_errors(tmp_path):
    result = run_script("prepare_voc.py", "--source", tmp_path)
    assert result.returncode == 1 and "no ImageSets/Segmentation below it" in result.stderr
    (tmp_path / "x.tar").write_bytes(b"not a tar")
    result = run_script("prepare_voc.py", "--source", tmp_path / "x.tar")
    assert result.returncode == 1 and "not a readable tar archive" in result.stderr
