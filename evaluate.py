"""Score a checkpoint on a split at each image's original resolution, as papers report segmentation
(and Meta's depth heads on an RGB-D folder, as depth papers report it).

    python evaluate.py --model outputs/transfer_learning/best_model_iou.pth --split valid
    python evaluate.py --model ... --mode slide --scales 0.75 1.0 1.25 --flip     # the DINOv2 paper's "+ms"
    python evaluate.py --model ... --images DIR --labels DIR                      # any folder pair
    python evaluate.py --head-weights nyu_linear4 --data-dir input/nyu            # valid_images/ + valid_depth/

Prints pixel accuracy, mIoU, mean class accuracy, frequency-weighted IoU and a per-class table
(and, with --article-metric, the reference article's per-batch mIoU on the same predictions); writes
eval_<model file>_<split>_<mode>.json and confusion_<...>.png next to the checkpoint (or into
--out-dir): e.g. eval_best_model_iou.pth_valid_whole-644x644.json; the name says which file (.pth or
.onnx), which split and which mode, so evaluating another of them never replaces a report. Runs
under torchrun: each process scores a shard, counts are all-reduced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import config
from cli import (
    ArgumentParser,
    add_device_args,
    add_mode_args,
    add_model_args,
    add_renamed_flag,
    at_least,
    mode_from_args,
    output_folder,
    run_cli,
)
from dinokit.runs.run_folder import claim_output_folder
from dinokit.tasks.task import Task
from dinokit.writing import write_json
from evaluation import evaluate_pairs
from inference import Predictor, load_predictor
from utils import init_distributed, is_main_process, on_main_process


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=None,
        help=f"dataset root laid out like the training data (default: the folder the model was trained on, else "
        f"{config.DATA_DIR})",
    )
    data.add_argument(
        "--split", default="valid", help="NAME: score NAME_images/ against NAME_labels/ (valid, train, test, ...)"
    )
    data.add_argument("--images", default=None, metavar="DIR", help="score this image folder instead (with --labels)")
    data.add_argument("--labels", default=None, metavar="DIR", help="the masks of --images, paired by file stem")
    data.add_argument("--workers", type=at_least(0), default=2, help="DataLoader processes decoding images")
    add_mode_args(parser)
    run = parser.add_argument_group("run")
    run.add_argument(
        "--out-dir", default=None, help="where eval_*.json and confusion_*.png go (default: beside the checkpoint)"
    )
    add_device_args(run)
    run.add_argument(
        "--article-metric",
        action="store_true",
        help="also print the reference article's metric: per-batch mIoU (absent classes count 0), averaged over "
        "batches",
    )
    run.add_argument(
        "--article-batch",
        type=at_least(1),
        default=2,
        help="images per batch of --article-metric (the article trained with 2)",
    )
    add_renamed_flag(run, "--seed-metric", "--article-metric", dest="article_metric", flag=True)
    add_renamed_flag(run, "--seed-batch", "--article-batch", dest="article_batch", type=at_least(1))
    return parser


def split_pairs(args: argparse.Namespace, task: Task) -> tuple[str, list[tuple[Path, Path]]]:
    """(name, pairs) of the split to score: --images with --labels, else <data-dir>/<split>_images with
    the task's targets beside them (<split>_labels; a depth model: <split>_depth)."""
    if (args.images is None) != (args.labels is None):
        raise ValueError("--images and --labels go together")
    if args.images is None:
        return args.split, task.find_pairs(args.data_dir, args.split)
    return Path(args.images).name, task.pair_folders(Path(args.images), Path(args.labels))


def data_folder(args: argparse.Namespace, predictor: Predictor) -> str:
    """--data-dir, else the folder the checkpoint was trained on (said), else config.DATA_DIR."""
    if args.data_dir is not None or args.images is not None:
        return args.data_dir or str(config.DATA_DIR)
    trained_on = predictor.info.get("data_dir")
    if trained_on and Path(trained_on).is_dir():
        print(f"Data: {trained_on} (the model's training data; --data-dir scores another)")
        return trained_on
    return str(config.DATA_DIR)


def main(args: argparse.Namespace) -> None:
    mode = mode_from_args(args)
    device = init_distributed(args.device)
    predictor = load_predictor(args, str(device), mode)  # its task says which split folders to read
    task, info = predictor.task, predictor.info
    args.data_dir = data_folder(args, predictor)
    split, pairs = split_pairs(args, task)
    out_dir = output_folder(args.out_dir) if args.out_dir else default_report_folder(args)
    # before the work: a folder that cannot take the report fails now, on every process
    on_main_process(lambda: claim_output_folder(out_dir, beside=args.model, inputs=[image for image, _ in pairs]))
    label = f"{split} split of {Path(args.model or args.head_weights).name}"
    data = task.evaluation_data(info, args.data_dir, pairs, label)
    print(
        f"Scoring {label} ({len(pairs)} images, {task.describe_data(data)}) at original resolution; "
        f"{predictor.mode.describe()}; {predictor.engine}"
    )
    result = evaluate_pairs(predictor, pairs, data, workers=args.workers, article_batch=args.article_batch)
    for line in result.lines():
        print(line)
    if args.article_metric:
        print(task.article_metric_line(result))
    if is_main_process():
        name = f"{report_stem(args, out_dir)}_{split}_{predictor.mode.tag()}"
        report = result.report(
            checkpoint=str(args.model or args.head_weights), split=split, mode=predictor.mode.describe()
        )
        write_json(out_dir / f"eval_{name}.json", report)
        title = f"{label} ({predictor.mode.describe()}): {result.headline()}"
        figures = task.report_figures(result, out_dir, name, title)
        figures += task.write_predictions(result, info, out_dir, split)
        print(f"Wrote {out_dir / f'eval_{name}.json'}" + "".join(f" and {figure.name}" for figure in figures))


def default_report_folder(args: argparse.Namespace) -> Path:
    """Beside the checkpoint; for Meta's released head (no run folder), outputs/evaluate/."""
    return Path(args.model).parent if args.model else config.OUTPUT_DIR / "evaluate"


def report_stem(args: argparse.Namespace, out_dir: Path) -> str:
    """The model's part of a report's name: its file name, with its run folder's name in front when
    the report goes elsewhere (two runs' best_model_iou.pth scored into one --out-dir keep both reports)."""
    model = Path(args.model or args.head_weights)
    if not model.is_file() or out_dir.resolve() == model.resolve().parent:
        return model.name
    return f"{model.resolve().parent.name}-{model.name}"


if __name__ == "__main__":
    run_cli(main, get_args_parser())
