// The latentedit web editor: plain JS on the gateway's JSON / server-sent-event API (web_svc/server.py).
// Every list on the page comes from the services: generators (ListModels), heads (ListHeads) and
// trained directions (ListEdits); requests are the protobuf messages' JSON form.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "latentedit.token";

const state = {
  info: null, catalog: null, heads: [], edits: [], model: null,
  current: null,          // {wire, space}: latents the next edit starts from (null: the seed)
  applied: {},            // slider key -> value already applied to `current`
  frames: [],             // the trajectory strip: {image, scores, points, latents, index, stop}
  shown: -1,
  abort: null,            // AbortController of the stream in flight
  keypoints: null,        // {head, source: [[x, y]], target: [[x, y]]}
};
// What the browser test (tests/test_web.py) and curious users read: timings of the last edit.
window.latentedit = { state, metrics: { edits: [] } };

// ---------------------------------------------------------------------------------------------
// Errors: always a readable message, never a blank page.

class ApiError extends Error {
  constructor(code, message) { super(message); this.code = code; }
}

function showError(err) {
  if (err && err.name === "AbortError") return;
  const code = err && err.code ? err.code + ": " : "";
  const message = err && err.message ? err.message : String(err);
  $("error-text").textContent = code + message;
  $("error").hidden = false;
  if (err && (err.code === "UNAUTHENTICATED" || err.code === "PERMISSION_DENIED") && state.info && state.info.security) {
    $("token-box").hidden = false;
    $("token").focus();
  }
  setStatus("");
}
function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }
window.addEventListener("error", (e) => showError(new ApiError("PAGE", e.message || "script error")));
window.addEventListener("unhandledrejection", (e) => showError(e.reason));

function setStatus(text) { $("status").textContent = text; }

// ---------------------------------------------------------------------------------------------
// The API: JSON calls and server-sent events over fetch (EventSource cannot send a token header).

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function errorFrom(response) {
  let code = "HTTP_" + response.status, message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body.error) { code = body.error.code; message = body.error.message; }
  } catch (_) { /* not JSON: keep the HTTP status */ }
  return new ApiError(code, message);
}

