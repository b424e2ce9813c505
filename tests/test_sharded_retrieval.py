"""Retrieval past one machine: the index chosen for a memory budget, embedding shards and their
checks, the streamed build tuned to a recall target, the memory-mapped index folder, the HTTP
server; then `retrieve.py embed / build / search / serve` as a user runs them — a killed embed
resumes to the same vectors, and torchrun's two processes give one process's vectors."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dinokit.data.synthetic import clustered_unit_vectors, make_image_folders
from dinokit.errors import UserError
from dinokit.retrieval.index_folder import (
    IndexFolder,
    build_index_folder,
    exact_neighbours,
)
from dinokit.retrieval.index_plan import POINTS_PER_CELL, candidates, cell_count, choose_index, parse_size
from dinokit.retrieval.server import RequestError, SearchService, make_server
from dinokit.retrieval.shards import (
    Embeddings,
    ShardError,
    ShardPlan,
    complete_rows,
    read_file_list,
    write_shard,
    write_vector_shards,
)
from dinokit.writing import atomic_folder
from tests.conftest import ROOT, run_script

pytest.importorskip("faiss", reason="pip install faiss-cpu")
pytest.importorskip("pyarrow", reason="pip install pyarrow")
OFFLINE = ("--source", "timm", "--no-pretrained", "--workers", "0")
EMBED = ("--imgsz", "56", "--crop-pct", "1", "--features", "gem", "--batch", "3", *OFFLINE)
KEY = {"format": 1, "backbone": {"backbone": "generated"}, "imgsz": 0, "features": "test", "scales": [1.0]}
REAL_CONNECT, REAL_CREATE_CONNECTION = socket.socket.connect, socket.create_connection


@pytest.fixture
def loopback(monkeypatch):
    """Connections to this machine's loopback address only (the tests' own HTTP server)."""

    def connect(sock, address):
        assert address[0] in ("127.0.0.1", "localhost"), f"network access attempted: {address}"
        return REAL_CONNECT(sock, address)

    def create_connection(address, *args, **kwargs):
        assert address[0] in ("127.0.0.1", "localhost"), f"network access attempted: {address}"
        return REAL_CREATE_CONNECTION(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)


# --- the index for a budget ---------------------------------------------------------------------


def test_sizes_are_read_as_autofaiss_writes_them():
    assert parse_size("600MB") == 600 * 10**6 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("4000") == 4000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("6 apples")


def test_a_million_vectors_in_600mb_get_scalar_codes_and_the_estimate_holds():
    """The issue's case: full vectors (1.5 GB) do not fit, 8-bit codes (d bytes + an id) do."""
    choice = choose_index(10**6, 384, parse_size("600MB"))
    assert choice.kind == "ivf-sq8" and choice.factory == "IVF2048,SQ8" and choice.bytes <= 600 * 10**6
    assert choose_index(10**6, 384, parse_size("2GB")).kind == "hnsw"
    assert choose_index(10**5, 384, parse_size("1GB")).kind == "exact"


def test_a_budget_too_small_names_the_smallest_that_works():
    with pytest.raises(UserError, match="the smallest") as refused:
        choose_index(10**6, 384, parse_size("10MB"))
    suggested = str(refused.value).split("--max-memory ")[-1]
    assert choose_index(10**6, 384, parse_size(suggested)).kind == "opq-ivf-pq"


def test_cells_are_a_power_of_two_with_enough_training_points():
    for count in (1_000, 20_000, 10**6, 10**9):
        cells = cell_count(count)
        assert cells & (cells - 1) == 0 and cells * POINTS_PER_CELL <= count
    kinds = [c.kind for c in candidates(10**6, 384)]
    assert kinds.index("ivf-flat") < kinds.index("ivf-sq8") < kinds.index("opq-ivf-pq")
    assert all("HNSW32" in c.factory for c in candidates(10**8, 384) if c.cells)  # an HNSW coarse quantizer


# --- shards ---------------------------------------------------------------------------------------


def test_every_shard_goes_to_exactly_one_process():
    plan = ShardPlan(tuple(Path(f"{i}.jpg") for i in range(23)), 4)
    for world in (1, 2, 3, 8):
        mine = [plan.shards_of_rank(rank, world) for rank in range(world)]
        assert sorted(n for shards in mine for n in shards) == list(range(plan.count)) == list(range(6))
    assert plan.files_of(5) == (Path("20.jpg"), Path("21.jpg"), Path("22.jpg"))


