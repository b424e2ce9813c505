"""Training data that is wrong is named before training: pixel formats read by one rule, masks that
fit no reading or two, orientation, damaged files, strict dataset descriptions, unpaired files,
splits without labels. Each a one-line error naming the file (or a conversion said aloud)."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from checkpoint import load_checkpoint
from datasets import build_datasets, find_pairs
from dinokit.data.image_files import DatasetError, list_image_files, read_image
from dinokit.data.labels import ColorMap, load_dataset_spec, parse_dataset_spec, read_mask
from dinokit.data.synthetic import make_dataset
from tests.conftest import OFFLINE, assert_nothing_written, one_line_error, run_script, train_cli

SIXTEEN = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], dtype=np.uint16)
HIGH_BYTE = (SIXTEEN >> 8).astype(np.uint8)  # [[0, 0, 1, 15], [128, 156, 255, 255]]
GRAY = np.array([[0, 1, 100], [128, 254, 255]], dtype=np.uint8)
RGB = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], dtype=np.uint8)


def gray3(gray):
    return np.repeat(gray[:, :, None], 3, axis=2)


def save_rgb16(path):
    rgb16 = np.stack([SIXTEEN, SIXTEEN[::-1], 65535 - SIXTEEN], axis=2)
    cv2.imwrite(str(path), rgb16[:, :, ::-1])  # OpenCV writes 48-bit PNG/TIFF from BGR uint16
    return (rgb16 >> 8).astype(np.uint8)


def palette_image():
    image = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    image.putpalette([200, 10, 20, 30, 140, 50, 7, 8, 250] + [0] * (256 * 3 - 9))
    return image


def rgba_image():
    alpha = np.array([[255, 0], [128, 0]], dtype=np.uint8)  # colour kept where fully transparent too
    return Image.fromarray(np.dstack([RGB, alpha]), mode="RGBA")


def cmyk_image():
    pixels = np.array([[[255, 0, 0, 0], [0, 0, 0, 255]], [[0, 0, 0, 0], [0, 255, 255, 0]]], dtype=np.uint8)
    return Image.fromarray(pixels, mode="CMYK")


@pytest.mark.parametrize(
    "name, write, expected",
    [
        ("gray.png", lambda p: Image.fromarray(GRAY, mode="L").save(p), gray3(GRAY)),
        (
            "bilevel.png",
            lambda p: Image.fromarray(GRAY > 127).convert("1").save(p),
            gray3(np.where(GRAY > 127, 255, 0).astype(np.uint8)),
        ),
        (
            "palette.png",
            lambda p: palette_image().save(p),
            np.array([[[200, 10, 20], [30, 140, 50]], [[7, 8, 250], [30, 140, 50]]]),
        ),
        ("rgba.png", lambda p: rgba_image().save(p), RGB),
        ("gray_alpha.png", lambda p: Image.fromarray(np.dstack([GRAY, GRAY[::-1]]), mode="LA").save(p), gray3(GRAY)),
        ("gray16.png", lambda p: Image.fromarray(SIXTEEN).save(p), gray3(HIGH_BYTE)),
        ("gray16.tif", lambda p: Image.fromarray(SIXTEEN).save(p), gray3(HIGH_BYTE)),
        ("int32.tif", lambda p: Image.fromarray(SIXTEEN.astype(np.int32), mode="I").save(p), gray3(HIGH_BYTE)),
        ("float.tif", lambda p: Image.fromarray(GRAY.astype(np.float32) / 255, mode="F").save(p), gray3(GRAY)),
        (
            "cmyk.tif",
            lambda p: cmyk_image().save(p),
            np.array([[[0, 255, 255], [0, 0, 0]], [[255, 255, 255], [255, 0, 0]]]),
        ),
    ],
)
def test_every_pixel_format_is_read_by_one_rule(tmp_path, name, write, expected):
    write(tmp_path / name)
    assert np.array_equal(read_image(tmp_path / name), expected)


def test_sixteen_bit_colour_files_follow_the_same_rule(tmp_path):
    for name in ("rgb16.png", "rgb16.tif"):
        expected = save_rgb16(tmp_path / name)
        assert np.array_equal(read_image(tmp_path / name), expected), name


@pytest.mark.parametrize(
    "name, write, message",
    [
        (
            "hdr.tif",
            lambda p: Image.fromarray(np.array([[0.0, 2.5]], np.float32), mode="F").save(p),
            "a float image with values 0..2.5; float images are read as intensities in 0..1",
        ),
        ("nan.tif", lambda p: Image.fromarray(np.array([[0.5, np.nan]], np.float32), mode="F").save(p), "and NaN/inf"),
        (
            "int32.tif",
            lambda p: Image.fromarray(np.array([[0, 70000]], np.int32), mode="I").save(p),
            "a 32-bit integer image with values 0..70000",
        ),
    ],
)
def test_pixel_values_outside_the_rule_are_refused_naming_the_file(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(DatasetError, match="^" + str(tmp_path / name).replace("\\", "\\\\") + ": ") as caught:
        read_image(tmp_path / name)
    assert message in str(caught.value)


@pytest.mark.slow
def test_a_sixteen_bit_image_is_segmented_as_its_eight_bit_copy(checkpoint, tmp_path):
    """infer_image.py read 16-bit PNGs as pure white (convert("RGB") clips every value to 255)."""
    ramp = (np.linspace(0, 65535, 90 * 120).reshape(90, 120)).astype(np.uint16)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "scan.png")
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "b" / "scan.png")
    for name in ("a", "b"):
        result = run_script(
            "infer_image.py", "--input", tmp_path / name, "--model", checkpoint, "--out-dir", tmp_path / f"out_{name}"
        )
        assert result.returncode == 0, result.stderr[-2000:]
    drawn = cv2.imread(str(tmp_path / "out_a" / "scan.jpg"))
    assert np.array_equal(drawn, cv2.imread(str(tmp_path / "out_b" / "scan.jpg")))
    assert (tmp_path / "out_a" / "scan_mask.png").read_bytes() == (tmp_path / "out_b" / "scan_mask.png").read_bytes()


@pytest.mark.slow
def test_training_data_in_a_refused_format_stops_before_training(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_valid=2, size=(64, 48), seed=3)
    first = sorted((data / "train_images").iterdir())[0]
    Image.fromarray(np.full((48, 64), 3.0, np.float32), mode="F").save(first.with_suffix(".tif"))
    first.unlink()
    result = run_script(
        "train.py", "--data-dir", data, "--out-dir", tmp_path / "run", "--epochs", "1", "--imgsz", "56", "42", *OFFLINE
    )
    one_line_error(result, f"{first.with_suffix('.tif')}: a float image with values 3..3")
    assert "EPOCH" not in result.stdout


BINARY_CLASSES = {"classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "defect", "color": [255, 255, 255]}]}


def make_binary_dataset(root, classes=BINARY_CLASSES, n_train=4, n_valid=2):
    """Single-channel 0/255 masks (a white square on black), the commonest custom dataset."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_train), ("valid", n_valid)):
        (root / f"{split}_images").mkdir(parents=True)
        (root / f"{split}_labels").mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((42, 56), np.uint8)
            mask[10:30, 15 + i : 40 + i] = 255
            image = rng.integers(0, 80, (42, 56, 3), dtype=np.uint8)
            image[mask > 0] = 220
            cv2.imwrite(str(root / f"{split}_images" / f"{i}.jpg"), image)
            cv2.imwrite(str(root / f"{split}_labels" / f"{i}.png"), mask)
    (root / "classes.json").write_text(json.dumps(classes))
    return root


