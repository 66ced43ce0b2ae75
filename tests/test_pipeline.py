"""`hashdistill run` end to end on the tiny recipe: every stage, the report, skipping finished stages."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import TINY


def hashdistill(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hashdistill", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = folder / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "teacher": {**TINY["teacher"], "bits_sweep": [4, 8]}}))
    out = folder / "run"
    done = hashdistill("run", str(recipe), "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    return {"recipe": recipe, "out": out, "stdout": done.stdout}


def test_every_stage_ran_and_was_evaluated(finished_run):
    out = finished_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    for name in ("teacher", "student", "student -> teacher db", "ternary student", "ternary student (ONNX)"):
        assert 0 <= models[name]["map"] <= 1 and models[name]["bits"] == 8
    assert models["ternary student (ONNX)"]["file_bytes"] < models["student"]["file_bytes"]
    # the exported file computes the same codes as the PyTorch ternary student: identical figures
    for key in ("map", "map_tie_aware", "mhd_accuracy", "ed_accuracy", "precision_at_radius"):
        assert models["ternary student (ONNX)"][key] == pytest.approx(models["ternary student"][key], abs=1e-3), key
    assert summary["export"]["identical_code_rate"] >= 0.999
    assert summary["index"]["size"] == 400  # the whole synthetic training set (train + val)
    assert sorted(summary["bits_sweep"]) == ["4", "8"]  # the recipe's own 8 bits plus one extra teacher
    assert summary["bits_sweep"]["8"]["map"] == models["teacher"]["map"]
    for stage in ("[teacher] done", "[bits-sweep] done", "[student] done", "[quantize] done", "[export] done",
                  "[index] done"):
        assert stage in finished_run["stdout"]


def test_report_is_complete_and_regenerates(finished_run):
    out = finished_run["out"]
    report = (out / "report.md").read_text()
    for piece in ("| teacher |", "| ternary student (ONNX) |", "](pr_curves.png)", "](taxonomy.png)",
                  "## Ternary quantization", "## Reproduce", "](bits_sweep.png)", "| 4 |"):
        assert piece in report
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert header.index("mAP (tie-aware)") < header.index("mAP (order-dependent)")  # the headline comes first
    assert "P@r2 (mean per query)" in header and "(pooled over queries)" in report
    assert (out / "pr_curves.png").stat().st_size > 1000 and (out / "taxonomy.png").stat().st_size > 1000
    (out / "report.md").unlink()
    done = hashdistill("report", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "report.md").read_text() == report


def test_existing_run_needs_resume_or_force(finished_run):
    done = hashdistill("run", str(finished_run["recipe"]), "--out", str(finished_run["out"]))
    assert done.returncode == 2 and "--resume" in done.stderr and "Traceback" not in done.stderr


def test_resume_skips_finished_stages(finished_run):
    done = hashdistill("run", str(finished_run["recipe"]), "--resume", str(finished_run["out"]))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("already done, skipped") == 6


def test_resume_with_another_recipe_is_refused(finished_run):
    done = hashdistill("run", str(finished_run["recipe"]), "--resume", str(finished_run["out"]), "--set",
                       "teacher.bits=12")
    assert done.returncode == 2 and "different recipe" in done.stderr


def test_taxonomy_command(finished_run, tmp_path):
    done = hashdistill("taxonomy", str(finished_run["out"] / "checkpoints" / "teacher.safetensors"), "-o",
                       str(tmp_path / "tree.png"))
    assert done.returncode == 0, done.stderr
    assert "bit  0:" in done.stdout and (tmp_path / "tree.png").is_file()


def test_eval_command_on_checkpoint_and_onnx(finished_run, tmp_path):
    for model in (finished_run["out"] / "checkpoints" / "student.safetensors", finished_run["out"] / "model.onnx"):
        figures_path = tmp_path / f"{model.name}.json"
        plot_path = tmp_path / f"{model.name}.png"
        done = hashdistill("eval", str(model), "--json", str(figures_path), "--plot", str(plot_path))
        assert done.returncode == 0, done.stderr
        figures = json.loads(figures_path.read_text())
        assert plot_path.stat().st_size > 1000
        assert {"map", "map_tie_aware", "mhd_accuracy", "ed_accuracy", "precision_at_radius"} <= figures.keys()
        printed = done.stdout.splitlines()
        headline = next(i for i, line in enumerate(printed) if line.startswith("map_tie_aware (headline"))
        assert printed[headline + 1].startswith("map (order-dependent")


def test_ood_recipe_reports_exact_match_beside_the_tuned_baseline(tmp_path):
    from hashdistill.app.pipeline import Pipeline
    from hashdistill.recipe import recipe_from_dict
    from hashdistill.rundir import RunDir

    recipe = recipe_from_dict({**TINY, "data": {**TINY["data"], "in_classes": [0, 1, 2], "ood_classes": [3]}})
    run = RunDir(tmp_path / "run")
    Pipeline(recipe, run).run_all(("teacher",))
    ood = run.summary()["models"]["teacher"]["ood"]
    exact, msp = ood["exact_match"], ood["msp_baseline"]
    assert exact["n_ood"] > 0 and msp["ood_samples_used"] > 0  # OOD test images; OOD train images tune MSP
    for detector in (exact, msp):
        assert 0 <= detector["fpr"] <= 1 and 0 <= detector["tpr"] <= 1
        assert detector["youden_j"] == pytest.approx(detector["tpr"] - detector["fpr"])
    assert 0 <= msp["tpr_at_exact_match_fpr"] <= 1
    assert [n for n, _ in msp["tuning_curve"]][:3] == [2, 4, 6]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Out-of-distribution detection" in report and "held-out samples MSP needs" in report


def test_resume_refuses_a_stage_output_swapped_since_the_run_wrote_it(finished_run, tmp_path):
    """Before: a swapped model.onnx (or phone model, or index) of the same lineage passed as "already done"."""
    import shutil

    import onnx

    run = tmp_path / "run"
    shutil.copytree(finished_run["out"], run)
    model = onnx.load(str(run / "model.onnx"))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "note": "swapped"})
    onnx.save(model, str(run / "model.onnx"))  # same lineage, same metadata checks, other bytes
    done = hashdistill("run", str(finished_run["recipe"]), "--resume", str(run))
    assert done.returncode == 2 and "it is not the file this run wrote" in done.stderr, done.stderr
    assert "model.onnx" in done.stderr and "Traceback" not in done.stderr
