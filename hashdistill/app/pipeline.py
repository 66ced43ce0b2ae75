"""``hashdistill run``: teacher -> student -> ternary student -> ONNX -> index, then the report.

Each stage reads the previous stage's checkpoint from the run directory and is skipped when its
output already exists there, so a run can be resumed, extended or re-reported. Stages are
imported lazily: the kernel does not depend on them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hashdistill import codes
from hashdistill.checkpoint import read_metadata
from hashdistill.errors import UserError
from hashdistill.evaluate import EvalSplits, code_metrics, cpu_latency_ms, encode_splits, torch_encoder
from hashdistill.messages import name_some, warn
from hashdistill.recipe import Recipe
from hashdistill.rundir import INDEX_FILE, MARKER_FILE, STAGES, SWEEP_DIR, RunDir, clear_run_dir, is_run_dir
from hashdistill.trainer import barrier, is_main_process, resolve_device
from hashdistill.untrusted import file_sha256, short


class Pipeline:
    """One run of the recipe in ``run``; models are evaluated once and their figures kept in summary.json."""

    def __init__(self, recipe: Recipe, run: RunDir):
        self.recipe, self.run = recipe, run
        self.device = resolve_device(recipe.device)
        self._splits: EvalSplits | None = None
        self._teacher_database: np.ndarray | None = None

    @property
    def splits(self) -> EvalSplits:
        if self._splits is None:
            self._splits = EvalSplits.build(self.recipe.data)
        return self._splits

    def run_all(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        self.run.save_recipe(self.recipe)
        for stage in stages:
            started = time.perf_counter()
            done = getattr(self, f"stage_{stage.replace('-', '_')}")()
            self._record_digests(stage, rewritten=done)
            barrier()  # rank 0 evaluates and exports alone; the others wait here, not inside the next fit
            _say(f"[{stage}] {'done' if done else 'already done, skipped'} ({time.perf_counter() - started:.0f} s)")
        barrier()
        if not is_main_process():
            return {"report": None}
        from hashdistill.app.report import write_report

        return {"report": str(write_report(self.run))}

    # --- what each stage wrote, by digest: --resume skips only the very files the run wrote ------------

    def _stage_outputs(self, stage: str) -> list[Path]:
        """The files ``stage`` writes that a later --resume skips it for."""
        from hashdistill.distill.teacher_stage import FLOAT_FILE, TEACHER_FILE

        onnx, checkpoint = self.run.path / self.recipe.export.file, self.run.checkpoint
        return {"teacher": [checkpoint(TEACHER_FILE), checkpoint(FLOAT_FILE)], "student": [checkpoint("student")],
                "quantize": [checkpoint("ternary-student")], "export": [onnx, phone_file(onnx)],
                "index": [self.run.path / INDEX_FILE]}.get(stage, [])

    def _check_digest(self, path: Path) -> None:
        """A stage output about to be skipped, after its metadata passed: it must be the file the run wrote (its
        sha256 recorded then); a file swapped in since, even of the same lineage, is refused by name. Runs that
        recorded no digest (older ones) are checked by their metadata alone, as before."""
        recorded = self.run.summary().get(DIGESTS, {}).get(path.relative_to(self.run.path).as_posix())
        if is_main_process() and recorded is not None and file_sha256(path) != recorded:
            raise UserError(stale_output(path, "it is not the file this run wrote (its sha256 differs from the one "
                                               "recorded when it was written: the file was replaced)"))

    def _record_digests(self, stage: str, rewritten: bool) -> None:
        """The sha256 of each output ``stage`` wrote now (``rewritten``), or of those no digest was recorded for."""
        if not is_main_process():
            return
        recorded = dict(self.run.summary().get(DIGESTS, {}))
        for path in self._stage_outputs(stage):
            name = path.relative_to(self.run.path).as_posix()
            if path.is_file() and (rewritten or name not in recorded):
                recorded[name] = file_sha256(path)
        self.run.update_summary(DIGESTS, recorded)

    # --- stages: each returns True if it did work, False if its output already existed -------------

    def stage_teacher(self) -> bool:
        from hashdistill.distill.teacher_stage import FLOAT_FILE, TEACHER_FILE, train_teacher

        path = self.run.checkpoint(TEACHER_FILE)
        float_path = self.run.checkpoint(FLOAT_FILE)
        trained = not path.is_file()
        if trained:
            train_teacher(self.recipe, self.run, self.device)
        else:
            check_output(path, self.recipe, "teacher", "teacher")
            self._check_digest(path)
        if float_path.is_file():
            check_output(float_path, self.recipe, "float-baseline", "float")
            self._check_digest(float_path)
            self._evaluate_float(float_path)
        self.evaluate_checkpoint("teacher", path)
        return trained

    def stage_bits_sweep(self) -> bool:
        """Teachers at the other code lengths of ``teacher.bits_sweep``, each in its own sub-run."""
        from hashdistill.distill.teacher_stage import TEACHER_FILE, train_teacher

        done = self.run.summary().get("bits_sweep", {})
        todo = [k for k in self.recipe.teacher.bits_sweep if str(k) not in done and k != self.recipe.teacher.bits]
        for bits in todo:
            recipe = dataclasses.replace(self.recipe, teacher=dataclasses.replace(self.recipe.teacher, bits=bits,
                                                                                  bits_sweep=[]))
            self.run.claim(f"{SWEEP_DIR}/k{bits}")
            sub = RunDir(self.run.path / SWEEP_DIR / f"k{bits}", writer=is_main_process())
            if not sub.checkpoint(TEACHER_FILE).is_file():
                train_teacher(recipe, sub, self.device)
            Pipeline(recipe, sub).evaluate_checkpoint("teacher", sub.checkpoint(TEACHER_FILE))
            if is_main_process():
                done[str(bits)] = _sweep_row(sub.summary()["models"]["teacher"])
                self.run.update_summary("bits_sweep", done)
        teacher = self.run.summary().get("models", {}).get("teacher")
        if self.recipe.teacher.bits_sweep and teacher and is_main_process():
            done[str(self.recipe.teacher.bits)] = _sweep_row(teacher)
            self.run.update_summary("bits_sweep", done)
        return bool(todo)

    def stage_student(self) -> bool:
        from hashdistill.distill.student_stage import train_student

        path = self.run.checkpoint("student")
        trained = not path.is_file()
        if trained:
            train_student(self.recipe, self.run, self.device, self.run.checkpoint("teacher"))
        else:
            check_output(path, self.recipe, "student", "student")
            self._check_digest(path)
        self.evaluate_checkpoint("student", path)
        self.evaluate_checkpoint("student -> teacher db", path, database_from="teacher")
        return trained

    def stage_quantize(self) -> bool:
        from hashdistill.quantize.stage import quantize_student

        path = self.run.checkpoint("ternary-student")
        trained = not path.is_file()
        if not trained:
            check_output(path, self.recipe, "quantize", "ternary-student")
            self._check_digest(path)
        if trained:
            report = quantize_student(self.run.checkpoint("student"), path, self.recipe, self.run, self.device)
            self.run.update_summary("quantize", {"layers": report["layers"], "losses": report["losses"],
                                                 "teacher": report["teacher"]})
        self.evaluate_checkpoint("ternary student", path)
        return trained

    def stage_export(self) -> bool:
        from hashdistill.export.metadata import FLOAT_IN, IMAGE_IN
        from hashdistill.export.verify import export_checkpoint

        path = self.run.output(self.recipe.export.file)
        phone = self.run.output(phone_file(path).name)
        phone_declined = "declined" in self.run.summary().get("export_phone", {})
        exported = not path.is_file() or not (phone.is_file() or phone_declined)
        for existing in (p for p in (path, phone) if p.is_file()):
            self._check_exported(existing)
        if exported and is_main_process():
            export = self.recipe.export
            layout = FLOAT_IN if export.float_input else IMAGE_IN
            source = self.run.checkpoint("ternary-student")
            if not path.is_file():
                figures = export_checkpoint(source, path, opset=export.opset, input_format=layout)
                self.run.update_summary("export", figures)
            self.run.update_summary("export_phone", self._export_phone_model(source, phone, layout))
        barrier()
        self._evaluate_onnx("ternary student (ONNX)", path)
        if phone.is_file():
            agreement = self.run.summary()["export_phone"].get("int8", {}).get("identical_code_rate_vs_float_onnx")
            self._evaluate_onnx(PHONE_MODEL, phone, codes_equal_fp32_onnx=agreement)
        return exported

    def _export_phone_model(self, source: Path, phone: Path, layout: str) -> dict[str, Any]:
        """The phone model: the same ternary student with its float layers as int8 (static, calibrated on training
        images), the file an app ships. A student whose codes int8 would change (an undertrained one, typically)
        gets none: the run goes on with its fp32 file and says why, in a warning and in the summary."""
        from hashdistill.export.verify import export_checkpoint

        try:
            return export_checkpoint(source, phone, opset=self.recipe.export.opset, input_format=layout,
                                     int8="static")
        except UserError as exc:
            warn(f"no phone model: {exc}")
            return {"declined": str(exc)}

    def stage_index(self) -> bool:
        from hashdistill.search.index import build_index

        path = self.run.output(INDEX_FILE)
        if path.exists() and is_main_process():
            self._check_index(path)
        if path.exists() or not is_main_process():
            return False
        data = dataclasses.replace(self.recipe.data, train_limit=None, augment=False)  # the whole database
        if data.dataset == "imagefolder":  # the database is the training folder's image files
            from hashdistill.data.imagefolder import train_folder

            images = str(train_folder(data))
        else:
            images = f"{data.dataset}:database"
        index = build_index(self.run.path / self.recipe.export.file, images, path, data=data)
        self.run.update_summary("index", {"path": str(path), "size": len(index), "bits": index.bits,
                                          **index.describe()})
        return True

    def _check_exported(self, path: Path) -> None:
        """The run's ONNX file is skipped only if it was exported from this recipe's ternary student."""
        from hashdistill.export.metadata import FLOAT_IN, IMAGE_IN
        from hashdistill.export.runtime import EdgeModel

        props = EdgeModel(str(path)).metadata
        expected = {"stage_digest": self.recipe.stage_digest("quantize"), "bits": self.recipe.teacher.bits,
                    "input_format": FLOAT_IN if self.recipe.export.float_input else IMAGE_IN}
        for key, value in expected.items():
            if props.get(key) not in (value, str(value)):
                raise UserError(stale_output(path, f"its {key} is {short(props.get(key))}, this recipe's is {value}"))
        self._check_digest(path)

    def _check_index(self, path: Path) -> None:
        """The run's index is skipped only if the run's ONNX file encoded it."""
        from hashdistill.export.runtime import EdgeModel
        from hashdistill.search.index import load_index

        model = load_index(path).model
        onnx = self.run.path / self.recipe.export.file
        if not onnx.is_file() or model.get("hash") != EdgeModel(str(onnx)).describe()["hash"]:
            raise UserError(stale_output(path, f"its codes were not made by this run's {self.recipe.export.file}"))
        self._check_digest(path)

    # --- evaluation: one path for checkpoints and ONNX files ---------------------------------------

    def evaluate_checkpoint(self, name: str, path: Path, database_from: str | None = None) -> None:
        if not is_main_process() or name in self.run.summary().get("models", {}):
            return
        from hashdistill.export.loading import load_any_model

        model, meta = load_any_model(str(path))
        model.to(self.device)
        database = self._database_of(database_from) if database_from else None
        logits = encode_splits(torch_encoder(model, self.device, self.recipe.data.eval_batch_size), self.splits,
                               database)
        if name == "teacher":
            self._teacher_database = logits["database"]
        figures = code_metrics(logits, self.splits, model.class_codes.cpu().numpy(), self.recipe.eval)

        cpu_model = copy.deepcopy(model).cpu()  # the report's latencies are CPU figures, also on GPU machines

        @torch.no_grad()
        def forward(images: np.ndarray) -> object:
            return cpu_model(torch.from_numpy(images))

        self._record(name, figures, params=sum(p.numel() for p in model.parameters()),
                     file_bytes=os.path.getsize(path),
                     latency_ms_b1=cpu_latency_ms(forward, self.recipe.data.image_size, 1),
                     latency_ms_b64=cpu_latency_ms(forward, self.recipe.data.image_size, 64), kind=meta["kind"],
                     arch=meta["arch"], checkpoint=str(path))

    def _evaluate_onnx(self, name: str, path: Path, **extra: Any) -> None:
        if not is_main_process() or name in self.run.summary().get("models", {}):
            return
        import onnxruntime as ort

        from hashdistill.export.onnx_encoder import onnx_encoder
        from hashdistill.export.runtime import EdgeModel

        edge = EdgeModel(str(path))
        logits = encode_splits(onnx_encoder(str(path), self.recipe.data.eval_batch_size), self.splits)
        class_codes = codes.unpack_codes(edge.class_codes, edge.bits).astype(np.float32)  # stored packed
        figures = code_metrics(logits, self.splits, class_codes, self.recipe.eval)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def forward(images: np.ndarray) -> object:
            return session.run(None, {"images": images})

        size, layout = self.recipe.data.image_size, edge.meta.input_format
        self._record(name, figures, params=None, file_bytes=os.path.getsize(path),
                     latency_ms_b1=cpu_latency_ms(forward, size, 1, input_format=layout),
                     latency_ms_b64=cpu_latency_ms(forward, size, 64, input_format=layout), kind="onnx",
                     arch=edge.metadata.get("arch"), checkpoint=str(path), **extra)

    def _evaluate_float(self, path: Path) -> None:
        if not is_main_process() or "float baseline" in self.run.summary().get("models", {}):
            return
        from hashdistill.distill.models import load_model

        model, meta = load_model(str(path))
        logits = torch_encoder(model.to(self.device), self.device, self.recipe.data.eval_batch_size)(self.splits.test)
        from hashdistill.evaluate import labels_of

        accuracy = float((logits.argmax(1) == labels_of(self.splits.test)).mean())
        self._record("float baseline", {"accuracy": accuracy}, params=sum(p.numel() for p in model.parameters()),
                     file_bytes=os.path.getsize(path), kind="float", arch=meta["arch"], checkpoint=str(path))

    def _database_of(self, model_name: str) -> np.ndarray:
        if self._teacher_database is None:
            from hashdistill.export.loading import load_any_model

            teacher, _ = load_any_model(str(self.run.checkpoint("teacher")))
            encode = torch_encoder(teacher.to(self.device), self.device, self.recipe.data.eval_batch_size)
            self._teacher_database = encode(self.splits.database)
        return self._teacher_database

    def _record(self, name: str, figures: dict[str, Any], **extra: Any) -> None:
        models = self.run.summary().get("models", {})
        models[name] = {**extra, **figures}
        self.run.update_summary("models", models)
        shown = {k: round(v, 4) for k, v in figures.items() if isinstance(v, float)}
        _say(f"  {name}: {shown}")


def _sweep_row(figures: dict[str, Any]) -> dict[str, Any]:
    keys = ("bits", "mhd_accuracy", "ed_accuracy", "map", "map_tie_aware", "precision_at_radius")
    return {key: figures[key] for key in keys}


IDENTITY_DATA = ("dataset", "root", "image_size", "in_classes", "ood_classes", "labelled_fraction")
PHONE_MODEL = "phone model: ternary + int8 (ONNX)"


DIGESTS = "output_sha256"  # summary.json: each stage output's sha256, recorded when the run wrote it


def phone_file(onnx_path: Path) -> Path:
    """Where a run keeps its phone model: beside the fp32 file, ``<name>-phone.onnx``."""
    return onnx_path.with_name(f"{onnx_path.stem}-phone{onnx_path.suffix}")


def check_output(path: Path, recipe: Recipe, stage: str, kind: str) -> None:
    """A stage whose output exists is skipped only if that output is what this recipe's stage writes: its kind,
    bit width, data and the digest of its settings (:meth:`Recipe.stage_digest`) must match; a mismatch is a
    UserError that names it, never a silent "already done"."""
    meta = read_metadata(path)
    found = meta.get("kind")
    if found != kind:
        raise UserError(stale_output(path, f"it holds a {short(found)} checkpoint, where this stage writes a {kind}"))
    if kind != "float" and meta.get("bits") != recipe.teacher.bits:
        raise UserError(stale_output(path, f"its codes have {short(meta.get('bits'))} bits, this recipe's "
                                           f"{recipe.teacher.bits}"))
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    for key in IDENTITY_DATA:
        if data.get(key) != getattr(recipe.data, key):
            raise UserError(stale_output(path, f"it was trained with data.{key}={short(data.get(key))}, this recipe "
                                               f"has {short(getattr(recipe.data, key))}"))
    digest = meta.get("stage_digest")
    if digest is None and meta.get("recipe_hash") != recipe.digest():
        warn(f"{path} was written by a hashdistill without stage digests: its kind, bits and data match this "
             "recipe; its other settings cannot be compared")
    elif digest is not None and digest != recipe.stage_digest(stage):
        raise UserError(stale_output(path, f"it was trained with other {stage} settings than this recipe's"))


def stale_output(path: Path, problem: str) -> str:
    return (f"{path} is in the run directory, but {problem}; it is not used: remove it to have the stage run "
            "again, or start afresh (--force, or another --out)")


def prepare_run_dir(recipe: Recipe, out: str | None, resume: str | None, force: bool) -> RunDir:
    """Choose the run directory; an existing one is continued only with --resume, replaced only with --force.

    ``--force`` removes only what the folder's marker lists as written by hashdistill
    (:func:`~hashdistill.rundir.clear_run_dir`) and says which files it kept; a folder without the marker is the
    user's and is never touched.
    """
    from hashdistill.recipe import RECIPE_FILE_NAME, load_recipe

    if resume:
        path = Path(resume)
        saved = path / RECIPE_FILE_NAME
        if not saved.is_file():
            raise UserError(f"--resume {path}: not a run directory (no {RECIPE_FILE_NAME})")
        if load_recipe(saved).digest() != recipe.digest():
            raise UserError(f"--resume {path}: the run was started with a different recipe ({saved}); "
                            "resume with the same recipe and --set overrides, or start a new run")
        run = RunDir(path, writer=is_main_process())
        if run.writer:
            run.remove_stale_temp_files()
        return run
    path = Path(out) if out else Path(recipe.output_dir) / recipe.name
    if not is_main_process():  # rank 0 checks, clears and creates the directory
        barrier()
        return RunDir(path, writer=False)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a run directory; choose another --out")
    if path.exists() and any(path.iterdir()):
        if not is_run_dir(path):
            why = ("its marker lists nothing (a run of an older hashdistill): remove it yourself" if
                   (path / MARKER_FILE).is_file() else "it has no run marker, so hashdistill did not write it")
            raise UserError(f"{path} already exists and {why}; it is left untouched (even with --force): choose "
                            "another --out")
        if not force:
            raise UserError(f"run directory {path} already exists: pass --resume {path} to continue it, "
                            "--force to start over, or --out to choose another")
        kept = clear_run_dir(path)
        if kept:
            warn(f"--force removed the earlier run's files from {path} and kept {len(kept)} that hashdistill did not "
                 f"write: {name_some(kept)}")
    created = not path.exists()
    run = RunDir(path)
    run.created = created
    barrier()
    return run


def _say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)
