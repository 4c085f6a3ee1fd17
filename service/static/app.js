// The operator page: pick a model, drop an image, see score, verdict, heatmap overlay and regions.
// Plain browser JavaScript calling the public API; the API key (if the service needs one) stays in
// this tab's sessionStorage and goes out only in the X-API-Key header.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "anoscope.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function problemText(response) {
  try {
    const body = await response.json();
    return `${body.title || response.status}: ${body.detail || ""}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function checkStatus() {
  try {
    const r = await fetch("/readyz");
    $("status").dataset.state = r.ok ? "ready" : "down";
    $("status").textContent = r.ok ? "ready" : "not ready";
  } catch (e) {
    $("status").dataset.state = "down";
    $("status").textContent = "unreachable";
  }
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("key-label").hidden = false;
    showError("This service needs an API key: enter it above.");
    return;
  }
  if (!r.ok) { showError(await problemText(r)); return; }
  showError("");
  const data = await r.json();
  const select = $("model");
  select.replaceChildren();
  for (const m of data.models) {
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = m.state === "ready" ? `${m.name} (${m.version})` : `${m.name} (failed to load)`;
    opt.disabled = m.state !== "ready";
    opt.dataset.info = m.state === "ready"
      ? `${m.family} · ${m.image_size}px · ${m.provider} · ${m.calibrated ? "calibrated" : "uncalibrated: no verdicts yet"}`
      : m.error || "";
    if (m.name === data.default_model) opt.selected = true;
    select.append(opt);
  }
  showModelInfo();
}

function showModelInfo() {
  const opt = $("model").selectedOptions[0];
  $("model-info").textContent = opt ? opt.dataset.info : "no models loaded";
}

async function inspect(file) {
  const model = $("model").value;
  if (!model) { showError("No model is loaded."); return; }
  showError("");
  $("drop").setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("files", file, file.name);
  const url = `/v1/models/${encodeURIComponent(model)}/predict?heatmap=${$("heatmap").value}&regions=true`;
  try {
    const r = await fetch(url, { method: "POST", body: form, headers: headers() });
    if (!r.ok) { showError(await problemText(r)); $("result").hidden = true; return; }
    render((await r.json()).results[0]);
  } catch (e) {
    showError(`The request failed: ${e}`);
  } finally {
    $("drop").removeAttribute("aria-busy");
  }
}

function render(res) {
  $("filename").textContent = res.filename || "(unnamed)";
  $("score").textContent = res.anomaly_score.toFixed(3);
  const verdict = res.is_anomalous === null ? "uncalibrated" : res.is_anomalous ? "anomalous" : "normal";
  $("verdict").textContent = verdict === "uncalibrated" ? "no verdict (model uncalibrated)" : verdict;
  $("verdict").dataset.verdict = verdict;
  const regions = res.regions || [];
  $("region-count").textContent = String(regions.length);
  const t = res.timings_ms;
  $("timings").textContent = `decode ${t.decode} ms · inference ${t.inference} ms · post ${t.postprocess} ms`;

  const img = $("overlay");
  const svg = $("boxes");
  svg.replaceChildren();
  img.onload = () => {
    svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    regions.forEach((g, i) => {
      const rect = document.createElementNS(SVG_NS, "rect");
      rect.setAttribute("class", "region");
      for (const [k, v] of [["x", g.x], ["y", g.y], ["width", g.width], ["height", g.height]]) rect.setAttribute(k, v);
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = `region ${i + 1}: peak ${g.peak_score}`;
      rect.append(title);
      svg.append(rect);
    });
    $("result").dataset.rendered = "true";
  };
  $("result").dataset.rendered = "false";
  img.src = `data:image/png;base64,${res.heatmap}`;

  const body = $("regions").querySelector("tbody");
  body.replaceChildren();
  regions.forEach((g, i) => {
    const tr = document.createElement("tr");
    for (const v of [i + 1, g.x, g.y, g.width, g.height, g.area, g.peak_score.toFixed(3)]) {
      const td = document.createElement("td");
      td.textContent = String(v);
      tr.append(td);
    }
    body.append(tr);
  });
  $("result").hidden = false;
}

function wire() {
  const stored = sessionStorage.getItem(KEY_STORE);
  if (stored) { $("api-key").value = stored; $("key-label").hidden = false; }
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", showModelInfo);
  $("file").addEventListener("change", () => { if ($("file").files[0]) inspect($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) inspect(e.dataTransfer.files[0]);
  });
  checkStatus();
  loadModels();
}

wire();
