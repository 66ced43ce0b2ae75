// hashdistill's demo page: decode an image as hashdistill does, run the phone model in onnxruntime-web, and search
// the index's codes by Hamming distance, all in the browser. window.hashdistill exposes the same steps to tests.
"use strict";

const TOP_K = 12;
const TIMED_RUNS = 5;  // the latency shown: the median of these runs of the query, after the session's warm-up
const POPCOUNT = new Uint8Array(256).map((_, i) => i.toString(2).split("1").length - 1);
const state = {};

async function load() {
  ort.env.wasm.wasmPaths = new URL(document.body.dataset.ortWasmPaths, document.baseURI).href;  // a local copy too
  ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation, which a static site cannot promise
  const [meta, codes] = await Promise.all([
    fetch("index.json").then((r) => r.json()),
    fetch("codes.bin").then((r) => r.arrayBuffer()).then((b) => new Uint8Array(b)),
  ]);
  state.meta = meta;
  state.codes = codes;
  state.classCodes = meta.class_codes.map(hexBytes);
  state.session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  const side = meta.input_size, blank = new Uint8Array(side * side * 3).fill(255);
  for (let i = 0; i < 3; i++) await encode({ rgb: blank, height: side, width: side });  // the first runs set up
  document.getElementById("status").textContent = `model loaded: ${meta.bits}-bit codes, ${meta.count} in the index`;
  document.getElementById("count").textContent = meta.count;
}

function hexBytes(hex) {
  return Uint8Array.from(hex.match(/../g).map((h) => parseInt(h, 16)));
}

// hashdistill's decoding rule (hashdistill.imagefiles.as_rgb): EXIF orientation applied, transparency over white,
// no colour management; RGB uint8, height x width x 3.
async function decode(blob) {
  const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none",
                                                  premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { colorSpace: "srgb", willReadFrequently: true });
  context.fillStyle = "#ffffff";
  context.fillRect(0, 0, bitmap.width, bitmap.height);
  context.drawImage(bitmap, 0, 0);
  const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const rgb = new Uint8Array(bitmap.width * bitmap.height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  return { rgb, height: bitmap.height, width: bitmap.width };
}

async function encode(image) {
  const input = new ort.Tensor("uint8", image.rgb, [1, image.height, image.width, 3]);
  const started = performance.now();
  const output = await state.session.run({ images: input });
  return { code: new Uint8Array(output.codes.data), ms: performance.now() - started };
}

// The code of an image and the model's steady-state time on it: the median of TIMED_RUNS runs after a first one
// (a new image size makes onnxruntime-web plan its buffers again; that run is not what a user's next query costs).
async function encodeTimed(image) {
  const { code } = await encode(image);
  const times = [];
  for (let i = 0; i < TIMED_RUNS; i++) times.push((await encode(image)).ms);
  return { code, ms: times.sort((a, b) => a - b)[Math.floor(TIMED_RUNS / 2)] };
}

function hamming(a, b, offset) {
  let d = 0;
  for (let i = 0; i < a.length; i++) d += POPCOUNT[a[i] ^ b[offset + i]];
  return d;
}

// The k nearest database rows by Hamming distance, ties by database order (a stable sort), and how many rows
// share the best distance: with short codes many images tie, and the ones shown are then only the first of them.
function search(code, k) {
  const width = state.meta.width, count = state.meta.count;
  const distances = new Uint16Array(count);
  for (let row = 0; row < count; row++) distances[row] = hamming(code, state.codes, row * width);
  const rows = Array.from({ length: count }, (_, i) => i).sort((x, y) => distances[x] - distances[y] || x - y);
  const top = rows.slice(0, k).map((row) => ({ row, id: state.meta.ids[row], distance: distances[row],
                                               label: state.meta.labels[row] }));
  const best = count ? distances[rows[0]] : null;
  const tied = count ? distances.reduce((n, d) => n + (d === best), 0) : 0;
  return { top, ties: { distance: best, count: tied, shown: top.filter((hit) => hit.distance === best).length } };
}