def test_a_file_list_is_text_or_parquet_relative_to_its_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "files.txt").write_text("# a comment\na.jpg\n\n/abs/b.jpg\n")
    assert read_file_list(tmp_path / "files.txt") == [tmp_path / "a.jpg", Path("/abs/b.jpg")]
    pq.write_table(pa.table({"path": ["c.jpg", "/abs/d.jpg"]}), tmp_path / "files.parquet")
    assert read_file_list(tmp_path / "files.parquet") == [tmp_path / "c.jpg", Path("/abs/d.jpg")]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ShardError, match="empty.txt: lists no file"):
        read_file_list(tmp_path / "empty.txt")
    pq.write_table(pa.table({"file": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ShardError, match="other.parquet: not a parquet file with a `path` column"):
        read_file_list(tmp_path / "other.parquet")


@pytest.fixture
def shards(tmp_path) -> Embeddings:
    return write_vector_shards(tmp_path / "emb", clustered_unit_vectors(2500, 32, clusters=40), KEY, shard_size=1000)


def test_faulty_shards_are_named_in_one_line(shards):
    folder = shards.folders[0]
    np.save(folder / "emb_00001.npy", np.zeros((1000, 16), np.float32))  # another run's width
    with pytest.raises(ShardError, match=r"emb_00001.npy: 16-d vectors, the shards before it are 32-d"):
        Embeddings.open(folder)
    np.save(folder / "emb_00001.npy", np.zeros((999, 32), np.float32))
    with pytest.raises(ShardError, match=r"emb_00001.npy: 999 vectors but meta_00001.parquet lists 1000 files"):
        Embeddings.open(folder)
    (folder / "emb_00001.npy").unlink()
    with pytest.raises(
        ShardError,
        match=r"emb_00001.npy: missing \(shard 1 of 0..2 is not complete\); run the same embed command again",
    ):
        Embeddings.open(folder)


def test_folders_of_several_machines_build_one_collection(tmp_path):
    """Machines without a shared disk each embed a part of the list; `build` reads their folders in
    order: the same rows as one folder, and folders of other settings refused."""
    vectors = clustered_unit_vectors(900, 16, clusters=9)
    whole = write_vector_shards(tmp_path / "whole", vectors, KEY, shard_size=200)
    parts = [write_vector_shards(tmp_path / f"part{i}", vectors[i * 450 : (i + 1) * 450], KEY, shard_size=200)
             for i in range(2)]  # fmt: skip
    joined = Embeddings.open(tmp_path / "part0", tmp_path / "part1")
    assert joined.count == 900 and joined.rows == [200, 200, 50, 200, 200, 50] and len(joined.folders) == 2
    ids = np.array([0, 449, 450, 899])
    assert np.array_equal(joined.rows_at(ids), whole.rows_at(ids)) and parts[1].count == 450
    write_vector_shards(tmp_path / "other", vectors[:10], {**KEY, "features": "gem"}, shard_size=200)
    with pytest.raises(ShardError, match=r"other: embedded with other settings than .*part0 \(features test -> gem\)"):
        Embeddings.open(tmp_path / "part0", tmp_path / "other")


def test_a_shard_of_unreadable_files_only_is_complete_and_empty(shards):
    """`embed` writes such a shard with no width; the folder still opens with the others' width."""
    folder = shards.folders[0]
    write_shard(folder, 1, np.zeros((0, 0), np.float32), [], [(Path("a.jpg"), "not an image")], "float32")
    reopened = Embeddings.open(folder)
    assert reopened.rows == [1000, 0, 500] and reopened.dim == 32 and complete_rows(folder, 1) == 0
    assert np.array_equal(reopened.rows_at(np.array([1000])), shards.rows_at(np.array([2000])))


def test_a_missing_embedding_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(ShardError, match=r"none: no such folder; make it with: python retrieve.py embed --images DIR"):
        Embeddings.open(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ShardError, match=r"plain: no manifest.json in it"):
        Embeddings.open(tmp_path / "plain")


def test_exact_neighbours_stream_the_shards_and_leave_each_query_out(shards):
    vectors = np.concatenate([s.vectors for s in shards.shards()])
    own = np.array([0, 999, 1000, 2499])
    assert np.array_equal(shards.rows_at(own[::-1]), vectors[own[::-1]])  # any order, across shard edges
    found = exact_neighbours(shards, vectors[own], own, 5)
    similarities = vectors[own] @ vectors.T
    similarities[np.arange(4), own] = -np.inf
    assert (found == np.argsort(-similarities, axis=1, kind="stable")[:, :5]).all()


# --- the build ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf-flat", "ivf-sq8", "opq-ivf-pq"])
def test_each_kind_builds_from_shards_and_finds_stored_vectors(shards, tmp_path, kind):
    choice = choose_index(shards.count, shards.dim, 10**9, kind)
    report = build_index_folder(tmp_path / "index", shards, choice, recall_target=0.9)
    opened = IndexFolder.open(tmp_path / "index")
    assert opened.count == 2500 and opened.kind == kind and opened.settings["value"] == report.value
    assert opened.path_of(1234) == "vector_000001234"  # the id table: row i is the i-th vector's path
    assert report.recall >= 0.9 or kind == "opq-ivf-pq"  # product codes of 32-d vectors lose too much
    if kind != "opq-ivf-pq":  # tuned to the target with the smallest parameter reaching it
        assert [t["recall"] >= 0.9 for t in report.sweep[:-1]] == [False] * (len(report.sweep) - 1)
    stored = shards.rows_at(np.array([7, 2100]))
    _, rows = opened.search(stored, 1)
    assert kind == "opq-ivf-pq" or rows[:, 0].tolist() == [7, 2100]


def test_float16_shards_take_half_the_disk_and_find_the_same_neighbours(tmp_path):
    vectors = clustered_unit_vectors(3000, 64, clusters=30)
    halves = write_vector_shards(tmp_path / "f16", vectors, KEY, shard_size=1000, dtype="float16")
    full = write_vector_shards(tmp_path / "f32", vectors, KEY, shard_size=1000)
    size = lambda folder: (folder / "emb_00000.npy").stat().st_size  # noqa: E731
    assert size(halves.folders[0]) < 0.51 * size(full.folders[0])
    built = []
    for number, embeddings in enumerate((halves, full)):
        build_index_folder(tmp_path / f"index{number}", embeddings, choose_index(3000, 64, 10**9), recall_target=0.9)
        built.append(IndexFolder.open(tmp_path / f"index{number}"))
    queries = vectors[:50]
    assert (built[0].search(queries, 1)[1] == built[1].search(queries, 1)[1]).all()


def test_a_failed_build_leaves_the_previous_index(tmp_path):
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text("{}")

    def write(folder):
        (folder / "index.faiss").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"index: could not be written \(No space left on device\)"):
        atomic_folder(tmp_path / "index", write)
    assert [p.name for p in tmp_path.iterdir()] == ["index"] and (tmp_path / "index" / "index.json").read_text() == "{}"


# --- the server -----------------------------------------------------------------------------------


@pytest.fixture
def service(shards, tmp_path) -> SearchService:
    build_index_folder(tmp_path / "index", shards, choose_index(shards.count, shards.dim, 10**9), recall_target=0.9)
    return SearchService(IndexFolder.open(tmp_path / "index"), None, max_k=5, max_bytes=4096)


def test_a_vector_query_gets_its_neighbours_and_bad_queries_one_line(service, shards):
    vector = shards.rows_at(np.array([42]))[0]
    answer = service.search(json.dumps({"vector": (3 * vector).tolist(), "k": 3}).encode(), "application/json", {})
    assert answer["k"] == 3 and answer["results"][0] == {"id": 42, "path": "vector_000000042", "similarity": 1.0}
    faults = {
        b'{"vector": [1, 2]}': "vector: 2 values, the index holds 32-d vectors",
        json.dumps({"vector": vector.tolist(), "k": 6}).encode(): r"k: 6 outside 1..5",
        json.dumps({"vector": [float("nan")] * 32}).encode(): "non-finite",
        b"{not json": "not JSON",
    }
    for body, message in faults.items():
        with pytest.raises(RequestError, match=message):
            service.search(body, "application/json", {})
    with pytest.raises(RequestError, match="answers vectors only"):
        service.search(b"\xff\xd8", "image/jpeg", {})


def post(url, body, content_type="application/json"):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_server_answers_over_http_under_concurrent_load(service, shards, loopback):
    """A real client on localhost: health, a query, the size limit (413), 8 clients x 20 queries."""
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            assert json.loads(response.read()) == {"vectors": 2500, "dim": 32, "kind": "exact", "images": False}
        status, answer = post(
            f"{url}/search?k=2", json.dumps({"vector": shards.rows_at(np.array([9]))[0].tolist()}).encode()
        )
        assert status == 200 and [r["id"] for r in answer["results"]][:1] == [9] and len(answer["results"]) == 2
        status, answer = post(f"{url}/search", b"x" * 5000)
        assert status == 413 and "over the limit of 4096" in answer["error"]
        assert post(f"{url}/nothing", b"{}")[0] == 404

        wanted = np.random.default_rng(0).choice(2500, 160, replace=False)
        answers = [None] * len(wanted)

        def client(part):
            for i in part:
                body = json.dumps({"vector": shards.rows_at(np.array([wanted[i]]))[0].tolist(), "k": 1}).encode()
                answers[i] = post(f"{url}/search", body)

        threads = [threading.Thread(target=client, args=(range(j, len(wanted), 8),)) for j in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [(status, a["results"][0]["id"]) for status, a in answers] == [(200, int(w)) for w in wanted]
    finally:
        server.shutdown()
        server.server_close()


# --- the commands, as a user runs them ------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """14 readable images in class folders and one that is not an image."""
    root = make_image_folders(tmp_path_factory.mktemp("photos"), classes=2, n_train=6, n_val=1, size=(64, 48))
    (root / "train" / "class_0" / "broken.jpg").write_text("not an image")
    return root


def embed_command(images, out, *flags):
    return [sys.executable, str(ROOT / "retrieve.py"), "embed", "--images", str(images), "--out", str(out),
            "--shard-size", "4", *EMBED, *flags]  # fmt: skip


def stored(folder: Path) -> tuple[np.ndarray, list[str]]:
    embeddings = Embeddings.open(folder)
    return np.concatenate([s.vectors for s in embeddings.shards()]), list(embeddings.paths())


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embeddings") / "one_process"
    result = subprocess.run(embed_command(images, out), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "15 files in 4 shards of 4: 0 complete, 4 to embed by 1 process(es)" in result.stdout
    assert f"{out}: 14 vectors of 15 files (1 unreadable, skipped)" in result.stdout
    return out


@pytest.mark.slow
def test_embed_writes_shards_and_lists_what_it_skipped(reference, images):
    vectors, paths = stored(reference)
    assert vectors.shape == (14, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert str(images / "train" / "class_0" / "broken.jpg") not in paths and len(set(paths)) == 14
    skipped = [row for path in reference.glob("skipped_*.csv") for row in csv.DictReader(path.open())]
    assert [row["path"] for row in skipped] == [str(images / "train" / "class_0" / "broken.jpg")]
    assert "not a readable image" in skipped[0]["reason"]
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["files"] == 15 and manifest["shards"] == 4 and manifest["key"]["imgsz"] == 56


@pytest.mark.slow
def test_a_killed_embed_resumes_to_the_same_vectors(reference, images, tmp_path):
    """SIGKILL once the first shard is written; the rerun embeds only what is missing."""
    out = tmp_path / "killed"
    process = subprocess.Popen(embed_command(images, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (out / "meta_00000.parquet").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    complete = len(list(out.glob("meta_*.parquet")))
    assert 1 <= complete < 4  # killed while embedding
    result = subprocess.run(embed_command(images, out), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{complete} complete, {4 - complete} to embed" in result.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    (vectors, paths), (expected, expected_paths) = stored(out), stored(reference)
    assert paths == expected_paths and np.allclose(vectors, expected, atol=1e-6)


@pytest.mark.slow
def test_torchrun_processes_embed_their_own_shards_to_one_process_vectors(reference, images, tmp_path):
    out = tmp_path / "two_processes"
    command = embed_command(images, out)
    command[1:2] = ["-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "retrieve.py")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "to embed by 2 process(es)" in result.stdout
    (vectors, paths), (expected, expected_paths) = stored(out), stored(reference)
    assert paths == expected_paths and np.allclose(vectors, expected, atol=1e-5)


@pytest.mark.slow
def test_embed_refuses_a_folder_of_other_settings_in_one_line(reference, images):
    result = subprocess.run(embed_command(images, reference, "--dtype", "float16"), capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"--out {reference}: embedded with other settings (dtype float32 -> float16)" in result.stderr


@pytest.mark.slow
def test_build_search_and_serve_from_the_shards(reference, images, tmp_path, loopback):
    index = tmp_path / "photos_index"
    result = run_script("retrieve.py", "build", "--embeddings", reference, "--index", index, "--max-memory", "1MB")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{index}: Flat (exact): 14 x 384-d" in result.stdout and (index / "index.faiss").is_file()

    np.save(tmp_path / "queries.npy", stored(reference)[0][[3, 8]])
    result = run_script("retrieve.py", "search", "--index", index, "--vectors", tmp_path / "queries.npy", "--k", "2",
                        "--out-dir", tmp_path / "by_vector")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "by_vector" / "search.csv").read_text().splitlines()
    assert rows[0] == "query,rank,path,similarity" and rows[1].startswith("0,1,") and len(rows) == 5

    query = images / "val" / "class_1"
    result = run_script("retrieve.py", "search", "--index", index, "--query", query, "--k", "1", *EMBED,
                        "--out-dir", tmp_path / "by_image")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "by_image" / "search.png").is_file()

    result = run_script("retrieve.py", "search", "--index", index, "--query", query, "--imgsz", "112", *OFFLINE)
    assert result.returncode == 1 and "built with --backbone small --imgsz 56" in result.stderr
    assert "python retrieve.py embed --images DIR --out NEW_EMB_DIR" in result.stderr

    server = subprocess.Popen(
        [sys.executable, str(ROOT / "retrieve.py"), "serve", "--index", str(index), "--port", "0", *EMBED],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        line = server.stdout.readline()
        assert line.startswith(f"Serving 14 vectors of {index} at http://127.0.0.1:"), server.stderr.read()
        url = line.split(" at ")[1].split()[0]
        image = next(query.iterdir())
        status, answer = post(f"{url}/search?k=1", image.read_bytes(), "image/jpeg")
        searched = (tmp_path / "by_image" / "search.csv").read_text().splitlines()
        expected = next(r for r in searched if r.startswith(f"{image},1,")).split(",")[2]
        assert status == 200 and answer["results"][0]["path"] == expected
        status, answer = post(f"{url}/search", b"not an image", "image/jpeg")
        assert status == 400 and answer == {"error": "the body is not a readable image"}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_build_faults_are_one_line_and_replace_nothing(reference, tmp_path):
    occupied = tmp_path / "photos"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep")
    result = run_script("retrieve.py", "build", "--embeddings", reference, "--index", occupied, "--max-memory", "1GB")
    assert result.returncode == 1 and "exists and is not an index folder of `build`" in result.stderr
    assert (occupied / "mine.txt").read_text() == "keep"
    result = run_script("retrieve.py", "build", "--embeddings", reference, "--index", tmp_path / "i",
                        "--max-memory", "1KB")  # fmt: skip
    assert result.returncode == 1 and "the smallest (Flat) needs 21.5 KB: give at least" in result.stderr
    assert not (tmp_path / "i").exists()


def test_the_bench_extrapolates_filling_linearly_and_training_as_cells_squared():
    from bench import on_paper

    measured = {"ivf-sq8": {"vectors": 10**6, "build_seconds": 40.0, "train_seconds": 4.0, "cells": 2048}}
    rows = on_paper(measured)
    assert rows[2] == "| 1e+08 | IVF16384_HNSW32,SQ8 | 39.25 GB | 0.1 h | 1.0 h |"  # 36 s x 100; 4 s x 8^2
    assert rows[3].startswith("| 1e+09 | IVF65536_HNSW32,SQ8 |") and rows[3].endswith("| 1.1 h | 10.0 h |")
