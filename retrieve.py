"""Search image collections by DINOv2 / DINOv3 embeddings, in a FAISS index on disk.

    python retrieve.py index --images photos/ --index photos          # outputs/retrieval/photos.index
    python retrieve.py index --images photos/ --index photos          # again: only new or changed files embedded
    python retrieve.py search --index photos --query query.jpg --k 10  # search.csv + search.png (contact sheet)
    python retrieve.py duplicates --index photos --threshold 0.95      # groups of near-duplicate images
    python retrieve.py evaluate --index emds                           # class folders = relevant sets: mAP, R@k

Collections past one machine's memory (docs/retrieval.md, "Large collections"):

    python retrieve.py embed --images photos/ --out emb/                # shards emb_00000.npy + meta_00000.parquet
    torchrun --nproc-per-node 4 retrieve.py embed --list files.txt --out emb/   # each process its own shards
    python retrieve.py build --embeddings emb/ --index big --max-memory 600MB  # outputs/retrieval/big/
    python retrieve.py search --index big --query query.jpg             # or --vectors queries.npy
    python retrieve.py serve --index big --port 8000                    # HTTP JSON on 127.0.0.1

`index` embeds every image under the folders (recursively) with a frozen backbone — classify.py's
preprocessing, `--features cls|avgpool|cls+avgpool|gem`, optionally at several `--scales` — and
stores table, embeddings and index in one file written atomically. Exact search (inner product of
L2-normalised vectors) by default up to 200,000 images; `--kind hnsw|ivfpq` (or `auto` beyond that)
builds an approximate index and prints its recall@10 against exact search. Unreadable images are
reported and skipped. docs/retrieval.md has the rest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import config
from cli import (
    ArgumentParser,
    FlagParser,
    add_backbone_args,
    add_device_args,
    at_least,
    backbone_identity,
    byte_size,
    int_between,
    output_folder,
    positive,
    run_cli,
    unit_interval,
)
from dinokit.classification.embeddings import build_backbone
from dinokit.data.file_kinds import sniff
from dinokit.errors import UserError, one_line
from dinokit.retrieval.collection import (
    Collection,
    FileRecord,
    IndexFileError,
    checked_key,
    collect_images,
    describe_key,
    index_path,
    key_differences,
    plan_update,
)
from dinokit.retrieval.descriptors import DESCRIPTORS, embed_files
from dinokit.retrieval.duplicates import duplicate_groups
from dinokit.retrieval.index_folder import IndexFolder, build_index_folder, index_folder_path, is_index_folder
from dinokit.retrieval.index_plan import INDEX_KINDS, choose_index
from dinokit.retrieval.server import SearchService, make_server
from dinokit.retrieval.shards import (
    DTYPES,
    Embeddings,
    ShardError,
    ShardPlan,
    claim_embedding_folder,
    complete_rows,
    manifest_for,
    read_file_list,
    write_shard,
)
from dinokit.retrieval.vector_index import KINDS, build_index, check_kind, normalised, recall_against_exact
from dinokit.runs.reports import save_neighbour_gallery, write_csv
from dinokit.runs.run_folder import RunLock, claim_output_folder
from dinokit.writing import remove_stale_temp_files, write_json
from metrics import retrieval_scores
from model_config import canonical_name
from utils import init_distributed, on_main_process, rank, select_device, select_precision, world_size

KEY_FORMAT = 1
SHEET_QUERIES = 20  # queries drawn in a contact sheet
SHEET_GROUPS = 50  # duplicate groups drawn, one PNG each


def embedding_key(args: argparse.Namespace) -> dict[str, Any]:
    """What an index's embeddings depend on; an index is searched and updated with its own."""
    return {
        "format": KEY_FORMAT,
        "backbone": backbone_identity(args),
        "imgsz": args.imgsz,
        "crop_pct": args.crop_pct,
        "features": args.features,
        "scales": list(args.scales),
    }


def embed(key: dict[str, Any], files: list[Path], args: argparse.Namespace) -> tuple[np.ndarray, list[int], list]:
    """`embed_files` with this command's device, precision, batch and workers."""
    device = select_device(args.device)
    return embed_files(
        key, files, device=device, amp_dtype=select_precision(device, args.amp), batch=args.batch, workers=args.workers
    )


