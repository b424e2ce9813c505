"""retrieve.py: the metrics by hand, the index kinds against exact search, incremental updates, the
index file's faults, and the four sub-commands run as a user runs them on generated photos whose
transformed copies a random-init backbone still finds (distinct colour layouts per image)."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dinokit.backbones.weights_file import WeightsChangedError, weights_identity
from dinokit.errors import UserError
from dinokit.retrieval.collection import Collection, FileRecord, IndexFileError, plan_update
from dinokit.retrieval.duplicates import duplicate_groups
from dinokit.retrieval.vector_index import build_index, normalised, recall_against_exact
from dinokit.runs.run_folder import RunLock
from metrics import retrieval_scores
from tests.conftest import run_script

pytest.importorskip("faiss", reason="pip install faiss-cpu")
OFFLINE = ("--source", "timm", "--no-pretrained", "--workers", "0")
EMBED = ("--imgsz", "56", "--crop-pct", "1", "--features", "gem", *OFFLINE)


def test_retrieval_scores_by_hand():
    relevant = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=bool)
    scores = retrieval_scores(relevant, np.array([2, 1, 0]), ks=(1, 2))
    # query 1: AP = (1/1 + 2/3) / 2; query 2: AP = (1/4) / 1; query 3 has nothing relevant: left out
    assert scores["queries"] == 2
    assert scores["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 4) / 2)
    assert scores["recall@1"] == 0.5 and scores["recall@2"] == 0.5
    assert scores["map@2"] == pytest.approx((1 / 2 + 0) / 2)  # first: precision@1 / min(2, 2)


def test_duplicates_are_connected_components():
    rng = np.random.default_rng(0)
    base = normalised(rng.normal(size=(3, 64)))
    near = lambda v: normalised(v[None] + 0.01 * rng.normal(size=(1, 64)))[0]  # noqa: E731
    vectors = np.stack([base[0], near(base[0]), base[1], near(base[1]), near(base[1]), base[2]])
    assert duplicate_groups(vectors, 0.99) == [[2, 3, 4], [0, 1]]
    assert duplicate_groups(vectors, 1.01) == []


@pytest.mark.parametrize("kind, lowest", [("hnsw", 0.9), ("ivfpq", 0.3)])
def test_approximate_indexes_measure_their_recall(kind, lowest):
    """A graph index finds nearly all exact neighbours; compressed codes lose some, and say so."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    vectors = normalised(centres[rng.integers(0, 50, 5000)] + 0.3 * rng.normal(size=(5000, 32)))
    recall = recall_against_exact(build_index(vectors, kind), vectors)
    assert lowest < recall <= 1.0 and (kind != "ivfpq" or recall < 1.0)
    assert recall_against_exact(build_index(vectors, "exact"), vectors) == 1.0


def test_adding_a_folder_keeps_the_others_and_removing_needs_replace(tmp_path):
    """`index --images B` on an index of A adds B; --replace drops A; "removed" means deleted only."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = [tmp_path / "a" / f"{i}.jpg" for i in range(3)]
    b = [tmp_path / "b" / "x.jpg"]
    for path in a + b:
        path.write_bytes(b"x")
    stored = [FileRecord.of(path) for path in a]
    a[2].unlink()
    plan = plan_update(stored, b)
    assert plan.keep == [0, 1] and plan.embed == b and plan.removed == [str(a[2])] and plan.dropped == []
    plan = plan_update(stored, b, replace=True)
    assert plan.keep == [] and plan.embed == b and plan.removed == [str(a[2])]
    assert plan.dropped == [str(a[0]), str(a[1])]


def test_an_update_embeds_only_what_changed(tmp_path):
    files = [tmp_path / f"{name}.jpg" for name in "abc"]
    for path in files:
        path.write_bytes(b"x")
    stored = [FileRecord.of(path) for path in files]
    files[1].write_bytes(b"longer")  # changed
    files[2].unlink()  # removed
    (tmp_path / "d.jpg").write_bytes(b"y")  # new
    plan = plan_update(stored, sorted(tmp_path.glob("*.jpg")))
    assert plan.keep == [0] and [p.name for p in plan.embed] == ["b.jpg", "d.jpg"] and plan.changed == {str(files[1])}
    assert plan.removed == [str(files[2])]


def test_an_index_file_cut_short_is_named(tmp_path):
    vectors = normalised(np.random.default_rng(0).normal(size=(10, 8)))
    collection = Collection({"features": "gem"}, [FileRecord(str(i), 1, 1) for i in range(10)], vectors)
    collection.rebuild("exact")
    path = tmp_path / "c.index"
    collection.save(path)
    loaded = Collection.load(path)
    assert loaded.key == {"features": "gem"} and np.array_equal(loaded.vectors, vectors) and loaded.index.ntotal == 10
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(IndexFileError, match="not a readable index file .cut short"):
        Collection.load(path)


def weights_collection(tmp_path, content=b"weights v1"):
    """A collection whose key names a weights file by content, as `index --weights FILE` stores it."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(content)
    identity = weights_identity(weights)
    backbone = {"backbone": "small", "pretrained": True, "weights": identity["path"], "weights_file": identity}
    key = {"backbone": backbone, "imgsz": 56, "crop_pct": 1.0, "features": "gem", "scales": [1.0]}
    return Collection(key, folders=[str(tmp_path / "photos")]), weights