@pytest.mark.slow
def test_binary_masks_with_a_white_class_are_read_as_that_class(tmp_path):
    data = make_binary_dataset(tmp_path / "binary")
    train, _, check = build_datasets(data, (56, 42), load_dataset_spec(data))
    assert check.spec.mask_format == "color" and "value 255 is the ignore index" in check.notes[0]
    _, mask = train.load_pair(0)
    assert set(np.unique(mask)) == {0, 1}  # the defect is class 1, not "ignore"
    result = run_script(
        "train.py",
        "--data-dir",
        data,
        "--out-dir",
        tmp_path / "run",
        "--epochs",
        "1",
        "--imgsz",
        "56",
        "42",
        "--batch",
        "2",
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "single-channel masks are read as gray colours" in result.stdout
    assert load_checkpoint(tmp_path / "run" / "last.pth")["model_info"]["mask_format"] == "color"


def test_explicit_index_format_keeps_255_as_ignore(tmp_path):
    data = make_binary_dataset(tmp_path / "binary", dict(BINARY_CLASSES, mask_format="index"))
    _, _, check = build_datasets(data, (56, 42), load_dataset_spec(data))
    assert check.spec.mask_format == "index" and not check.notes


def test_masks_that_fit_both_readings_differently_are_refused_with_the_fix(tmp_path):
    swapped = {"classes": [{"name": "a", "color": [1, 1, 1]}, {"name": "b", "color": [0, 0, 0]}]}
    data = make_binary_dataset(tmp_path / "binary", swapped)
    for path in (data / "train_labels").iterdir():
        cv2.imwrite(str(path), (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0).astype(np.uint8))  # values 0/1
    for path in (data / "valid_labels").iterdir():
        cv2.imwrite(str(path), (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) > 0).astype(np.uint8))
    with pytest.raises(DatasetError, match='both as class indices and as gray colours.*set "mask_format"'):
        build_datasets(data, (56, 42), load_dataset_spec(data))


