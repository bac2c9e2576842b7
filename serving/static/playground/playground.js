// DynamicID playground. Plain browser JavaScript, no build step, no network asset: everything goes to
// the server that served this page. Photos are checked with POST /playground/faces (the server's own
// face check); images are generated with the same v1 (:predict) or v2 (/infer) API any client uses,
// and every error is shown as the server wrote it.
"use strict";

const MAX_PEOPLE = 4;
const COLORS = ["#2f5bd3", "#d3502f", "#2f9e55", "#9b3fc4"];
const MIN_BOX = 0.03;  // a drag smaller than this (fraction of a side) is a click, not a box
const MAX_AUTO_IDS = 4;  // the server's auto layout handles 2..4 people (model/saa/auto_layout.py)

const state = { model: "dynamicid", people: [], active: 0, drag: null, lastSeed: null };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ talking to the server
class ServerError extends Error {
  // An error answer: the server's {"error", "reason", "field"} body, or what the transport said.
  constructor(status, body, fallback) {
    super(body && typeof body.error === "string" ? body.error : fallback);
    this.status = status;
    this.reason = body && body.reason ? body.reason : null;
  }
}

async function postJson(url, body) {
  let res;
  try {
    res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" },
                             body: JSON.stringify(body) });
  } catch (err) {
    throw new ServerError(0, null, `no answer from the server (${err.message})`);
  }
  let data = null;
  try { data = await res.json(); } catch (_) { data = null; }
  if (!res.ok) throw new ServerError(res.status, data, `HTTP ${res.status} ${res.statusText}`);
  return data;
}

