"""Export a trained checkpoint to one ONNX file that runs without PyTorch, at any image size.

    python export.py --model outputs/transfer_learning/best_model_iou.pth             # -> best_model_iou.onnx
    python export.py --model ... --int8 --out model_int8.onnx                          # int8 linear layers
    python infer_image.py --input input/inference_data/images --model outputs/transfer_learning/best_model_iou.onnx

The file takes a normalised image `[B, 3, H, W]` (float32: RGB / 255, minus mean, divided by std)
and returns logits `[B, C, H, W]` (with --argmax: class indices `[B, H, W]`); its metadata holds
the classes, colours, mean/std and training size. Before the file is written, onnxruntime's output
is compared with PyTorch's on random and real images at two sizes (one not a multiple of 14):
float32 must agree to 1e-3 in every logit and in >= 99.99 % of predicted pixels, or nothing is
written; fp16 and int8 print their agreement. Needs requirements-export.txt.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import config
from checkpoint import build_model_from_checkpoint, load_checkpoint
from cli import ArgumentParser, at_least, run_cli
from dinokit.data.image_files import image_paths, read_image
from dinokit.data.resize import check_imgsz, preprocess, round_to_patch
from dinokit.errors import UserError
from dinokit.prediction.deployment import (
    DEFAULT_OPSET,
    OPSETS,
    OnnxNetwork,
    export_network,
    opset_of,
    quantize_int8,
    require,
    to_float16,
    write_metadata,
)
from dinokit.runs.checkpoint_format import ModelDescription
from dinokit.runs.reports import format_bytes
from dinokit.runs.run_folder import claim_output_folder
from dinokit.tasks import task_of
from dinokit.tasks.task import Task
from dinokit.writing import temp_path

FP32_MAX_DIFFERENCE = 1e-3
FP32_MIN_AGREEMENT = 0.9999
SINGLE_FILE_LIMIT = 2**31  # protobuf cannot serialise a message over 2 GB: larger weights need ONNX external data


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint written by train.py, e.g. best_model_iou.pth")
    parser.add_argument("--out", default=None, help="the .onnx file to write (default: beside --model, named after it)")
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        choices=OPSETS,
        metavar="N",
        help=f"ONNX opset {OPSETS.start}..{OPSETS.stop - 1} (default {DEFAULT_OPSET}: fused attention, "
        "onnxruntime >= 1.23; 18 for older runtimes)",
    )
    parser.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="any batch, height and width (default); --no-dynamic: exactly --imgsz, batch 1",
    )
    parser.add_argument(
        "--imgsz",
        type=int,
        nargs=2,
        default=None,
        metavar=("W", "H"),
        help="--no-dynamic: the one input size (default: the training size); --dynamic: the traced sample",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16", action="store_true", help="float16 weights and arithmetic (for GPUs; inputs stay float32)"
    )
    precision.add_argument(
        "--int8", action="store_true", help="dynamic int8 quantisation of the linear layers (CPU speed)"
    )
    parser.add_argument(
        "--argmax", action="store_true", help="output class indices [B, H, W] (uint8) instead of logits"
    )
    parser.add_argument(
        "--check-images",
        default=None,
        metavar="PATH",
        help="real images (a folder or a file) for the self-check (default: the training data's "
        "valid_images, when the checkpoint's folder still exists)",
    )
    parser.add_argument("--check-count", type=at_least(0), default=2, help="how many of them (default 2)")
    return parser


@dataclass
class Agreement:
    """onnxruntime vs PyTorch on one input."""

    what: str
    size: tuple[int, int]  # (H, W)
    max_difference: float | None  # largest |logit difference| (depth: metres); None for an --argmax export
    agreement: float  # share of pixels that agree (the task's measure: same class; depth within 0.1 %)
    measure: str = "argmax agreement"
    quantity: str = "logit"  # what the difference is of: logits, or a depth model's metres

    def line(self) -> str:
        difference = (
            f"max |{self.quantity} diff| {self.max_difference:.2e}, " if self.max_difference is not None else ""
        )
        size = f"{self.size[1]}x{self.size[0]}"
        return f"  {self.what:<24} {size}: {difference}{self.measure} {100 * self.agreement:.4f} %"


def default_onnx_path(model: Path) -> Path:
    """Beside the checkpoint when it is in a run folder under outputs/; a model from elsewhere (a
    download, the repository's root) exports to outputs/exports/, never beside a file of someone else's."""
    if model.resolve().is_relative_to(config.OUTPUT_DIR.resolve()):
        return model.with_suffix(".onnx")
    return config.OUTPUT_DIR / "exports" / f"{model.stem}.onnx"


def output_path(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else default_onnx_path(Path(args.model))
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: the file name must end in .onnx")
    if out.resolve() == Path(args.model).resolve():
        raise UserError(f"--out {out} is the checkpoint itself")
    return out


def check_sizes(imgsz: tuple[int, int], dynamic: bool, patch_size: int) -> list[tuple[int, int]]:
    """(H, W) sizes the self-check runs: the export size, and for a dynamic export a second one
    that is not a multiple of the backbone's patch size (the padding, and the position embedding's
    interpolation or RoPE's coordinates, computed in the graph)."""
    width, height = imgsz
    if not dynamic:
        return [(height, width)]
    odd = tuple(max(patch_size + 1, side * 3 // 4) for side in (height, width))
    odd = tuple(side + 1 if side % patch_size == 0 else side for side in odd)
    return [(height, width), odd]


def check_images(args: argparse.Namespace, checkpoint: dict) -> list[tuple[str, np.ndarray]]:
    """Real images for the self-check, named: --check-images, or the training data's validation images."""
    path = Path(args.check_images) if args.check_images else None
    if path is None:
        data_dir = checkpoint["args"].get("data_dir")
        path = Path(data_dir) / "valid_images" if data_dir else None
        if path is None or not path.is_dir():
            return []
    if not path.exists():
        raise FileNotFoundError(f"--check-images {path}: no such file or folder")
    return [(file.name, read_image(file)) for file in image_paths(path)[: args.check_count]]


def compare(
    reference: torch.nn.Module, exported: OnnxNetwork, inputs: torch.Tensor, *, argmax: bool, task: Task
) -> tuple[float | None, float]:
    """(max |output difference|, agreement) of the two engines on one normalised batch: the task says
    what agrees (segmentation: the argmax; depth: metres within 0.1 %)."""
    with torch.inference_mode():
        expected = reference(inputs)
    actual = exported(inputs)  # an --argmax file returns one-hot scores: no logits to compare
    agreement = task.agreement(actual, expected)
    return None if argmax else task.max_difference(actual, expected), agreement


def self_check(
    path: Path,
    reference: torch.nn.Module,
    info: dict,
    sizes: list[tuple[int, int]],
    images: list[tuple[str, np.ndarray]],
    *,
    argmax: bool,
) -> list[Agreement]:
    """onnxruntime's output for the written file vs the PyTorch model's, per size, on a random input
    and on each image."""
    exported = OnnxNetwork(path, device="cpu")
    task = task_of(info)
    generator = torch.Generator().manual_seed(0)
    results = []
    for size in sizes:
        inputs = [("random", torch.randn(1, 3, *size, generator=generator))]
        inputs += [(name, preprocess(image, size, info["mean"], info["std"])) for name, image in images]
        for name, tensor in inputs:
            results.append(
                Agreement(
                    name,
                    size,
                    *compare(reference, exported, tensor, argmax=argmax, task=task),
                    task.export_measure,
                    task.export_quantity,
                )
            )
    return results


def verdict(results: list[Agreement], precision: str) -> str:
    """The check's summary line; raises for a float32 export that does not reproduce PyTorch."""
    worst = max((r.max_difference for r in results if r.max_difference is not None), default=None)
    lowest = min(r.agreement for r in results)
    difference = f"max |{results[0].quantity} diff| {worst:.2e}, " if worst is not None else ""
    summary = f"{difference}lowest {results[0].measure} {100 * lowest:.4f} % vs PyTorch float32"
    if precision == "fp32":
        if (worst is not None and worst > FP32_MAX_DIFFERENCE) or lowest < FP32_MIN_AGREEMENT:
            raise UserError(
                f"export check failed: {summary} (float32 must agree to {FP32_MAX_DIFFERENCE:g} and "
                f"{100 * FP32_MIN_AGREEMENT:g} %); nothing was written"
            )
        return f"check passed: {summary}"
    return f"{precision}: {summary} (not held to the float32 tolerance)"


def write_onnx(
    model: torch.nn.Module, info: dict, target: Path, args: argparse.Namespace, size: tuple[int, int], precision: str
) -> None:
    """Export, convert or quantise, and store the metadata, into `target`."""
    onnx = require("onnx")
    task = task_of(info)
    output = task.export_output(info, args.argmax, args.model)
    proto = export_network(
        model,
        size=size,
        dynamic=args.dynamic,
        opset=args.opset,
        argmax=args.argmax,
        output=output,
    )
    if precision == "fp16":
        proto = to_float16(proto)
    if precision == "int8":
        float32 = temp_path(target, suffix=".onnx")
        try:
            onnx.save(proto, float32)
            quantize_int8(float32, target)
        finally:
            float32.unlink(missing_ok=True)
        proto = onnx.load(target)
    write_metadata(proto, info, output=output, precision=precision, dynamic=args.dynamic, summary=task.summary(info))
    onnx.save(proto, target)


def main(args: argparse.Namespace) -> None:
    checkpoint = load_checkpoint(args.model)
    out = output_path(args)
    claim_output_folder(out.parent, beside=args.model)
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module)
    info = checkpoint["model_info"]
    task = task_of(info)
    task.export_output(info, args.argmax, args.model)  # what it cannot export is refused before the work
    imgsz = args.imgsz or info["imgsz"]
    check_imgsz(imgsz)
    patch_size = ModelDescription.from_info(info).backbone.patch_size
    imgsz = tuple(round_to_patch(imgsz, patch_size)) if args.dynamic else tuple(imgsz)
    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    images = check_images(args, checkpoint)
    reference = build_model_from_checkpoint(checkpoint, "cpu")
    weights = sum(tensor.numel() * 4 for tensor in reference.state_dict().values() if tensor.is_floating_point())
    if weights >= SINGLE_FILE_LIMIT * 0.95:
        raise UserError(
            f"{args.model}: {format_bytes(weights)} of float32 weights ({info['arch']['backbone']}) do not "
            "fit one ONNX file (protobuf's 2 GB limit); exporting with external weight files is not supported "
            "yet: use a smaller backbone"
        )
    traced = build_model_from_checkpoint(checkpoint, "cpu", timm=True)
    sizes = check_sizes(imgsz, args.dynamic, patch_size)

    started = time.perf_counter()
    tmp = temp_path(out, suffix=".onnx")
    try:
        write_onnx(traced, info, tmp, args, sizes[0], precision)
        exported_in = time.perf_counter() - started
        results = self_check(tmp, reference, info, sizes, images, argmax=args.argmax)
        print(
            f"self-check: onnxruntime vs PyTorch ({len(images)} real image{'s' * (len(images) != 1)}"
            f"{'' if images else '; give --check-images for real ones'} and a random input):"
        )
        print("\n".join(result.line() for result in results))
        summary = verdict(results, precision)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    shape = "any size" if args.dynamic else f"{imgsz[0]}x{imgsz[1]} only"
    opset = opset_of(require("onnx").load(out, load_external_data=False))  # as written, not as asked
    print(
        f"{summary}\nwrote {out} ({format_bytes(out.stat().st_size)}; {precision}, opset {opset}, {shape}, "
        f"{task.export_outputs[task.export_output(info, args.argmax, args.model)]}) in {exported_in:.1f} s\n"
        f"run it: python infer_image.py --model {out} --input IMAGES"
    )


if __name__ == "__main__":
    run_cli(main, get_args_parser())
