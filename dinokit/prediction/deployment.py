"""Exported models: a segmentation or depth model as one ONNX file, and onnxruntime behind the model's call.

The file holds the whole network, normalised image `[B, 3, H, W]` in, logits `[B, C, H, W]` (or
class indices `[B, H, W]`; a depth model: metres `[B, 1, H, W]`) out; with dynamic shapes the
padding to a multiple of the patch size and the position embedding (DINOv2's interpolation,
DINOv3's RoPE coordinates) are computed in the graph, so any size works. Its metadata holds
what interpreting it needs (classes, colours, mean/std, training size), the same `model_info` a
checkpoint carries, so `Predictor.from_onnx` needs nothing else.

`onnx`, `onnxscript` and `onnxruntime` are optional (requirements-export.txt): imported where used.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinokit.errors import UserError
from dinokit.prediction.scores import predicted_classes
from dinokit.writing import temp_path

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_OPSET = 23  # the first with a fused Attention operator (onnxruntime >= 1.23); 18 for older runtimes
OPSETS = range(18, 24)  # torch's exporter writes 18 and converts to the later ones; 23 is onnxruntime's newest here
MAX_SIDE = 8192  # largest height/width a dynamic export accepts
FORMAT = 1  # the metadata layout below


class OnnxUnavailableError(UserError):
    """onnx / onnxruntime are not installed."""


def require(module: str):
    """Import an optional export dependency, or fail in one line saying how to install it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as err:
        raise OnnxUnavailableError(
            f"{module} is not installed ({err}); pip install -r requirements-export.txt"
        ) from err


class ExportedNetwork(nn.Module):
    """What goes into the file: the model (segmentation: optionally reduced to class indices; depth)."""

    def __init__(self, model: nn.Module, *, argmax: bool):
        super().__init__()
        self.model, self.argmax = model, argmax
        self.num_classes: int = model.arch.get("num_classes", 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        logits = self.model(images)
        if not isinstance(logits, torch.Tensor):  # several outputs (EoMT's queries: class and mask logits)
            return tuple(logits.tensors())
        if not self.argmax:
            return logits
        classes = predicted_classes(logits, 1)
        return classes.to(torch.uint8) if self.num_classes <= 256 else classes


OUTPUT_NAMES = {"queries": ["class_logits", "mask_logits"]}  # files with several outputs


def export_network(
    model: nn.Module,
    *,
    size: tuple[int, int],
    dynamic: bool,
    opset: int = DEFAULT_OPSET,
    argmax: bool = False,
    output: str = "logits",
) -> Any:
    """The traced ONNX graph (`onnx.ModelProto`) of `model` (eval mode, on the CPU). `size` (H, W) is
    the sample traced with; a static export accepts only that size, a dynamic one any size and batch."""
    require("onnxscript")
    network = ExportedNetwork(model, argmax=argmax).eval()
    batch = 2  # a sample batch of 1 would be specialised to 1
    sample = torch.zeros(batch, 3, *size)
    shapes = None
    if dynamic:
        side = dict(min=model.patch_size, max=MAX_SIDE)  # at least one patch of the model's backbone
        shapes = {
            "images": {
                0: torch.export.Dim("batch", min=1, max=1024),
                2: torch.export.Dim("height", **side),
                3: torch.export.Dim("width", **side),
            }
        }
    else:
        sample = sample[:1]
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network,
            (sample,),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=shapes,
            input_names=["images"],
            output_names=OUTPUT_NAMES.get(output, [output]),
            verbose=False,
        )
    proto = program.model_proto
    written = opset_of(proto)
    if written != opset:  # the converter gives up with warnings only, leaving the graph at its own opset
        raise UserError(
            f"--opset {opset}: the exporter could not convert the graph (it stayed at opset {written}); "
            f"nothing was written; use one of {OPSETS.start}..{OPSETS.stop - 1}"
        )
    return proto


