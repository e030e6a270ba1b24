// The vqtok demo page: plain browser JavaScript, no build step, nothing fetched but this server's API.
// Every number shown comes from the API's answer; the page only lays it out.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: sessionStorage.getItem("vqtok-key") || "",
  retry: null, // the action that last got a 401, re-run once a key is given
  model: null, // the selected bundle's ref (name@version, from GET /v1/models): every API call names it
  info: {}, // ref -> GET /v1/model?model=ref (levels: [{name, stride, codebook_size}], ...)
  file: null, // the image last chosen or dropped, encoded again when the fit or the model changes
  levels: [], // the levels of the codes shown now
  grids: {}, // level name -> 2-D array of codes of the current image
  shown: { encode: 0, sample: 0 }, // the latest request of each panel: an older answer is not drawn
  selected: null, // {level, code}: the highlighted code
  codesUrl: null,
};

// --- the API --------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// ``path`` for the selected model (``ref``: a ref captured when the action began).
function forModel(path, ref = state.model) {
  if (!ref) return path;
  return `${path}${path.includes("?") ? "&" : "?"}model=${encodeURIComponent(ref)}`;
}

async function api(path, init = {}, action = null) {
  const headers = new Headers(init.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (e) {
    throw new ApiError(0, "network_error", `the server did not answer (${e.message})`);
  }
  if (response.ok) return response.json();
  let code = "http_error";
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch (e) {
    // not JSON (a proxy's page, say): keep the status line
  }
  if (response.status === 401) askForKey(action);
  throw new ApiError(response.status, code, message);
}

function showError(e) {
  const box = $("error");
  if (e instanceof ApiError) {
    box.textContent = `${e.status ? e.status + " " : ""}${e.code}: ${e.message}`;
    box.dataset.status = String(e.status);
    box.dataset.code = e.code;
  } else {
    box.textContent = String(e);
    box.dataset.status = "";
    box.dataset.code = "";
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function askForKey(action) {
  state.retry = action;
  $("key-form").hidden = false;
  $("api-key").focus();
}

// What an action returns when a newer one of its panel has started: the page keeps what it shows.
const STALE = Symbol("stale");

// Runs one user action: its status line says "working…", then what the action returns.
async function run(action, status) {
  clearError();
  status.textContent = "working…";
  try {
    const result = await action();
    if (result !== STALE) status.textContent = result || "";
  } catch (e) {
    status.textContent = "";
    showError(e);
    // The selected version is gone (unloaded, or replaced by a newer one): list what is loaded now.
    if (e instanceof ApiError && e.code === "model_not_found" && action !== loadModels) {
      loadModels().catch(() => {});
    }
  }
}

// --- the model ------------------------------------------------------------------------------------
// The version a plain request gets: the default name's newest ready version (as the server picks it).
function defaultRef(list) {
  const named = list.models.filter((m) => m.name === list.default);
  const ready = named.filter((m) => m.ready);
  const pick = (ready.length ? ready : named).at(-1);
  return pick ? pick.ref : null;
}

// Fills the model selector from GET /v1/models: the selection stays if that version is still loaded,
// else the default; then shows the selected model's details.
async function loadModels() {
  const list = await api("v1/models", {}, loadModels);
  const select = $("model-select");
  select.replaceChildren();
  for (const m of list.models) {
    const option = document.createElement("option");
    option.value = m.ref;
    option.textContent = `${m.ref}${m.name === list.default ? " (default)" : ""}${m.ready ? "" : " (warming up)"}`;
    Object.assign(option.dataset, { name: m.name, version: m.version });
    select.append(option);
  }
  const refs = list.models.map((m) => m.ref);
  state.model = refs.includes(state.model) ? state.model : defaultRef(list);
  select.value = state.model || "";
  select.disabled = refs.length < 2; // one bundle: nothing to choose, but it still says which
  await loadModel();
}

async function modelInfo(ref, action) {
  if (!state.info[ref]) state.info[ref] = await api(forModel("v1/model", ref), {}, action);
  return state.info[ref];
}

async function loadModel() {
  const ref = state.model;
  const info = await modelInfo(ref, loadModels);
  if (ref !== state.model) return; // another model was selected meanwhile
  const levels = info.levels.map((l) => `${l.name}: stride ${l.stride}, K = ${l.codebook_size}`).join("; ");
  $("model-info").textContent = `model ${info.name}@${info.version}, ${info.image_size}×${info.image_size} `
    + `(${levels}), ${info.device}`;
  $("model-info").dataset.version = info.version;
}

function showVersion(element, version, text = version) {
  element.textContent = text;
  element.dataset.version = version;
}

// --- encode panel ---------------------------------------------------------------------------------
function fmtBits(bits) {
  return bits === null || bits === undefined ? "n/a (no priors)" : `${Math.round(bits).toLocaleString("en")} bits`;
}

async function encodeFile(file) {
  const fit = $("fit").value;
  const ref = state.model;
  const seq = ++state.shown.encode;
  state.file = file;
  const form = () => {
    const f = new FormData();
    f.append("images", file, file.name || "image");
    return f;
  };
  const again = () => encodeFile(file);
  let enc, rec, info;
  try {
    [enc, rec, info] = await Promise.all([
      api(forModel(`v1/encode?fit=${fit}&bits=true`, ref), { method: "POST", body: form() }, again),
      api(forModel(`v1/reconstruct?fit=${fit}&include_input=true`, ref), { method: "POST", body: form() }, again),
      modelInfo(ref, again),
    ]);
  } catch (e) {
    if (seq !== state.shown.encode) return STALE;
    throw e;
  }
  if (seq !== state.shown.encode) return STALE; // a newer encode (another file, fit or model) has started
  const item = enc.items[0];
  const r = rec.items[0];
  $("input-image").src = `data:image/png;base64,${r.input}`;
  $("recon-image").src = `data:image/png;base64,${r.image}`;
  for (const img of [$("input-image"), $("recon-image")]) img.style.width = `${Math.max(256, r.width)}px`;
  const psnr = $("psnr");
  psnr.dataset.value = r.psnr === null ? "inf" : String(r.psnr);
  psnr.textContent = r.psnr === null ? "∞ (identical)" : `${r.psnr.toFixed(2)} dB`;
  $("size").textContent = `${r.width}×${r.height}`;
  showVersion($("recon-version"), rec.version, `${rec.model}@${rec.version}`);
  showVersion($("codes-version"), item.version, `version ${item.version}`); // the codes' own tag
  $("bits-uniform").textContent = fmtBits(item.bits.uniform);
  $("bits-prior").textContent = fmtBits(item.bits.prior);
  $("bits-uniform").dataset.value = String(item.bits.uniform);
  $("bits-prior").dataset.value = String(item.bits.prior);
  const rows = $("bits-levels");
  rows.replaceChildren();
  for (const [name, b] of Object.entries(item.bits.levels)) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<th></th><td></td>";
    tr.firstChild.textContent = `  ${name}`;
    tr.lastChild.textContent = `${fmtBits(b.prior)} of ${fmtBits(b.uniform)}`;
    rows.append(tr);
  }
  state.levels = info.levels;
  state.grids = {};
  for (const level of state.levels) state.grids[level.name] = item[level.name];
  state.selected = null;
  $("selection").textContent = "";
  drawHeatmaps();
  $("encode-result").hidden = false;
}

// Viridis at 9 stops, interpolated: code ids are categories, but neighbouring colours for
// neighbouring ids still make repeated codes and regions easy to see.
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];

function colour(code, k) {
  const t = (code / Math.max(1, k - 1)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t));
  const f = t - i;
  return VIRIDIS[i].map((c, j) => Math.round(c + f * (VIRIDIS[i + 1][j] - c)));
}

