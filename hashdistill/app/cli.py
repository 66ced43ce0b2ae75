"""The ``hashdistill`` command line. Each command imports its stage lazily, so ``--help`` is instant.

A :class:`~hashdistill.errors.UserError` anywhere becomes one message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hashdistill.errors import UserError

if TYPE_CHECKING:
    from hashdistill.rundir import RunDir


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that temporary files are cleaned up on the way out."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    on_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        return args.handler(args) or 0
    except UserError as exc:
        print(f"hashdistill: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated"
        print(f"hashdistill: {what}; resume a run with --resume <run dir>", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


MAX_MESSAGE_CHARS = 600


def _one_line(message: str) -> str:
    """A user error as one short line: messages quote values from files, which may be huge or hold newlines."""
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hashdistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(handler=cmd_recipes)

    p = sub.add_parser("run", help="run the whole pipeline: teacher -> student -> ternary -> ONNX -> index -> report")
    _recipe_args(p)
    p.add_argument("--out", help="run directory (default: <output_dir>/<recipe name>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoints")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("--stages", default=",".join(_stages()), help="comma-separated subset of: " + ",".join(_stages()))
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("distill", help="train a student from a teacher checkpoint (or train both)")
    _recipe_args(p)
    p.add_argument("--teacher", help="teacher checkpoint (default: train one first)")
    p.add_argument("--labels-only", nargs="?", const="codes", metavar="BASELINE",
                   help="train a labels-only baseline on the labelled images, no teacher at run time: codes (the "
                        "default: BCE against the teacher's class codes) or dsh (the DSH pairwise loss on the labels); "
                        "the labelled images are repeated so that an epoch is as many steps as a distilled student's")
    p.add_argument("--out", help="run directory")
    p.add_argument("--resume", metavar="RUN_DIR")
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=cmd_distill)

    p = sub.add_parser("eval", help="evaluate a teacher, student, ternary checkpoint or ONNX file")
    p.add_argument("model", help="checkpoint (.safetensors) or exported .onnx file")
    p.add_argument("--recipe", help="recipe whose data/eval sections to use (default: the checkpoint's own)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--plot", help="also draw the precision-recall curve (by Hamming radius) to this PNG")
    p.add_argument("--force", action="store_true", help="overwrite the --json / --plot files")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("quantize", help="ternarize a student checkpoint and fine-tune it (TTQ)")
    p.add_argument("checkpoint", help="student checkpoint")
    p.add_argument("-o", "--output", required=True, help="ternary checkpoint to write")
    p.add_argument("--recipe", help="recipe for data, losses and quantize settings (default: the checkpoint's data)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--t", type=float, help="threshold t: Delta = t * max|w| (default 0.05)")
    p.add_argument("--target-sparsity", type=float, help="pick Delta for this fraction of zeros instead of --t")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--scope", choices=["fc", "pointwise"],
                   help="fc (default): FC layers and 1x1 heads; pointwise: also every 1x1 conv of the body")
    p.add_argument("--min-weights", type=int, help="ternarize only layers with at least this many weights")
    p.add_argument("--teacher", help="teacher to distil from (default: the one recorded in the checkpoint)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(handler=cmd_quantize)

    p = sub.add_parser("export", help="export a checkpoint to a single-file ONNX model and verify it")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--int8", nargs="?", const="static", choices=["static", "dynamic"],
                   help="float layers' weights as int8, ternary ones stay packed: static (the default; activation "
                        "ranges from training images, runs as int8 kernels) or dynamic (no images needed)")
    p.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="training images static int8 calibrates on (default 256; streamed, so memory does not grow "
                        "with N)")
    p.add_argument("--mobile", action="store_true",
                   help="also write MODEL.ort, its required-operators config and the mobile usability report")
    p.add_argument("--float-input", action="store_true",
                   help="the graph takes pre-processed float32 [N, 3, S, S] instead of uint8 RGB images [N, H, W, 3] "
                        "(the default, with resize, crop and normalisation in the graph)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("encode", help="encode an image set into codes with ids and paths (Parquet shards), in this "
                                      "process or on a Ray cluster")
    p.add_argument("model", help="ONNX file (.onnx/.ort) or checkpoint that encodes the images")
    p.add_argument("images", help="image folder (class sub-folders give labels) or a .txt file of paths, one a line")
    p.add_argument("-o", "--output", required=True, help="folder of codes to write (codes-*.parquet + manifest.json)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="encode with Ray Data actors: a local cluster on this machine, or the cluster at ADDRESS "
                        "(e.g. ray://head:10001, or auto); needs pip install 'hashdistill[ray]'")
    p.add_argument("--workers", type=int, help="encoder actors with --ray (default: one per CPU of the cluster)")
    p.add_argument("--first-id", type=int, default=0, help="ids run from here (distinct per shard, for merging)")
    p.add_argument("--force", action="store_true", help="replace an earlier encoding at --output")
    p.add_argument("--verbose", action="store_true", help="with --ray: show Ray's own log lines too")
    p.set_defaults(handler=cmd_encode)

    p = sub.add_parser("index", help="build, grow, merge or search a Hamming index")
    index_sub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = index_sub.add_parser("build", help="encode images (or take the codes of `hashdistill encode`) and store them "
                                           "in a faiss binary index",
                             usage="hashdistill index build {MODEL IMAGES | [MODEL] CODES} -o OUTPUT [options]")
    b.add_argument("model", help="ONNX file or checkpoint that encodes the images (with CODES: the model that encoded "
                                 "them, checked against the codes' record), or a folder of CODES alone")
    b.add_argument("images", nargs="?",
                   help="image folder (class sub-folders give labels), dataset[:split] such as digits:test, or a "
                        "folder of CODES from `hashdistill encode`")
    b.add_argument("-o", "--output", required=True)
    b.add_argument("--kind", default="auto", choices=INDEX_KINDS,
                   help="flat (exact), ivf or hnsw (approximate); auto: flat for small databases, ivf for large")
    b.add_argument("--nlist", type=int, help="ivf: number of buckets (default: about 2 * sqrt(n))")
    b.add_argument("--hnsw-m", type=int, help="hnsw: links per node (default 16)")
    b.add_argument("--first-id", type=int, default=0, help="ids run from here (distinct per shard, for merging)")
    b.add_argument("--force", action="store_true")
    b.set_defaults(handler=cmd_index_build)
    a = index_sub.add_parser("add", help="encode more images and add them to an index (no rebuild)")
    a.add_argument("index")
    a.add_argument("images", help="image folder, dataset[:split], or a folder of codes from `hashdistill encode`")
    a.add_argument("--model", help="model to encode with (default: the one that built the index)")
    a.add_argument("--allow-duplicates", action="store_true",
                   help="add images whose paths the index holds already (refused by default: a folder added twice)")
    a.set_defaults(handler=cmd_index_add)
    m = index_sub.add_parser("merge", help="merge index shards into one, ids kept")
    m.add_argument("shards", nargs="+")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--kind", choices=INDEX_KINDS[1:], help="kind of the merged index (default: the first shard's)")
    m.add_argument("--force", action="store_true")
    m.set_defaults(handler=cmd_index_merge)
    i = index_sub.add_parser("info", help="kind, parameters, measured recall and memory of an index")
    i.add_argument("index")
    i.set_defaults(handler=cmd_index_info)
    x = index_sub.add_parser("export", help="write an index's codes, ids, paths and labels into a Milvus collection")
    x.add_argument("index")
    x.add_argument("--milvus", required=True, metavar="URI",
                   help="a Milvus Lite file (codes.db) or server (http://host:19530); needs "
                        "pip install 'hashdistill[milvus]'")
    x.add_argument("--collection", default="hashdistill", help="collection name (default: hashdistill)")
    x.add_argument("--force", action="store_true", help="replace an existing collection of that name")
    x.set_defaults(handler=cmd_index_export)
    s = index_sub.add_parser("search", help="nearest codes of query images",
                             usage="hashdistill index search [INDEX] IMAGE... [--milvus URI [--collection NAME]]")
    s.add_argument("targets", nargs="+", metavar="[INDEX] IMAGE",
                   help="the index file (or a Milvus URI; omitted with --milvus), then the image files")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--nprobe", type=int,
                   help="ivf (or Milvus on a server): buckets to scan (more: slower, higher recall)")
    s.add_argument("--ef-search", type=int, help="hnsw: candidates to explore (more: slower, higher recall)")
    s.add_argument("--model", help="ONNX model for the queries (default: the one that built the index)")
    s.add_argument("--milvus", metavar="URI", help="search this Milvus (Lite file or server) instead of an index file")
    s.add_argument("--collection", help="the Milvus collection (default: hashdistill)")
    s.set_defaults(handler=cmd_index_search)

    p = sub.add_parser("demo", help="write a static visual-search site that runs the phone model in the browser")
    p.add_argument("run_dir", help="a run directory (its phone model and index.npz)")
    p.add_argument("-o", "--output", required=True, help="the site's folder (serve it with any static web server)")
    p.add_argument("--model", help="image-in ONNX file to run (default: the run's phone model, else its model.onnx)")
    p.add_argument("--index", help="index to search (default: the run's index.npz)")
    p.add_argument("--ort-web", metavar="DIR", help="copy onnxruntime-web from DIR into the site (offline use; e.g. "
                                                   "node_modules/onnxruntime-web/dist) instead of the pinned CDN URL")
    p.add_argument("--screenshot", metavar="IMAGE",
                   help="search IMAGE in the page in headless Chromium and save demo.png into the run's report")
    p.add_argument("--force", action="store_true", help="replace a site written earlier at --output")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("taxonomy", help="print the class tree of a checkpoint's class codes, write a dendrogram")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", default="taxonomy.png", help="dendrogram PNG (default: taxonomy.png)")
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(handler=cmd_taxonomy)

    p = sub.add_parser("report", help="regenerate report.md of a run directory from its saved figures")
    p.add_argument("run_dir")
    p.set_defaults(handler=cmd_report)
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="built-in recipe name (see `hashdistill recipes`) or path to a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. --set teacher.bits=24 (repeatable)")


# The index kinds of hashdistill.search.index_kinds.KINDS, named here so that --help imports no faiss.
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")


def _stages() -> tuple[str, ...]:
    from hashdistill.rundir import STAGES  # not the pipeline: building the parser must not import torch

    return STAGES


# --- commands ---------------------------------------------------------------------------------------

def cmd_recipes(args: argparse.Namespace) -> None:
    from hashdistill.recipe import builtin_recipes

    for name, path in sorted(builtin_recipes().items()):
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:20s} {first}")


def cmd_run(args: argparse.Namespace) -> None:
    from hashdistill.app.pipeline import Pipeline, prepare_run_dir
    from hashdistill.app.preflight import check_run
    from hashdistill.recipe import load_recipe
    from hashdistill.rundir import STAGES
    from hashdistill.trainer import init_distributed, resolve_device

    recipe = load_recipe(args.recipe, args.set)
    init_distributed(resolve_device(recipe.device))
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage '{unknown[0]}'; stages: {', '.join(STAGES)}")
    check_run(recipe)
    run = prepare_run_dir(recipe, args.out, args.resume, args.force)
    with _discard_if_nothing_saved(run, fresh=not args.resume):
        result = Pipeline(recipe, run).run_all(stages)
    if result["report"]:
        print(f"report: {result['report']}")


def cmd_distill(args: argparse.Namespace) -> None:
    from hashdistill.app.pipeline import Pipeline, prepare_run_dir
    from hashdistill.app.preflight import check_run
    from hashdistill.distill.student_stage import BASELINE_STAGES, train_student
    from hashdistill.recipe import load_recipe
    from hashdistill.trainer import init_distributed, resolve_device

    if args.labels_only is not None and args.labels_only not in BASELINE_STAGES:
        raise UserError(f"--labels-only: unknown baseline '{args.labels_only}'; choose one of "
                        f"{', '.join(BASELINE_STAGES)}")
    recipe = load_recipe(args.recipe, args.set)
    init_distributed(resolve_device(recipe.device))
    check_run(recipe)
    run = prepare_run_dir(recipe, args.out, args.resume, args.force)
    with _discard_if_nothing_saved(run, fresh=not args.resume):
        pipeline = Pipeline(recipe, run)
        run.save_recipe(recipe)
        teacher = args.teacher
        if teacher is None:
            pipeline.stage_teacher()
            teacher = run.checkpoint("teacher")
        elif not Path(teacher).is_file():
            raise UserError(f"teacher checkpoint not found: {teacher}")
        name = BASELINE_STAGES.get(args.labels_only, "student")
        path = train_student(recipe, run, pipeline.device, teacher, labels_only=args.labels_only, name=name)
    print(f"student checkpoint: {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    from hashdistill.evaluate import EvalSplits, code_metrics, encode_splits, torch_encoder
    from hashdistill.trainer import resolve_device

    for output in (args.json, args.plot):
        if output:
            _fresh_output(output, args.force)
    path = Path(args.model)
    if path.suffix.lower() in (".onnx", ".ort"):
        from hashdistill.codes import unpack_codes
        from hashdistill.export.onnx_encoder import onnx_encoder
        from hashdistill.export.runtime import EdgeModel

        edge = EdgeModel(str(path))
        # the file stores the class codebook packed; the metrics take it as +-1 signs, like a model's
        meta, class_codes = edge.metadata, unpack_codes(edge.class_codes, edge.bits)
        encoder = onnx_encoder(str(path))
        data = edge.metadata.get("data")
    else:
        from hashdistill.export.loading import load_any_model

        model, meta = load_any_model(str(path))
        device = resolve_device("auto")
        class_codes, encoder = model.class_codes.cpu().numpy(), torch_encoder(model, device)
        data = meta.get("data")
    recipe = _recipe_for(path, args.recipe, {"data": data} if data else None, args.set)
    splits = EvalSplits.build(recipe.data)
    figures = code_metrics(encode_splits(encoder, splits), splits, class_codes.astype("float32"), recipe.eval)
    _print_figures(figures)
    if args.json:
        from hashdistill.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(figures, indent=2, default=float))
    if args.plot:
        from hashdistill.plots import plot_pr_curves

        print(f"precision-recall curve: {plot_pr_curves({path.name: figures['pr_curve']}, args.plot)}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from hashdistill.checkpoint import read_metadata
    from hashdistill.quantize.stage import quantize_student
    from hashdistill.rundir import RunDir
    from hashdistill.trainer import resolve_device

    output = _fresh_output(args.output, args.force)
    meta = read_metadata(args.checkpoint)
    overrides = list(args.set)
    if args.t is not None:
        overrides.append(f"quantize.threshold={args.t}")
    if args.target_sparsity is not None:
        overrides.append(f"quantize.target_sparsity={args.target_sparsity}")
    if args.epochs is not None:
        overrides.append(f"quantize.train.epochs={args.epochs}")
    if args.scope is not None:
        overrides.append(f"quantize.scope={args.scope}")
    if args.min_weights is not None:
        overrides.append(f"quantize.min_weights={args.min_weights}")
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    own = {"data": meta["data"], "student": {key: training[key] for key in ("losses", "temperature")
                                             if key in training}} if "data" in meta else None
    recipe = _recipe_for(Path(args.checkpoint), args.recipe, own, overrides)  # fine-tune under the student's loss
    work = output.with_name(f".{output.name}.work")
    shutil.rmtree(work, ignore_errors=True)  # a killed earlier attempt may have trained with other settings
    try:
        report = quantize_student(args.checkpoint, output, recipe, RunDir(work), resolve_device(recipe.device),
                                  args.teacher)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    before = sum(la["bytes_fp32"] for la in report["layers"])
    after = sum(la["bytes_packed"] for la in report["layers"])
    for layer in report["layers"]:
        print(f"{layer['name']:40s} sparsity {layer['sparsity']:.3f}  Wp {layer['wp']:.4g}  Wn {layer['wn']:.4g}  "
              f"{layer['bytes_fp32']:,} -> {layer['bytes_packed']:,} bytes")
    print(f"{len(report['layers'])} layers: {before:,} -> {after:,} bytes ({before / max(after, 1):.1f}x); "
          f"val MHD accuracy {report['training'].get('val_mhd_accuracy')}; wrote {output}")


def cmd_export(args: argparse.Namespace) -> None:
    from hashdistill.export.metadata import FLOAT_IN, IMAGE_IN
    from hashdistill.export.verify import export_checkpoint

    output = _fresh_output(args.output, args.force)
    figures = export_checkpoint(args.checkpoint, output, opset=args.opset, force=args.force, int8=args.int8,
                                mobile=args.mobile, input_format=FLOAT_IN if args.float_input else IMAGE_IN,
                                calibration_images=args.calibration_images)
    _print_figures(figures)


def cmd_encode(args: argparse.Namespace) -> None:
    from hashdistill.search.encode import encode_images

    if args.workers is not None and (args.ray is None or args.workers < 1):
        raise UserError("--workers takes a number >= 1, with --ray")
    result = encode_images(args.model, args.images, args.output, ray=args.ray, workers=args.workers,
                           first_id=args.first_id, force=args.force, verbose=args.verbose)
    m = result.manifest
    where = f"Ray, {m['workers']} workers" if m["engine"] == "ray" else "this process"
    print(f"encoded {m['encoded']} of {m['images']} images ({m['bits']} bits; {m['skipped']} skipped) in "
          f"{m['seconds']:.1f} s with {where} -> {result.folder} ({len(m['shards'])} shards)")


def cmd_index_build(args: argparse.Namespace) -> None:
    from hashdistill.search.encode import is_codes_folder
    from hashdistill.search.index import build_index, build_index_from_codes

    output = _fresh_output(args.output, args.force)
    for flag, value, fits in (("--nlist", args.nlist, ("ivf", "auto")), ("--hnsw-m", args.hnsw_m, ("hnsw",))):
        if value is not None and args.kind not in fits:
            raise UserError(f"{flag} applies to --kind {' or '.join(fits)}, not {args.kind}")
    params = {key: value for key, value in (("nlist", args.nlist), ("M", args.hnsw_m)) if value is not None}
    if is_codes_folder(args.model):
        if args.images is not None or args.first_id:
            raise UserError(f"{args.model} holds codes already: give no IMAGES (nor --first-id) with it")
        index = build_index_from_codes(args.model, output, force=args.force, kind=args.kind, params=params)
    elif args.images is not None and is_codes_folder(args.images):
        if args.first_id:
            raise UserError(f"{args.images} holds codes with their ids already: give no --first-id with it")
        index = build_index_from_codes(args.images, output, force=args.force, kind=args.kind, params=params,
                                       model=args.model)
    elif args.images is None:
        raise UserError("index build needs the IMAGES to encode (or a folder of codes from `hashdistill encode`)")
    else:
        index = build_index(args.model, args.images, output, force=args.force, kind=args.kind, params=params,
                            first_id=args.first_id)
    print(f"indexed {len(index)} images ({index.bits} bits) -> {output}")
    _print_index(index.describe())


def cmd_index_add(args: argparse.Namespace) -> None:
    from hashdistill.search.index import add_to_index

    index, added = add_to_index(args.index, args.images, model=args.model, allow_duplicates=args.allow_duplicates)
    print(f"added {added} images -> {args.index} ({len(index)} in all)")
    _print_index(index.describe())


def cmd_index_merge(args: argparse.Namespace) -> None:
    from hashdistill.search.index import merge_indexes

    output = _fresh_output(args.output, args.force)
    index = merge_indexes(args.shards, output, force=args.force, kind=args.kind)
    print(f"merged {len(args.shards)} shards: {len(index)} entries -> {output}")
    _print_index(index.describe())


def cmd_index_info(args: argparse.Namespace) -> None:
    from hashdistill.search.index import load_index

    index = load_index(args.index)
    info = index.describe()
    _print_index(info)
    record = index.recall
    if not record.get("curve"):
        return
    how = record.get("queries_are", "held-out database rows")
    print(f"recall@{record['k']} against exact search, measured at build on {record['queries']} queries ({how}); "
          f"default: the cheapest setting whose recall less {record.get('margin_standard_errors', 0):g} standard "
          f"errors reaches {record.get('target')}")
    errors = record.get("standard_errors") or [None] * len(record["curve"])
    for (value, recall), error in zip(record["curve"], errors):
        spread = f" +/- {error:.4f}" if isinstance(error, float) else ""
        chosen = "  <- default" if value == record.get("default") else ""
        print(f"  {info['speed_param']}={value}: recall@{record['k']} {recall:.4f}{spread}{chosen}")


def cmd_index_export(args: argparse.Namespace) -> None:
    from hashdistill.search.index import load_index
    from hashdistill.search.milvus import export_index

    written = export_index(load_index(args.index), args.milvus, args.collection, force=args.force)
    print(f"exported {written['rows']} codes ({written['bits']} bits) to {written['uri']}, collection "
          f"'{written['collection']}' ({written['index_type']})")


def cmd_index_search(args: argparse.Namespace) -> None:
    from hashdistill.search.index import open_search_backend, search_images

    if args.milvus:
        index, images = open_search_backend(args.milvus, args.collection), args.targets
    elif len(args.targets) < 2:
        raise UserError("index search needs the index and at least one image (or --milvus URI and images)")
    else:
        index, images = open_search_backend(args.targets[0], args.collection), args.targets[1:]
    with closing(index):  # a Milvus connection left open keeps pinging its server
        kind = "ivf" if index.describe()["speed_param"] == "nprobe" else getattr(index, "kind", "flat")
        speed = _search_speed(kind, args.nprobe, args.ef_search)
        _print_index(index.describe(speed))
        for query, hits in zip(images, search_images(index, images, args.k, model=args.model, speed=speed)):
            print(query)
            for hit in hits:
                print(f"  d={hit['distance']:3d}  id={hit['id']}  label={hit['label']}  {hit['path']}")


def _search_speed(kind: str, nprobe: int | None, ef_search: int | None) -> int | None:
    """The speed setting for this kind of index; a flag meant for another kind is a user error."""
    for flag, value, fits in (("--nprobe", nprobe, "ivf"), ("--ef-search", ef_search, "hnsw")):
        if value is not None and kind != fits:
            raise UserError(f"{flag} applies to {fits} indexes; this one is {kind}")
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    return nprobe if nprobe is not None else ef_search


def _print_index(info: dict[str, Any]) -> None:
    """One line: what a search of this index does, what it costs and the recall measured for it."""
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
    kind = f"{info['kind']} ({params})" if params else info["kind"]
    speed = f", {info['speed_param']}={info['speed']}" if info["speed_param"] else ""
    recall = "exact" if info["speed_param"] is None else (
        f"recall@{info['recall_k']} {info['recall']:.4f} measured at build" if info["recall"] is not None
        else "recall not measured at this setting")
    print(f"index: {kind}{speed}, {recall}; {info['items']} items, {info['bytes_per_item']:.0f} bytes per item")


def cmd_demo(args: argparse.Namespace) -> None:
    from hashdistill.app.demo import build_demo, write_page_screenshot
    from hashdistill.app.pipeline import phone_file
    from hashdistill.app.report import write_report
    from hashdistill.recipe import RECIPE_FILE_NAME, load_recipe
    from hashdistill.rundir import DEMO_SHOT, INDEX_FILE, RunDir, is_run_dir

    run = Path(args.run_dir)
    if not (run / RECIPE_FILE_NAME).is_file() and not (args.model and args.index):
        raise UserError(f"{run} is not a run directory (no {RECIPE_FILE_NAME}); give --model and --index")
    model = args.model
    if model is None:
        fp32 = run / load_recipe(run / RECIPE_FILE_NAME).export.file
        model = phone_file(fp32) if phone_file(fp32).is_file() else fp32
    index = args.index or run / INDEX_FILE
    for what, path in (("model", model), ("index", index)):
        if not Path(path).is_file():
            raise UserError(f"no {what} at {path}: run the export and index stages first, or pass --{what}")
    written = build_demo(model, index, args.output, ort_web=args.ort_web, force=args.force)
    print(f"demo site: {written['site']} ({written['items']} codes, {written['bits']} bits, onnxruntime-web from "
          f"{written['ort_web']}); serve it, e.g. python -m http.server -d {written['site']} --bind 127.0.0.1")
    if args.screenshot:
        if not Path(args.screenshot).is_file():
            raise UserError(f"--screenshot: no image at {args.screenshot}")
        if is_run_dir(run):
            RunDir(run).claim(DEMO_SHOT)  # the run's own file: its marker lists it
        shown = write_page_screenshot(Path(written["site"]), Path(args.screenshot), run / DEMO_SHOT)
        print(f"the page coded {args.screenshot} as {shown['code']} ({shown['class']['name']}); "
              f"screenshot: {run / DEMO_SHOT}")
        if (run / RECIPE_FILE_NAME).is_file():
            print(f"report: {write_report(RunDir(run, writer=False))}")


def cmd_taxonomy(args: argparse.Namespace) -> None:

    from hashdistill.checkpoint import load_checkpoint
    from hashdistill.codes import to_signs
    from hashdistill.distill.models import (
        CODEBOOK_TENSORS,
        STUDENT,
        TEACHER,
        TERNARY,
        check_class_codebook,
        validate_meta,
    )
    from hashdistill.taxonomy import bit_splits, class_tree, format_tree, plot_dendrogram

    _fresh_output(args.output, args.force)
    tensors, meta = load_checkpoint(args.checkpoint)
    if meta.get("kind") not in (TEACHER, STUDENT, TERNARY):
        raise UserError(f"{args.checkpoint} has no class codebook (a teacher or student checkpoint has one)")
    validate_meta(meta, args.checkpoint)
    check_class_codebook(meta, tensors, args.checkpoint)
    codes = tensors[CODEBOOK_TENSORS[meta["kind"]]]
    signs = to_signs(codes.numpy())
    tree = class_tree(signs, meta["class_names"])
    print(format_tree(tree, meta["class_names"]))
    print("\nbit splits (+1 side | -1 side):")
    for split in bit_splits(signs, meta["class_names"]):
        print(f"  bit {split['bit']:2d}: {', '.join(split['positive'])} | {', '.join(split['negative'])}")
    print(f"dendrogram: {plot_dendrogram(tree, meta['class_names'], args.output)}")


def cmd_report(args: argparse.Namespace) -> None:
    from hashdistill.app.report import write_report
    from hashdistill.rundir import SUMMARY_FILE, RunDir

    if not (Path(args.run_dir) / SUMMARY_FILE).is_file():
        raise UserError(f"{args.run_dir} is not a run directory (no {SUMMARY_FILE})")
    print(f"report: {write_report(RunDir(args.run_dir, writer=False))}")


@contextmanager
def _discard_if_nothing_saved(run: RunDir, fresh: bool) -> Iterator[None]:
    """A new run that stops on a user error before writing any checkpoint leaves no directory behind."""
    try:
        yield
    except UserError:
        if fresh and run.writer and not any(run.checkpoints.glob("*.safetensors")):
            run.discard()
        raise


def _recipe_for(source: Path, recipe: str | None, recorded: dict[str, Any] | None, overrides: list[str]):
    """The --recipe given, else the sections the checkpoint recorded; --set overrides apply to either."""
    from hashdistill.recipe import apply_override, load_recipe, recipe_from_dict

    if recipe:
        return load_recipe(recipe, overrides)
    if recorded is None:
        raise UserError(f"{source} records no dataset; pass --recipe to say which data to use")
    raw = json.loads(json.dumps(recorded))  # a deep copy the overrides may change
    for override in overrides:
        apply_override(raw, override)
    return recipe_from_dict(raw)


def _fresh_output(path: str, force: bool) -> Path:
    """An output file's path: a directory there is refused (never replaced), a file only with --force."""
    output = Path(path)
    if output.is_dir():
        raise UserError(f"{output} is a directory; give the path of the file to write")
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to overwrite it")
    if output.parent.exists() and not output.parent.is_dir():
        raise UserError(f"{output.parent} is a file, not a folder to write {output.name} into")
    return output


# How figures whose name alone could mislead are printed (the JSON keeps the plain keys).
FIGURE_LABELS = {
    "map_tie_aware": "map_tie_aware (headline: expected AP over random order within ties)",
    "map": "map (order-dependent: ties broken by database index)",
    "precision_at_radius": "precision_at_radius (mean per query)",
    "recall_at_radius": "recall_at_radius (mean per query)",
}


def _print_figures(figures: dict[str, Any], indent: str = "") -> None:
    for key, value in figures.items():
        if key == "pr_curve":
            continue
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_figures(value, indent + "  ")
        else:
            print(f"{indent}{FIGURE_LABELS.get(key, key)}: {round(value, 4) if isinstance(value, float) else value}")


if __name__ == "__main__":
    sys.exit(main())
