"""Panoptic and instance segmentation as a user runs it: train.py, evaluate.py (its COCO files
re-scored as panopticapi and pycocotools score them), infer_image.py, export.py, the notebook and the
demo on a generated COCO-format shapes set; and --task segmentation --head eomt. The units are in
test_panoptic.py."""

import json

import numpy as np
import pytest
from PIL import Image

from dinokit.errors import UserError
from tests.conftest import OFFLINE, run_script

pytestmark = pytest.mark.slow


# -- the scripts, as a user runs them ------------------------------------------------------------------


@pytest.fixture(scope="module")
def panoptic_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("panoptic") / "run"
    flags = ("--task", "panoptic", "--imgsz", "112", "84", "--batch", "3", "--queries", "12", "--fine-tune")
    result = run_script(
        "train.py", "--data-dir", shapes, "--out-dir", out, "--epochs", "2", "--lr", "3e-4", *flags, *OFFLINE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.slow
def test_training_records_pq_and_chooses_the_best_checkpoint_on_it(panoptic_run):
    out, stdout = panoptic_run
    assert (out / "best_model_pq.pth").is_file() and (out / "pq.png").is_file()
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert all(f"valid_{name}" in header for name in ("pq", "mask_ap", "miou"))
    report = json.loads((out / "best_validation.json").read_text())
    assert {"pq", "sq", "rq", "pq_things", "pq_stuff", "mask_ap", "miou"} <= set(report)


@pytest.mark.slow
def test_evaluate_writes_coco_files_that_rescore_to_its_summary(panoptic_run, shapes, tmp_path):
    """The PQ of the files it wrote, computed as panopticapi's pq_compute does from files, is the
    one its summary line (its last before "Wrote") reports."""
    out, _ = panoptic_run
    result = run_script(
        "evaluate.py", "--model", out / "best_model_pq.pth", "--data-dir", shapes, "--out-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-2]
    assert last.startswith("PQ ") and "| mask AP " in last and "| mIoU " in last
    written = json.loads((tmp_path / "panoptic_valid.json").read_text())
    truth = json.loads((shapes / "annotations" / "panoptic_valid.json").read_text())
    pq = panopticapi_pq(truth, shapes / "annotations" / "panoptic_valid", written, tmp_path / "panoptic_valid")
    assert float(last.split("|")[0].split()[1]) == pytest.approx(pq, abs=1e-4)
    results = json.loads((tmp_path / "instances_valid_results.json").read_text())
    assert all({"image_id", "category_id", "segmentation", "score"} <= set(r) for r in results)


def panopticapi_pq(truth, truth_pngs, predicted, predicted_pngs):
    """panopticapi's pq_compute (evaluation.py: pq_compute_single_core + PQStat.pq_average), restated
    on the files: PNG ids and segments_info, areas of the truth from its JSON."""
    stats = {c["id"]: [0.0, 0, 0, 0] for c in truth["categories"]}
    by_image = {a["image_id"]: a for a in predicted["annotations"]}
    for gt_ann in truth["annotations"]:
        pred_ann = by_image[gt_ann["image_id"]]
        pan_gt = coco_ids(truth_pngs / gt_ann["file_name"])
        pan_pred = coco_ids(predicted_pngs / pred_ann["file_name"])
        gt_segms = {el["id"]: dict(el) for el in gt_ann["segments_info"]}
        pred_segms = {el["id"]: dict(el) for el in pred_ann["segments_info"]}
        for label, count in zip(*np.unique(pan_pred, return_counts=True)):
            if label != 0:
                pred_segms[label]["area"] = count
        pairs = {}
        for label, count in zip(*np.unique(pan_gt.astype(np.uint64) * 256**3 + pan_pred, return_counts=True)):
            pairs[(int(label // 256**3), int(label % 256**3))] = count
        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in pairs.items():
            if gt_label not in gt_segms or pred_label not in pred_segms or gt_segms[gt_label]["iscrowd"] == 1:
                continue
            if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
                continue
            union = (
                pred_segms[pred_label]["area"]
                + gt_segms[gt_label]["area"]
                - intersection
                - pairs.get((0, pred_label), 0)
            )
            if intersection / union > 0.5:
                stats[gt_segms[gt_label]["category_id"]][0] += intersection / union
                stats[gt_segms[gt_label]["category_id"]][1] += 1
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)
        crowd = {}
        for gt_label, info in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if info["iscrowd"] == 1:
                crowd[info["category_id"]] = gt_label
                continue
            stats[info["category_id"]][3] += 1
        for pred_label, info in pred_segms.items():
            if pred_label in pred_matched:
                continue
            ignored = pairs.get((0, pred_label), 0) + pairs.get((crowd.get(info["category_id"], -1), pred_label), 0)
            if ignored / info["area"] > 0.5:
                continue
            stats[info["category_id"]][2] += 1
    scores = [iou / (tp + 0.5 * fp + 0.5 * fn) for iou, tp, fp, fn in stats.values() if tp + fp + fn > 0]
    return sum(scores) / len(scores)


def coco_ids(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


@pytest.mark.slow
def test_an_instance_model_scores_mask_ap_as_pycocotools_does_on_its_results_file(shapes, tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "run"
    flags = ("--task", "instance", "--imgsz", "112", "84", "--batch", "3", "--queries", "12", "--fine-tune")
    result = run_script("train.py", "--data-dir", shapes, "--out-dir", out, "--epochs", "1", *flags, *OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "best_model_ap.pth").is_file()
    result = run_script("evaluate.py", "--model", out / "best_model_ap.pth", "--out-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(next((tmp_path / "eval").glob("eval_*.json")).read_text())
    truth = COCO(str(shapes / "annotations" / "instances_valid.json"))
    detections = json.loads((tmp_path / "eval" / "instances_valid_results.json").read_text())
    evaluator = COCOeval(truth, truth.loadRes(detections), iouType="segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert ours["mask_ap"] == pytest.approx(max(evaluator.stats[0], 0.0), abs=1e-4)


@pytest.mark.slow
def test_infer_image_writes_a_coco_png_its_segments_and_a_drawing(panoptic_run, shapes, tmp_path):
    out, _ = panoptic_run
    result = run_script(
        "infer_image.py",
        "--model",
        out / "best_model_pq.pth",
        "--input",
        shapes / "valid_images",
        "--out-dir",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    segments = json.loads((tmp_path / "valid_0000_segments.json").read_text())["segments_info"]
    ids = np.asarray(Image.open(tmp_path / "valid_0000_panoptic.png").convert("RGB"), dtype=np.int64)
    assert ids.shape[:2] == (84, 112)
    present = set(np.unique(ids[..., 0] + 256 * ids[..., 1]).tolist()) - {0}
    assert present == {s["id"] for s in segments}
    assert (tmp_path / "valid_0000.jpg").is_file()


@pytest.mark.slow
def test_export_writes_class_and_mask_logits_that_match_pytorch(panoptic_run, tmp_path):
    out, _ = panoptic_run
    result = run_script("export.py", "--model", out / "best_model_pq.pth", "--out", tmp_path / "m.onnx")
    assert result.returncode == 0 and "check passed" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_the_notebook_shows_a_panoptic_run_with_the_cells_of_every_task(panoptic_run, shapes):
    from tests.test_inference import run_notebook

    out, _ = panoptic_run
    outputs = run_notebook(
        f"DATA_DIR = {str(shapes)!r}\nCHECKPOINT = {str(out / 'best_model_pq.pth')!r}\nHEAD_WEIGHTS = None\n"
        "NUM_SAMPLES = 2\nDEVICE = 'cpu'\nMODE = 'whole'\nSCALES = [1.0]\nFLIP = False"
    )
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3  # samples, curves, predictions
    assert any("PQ " in o.get("text", "") and "(3 images" in o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_the_demo_shows_instances_and_refuses_sliding_windows(panoptic_run, shapes, tmp_path):
    import app
    from dinokit.prediction.modes import InferenceMode
    from inference import Predictor
    from tests.test_inference import make_video

    out, _ = panoptic_run
    predictor = Predictor.from_checkpoint(out / "best_model_pq.pth", "cpu", "off", InferenceMode())
    (tmp_path / "results").mkdir()
    demo = app.Demo({"shapes": predictor}, tmp_path / "results", max_pixels=50_000, max_frames=3)
    image = str(shapes / "valid_images" / "valid_0000.jpg")
    drawn, colours, table, png, status = demo.segment_image(image, "shapes", "whole", 0.5)
    assert drawn.shape == colours.shape == (84, 112, 3) and "<table" in table and png.endswith("_panoptic.png")
    with pytest.raises(UserError, match="one pass"):
        demo.segment_image(image, "shapes", "slide", 0.5)
    make_video(tmp_path / "clip.mp4", frames=3, size=(112, 84))
    clip, status = demo.segment_video(str(tmp_path / "clip.mp4"), "shapes", "whole", 0.5)
    assert clip.endswith(".webm") and status.startswith("3 frames")


@pytest.mark.slow
def test_segmentation_with_the_eomt_head_trains_and_scores_miou_like_the_linear_head(tiny_dataset, tmp_path):
    from tests.conftest import train_cli

    out = tmp_path / "eomt"
    result = train_cli(tiny_dataset, out, "--head", "eomt", "--queries", "6", "--fine-tune")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Valid Epoch mIOU" in result.stdout and (out / "best_model_iou.pth").is_file()
    result = run_script(
        "evaluate.py", "--model", out / "best_model_iou.pth", "--data-dir", tiny_dataset, "--mode", "slide"
    )
    assert result.returncode == 0 and "mIoU" in result.stdout, result.stderr[-3000:]  # sliding windows, as any head