function readBase64(file) {
  // A File -> its bytes as plain base64 (the data: URL prefix dropped: the browser may not know the type).
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function checkFace(b64, role) {
  return postJson("/playground/faces", { image: b64, role });
}

function showError(el, err, prefix) {
  // Writes the server's message verbatim, with its status and reason as a small code in front.
  el.replaceChildren();
  if (err) {
    const code = document.createElement("span");
    code.className = "code";
    code.textContent = err.status ? `HTTP ${err.status}${err.reason ? " " + err.reason : ""}` : "error";
    const msg = document.createElement("span");
    msg.className = "message";
    msg.textContent = (prefix ? prefix + ": " : "") + (err.message || String(err));
    el.append(code, " ", msg);
  }
  el.hidden = !err;
}

async function watchReadiness() {
  const status = $("status");
  try {
    const models = await (await fetch("/v1/models")).json();
    if (models && Array.isArray(models.models) && models.models.length) state.model = models.models[0];
  } catch (_) { /* keep the default name */ }
  for (;;) {
    let ready = false, reachable = true;
    try { ready = (await fetch("/v2/health/ready")).ok; } catch (_) { reachable = false; }
    status.textContent = ready ? `${state.model}: ready` : reachable ? `${state.model}: loading…` : "server unreachable";
    status.className = "status " + (ready ? "ready" : reachable ? "loading" : "down");
    await new Promise((r) => setTimeout(r, ready ? 15000 : 2000));
  }
}

// ------------------------------------------------------------------ people
async function addPhotos(files) {
  const errorEl = $("upload-error"), busy = $("upload-busy");
  const problems = [];  // [{file, err}]: each refused photo, with the server's answer
  busy.hidden = false;
  for (const file of files) {
    if (state.people.length >= MAX_PEOPLE) {
      problems.push({ file: file.name, err: new ServerError(0, null, `at most ${MAX_PEOPLE} people`) });
      continue;
    }
    try {
      const b64 = await readBase64(file);
      const face = await checkFace(b64, "reference");
      const [fx0, fy0, fx1, fy1] = face.face.box;
      state.people.push({ name: file.name, image: b64, thumb: face.thumbnail,
                          faceText: `face ${Math.round(fx1 - fx0)}×${Math.round(fy1 - fy0)} px of `
                                    + `${face.image_size[0]}×${face.image_size[1]}`,
                          expression: "", idScale: "", driving: null, box: null });
    } catch (err) {
      problems.push({ file: file.name, err });
    }
  }
  busy.hidden = true;
  showError(errorEl, problems.length ? problems[0].err : null, problems.length ? `${problems[0].file} refused` : "");
  for (const { file, err } of problems.slice(1)) {
    const more = document.createElement("div");
    more.className = "message";
    more.textContent = `${file} refused: ${err.message || err}`;
    errorEl.append(more);
  }
  if (state.active >= state.people.length) state.active = Math.max(0, state.people.length - 1);
  renderPeople();
  drawLayout();
}

function renderPeople() {
  const list = $("people"), template = $("person-template");
  list.replaceChildren();
  state.people.forEach((p, i) => {
    const li = template.content.firstElementChild.cloneNode(true);
    li.dataset.person = String(i + 1);
    li.classList.toggle("active", i === state.active);
    li.querySelector(".swatch").style.background = COLORS[i % COLORS.length];
    li.querySelector(".face").src = "data:image/png;base64," + p.thumb;
    li.querySelector(".name").textContent = `${i + 1}. ${p.name}`;
    li.querySelector(".face-text").textContent = p.faceText;
    li.querySelector(".box-text").textContent = p.box ? `box ${fmtBox(p.box)}` : "default position";
    const expr = li.querySelector(".expression");
    expr.value = p.expression;
    expr.addEventListener("input", () => { p.expression = expr.value; });
    const scale = li.querySelector(".id-scale");  // this person's id_scale; empty: the image's id_scale
    scale.value = p.idScale;
    scale.addEventListener("input", () => { p.idScale = scale.value; });
    li.querySelector(".remove").addEventListener("click", () => {
      state.people.splice(i, 1);
      state.active = Math.min(state.active, Math.max(0, state.people.length - 1));
      renderPeople();
      drawLayout();
    });
    li.querySelector(".place").addEventListener("click", () => { state.active = i; renderPeople(); drawLayout(); });
    li.querySelector(".clear-box").addEventListener("click", () => { p.box = null; renderPeople(); drawLayout(); });
    const dImg = li.querySelector(".driving-face"), dClear = li.querySelector(".driving-clear");
    const dErr = li.querySelector(".driving-error"), dInput = li.querySelector(".driving");
    if (p.driving) { dImg.src = "data:image/png;base64," + p.driving.thumb; dImg.hidden = false; dClear.hidden = false; }
    dClear.addEventListener("click", () => { p.driving = null; renderPeople(); });
    dInput.addEventListener("change", async () => {
      const file = dInput.files[0];
      if (!file) return;
      try {
        const b64 = await readBase64(file);
        const face = await checkFace(b64, "driving");
        p.driving = { image: b64, thumb: face.thumbnail };
        renderPeople();
      } catch (err) {
        showError(dErr, err, `${file.name} refused`);
      }
    });
    list.append(li);
  });
}

// ------------------------------------------------------------------ layout canvas
function outputSize() {
  // The requested size, or a square while the model's default is used.
  const h = parseInt($("height").value, 10), w = parseInt($("width").value, 10);
  return { h: h > 0 ? h : null, w: w > 0 ? w : null };
}

function resizeCanvas() {
  const c = $("canvas"), { h, w } = outputSize();
  const ratio = h && w ? h / w : 1;
  c.width = 360;
  c.height = Math.round(360 * Math.min(Math.max(ratio, 0.25), 4));
  drawLayout();
}

function defaultStrips(n) {
  return Array.from({ length: n }, (_, i) => [0, i / n, 1, (i + 1) / n]);
}

function drawBox(ctx, box, color, label, dashed) {
  const c = ctx.canvas, [y0, x0, y1, x1] = box;
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = 3;
  ctx.setLineDash(dashed ? [8, 6] : []);
  ctx.fillStyle = color + "22";
  ctx.fillRect(x0 * c.width, y0 * c.height, (x1 - x0) * c.width, (y1 - y0) * c.height);
  ctx.strokeRect(x0 * c.width + 1.5, y0 * c.height + 1.5, (x1 - x0) * c.width - 3, (y1 - y0) * c.height - 3);
  ctx.fillStyle = color;
  ctx.font = "bold 16px sans-serif";
  ctx.fillText(label, x0 * c.width + 8, y0 * c.height + 22);
  ctx.restore();
}

function layoutWithoutBoxes() {
  // What the server does when no box is placed: the asked layout, or its default (auto for 2..4 people).
  const asked = $("layout").value, n = state.people.length;
  if (asked === "auto") return n >= 2 ? "auto" : "strips";
  return asked || (n >= 2 && n <= MAX_AUTO_IDS ? "auto" : "strips");
}

function drawLayout() {
  const c = $("canvas"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  const n = state.people.length, anyBox = state.people.some((p) => p.box);
  $("layout").disabled = anyBox;
  $("layout-state").textContent = !n ? "" : anyBox
    ? "layout: the boxes (people without one get an equal vertical strip)"
    : `layout: ${layoutWithoutBoxes()}${$("layout").value ? "" : " (the server's default)"}`;
  if (!n) {
    ctx.fillStyle = "#8a90a0";
    ctx.font = "14px sans-serif";
    ctx.fillText("add a reference photo first", 16, c.height / 2);
    return;
  }
  const auto = !anyBox && layoutWithoutBoxes() === "auto";
  const strips = defaultStrips(n);
  const moving = state.drag && state.drag.move && state.drag.box ? state.active : -1;
  state.people.forEach((p, i) => {
    const color = COLORS[i % COLORS.length];
    if (i === moving) drawBox(ctx, state.drag.box, color, String(i + 1), false);
    else if (p.box) drawBox(ctx, p.box, color, String(i + 1), false);
    else if (!auto) drawBox(ctx, strips[i], color, `${i + 1}${anyBox ? "" : " (strip)"}`, true);
  });
  if (auto) {
    ctx.fillStyle = "#5e6678";
    ctx.font = "14px sans-serif";
    ctx.fillText(`auto: the model places ${n} people`, 16, c.height / 2);
  }
  if (state.drag && state.drag.box && moving < 0) {
    drawBox(ctx, state.drag.box, COLORS[state.active % COLORS.length], "", false);
  }
}

function canvasPoint(ev) {
  const r = $("canvas").getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, v));
  return { x: clamp((ev.clientX - r.left) / r.width), y: clamp((ev.clientY - r.top) / r.height) };
}