async function api(path, body) {
  let response;
  try {
    response = await fetch(path, body === undefined ? { headers: headers(false) }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  } catch (err) {
    throw new ApiError("UNAVAILABLE", "the web gateway cannot be reached (" + err.message + ")");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function events(path, body, onEvent, signal) {
  let response;
  try {
    response = await fetch(path, body === undefined ? { headers: headers(false), signal }
      : { method: "POST", headers: headers(true), body: JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("UNAVAILABLE", "the web gateway cannot be reached (" + err.message + ")");
  }
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const payload = data ? JSON.parse(data) : {};
      if (name === "error") throw new ApiError(payload.code, payload.message);
      if (name === "end") { ended = true; continue; }
      onEvent(name, payload);
    }
  }
  if (!ended) throw new ApiError("UNAVAILABLE", "the stream ended early (the gateway or a service stopped)");
}

// ---------------------------------------------------------------------------------------------
// Start-up: info, token, catalog.

async function start() {
  bindControls();
  try {
    state.info = await (await api("/api/info")).json();
  } catch (err) { showError(err); return; }
  if (state.info.security) {
    $("token-box").hidden = false;
    $("token-state").textContent = sessionStorage.getItem(TOKEN_KEY) ? "token kept for this tab" : "enter your token";
    if (!sessionStorage.getItem(TOKEN_KEY)) {
      showError(new ApiError("UNAUTHENTICATED", "security is on: enter your bearer token (it is kept in this tab's session storage only)"));
      return;
    }
  }
  await loadCatalog();
}

async function loadCatalog() {
  setStatus("loading…");
  document.body.dataset.catalog = "loading";
  const generator = $("generator").value || "";
  let catalog;
  try {
    catalog = await (await api("/api/catalog?generator=" + encodeURIComponent(generator))).json();
  } catch (err) { showError(err); return; }
  clearError();
  document.body.dataset.catalog = "loaded";  // what the browser test waits for
  state.catalog = catalog;
  state.heads = catalog.heads.heads || [];
  state.edits = catalog.edits.edits || [];
  const models = catalog.models.models || [];
  const select = $("generator");
  if (!select.options.length) {
    for (const m of models) select.add(new Option(m.ref.name, m.ref.name));
    select.value = generator || catalog.models.default_model || (models[0] && models[0].ref.name) || "";
  }
  state.model = models.find((m) => m.ref.name === select.value) || models[0] || null;
  const spaces = state.model ? (state.model.latent_spaces || []).map((s) => s.space) : ["LATENT_SPACE_Z"];
  const invertSpace = $("invert-space");
  invertSpace.replaceChildren(...spaces.map((s) => new Option(spaceLabel(s), s)));
  renderScoreHeads();
  renderSliders();
  renderConditions();
  renderSGF();
  if (!$("train-fields").children.length) renderTrainFields();  // keep what the user typed
  if ($("token-box").hidden === false && sessionStorage.getItem(TOKEN_KEY)) $("token-state").textContent = "token accepted";
  setStatus(state.edits.length + " trained artifact(s)");
  if (!state.frames.length) await preview();
}

const spaceLabel = (s) => ({ LATENT_SPACE_Z: "Z", LATENT_SPACE_W: "W", LATENT_SPACE_W_PLUS: "W+" }[s] || s);
const attrKey = (a) => a.head + "." + a.output + (a.label ? "." + a.label : "");
const artifactName = (e) => e.artifact.ref.name;

// Every scalar attribute the scorer offers ({head, output, label}), for training and SGF targets.
function scalarAttributes() {
  const out = [];
  for (const h of state.heads) for (const o of h.outputs || []) {
    const shape = (o.shape || []).map(Number);
    if (shape.length === 0) out.push({ head: h.name, output: o.name });
    else if (shape.length === 1 && (o.labels || []).length === shape[0]) for (const l of o.labels) out.push({ head: h.name, output: o.name, label: l });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Sliders: one per trained direction.

function sliderSpecs() {
  const specs = [];
  for (const e of state.edits) {
    const name = artifactName(e), space = e.space || "LATENT_SPACE_Z", attrs = e.attributes || [];
    if (e.method === "interfacegan") {
      specs.push({ key: "b:" + name, group: "InterFaceGAN boundaries", label: name + (attrs[0] ? " (" + attrKey(attrs[0]) + ")" : ""),
        method: "interfacegan", artifact: name, space, heads: attrs.map((a) => a.head), attr: attrs[0], min: -5, max: 5, step: 0.5 });
    } else if (e.method === "wstar") {
      for (const a of attrs) specs.push({ key: "w:" + name + ":" + attrKey(a), group: "W* attributes", label: name + ": " + attrKey(a),
        method: "wstar", artifact: name, space, heads: [a.head], attr: a, min: -5, max: 5, step: 0.5 });
    } else if (e.method === "dplase") {
      const names = {};
      for (const d of e.direction_names || []) (names[d.direction_index || 0] ||= []).push(d);
      const count = e.num_directions || 0;
      const shown = Object.keys(names).length ? Object.keys(names).map(Number) : [...Array(Math.min(count, 5)).keys()];
      for (const i of shown.slice(0, 12)) {
        const n = names[i] || [];
        specs.push({ key: "d:" + name + ":" + i, group: "DP-LaSE directions (" + name + ")",
          label: "#" + i + (n.length ? " " + n.map((d) => d.summary).join(", ") : ""),
          method: "dplase", artifact: name, index: i, space, heads: n.map((d) => d.attribute.head), min: -6, max: 6, step: 0.5 });
      }
    } else if (e.method === "ganspace") {
      const count = Math.min(e.num_directions || 5, 5);
      for (let i = 0; i < count; i++) specs.push({ key: "p:" + name + ":" + i, group: "GANSpace components (" + name + ")",
        label: "component " + i, method: "ganspace", artifact: name, index: i, space, heads: [], min: -5, max: 5, step: 0.5 });
    }
  }
  return specs;
}

function renderSliders() {
  const box = $("sliders");
  box.replaceChildren();
  const specs = sliderSpecs();
  if (!specs.length) { box.innerHTML = '<p class="empty">Nothing trained for this generator yet: train a boundary below.</p>'; return; }
  let group = "";
  for (const spec of specs) {
    if (spec.group !== group) {
      group = spec.group;
      const g = document.createElement("div"); g.className = "group"; g.textContent = group; box.append(g);
    }
    const row = document.createElement("div");
    row.className = "slider";
    const id = "slider-" + spec.key.replace(/[^a-zA-Z0-9_-]/g, "_");
    row.innerHTML = `<label for="${id}"></label><input id="${id}" type="range"><output></output>`;
    row.querySelector("label").textContent = spec.label;
    const input = row.querySelector("input"), out = row.querySelector("output");
    Object.assign(input, { min: spec.min, max: spec.max, step: spec.step, value: state.applied[spec.key] || 0 });
    input.dataset.key = spec.key;
    input.dataset.artifact = spec.artifact;
    if (spec.attr) input.dataset.attribute = attrKey(spec.attr);
    out.textContent = Number(input.value).toFixed(1);
    input.addEventListener("input", () => { out.textContent = Number(input.value).toFixed(1); });
    input.addEventListener("change", () => moveSlider(spec, input, row));
    box.append(row);
  }
}

function renderConditions() {
  const box = $("conditions");
  box.replaceChildren();
  const boundaries = state.edits.filter((e) => e.method === "interfacegan");
  if (!boundaries.length) { box.innerHTML = '<span class="empty">no boundaries</span>'; return; }
  for (const e of boundaries) {
    const label = document.createElement("label");
    const attr = (e.attributes || [])[0];
    label.innerHTML = `<input type="checkbox" value=""> `;
    label.firstChild.value = artifactName(e);
    label.firstChild.dataset.attribute = attr ? attrKey(attr) : "";
    label.append(artifactName(e) + (attr ? " (" + attrKey(attr) + ")" : ""));
    box.append(label);
  }
}

function renderScoreHeads() {
  const box = $("score-heads");
  const before = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  box.replaceChildren();
  for (const h of state.heads) {
    if (h.kind === "HEAD_KIND_IDENTITY") continue;
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox"; input.value = h.name;
    input.checked = before.size ? before.has(h.name) : h.name === "pose";
    label.append(input, " " + h.name);
    box.append(label);
  }
}

function scoreHeads(extra) {
  const heads = new Set([...$("score-heads").querySelectorAll("input:checked")].map((i) => i.value));
  for (const h of extra || []) if (h) heads.add(h);
  const mapping = selectedMapping();  // keypoint targets start from the frame's own points
  if (mapping && mapping.condition === "CONDITION_KIND_KEYPOINTS") heads.add(keypointHead(mapping));
  return [...heads];
}

function conditionBoundaries(except) {
  return [...$("conditions").querySelectorAll("input:checked")].map((i) => i.value).filter((n) => n !== except);
}

function baseRequest(space, heads, keepKey) {
  const request = { generator: { name: $("generator").value }, score_heads: heads };
  if (state.current && state.current.space === space) request.latents = state.current.wire;
  else {
    const seed = $("seed").value.trim();
    request.seed = { seed: seed === "" ? "0" : seed, count: 1 };  // the service checks the number
    if (state.current) resetSliders(keepKey);  // another space: start again from the seed
  }
  return request;
}

function resetSliders(keepKey) {
  state.applied = {};
  for (const input of $("sliders").querySelectorAll("input[type=range]")) {
    if (keepKey && input.dataset.key === keepKey) continue;
    input.value = 0;
    input.nextElementSibling.textContent = "0.0";
  }
}

async function moveSlider(spec, input, row) {
  const target = Number(input.value);
  const from = state.applied[spec.key] || 0;
  const request = baseRequest(spec.space, scoreHeads(spec.heads), spec.key);
  const base = request.seed ? 0 : from;
  const delta = target - base;
  const framesText = $("frames").value.trim();
  request.num_frames = framesText === "" ? 10 : Number(framesText);
  if (spec.method === "interfacegan") {
    request.interfacegan = { boundary: spec.artifact, condition_boundaries: conditionBoundaries(spec.artifact), start_distance: 0, end_distance: delta };
  } else if (spec.method === "ganspace") {
    request.ganspace = { directions: spec.artifact, component: spec.index, start_distance: 0, end_distance: delta };
  } else if (spec.method === "dplase") {
    request.dplase = { directions: spec.artifact, direction_index: spec.index, start_stride: 0, end_stride: delta, density_preserving: true };
  } else if (spec.method === "wstar") {
    const held = [...$("conditions").querySelectorAll("input:checked")].map((i) => i.dataset.attribute).filter(Boolean)
      .map((k) => { const [head, output, label] = k.split("."); return { head, output, label: label || "" }; });
    request.wstar = { flow: spec.artifact, attribute: spec.attr, condition_attributes: held, start_distance: 0, end_distance: delta };
  }
  row.classList.add("busy");
  const result = await runEdit(request, spec.label);
  row.classList.remove("busy");
  if (result.received > 0) {
    const n = Math.max(result.expected, 1);
    const reached = result.complete ? target : base + delta * Math.max(result.received - 1, 0) / Math.max(n - 1, 1);
    state.applied[spec.key] = reached;
  }
  if (!result.complete) {  // the slider shows what was applied
    input.value = state.applied[spec.key] || 0;
    input.nextElementSibling.textContent = Number(input.value).toFixed(1);
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming an edit: frames go on screen as they arrive.

async function runEdit(request, what) {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  clearError();
  const t0 = performance.now();
  const timing = { what, started: t0, first_frame_ms: null, frames: 0 };
  window.latentedit.metrics.edits.push(timing);
  const result = { received: 0, expected: request.num_frames || 0, complete: false };
  resetStrip();
  setStatus("editing: " + what + " …");
  try {
    await events("/api/edit", request, (name, frame) => {
      if (name !== "frame") return;
      result.received++;
      timing.frames++;
      addFrame(frame, () => {
        if (timing.first_frame_ms === null) timing.first_frame_ms = performance.now() - t0;
      });
      if (frame.stop_reason !== "STOP_REASON_UNSPECIFIED") result.complete = true;
      setStatus("editing: " + what + " — frame " + (frame.index + 1) + (result.expected ? " of " + result.expected : ""));
    }, abort.signal);
    if (state.abort === abort) setStatus(what + ": " + result.received + " frame(s)");
    result.complete = true;
  } catch (err) {
    if (err.name === "AbortError") { setStatus("superseded"); return result; }
    showError(err);
  } finally {
    if (state.abort === abort) state.abort = null;
    timing.total_ms = performance.now() - t0;
  }
  return result;
}

function resetStrip() {
  state.frames = [];
  state.shown = -1;
  $("strip").replaceChildren();
  $("download-gif").disabled = true;
  $("download-latents").disabled = true;
}

function addFrame(frame, onScreen) {
  const item = {
    image: frame.images[0] || null, scores: firstOf(frame.scores), points: pointsOf(frame.points),
    latents: frame.latents, index: frame.index, stop: frame.stop_reason, metrics: frame.metrics || {},
  };
  state.frames.push(item);
  if (item.latents) state.current = { wire: item.latents.wire, space: item.latents.wire.space || "LATENT_SPACE_Z" };
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  thumb.dataset.index = String(state.frames.length - 1);
  thumb.dataset.scores = JSON.stringify(item.scores);
  if (item.image) {
    const img = document.createElement("img");
    img.src = item.image;
    img.alt = "frame " + item.index;
    thumb.append(img);
  }
  const caption = document.createElement("div");
  caption.textContent = "#" + item.index + (item.scores["pose.yaw"] !== undefined ? " yaw " + item.scores["pose.yaw"].toFixed(1) : "");
  thumb.append(caption);
  thumb.addEventListener("click", () => show(Number(thumb.dataset.index), true));
  $("strip").append(thumb);
  thumb.scrollIntoView({ block: "nearest", inline: "end" });
  show(state.frames.length - 1, false, onScreen);
  $("download-gif").disabled = !state.frames.some((f) => f.image);
  $("download-latents").disabled = !state.frames.some((f) => f.latents);
}

const firstOf = (scores) => Object.fromEntries(Object.entries(scores || {}).map(([k, v]) => [k, v[0]]));
const pointsOf = (points) => Object.fromEntries(Object.entries(points || {}).map(([k, v]) => [k, v[0]]));

function show(i, pick, onScreen) {
  const item = state.frames[i];
  if (!item) return;
  state.shown = i;
  for (const t of $("strip").children) t.classList.toggle("shown", Number(t.dataset.index) === i);
  const img = $("frame");
  if (item.image) {
    img.src = item.image;
    if (onScreen) img.decode().then(() => requestAnimationFrame(onScreen), () => onScreen());
  } else if (onScreen) onScreen();
  if (pick && item.latents) state.current = { wire: item.latents.wire, space: item.latents.wire.space || "LATENT_SPACE_Z" };
  const metrics = Object.entries(item.metrics).slice(0, 4).map(([k, v]) => k + " " + Number(v).toFixed(3)).join(", ");
  $("frame-info").textContent = "frame " + item.index + (item.stop && item.stop !== "STOP_REASON_UNSPECIFIED"
    ? " · " + item.stop.replace("STOP_REASON_", "").toLowerCase().replace("_", " ") : "") + (metrics ? " · " + metrics : "");
  const body = $("scores").tBodies[0];
  body.replaceChildren();
  for (const [k, v] of Object.entries(item.scores)) {
    const tr = body.insertRow();
    tr.dataset.attribute = k;
    tr.insertCell().textContent = k;
    const td = tr.insertCell();
    td.className = "value";
    td.textContent = typeof v === "number" ? v.toFixed(3) : v;
  }
  if (state.keypoints === null || !pick) drawKeypoints(item);
}

// ---------------------------------------------------------------------------------------------
// Keypoints: draggable targets over the image (SGF keypoint mappings).

function resolution() { return (state.model && state.model.resolution) || 64; }

function drawKeypoints(item) {
  const svg = $("overlay");
  svg.replaceChildren();
  const mapping = selectedMapping();
  if (!mapping || mapping.condition !== "CONDITION_KIND_KEYPOINTS") { state.keypoints = null; return; }
  const head = keypointHead(mapping);
  const source = item && item.points[head];
  if (!source) return;
  if (!state.keypoints || state.keypoints.head !== head || state.keypoints.target.length !== source.length) {
    state.keypoints = { head, source, target: source.map((p) => p.slice()) };
  } else state.keypoints.source = source;
  const scale = 320 / resolution();
  const ns = "http://www.w3.org/2000/svg";
  state.keypoints.source.forEach(([x, y]) => {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("class", "source"); c.setAttribute("cx", x * scale); c.setAttribute("cy", y * scale); c.setAttribute("r", 4);
    svg.append(c);
  });
  state.keypoints.target.forEach(([x, y], k) => {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", x * scale); c.setAttribute("cy", y * scale); c.setAttribute("r", 6);
    c.dataset.k = String(k);
    c.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      // Listened on the window, so the drag survives the circles being redrawn by a frame.
      const move = (m) => {
        const box = svg.getBoundingClientRect();
        const px = Math.min(Math.max(m.clientX - box.left, 0), 320), py = Math.min(Math.max(m.clientY - box.top, 0), 320);
        if (!state.keypoints) return;
        state.keypoints.target[k] = [px / scale, py / scale];
        const circle = svg.querySelector(`circle[data-k="${k}"]`);
        if (circle) { circle.setAttribute("cx", px); circle.setAttribute("cy", py); }
      };
      const up = (u) => {
        move(u);  // where the pointer is let go counts too (moves can be coalesced into fewer events)
        window.removeEventListener("pointermove", move);
        window.removeEventListener("pointerup", up);
      };
      window.addEventListener("pointermove", move);
      window.addEventListener("pointerup", up);
    });
    svg.append(c);
  });
}

// The shown frame's keypoints as draggable targets; a frame scored without the keypoint head is
// scored again by a one-frame, zero-length edit from its latents.
async function pointsFromCurrentFrame() {
  state.keypoints = null;
  const mapping = selectedMapping();
  const item = state.frames[state.shown];
  if (!mapping || mapping.condition !== "CONDITION_KIND_KEYPOINTS") return;
  if (item && item.points[keypointHead(mapping)]) { drawKeypoints(item); return; }
  const spec = sliderSpecs().find((s) => (s.method === "interfacegan" || s.method === "ganspace") && s.space === (mapping.space || "LATENT_SPACE_Z"));
  if (!spec) { showError(new ApiError("FAILED_PRECONDITION", "edit once with " + keypointHead(mapping) + " ticked under 'score with' to get points to drag")); return; }
  const request = baseRequest(spec.space, scoreHeads(spec.heads));
  request.num_frames = 1;
  if (spec.method === "interfacegan") request.interfacegan = { boundary: spec.artifact, start_distance: 0, end_distance: 0 };
  else request.ganspace = { directions: spec.artifact, component: spec.index, start_distance: 0, end_distance: 0 };
  await runEdit(request, "keypoints of the current frame");
}

const keypointHead = (mapping) => ((mapping.attributes || [])[0] || {}).head || "keypoints5";

// ---------------------------------------------------------------------------------------------
// SGF targets: attribute values, a caption, or keypoints.

function mappings() { return state.edits.filter((e) => e.method === "sgf"); }
function selectedMapping() { return mappings().find((m) => artifactName(m) === $("sgf-mapping").value) || null; }

function renderSGF() {
  const select = $("sgf-mapping");
  const before = select.value;
  select.replaceChildren(...mappings().map((m) => new Option(artifactName(m) + " (" + (m.condition || "").replace("CONDITION_KIND_", "").toLowerCase() + ")", artifactName(m))));
  if (!select.options.length) select.add(new Option("no mapping trained", ""));
  if ([...select.options].some((o) => o.value === before)) select.value = before;
  renderSGFTarget();
}

function renderSGFTarget() {
  const mapping = selectedMapping();
  const kind = mapping ? mapping.condition : "";
  $("sgf-caption-box").hidden = kind !== "CONDITION_KIND_CAPTION";
  $("sgf-keypoints-box").hidden = kind !== "CONDITION_KIND_KEYPOINTS";
  const box = $("sgf-attributes");
  box.replaceChildren();
  if (kind === "CONDITION_KIND_ATTRIBUTES") {
    const current = state.frames[state.shown] ? state.frames[state.shown].scores : {};
    for (const a of mapping.attributes || []) {
      const key = attrKey(a);
      const row = document.createElement("div");
      row.className = "attr";
      row.innerHTML = '<input type="checkbox"> <span></span> <input type="number" step="any">';
      row.children[0].dataset.attribute = key;
      row.children[1].textContent = key;
      row.children[2].value = current[key] !== undefined ? Number(current[key]).toFixed(2) : "0";
      row.children[2].addEventListener("input", () => { row.children[0].checked = true; });
      box.append(row);
    }
  }
  state.keypoints = null;
  drawKeypoints(state.frames[state.shown]);
}

function floatTensor(rows) {
  const flat = new Float32Array(rows.flat());
  const bytes = new Uint8Array(flat.buffer);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return { dtype: "DATA_TYPE_FP32", shape: [rows.length, rows[0].length], raw_data: btoa(binary) };
}

async function runSGF() {
  const mapping = selectedMapping();
  if (!mapping) { showError(new ApiError("FAILED_PRECONDITION", "no SGF mapping is trained for this generator: train one in the train panel")); return; }
  const name = artifactName(mapping);
  const sgf = { mapping: name, max_steps: Number($("sgf-steps").value), tolerance: Number($("sgf-tolerance").value) };
  const heads = (mapping.attributes || []).map((a) => a.head);
  if (mapping.condition === "CONDITION_KIND_CAPTION") {
    sgf.caption = { text: $("sgf-caption").value };
    heads.push("caption");
  } else if (mapping.condition === "CONDITION_KIND_KEYPOINTS") {
    if (!state.keypoints) { showError(new ApiError("FAILED_PRECONDITION", "no keypoints on the image yet: edit once, then drag the points")); return; }
    sgf.keypoints = { points: floatTensor(state.keypoints.target) };
    heads.push(keypointHead(mapping));
  } else {
    const values = [...$("sgf-attributes").querySelectorAll(".attr")].filter((r) => r.children[0].checked).map((r) => {
      const [head, output, label] = r.children[0].dataset.attribute.split(".");
      return { attribute: { head, output, label: label || "" }, value: Number(r.children[2].value) };
    });
    sgf.attributes = { values };
  }
  const request = baseRequest(mapping.space || "LATENT_SPACE_Z", scoreHeads(heads));
  request.sgf = sgf;
  await runEdit(request, "SGF " + name);
  resetSliders();  // the sliders measure from this new face
}

// ---------------------------------------------------------------------------------------------
// A preview of the seed's face (a zero-length edit along the first direction), and reset.

async function preview() {
  const specs = sliderSpecs().filter((s) => s.method === "interfacegan" || s.method === "ganspace");
  if (!specs.length) return;
  const spec = specs[0];
  state.current = null;
  const request = baseRequest(spec.space, scoreHeads(spec.heads));
  request.num_frames = 1;
  if (spec.method === "interfacegan") request.interfacegan = { boundary: spec.artifact, start_distance: 0, end_distance: 0 };
  else request.ganspace = { directions: spec.artifact, component: spec.index, start_distance: 0, end_distance: 0 };
  await runEdit(request, "seed " + $("seed").value);
}

async function reset() {
  state.current = null;
  resetSliders();
  resetStrip();
  await preview();
}

// ---------------------------------------------------------------------------------------------
// Inversion of an uploaded image.

function imageFile(file) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiError("INVALID_ARGUMENT", "the chosen file is not an image the browser can read"));
    img.src = URL.createObjectURL(file);
  });
}

async function runInvert() {
  const file = $("invert-file").files[0];
  if (!file) { showError(new ApiError("INVALID_ARGUMENT", "choose an image file to invert")); return; }
  let img;
  try { img = await imageFile(file); } catch (err) { showError(err); return; }
  const size = resolution();
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  canvas.getContext("2d").drawImage(img, 0, 0, size, size);  // the generator's size, as PNG
  const png = canvas.toDataURL("image/png").split(",", 2)[1];
  const steps = Number($("invert-steps").value);
  const space = $("invert-space").value || "LATENT_SPACE_Z";
  const request = { generator: { name: $("generator").value }, images: { encoding: "IMAGE_ENCODING_PNG", png: [png] },
    space, steps, report_every: Math.max(1, Math.round(steps / 25)) };
  clearError();
  $("invert-progress").value = 0;
  $("invert-state").textContent = "starting…";
  try {
    await events("/api/invert", request, (name, p) => {
      if (name !== "progress") return;
      $("invert-progress").value = p.total_steps ? p.step / p.total_steps : 0;
      $("invert-state").textContent = "step " + p.step + " of " + p.total_steps + (p.reconstruction_error.length ? ", error " + p.reconstruction_error[0].toFixed(4) : "");
      if (p.done && p.latents) {
        resetSliders();
        resetStrip();
        addFrame({ images: p.reconstructions, scores: {}, points: {}, latents: p.latents, index: 0, stop_reason: "STOP_REASON_COMPLETED", metrics: {} });
        state.current = { wire: p.latents.wire, space: p.latents.wire.space || space };
        $("invert-state").textContent += " — done: edits now start from this face";
      }
    });
  } catch (err) { showError(err); $("invert-state").textContent = "failed"; }
}

// ---------------------------------------------------------------------------------------------
// Training from the page: start a job, watch its progress and ETA, cancel it.

function attributeSelect(id, multiple) {
  const select = document.createElement("select");
  select.id = id;
  select.multiple = !!multiple;
  if (multiple) select.size = 5;
  for (const a of scalarAttributes()) select.add(new Option(attrKey(a), attrKey(a)));
  return select;
}

function field(label, input) {
  const l = document.createElement("label");
  l.append(label + " ", input);
  return l;
}

function numberInput(id, value, step) {
  const input = document.createElement("input");
  Object.assign(input, { id, type: "number", value: String(value), step: step || "any" });
  return input;
}

function renderTrainFields() {
  const box = $("train-fields");
  box.replaceChildren();
  const kind = $("train-kind").value;
  if (kind === "boundary") {
    const attr = attributeSelect("train-attribute");
    if ([...attr.options].some((o) => o.value === "pose.yaw")) attr.value = "pose.yaw";
    box.append(field("attribute", attr), field("samples", numberInput("train-samples", 2000, 100)), field("keep", numberInput("train-keep", 0.1)));
  } else if (kind === "mapping") {
    const condition = document.createElement("select");
    condition.id = "train-condition";
    for (const [v, t] of [["CONDITION_KIND_ATTRIBUTES", "attributes"], ["CONDITION_KIND_KEYPOINTS", "keypoints"], ["CONDITION_KIND_CAPTION", "caption"]]) condition.add(new Option(t, v));
    const attrs = attributeSelect("train-attributes", true);
    const kp = document.createElement("select");
    kp.id = "train-keypoints-head";
    for (const h of state.heads.filter((h) => h.kind === "HEAD_KIND_KEYPOINTS")) kp.add(new Option(h.name, h.name));
    box.append(field("condition", condition), field("attributes", attrs), field("keypoints head", kp),
      field("pairs", numberInput("train-pairs", 2000, 100)), field("steps", numberInput("train-steps", 1500, 100)));
  } else if (kind === "directions") {
    box.append(field("directions", numberInput("train-directions", 10, 1)), field("steps", numberInput("train-steps", 600, 50)),
      field("channel subspaces", numberInput("train-subspaces", 4, 1)));
  } else if (kind === "pca") {
    box.append(field("components", numberInput("train-components", 10, 1)), field("samples", numberInput("train-samples", 2000, 100)));
  } else if (kind === "flow") {
    box.append(field("attributes", attributeSelect("train-attributes", true)), field("samples", numberInput("train-samples", 2000, 100)));
  }
}

function attrFromKey(key) { const [head, output, label] = key.split("."); return { head, output, label: label || "" }; }
function selectedAttrs(id) { return [...$(id).selectedOptions].map((o) => attrFromKey(o.value)); }
const num = (id) => Number($(id).value);

function jobRequest() {
  const kind = $("train-kind").value, name = $("train-name").value.trim();
  const generator = { name: $("generator").value };
  const options = { artifact_name: name };
  const request = { idempotency_key: "web-" + name + "-" + Date.now(), display_name: "web: " + kind + " " + name };
  if (kind === "boundary") request.boundary = { generator, attribute: attrFromKey($("train-attribute").value), num_samples: num("train-samples"), keep_fraction: num("train-keep"), options };
  else if (kind === "mapping") {
    const condition = $("train-condition").value;
    options.steps = num("train-steps");
    request.mapping = { generator, condition, num_pairs: num("train-pairs"), options };
    if (condition === "CONDITION_KIND_ATTRIBUTES") request.mapping.attributes = selectedAttrs("train-attributes");
    if (condition === "CONDITION_KIND_KEYPOINTS") request.mapping.keypoints_head = $("train-keypoints-head").value;
  } else if (kind === "directions") {
    options.steps = num("train-steps");
    request.directions = { generator, num_directions: num("train-directions"), num_channel_subspaces: num("train-subspaces"), options };
  } else if (kind === "pca") request.pca = { generator, num_components: num("train-components"), num_samples: num("train-samples"), options };
  else if (kind === "flow") request.flow = { generator, attributes: selectedAttrs("train-attributes"), num_samples: num("train-samples"), options };
  return request;
}

function eta(seconds) {
  if (seconds === undefined || seconds < 0) return "";
  if (seconds < 60) return ", about " + Math.ceil(seconds) + " s left";
  return ", about " + Math.round(seconds / 60) + " min left";
}

async function startJob() {
  clearError();
  let job;
  try {
    job = await (await api("/api/jobs", jobRequest())).json();
  } catch (err) { showError(err); return; }
  state.job = job.id;
  $("train-cancel").disabled = false;
  $("train-start").disabled = true;
  $("train-progress").value = 0;
  $("train-state").textContent = "job " + job.id + " queued";
  let last = job;
  try {
    await events("/api/jobs/" + encodeURIComponent(job.id) + "/watch", undefined, (name, event) => {
      if (name !== "job") return;
      last = event.job;
      $("train-progress").value = last.progress || 0;
      const state_ = (last.state || "").replace("JOB_STATE_", "").toLowerCase();
      $("train-state").textContent = "job " + last.id + ": " + state_ + (last.phase ? " · " + last.phase : "")
        + " · " + Math.round((last.progress || 0) * 100) + "%" + eta(last.eta_seconds);
    });
  } catch (err) { showError(err); }
  $("train-cancel").disabled = true;
  $("train-start").disabled = false;
  state.job = null;
  const final = (last.state || "").replace("JOB_STATE_", "").toLowerCase();
  $("train-state").dataset.state = final;
  if (last.state === "JOB_STATE_FAILED") showError(new ApiError("JOB_FAILED", "job " + last.id + " failed: " + (last.error || "no reason given")));
  else if (last.state === "JOB_STATE_SUCCEEDED") {
    $("train-state").textContent = "job " + last.id + ": succeeded — " + artifactName({ artifact: last.artifact || { ref: { name: "?" } } }) + " is ready";
    await loadCatalog();
  } else if (last.state === "JOB_STATE_CANCELLED") $("train-state").textContent = "job " + last.id + ": cancelled";
}

async function cancelJob() {
  if (!state.job) return;
  try { await api("/api/jobs/" + encodeURIComponent(state.job) + "/cancel", {}); } catch (err) { showError(err); }
}

// ---------------------------------------------------------------------------------------------
// Downloads.

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function downloadGif() {
  const frames = state.frames.map((f) => f.image).filter(Boolean);
  try {
    const response = await api("/api/gif", { frames, duration_ms: 150 });
    download(await response.blob(), "latentedit-edit.gif");
  } catch (err) { showError(err); }
}

function downloadLatents() {
  const frames = state.frames.filter((f) => f.latents);
  const first = frames[0].latents;
  const payload = { generator: $("generator").value, seed: $("seed").value, space: first.space, shape: first.shape,
    frames: frames.map((f) => ({ index: f.index, scores: f.scores, values: f.latents.values })) };
  download(new Blob([JSON.stringify(payload)], { type: "application/json" }), "latentedit-latents.json");
}

// ---------------------------------------------------------------------------------------------

function bindControls() {
  $("error-close").addEventListener("click", clearError);
  $("token-save").addEventListener("click", async () => {
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);  // this tab only; never localStorage or a cookie
    $("token").value = "";
    $("token-state").textContent = "token kept for this tab";
    clearError();
    await loadCatalog();
  });
  $("generator").addEventListener("change", async () => { state.current = null; state.applied = {}; resetStrip(); await loadCatalog(); });
  $("seed").addEventListener("change", reset);
  $("reset").addEventListener("click", reset);
  $("sgf-mapping").addEventListener("change", () => { renderSGFTarget(); pointsFromCurrentFrame(); });
  $("sgf-run").addEventListener("click", runSGF);
  $("sgf-keypoints-reset").addEventListener("click", pointsFromCurrentFrame);
  $("invert-run").addEventListener("click", runInvert);
  $("train-kind").addEventListener("change", renderTrainFields);
  $("train-start").addEventListener("click", startJob);
  $("train-cancel").addEventListener("click", cancelJob);
  $("download-gif").addEventListener("click", downloadGif);
  $("download-latents").addEventListener("click", downloadLatents);
}

start();
