"""Project-wide defaults: paths, the Pascal VOC 2012 classes and colours, normalisation, training defaults.

Everything here is a default; `train.py` flags override it and checkpoints carry the values
a model was trained with, so inference never has to read this file to interpret a model.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "input" / "voc_2012_segmentation_data"
OUTPUT_DIR = ROOT / "outputs"

# Pascal VOC 2012: 20 object classes plus background, in the official index order.
CLASSES: list[str] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv/monitor",
]
# RGB colour of each class in the label PNGs (the standard VOC palette), same order as CLASSES.
COLORS: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (128, 0, 0),
    (0, 128, 0),
    (128, 128, 0),
    (0, 0, 128),
    (128, 0, 128),
    (0, 128, 128),
    (128, 128, 128),
    (64, 0, 0),
    (192, 0, 0),
    (64, 128, 0),
    (192, 128, 0),
    (64, 0, 128),
    (192, 0, 128),
    (64, 128, 128),
    (192, 128, 128),
    (0, 64, 0),
    (128, 64, 0),
    (0, 192, 0),
    (128, 192, 0),
    (0, 64, 128),
]
# Object borders and "difficult" regions: excluded from the loss and from every metric.
IGNORE_INDEX = 255
IGNORE_COLORS: list[tuple[int, int, int]] = [(224, 224, 192)]


# DINOv2 and DINOv3 (LVD-1689M) were trained on ImageNet-normalised inputs; DINOv3's satellite
# weights have their own (model_config.py), which a checkpoint records.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Training defaults (the seed article's reference run: 20 epochs, 640x640 -> 644x644, batch 2).
EPOCHS = 20
BATCH_SIZE = 2
IMG_SIZE = (640, 640)  # (width, height); rounded up to a multiple of the patch size (644 for /14, 640 for /16)
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-2
WORKERS = 4
SEED = 42

# The defaults of each `train.py --recipe`. "article": the reference article's run (above; named
# "seed" before, which still works with a deprecation line). "paper":
# the DINOv2 paper's linear-head protocol, as in Meta's mmseg configs (dinov2_vits14_voc2012_linear
# _config.py and siblings): AdamW lr 1e-3 / weight decay 1e-4, poly decay (power 1) after a
# 1500-step linear warmup, 40k steps of batch 16 on 518x518 crops (dinokit/data/augmentations.py), evaluated
# with sliding windows. "dinov3": Meta's DINOv3 linear protocol (dinov3/eval/segmentation/configs/
# config-ade20k-linear-training.yaml): 512 crops (rescale 0.5-2.0, flip), 40k steps of batch 16 (8 GPUs
# x 2), AdamW lr 1e-3 / weight decay 1e-3, WarmupOneCycleLR (1500 warmup steps, then cosine to 0),
# Dropout2d 0.1 before the head's BatchNorm, slide evaluation with 512 windows every 341 pixels.
# Flags given on the command line win; a resumed run keeps its checkpoint's.
RECIPES: dict[str, dict[str, object]] = {
    "article": {
        "epochs": EPOCHS,
        "steps": None,
        "batch": BATCH_SIZE,
        "imgsz": list(IMG_SIZE),
        "lr": LEARNING_RATE,
        "backbone_lr": None,
        "weight_decay": WEIGHT_DECAY,
        "scheduler": "multistep",
        "warmup_steps": 0,
        "head_dropout": 0.0,
        "layer_decay": 1.0,
        "mode": "whole",
    },
    "paper": {
        "epochs": None,
        "steps": 40000,
        "batch": 16,
        "imgsz": [518, 518],
        "lr": 1e-3,
        "backbone_lr": None,
        "weight_decay": 1e-4,
        "scheduler": "poly",
        "warmup_steps": 1500,
        "head_dropout": 0.0,
        "layer_decay": 1.0,
        "mode": "slide",
    },
    "dinov3": {
        "epochs": None,
        "steps": 40000,
        "batch": 16,
        "imgsz": [512, 512],
        "lr": 1e-3,
        "backbone_lr": None,
        "weight_decay": 1e-3,
        "scheduler": "onecycle",
        "warmup_steps": 1500,
        "head_dropout": 0.1,
        "layer_decay": 1.0,
        "mode": "slide",
    },
    # EoMT's (Kerssies et al. 2025; tue-mps/eomt configs, COCO panoptic at 640): AdamW 1e-4 for the
    # head and the backbone alike, weight decay 0.05, layer-wise decay 0.8 below the query blocks,
    # poly schedule after warm-up (theirs: 500 steps of the head alone, then 1000 of everything;
    # here one linear warm-up of 1500), 12 epochs of 16 (the small model: 24 at lr 2e-4), fine-tuned.
    # Augmentation: DINOv3's rescale + square crops (theirs: large-scale jitter 0.1-2.0).
    "eomt": {
        "epochs": 12,
        "steps": None,
        "batch": 16,
        "imgsz": [640, 640],
        "lr": 1e-4,
        "backbone_lr": 1e-4,
        "weight_decay": 0.05,
        "scheduler": "poly",
        "warmup_steps": 1500,
        "head_dropout": 0.0,
        "layer_decay": 0.8,
        "mode": "whole",
    },
}
