// ldm-serve playground: plain JavaScript against the gateway's own API (same origin, no build step).
//
// Auth: when the server has API keys, every call (including the event stream, read with fetch()
// rather than EventSource, which cannot send headers) carries `Authorization: Bearer <key>`;
// images are fetched the same way and shown from blob: URLs.
// Errors: a 4xx body is {"error": {"type", "message", "field"?}}; the message is shown next to
// the form control whose data-field matches `field` (or the first part of a dotted field).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY_STORAGE = "ldm-serve.api-key";
const INT_FIELDS = ["width", "height", "steps", "n", "seed"];
const FIELD_ALIASES = { authorization: "authorization", "image.width": "image", "image.height": "image" };
const TERMINAL = new Set(["succeeded", "failed", "canceled", "expired"]);

const form = $("#generate");
const state = { keysOn: false, lastSeed: null, models: [] };

// ---------------------------------------------------------------- API calls

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.type = err.type || "http_error";
    this.field = err.field || (status === 401 ? "authorization" : null);
  }
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON: the status says enough */ }
    throw new ApiError(res.status, body);
  }
  return res;
}

// ---------------------------------------------------------------- field errors

function controlFor(field) {
  if (!field) return null;
  const name = FIELD_ALIASES[field] || field;
  return form.querySelector(`[data-field="${CSS.escape(name)}"]`)
    || form.querySelector(`[data-field="${CSS.escape(name.split(".")[0])}"]`);
}

function errorSlotFor(control) {
  if (control.id === "mask-tools") return $("#mask-error");
  return $(`#${control.id}-error`);
}

function clearErrors() {
  for (const el of form.querySelectorAll(".error")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showError(err) {
  if (err.status === 401 || err.field === "authorization") revealKeyField();
  const control = controlFor(err.field);
  const slot = control && !control.closest("[hidden]") ? errorSlotFor(control) : null;
  if (!slot) {
    $("#form-error").textContent = err.message;
    return;
  }
  slot.textContent = err.message;
  control.setAttribute("aria-invalid", "true");
  if (control.focus) control.focus();
}

function revealKeyField() {
  state.keysOn = true;
  $("#api-key-field").hidden = false;
}

// ---------------------------------------------------------------- models

async function loadModels() {
  const select = $("#model");
  try {
    const res = await api("/v1/models");
    state.models = (await res.json()).data;
  } catch (err) {
    if (err instanceof ApiError) showError(err); else $("#form-error").textContent = String(err);
    return;
  }
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (!state.models.length) select.append(new Option("no worker is serving a model yet", ""));
  if (state.models.some((m) => m.id === previous)) select.value = previous;
  modelChanged();
}

function modelChanged() {
  const model = state.models.find((m) => m.id === $("#model").value);
  const warning = $("#model-warning");
  warning.hidden = !(model && model.warning);
  warning.textContent = model && model.warning ? `${model.id}: ${model.warning}` : "";
  const size = model && model.default_size ? String(model.default_size) : "";
  $("#width").placeholder = size;
  $("#height").placeholder = size;
}

// ---------------------------------------------------------------- the request

function mode() {
  return form.querySelector('input[name="mode"]:checked').value;
}

function readNumber(id, parse) {
  const input = $(`#${id}`);
  if (input.disabled) return undefined;
  if (input.validity.badInput) throw new ApiError(422, { error: { field: id, message: `${id}: must be a number` } });
  const text = input.value.trim();
  return text === "" ? undefined : parse(text);
}

function parameters() {
  const params = { prompt: $("#prompt").value, negative_prompt: $("#negative_prompt").value };
  if ($("#model").value) params.model = $("#model").value;
  for (const id of INT_FIELDS) params[id] = readNumber(id, (t) => Number.parseInt(t, 10));
  params.guidance_scale = readNumber("guidance_scale", Number.parseFloat);
  if (mode() === "img2img") params.strength = readNumber("strength", Number.parseFloat);
  for (const k of Object.keys(params)) if (params[k] === undefined) delete params[k];
  return params;
}

async function submitJob() {
  const params = parameters();
  if (mode() === "txt2img") {
    const res = await api("/v1/txt2img", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(params),
    });
    return res.json();
  }
  // multipart: the (cropped) image, for inpainting the mask, and the other fields as text
  const body = new FormData();
  for (const [k, v] of Object.entries(params)) body.append(k, String(v));
  body.append("image", await inpaint.imageBlob(), "image.png");
  if (mode() === "inpaint") body.append("mask", await inpaint.maskBlob(), "mask.png");
  const res = await api(`/v1/${mode()}`, { method: "POST", body });
  return res.json();
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors();
  const button = $("#submit");
  button.disabled = true;
  try {
    if (mode() !== "txt2img") inpaint.check(mode() === "inpaint");
    const job = await submitJob();
    followJob(job);
  } catch (err) {
    if (err instanceof ApiError) showError(err); else $("#form-error").textContent = String(err);
  } finally {
    button.disabled = false;
  }
});

$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