function cellSize(grid) {
  return Math.max(4, Math.floor(256 / Math.max(grid.length, grid[0].length)));
}

function drawHeatmaps() {
  const box = $("heatmaps");
  box.replaceChildren();
  for (const level of state.levels) {
    const grid = state.grids[level.name];
    const cell = cellSize(grid);
    const fig = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.className = "heatmap";
    canvas.dataset.level = level.name;
    canvas.dataset.cell = String(cell);
    canvas.width = grid[0].length * cell;
    canvas.height = grid.length * cell;
    canvas.addEventListener("mousemove", (ev) => hover(ev, level, canvas));
    canvas.addEventListener("mouseleave", () => { $("cell-info").innerHTML = "&nbsp;"; });
    canvas.addEventListener("click", (ev) => select(ev, level, canvas));
    const caption = document.createElement("figcaption");
    caption.textContent = `${level.name}: ${grid.length}×${grid[0].length} codes, K = ${level.codebook_size}`;
    fig.append(canvas, caption);
    box.append(fig);
    paint(canvas, level);
  }
}

function paint(canvas, level) {
  const grid = state.grids[level.name];
  const cell = Number(canvas.dataset.cell);
  const ctx = canvas.getContext("2d");
  const sel = state.selected && state.selected.level === level.name ? state.selected.code : null;
  let count = 0;
  for (let y = 0; y < grid.length; y++) {
    for (let x = 0; x < grid[y].length; x++) {
      const code = grid[y][x];
      let [r, g, b] = colour(code, level.codebook_size);
      if (sel !== null && code !== sel) [r, g, b] = [r, g, b].map((c) => Math.round(c * 0.25 + 20));
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x * cell, y * cell, cell, cell);
      if (sel !== null && code === sel) {
        count++;
        ctx.strokeStyle = "#ff3b30";
        ctx.lineWidth = Math.max(1, Math.floor(cell / 5));
        ctx.strokeRect(x * cell + ctx.lineWidth / 2, y * cell + ctx.lineWidth / 2,
          cell - ctx.lineWidth, cell - ctx.lineWidth);
      }
    }
  }
  canvas.dataset.highlighted = String(count);
}