def index_images(args: argparse.Namespace) -> None:
    """`index`: embed what is new or changed, drop what is gone, rebuild the index, write it whole."""
    path = index_path(args.index)
    claim_output_folder(path.parent, flag="--index")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path.parent, name=f"{path.name}.lock")  # one index run at a time on this index
    lock.acquire()
    try:
        files = collect_images(args.images)
        key = embedding_key(args)
        stored = stored_collection(path, rebuild=args.rebuild)
        differences = key_differences(stored.key, key) if stored is not None else []
        if differences and not args.rebuild:
            raise IndexFileError(
                f"{path}: built with other settings ({'; '.join(differences)}); add --rebuild "
                "to re-embed every image with these settings, or give another --index"
            )
        if stored is not None and not differences:
            stored.key = key  # the same embeddings; the weights file's path as given now (a moved copy)
        folders = [str(Path(folder).resolve()) for folder in args.images]
        if stored is not None and not args.replace:
            folders = list(dict.fromkeys([*stored.folders, *folders]))
        if stored is not None and args.rebuild:  # every image again, the folders and files kept
            stored = Collection(key, [FileRecord(r.path, -1, -1) for r in stored.records])
        collection = updated(stored or Collection(key), files, args)
        collection.folders = folders
        started = time.perf_counter()
        collection.rebuild(args.kind)
        collection.recall = recall_against_exact(collection.index, collection.vectors)
        built = time.perf_counter() - started
        collection.save(path)
        recall = "" if collection.kind == "exact" else f"; recall@10 against exact search {collection.recall:.4f}"
        print(
            f"{path}: {len(collection.records)} images, {collection.vectors.shape[1]}-d {key['features']}, "
            f"{collection.kind} index built in {built:.1f} s{recall}"
        )
    finally:
        lock.release()


def stored_collection(path: Path, *, rebuild: bool) -> Collection | None:
    """The index at `path`, if any; with --rebuild, an unreadable one (cut short) is replaced, but a
    file of another kind (a checkpoint, a photo) is never overwritten."""
    if not path.exists():
        return None
    try:
        return Collection.load(path)
    except IndexFileError:
        if rebuild and sniff(path) in ("retrieval index", "damaged zip"):
            print(f"{path}: unreadable; --rebuild replaces it")
            return None
        raise


def updated(collection: Collection, files: list[Path], args: argparse.Namespace) -> Collection:
    """`collection` brought up to date with `files`: unchanged rows kept, the rest embedded; the
    images of other folders indexed before are kept unless --replace."""
    plan = plan_update(collection.records, files, replace=args.replace)
    check_kind(args.kind, len(plan.keep) + len(plan.embed))  # before the embedding, not after it
    vectors, kept, failures = (np.zeros((0, 0), np.float32), [], [])
    if plan.embed:
        started = time.perf_counter()
        vectors, kept, failures = embed(collection.key, plan.embed, args)
        rate = len(plan.embed) / (time.perf_counter() - started)
        print(f"Embedded {len(kept)} images ({rate:.1f} images/s)")
    for path, reason in failures:
        print(f"skipped {path}: {reason}")
    old = collection.vectors[plan.keep] if collection.vectors is not None else None
    parts = [part for part in (old, vectors) if part is not None and len(part)]
    records = [collection.records[row] for row in plan.keep] + [plan.now[str(plan.embed[i])] for i in kept]
    if not records:
        raise UserError(f"no readable image among {len(files)} files ({len(failures)} unreadable): nothing to index")
    changed = sum(str(plan.embed[i]) in plan.changed for i in kept)
    dropped = f", {len(plan.dropped)} dropped (--replace: not under --images)" if plan.dropped else ""
    print(
        f"{len(plan.keep)} unchanged, {len(kept) - changed} new, {changed} changed, "
        f"{len(plan.removed)} removed (deleted from disk){dropped}, {len(failures)} unreadable (skipped)"
    )
    check_kind(args.kind, len(records))
    return Collection(collection.key, records, np.concatenate(parts).astype(np.float32))