def test_an_index_refuses_weights_that_changed_and_takes_a_moved_copy(tmp_path):
    collection, weights = weights_collection(tmp_path)
    index = tmp_path / "p.index"
    collection.check_weights(index)  # the same file: fine
    copy = tmp_path / "elsewhere" / "copy.pth"
    copy.parent.mkdir()
    copy.write_bytes(weights.read_bytes())
    collection.check_weights(index, given=str(copy))  # another path, the same content: used from there
    assert collection.key["backbone"]["weights"] == str(copy.resolve())

    other = tmp_path / "other.pth"
    other.write_bytes(b"weights v2")
    with pytest.raises(WeightsChangedError, match=r"--weights .*other.pth: not the weights .*p.index was embedded"):
        collection.check_weights(index, given=str(other))

    collection, weights = weights_collection(tmp_path)
    weights.write_bytes(b"weights v2")  # replaced in place: same name, same size, other content
    with pytest.raises(WeightsChangedError, match=r"w.pth: the weights file .*p.index was embedded with has changed"):
        collection.check_weights(index)
    weights.unlink()
    with pytest.raises(WeightsChangedError, match="is gone"):
        collection.check_weights(index)


def test_a_relative_weights_path_is_stored_absolute_with_its_hash(tmp_path, monkeypatch):
    """A relative --weights would find another file from another working directory."""
    import argparse

    from cli import backbone_identity

    (tmp_path / "w.pth").write_bytes(b"abc")
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(
        backbone="small", registers=False, source="timm", hub_dir=None, weights="w.pth", no_pretrained=False, seed=0
    )
    identity = backbone_identity(args)
    assert identity["weights"] == str(tmp_path / "w.pth")
    assert identity["weights_file"]["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_changed_setting_is_named_not_repeated():
    """`index`'s refusal says what differs (it used to print the same flags on both sides)."""
    from dinokit.retrieval.collection import key_differences

    one = {"path": "/w.pth", "size": 3, "sha256": "a" * 64}
    backbone = {"backbone": "small", "registers": False, "source": "timm", "pretrained": True, "weights": "/w.pth"}
    key = {"backbone": {**backbone, "weights_file": one}, "imgsz": 56, "crop_pct": 1.0, "features": "gem"}
    other = {**key, "backbone": {**backbone, "weights_file": {**one, "sha256": "b" * 64}}}
    (difference,) = key_differences(key, other)
    assert difference.startswith("weights /w.pth (3 bytes, sha256 aaaaaaaaaaaa) -> /w.pth (3 bytes, sha256 bbbb")
    assert key_differences(key, {**key, "imgsz": 112}) == ["imgsz 56 -> 112"]
    two_names = {**key, "backbone": {**key["backbone"], "backbone": "dinov2_vits14"}}
    assert key_differences(key, two_names) == []  # `small` is dinov2_vits14
    assert key_differences(key, {**key, "backbone": {**key["backbone"], "registers": True}}) == [
        "backbone dinov2_vits14 -> dinov2_vits14_reg"
    ]
    moved = {**key, "backbone": {**backbone, "weights": "/elsewhere/w.pth", "weights_file": {**one, "path": "/x"}}}
    assert key_differences(key, moved) == []  # the same content at another path: the same embeddings


def test_files_of_other_kinds_given_as_an_index_or_a_model_are_named(tmp_path):
    """Recognised by content: an empty file, a NumPy array, a checkpoint as --index; an index as --model."""
    import torch

    from dinokit.data.file_kinds import FileKindError, read_torch_file

    cases = {
        "empty.index": "is an empty file, not a retrieve.py index",
        "vectors.npy": r"is a NumPy array \(.npy\), not a retrieve.py index",
        "best_model_iou.pth": "is a training checkpoint, not a retrieve.py index; it goes to --model",
    }
    np.save(tmp_path / "vectors.npy", np.zeros((3, 4), np.float32))
    torch.save({"model": {}, "model_info": {}}, tmp_path / "best_model_iou.pth")
    (tmp_path / "empty.index").write_bytes(b"")
    for name, message in cases.items():
        with pytest.raises(FileKindError, match=message):
            Collection.load(tmp_path / name)
    collection, _ = weights_collection(tmp_path)
    collection.vectors = normalised(np.ones((2, 8)))
    collection.records = [FileRecord("a", 1, 1), FileRecord("b", 1, 1)]
    collection.rebuild("exact")
    collection.save(tmp_path / "p.index")
    with pytest.raises(FileKindError, match="is a retrieval index, not a training checkpoint; it goes to --index"):
        read_torch_file(tmp_path / "p.index", "training checkpoint")


def test_ivfpq_on_too_few_images_is_refused_before_embedding():
    from dinokit.errors import UserError
    from dinokit.retrieval.vector_index import IVFPQ_MIN_VECTORS, check_kind

    check_kind("ivfpq", IVFPQ_MIN_VECTORS)
    build_index(normalised(np.random.default_rng(0).normal(size=(IVFPQ_MIN_VECTORS, 32))), "ivfpq")
    with pytest.raises(UserError, match="--kind ivfpq: needs at least 16 images .* has 15; use --kind exact"):
        check_kind("ivfpq", 15)


def test_results_never_go_inside_an_indexed_folder(tmp_path):
    """`--index photos.index` used to put search.csv into photos/, where the next `index` embeds it."""
    import argparse

    import retrieve

    collection, _ = weights_collection(tmp_path)
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    args = argparse.Namespace(index=str(tmp_path / "photos.index"), out_dir=None)
    assert retrieve.results_folder(args, collection) == tmp_path / "photos_results"
    for inside in (tmp_path / "photos", tmp_path / "photos" / "sub" / "results"):
        with pytest.raises(UserError, match=f"--out-dir {inside}: inside {tmp_path / 'photos'}, a folder this index"):
            retrieve.results_folder(argparse.Namespace(index=args.index, out_dir=str(inside)), collection)
    args = argparse.Namespace(index=str(tmp_path / "photos" / "p.index"), out_dir=None)  # the index inside it
    with pytest.raises(UserError, match=r"--index \(results go beside it; or give --out-dir\)"):
        retrieve.results_folder(args, collection)


def make_photos(root, count=6, seed=0):
    """Photos of distinct colour layouts (blobs on a gradient), and a copy of each that was resized
    to 80 %, cropped by 6 % and re-encoded as JPEG at quality 60: what copy detection must link."""
    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True)
    (root / "copies").mkdir()
    for index in range(count):
        image = np.zeros((120, 160, 3), np.uint8)
        image[:] = rng.integers(0, 255, 3)
        for _ in range(4):
            centre = tuple(int(v) for v in rng.integers(10, 150, 2))
            cv2.circle(image, centre, int(rng.integers(15, 40)), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
        cv2.imwrite(str(root / "photos" / f"photo_{index}.png"), image)
        copy = cv2.resize(image, (128, 96))[6:-6, 8:-8]
        cv2.imwrite(str(root / "copies" / f"photo_{index}_copy.jpg"), copy, [cv2.IMWRITE_JPEG_QUALITY, 60])
    return root


@pytest.mark.slow
def test_index_search_duplicates_and_updates(tmp_path):
    root = make_photos(tmp_path / "data")
    (root / "photos" / "broken.jpg").write_text("not an image")
    index = tmp_path / "idx" / "photos.index"
    result = run_script("retrieve.py", "index", "--images", root / "photos", root / "copies", "--index", index, *EMBED)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 unchanged, 12 new, 0 changed, 0 removed (deleted from disk), 1 unreadable (skipped)" in result.stdout
    assert "skipped " + str(root / "photos" / "broken.jpg") in result.stdout

    out = tmp_path / "search"
    result = run_script(
        "retrieve.py", "search", "--index", index, "--query", root / "photos", "--k", "1", "--exclude-self",
        "--out-dir", out, *EMBED,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv_rows(out / "search.csv"))
    assert len(rows) == 6 and all(r["path"].endswith(f"{r['query'].split('/')[-1][:-4]}_copy.jpg") for r in rows)
    assert (out / "search.png").stat().st_size > 1000

    threshold = min(float(r["similarity"]) for r in rows)
    result = run_script("retrieve.py", "duplicates", "--index", index, "--threshold", str(threshold), "--out-dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    groups = {}
    for row in csv_rows(out / "duplicates.csv"):
        groups.setdefault(row["group"], set()).add(row["path"].split("/")[-1].split(".")[0].removesuffix("_copy"))
    assert sorted(map(sorted, groups.values())) == [[f"photo_{i}"] for i in range(6)]
    assert len(list(out.glob("duplicates_*.png"))) == 6
    result = run_script("retrieve.py", "duplicates", "--index", index, "--threshold", "1.5", "--out-dir", out)
    assert result.returncode == 0 and "0 groups" in result.stdout, result.stderr[-2000:]
    assert not list(out.glob("duplicates_*.png")), "an earlier run's group sheets were left beside 0 groups"

    shutil.copy(root / "photos" / "photo_0.png", root / "photos" / "photo_new.png")
    (root / "copies" / "photo_5_copy.jpg").unlink()
    cv2.imwrite(str(root / "photos" / "photo_1.png"), np.full((50, 50, 3), 9, np.uint8))
    result = run_script("retrieve.py", "index", "--images", root / "photos", "--index", index, *EMBED)  # copies kept
    assert "10 unchanged, 1 new, 1 changed, 1 removed (deleted from disk), 1 unreadable" in result.stdout, (
        result.stdout + result.stderr
    )

    (root / "photos" / "photo_2.png").unlink()  # the index is stale now
    query = ("--query", root / "copies" / "photo_2_copy.jpg", "--k", "2", "--out-dir", out)
    result = run_script("retrieve.py", "search", "--index", index, *query)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "1 indexed file(s) are gone from disk" in result.stdout
        and "refresh it: python retrieve.py index" in result.stdout
    )
    assert "photo_2.png" in (out / "search.csv").read_text()  # the CSV says what the index holds
    before = (out / "search.csv").read_bytes()
    broken = ("--query", root / "photos" / "broken.jpg", "--k", "2", "--out-dir", out)
    result = run_script("retrieve.py", "search", "--index", index, *broken)
    assert result.returncode == 1 and "no readable image among 1 file(s); nothing searched" in result.stderr
    assert (out / "search.csv").read_bytes() == before


@pytest.mark.slow
def test_retrieval_recall_at_1_is_classify_1nn_accuracy(tmp_path):
    from dinokit.data.synthetic import make_image_folders

    folders = make_image_folders(tmp_path / "classes", classes=3, n_train=5, n_val=3)
    embed = ("--imgsz", "56", "--crop-pct", "1", *OFFLINE)
    result = run_script(
        "classify.py", "--data-dir", folders, "--out-dir", tmp_path / "cls", "--method", "knn", "--k", "1",
        "--features", "cls+avgpool", *embed,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    knn = json.loads((tmp_path / "cls" / "metrics.json").read_text())["knn"]["1"]["top1"]
    index = tmp_path / "train.index"
    flags = ("--index", index, "--features", "cls+avgpool", *embed)
    assert run_script("retrieve.py", "index", "--images", folders / "train", *flags).returncode == 0
    result = run_script("retrieve.py", "evaluate", "--query", folders / "val", "--out-dir", tmp_path / "ev", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads((tmp_path / "ev" / "retrieval_metrics.json").read_text())
    assert scores["queries"] == 9 and scores["recall@1"] == pytest.approx(knn)
    assert 0 < scores["map"] <= 1


@pytest.mark.slow
def test_retrieval_faults_are_one_line(tmp_path):
    root = make_photos(tmp_path / "data", count=3)
    index = tmp_path / "p.index"
    assert run_script("retrieve.py", "index", "--images", root / "photos", "--index", index, *EMBED).returncode == 0

    def error(*args):
        result = run_script("retrieve.py", *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        return result.stderr.strip().splitlines()[-1]

    assert "--k 5: the index holds 3 images" in error(
        "search", "--index", index, "--query", root / "copies", "--k", "5"
    )
    other = error("search", "--index", index, "--query", root / "copies", "--imgsz", "112")
    assert "rebuild it: python retrieve.py index" in other and "--imgsz 112" in other
    (tmp_path / "empty").mkdir()
    assert "no image files" in error("search", "--index", index, "--query", tmp_path / "empty")
    changed = error(
        "index", "--images", root / "photos", "--index", index, "--features", "avgpool", *EMBED[:-7], *OFFLINE
    )
    assert "add --rebuild" in changed
    lock = RunLock(tmp_path, name="p.index.lock")
    lock.acquire()
    try:
        assert "another run is using" in error("index", "--images", root / "photos", "--index", index, *EMBED)
    finally:
        lock.release()
    good = index.read_bytes()
    index.write_bytes(good[: len(good) // 3])
    assert "cut short" in error("search", "--index", index, "--query", root / "copies")


def csv_rows(path):
    import csv

    with open(path) as handle:
        yield from csv.DictReader(handle)


@pytest.mark.slow
def test_the_demo_searches_an_index(tmp_path):
    pytest.importorskip("gradio", reason="pip install -r requirements-app.txt")
    import app

    root = make_photos(tmp_path / "data", count=4)
    index = tmp_path / "p.index"
    assert run_script("retrieve.py", "index", "--images", root / "photos", "--index", index, *EMBED).returncode == 0
    searcher = app.Searcher(index, "cpu", "off")
    demo = app.Demo({}, tmp_path, max_pixels=1e6, max_frames=1, searcher=searcher)
    gallery, status = demo.search_image(str(root / "copies" / "photo_2_copy.jpg"), 2)
    assert gallery[0][1].endswith("photo_2.png") and status.startswith("2 nearest of 4 images")
    for shown, _ in gallery:  # thumbnails the demo made in its own folder, never the indexed files
        assert Path(shown).is_relative_to(tmp_path) and not Path(shown).is_relative_to(root)
        assert Image.open(shown).format == "JPEG" and max(Image.open(shown).size) <= app.THUMBNAIL_SIDE
    (root / "photos" / "photo_2.png").unlink()
    gallery, status = demo.search_image(str(root / "copies" / "photo_2_copy.jpg"), 2)
    assert (
        len(gallery) == 1 and "1 of them gone from disk or unreadable (e.g. photo_2.png): the index is stale" in status
    )
    (tmp_path / "notes.jpg").write_text("not an image")
    shown = app.shown_in_page(demo.search_image, 2, failed="Could not search with it")(str(tmp_path / "notes.jpg"), 2)
    assert shown[0] is None and shown[1].startswith("**Could not search with it:** notes.jpg")
    assert app.build_page(demo, []) is not None  # a page with the search tab alone


@pytest.mark.slow
def test_bench_measures_the_index_kinds_and_the_duplicate_threshold(tmp_path):
    photos = make_photos(tmp_path / "data", count=3) / "photos"
    others = ("epochs", "inference", "modes", "memory", "classification", "export", "backbones", "eomt")
    result = run_script("bench.py", "--skip", *others, "--index-sizes", "2000", "--photos", photos)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| gem | its copy JPEG quality 50 |" in result.stdout and "| gem | another photo |" in result.stdout
    assert any(line.startswith("gem: ") and "threshold" in line for line in result.stdout.splitlines())  # a verdict
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 2,000 |")]
    assert [row[1].strip() for row in rows] == ["exact", "hnsw", "ivfpq"]
    assert float(rows[0][5]) == 1.0 and all(0 < float(row[5]) <= 1 for row in rows)


@pytest.mark.parametrize("backbone, dim", [("dinov3_vits16", 384), ("dinov3_convnext_tiny", 768)])
def test_dinov3_backbones_make_descriptors(backbone, dim, tmp_path):
    """DINOv3 ViTs and ConvNeXts (one stage, no class token of their own) embed for retrieval too."""
    import torch

    from dinokit.retrieval.descriptors import embed_files

    photos = sorted((make_photos(tmp_path / "data", count=2) / "photos").iterdir())
    identity = {"backbone": backbone, "registers": False, "source": "timm", "hub_dir": None, "weights": None}
    key = {"backbone": {**identity, "pretrained": False, "seed": 0}, "imgsz": 64, "crop_pct": 1.0, "scales": [1.0]}
    for features in ("cls+avgpool", "gem"):
        vectors, kept, failures = embed_files({**key, "features": features}, photos, device=torch.device("cpu"))
        assert vectors.shape == (2, dim * (2 if features == "cls+avgpool" else 1)) and kept == [0, 1] and not failures
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