function dragBox(a, b) {
  const r = (v) => Math.round(v * 1000) / 1000;
  return [r(Math.min(a.y, b.y)), r(Math.min(a.x, b.x)), r(Math.max(a.y, b.y)), r(Math.max(a.x, b.x))];
}

function boxAt(pt) {
  // The person whose box holds the point (the last drawn on top), or -1.
  for (let i = state.people.length - 1; i >= 0; i--) {
    const b = state.people[i].box;
    if (b && pt.y >= b[0] && pt.y <= b[2] && pt.x >= b[1] && pt.x <= b[3]) return i;
  }
  return -1;
}

function movedBox(box, dx, dy) {
  // ``box`` shifted by (dx, dy), kept whole inside the canvas.
  const [y0, x0, y1, x1] = box, r = (v) => Math.round(v * 1000) / 1000;
  const mx = Math.min(Math.max(dx, -x0), 1 - x1), my = Math.min(Math.max(dy, -y0), 1 - y1);
  return [r(y0 + my), r(x0 + mx), r(y1 + my), r(x1 + mx)];
}

function setupCanvas() {
  // Dragging inside a box moves it (and selects its person); dragging anywhere else draws the
  // selected person's box, then selects the next person without one.
  const c = $("canvas");
  c.addEventListener("pointerdown", (ev) => {
    if (!state.people.length) return;
    c.setPointerCapture(ev.pointerId);
    const start = canvasPoint(ev), hit = boxAt(start);
    if (hit >= 0) {
      state.active = hit;
      renderPeople();
      state.drag = { start, move: state.people[hit].box, box: null };
    } else {
      state.drag = { start, box: null };
    }
  });
  const dragged = (ev) => {
    const d = state.drag, pt = canvasPoint(ev);
    return d.move ? movedBox(d.move, pt.x - d.start.x, pt.y - d.start.y) : dragBox(d.start, pt);
  };
  c.addEventListener("pointermove", (ev) => {
    if (!state.drag) return;
    state.drag.box = dragged(ev);
    drawLayout();
  });
  const finish = (ev) => {
    if (!state.drag) return;
    const box = dragged(ev), moving = Boolean(state.drag.move);
    state.drag = null;
    const person = state.people[state.active];
    if (person && moving) {
      person.box = box;
      renderPeople();
    } else if (person && box[2] - box[0] >= MIN_BOX && box[3] - box[1] >= MIN_BOX) {
      person.box = box;
      const next = state.people.findIndex((p, i) => i > state.active && !p.box);
      if (next >= 0) state.active = next;
      renderPeople();
    }
    drawLayout();
  };
  c.addEventListener("pointerup", finish);
  c.addEventListener("pointercancel", () => { state.drag = null; drawLayout(); });
  $("clear-boxes").addEventListener("click", () => {
    state.people.forEach((p) => { p.box = null; });
    renderPeople();
    drawLayout();
  });
}

// ------------------------------------------------------------------ generation
function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function buildInstance() {
  // One v1 instance; fields left empty are left out, so the server's defaults apply.
  const inst = { prompt: $("prompt").value, identities: [] };
  const neg = $("negative").value;
  if (neg) inst.negative_prompt = neg;
  const fields = { num_inference_steps: "steps", guidance_scale: "guidance", seed: "seed", id_scale: "id-scale",
                   height: "height", width: "width" };
  for (const [key, id] of Object.entries(fields)) {
    const v = numberField(id);
    if (v !== undefined) inst[key] = v;
  }
  if (!state.people.some((p) => p.box)) {  // a layout places the people itself: never together with boxes
    if ($("layout").value) inst.layout = $("layout").value;
    if ($("layout-maps").checked) inst.layout_maps = true;
  }
  for (const p of state.people) {
    const ident = { image: p.image };
    if (p.box) ident.bbox = p.box;
    if (p.expression.trim()) ident.expression = p.expression.trim();
    if (p.idScale.trim() !== "") ident.id_scale = Number(p.idScale.trim());
    if (p.driving) ident.driving_image = p.driving.image;
    inst.identities.push(ident);
  }
  return inst;
}