def exif_jpeg(path, pixels, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)


def test_images_and_masks_follow_one_orientation_rule(tmp_path):
    raw = np.zeros((40, 60, 3), np.uint8)
    raw[:, :30] = 255  # left half white as stored
    exif_jpeg(tmp_path / "photo.jpg", raw, orientation=3)  # "rotate 180 to display"
    assert read_image(tmp_path / "photo.jpg")[:, 45:].mean() > 200  # displayed: the white half is on the right
    mask = np.zeros((40, 60), np.uint8)
    mask[:, :30] = 1
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(mask).save(tmp_path / "mask.png", exif=exif.tobytes())
    assert read_mask(tmp_path / "mask.png", ColorMap([(0, 0, 0), (1, 1, 1)]))[:, 45:].min() == 1  # the same rule


def test_a_mask_drawn_on_the_unrotated_pixels_is_explained(dataset):
    image = cv2.cvtColor(cv2.imread(str(dataset / "train_images" / "train_0000.jpg")), cv2.COLOR_BGR2RGB)
    exif_jpeg(dataset / "train_images" / "train_0000.jpg", image, orientation=6)  # displayed 48x64
    with pytest.raises(
        DatasetError, match="train_0000.png: mask is 64x48 but its image train_0000.jpg is 48x64 after its EXIF"
    ):
        build_datasets(dataset, (56, 42))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_jpeg_stops_before_training_naming_the_file(dataset, tmp_path, damage):
    path = dataset / "train_images" / "train_0004.jpg"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)  # libjpeg: "Corrupt JPEG data", decoded as garbage
    path.write_bytes(bytes(data))
    assert cv2.imread(str(path)) is not None  # OpenCV (and PIL) would have trained on it
    result = train_cli(dataset, tmp_path / "out")
    one_line_error(result, "train_0004.jpg: not a readable image")
    assert "EPOCH" not in result.stdout


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"classes": [{"name": "a", "color": [1, 2, 3]}], "ignore_colour": [0, 0, 0]},
            "unknown key 'ignore_colour'.*did you mean 'ignore_color'",
        ),
        ({"classes": [{"name": "a", "color": [1, 2, 3], "colour": [1, 2, 3]}]}, r"classes\[0\]: unknown key 'colour'"),
        (
            {"classes": [{"name": "a", "color": [1, 2, 3]}, {"name": "a", "color": [4, 5, 6]}]},
            r"classes\[1\].name 'a' is already the name of classes\[0\]",
        ),
        ({"classes": [{"name": "a", "color": [True, 0, 0]}]}, r"classes\[0\].color must be \[r, g, b\] with integers"),
        ({"classes": [{"name": "a", "color": [1.0, 0, 0]}]}, r"classes\[0\].color must be \[r, g, b\] with integers"),
        ({"classes": [{"name": "a", "color": [1, 2, 3]}], "ignore_index": True}, '"ignore_index" must be an integer'),
    ],
)
def test_dataset_descriptions_are_validated_strictly(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_dataset_spec(raw, "classes.json")


def test_documentation_keys_are_allowed():
    spec = parse_dataset_spec(
        {
            "classes": [{"name": "a", "color": [1, 2, 3]}],
            "source": "CamVid",
            "counts": {"train": 3},
            "_comment": "anything",
        },
        "classes.json",
    )
    assert spec.classes == ["a"]


def test_strict_description_through_train_py(dataset, tmp_path):
    (dataset / "classes.json").write_text(
        json.dumps({"classes": [{"name": "a", "color": [0, 0, 0]}], "ignore_colour": [1, 1, 1]})
    )
    one_line_error(train_cli(dataset, tmp_path / "out"), "classes.json: unknown key 'ignore_colour'")


def test_two_files_of_one_name_are_an_error_and_hidden_files_are_skipped(dataset, tmp_path):
    (dataset / "train_images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (dataset / "train_images" / "._train_0000.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    assert len(find_pairs(dataset, "train")) == 6
    cv2.imwrite(str(dataset / "train_images" / "train_0001.png"), np.zeros((48, 64, 3), np.uint8))
    one_line_error(train_cli(dataset, tmp_path / "out"), "train_0001.jpg and train_0001.png")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "a.png"):
        cv2.imwrite(str(folder / name), np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(DatasetError, match="a.jpg and a.png"):
        list_image_files(folder)


def test_a_validation_split_without_labelled_pixels_stops_before_training(dataset, tmp_path):
    for path in (dataset / "valid_labels").iterdir():
        cv2.imwrite(str(path), np.full((48, 64, 3), (192, 224, 224), np.uint8))  # all void (BGR)
    result = train_cli(dataset, tmp_path / "out")
    one_line_error(result, "the valid split has no labelled pixel")
    assert "EPOCH" not in result.stdout


def test_empty_split_folder(dataset, tmp_path):
    for f in (dataset / "valid_images").iterdir():
        f.unlink()
    result = train_cli(dataset, tmp_path / "out")
    one_line_error(result, "valid_images: no image files")
    assert_nothing_written(tmp_path / "out")


def test_image_without_mask_is_listed(dataset, tmp_path):
    (dataset / "train_labels" / "train_0002.png").unlink()
    one_line_error(train_cli(dataset, tmp_path / "out"), "no mask for train_0002.jpg")


def test_image_and_mask_of_different_sizes_fail_before_training(dataset, tmp_path):
    mask_path = dataset / "train_labels" / "train_0001.png"
    cv2.imwrite(str(mask_path), cv2.resize(cv2.imread(str(mask_path)), (60, 48), interpolation=cv2.INTER_NEAREST))
    result = train_cli(dataset, tmp_path / "out")
    one_line_error(result, "train_0001.png: mask is 60x48 but its image train_0001.jpg is 64x48")
    assert "EPOCH" not in result.stdout


def test_garbage_image_file(dataset, tmp_path):
    (dataset / "valid_images" / "valid_0000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    one_line_error(train_cli(dataset, tmp_path / "out"), "valid_0000.jpg: not a readable image")


def test_truncated_mask_is_found_before_training(dataset, tmp_path):
    mask_path = dataset / "train_labels" / "train_0003.png"
    data = mask_path.read_bytes()
    mask_path.write_bytes(data[: len(data) // 3])  # header intact, pixel data cut
    result = train_cli(dataset, tmp_path / "out")
    one_line_error(result, "train_0003.png: not a readable image")
    assert "EPOCH" not in result.stdout


@pytest.mark.slow
def test_unknown_mask_colour_in_validation_is_found_before_training(dataset, tmp_path):
    mask_path = dataset / "valid_labels" / "valid_0001.png"
    mask = cv2.imread(str(mask_path))
    mask[:2, :5] = (3, 2, 1)  # BGR on disk: RGB (1, 2, 3)
    cv2.imwrite(str(mask_path), mask)
    result = train_cli(dataset, tmp_path / "out", "--workers", "1")
    one_line_error(result, "valid_0001.png: colours not in the class palette", "(1,2,3) x10")
    assert "EPOCH" not in result.stdout  # not after a whole training epoch


def test_an_error_inside_a_dataloader_worker_is_one_line(dataset, tmp_path):
    from datasets import SegmentationDataset, make_loader
    from dinokit.data.labels import VOC
    from dinokit.data.resize import eval_transform
    from dinokit.errors import one_line

    pairs = [(dataset / "valid_images" / "valid_0000.jpg", dataset / "valid_labels" / "missing.png")]
    loader = make_loader(
        SegmentationDataset(pairs, VOC.color_map(), eval_transform((56, 42))), 1, shuffle=False, workers=1
    )
    with pytest.raises(Exception) as excinfo:
        next(iter(loader))
    assert one_line(excinfo.value) == f"{pairs[0][1]}: file not found"


@pytest.mark.slow
def test_grayscale_and_rgba_images_are_converted(dataset, tmp_path):
    image = cv2.imread(str(dataset / "train_images" / "train_0000.jpg"))
    cv2.imwrite(str(dataset / "train_images" / "train_0000.jpg"), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    (dataset / "train_images" / "train_0001.jpg").unlink()
    rgba = cv2.cvtColor(cv2.imread(str(dataset / "train_labels" / "train_0001.png")), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(dataset / "train_images" / "train_0001.png"), rgba)
    result = train_cli(dataset, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
