"""The browser client: hashdistill demo writes a static site; headless Chromium (Debian's, driven by playwright) runs
the phone model in onnxruntime-web and gives Python onnxruntime's codes bit for bit, the same top-k as
`hashdistill index search`, and a screenshot for the run's report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ORT_WEB, ROOT, TINY, needs_browser
from PIL import Image

from hashdistill.app.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A whole tiny run: teacher, student, ternary student, the fp32 and phone ONNX files, the index."""
    folder = tmp_path_factory.mktemp("demo-run")
    recipe = folder / "input.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "image_size": 32}}))
    assert main(["run", str(recipe), "--out", str(folder / "run")]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> list[Path]:
    """Image files of many sizes and both aspects, PNG and JPEG, a few phone photos with an EXIF orientation."""
    folder = tmp_path_factory.mktemp("queries")
    rng = np.random.default_rng(7)
    paths = []
    for i in range(210):
        height, width = int(rng.integers(9, 70)), int(rng.integers(9, 70))
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        if i % 3 == 0:
            path = folder / f"q{i:03d}.jpg"
            exif = Image.Exif()
            if i % 9 == 0:
                exif[0x0112] = 6  # a phone photo taken upright, stored turned
            image.save(path, quality=90, exif=exif)
        else:
            path = folder / f"q{i:03d}.png"
            image.save(path)
        paths.append(path)
    return paths


def test_the_site_has_the_pinned_runtime_and_refuses_what_is_not_ours(run, tmp_path, capsys):
    from hashdistill.app.demo import ORT_WEB_INTEGRITY, ORT_WEB_VERSION, integrity

    assert main(["demo", str(run), "-o", str(tmp_path / "site")]) == 0
    html = (tmp_path / "site" / "index.html").read_text()
    assert f"onnxruntime-web@{ORT_WEB_VERSION}/dist/ort.wasm.min.js" in html and ORT_WEB_INTEGRITY in html
    assert json.loads((ROOT / "package.json").read_text())["dependencies"]["onnxruntime-web"] == ORT_WEB_VERSION
    if ORT_WEB.is_dir():  # the pinned hash is the npm package's file
        assert integrity(ORT_WEB / "ort.wasm.min.js") == ORT_WEB_INTEGRITY
    index = json.loads((tmp_path / "site" / "index.json").read_text())
    codes = (tmp_path / "site" / "codes.bin").read_bytes()
    assert len(codes) == index["count"] * index["width"] and index["thumbnails"]["sheets"]
    assert (tmp_path / "site" / "thumbs" / "sheet-0000.png").is_file()
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [tmp_path / "site",
                                                                                *(tmp_path / "site").rglob("*")]}
    assert modes["site"] == modes["site/thumbs"] == 0o755 and modes["site/index.html"] == 0o644, modes
    assert {mode for name, mode in modes.items() if (tmp_path / name).is_file()} == {0o644}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert main(["demo", str(run), "-o", str(mine), "--force"]) == 2
    assert "left untouched" in capsys.readouterr().err and (mine / "keep.txt").is_file()
    fake = tmp_path / "fake-ort"
    fake.mkdir()
    for name in ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"):
        (fake / name).write_text("not onnxruntime-web")
    assert main(["demo", str(run), "-o", str(tmp_path / "other"), "--ort-web", str(fake)]) == 2
    assert "is not onnxruntime-web" in capsys.readouterr().err and not (tmp_path / "other").exists()