form.addEventListener("input", (event) => {
  const control = event.target.closest("[data-field]");
  if (control && control.getAttribute("aria-invalid")) {
    control.removeAttribute("aria-invalid");
    const slot = errorSlotFor(control);
    if (slot) slot.textContent = "";
  }
});

for (const radio of form.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => setMode(mode()));
}

// txt2img: no image; img2img: an init image and a strength (the size defaults to the image's, other
// sizes rescale it); inpaint: an image and a painted mask (the output has the image's size).
function setMode(value) {
  form.querySelector(`input[name="mode"][value="${value}"]`).checked = true;
  $("#image-panel").hidden = value === "txt2img";
  $("#image-panel").dataset.mode = value;
  $("#image-panel-title").textContent = value === "inpaint" ? "Image and mask" : "Init image";
  $("#strength-field").hidden = value !== "img2img";
  for (const id of ["mask-tools", "mask-canvas"]) $(`#${id}`).hidden = value !== "inpaint";
  for (const id of ["width", "height"]) $(`#${id}`).disabled = value === "inpaint";
}

// ---------------------------------------------------------------- seeds

$("#seed-random").addEventListener("click", () => { $("#seed").value = ""; });
$("#seed-reuse").addEventListener("click", () => {
  if (state.lastSeed !== null) $("#seed").value = String(state.lastSeed);
});

function rememberSeed(seed) {
  state.lastSeed = seed;
  $("#seed-reuse").disabled = false;
}

// ---------------------------------------------------------------- jobs, events and the gallery

function describe(p) {
  const strength = p.strength === undefined ? "" : ` · strength ${p.strength}`;
  return `${p.width}×${p.height} · ${p.steps} steps · guidance ${p.guidance_scale}${strength}`;
}

function followJob(job) {
  $("#gallery-empty").hidden = true;
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = job.id;
  card.dataset.status = job.status;
  $(".job-prompt", card).textContent = job.parameters.prompt || "(empty prompt)";
  $(".job-params", card).textContent = `${job.kind} · ${job.model} · ${describe(job.parameters)}`
    + (job.parameters.negative_prompt ? ` · not: ${job.parameters.negative_prompt}` : "");
  const slots = $(".slots", card);
  job.seeds.forEach((seed, index) => {
    const slot = $("#slot-template").content.firstElementChild.cloneNode(true);
    slot.dataset.index = String(index);
    $(".seed", slot).textContent = `seed ${seed}`;
    $("progress", slot).setAttribute("aria-label", `image ${index + 1} of ${job.seeds.length}: progress`);
    slots.append(slot);
  });
  rememberSeed(job.seeds[0]);
  const cancel = $(".cancel", card);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" });
    } catch (err) {
      $(".job-error", card).textContent = err.message;
      cancel.disabled = false;
    }
  });
  $("#gallery").prepend(card);
  setStatus(card, job.status, job.queue_position);
  streamJob(job, card);
}

function setStatus(card, status, position) {
  card.dataset.status = status;
  let text = status;
  if (status === "queued" && position !== null && position !== undefined) {
    card.dataset.queuePosition = String(position);
    text = position === 0 ? "queued: next in line" : `queued: ${position} job${position === 1 ? "" : "s"} ahead`;
  }
  $(".job-status", card).textContent = text;
  if (TERMINAL.has(status)) $(".cancel", card).hidden = true;
}

function setProgress(card, step, total) {
  card.dataset.step = String(step);
  for (const slot of card.querySelectorAll(".slot:not(.done)")) {
    const bar = $("progress", slot);
    bar.max = total;
    bar.value = step;
  }
  if (card.dataset.status === "running") $(".job-status", card).textContent = `running: step ${step} of ${total}`;
}

async function showImage(card, job, index) {
  const slot = card.querySelector(`.slot[data-index="${index}"]`);
  if (!slot || slot.classList.contains("done")) return;
  slot.classList.add("done");
  let blob;
  try {
    blob = await (await api(`/v1/jobs/${job.id}/images/${index}`)).blob();
  } catch (err) {
    slot.classList.remove("done"); // the final `done` event tries again
    $(".job-error", card).textContent = err.message;
    return;
  }
  const url = URL.createObjectURL(blob);
  const img = new Image();
  img.src = url;
  img.alt = `${job.parameters.prompt} (seed ${job.seeds[index]})`;
  $(".frame", slot).replaceChildren(img);
  const ext = (blob.type.split("/")[1] || "png").replace("jpeg", "jpg");
  const link = $(".download", slot);
  link.href = url;
  link.download = `ldm-${job.id}-${index}-seed${job.seeds[index]}.${ext}`;
  link.hidden = false;
  for (const useInit of slot.querySelectorAll(".use-init")) {
    useInit.hidden = false;
    useInit.addEventListener("click", async () => {
      setMode(useInit.dataset.mode);
      await inpaint.load(blob);
      $("#prompt").focus();
    });
  }
  const reuse = $(".reuse-seed", slot);
  reuse.hidden = false;
  reuse.addEventListener("click", () => { $("#seed").value = String(job.seeds[index]); $("#seed").focus(); });
}

