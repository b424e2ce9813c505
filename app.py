"""A web page to try trained models: drop an image (or a short video) and see the segmentation.

    pip install -r requirements-app.txt
    python app.py --model outputs/transfer_learning/best_model_iou.pth            # http://127.0.0.1:7860
    python app.py --model outputs/a/best_model_iou.pth --model outputs/a/best_model_iou.onnx
    python app.py --head-weights voc2012_ms --backbone small                      # Meta's head, no training
    python app.py --model outputs/a/best_model_iou.pth --index photos             # + a search tab (retrieve.py)
    python app.py --index photos                                                  # the search tab alone

The page predicts with the code of infer_image.py / infer_video.py (inference.Predictor, drawing,
videos): the overlay, the colour mask, a legend with each class's share of the image, and the
index-mask PNG to download; a second tab segments a short clip with a progress bar; with --index, a
search tab shows an uploaded image's nearest images in a retrieve.py index. Requests run
one at a time through a queue, uploads and image sizes are capped, and a bad upload is a message
in the page while the server keeps serving. It listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import config
from cli import ArgumentParser, add_device_args, add_model_args, at_least, port_number, positive, run_cli
from dinokit.classification.embeddings import build_backbone
from dinokit.data.image_files import DatasetError, image_pixels, list_image_files, read_image
from dinokit.errors import UserError, one_line
from dinokit.prediction.modes import MODES, InferenceMode
from dinokit.prediction.videos import open_video, predicted_frames, read_frames, write_video
from dinokit.retrieval.collection import Collection, index_path
from dinokit.retrieval.descriptors import embed_files
from dinokit.retrieval.vector_index import search
from dinokit.tasks.task import OutputOptions
from dinokit.writing import atomic_write
from inference import Predictor, load_predictor
from utils import select_device, select_precision, select_throughput

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EXAMPLE_DIRS = (
    config.ROOT / "input" / "inference_data" / "images",
    config.ROOT / "input" / "sample_voc" / "valid_images",
)
THUMBNAIL_SIDE = 384  # pixels: what the search tab shows of an indexed image
BAD_INPUT = (UserError, DatasetError, ValueError, OSError)  # what a user's file can cause: shown in the page


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, several=True)
    add_device_args(parser)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 shares it with the network (no login!)"
    )
    parser.add_argument("--port", type=port_number, default=7860)
    parser.add_argument(
        "--share",
        action="store_true",
        help="also a public https link through Gradio's share servers (needs internet; anyone with the link "
        "can use it)",
    )
    parser.add_argument(
        "--examples",
        default=None,
        metavar="DIR",
        help="images offered as examples (default: input/inference_data/images, else the demo's "
        "input/sample_voc/valid_images)",
    )
    parser.add_argument("--max-upload-mb", type=positive, default=25, help="largest upload accepted (default 25)")
    parser.add_argument(
        "--max-pixels", type=positive, default=25e6, help="largest image or video frame in pixels (default 25e6)"
    )
    parser.add_argument(
        "--max-video-frames", type=at_least(1), default=300, help="frames of a clip that are processed (default 300)"
    )
    parser.add_argument(
        "--index",
        default=None,
        metavar="NAME",
        help="a retrieve.py index (outputs/retrieval/NAME.index or a path): adds a search tab",
    )
    parser.add_argument(
        "--queue-size", type=at_least(1), default=16, help="requests that may wait; more are turned away (default 16)"
    )
    return parser


class Demo:
    """The page's work, independent of Gradio: a file in, what the page shows out. A user's bad file
    raises UserError / DatasetError (`shown_in_page` puts the message in the page's status line)."""

    KEEP_SECONDS = 3600  # result files older than this are deleted (Gradio keeps its own copies as long)

    def __init__(
        self,
        predictors: dict[str, Predictor],
        out_dir: Path,
        *,
        max_pixels: float,
        max_frames: int,
        searcher: Searcher | None = None,
    ):
        self.predictors, self.out_dir, self.searcher = predictors, out_dir, searcher
        self.max_pixels, self.max_frames = max_pixels, max_frames

    def predictor(self, name: str, mode: str) -> Predictor:
        """The chosen model in the chosen mode (the network is shared, only the mode differs)."""
        base = self.predictors[name]
        return base if mode == base.mode.mode else base.with_mode(InferenceMode(mode, imgsz=base.mode.imgsz))

    def request_folder(self) -> Path:
        """A new folder for one request's files (requests never share a result file); the folders of
        requests older than KEEP_SECONDS go, so a server left running does not fill its disk."""
        for old in self.out_dir.iterdir():
            if time.time() - old.stat().st_mtime > self.KEEP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        folder = self.out_dir / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def output_path(self, name: str) -> Path:
        """A new file named `name` in a request folder of its own."""
        return self.request_folder() / name

    def search_image(self, path: str | None, k: float) -> tuple[list[tuple[str, str]], str]:
        """(gallery of the nearest indexed images with their similarity, status line) for one upload."""
        if not path:
            raise UserError("upload an image first")
        if image_pixels(path) > self.max_pixels:
            raise UserError(f"{Path(path).name}: larger than this demo takes ({self.max_pixels / 1e6:g} megapixels)")
        started = time.perf_counter()
        hits = self.searcher.nearest(Path(path), int(k))
        seconds = time.perf_counter() - started
        folder = self.request_folder()
        gallery, gone = [], []
        for rank, (found, similarity) in enumerate(hits):
            try:
                gallery.append(
                    (str(thumbnail(Path(found), folder / f"{rank:03d}.jpg")), f"{similarity:.3f}  {Path(found).name}")
                )
            except BAD_INPUT:  # deleted or replaced since the index was built
                gone.append(found)
        status = f"{len(hits)} nearest of {self.searcher.size} images, {1000 * seconds:.0f} ms"
        if gone:
            status += (
                f"; {len(gone)} of them gone from disk or unreadable (e.g. {Path(gone[0]).name}): the index is "
                f"stale, refresh it: {self.searcher.refresh_command()}"
            )
        return gallery, status

    def preview(self, path: str | None) -> np.ndarray | None:
        """The uploaded image as it will be read (EXIF orientation applied), or nothing for a file that
        is not one (segmenting it says why)."""
        if not path or image_pixels_or_zero(path) > self.max_pixels:
            return None
        try:
            return read_image(path)
        except BAD_INPUT:
            return None

    def segment_image(self, path: str | None, name: str, mode: str, alpha: float) -> tuple[Any, ...]:
        """(overlay, colour mask, legend HTML, index-mask PNG path, status line) for one uploaded image."""
        if not path:
            raise UserError("upload an image first")
        pixels = image_pixels(path)
        if pixels > self.max_pixels:
            raise UserError(
                f"{Path(path).name}: {pixels / 1e6:.1f} megapixels; this demo takes up to "
                f"{self.max_pixels / 1e6:g} (--max-pixels)"
            )
        image = read_image(path)
        predictor = self.predictor(name, mode)
        started = time.perf_counter()
        prediction = predictor.predict(image)
        seconds = time.perf_counter() - started
        status = (
            f"{image.shape[1]}x{image.shape[0]}, {1000 * seconds:.0f} ms ({predictor.mode.describe()}, "
            f"{predictor.engine})"
        )
        outputs = predictor.task.demo_outputs(
            predictor.info, Path(path).stem, image, prediction, self.write_output, alpha
        )
        return (*outputs, status)

    def write_output(self, name: str, save: Callable[[str], None]) -> Path:
        """A file of this request's results, written atomically by `save(temporary path)`."""
        path = self.output_path(name)
        atomic_write(path, save)
        return path

    def segment_video(self, path: str | None, name: str, mode: str, alpha: float, progress=None) -> tuple[str, str]:
        """(overlaid clip, status line) for one uploaded video; `progress(fraction, desc=...)` is Gradio's bar."""
        if not path:
            raise UserError("upload a video first")
        capture, video = open_video(path)
        try:
            if video.size[0] * video.size[1] > self.max_pixels:
                raise UserError(
                    f"{Path(path).name}: {video.size[0]}x{video.size[1]} frames; this demo takes up to "
                    f"{self.max_pixels / 1e6:g} megapixels (--max-pixels)"
                )
            total = video.frames_to_read(self.max_frames)
            timings: list[float] = []
            predictor = self.predictor(name, mode)
            batch, workers = select_throughput(predictor.device)
            draw, size = predictor.task.frame_drawer(predictor.info, video.size, OutputOptions(alpha=alpha))
            frames = predicted_frames(
                read_frames(capture, self.max_frames), predictor, draw, timings, batch=batch, workers=workers
            )
            out = self.output_path(f"{Path(path).stem}_segmented.webm")  # VP8: plays in every browser
            try:
                written = write_video(out, with_progress(frames, total, progress), video.fps, size)
            finally:
                frames.close()  # stops the reader and predictor threads before the capture goes
        finally:
            capture.release()
        if written == 0:
            raise UserError(f"{Path(path).name}: no frame could be decoded")
        capped = (
            f" (the first {written} of {video.frame_count}: --max-video-frames)" if video.frame_count > written else ""
        )
        return str(out), f"{written} frames{capped}, {1000 * sum(timings) / len(timings):.0f} ms per frame"


class Searcher:
    """A retrieve.py index with its backbone loaded once: an image's nearest indexed images."""

    def __init__(self, path: Path, device: str, amp: str):
        self.path = index_path(path)
        self.collection = Collection.load(self.path)
        self.collection.check_weights(self.path)  # queries embedded by the weights that made the index
        self.device = select_device(device)
        self.amp_dtype = select_precision(self.device, amp)
        self.backbone = build_backbone(self.collection.key["backbone"], self.device)
        self.size = len(self.collection.records)

    def refresh_command(self) -> str:
        return self.collection.refresh_command(self.path)

    def nearest(self, image: Path, k: int) -> list[tuple[str, float]]:
        vectors, _, failures = embed_files(
            self.collection.key, [image], device=self.device, amp_dtype=self.amp_dtype, backbone=self.backbone
        )
        if failures:
            raise UserError(f"{image.name}: {failures[0][1]}")
        similarities, rows = search(self.collection.index, vectors, min(k, self.size))
        return [(self.collection.records[r].path, float(s)) for r, s in zip(rows[0], similarities[0]) if r >= 0]


def image_pixels_or_zero(path: str) -> int:
    try:
        return image_pixels(path)
    except BAD_INPUT:
        return 0


def thumbnail(image: Path, out: Path, side: int = THUMBNAIL_SIDE) -> Path:
    """A JPEG copy of `image` at most `side` pixels wide and high, read as every script reads it
    (`read_image`: EXIF orientation, pixel formats, the strict JPEG check). The page shows these,
    never the indexed files themselves: the server hands out the files it made and nothing of the
    indexed folders (docs/demo.md)."""
    picture = Image.fromarray(read_image(image))
    picture.thumbnail((side, side))
    atomic_write(out, lambda tmp: picture.save(tmp, format="JPEG", quality=90))
    return out


def with_progress(frames: Iterable[np.ndarray], total: int, progress: Callable | None) -> Iterator[np.ndarray]:
    """The frames, reporting each one to Gradio's progress bar."""
    for done, frame in enumerate(frames, 1):
        if progress is not None:
            progress(done / max(total, done), desc=f"frame {done}/{total}")
        yield frame


def shown_in_page(
    work: Callable[..., tuple], outputs: int, failed: str = "Could not segment it"
) -> Callable[..., tuple]:
    """Run `work`; a user's bad file empties the results and puts the reason in the status line
    (the last of `outputs`), where it stays until the next request."""

    def run(path, *args, **kwargs):
        try:
            return work(path, *args, **kwargs)
        except BAD_INPUT as err:  # name the file as the user knows it, not by Gradio's upload copy
            message = one_line(err).replace(str(path), Path(path).name) if path else one_line(err)
            return (None,) * (outputs - 1) + (f"**{failed}:** {html.escape(message, quote=False)}",)

    return run


def build_page(demo: Demo, examples: list[str]) -> Any:
    """The Gradio Blocks page: image and video tabs for the models, a search tab for an index; one
    queue slot for all."""
    import gradio as gr

    with gr.Blocks(title="DINOv2 segmentation", delete_cache=(3600, 3600)) as page:
        gr.Markdown("# DINOv2 / DINOv3\nUpload an image or a short video; the model colours each pixel by class.")
        if demo.predictors:
            model_tabs(gr, demo, examples)
        if demo.searcher is not None:
            search_tab(gr, demo)
    return page


def model_tabs(gr: Any, demo: Demo, examples: list[str]) -> None:
    """The image and video tabs, and the model, mode and opacity controls above them."""
    names = list(demo.predictors)
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="model", visible=len(names) > 1)
        mode = gr.Radio(list(MODES), value="whole", label="inference mode (slide: sliding windows, slower)")
        alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="overlay opacity")
    with gr.Tab("Image"):
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="image", file_types=["image"], elem_id="image-upload")
                preview = gr.Image(label="the image", type="numpy", elem_id="preview", interactive=False, height=240)
                if examples:
                    gr.Examples(examples, inputs=upload, label="examples")
                run_image = gr.Button("Segment", variant="primary", elem_id="segment-image")
            with gr.Column():
                image_status = gr.Markdown(elem_id="image-status")
                overlay = gr.Image(label="overlay", type="numpy", elem_id="overlay", interactive=False)
                legend = gr.HTML(elem_id="legend")
        with gr.Row():
            colours = gr.Image(label="colour mask", type="numpy", elem_id="colour-mask", interactive=False)
            mask_file = gr.File(label="index mask (PNG: pixel value = class index)", elem_id="mask-file")
    with gr.Tab("Video"):
        with gr.Row():
            # a file box, not a player: the browser cannot play .avi or many .mp4 codecs, which it would
            # report as "Video not playable" although the server reads them
            video_in = gr.File(label="short video", file_types=["video"], elem_id="video-upload")
            video_out = gr.Video(label="segmented", elem_id="video-out", interactive=False)
        status = gr.Markdown(elem_id="video-status")
        run_video = gr.Button("Segment video", variant="primary", elem_id="segment-video")
    inputs = [model, mode, alpha]
    image_outputs = [overlay, colours, legend, mask_file, image_status]
    run_image.click(
        shown_in_page(demo.segment_image, len(image_outputs)), [upload, *inputs], image_outputs, concurrency_id="model"
    )
    upload.change(demo.preview, upload, preview, queue=False)

    def video(path, name, mode, alpha, progress=gr.Progress()):
        return shown_in_page(demo.segment_video, 2)(path, name, mode, alpha, progress)

    run_video.click(video, [video_in, *inputs], [video_out, status], concurrency_id="model")