def opset_of(proto: Any) -> int:
    """The standard-domain opset a model declares."""
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def to_float16(proto: Any) -> Any:
    """Weights and arithmetic in float16, inputs and outputs kept float32 (the caller's arrays stay the same)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_float_to_float16(proto, keep_io_types=True)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the linear layers (MatMul with constant weights): int8 weights,
    activations quantised per call from their observed range. The graph is pre-processed first as
    onnxruntime asks (shape inference and its graph optimisations, `quant_pre_process`), so the
    quantiser sees shapes and fused nodes."""
    quantization = require("onnxruntime.quantization")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = temp_path(target, suffix=".onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantization.quantize_dynamic(
            str(prepared), str(target), op_types_to_quantize=["MatMul"], weight_type=quantization.QuantType.QInt8
        )
    finally:
        prepared.unlink(missing_ok=True)


def write_metadata(
    proto: Any, info: dict[str, Any], *, output: str, precision: str, dynamic: bool, summary: str
) -> None:
    """Store `info` (a checkpoint's model_info) and how the file was exported as JSON-valued metadata
    entries, readable by any ONNX tool (Netron lists them); `summary` (the task's: "segmentation
    (21 classes)") opens the file's description."""
    entries = {"format": FORMAT, "output": output, "precision": precision, "dynamic": dynamic, **info}
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    proto.doc_string = (
        f"{info['arch']['backbone']} {summary}. "
        f"Input 'images': float32 [B, 3, H, W], RGB / 255, minus mean, divided by std (metadata). Output: {output}."
    )


def read_metadata(path: str | Path, entries: list[Any]) -> dict[str, Any]:
    """The metadata `write_metadata` stored, from a session's `custom_metadata_map` entries."""
    values = dict(entries)
    if "arch" not in values or "format" not in values:
        raise UserError(
            f"{path}: an ONNX model without this project's metadata (classes, colours, normalisation); "
            "export it with export.py"
        )
    try:
        return {key: json.loads(value) for key, value in values.items()}
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: unreadable metadata ({err})") from err


def providers_for(device: str) -> list[Any]:
    """onnxruntime execution providers for --device: CUDA when asked for (or auto) and this
    onnxruntime build has it (onnxruntime-gpu), else the CPU."""
    available = require("onnxruntime").get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise UserError(
            f"--device {device}: this onnxruntime has no CUDA provider (available: {', '.join(available)}); "
            "pip install onnxruntime-gpu, or --device cpu"
        )
    if device.startswith("cuda") or device == "auto" and "CUDAExecutionProvider" in available:
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    if device not in ("auto", "cpu"):
        raise UserError(f"--device {device}: an ONNX model runs on cpu or cuda")
    return ["CPUExecutionProvider"]


class OnnxNetwork(nn.Module):
    """An exported file run by onnxruntime, called like the PyTorch model: images `[B, 3, H, W]` ->
    `[B, C, H, W]` scores. A file exported with --argmax returns one-hot scores, so the same
    resizing, sliding windows and test-time averaging apply (averaging one-hot scores is voting)."""

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int = 0):
        super().__init__()
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: ONNX model not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: the CPU provider's fallback notes are not the user's problem
        providers = providers_for(device)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as err:  # onnxruntime's own classes (Fail, InvalidProtobuf, InvalidGraph, ...)
            raise UserError(
                f"{path}: not a readable ONNX model (truncated or not an ONNX file): {str(err).splitlines()[0][:200]}"
            ) from err
        self.info = read_metadata(path, self.session.get_modelmeta().custom_metadata_map.items())
        self.input_name = self.session.get_inputs()[0].name
        self.static_size = None if self.info["dynamic"] else tuple(self.session.get_inputs()[0].shape[2:])
        self.num_classes = len(self.info.get("classes", []))

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.static_size is not None and tuple(images.shape[2:]) != self.static_size:
            raise UserError(
                f"{self.path}: exported for {self.static_size[1]}x{self.static_size[0]} inputs only "
                f"(not {images.shape[3]}x{images.shape[2]}); use --mode whole at that size, "
                "or export with --dynamic"
            )
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        outputs = [torch.from_numpy(o).to(images.device) for o in self.session.run(None, {self.input_name: array})]
        if len(outputs) > 1:  # the task reads them (Task.from_exported)
            return tuple(outputs)
        output = outputs[0]
        if self.info["output"] == "classes":
            output = F.one_hot(output.long(), self.num_classes).permute(0, 3, 1, 2).float()
        return output.to(images.device)
