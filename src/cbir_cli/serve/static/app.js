// The search page: upload (or drop) an image, or click a result, and show the
// K nearest indexed images. Plain DOM, no build step. Names from the index are
// inserted with textContent only, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let lastQuery = null; // {file} or {id}: re-run when K changes
let queryUrl = null;  // object URL of the uploaded query, revoked when replaced
let latest = 0;       // number of the newest search: older answers arriving late are dropped

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

function showQuery(src, name) {
  $("query-img").src = src;
  $("query-name").textContent = name;
  $("query").hidden = false;
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

function renderResults(data) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of data.results) {
    const item = document.createElement("li");
    item.className = "result";
    item.tabIndex = 0;
    item.dataset.id = hit.id;
    item.dataset.rank = hit.rank;
    item.title = `${hit.path}\nclick: more like this`;

    const img = document.createElement("img");
    img.src = hit.thumbnail_url;
    img.alt = hit.name;
    img.loading = "lazy";

    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    meta.append(rank, score);

    const name = document.createElement("div");
    name.className = "name";
    name.textContent = hit.name;

    item.append(img, meta, name);
    item.addEventListener("click", () => searchById(hit.id, hit.name));
    item.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); searchById(hit.id, hit.name); }
    });
    list.append(item);
  }
  setStatus(`${data.results.length} results for ${data.query.name}`);
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
    if (query.file) {
      const form = new FormData();
      form.append("image", query.file, query.file.name);
      form.append("k", String(k));
      data = await callApi("/api/search", { method: "POST", body: form });
    } else {
      data = await callApi(`/api/search?id=${encodeURIComponent(query.id)}&k=${k}`);
    }
    if (mine === latest) renderResults(data);
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
  run({ file });
}

function searchById(id, name) {
  showQuery(`/api/thumbnails/${id}`, name);
  window.scrollTo({ top: 0, behavior: "smooth" });
  run({ id });
}

async function loadHealth() {
  try {
    const info = await callApi("/api/health");
    $("health").textContent = `${info.count} images · model ${info.model} · ${info.index_type} index`;
    $("k").max = String(info.max_k);
  } catch (e) {
    $("health").textContent = `server unavailable: ${e.message}`;
  }
}

function setUp() {
  const drop = $("dropzone");
  $("file").addEventListener("change", (e) => searchByFile(e.target.files[0]));
  $("k").addEventListener("change", () => { if (lastQuery) run(lastQuery); });
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
  loadHealth();
}

setUp();