def search_tab(gr: Any, demo: Demo) -> None:
    """Upload an image, see its nearest images in the index with their cosine similarity."""
    with gr.Tab("Search"):
        with gr.Row():
            with gr.Column():
                query = gr.File(label="image", file_types=["image"], elem_id="search-upload")
                k = gr.Slider(1, min(50, demo.searcher.size), value=min(10, demo.searcher.size), step=1, label="k")
                run = gr.Button("Search", variant="primary", elem_id="search-image")
            with gr.Column():
                search_status = gr.Markdown(elem_id="search-status")
                gallery = gr.Gallery(label="nearest images", columns=5, elem_id="search-results")
    search = shown_in_page(demo.search_image, 2, failed="Could not search with it")
    run.click(search, [query, k], [gallery, search_status], concurrency_id="model")


def example_images(args: argparse.Namespace) -> list[str]:
    """--examples, else the first of EXAMPLE_DIRS that exists (the demo's validation images after
    `make demo`); none is said once."""
    if args.examples:
        if not Path(args.examples).is_dir():
            raise FileNotFoundError(f"--examples {args.examples}: no such folder")
        return [str(path) for path in list_image_files(args.examples)[:8]]
    folder = next((folder for folder in EXAMPLE_DIRS if folder.is_dir()), None)
    if folder is None:
        print(f"no example images ({' nor '.join(map(str, EXAMPLE_DIRS))} exists; --examples DIR offers some)")
        return []
    return [str(path) for path in list_image_files(folder)[:8]]


