import cv2
import numpy as np
import pytest
import torch

import config
from datasets import SegmentationDataset, find_pairs
from dinokit.data.augmentations import article_train_transform, seed_augmentation
from dinokit.data.image_files import DatasetError
from dinokit.data.labels import ColorMap
from dinokit.data.resize import eval_transform, round_to_patch


@pytest.fixture
def voc_map():
    return ColorMap(config.COLORS, config.IGNORE_COLORS, config.IGNORE_INDEX)


def test_voc_palette_encodes_every_class_and_void(voc_map):
    mask = np.array([config.COLORS + [config.IGNORE_COLORS[0]]], dtype=np.uint8)  # 1 x 22 pixels
    index = voc_map.encode(mask)
    assert index.dtype == np.uint8
    assert index.tolist() == [list(range(21)) + [255]]
    assert config.CLASSES[index[0, 20]] == "tv/monitor" and tuple(mask[0, 20]) == (0, 64, 128)


def test_decode_inverts_encode(voc_map):
    rng = np.random.default_rng(0)
    index = rng.choice(list(range(21)) + [255], size=(7, 9)).astype(np.uint8)
    assert np.array_equal(voc_map.encode(voc_map.decode(index)), index)


def test_unknown_colour_names_file_colour_and_count(voc_map):
    mask = np.zeros((4, 4, 3), dtype=np.uint8)
    mask[0, :3] = (1, 2, 3)
    with pytest.raises(DatasetError, match=r"a\.png: colours not in the class palette.*\(1,2,3\) x3"):
        voc_map.encode(mask, "a.png")


def test_palette_png_decodes_to_the_same_classes(tmp_path, voc_map):
    # Official VOC masks are palette ('P') PNGs with index 255 = void; OpenCV expands them to colours.
    from PIL import Image

    index = np.array([[0, 15, 255], [1, 20, 0]], dtype=np.uint8)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:21] = config.COLORS
    palette[255] = config.IGNORE_COLORS[0]
    img = Image.fromarray(index)  # "L"; putpalette turns it into a "P" image
    img.putpalette(palette.flatten().tolist())
    img.save(tmp_path / "m.png")
    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "m.png")), cv2.COLOR_BGR2RGB)
    assert np.array_equal(voc_map.encode(rgb), index)


def test_duplicate_palette_colour_is_rejected():
    with pytest.raises(ValueError, match="twice"):
        ColorMap([(0, 0, 0), (1, 1, 1)], ignore_colors=[(1, 1, 1)])


@pytest.mark.parametrize("size, expected", [((640, 640), (644, 644)), ((644, 518), (644, 518)), ((1, 15), (14, 28))])
def test_round_to_patch(size, expected):
    assert round_to_patch(size) == expected


def test_pairs_by_stem_and_reports_unpaired(tiny_dataset, tmp_path):
    pairs = find_pairs(tiny_dataset, "train")
    assert len(pairs) == 12 and all(i.stem == m.stem and i.suffix == ".jpg" and m.suffix == ".png" for i, m in pairs)
    for split in ("train_images", "train_labels"):
        (tmp_path / split).mkdir()
    cv2.imwrite(str(tmp_path / "train_images" / "a.jpg"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "train_images" / "b.jpg"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "train_labels" / "a.png"), np.zeros((4, 4, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "train_labels" / "c.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match="no mask for b.jpg; no image for c.png"):
        find_pairs(tmp_path, "train")
    with pytest.raises(DatasetError, match="valid_images: folder not found"):
        find_pairs(tmp_path, "valid")


def test_dataset_item_is_normalised_tensor_and_index_mask(tiny_dataset, voc_map):
    dataset = SegmentationDataset(find_pairs(tiny_dataset, "valid"), voc_map, eval_transform((126, 98)))
    image, mask = dataset[0]
    assert image.shape == (3, 98, 126) and image.dtype == torch.float32
    assert mask.shape == (98, 126) and mask.dtype == torch.int64
    assert -3 < image.mean() < 3 and image.std() > 0.1  # ImageNet-normalised, not 0..255
    assert set(mask.unique().tolist()) <= set(range(21)) | {255}
    assert 255 in mask.unique()  # the void outline survives resizing (nearest neighbour)


def test_mismatched_image_and_mask_sizes_name_the_mask(tmp_path, voc_map):
    cv2.imwrite(str(tmp_path / "x.jpg"), np.zeros((10, 12, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((10, 10, 3), np.uint8))
    dataset = SegmentationDataset([(tmp_path / "x.jpg", tmp_path / "x.png")], voc_map, eval_transform((14, 14)))
    with pytest.raises(DatasetError, match=r"x\.png: mask is 10x10 but its image x\.jpg is 12x10"):
        dataset[0]


def test_augmentation_fills_rotated_border_with_ignore_not_background():
    transform = article_train_transform((56, 42), ignore_index=255)
    image = np.full((60, 80, 3), 128, np.uint8)
    mask = np.ones((60, 80), np.uint8)  # every pixel class 1
    seen = set()
    for index in range(20):
        seed_augmentation(transform, 0, 0, index)
        out = transform(image=image, mask=mask)
        assert out["image"].shape == (42, 56, 3) and out["mask"].shape == (42, 56)
        seen |= set(np.unique(out["mask"]).tolist())
    assert seen == {1, 255}  # rotation happened at least once; its border is ignored, never class 0


def test_augmentation_depends_only_on_seed_epoch_and_index(tiny_dataset, voc_map):
    dataset = SegmentationDataset(find_pairs(tiny_dataset, "train"), voc_map, article_train_transform((56, 42)), seed=3)
    first = [dataset[i][0] for i in range(6)]
    assert all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))  # same epoch: same views
    dataset.epoch = 1
    assert any(not torch.equal(a, dataset[i][0]) for i, a in enumerate(first))  # next epoch: new views


def test_augmentation_decisions_are_independent():
    # albumentations' set_random_seed seeds every transform alike, so its flip and brightness draws
    # coincide; ours must not: some brightness changes come without a flip.
    import albumentations as A

    transform = A.Compose([A.HorizontalFlip(p=0.5), A.RandomBrightnessContrast(p=0.2)])
    image = np.tile(np.arange(8, dtype=np.uint8) * 20, (4, 1))[..., None].repeat(3, -1)
    outcomes = set()
    for seed in range(200):
        seed_augmentation(transform, seed)
        out = transform(image=image)["image"]
        flipped = bool(out[0, -1, 0] < out[0, 0, 0])
        changed = not (np.array_equal(out, image) or np.array_equal(out, image[:, ::-1]))
        outcomes.add((flipped, changed))
    assert outcomes == {(False, False), (True, False), (False, True), (True, True)}


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_every_script_reads_a_damaged_jpeg_as_the_training_check_does(tmp_path, damage):
    """One rule: the JPEG that training refuses is refused by read_image (inference, indexing,
    classification, the demo), not decoded as grey or garbled pixels."""
    from dinokit.data.image_files import read_image, verify_image

    path = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    cv2.imwrite(str(path), pixels)
    assert read_image(path).shape == (96, 128, 3)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
    path.write_bytes(bytes(data))
    assert cv2.imread(str(path)) is not None  # what OpenCV (and PIL) would have used
    for reader in (verify_image, read_image):
        with pytest.raises(DatasetError, match="photo.jpg: not a readable image"):
            reader(path)