function tiesText(ties) {
  if (ties.count <= 1) return "the nearest image is the only one at its distance";
  const which = ties.shown < ties.count ? `the first ${ties.shown} in database order are shown`
                                        : "all of them are shown";
  return `${ties.count} database images share the best distance, ${ties.distance}; ${which}`;
}

// MHD: the nearest class code, ties to the lowest class; out of distribution where no class code matches exactly.
function classify(code) {
  let best = 0, bestDistance = Infinity;
  state.classCodes.forEach((classCode, c) => {
    const d = hamming(code, classCode, 0);
    if (d < bestDistance) { best = c; bestDistance = d; }
  });
  return { index: best, name: state.meta.class_names[best], distance: bestDistance, ood: bestDistance !== 0 };
}

async function searchBlob(blob, k = TOP_K) {
  const image = await decode(blob);
  const { code, ms } = await encodeTimed(image);
  const { top, ties } = search(code, k);
  return { code: Array.from(code, (b) => b.toString(16).padStart(2, "0")).join(""), ms,
           height: image.height, width: image.width, class: classify(code), top, ties };
}

function thumbnail(row) {
  const t = state.meta.thumbnails, sheet = Math.floor(row / t.per_sheet), slot = row % t.per_sheet;
  const div = document.createElement("div");
  div.className = "thumb";
  div.style.background = `url(${t.sheets[sheet]}) -${(slot % t.per_row) * t.size}px ` +
                         `-${Math.floor(slot / t.per_row) * t.size}px`;
  return div;
}

function show(blob, found) {
  document.getElementById("query").src = URL.createObjectURL(blob);
  document.getElementById("code").textContent = found.code;
  document.getElementById("class").textContent = found.class.name;
  document.getElementById("class-distance").textContent = found.class.distance;
  const ood = document.getElementById("ood");
  ood.className = found.class.ood ? "ood" : "ind";
  ood.textContent = found.class.ood ? "out of distribution: no class code matches exactly"
                                    : "in distribution: its code is a class code";
  document.getElementById("timing").textContent =
    `model: ${found.ms.toFixed(1)} ms in this browser (median of ${TIMED_RUNS} runs, after a warm-up)`;
  document.getElementById("ties").textContent = tiesText(found.ties);
  const hits = document.getElementById("hits");
  hits.replaceChildren(...found.top.map((hit) => {
    const cell = document.createElement("div");
    cell.className = "hit";
    const name = state.meta.label_names[hit.label] ?? "";
    cell.append(thumbnail(hit.row), `d=${hit.distance} ${name}`);
    return cell;
  }));
  document.getElementById("result").classList.add("shown");
}

async function searchAndShow(blob) {
  const found = await searchBlob(blob);
  show(blob, found);
  return found;
}

const ready = load();
window.hashdistill = {
  ready,
  // For tests and benchmarks: the same steps as a user's drop, from a URL.
  async searchUrl(url, k = TOP_K) { await ready; return searchAndShow(await (await fetch(url)).blob()); },
  async codeOfUrl(url) { await ready; return (await searchBlob(await (await fetch(url)).blob(), 1)).code; },
  async modelMs(url, runs = 20) {
    await ready;
    const image = await decode(await (await fetch(url)).blob());
    const times = [];
    for (let i = 0; i < runs + 3; i++) times.push((await encode(image)).ms);
    return times.slice(3).sort((a, b) => a - b)[Math.floor(runs / 2)];
  },
};

const drop = document.getElementById("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) ready.then(() => searchAndShow(e.dataTransfer.files[0]));
});
document.getElementById("pick").addEventListener("change", (e) => {
  if (e.target.files.length) ready.then(() => searchAndShow(e.target.files[0]));
});
ready.catch((error) => { document.getElementById("status").textContent = `could not load the model: ${error}`; });