def searched_path(args: argparse.Namespace) -> Path:
    """--index NAME: the folder `build` made (outputs/retrieval/NAME/) or the file `index` made
    (outputs/retrieval/NAME.index); a path is taken as it is."""
    folder = index_folder_path(args.index)
    return folder if is_index_folder(folder) else index_path(args.index)


def open_index(args: argparse.Namespace, *, embeds_queries: bool = True) -> Collection | IndexFolder:
    """The --index, of either kind. When queries are images, the embedding flags given with it must
    be the ones it was built with, and the weights file that embedded it must still hold the same
    weights (queries are embedded by it)."""
    path = searched_path(args)
    target = IndexFolder.open(path) if is_index_folder(path) else Collection.load(path)
    if not embeds_queries:
        return target
    given = getattr(args, "given_flags", frozenset())
    weights = args.weights if "weights" in given else None
    target.key = checked_key(target.key, path, weights, lambda flags: target.rebuild_command(path, flags))
    key = target.key
    built = {
        "backbone": canonical_name(key["backbone"]["backbone"], key["backbone"].get("registers", False)),
        "imgsz": key["imgsz"],
        "features": key["features"],
    }
    asked = {name: getattr(args, name) if name in given else value for name, value in built.items()}
    if "backbone" in given or "registers" in given:  # `small` and `dinov2_vits14` name one backbone
        asked["backbone"] = canonical_name(args.backbone, args.registers)
    if asked != built:
        raise IndexFileError(
            f"{path}: built with {describe_key(key)}; for --backbone {asked['backbone']} --imgsz {asked['imgsz']} "
            f"--features {asked['features']} rebuild it: "
            + target.rebuild_command(
                path, f"--backbone {asked['backbone']} --imgsz {asked['imgsz']} --features {asked['features']}"
            )
        )
    return target


def one_file_index(args: argparse.Namespace) -> Collection:
    """--index for the commands that read every vector (duplicates, evaluate): a one-file index."""
    target = open_index(args, embeds_queries=args.command == "evaluate" and args.query is not None)
    if not isinstance(target, Collection):
        raise IndexFileError(
            f"--index {args.index}: {args.command} reads every vector, which a `build` index keeps in its "
            "shards only; build a one-file index of the images: python retrieve.py index --images DIR --index NAME"
        )
    return target


def results_folder(args: argparse.Namespace, collection: Collection | IndexFolder, inputs: list = ()) -> Path:
    """--out-dir, default NAME_results/ beside the index, checked before the work (dinokit/runs/run_folder.py):
    never inside a folder the index holds or a query folder (both are read recursively: the next
    `index` or `search` would embed the results, and a user's file of the same name would be replaced)."""
    index = searched_path(args)
    folder = output_folder(args.out_dir) if args.out_dir else index.with_name(f"{index.stem}_results")
    flag = "--out-dir" if args.out_dir else "--index (results go beside it; or give --out-dir)"
    read = [(p, "a folder this index holds") for p in collection.indexed_folders()]
    read += [(Path(p), "the --query folder") for p in inputs if Path(p).is_dir()]
    for inside, what in read:
        if folder.resolve().is_relative_to(inside.resolve()):
            raise UserError(
                f"{flag} {folder}: inside {inside}, {what}: the next run would read the results as images "
                "and a file of the same name there would be replaced; choose another --out-dir"
            )
    return claim_output_folder(folder, inputs=inputs, flag=flag.split()[0])


def stale_warning(collection: Collection | IndexFolder, paths: list[str], args: argparse.Namespace) -> list[str]:
    """The `paths` deleted since the index was built, said once (they are left out of the sheets)."""
    missing = collection.missing_files(paths)
    if missing:
        print(
            f"warning: {len(missing)} indexed file(s) are gone from disk (e.g. {missing[0]}): the index is stale; "
            f"refresh it: {collection.refresh_command(searched_path(args))}"
        )
    return missing


