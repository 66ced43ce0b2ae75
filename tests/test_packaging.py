"""The wheel maps distill/, quantize/, export/, search/ into the hashdistill namespace and ships the recipes;
dependencies point one way (the kernel imports no stage)."""

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
    for expected in ("hashdistill/app/cli.py", "hashdistill/distill/models.py", "hashdistill/quantize/ttq.py",
                     "hashdistill/export/__init__.py", "hashdistill/search/index.py",
                     "hashdistill/recipes/quickstart.yaml", "hashdistill/recipes/fashion-mnist-ood.yaml"):
        assert expected in names
    top_level = {name.split("/")[0] for name in names}
    assert not top_level & {"distill", "quantize", "export", "search", "recipes"}


def test_no_bare_stage_imports():
    for folder in ("hashdistill", "distill", "quantize", "export", "search", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for bare in ("distill", "quantize", "export", "search"):
                assert f"\nimport {bare}\n" not in text and f"\nfrom {bare} import" not in text, path


STAGES = ("hashdistill.distill", "hashdistill.quantize", "hashdistill.export", "hashdistill.search")
KERNEL = ROOT / "hashdistill"
KERNEL_FILES = [p for p in KERNEL.rglob("*.py") if p.relative_to(KERNEL).parts[0] != "app"]


def test_kernel_does_not_import_stages_even_lazily():
    """Dependencies point one way: only the application layer (hashdistill/app/) imports stages."""
    for path in KERNEL_FILES:
        imports = [line.strip() for line in path.read_text().splitlines()
                   if line.strip().startswith(("import ", "from "))]
        assert not [line for line in imports if any(stage in line for stage in STAGES)], path


def test_importing_the_kernel_loads_no_stage_and_no_engine():
    kernel = [".".join(("hashdistill", *p.relative_to(KERNEL).with_suffix("").parts))
              for p in KERNEL_FILES if p.name not in ("__main__.py",)]
    code = (f"import sys\nfor name in {sorted(n.removesuffix('.__init__') for n in kernel)!r}:\n"
            "    __import__(name)\n"
            f"loaded = [m for m in sys.modules if m.startswith({STAGES!r}) or m.split('.')[0] in ('ray', 'pymilvus')]\n"
            "print(loaded)\nsys.exit(1 if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_cli_entry_points():
    for cmd in (["hashdistill", "--help"], [sys.executable, "-m", "hashdistill", "recipes"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "hashdistill", "recipes"], capture_output=True, text=True)
    assert "quickstart" in done.stdout and "fashion-mnist-ood" in done.stdout
