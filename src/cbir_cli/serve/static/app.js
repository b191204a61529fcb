// The search page: upload (or drop) an image, click a result, or type words
// (on an index whose model has a text tower: CLIP), alone or with the image
// shown, and show the K nearest indexed images. Drag on the query image to search with a region of
// it; the rectangle can be moved and resized, and each change searches again.
// Plain DOM, no build step. Names from the index are inserted with textContent
// only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let lastQuery = null; // {file}, {id, name}, either with {text}, or {text}: re-run when K or a filter changes
let currentImage = null; // the image shown as the query ({file} or {id, name}): words may be added to it
let queryUrl = null;  // object URL of the uploaded query, revoked when replaced
let latest = 0;       // number of the newest search: older answers arriving late are dropped
let box = null;       // the region, in fractions of the query image: {x0, y0, x1, y1}, or null
const MIN_BOX = 0.03; // a smaller drag is a click, not a region

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function readK() {
  const input = $("k");
  const k = Number.parseInt(input.value, 10);
  const max = Number.parseInt(input.max, 10);
  if (!Number.isInteger(k) || k < 1 || k > max) {
    throw new Error(`K must be a whole number from 1 to ${max}`);
  }
  return k;
}

// The optional parameters: region, folder, minimum score (as the API names them).
// A word query searches with whole images (the API refuses a region with words).
function narrowing(query) {
  const out = {};
  if (box && !query.text) out.box = [box.x0, box.y0, box.x1, box.y1].map((v) => v.toFixed(4)).join(",");
  const under = $("under").value.trim();
  if (under) out.under = under;
  const minScore = $("min-score").value.trim();
  if (minScore) out.min_score = minScore;
  return out;
}

function showQuery(src, name) {
  $("query-img").src = src;
  $("query-img").alt = `query: ${name}`;
  $("query-name").textContent = name;
  $("query").hidden = false;
  $("with-image-label").hidden = $("words").disabled;
  setBox(null);
}

function hideQuery() {
  currentImage = null;
  $("query").hidden = true;
  $("with-image-label").hidden = true;
  $("with-image").checked = false;
  setBox(null);
}

// Which kind of query ran, in the status line and the tab's title: an image, a
// region of one, words (“…”), or an image + words.
function describe(data, query) {
  const name = data.query.name || query.name;
  if (!data.query.text) return data.query.box ? `a region of ${name}` : name;
  const words = data.query.text.map((t) => `“${t}”`);
  return (name ? [name, ...words] : words).join(" + ");
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON (proxy error page...): reported below with the status
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `HTTP ${response.status}`);
  }
  return body;
}

// The folder as a tile shows it: its own name, the part that tells folders apart
// (the full path is on hover).
function shortFolder(folder) {
  const parts = folder.split(/[\\/]/).filter(Boolean);
  return parts.length > 1 ? `…/${parts[parts.length - 1]}` : folder;
}

// The score follows the order; the image's own cosine is shown beside it where
// re-ranking placed it below a less similar one (then the two differ).
function scoreCell(hit) {
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  if (hit.cosine.toFixed(3) !== hit.score.toFixed(3)) {
    const cosine = document.createElement("span");
    cosine.className = "cosine";
    cosine.textContent = ` (cos ${hit.cosine.toFixed(3)})`;
    score.title = "score: the lowest cosine down to this rank; in brackets: this image's own cosine";
    score.append(cosine);
  }
  return score;
}

function renderResults(data, query) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of data.results) {
    const item = document.createElement("li");
    item.className = "result";
    item.dataset.id = hit.id;
    item.dataset.rank = hit.rank;

    // The picture searches for more like it; the name opens the full image.
    const picture = document.createElement("button");
    picture.type = "button";
    picture.className = "picture";
    picture.title = "more like this";
    const img = document.createElement("img");
    img.src = hit.thumbnail_url;
    img.alt = `${hit.name}, rank ${hit.rank}: search for more like it`;
    img.loading = "lazy";
    picture.append(img);
    picture.addEventListener("click", () => searchById(hit.id, hit.name));

    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    meta.append(rank, scoreCell(hit));

    const name = document.createElement("a");
    name.className = "name";
    name.href = hit.image_url;
    name.target = "_blank";
    name.rel = "noopener";
    name.textContent = hit.name;
    name.title = `${hit.path}\nopen the full image`;

    const folder = document.createElement("span");
    folder.className = "folder";
    folder.textContent = shortFolder(hit.folder);
    folder.title = hit.folder;

    item.append(picture, meta, name, folder);
    list.append(item);
  }
  const what = describe(data, query);
  setStatus(`${data.results.length} results for ${what}`);
  document.title = `cbir: ${what}`;
  $("hint").textContent = "Click a picture to search for more like it, its name to open the full image. "
    + "Drag on the query image to search with a region of it.";
}