def query_vectors(
    args: argparse.Namespace, target: Collection | IndexFolder, queries: list[Path]
) -> tuple[list[str], np.ndarray]:
    """The queries' names and vectors: the `queries` images embedded as the index was, or the rows
    of --vectors (named by row number)."""
    if args.vectors is not None:
        vectors = read_query_vectors(Path(args.vectors), target.dim)
        return [str(row) for row in range(len(vectors))], vectors
    vectors, kept, failures = embed(target.key, queries, args)
    for path, reason in failures:
        print(f"skipped query {path}: {reason}")
    if not kept:
        raise UserError(f"--query {args.query}: no readable image among {len(queries)} file(s); nothing searched")
    return [str(queries[i]) for i in kept], vectors


def read_query_vectors(path: Path, dim: int) -> np.ndarray:
    """--vectors Q.npy: [Q, dim] (or one [dim] vector), normalised here like every stored vector."""
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"--vectors {path}: not a readable .npy file ({one_line(err)})") from err
    vectors = vectors.reshape(1, -1) if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[1] != dim or not np.issubdtype(vectors.dtype, np.number):
        raise UserError(f"--vectors {path}: shape {vectors.shape} {vectors.dtype}; the index holds {dim}-d vectors")
    if not np.isfinite(vectors).all():
        raise UserError(f"--vectors {path}: holds a non-finite value")
    return normalised(vectors)


def find(args: argparse.Namespace) -> None:
    """`search`: the top-k of each query image (or vector), as CSV and a contact sheet."""
    collection = open_index(args, embeds_queries=args.vectors is None)
    queries = collect_images([args.query]) if args.query else []  # a folder without images is refused first
    total = collection.count - (1 if args.exclude_self else 0)
    if args.k > total:
        raise UserError(f"--k {args.k}: the index holds {collection.count} images")
    inputs = [args.query] if args.query else [args.vectors]
    out_dir = results_folder(args, collection, inputs=inputs)
    names, vectors = query_vectors(args, collection, queries)
    similarities, rows = collection.search(vectors, args.k + (1 if args.exclude_self else 0))
    results = []
    for query, sims, found in zip(names, similarities, rows):
        hits = [(collection.path_of(int(r)), float(s)) for r, s in zip(found, sims) if r >= 0]
        if args.exclude_self:
            hits = [(p, s) for p, s in hits if p != query][: args.k]
        results.append((query, hits))
    missing = set(stale_warning(collection, sorted({p for _, hits in results for p, _ in hits}), args))
    write_csv(
        [
            {"query": q, "rank": i + 1, "path": p, "similarity": round(s, 6)}
            for q, hits in results
            for i, (p, s) in enumerate(hits)
        ],
        out_dir / "search.csv",
    )
    drawn = "" if args.vectors else ", search.png"
    if not args.vectors:  # a contact sheet shows the query image beside its hits
        sheet = [
            (Path(query), None, [(Path(p), Path(p).name, s) for p, s in hits if p not in missing])
            for query, hits in results[:SHEET_QUERIES]
        ]
        save_neighbour_gallery(sheet, out_dir / "search.png")
    print(f"{len(results)} queries, top {args.k} each: {out_dir / 'search.csv'}{drawn}")


def duplicates(args: argparse.Namespace) -> None:
    """`duplicates`: groups of images whose similarity reaches --threshold, as CSV and a PNG per group."""
    collection = one_file_index(args)
    out_dir = results_folder(args, collection)
    groups = duplicate_groups(collection.vectors, args.threshold)
    missing = set(stale_warning(collection, [collection.records[m].path for g in groups for m in g], args))
    for old in out_dir.glob("duplicates_[0-9][0-9][0-9][0-9].png"):  # an earlier run's sheets are not this one's
        old.unlink()
    rows = []
    for number, group in enumerate(groups, 1):
        paths = [Path(collection.records[member].path) for member in group]
        similarities = (collection.vectors[group] @ collection.vectors[group[0]]).tolist()  # to the group's first
        rows += [
            {"group": number, "path": str(path), "similarity_to_first": round(similarity, 6)}
            for path, similarity in zip(paths, similarities)
        ]
        shown = [(p, s) for p, s in zip(paths, similarities) if str(p) not in missing]
        if number <= SHEET_GROUPS and len(shown) > 1:
            sheet = [(shown[0][0], None, [(p, p.name, s) for p, s in shown[1:]])]
            save_neighbour_gallery(sheet, out_dir / f"duplicates_{number:04d}.png")
    write_csv(rows, out_dir / "duplicates.csv")
    images = sum(len(g) for g in groups)
    print(
        f"{len(groups)} groups of near-duplicates ({images} images) at similarity >= {args.threshold:g}: "
        f"{out_dir / 'duplicates.csv'}"
    )