function cellAt(ev, canvas) {
  // offsetX/Y are inside the border; clientWidth/width is any CSS scaling of the canvas.
  const cell = Number(canvas.dataset.cell) * (canvas.clientWidth / canvas.width);
  return [Math.floor(ev.offsetY / cell), Math.floor(ev.offsetX / cell)];
}

function hover(ev, level, canvas) {
  const [row, col] = cellAt(ev, canvas);
  const grid = state.grids[level.name];
  if (row < 0 || row >= grid.length || col < 0 || col >= grid[0].length) return;
  const info = $("cell-info");
  info.textContent = `${level.name} · row ${row}, col ${col} · code ${grid[row][col]}`;
  Object.assign(info.dataset, { level: level.name, row: String(row), col: String(col), code: String(grid[row][col]) });
}

function select(ev, level, canvas) {
  const [row, col] = cellAt(ev, canvas);
  const grid = state.grids[level.name];
  if (row < 0 || row >= grid.length || col < 0 || col >= grid[0].length) return;
  const code = grid[row][col];
  const same = state.selected && state.selected.level === level.name && state.selected.code === code;
  state.selected = same ? null : { level: level.name, code };
  for (const c of document.querySelectorAll("canvas.heatmap")) {
    paint(c, state.levels.find((l) => l.name === c.dataset.level));
  }
  const n = Number(canvas.dataset.highlighted);
  const cells = grid.length * grid[0].length;
  $("selection").textContent = same ? "" : `${level.name} code ${code}: ${n} of ${cells} cells (click again to clear)`;
}

// --- sample panel ---------------------------------------------------------------------------------
function numberOrNull(input) {
  return input.value.trim() === "" ? null : Number(input.value);
}

async function sample() {
  // Values go to the API as typed: its 422 names whatever is out of range.
  const body = {
    n: numberOrNull($("sample-n")),
    temperature: numberOrNull($("sample-temperature")),
    top_k: numberOrNull($("sample-top-k")),
    seed: numberOrNull($("sample-seed")),
    return_codes: true,
  };
  for (const key of ["n", "temperature"]) if (body[key] === null) delete body[key];
  const seq = ++state.shown.sample;
  let answer;
  try {
    answer = await api(forModel("v1/sample"), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    }, sample);
  } catch (e) {
    if (seq !== state.shown.sample) return STALE;
    throw e;
  }
  if (seq !== state.shown.sample) return STALE; // the model changed, or a newer sample was asked for
  const box = $("samples");
  box.replaceChildren();
  answer.images.forEach((png, i) => {
    const img = document.createElement("img");
    img.className = "sample";
    img.alt = `sample ${i}`;
    img.src = `data:image/png;base64,${png}`;
    box.append(img);
  });
  if (state.codesUrl) URL.revokeObjectURL(state.codesUrl);
  // The codes carry their version each (decode refuses them on another bundle); the file says it once more.
  const blob = new Blob([JSON.stringify({ model: answer.model, version: answer.version, seed: answer.seed,
    temperature: body.temperature ?? 1.0, top_k: body.top_k, codes: answer.codes })], { type: "application/json" });
  state.codesUrl = URL.createObjectURL(blob);
  const link = $("download-codes");
  link.href = state.codesUrl;
  link.download = `vqtok-samples-seed-${answer.seed}.json`;
  link.hidden = false;
  const versions = [...new Set(answer.codes.map((c) => c.version))];
  showVersion($("sample-version"), versions.join(", "));
  $("sample-result").hidden = false;
  return `seed ${answer.seed}`;
}

function clearSamples() {
  state.shown.sample++; // an answer still on its way belongs to the previous model
  $("samples").replaceChildren();
  $("sample-status").textContent = "";
  $("sample-result").hidden = true;
  $("download-codes").hidden = true;
}

// --- wiring ---------------------------------------------------------------------------------------
function wire() {
  const input = $("file-input");
  const encodeAgain = () => {
    if (state.file) run(() => encodeFile(state.file), $("encode-status"));
  };
  input.addEventListener("change", () => {
    if (input.files.length) run(() => encodeFile(input.files[0]), $("encode-status"));
  });
  $("fit").addEventListener("change", encodeAgain);
  $("model-select").addEventListener("change", () => {
    state.model = $("model-select").value;
    clearSamples();
    if (!state.file) {
      run(loadModel, $("encode-status"));
      return;
    }
    $("encode-result").hidden = true; // the codes shown were the previous model's
    run(async () => {
      await loadModel();
      return encodeFile(state.file);
    }, $("encode-status"));
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    if (ev.dataTransfer.files.length) run(() => encodeFile(ev.dataTransfer.files[0]), $("encode-status"));
  });
  $("sample-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    run(sample, $("sample-status"));
  });
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem("vqtok-key", state.key);
    $("key-form").hidden = true;
    const retry = state.retry || loadModels;
    state.retry = null;
    run(retry, $("encode-status"));
  });
  run(loadModels, $("encode-status"));
}

wire();