async function run(query) {
  lastQuery = query;
  const mine = ++latest;
  let k;
  try {
    k = readK();
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  setStatus("searching…");
  try {
    let data;
    const extra = narrowing(query);
    if (query.text) extra.text = query.text;
    if (query.file) {
      const form = new FormData();
      form.append("image", query.file, query.file.name);
      form.append("k", String(k));
      for (const [key, value] of Object.entries(extra)) form.append(key, value);
      data = await callApi("/api/search", { method: "POST", body: form });
    } else {
      const params = new URLSearchParams({ k: String(k), ...extra });
      if (query.id !== undefined) params.set("id", String(query.id));
      data = await callApi(`/api/search?${params}`);
    }
    if (mine === latest) renderResults(data, query);
  } catch (e) {
    if (mine !== latest) return;
    $("results").replaceChildren();
    setStatus(e.message, true);
  }
}

function searchByFile(file) {
  if (!file) return;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  showQuery(queryUrl, file.name);
  currentImage = { file };
  run(currentImage);
}

function searchById(id, name) {
  showQuery(`/api/thumbnails/${id}`, name);
  window.scrollTo({ top: 0, behavior: "smooth" });
  currentImage = { id, name };
  run(currentImage);
}

// Enter (or the button) in the word box: the words alone, or with the image
// shown when "and the image below" is ticked.
function searchByWords(e) {
  e.preventDefault();
  const text = $("words").value.trim();
  if (!text) {
    setStatus("Type some words to search by.", true);
    return;
  }
  if (currentImage && $("with-image").checked) {
    setBox(null); // words search with whole images
    run({ ...currentImage, text });
  } else {
    hideQuery();
    run({ text });
  }
}

// Words need a model with a text tower; on any other index the box stays
// disabled (out of the Tab order) and says why in one line.
function setUpWords(info) {
  const usable = Boolean(info.has_text);
  $("words").disabled = !usable;
  $("words-go").disabled = !usable;
  $("with-image-label").hidden = !usable || !currentImage;
  $("words-note").textContent = usable
    ? "Describe the picture you want; Enter searches."
    : `Searching by words needs a CLIP model; this index uses ${info.model}.`;
}

// ---------------------------------------------------------------- the region

function setBox(next) {
  box = next;
  const el = $("box");
  el.hidden = !box;
  $("clear-box").hidden = !box;
  if (box) {
    el.style.left = `${box.x0 * 100}%`;
    el.style.top = `${box.y0 * 100}%`;
    el.style.width = `${(box.x1 - box.x0) * 100}%`;
    el.style.height = `${(box.y1 - box.y0) * 100}%`;
    const pct = (v) => `${Math.round(v * 100)}%`;
    $("region").textContent = `region ${pct(box.x0)}–${pct(box.x1)} × ${pct(box.y0)}–${pct(box.y1)}`;
  } else {
    $("region").textContent = "Drag on the image to search with a region of it.";
  }
}

const clamp = (v) => Math.min(1, Math.max(0, v));

function pointerFraction(e) {
  const rect = $("query-img").getBoundingClientRect();
  return { x: clamp((e.clientX - rect.left) / rect.width), y: clamp((e.clientY - rect.top) / rect.height) };
}

// One drag at a time: "draw" a new rectangle, "move" it, or resize it by a corner.
function setUpRegion() {
  const frame = $("query-frame");
  let drag = null;

  frame.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    const at = pointerFraction(e);
    const corner = e.target.dataset ? e.target.dataset.corner : undefined;
    if (corner && box) {
      drag = { mode: "resize", corner, start: { ...box } };
    } else if (e.target === $("box") && box) {
      drag = { mode: "move", from: at, start: { ...box } };
    } else {
      drag = { mode: "draw", from: at };
      setBox({ x0: at.x, y0: at.y, x1: at.x, y1: at.y });
    }
    frame.setPointerCapture(e.pointerId);
  });

  frame.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const at = pointerFraction(e);
    if (drag.mode === "draw") {
      setBox({ x0: Math.min(drag.from.x, at.x), y0: Math.min(drag.from.y, at.y),
               x1: Math.max(drag.from.x, at.x), y1: Math.max(drag.from.y, at.y) });
    } else if (drag.mode === "move") {
      const w = drag.start.x1 - drag.start.x0, h = drag.start.y1 - drag.start.y0;
      const x0 = Math.min(1 - w, Math.max(0, drag.start.x0 + at.x - drag.from.x));
      const y0 = Math.min(1 - h, Math.max(0, drag.start.y0 + at.y - drag.from.y));
      setBox({ x0, y0, x1: x0 + w, y1: y0 + h });
    } else {
      const b = { ...drag.start };
      if (drag.corner.includes("w")) b.x0 = at.x; else b.x1 = at.x;
      if (drag.corner.includes("n")) b.y0 = at.y; else b.y1 = at.y;
      setBox({ x0: Math.min(b.x0, b.x1), y0: Math.min(b.y0, b.y1),
               x1: Math.max(b.x0, b.x1), y1: Math.max(b.y0, b.y1) });
    }
  });

  const finish = () => {
    if (!drag) return;
    const drawn = drag;
    drag = null;
    if (box && (box.x1 - box.x0 < MIN_BOX || box.y1 - box.y0 < MIN_BOX)) {
      // Too small to be a region: a click. Keep the previous one when moving/resizing.
      setBox(drawn.mode === "draw" ? null : drawn.start);
      if (drawn.mode === "draw" && currentImage) run(currentImage);
      return;
    }
    if (currentImage) run(currentImage);
  };
  frame.addEventListener("pointerup", finish);
  frame.addEventListener("pointercancel", finish);

  $("clear-box").addEventListener("click", () => {
    setBox(null);
    if (currentImage) run(currentImage);
  });
}

async function loadHealth() {
  try {
    const info = await callApi("/api/health");
    $("health").textContent = info.summary;
    $("health").title = `${info.index}\n${info.dim}-d ${info.model} (${info.weights}) vectors; ${info.index_type}`;
    $("k").max = String(info.max_k);
    setUpWords(info);
  } catch (e) {
    $("health").textContent = `server unavailable: ${e.message}`;
  }
}

function setUp() {
  const drop = $("dropzone");
  $("file").addEventListener("change", (e) => searchByFile(e.target.files[0]));
  $("words-form").addEventListener("submit", searchByWords);
  for (const id of ["k", "under", "min-score"]) {
    $(id).addEventListener("change", () => { if (lastQuery) run(lastQuery); });
  }
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => searchByFile(e.dataTransfer.files[0]));
  // Dropping outside the zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  setUpRegion();
  loadHealth();
}

setUp();