def evaluate(args: argparse.Namespace) -> None:
    """`evaluate`: class folders as relevant sets (an image's class = its folder's name); each image
    of the index (leave-one-out) or of --query queries the whole index. mAP, mAP@k, recall@k as JSON."""
    collection = one_file_index(args)
    labels = np.array([Path(r.path).parent.name for r in collection.records])
    if args.query:
        queries = collect_images([args.query])
        vectors, kept, _ = embed(collection.key, queries, args)
        query_labels, exclude = np.array([queries[i].parent.name for i in kept]), None
    else:
        vectors, query_labels, exclude = collection.vectors, labels, np.arange(len(labels))
    _, ranked = build_index(collection.vectors, "exact").search(vectors, len(labels))
    if exclude is not None:  # leave-one-out: each query's own row is not a result
        ranked = np.array([row[row != own][: len(labels) - 1] for row, own in zip(ranked, exclude)])
    relevant = labels[ranked] == query_labels[:, None]
    totals = np.array([(labels == label).sum() for label in query_labels]) - (exclude is not None)
    scores = retrieval_scores(relevant, totals, ks=args.ks)
    report = {"index": str(searched_path(args)), "queries_from": args.query or "the index (leave-one-out)", **scores}
    out = results_folder(args, collection) / "retrieval_metrics.json"
    write_json(out, report)
    figures = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "queries")
    print(
        f"{scores.get('queries', 0)} queries over {len(labels)} images, {len(set(labels))} classes: {figures}"
        f"\nWrote {out}"
    )