async function predictV1(inst) {
  const out = await postJson(`/v1/models/${encodeURIComponent(state.model)}:predict`, { instances: [inst] });
  return out.predictions[0];
}

async function predictV2(inst) {
  // The same instance as v2 tensors: prompt, id_images, driving_images, and every other field in parameters.
  const tensor = (name, data) => ({ name, datatype: "BYTES", shape: [data.length], data });
  const ids = inst.identities;
  const inputs = [tensor("prompt", [inst.prompt]), tensor("id_images", ids.map((i) => i.image))];
  if (ids.some((i) => i.driving_image)) inputs.push(tensor("driving_images", ids.map((i) => i.driving_image || "")));
  const params = { ...inst };
  delete params.prompt;
  params.identities = ids.map(({ image, driving_image, ...rest }) => rest);  // eslint-disable-line no-unused-vars
  inputs.push(tensor("parameters", [JSON.stringify(params)]));
  const out = await postJson(`/v2/models/${encodeURIComponent(state.model)}/infer`, { inputs });
  const byName = Object.fromEntries(out.outputs.map((o) => [o.name, o.data[0]]));
  return { image: byName.image, ...JSON.parse(byName.metadata) };
}

function fmtBox(b) {
  return "[" + b.map((v) => Number(v).toFixed(3)).join(", ") + "]";
}

function showResult(pred, seconds) {
  const img = $("result-image");
  $("result-empty").hidden = true;
  $("result-body").hidden = false;
  $("result-seed").textContent = String(pred.seed);
  state.lastSeed = pred.seed;
  $("result-time").textContent = `${seconds.toFixed(1)} s`;
  const list = $("result-layout");
  list.replaceChildren();
  (pred.identities || []).forEach((ident, i) => {
    const li = document.createElement("li");
    li.textContent = `${fmtBox(ident.region)}${ident.edited ? " edited" : ""}`;
    li.style.color = COLORS[i % COLORS.length];
    list.append(li);
  });
  $("result-layout-kind").textContent = pred.layout ? String(pred.layout) : "";
  const maps = $("result-maps");
  $("result-maps-figure").hidden = !pred.layout_maps;
  if (pred.layout_maps) maps.src = "data:image/png;base64," + pred.layout_maps;
  else maps.removeAttribute("src");
  img.onload = () => {
    $("result-size").textContent = `${img.naturalWidth} × ${img.naturalHeight} px`;
    const ov = $("result-overlay"), ctx = ov.getContext("2d");
    ov.width = img.clientWidth;
    ov.height = img.clientHeight;
    (pred.identities || []).forEach((ident, i) => drawBox(ctx, ident.region, COLORS[i % COLORS.length],
                                                          String(i + 1), true));
    $("result-section").dataset.done = "1";
  };
  img.src = "data:image/png;base64," + pred.image;
}

async function generate() {
  const btn = $("generate"), progress = $("progress"), elapsed = $("elapsed"), errorEl = $("error");
  showError(errorEl, null);
  if (!state.people.length) {
    showError(errorEl, new ServerError(0, null, "add at least one reference photo"));
    return;
  }
  delete $("result-section").dataset.done;
  const inst = buildInstance();
  const protocol = $("protocol").value;
  const t0 = performance.now();
  const seconds = () => (performance.now() - t0) / 1000;
  btn.disabled = true;
  progress.hidden = false;
  elapsed.textContent = "generating… 0.0 s";
  const timer = setInterval(() => { elapsed.textContent = `generating… ${seconds().toFixed(1)} s`; }, 100);
  try {
    const pred = protocol === "v2" ? await predictV2(inst) : await predictV1(inst);
    elapsed.textContent = `done in ${seconds().toFixed(1)} s`;
    showResult(pred, seconds());
  } catch (err) {
    elapsed.textContent = `failed after ${seconds().toFixed(1)} s`;
    showError(errorEl, err);
  } finally {
    clearInterval(timer);
    progress.hidden = true;
    btn.disabled = false;
  }
}

// ------------------------------------------------------------------ wiring
function init() {
  $("photos").addEventListener("change", async (ev) => {
    const files = Array.from(ev.target.files);
    ev.target.value = "";
    await addPhotos(files);
  });
  $("layout").addEventListener("change", drawLayout);
  $("height").addEventListener("input", resizeCanvas);
  $("width").addEventListener("input", resizeCanvas);
  $("generate").addEventListener("click", generate);
  $("reuse-seed").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  setupCanvas();
  resizeCanvas();
  renderPeople();
  watchReadiness();
}

document.addEventListener("DOMContentLoaded", init);