def load_predictors(args: argparse.Namespace) -> dict[str, Predictor]:
    """Every --model (named by its file, with its run folder when names repeat), or Meta's head."""
    if not args.model:
        return {f"{args.head_weights} ({args.backbone})": load_predictor(args, mode=InferenceMode())}
    predictors = {}
    for path in args.model:
        name = Path(path).name if sum(Path(p).name == Path(path).name for p in args.model) == 1 else str(path)
        predictors[name] = load_predictor(argparse.Namespace(**{**vars(args), "model": path}), mode=InferenceMode())
    return predictors


def served_paths(examples: list[str]) -> list[str]:
    """What the web server may hand out besides the files the page made (results, thumbnails, which
    Gradio copies into its cache): the example images, each file by itself, never a folder."""
    return [str(Path(path).resolve()) for path in examples if Path(path).is_file()]


def check_port_free(host: str, port: int) -> None:
    """Fail now, naming --port, if the address cannot be listened on (in use, not this machine's)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        try:
            probe.bind(address)
        except OSError as err:
            raise UserError(
                f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); "
                "another program uses it: choose another --port"
            ) from err


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web demo needs gradio: pip install -r requirements-app.txt")
    if args.model and args.head_weights or not (args.model or args.head_weights or args.index):
        raise UserError(
            "give --model CKPT (one or more) or --head-weights NAME|FILE (Meta's released head), and/or --index NAME"
        )
    check_port_free(args.host, args.port)  # before the models load, not after
    predictors = load_predictors(args) if args.model or args.head_weights else {}
    searcher = Searcher(Path(args.index), args.device, args.amp) if args.index else None
    examples = example_images(args)
    if args.host not in LOCAL_HOSTS:
        print(
            f"warning: --host {args.host}: anyone who can reach this machine on port {args.port} can use the models "
            "and upload files (there is no login); use it on a trusted network only"
        )
    out_dir = Path(tempfile.mkdtemp(prefix="dinov2-demo-"))
    try:
        demo = Demo(
            predictors, out_dir, max_pixels=args.max_pixels, max_frames=args.max_video_frames, searcher=searcher
        )
        page = build_page(demo, examples)
        page.queue(default_concurrency_limit=1, max_size=args.queue_size)
        print(f"models: {', '.join(f'{name} ({p.engine})' for name, p in predictors.items())}", flush=True)
        try:
            page.launch(
                server_name=args.host,
                server_port=args.port,
                max_file_size=f"{args.max_upload_mb:g}mb",
                show_error=True,
                allowed_paths=served_paths(examples),
                share=args.share,
                quiet=True,  # Gradio's own lines advise editing launch(); ours name the flags
                prevent_thread_lock=True,
            )
        except OSError as err:  # taken between the check and the launch; Gradio names its own server_port
            if "port" not in str(err):
                raise
            raise UserError(
                f"--port {args.port}: cannot listen on {args.host}:{args.port} (in use); choose another --port"
            ) from err
        print(f"Running on local URL:  {page.local_url}", flush=True)
        if args.share:
            print(f"Public URL (through Gradio's share servers, valid for a week): {page.share_url}", flush=True)
        page.block_thread()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