// Reads the job's server-sent events with fetch() (so the API key header goes along), resuming
// with Last-Event-ID if the connection drops before `done`.
async function streamJob(job, card) {
  let lastId = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      const headers = lastId ? { "Last-Event-ID": lastId } : {};
      const res = await api(`/v1/jobs/${job.id}/events`, { headers });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const ev = parseFrame(frame);
          if (ev.id) lastId = ev.id;
          if (ev.data === null) continue;
          if (await onEvent(job, card, ev.event, JSON.parse(ev.data))) return;
        }
      }
    } catch (err) {
      if (err instanceof ApiError && err.status < 500) {
        $(".job-error", card).textContent = err.message;
        return;
      }
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
  $(".job-error", card).textContent = "lost the event stream; reload the page to see the job";
}

function parseFrame(frame) {
  const ev = { event: "message", data: null, id: null };
  for (const line of frame.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "event") ev.event = value;
    else if (name === "data") ev.data = ev.data === null ? value : `${ev.data}\n${value}`;
    else if (name === "id") ev.id = value;
  }
  return ev;
}

// Returns true when the stream is finished.
async function onEvent(job, card, event, data) {
  if (event === "queue") setStatus(card, "queued", data.position);
  else if (event === "status") setStatus(card, data.status, null);
  else if (event === "progress") setProgress(card, data.step, data.total);
  else if (event === "image") await showImage(card, job, data.index);
  else if (event === "error") $(".job-error", card).textContent = data.message;
  else if (event === "done") {
    setStatus(card, data.status, null);
    for (const image of data.images) await showImage(card, job, image.index);
    if (data.error) $(".job-error", card).textContent = data.error.message;
    for (const slot of card.querySelectorAll(".slot:not(.done)")) slot.classList.add("missing");
    return true;
  }
  return false;
}

// ---------------------------------------------------------------- inpainting: image and mask canvases

const inpaint = (() => {
  const imageCanvas = $("#image-canvas");
  const view = $("#mask-canvas"); // what the user sees: translucent red strokes over the image
  const mask = document.createElement("canvas"); // the mask itself: white strokes on transparent
  let loaded = false;
  let painted = false;
  let last = null;

  function load(blob) {
    return createImageBitmap(blob).then((bitmap) => {
      const w = Math.max(8, bitmap.width - (bitmap.width % 8));
      const h = Math.max(8, bitmap.height - (bitmap.height % 8));
      for (const c of [imageCanvas, view, mask]) { c.width = w; c.height = h; }
      imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
      loaded = true;
      painted = false;
      $("#canvas-wrap").hidden = false;
      $("#canvas-wrap").dataset.size = `${w}x${h}`;
    });
  }

  function point(event) {
    const rect = view.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * view.width) / rect.width,
      y: ((event.clientY - rect.top) * view.height) / rect.height,
      scale: view.width / rect.width,
    };
  }

  function stroke(from, to) {
    const erase = form.querySelector('input[name="brush-mode"]:checked').value === "erase";
    const width = Number($("#brush-size").value) * to.scale;
    for (const [canvas, color] of [[mask, "#fff"], [view, "rgba(255, 40, 90, 1)"]]) {
      const ctx = canvas.getContext("2d");
      ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
    if (!erase) painted = true;
  }

  view.addEventListener("pointerdown", (event) => {
    if (!loaded) return;
    event.preventDefault();
    view.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
  });
  view.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const p = point(event);
    stroke(last, p);
    last = p;
  });
  for (const type of ["pointerup", "pointercancel"]) view.addEventListener(type, () => { last = null; });

  $("#mask-clear").addEventListener("click", () => {
    for (const c of [mask, view]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
    painted = false;
  });
  $("#brush-size").addEventListener("input", () => { $("#brush-size-out").value = $("#brush-size").value; });
  $("#init-image").addEventListener("change", () => {
    const file = $("#init-image").files[0];
    if (file) load(file).catch(() => showError(new ApiError(422, {
      error: { field: "image", message: "image: this browser cannot decode the file (use PNG, JPEG or WebP)" },
    })));
  });

  function toBlob(canvas) {
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  function maskHasPaint() {
    const data = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
    return false;
  }

  return {
    load,
    check(needsMask) {
      if (!loaded) throw new ApiError(422, { error: { field: "image", message: "image: choose an image first" } });
      if (needsMask && (!painted || !maskHasPaint())) {
        throw new ApiError(422, { error: { field: "mask", message: "mask: paint the area to repaint" } });
      }
    },
    imageBlob: () => toBlob(imageCanvas),
    maskBlob() {
      const out = document.createElement("canvas"); // white strokes on black: white = repaint
      out.width = mask.width;
      out.height = mask.height;
      const ctx = out.getContext("2d");
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, out.width, out.height);
      ctx.drawImage(mask, 0, 0);
      return toBlob(out);
    },
  };
})();

// ---------------------------------------------------------------- start

const keyInput = $("#api-key");
keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
if (keyInput.value) revealKeyField();
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  clearErrors();
  loadModels();
});
$("#model").addEventListener("change", modelChanged);
setMode(mode());
loadModels();