@needs_browser
def test_the_page_gives_python_onnxruntimes_codes_and_index_search_top_k(run, queries, tmp_path):
    from hashdistill.app.browser import serve_folder, with_page
    from hashdistill.app.demo import build_demo
    from hashdistill.app.pipeline import phone_file
    from hashdistill.export.runtime import EdgeModel
    from hashdistill.search.index import load_index, search_images

    phone = phone_file(run / "model.onnx")
    site = tmp_path / "site"
    build_demo(phone, run / "index.npz", site, ort_web=ORT_WEB)
    (tmp_path / "q").symlink_to(queries[0].parent)
    expected = EdgeModel(phone).encode([str(p) for p in queries])
    with serve_folder(tmp_path) as base, with_page(f"{base}/site/index.html") as page:
        urls = [f"{base}/q/{p.name}" for p in queries]
        codes = page.evaluate("async (urls) => { const out = []; for (const u of urls) "
                              "out.push(await window.hashdistill.codeOfUrl(u)); return out; }", urls)
        shown = [page.evaluate("(u) => window.hashdistill.searchUrl(u)", u) for u in urls[:5]]
        texts = page.evaluate("['timing', 'ties'].map((id) => document.getElementById(id).textContent)")
    assert [bytes.fromhex(c) for c in codes] == [row.tobytes() for row in expected]  # every file, bit for bit
    for path, page_result in zip(queries[:5], shown):
        python = search_images(run / "index.npz", [str(path)], k=len(page_result["top"]), model=str(phone))
        distances = [hit["distance"] for hit in page_result["top"]]
        assert distances == python.distances[0].tolist()
        kth = distances[-1]
        assert {h["id"] for h in page_result["top"] if h["distance"] < kth} == \
            {int(i) for i, d in zip(python.ids[0], python.distances[0]) if d < kth}
        assert page_result["class"]["ood"] == (page_result["class"]["distance"] != 0)
        everyone = search_images(run / "index.npz", [str(path)], k=len(load_index(run / "index.npz")),
                                 model=str(phone))
        best = int(everyone.distances[0][0])
        ties = page_result["ties"]
        assert ties == {"distance": best, "count": int((everyone.distances[0] == best).sum()),
                        "shown": sum(d == best for d in distances)}
        assert ties["count"] > 1  # short codes tie: the page says so (the message is checked below)
    assert "median of 5 runs" in texts[0] and f"share the best distance, {shown[-1]['ties']['distance']}" in texts[1]


@needs_browser
def test_a_screenshot_of_the_page_goes_into_the_runs_report(run, queries, tmp_path, capsys):
    assert main(["demo", str(run), "-o", str(tmp_path / "site"), "--ort-web", str(ORT_WEB),
                 "--screenshot", str(queries[1])]) == 0
    out = capsys.readouterr().out
    assert "screenshot:" in out and (run / "demo.png").is_file()
    shot = np.asarray(Image.open(run / "demo.png").convert("RGB"))
    assert shot.shape[0] > 300 and shot.std() > 10  # a page, not a blank frame
    assert "![demo page](demo.png)" in (run / "report.md").read_text()


@needs_browser
def test_the_screenshot_searches_the_file_given_whatever_its_name(run, queries, tmp_path, capsys):
    """A query's name reaches the page as data: a name written as JavaScript is searched as the file it names, not
    run, and a same-named file beside the site is not the one searched."""
    from hashdistill.app.demo import build_demo, write_page_screenshot
    from hashdistill.app.pipeline import phone_file
    from hashdistill.export.runtime import EdgeModel

    phone = phone_file(run / "model.onnx")
    build_demo(phone, run / "index.npz", tmp_path / "site", ort_web=ORT_WEB)
    pngs = [p for p in queries if p.suffix == ".png"]
    codes = [row.tobytes() for row in EdgeModel(phone).encode([str(p) for p in pngs])]
    other = next(i for i, code in enumerate(codes) if code != codes[0])  # two files of different codes
    given = tmp_path / "mine" / "y.png'.replace('y.png','z.png')+'"
    given.parent.mkdir()
    shutil.copyfile(pngs[0], given)
    shutil.copyfile(pngs[other], tmp_path / given.name)  # a same-named file in the site's parent folder
    shutil.copyfile(pngs[other], tmp_path / "z.png")  # what the name, run as code, would have fetched
    shown = write_page_screenshot(tmp_path / "site", given, tmp_path / "shot.png")
    assert bytes.fromhex(shown["code"]) == codes[0] and (tmp_path / "shot.png").is_file()


def test_a_browser_that_will_not_start_is_a_clear_error(monkeypatch):
    pytest.importorskip("playwright", reason="playwright is not installed (pip install playwright)")
    from hashdistill.app.browser import with_page
    from hashdistill.errors import UserError

    monkeypatch.setenv("HASHDISTILL_CHROMIUM", "/bin/false")  # a file that runs and exits at once
    with pytest.raises(UserError, match="Chromium at /bin/false did not start"):
        with with_page("about:blank", timeout_s=30):
            pass