def embed_shards(args: argparse.Namespace) -> None:
    """`embed`: the files' descriptors as shards (dinokit/retrieval/shards.py); under torchrun each
    process embeds its own shards; a rerun embeds only the shards that are not complete."""
    device = init_distributed(args.device)
    files = read_file_list(Path(args.list)) if args.list else collect_images(args.images)
    key = embedding_key(args)
    plan = ShardPlan(tuple(files), args.shard_size)
    out = Path(args.out)

    def claim() -> None:
        for stale in remove_stale_temp_files(out) if out.is_dir() else []:
            print(f"Removed {stale.name}: a shard file of a process that was killed")
        claim_embedding_folder(out, manifest_for(key, plan, args.dtype))

    on_main_process(claim)
    done = {n for n in range(plan.count) if complete_rows(out, n) is not None}
    todo = [n for n in plan.shards_of_rank(rank(), world_size()) if n not in done]
    print(
        f"{len(files):,} files in {plan.count} shards of {args.shard_size:,}: {len(done)} complete, "
        f"{plan.count - len(done)} to embed by {world_size()} process(es)"
    )
    backbone = build_backbone(key["backbone"], device) if todo else None
    started, embedded = time.perf_counter(), 0
    for number in todo:
        shard_files = plan.files_of(number)
        vectors, kept, failures = embed_files(
            key,
            list(shard_files),
            device=device,
            amp_dtype=select_precision(device, args.amp),
            batch=args.batch,
            workers=args.workers,
            backbone=backbone,
        )
        records = [FileRecord.of(shard_files[i]) for i in kept]
        if not kept:  # every file of the shard unreadable: an empty shard, its width unknown
            vectors = np.zeros((0, 0), np.float32)
        write_shard(out, number, vectors, records, failures, args.dtype)
        embedded += len(kept)
        rate = embedded / (time.perf_counter() - started)
        note = f", {len(failures)} unreadable (listed in skipped_{number:05d}.csv)" if failures else ""
        print(f"shard {number:05d}: {len(kept)} vectors{note}; {rate:.1f} images/s", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process's shards are written before the total is read
    rows = [complete_rows(out, n) for n in range(plan.count)]
    missing = [n for n, count in enumerate(rows) if count is None]
    if missing:  # several machines under torchrun, each writing to its own disk
        raise ShardError(
            f"--out {out}: {len(missing)} of {plan.count} shards are not there (e.g. {missing[0]:05d}); under "
            "torchrun on several machines --out must be a folder they share, or embed a --list part on each"
        )
    total = sum(rows)
    print(f"{out}: {total:,} vectors of {len(files):,} files ({len(files) - total:,} unreadable, skipped)")


def build_from_shards(args: argparse.Namespace) -> None:
    """`build`: an index for the shards under a memory budget, tuned to a recall target, written as
    a folder (dinokit/retrieval/index_folder.py)."""
    embeddings = Embeddings.open(*map(Path, args.embeddings))
    path = index_folder_path(args.index)
    if path.exists() and not is_index_folder(path):
        raise UserError(f"--index {path}: exists and is not an index folder of `build`; give another --index")
    choice = choose_index(embeddings.count, embeddings.dim, args.max_memory, args.kind)
    print(
        f"{embeddings.count:,} {embeddings.dim}-d vectors in {len(embeddings.rows)} shards: building {choice.factory}"
    )
    report = build_index_folder(path, embeddings, choice, recall_target=args.recall_target, seed=args.seed)
    print(f"{path}: {report.summary()}")
    if report.recall < args.recall_target:
        print(
            f"warning: recall@10 {report.recall:.4f} is below --recall-target {args.recall_target} at the largest "
            f"{report.parameter or 'setting'} tried; a larger --max-memory gives a less compressed index"
        )


def serve(args: argparse.Namespace) -> None:
    """`serve`: HTTP JSON queries on the --index (dinokit/retrieval/server.py) until interrupted."""
    target = open_index(args, embeds_queries=not args.vectors_only)
    embed_image = None
    if not args.vectors_only:
        device = select_device(args.device)
        backbone = build_backbone(target.key["backbone"], device)
        amp = select_precision(device, args.amp)

        def embed_image(path: Path) -> np.ndarray:
            return embed_files(target.key, [path], device=device, amp_dtype=amp, batch=1, backbone=backbone)[0]

    service = SearchService(target, embed_image, max_k=args.max_k, max_bytes=args.max_request_bytes)
    server = make_server(service, args.host, args.port)
    host, port = server.server_address[:2]
    print(
        f"Serving {target.count:,} vectors of {searched_path(args)} at http://{host}:{port} "
        "(POST /search, GET /health; Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=FlagParser)
    index = commands.add_parser("index", help="embed the images under folders into an index (or update it)")
    index.add_argument(
        "--images", nargs="+", required=True, metavar="DIR", help="folders (searched recursively) or files"
    )
    index.add_argument(
        "--kind", default="auto", choices=KINDS, help="exact, hnsw, ivfpq, or auto (exact up to 200,000)"
    )
    index.add_argument("--rebuild", action="store_true", help="re-embed every image (another backbone, size, features)")
    index.add_argument(
        "--replace",
        action="store_true",
        help="index only the --images given, dropping the images of folders indexed before (default: add to them)",
    )
    embed_parser = commands.add_parser(
        "embed", help="embed a large collection as shards (resumable; each torchrun process its own shards)"
    )
    files = embed_parser.add_mutually_exclusive_group(required=True)
    files.add_argument("--images", nargs="+", metavar="DIR", help="folders (searched recursively) or files")
    files.add_argument("--list", metavar="FILE", help="the files, one path a line (text) or a parquet `path` column")
    embed_parser.add_argument("--out", required=True, metavar="EMB_DIR", help="the shards' folder")
    embed_parser.add_argument("--shard-size", type=at_least(1), default=10_000, help="files a shard")
    embed_parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="stored vectors (float16: half the disk)"
    )
    build_parser = commands.add_parser("build", help="an index of embedding shards under a memory budget")
    build_parser.add_argument(
        "--embeddings", required=True, nargs="+", metavar="EMB_DIR", help="the folder(s) `embed` wrote, in this order"
    )
    build_parser.add_argument("--index", required=True, metavar="NAME", help="outputs/retrieval/NAME/, or a path")
    build_parser.add_argument(
        "--max-memory", type=byte_size, required=True, metavar="SIZE", help="the index's size at most: 600MB, 4GB"
    )
    build_parser.add_argument(
        "--recall-target", type=unit_interval, default=0.9, help="recall@10 against exact search to tune to"
    )
    build_parser.add_argument(
        "--kind", default="auto", choices=("auto", *INDEX_KINDS), help="auto: the best that fits (docs/retrieval.md)"
    )
    build_parser.add_argument("--seed", type=int, default=0, help="the training sample and the recall queries")
    search_parser = commands.add_parser("search", help="the nearest indexed images of query images (or vectors)")
    queries = search_parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--query", metavar="FILE|DIR", help="query images")
    queries.add_argument("--vectors", metavar="Q.npy", help="query vectors [Q, d]; the CSV's `query` is the row number")
    search_parser.add_argument("--k", type=at_least(1), default=10)
    search_parser.add_argument(
        "--exclude-self", action="store_true", help="a query that is in the index is not its own hit"
    )
    dup = commands.add_parser("duplicates", help="groups of near-duplicate images in an index")
    dup.add_argument(
        "--threshold", type=positive, default=0.95, help="cosine similarity that makes two images duplicates"
    )
    score = commands.add_parser("evaluate", help="mAP and recall@k with class folders as relevant sets")
    score.add_argument(
        "--query", default=None, metavar="DIR", help="class folders of query images (default: the index, leave-one-out)"
    )
    score.add_argument("--ks", type=at_least(1), nargs="+", default=[1, 5, 10], metavar="K")
    server = commands.add_parser("serve", help="answer HTTP JSON queries (an image or a vector) from an index")
    server.add_argument("--port", type=int_between(0, 65535), default=8000, help="0: a free port, printed")
    server.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines (no authentication)")
    server.add_argument("--max-k", type=at_least(1), default=100, help="the most results a query may ask for")
    server.add_argument(
        "--max-request-bytes", type=at_least(1), default=10 * 2**20, help="a larger body is refused (413)"
    )
    server.add_argument("--vectors-only", action="store_true", help="no backbone: answer vector queries only")
    for sub in (index, search_parser, dup, score, server):
        add_shared_flags(sub)
    add_embedding_flags(embed_parser)
    return parser


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--index", required=True, metavar="NAME", help="outputs/retrieval/NAME.index or NAME/ (build), or a path"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where results go (default: NAME_results/ beside the index); never inside an indexed folder",
    )
    add_embedding_flags(parser)


def add_embedding_flags(parser: argparse.ArgumentParser) -> None:
    """What makes a descriptor (its key) and how it is computed."""
    parser.add_argument("--features", default="cls", choices=DESCRIPTORS, help="the descriptor (docs/retrieval.md)")
    parser.add_argument("--imgsz", type=int, default=224, help="centre-crop side, a multiple of the patch size")
    parser.add_argument(
        "--crop-pct", type=positive, default=0.875, help="resize the short side to imgsz / crop-pct first"
    )
    parser.add_argument("--scales", type=positive, nargs="+", default=[1.0], help="multi-scale: e.g. 0.707 1 1.414")
    parser.add_argument("--batch", type=at_least(1), default=32, help="images per forward")
    parser.add_argument("--workers", type=at_least(0), default=config.WORKERS, help="image decoding processes")
    parser.add_argument("--seed", type=int, default=0, help="the draw of a random-init backbone")
    add_backbone_args(parser)
    add_device_args(parser)


COMMANDS = {
    "index": index_images,
    "embed": embed_shards,
    "build": build_from_shards,
    "search": find,
    "serve": serve,
    "duplicates": duplicates,
    "evaluate": evaluate,
}


def main(args: argparse.Namespace) -> None:
    COMMANDS[args.command](args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
