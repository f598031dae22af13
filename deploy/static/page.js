// The try-it page of `detr serve`: images are sent to /model/predict of this server (nothing else
// is contacted), the detections are drawn over each image as SVG boxes with "class score"
// captions, listed in a table, and the JSON answer is shown as it came.
"use strict";

const state = { files: [], colours: [] };
const $ = (id) => document.getElementById(id);

function colour(id) {
  // Distinct hues per class id (golden-angle steps), as detr.data.show draws them.
  return `hsl(${Math.round((id * 137.508) % 360)}, 80%, 45%)`;
}

async function loadModel() {
  try {
    const [labels, meta] = await Promise.all([
      fetch("model/labels").then((r) => r.json()),
      fetch("model/metadata").then((r) => r.json()),
    ]);
    $("model").textContent = `${meta.arch} (${meta.backbone}), ${labels.count} classes` +
      (meta.source ? ` — ${meta.source}` : "") + `; at most ${meta.limits.max_images} images per request`;
    const list = $("classes");
    list.replaceChildren();
    for (const { id, name } of labels.labels) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.style.background = colour(id);
      item.append(swatch, `${id}: ${name}`);
      list.append(item);
    }
  } catch (error) {
    showStatus(`cannot read the model's description: ${error}`, true);
  }
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function choose(fileList) {
  state.files = Array.from(fileList).filter((f) => f.type === "" || f.type.startsWith("image/"));
  $("detect").disabled = state.files.length === 0;
  showStatus(state.files.length ? `${state.files.length} image(s) chosen` : "choose at least one image", !state.files.length);
  if (state.files.length) detect();
}

async function detect() {
  if (!state.files.length) return;
  const threshold = $("threshold").value;
  const form = new FormData();
  for (const file of state.files) form.append("image", file, file.name);
  showStatus("detecting…");
  $("detect").disabled = true;
  try {
    const response = await fetch(`model/predict?score_threshold=${encodeURIComponent(threshold)}`,
                                 { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok || body.status !== "ok") {
      showStatus(`error ${response.status}: ${body.message || response.statusText}`, true);
      return;
    }
    render(body);
    const found = body.predictions.reduce((n, p) => n + p.scores.length, 0);
    showStatus(`${found} detection(s) in ${body.predictions.length} image(s) at threshold ${threshold}`);
  } catch (error) {
    showStatus(`the request failed: ${error}`, true);
  } finally {
    $("detect").disabled = false;
  }
}

function render(body) {
  const results = $("results");
  results.replaceChildren();
  body.predictions.forEach((prediction, index) => {
    const file = state.files[index];
    const section = document.createElement("div");
    section.className = "result";
    const title = document.createElement("h3");
    title.textContent = `${file.name} — ${prediction.image_size[0]}×${prediction.image_size[1]}, ` +
      `${prediction.scores.length} detection(s)`;
    section.append(title, figure(file, prediction), table(prediction));
    const json = document.createElement("pre");
    json.className = "json";
    json.textContent = JSON.stringify(prediction, null, 2);
    section.append(json);
    results.append(section);
  });
}

function figure(file, prediction) {
  // Boxes are in pixels of the image as the server decoded it (EXIF orientation applied), which is
  // how the browser shows it: the SVG's viewBox is that pixel grid, laid over the <img>.
  const [width, height] = prediction.image_size;
  const wrap = document.createElement("div");
  wrap.className = "figure";
  const img = document.createElement("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  prediction.boxes.forEach(([x1, y1, x2, y2], i) => {
    const stroke = colour(prediction.label_ids[i]);
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("class", "box");
    rect.setAttribute("x", x1);
    rect.setAttribute("y", y1);
    rect.setAttribute("width", Math.max(x2 - x1, 0));
    rect.setAttribute("height", Math.max(y2 - y1, 0));
    rect.setAttribute("stroke", stroke);
    const caption = document.createElementNS(ns, "text");
    caption.setAttribute("class", "caption");
    caption.setAttribute("x", x1 + 2);
    caption.setAttribute("y", Math.max(y1 - 3, 10));
    caption.setAttribute("stroke", stroke);
    caption.setAttribute("transform-origin", `${x1} ${y1}`);
    caption.textContent = `${prediction.labels[i]} ${prediction.scores[i].toFixed(2)}`;
    svg.append(rect, caption);
  });
  img.addEventListener("load", () => {
    // Captions keep a readable size whatever the image's scale on screen.
    const scale = width / img.clientWidth;
    svg.querySelectorAll("text.caption").forEach((t) => t.setAttribute("font-size", `${12 * scale}px`));
  });
  wrap.append(img, svg);
  return wrap;
}

function table(prediction) {
  const t = document.createElement("table");
  t.className = "detections";
  t.innerHTML = "<thead><tr><th>class</th><th>score</th><th>box (x1, y1, x2, y2)</th></tr></thead>";
  const rows = document.createElement("tbody");
  prediction.scores.forEach((score, i) => {
    const row = document.createElement("tr");
    for (const text of [prediction.labels[i], score.toFixed(3), prediction.boxes[i].map((v) => v.toFixed(1)).join(", ")]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    rows.append(row);
  });
  t.append(rows);
  return t;
}

$("files").addEventListener("change", (e) => choose(e.target.files));
$("threshold").addEventListener("input", (e) => { $("threshold-value").textContent = Number(e.target.value).toFixed(2); });
$("threshold").addEventListener("change", () => detect());
$("detect").addEventListener("click", () => detect());
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const name of ["dragleave", "drop"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", (e) => choose(e.dataTransfer.files));
loadModel();
