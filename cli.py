"""What every script shares: how it ends (a user's mistake as one `error:` line and exit 1,
Ctrl-C as exit 130), its parser, and every flag that more than one script takes, declared once:
device and precision, the backbone, the model (checkpoint, ONNX file or Meta's head), the
inference mode; and what those flags become (`backbone_kwargs`, `mode_from_args`).

A user's mistake is a `dinokit.errors.UserError` (why a shared base class: see there).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import config
from dinokit.backbones.settings import apply_backbone_settings, default_hub_dir, default_source
from dinokit.backbones.weights_file import is_url, weights_identity
from dinokit.data.resize import check_imgsz
from dinokit.errors import UserError, one_line
from dinokit.prediction.modes import MODES, InferenceMode
from dinokit.retrieval.index_plan import parse_size
from dinokit.tasks.task import OutputOptions
from model_config import BACKBONE_NAMES, HEAD_LAYERS, SOURCES
from utils import AMP_CHOICES, distributed, rank


def _peer_failure(err: BaseException) -> bool:
    """A collective that failed because another process died or stopped answering."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(
        marker in text
        for marker in (
            "Connection closed by peer",
            "Connection reset by peer",
            "Broken pipe",
            "Timed out waiting",
            "gloo",
            "NCCL",
            "ProcessGroup",
        )
    )


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Run a script's main: a user's mistake ends as one line on stderr and exit code 1, not a traceback.

    Under torchrun each rank reports its own error; only a rank whose collective failed because a
    peer went away says so instead."""
    try:
        args = parser.parse_args()
        if hasattr(args, "no_pretrained"):  # the backbone flags: the environment's settings fill what is left out
            apply_backbone_settings(args)
        main(args)
    except KeyboardInterrupt as err:
        print(f"\ninterrupted{': ' + one_line(err) if str(err) else ''}", file=sys.stderr)
        sys.exit(130)
    except (UserError, ValueError, OSError, FloatingPointError) as err:
        sys.exit(f"error{_rank_tag()}: {one_line(err)}")
    except torch.cuda.OutOfMemoryError as err:
        sys.exit(
            f"error{_rank_tag()}: out of memory: {one_line(err)[:200]}; lower --batch or --imgsz, "
            "or use --amp / --grad-checkpointing"
        )
    except RuntimeError as err:
        if not distributed():
            raise
        if _peer_failure(err):
            sys.exit(
                f"error{_rank_tag()}: a collective operation failed, most likely because another process "
                f"failed first (see its error above): {one_line(err)[:300]}"
            )
        sys.exit(f"error{_rank_tag()}: {one_line(err)[:500]}")
    finally:
        if distributed():
            torch.distributed.destroy_process_group()


class ArgumentParser(argparse.ArgumentParser):
    """Every script's parser: a bad flag is one line (`error: argument --port: must be in 1..65535,
    got 99999`) and exit 2, like every other mistake, instead of the usage text above it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and value != value:  # nan
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (a range checked when the flag is parsed)."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = f"integer in {low}..{high}"
    return parse


def byte_size(text: str) -> int:
    """An argparse type: a size in bytes written as 600MB, 1.5GB, 512MiB or a plain number."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive(text: str) -> float:
    """An argparse type: a number > 0 (a learning rate, a size limit, a temperature)."""
    value = _number(float, text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a number >= 0 (a weight decay)."""
    value = _number(float, text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """An argparse type: a number in [0, 1] (an opacity, a share)."""
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    return int_between(1, 65535)(text)


class FlagParser(ArgumentParser):
    """An ArgumentParser that records which flags the command line gave (`args.given_flags`), so
    that a default can be told from the same value typed (what a resumed run takes from its checkpoint)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = super().parse_known_args(args, namespace)
        defaults = [(action, action.default) for action in self._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            bare, _ = super().parse_known_args(args, None)
        finally:
            for action, default in defaults:
                action.default = default
        parsed.given_flags = frozenset(vars(bare)) - {"help", "given_flags"}
        return parsed, extra


def add_renamed_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, new: str, *, flag: bool = False, **kwargs: Any
) -> None:
    """`old`, renamed `new`, kept working for one release: it sets what `new` sets and says so on
    stderr (hidden from --help). `flag`: an on/off switch, else it takes a value like `new`."""
    base = argparse._StoreTrueAction if flag else argparse._StoreAction

    class Renamed(base):  # type: ignore[valid-type, misc]
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"warning: {old} is renamed {new}; the old name goes in the next release", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    parser.add_argument(old, action=Renamed, help=argparse.SUPPRESS, **kwargs)


def _rank_tag() -> str:
    return f" (rank {rank()})" if distributed() else ""


def output_folder(value: str | Path) -> Path:
    """--out-dir's one rule in every script: a bare name is a folder under outputs/ (`--out-dir demo`:
    outputs/demo); a value with a path separator (`runs/a`, `./a`, `/tmp/a`) or `.`/`..` is that path."""
    text = str(value)
    if "/" in text or "\\" in text or text in (".", ".."):
        return Path(text)
    return config.OUTPUT_DIR / text


def backbone_identity(args: argparse.Namespace) -> dict[str, Any]:
    """What embeddings of a backbone depend on (classify.py's caches, retrieve.py's indexes): the
    backbone flags, the weights file by absolute path, size and content hash (so that a replaced
    file, or a relative path found from another folder, is noticed: dinokit/backbones/weights_file.py),
    and for a random-init backbone the seed it was drawn with."""
    identity = backbone_kwargs(args)
    if args.weights and not is_url(args.weights):
        identity["weights_file"] = weights_identity(args.weights)
        identity["weights"] = identity["weights_file"]["path"]
    if not identity["pretrained"] and not args.weights:
        identity["seed"] = args.seed
    return identity


def add_device_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device and --amp, declared here once for every script that runs a model."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--amp",
        default="auto",
        choices=AMP_CHOICES,
        help="mixed precision: auto = bf16 autocast on CUDA (fp16 with loss scaling where the GPU "
        "lacks bf16), float32 on CPU and MPS (autocast is slower there)",
    )


def add_backbone_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a DINOv2 or DINOv3 backbone and where it comes from (train, model, bench, ...)."""
    group = parser.add_argument_group("backbone (docs/backbones.md: names, sizes, licences)")
    group.add_argument(
        "--backbone",
        default="small",
        choices=BACKBONE_NAMES,
        metavar="NAME",
        help="Meta's hub name: dinov2_vits14 ... dinov2_vitg14[_reg], dinov3_vits16, dinov3_vits16plus, "
        "dinov3_vitb16, dinov3_vitl16, dinov3_vith16plus, dinov3_vit7b16, dinov3_convnext_tiny/small/base/large; "
        "or a DINOv2 size: small (default), base, large, giant. DINOv3 weights are under Meta's DINOv3 License",
    )
    group.add_argument("--registers", action="store_true", help="with a DINOv2 size: the variant with 4 registers")
    group.add_argument(
        "--source",
        default=default_source(),
        choices=SOURCES,
        help="hub: torch.hub (Meta's code, GitHub + cache); timm; local: needs --hub-dir; hf: the transformers "
        "snapshot on the Hugging Face Hub (facebook/dinov2-small, ...; token from HF_TOKEN or `hf auth login`), "
        "built by timm",
    )
    group.add_argument(
        "--hub-dir",
        default=default_hub_dir(),
        metavar="PATH",
        help="local clone of github.com/facebookresearch/dinov2 or /dinov3 (implies --source local)",
    )
    group.add_argument(
        "--weights",
        default=None,
        metavar="PATH|URL",
        help="Meta's backbone file, e.g. dinov2_vits14_pretrain.pth or dinov3_vits16_pretrain_lvd1689m-08c60483.pth; "
        "DINOv3 (gated): the file or the signed URL Meta sent (needed with --source hub); or a transformers "
        "snapshot folder / its model.safetensors / pytorch_model.bin (any --source)",
    )
    group.add_argument("--no-pretrained", action="store_true", help="random-init backbone (offline smoke runs only)")


RANDOM_INIT = "random-init backbone (--no-pretrained): these figures say nothing about DINOv2/DINOv3 features"


def random_init_note(args: argparse.Namespace) -> str:
    """RANDOM_INIT for a random-init run (plot titles, the log), else nothing."""
    return RANDOM_INIT if args.no_pretrained else ""


def backbone_weights(args: argparse.Namespace) -> str:
    """Where the backbone's weights came from, as reports record it (a random-init run says so)."""
    if args.no_pretrained:
        return "random init (--no-pretrained)"
    return (
        str(Path(args.weights).resolve()) if args.weights and not is_url(args.weights) else f"{args.source} pretrained"
    )


def backbone_kwargs(args: argparse.Namespace) -> dict:
    """`add_backbone_args` flags as keyword arguments of `model.DenseModel` / `load_backbone`."""
    return {
        "backbone": args.backbone,
        "registers": args.registers,
        "source": args.source,
        "hub_dir": args.hub_dir,
        "weights": args.weights,
        "pretrained": not args.no_pretrained,
    }


def backbone_argv(args: argparse.Namespace) -> list[str]:
    """`add_backbone_args` flags back as command-line arguments, for a child process."""
    argv = ["--backbone", args.backbone, "--source", args.source]
    argv += ["--registers"] * args.registers + ["--no-pretrained"] * args.no_pretrained
    for flag, value in (("--hub-dir", args.hub_dir), ("--weights", args.weights)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def add_mode_args(
    parser: argparse.ArgumentParser, flag: str = "--mode", sizes: bool = True, default: str | None = "whole"
) -> None:
    """The flags that choose an `InferenceMode`. train.py names the first one --eval-mode, leaves
    its default to the recipe and has no --imgsz/--native here: its final evaluation predicts at
    the training size."""
    group = parser.add_argument_group("inference mode")
    group.add_argument(
        flag,
        dest="mode",
        default=default,
        choices=MODES,
        help="whole: one forward per image; slide: sliding windows (the paper's evaluation protocol)",
    )
    if sizes:
        group.add_argument(
            "--imgsz",
            type=int,
            nargs=2,
            default=None,
            metavar=("W", "H"),
            help="whole: the size images are resized to (default: the size the model was trained at)",
        )
        group.add_argument(
            "--native",
            action="store_true",
            help="whole: one forward at each image's own size (padded to the patch size)",
        )
    group.add_argument("--short-side", type=int, default=512, help="slide: resize the short side to this (default 512)")
    group.add_argument(
        "--crop",
        type=int,
        default=None,
        help="slide: window side (default: the papers' 518 for /14 backbones, 512 for DINOv3)",
    )
    group.add_argument("--stride", type=at_least(1), default=341, help="slide: window step (default 341)")
    group.add_argument(
        "--scales",
        type=positive,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="test-time scales, e.g. 0.75 1.0 1.25 (softmax-averaged)",
    )
    group.add_argument("--flip", action="store_true", help="test-time horizontal flip (softmax-averaged)")


def mode_from_args(args: argparse.Namespace, *, sizes: bool = True) -> InferenceMode:
    """The `add_mode_args` flags as an `InferenceMode` (with `sizes=False`: whole mode at the training size)."""
    imgsz, native = (args.imgsz, args.native) if sizes else (None, False)
    if imgsz is not None:
        check_imgsz(imgsz)
        if native:
            raise ValueError("--imgsz and --native exclude each other")
        imgsz = tuple(imgsz)  # rounded up to the model's patch size by the Predictor (InferenceMode.for_patch)
    return InferenceMode(
        args.mode, imgsz, native, args.short_side, args.crop, args.stride, tuple(args.scales), args.flip
    )


def add_model_args(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """Where the model comes from: a checkpoint of ours (with `several`, --model may be repeated:
    a list), or Meta's released head on a backbone."""
    parser.add_argument(
        "--model",
        default=None,
        action="append" if several else "store",
        help="checkpoint written by train.py, e.g. best_model_iou.pth, or a model.onnx written by export.py "
        "(run by onnxruntime)" + ("; repeat to offer several" if several else ""),
    )
    parser.add_argument(
        "--head-weights",
        default=None,
        metavar="NAME|FILE",
        help="instead of --model: Meta's released head, voc2012_linear, voc2012_ms, ade20k_linear, "
        "ade20k_ms (downloaded once into the torch.hub cache) or such a file; with the backbone flags",
    )
    parser.add_argument(
        "--head-layers",
        type=int,
        default=None,
        choices=HEAD_LAYERS,
        help="with --head-weights: check the head reads this many blocks (default: what the file says)",
    )
    add_backbone_args(parser)


def add_inference_args(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    """The flags infer_image.py and infer_video.py share."""
    add_model_args(parser)
    parser.add_argument(
        "--out-dir",
        default=str(default_out_dir),
        help=f"a name (a folder under outputs/) or a path with a separator (default: {default_out_dir})",
    )
    add_device_args(parser)
    parser.add_argument(
        "--alpha", type=unit_interval, default=0.5, help="opacity of the class colours in the overlay, 0..1"
    )
    add_mode_args(parser)
    speed = parser.add_argument_group("throughput (the results are the same for any value)")
    speed.add_argument(
        "--batch",
        type=at_least(1),
        default=None,
        help="images (frames) per forward in --mode whole without TTA (default: 8)",
    )
    speed.add_argument(
        "--workers",
        type=at_least(0),
        default=None,
        help="images: processes decoding ahead and threads drawing and writing behind; a video: threads drawing "
        "frames, beside one reading ahead and one predicting (0: none of them) (default: 4 on a GPU, 1 on the CPU, "
        "where the network takes the cores)",
    )
    depth = parser.add_argument_group("depth models (Meta's depth heads: --head-weights nyu_linear4, ...)")
    depth.add_argument(
        "--depth-range",
        type=non_negative,
        nargs=2,
        default=None,
        metavar=("NEAR", "FAR"),
        help="metres mapped to the colour scale, the same for every image and frame (default: the model's range)",
    )


def output_options(args: argparse.Namespace) -> OutputOptions:
    """How infer_image.py / infer_video.py draw and write predictions: --alpha, --depth-range (checked:
    a depth model's colour scale, default its own range), --save-npy."""
    depth_range = getattr(args, "depth_range", None)
    if depth_range is not None:
        near, far = depth_range
        if far <= near:
            raise UserError(f"--depth-range {near:g} {far:g}: FAR must be greater than NEAR")
        depth_range = (near, far)
    return OutputOptions(alpha=args.alpha, depth_range=depth_range, save_npy=getattr(args, "save_npy", False))
