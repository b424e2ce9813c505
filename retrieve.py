"""Search image collections by DINOv2 / DINOv3 embeddings, in a FAISS index on disk.

    python retrieve.py index --images photos/ --index photos          # outputs/retrieval/photos.index
    python retrieve.py index --images photos/ --index photos          # again: only new or changed files embedded
    python retrieve.py search --index photos --query query.jpg --k 10  # search.csv + search.png (contact sheet)
    python retrieve.py duplicates --index photos --threshold 0.95      # groups of near-duplicate images
    python retrieve.py evaluate --index emds                           # class folders = relevant sets: mAP, R@k

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

import config
from cli import (
    ArgumentParser,
    FlagParser,
    add_backbone_args,
    add_device_args,
    at_least,
    backbone_identity,
    output_folder,
    positive,
    run_cli,
)
from dinokit.data.file_kinds import sniff
from dinokit.errors import UserError
from dinokit.retrieval.collection import (
    Collection,
    FileRecord,
    IndexFileError,
    collect_images,
    describe_key,
    index_path,
    key_differences,
    plan_update,
)
from dinokit.retrieval.descriptors import DESCRIPTORS, embed_files
from dinokit.retrieval.duplicates import duplicate_groups
from dinokit.retrieval.vector_index import KINDS, build_index, check_kind, recall_against_exact, search
from dinokit.runs.reports import save_neighbour_gallery, write_csv
from dinokit.runs.run_folder import RunLock, claim_output_folder
from dinokit.writing import write_json
from metrics import retrieval_scores
from model_config import canonical_name
from utils import select_device, select_precision

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


def build(args: argparse.Namespace) -> None:
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


def open_index(args: argparse.Namespace) -> Collection:
    """The --index collection; embedding flags given with it must be the ones it was built with,
    and the weights file that embedded it must still hold the same weights (queries are embedded
    by it)."""
    path = index_path(args.index)
    collection = Collection.load(path)
    given = getattr(args, "given_flags", frozenset())
    key = collection.key
    collection.check_weights(path, args.weights if "weights" in given else None)
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
            f"--features {asked['features']} rebuild it: python retrieve.py index --images DIR --index {args.index} "
            f"--backbone {asked['backbone']} --imgsz {asked['imgsz']} --features {asked['features']} --rebuild"
        )
    return collection


def results_folder(args: argparse.Namespace, collection: Collection, inputs: list = ()) -> Path:
    """--out-dir, default NAME_results/ beside the index, checked before the work (dinokit/runs/run_folder.py):
    never inside a folder the index holds or a query folder (both are read recursively: the next
    `index` or `search` would embed the results, and a user's file of the same name would be replaced)."""
    index = index_path(args.index)
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


def stale_warning(collection: Collection, paths: list[str], args: argparse.Namespace) -> list[str]:
    """The `paths` deleted since the index was built, said once (they are left out of the sheets)."""
    missing = collection.missing_files(paths)
    if missing:
        print(
            f"warning: {len(missing)} indexed file(s) are gone from disk (e.g. {missing[0]}): the index is stale; "
            f"refresh it: {collection.refresh_command(index_path(args.index))}"
        )
    return missing


def find(args: argparse.Namespace) -> None:
    """`search`: the top-k of each query image, as CSV and a contact sheet."""
    collection = open_index(args)
    queries = collect_images([args.query])
    total = len(collection.records) - (1 if args.exclude_self else 0)
    if args.k > total:
        raise UserError(f"--k {args.k}: the index holds {len(collection.records)} images")
    out_dir = results_folder(args, collection, inputs=[args.query])
    vectors, kept, failures = embed(collection.key, queries, args)
    for path, reason in failures:
        print(f"skipped query {path}: {reason}")
    if not kept:
        raise UserError(f"--query {args.query}: no readable image among {len(queries)} file(s); nothing searched")
    similarities, rows = search(collection.index, vectors, args.k + (1 if args.exclude_self else 0))
    results = []
    for position, sims, found in zip(kept, similarities, rows):
        query = queries[position]
        hits = [(collection.records[r].path, float(s)) for r, s in zip(found, sims) if r >= 0]
        if args.exclude_self:
            hits = [(p, s) for p, s in hits if Path(p) != query][: args.k]
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
    sheet = [
        (query, None, [(Path(p), Path(p).name, s) for p, s in hits if p not in missing])
        for query, hits in results[:SHEET_QUERIES]
    ]
    save_neighbour_gallery(sheet, out_dir / "search.png")
    print(
        f"{len(results)} queries ({len(failures)} unreadable), top {args.k} each: {out_dir / 'search.csv'}, search.png"
    )


def duplicates(args: argparse.Namespace) -> None:
    """`duplicates`: groups of images whose similarity reaches --threshold, as CSV and a PNG per group."""
    collection = open_index(args)
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
    collection = open_index(args)
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
    report = {"index": str(index_path(args.index)), "queries_from": args.query or "the index (leave-one-out)", **scores}
    out = results_folder(args, collection) / "retrieval_metrics.json"
    write_json(out, report)
    figures = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "queries")
    print(
        f"{scores.get('queries', 0)} queries over {len(labels)} images, {len(set(labels))} classes: {figures}"
        f"\nWrote {out}"
    )


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
    search_parser = commands.add_parser("search", help="the nearest indexed images of query images")
    search_parser.add_argument("--query", required=True, metavar="FILE|DIR")
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
    for sub in (index, search_parser, dup, score):
        add_shared_flags(sub)
    return parser


def add_shared_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, metavar="NAME", help="outputs/retrieval/NAME.index, or a path")
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where results go (default: NAME_results/ beside the index); never inside an indexed folder",
    )
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


COMMANDS = {"index": build, "search": find, "duplicates": duplicates, "evaluate": evaluate}


def main(args: argparse.Namespace) -> None:
    COMMANDS[args.command](args)


if __name__ == "__main__":
    run_cli(main, get_args_parser())
