"""The wheel maps distill/, quantize/, export/ into the hashdistill namespace and ships the recipes."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("hashdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("hashdistill/cli.py", "hashdistill/distill/models.py", "hashdistill/quantize/ttq.py",
                     "hashdistill/export/__init__.py", "hashdistill/recipes/quickstart.yaml",
                     "hashdistill/recipes/fashion-mnist-ood.yaml"):
        assert expected in names
    top_level = {name.split("/")[0] for name in names}
    assert not top_level & {"distill", "quantize", "export", "recipes"}


def test_no_bare_stage_imports():
    for folder in ("hashdistill", "distill", "quantize", "export", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for bare in ("distill", "quantize", "export"):
                assert f"\nimport {bare}\n" not in text and f"\nfrom {bare} import" not in text, path


def test_kernel_does_not_import_stages_at_module_level():
    """Dependencies point one way: only the CLI and the pipeline runner import stages, lazily."""
    for path in (ROOT / "hashdistill").glob("*.py"):
        top = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in top if "hashdistill.distill" in line or "hashdistill.quantize" in line
                    or "hashdistill.export" in line], path


def test_cli_entry_points():
    for cmd in (["hashdistill", "--help"], [sys.executable, "-m", "hashdistill", "recipes"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "hashdistill", "recipes"], capture_output=True, text=True)
    assert "quickstart" in done.stdout and "fashion-mnist-ood" in done.stdout
