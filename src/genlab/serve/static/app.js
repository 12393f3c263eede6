// genlab playground: plain JavaScript over genlab's OpenAI-compatible API. No build step, nothing fetched from
// elsewhere: every request goes to the server that served this page.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const KEY_STORE = "genlab.apiKey";
const state = { models: [], inpaint: null };

// ------------------------------------------------------------------------------------------------ HTTP helpers

function apiKey() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch { return ""; }
}

async function errorFrom(response) {
  let msg = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) msg = `${response.status}: ${body.error.message}`;
    else if (body && body.detail) msg = `${response.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  } catch { /* not JSON: keep the status line */ }
  if (response.status === 401) msg += " (enter a valid API key at the top; make one with: genlab keys create NAME)";
  const retry = response.headers.get("Retry-After");
  if (response.status === 429 && retry) msg += ` (retry in ${retry} s)`;
  const err = new Error(msg);
  err.status = response.status;
  return err;
}

async function api(path, { method = "GET", json, form, signal } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  else if (form) body = form;
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(`the server cannot be reached (${e.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// Server-sent events from a fetch body: yields each `data:` payload parsed as JSON, stops at [DONE].
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buf))) {
        const block = buf.slice(0, m.index);
        buf = buf.slice(m.index + m[0].length);
        const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || JSON.stringify(obj.error));
        yield obj;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function showError(id, err) {
  const el = document.getElementById(id);
  el.textContent = err ? (err.name === "AbortError" ? "" : `Error: ${err.message || err}`) : "";
}

function busy(button, on, label) {
  button.disabled = on;
  button.setAttribute("aria-busy", on ? "true" : "false");
  if (label) {
    if (on) { button.dataset.label = button.textContent; button.textContent = label; }
    else if (button.dataset.label) button.textContent = button.dataset.label;
  }
}

// The value of a number input, or undefined when empty (the server's default then applies).
function num(id, integer = false) {
  const el = document.getElementById(id);
  if (!el || el.value.trim() === "") return undefined;
  const v = integer ? parseInt(el.value, 10) : parseFloat(el.value);
  if (Number.isNaN(v)) throw new Error(`${el.labels[0] ? el.labels[0].textContent : id} is not a number`);
  return v;
}

function compact(obj) {
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined && v !== ""));
}

function sampling(prefix) {
  return compact({
    temperature: num(`${prefix}-temperature`), top_p: num(`${prefix}-top_p`), top_k: num(`${prefix}-top_k`, true),
    repetition_penalty: num(`${prefix}-repetition_penalty`), max_tokens: num(`${prefix}-max_tokens`, true),
    seed: num(`${prefix}-seed`, true),
  });
}

function elapsed(t0) { return ((performance.now() - t0) / 1000).toFixed(1); }

// ------------------------------------------------------------------------------------------------ tabs

function setupTabs() {
  const tabs = $$('[role="tab"]');
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    history.replaceState(null, "", `#${tab.id.slice(4)}`);
    if (tab.id === "tab-arena") refreshLeaderboard();
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (e) => {
      const k = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (k === undefined) return;
      e.preventDefault();
      select(tabs[(k + tabs.length) % tabs.length], true);
    });
  });
  const start = document.getElementById(`tab-${location.hash.slice(1)}`);
  if (start) select(start, false);
  return select;
}

// ------------------------------------------------------------------------------------------------ models

function info(model) { return model.genlab || {}; }

async function loadModels() {
  const status = $("#server-status");
  try {
    const r = await api("v1/models");
    state.models = (await r.json()).data || [];
    const kinds = {};
    for (const m of state.models) kinds[info(m).kind] = (kinds[info(m).kind] || 0) + 1;
    status.textContent = `${state.models.length} model${state.models.length === 1 ? "" : "s"} served` +
      (state.models.length ? ` (${Object.entries(kinds).map(([k, n]) => `${n} ${k}`).join(", ")})` : "");
    status.classList.remove("bad");
  } catch (e) {
    state.models = [];
    status.textContent = `Models could not be listed: ${e.message}`;
    status.classList.add("bad");
  }
  for (const sel of $$("select[data-kinds]")) {
    const kinds = sel.dataset.kinds.split(" ");
    const keep = sel.value;
    const fits = state.models.filter((m) => kinds.includes(info(m).kind) && (!sel.dataset.inpaint || info(m).inpaint));
    sel.replaceChildren(...fits.map((m) => new Option(m.id, m.id)));
    if (!fits.length) sel.append(new Option(`no ${kinds.join(" or ")} model served`, ""));
    if (fits.some((m) => m.id === keep)) sel.value = keep;
    sel.dispatchEvent(new Event("change"));
  }
}

function modelById(id) { return state.models.find((m) => m.id === id); }

// Fill a class select and a sampler select, and the steps default, from an image model's description.
function imageControls(model, classSel, samplerSel, stepsInput, guidanceInput) {
  const g = model ? info(model) : {};
  const firstOption = classSel.options[0];
  classSel.replaceChildren(firstOption, ...(g.classes || []).map((c, i) => new Option(`${i}: ${c}`, c)));
  classSel.disabled = !(g.classes && g.classes.length);
  samplerSel.replaceChildren(...(g.samplers || []).map((s) => new Option(s, s)));
  if (g.default_sampler) samplerSel.value = g.default_sampler;
  samplerSel.disabled = !(g.samplers && g.samplers.length);
  if (!samplerSel.options.length) samplerSel.append(new Option("(this family has no sampler choice)", ""));
  stepsInput.disabled = !g.default_steps;
  stepsInput.value = g.default_steps || "";
  if (guidanceInput) guidanceInput.disabled = !g.guidance;
}

// ------------------------------------------------------------------------------------------------ chat

const chat = { messages: [], controller: null };

function addMessage(log, role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return body;
}

function setupChat() {
  const form = $("#chat-form"), input = $("#chat-input"), log = $("#chat-log");
  const send = $("#chat-send"), stop = $("#chat-stop");
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
  });
  $("#chat-clear").addEventListener("click", () => {
    chat.messages = [];
    log.replaceChildren();
    $("#chat-stats").textContent = "";
    input.focus();
  });
  stop.addEventListener("click", () => chat.controller && chat.controller.abort());
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("chat-error", null);
    const text = input.value.trim();
    if (!text || chat.controller) return;
    let body;
    try {
      const system = $("#chat-system").value.trim();
      const history = [...chat.messages, { role: "user", content: text }];
      body = { model: $("#chat-model").value, stream: true, ...sampling("chat"),
        messages: system ? [{ role: "system", content: system }, ...history] : history };
      if (!body.model) throw new Error("no chat model is served");
    } catch (err) { showError("chat-error", err); return; }
    chat.messages.push({ role: "user", content: text });
    addMessage(log, "user", text);
    input.value = "";
    const out = addMessage(log, "assistant", "");
    out.parentElement.setAttribute("aria-busy", "true");
    out.parentElement.dataset.testid = "chat-reply";
    chat.controller = new AbortController();
    busy(send, true);
    stop.disabled = false;
    const t0 = performance.now();
    let first = null, pieces = 0, reply = "";
    try {
      const r = await api("v1/chat/completions", { method: "POST", json: body, signal: chat.controller.signal });
      for await (const chunk of sse(r)) {
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        if (delta.content) {
          if (first === null) first = performance.now();
          reply += delta.content;
          pieces += 1;
          out.textContent = reply;
          log.scrollTop = log.scrollHeight;
        }
      }
      const ttft = first === null ? "" : `, first token after ${((first - t0) / 1000).toFixed(2)} s`;
      $("#chat-stats").textContent = `${pieces} pieces in ${elapsed(t0)} s${ttft}`;
    } catch (err) {
      showError("chat-error", err);
      if (err.name === "AbortError") $("#chat-stats").textContent = "stopped";
    } finally {
      out.parentElement.setAttribute("aria-busy", "false");
      if (reply) chat.messages.push({ role: "assistant", content: reply });
      else { out.parentElement.remove(); chat.messages.pop(); input.value = input.value || text; }
      chat.controller = null;
      busy(send, false);
      stop.disabled = true;
    }
  });
}

// ------------------------------------------------------------------------------------------------ completion

function stopList(text) {
  return text.split("\n").filter((s) => s !== "").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"));
}

function setupCompletion() {
  const form = $("#comp-form"), run = $("#comp-run"), stopBtn = $("#comp-stop-btn"), output = $("#comp-output");
  let controller = null;
  stopBtn.addEventListener("click", () => controller && controller.abort());
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("comp-error", null);
    if (controller) return;
    let body;
    try {
      const stop = stopList($("#comp-stop").value);
      body = compact({ model: $("#comp-model").value, prompt: $("#comp-prompt").value, ...sampling("comp"),
        n: num("comp-n", true), stream: $("#comp-stream").checked, stop: stop.length ? stop : undefined });
      if (!body.model) throw new Error("no text model is served");
    } catch (err) { showError("comp-error", err); return; }
    const n = body.n || 1;
    const texts = Array(n).fill("");
    output.replaceChildren();
    const boxes = texts.map((_, i) => {
      const pre = document.createElement("pre");
      pre.className = "completion";
      pre.dataset.testid = `comp-choice-${i}`;
      const p = document.createElement("span");
      p.className = "prompt";
      p.textContent = body.prompt;
      const t = document.createElement("span");
      pre.append(p, t);
      output.append(pre);
      return t;
    });
    controller = new AbortController();
    busy(run, true, "Generating…");
    stopBtn.disabled = false;
    const t0 = performance.now();
    try {
      const r = await api("v1/completions", { method: "POST", json: body, signal: controller.signal });
      let usage = null;
      if (body.stream) {
        for await (const chunk of sse(r)) {
          for (const c of chunk.choices || []) {
            texts[c.index || 0] += c.text || "";
            boxes[c.index || 0].textContent = texts[c.index || 0];
          }
          if (chunk.usage) usage = chunk.usage;
        }
      } else {
        const res = await r.json();
        for (const c of res.choices) boxes[c.index || 0].textContent = c.text;
        usage = res.usage;
      }
      $("#comp-stats").textContent = `${elapsed(t0)} s` +
        (usage ? `, ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "");
    } catch (err) {
      showError("comp-error", err);
    } finally {
      controller = null;
      busy(run, false, true);
      stopBtn.disabled = true;
    }
  });
}

// ------------------------------------------------------------------------------------------------ images

function b64ToBlob(b64, type = "image/png") {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

function showGrid(list, data, label, withInpaint) {
  list.replaceChildren(...data.map((d, i) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${d.b64_json}`;
    img.alt = `${label} ${i + 1}`;
    img.dataset.testid = "grid-image";
    const row = document.createElement("span");
    const save = document.createElement("a");
    save.href = img.src;
    save.download = `genlab_${i + 1}.png`;
    save.textContent = "Save";
    save.setAttribute("aria-label", `Save ${label.toLowerCase()} ${i + 1}`);
    row.append(save);
    if (withInpaint) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "Inpaint";
      b.setAttribute("aria-label", `Inpaint ${label.toLowerCase()} ${i + 1}`);
      b.dataset.testid = "to-inpaint";
      b.addEventListener("click", () => withInpaint(d.b64_json));
      row.append(" ", b);
    }
    li.append(img, row);
    return li;
  }));
}

function setupImages(goInpaint) {
  const form = $("#img-form"), model = $("#img-model"), run = $("#img-run");
  model.addEventListener("change", () => {
    const m = modelById(model.value);
    imageControls(m, $("#img-class"), $("#img-sampler"), $("#img-steps"), $("#img-guidance"));
    const g = m ? info(m) : {};
    $("#img-info").textContent = m ? `${g.family || "image"} model` +
      (g.image_size ? `, ${g.image_size[2]}x${g.image_size[1]} pixels, ${g.image_size[0]} channel(s)` : "") : "";
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("img-error", null);
    let body;
    try {
      body = compact({ model: model.value, n: num("img-n", true), seed: num("img-seed", true),
        prompt: $("#img-prompt").value.trim(), class: $("#img-class").disabled ? undefined : $("#img-class").value,
        sampler: $("#img-sampler").disabled ? undefined : $("#img-sampler").value,
        steps: $("#img-steps").disabled ? undefined : num("img-steps", true),
        guidance: $("#img-guidance").disabled ? undefined : num("img-guidance"), response_format: "b64_json" });
      if (!body.model) throw new Error("no image model is served");
    } catch (err) { showError("img-error", err); return; }
    busy(run, true, "Generating…");
    const t0 = performance.now();
    try {
      const res = await (await api("v1/images/generations", { method: "POST", json: body })).json();
      showGrid($("#img-grid"), res.data, "Generated image", (b64) => goInpaint(b64, body.model));
      $("#img-stats").textContent = `${res.data.length} image(s) in ${elapsed(t0)} s`;
    } catch (err) {
      showError("img-error", err);
    } finally {
      busy(run, false, true);
    }
  });
}

// ------------------------------------------------------------------------------------------------ inpaint

// The mask is painted on a canvas as large as the display; it is reduced to the image's own size on sending:
// a pixel is repainted when at least a quarter of its area is painted. The mask PNG sent has those pixels fully
// transparent (alpha 0) and the rest opaque, as OpenAI's /v1/images/edits expects.
const inp = { image: null, blob: null, w: 0, h: 0, scale: 1, mask: null, painting: false, last: null, token: 0 };

function inpaintDraw() {
  const c = $("#inp-canvas"), ctx = c.getContext("2d");
  ctx.clearRect(0, 0, c.width, c.height);
  if (!inp.image) return;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(inp.image, 0, 0, c.width, c.height);
  // the painted strokes in a translucent red over the image
  const tint = document.createElement("canvas");
  tint.width = c.width; tint.height = c.height;
  const t = tint.getContext("2d");
  t.drawImage(inp.mask, 0, 0);
  t.globalCompositeOperation = "source-in";
  t.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--mask") || "rgba(220,40,40,.55)";
  t.fillRect(0, 0, tint.width, tint.height);
  ctx.drawImage(tint, 0, 0);
}

// The mask at the image's size: a Uint8Array with 1 where the pixel is to be repainted.
function inpaintMaskBits() {
  const small = document.createElement("canvas");
  small.width = inp.w; small.height = inp.h;
  const s = small.getContext("2d");
  s.imageSmoothingEnabled = true;
  s.imageSmoothingQuality = "high";
  s.drawImage(inp.mask, 0, 0, inp.w, inp.h);
  const a = s.getImageData(0, 0, inp.w, inp.h).data;
  const bits = new Uint8Array(inp.w * inp.h);
  for (let i = 0; i < bits.length; i++) bits[i] = a[4 * i + 3] >= 64 ? 1 : 0;
  return bits;
}

function inpaintInfo() {
  if (!inp.image) { $("#inp-mask-info").textContent = "No image yet."; return; }
  const bits = inpaintMaskBits();
  const k = bits.reduce((x, y) => x + y, 0);
  $("#inp-mask-info").textContent = `${k} of ${bits.length} pixels will be repainted`;
}

async function inpaintMaskBlob() {
  const bits = inpaintMaskBits();
  const c = document.createElement("canvas");
  c.width = inp.w; c.height = inp.h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(inp.w, inp.h);
  for (let i = 0; i < bits.length; i++) img.data[4 * i + 3] = bits[i] ? 0 : 255;  // black, transparent where painted
  ctx.putImageData(img, 0, 0);
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

// Use an image (a Blob) in the inpaint tab: its PNG bytes are sent as they are when its size is the model's,
// anything else is redrawn at the model's size first.
async function inpaintSetImage(blob) {
  const token = ++inp.token;  // a later call wins over one still decoding
  const bitmap = await createImageBitmap(blob);
  const m = modelById($("#inp-model").value);
  const size = m && info(m).image_size;
  const [w, h] = size ? [size[2], size[1]] : [bitmap.width, bitmap.height];
  let note = "";
  if (bitmap.width !== w || bitmap.height !== h || blob.type !== "image/png") {
    const c = document.createElement("canvas");
    c.width = w; c.height = h;
    c.getContext("2d").drawImage(bitmap, 0, 0, w, h);
    blob = await new Promise((resolve) => c.toBlob(resolve, "image/png"));
    if (bitmap.width !== w || bitmap.height !== h) note = ` (resized from ${bitmap.width}x${bitmap.height} to the model's ${w}x${h})`;
  }
  const image = await createImageBitmap(blob);
  if (token !== inp.token) return;
  inp.image = image;
  inp.blob = blob;
  inp.w = w; inp.h = h;
  const canvas = $("#inp-canvas");
  inp.scale = Math.max(1, Math.floor(320 / Math.max(w, h)));
  canvas.width = w * inp.scale; canvas.height = h * inp.scale;
  inp.mask = document.createElement("canvas");
  inp.mask.width = canvas.width; inp.mask.height = canvas.height;
  inpaintDraw();
  inpaintInfo();
  $("#inp-help").textContent = `Paint over the part to repaint; the rest is kept exactly.${note}`;
}

function setupInpaint() {
  const canvas = $("#inp-canvas"), model = $("#inp-model"), run = $("#inp-run");
  model.addEventListener("change", () => {
    const m = modelById(model.value);
    imageControls(m, $("#inp-class"), $("#inp-sampler"), $("#inp-steps"), null);
    const size = m && info(m).image_size;
    if (inp.blob && size && (size[2] !== inp.w || size[1] !== inp.h)) inpaintSetImage(inp.blob);
  });
  $("#inp-file").addEventListener("change", async (e) => {
    showError("inp-error", null);
    const f = e.target.files[0];
    if (!f) return;
    try { await inpaintSetImage(f); } catch (err) { showError("inp-error", new Error(`${f.name} cannot be read as an image`)); }
  });
  const point = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const stroke = (from, to) => {
    const ctx = inp.mask.getContext("2d");
    ctx.strokeStyle = ctx.fillStyle = "#000";
    ctx.lineCap = "round";
    ctx.lineWidth = Number($("#inp-brush").value) * canvas.width / 320;
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
    inpaintDraw();
  };
  canvas.addEventListener("pointerdown", (e) => {
    if (!inp.image) return;
    e.preventDefault();
    canvas.setPointerCapture(e.pointerId);
    inp.painting = true;
    inp.last = point(e);
    stroke(inp.last, inp.last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!inp.painting) return;
    const p = point(e);
    stroke(inp.last, p);
    inp.last = p;
  });
  const end = () => { if (inp.painting) { inp.painting = false; inpaintInfo(); } };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  const edit = (fn) => () => {
    if (!inp.image) return;
    const ctx = inp.mask.getContext("2d");
    fn(ctx, inp.mask.width, inp.mask.height);
    inpaintDraw();
    inpaintInfo();
  };
  $("#inp-mask-clear").addEventListener("click", edit((ctx, w, h) => ctx.clearRect(0, 0, w, h)));
  $("#inp-mask-bottom").addEventListener("click", edit((ctx, w, h) => { ctx.fillStyle = "#000"; ctx.fillRect(0, h / 2, w, h / 2); }));
  $("#inp-mask-invert").addEventListener("click", edit((ctx, w, h) => {
    ctx.globalCompositeOperation = "xor";
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    ctx.globalCompositeOperation = "source-over";
  }));
  $("#inp-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("inp-error", null);
    const t0 = performance.now();
    try {
      if (!model.value) throw new Error("no model that can inpaint is served");
      if (!inp.image) throw new Error("choose an image first (upload one, or press Inpaint under a generated image)");
      if (!inpaintMaskBits().some((b) => b)) throw new Error("paint the part to repaint first: the mask is empty");
      const form = new FormData();
      form.append("model", model.value);
      form.append("image", inp.blob, "image.png");
      form.append("mask", await inpaintMaskBlob(), "mask.png");
      form.append("response_format", "b64_json");
      const fields = { n: num("inp-n", true), seed: num("inp-seed", true),
        steps: $("#inp-steps").disabled ? undefined : num("inp-steps", true),
        sampler: $("#inp-sampler").disabled ? undefined : $("#inp-sampler").value,
        prompt: $("#inp-class").disabled ? undefined : $("#inp-class").value };
      for (const [k, v] of Object.entries(compact(fields))) form.append(k, String(v));
      busy(run, true, "Inpainting…");
      const res = await (await api("v1/images/edits", { method: "POST", form })).json();
      showGrid($("#inp-grid"), res.data, "Inpainted image", (b64) => inpaintSetImage(b64ToBlob(b64)));
      $("#inp-stats").textContent = `${res.data.length} image(s) in ${elapsed(t0)} s`;
    } catch (err) {
      showError("inp-error", err);
    } finally {
      busy(run, false, true);
    }
  });
}

// ------------------------------------------------------------------------------------------------ RAG

function renderAnswer(el, text, cited) {
  // the answer text with each [n] that names a citation made a button revealing that passage
  el.replaceChildren();
  let at = 0;
  for (const m of text.matchAll(/\[(\d+)\]/g)) {
    const n = Number(m[1]);
    if (!cited.has(n)) continue;
    el.append(text.slice(at, m.index));
    const b = document.createElement("button");
    b.type = "button";
    b.className = "cite";
    b.textContent = `[${n}]`;
    b.setAttribute("aria-label", `Show source ${n}`);
    b.setAttribute("aria-controls", `rag-source-${n}`);
    b.dataset.testid = "rag-cite";
    b.addEventListener("click", () => revealSource(n));
    el.append(b);
    at = m.index + m[0].length;
  }
  el.append(text.slice(at));
}

function revealSource(n) {
  for (const li of $$("#rag-sources li")) li.classList.toggle("active", li.id === `rag-source-${n}`);
  const li = document.getElementById(`rag-source-${n}`);
  if (!li) return;
  const details = $("details", li);
  details.open = true;
  li.scrollIntoView({ block: "nearest" });
  $("summary", li).focus();
}

function renderSources(citations) {
  const list = $("#rag-sources");
  list.replaceChildren(...citations.map((c) => {
    const li = document.createElement("li");
    li.id = `rag-source-${c.n}`;
    li.value = c.n;
    const d = document.createElement("details");
    const s = document.createElement("summary");
    const where = [c.location, c.start != null && c.end != null ? `characters ${c.start}-${c.end}` : null]
      .filter(Boolean).join(", ");
    s.textContent = `${c.source}${where ? ` (${where})` : ""}${c.by === "model" ? ", cited by the model" : c.by === "overlap" ? ", holds the answer's words" : ", retrieved, not used"}`;
    const q = document.createElement("blockquote");
    q.textContent = c.text;
    d.append(s, q);
    li.append(d);
    return li;
  }));
  $("#rag-sources-title").hidden = !citations.length;
}

function setupRag() {
  const form = $("#rag-form"), run = $("#rag-run"), answer = $("#rag-answer");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("rag-error", null);
    let body;
    try {
      body = compact({ model: $("#rag-model").value, stream: true, max_tokens: num("rag-max_tokens", true),
        temperature: num("rag-temperature"), messages: [{ role: "user", content: $("#rag-question").value.trim() }] });
      if (!body.model) throw new Error("no RAG index is served (start the server with rag:INDEX)");
    } catch (err) { showError("rag-error", err); return; }
    answer.textContent = "";
    renderSources([]);
    busy(run, true, "Asking…");
    const t0 = performance.now();
    let text = "", citations = [];
    try {
      const r = await api("v1/chat/completions", { method: "POST", json: body });
      for await (const chunk of sse(r)) {
        const delta = (chunk.choices && chunk.choices[0] && chunk.choices[0].delta) || {};
        if (delta.content) { text += delta.content; answer.textContent = text; }
        if (chunk.citations) citations = chunk.citations;
      }
      renderAnswer(answer, text, new Set(citations.map((c) => c.n)));
      renderSources(citations);
      $("#rag-stats").textContent = `${citations.length} source(s), ${elapsed(t0)} s`;
    } catch (err) {
      showError("rag-error", err);
    } finally {
      busy(run, false, true);
    }
  });
}

// ------------------------------------------------------------------------------------------------ arena

const arena = { id: null };

function fmt(x) { return x == null ? "–" : Number(x).toFixed(0); }

async function refreshLeaderboard() {
  try {
    const lb = await (await api("v1/arena/leaderboard")).json();
    $("#arena-votes").textContent = `${lb.votes} vote${lb.votes === 1 ? "" : "s"} so far.`;
    const rows = lb.models.map((m, i) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "lb-row";
      const cells = [m.score == null ? "" : i + 1, m.model, fmt(m.score),
        m.ci_low == null ? "–" : `${fmt(m.ci_low)} to ${fmt(m.ci_high)}`, m.battles, m.wins, m.losses, m.ties];
      cells.forEach((v, k) => {
        const td = document.createElement(k === 1 ? "th" : "td");
        if (k === 1) td.scope = "row";
        if (k !== 1 && k !== 3) td.className = "num";
        td.textContent = String(v);
        tr.append(td);
      });
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 8;
      td.textContent = "No votes yet.";
      tr.append(td);
      rows.push(tr);
    }
    $("#arena-leaderboard tbody").replaceChildren(...rows);
  } catch (err) {
    showError("arena-error", err);
  }
}

function setupArena() {
  const form = $("#arena-form"), run = $("#arena-run"), votes = $$(".votes button");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("arena-error", null);
    const prompt = $("#arena-prompt").value.trim();
    if (!prompt) return;
    busy(run, true, "Both models are answering…");
    votes.forEach((b) => { b.disabled = true; });
    for (const s of ["a", "b"]) {
      $(`#arena-${s}`).textContent = "";
      $(`#arena-name-${s}`).textContent = `Model ${s.toUpperCase()}`;
      $(`#arena-${s}`).parentElement.classList.remove("winner");
    }
    $("#arena-vote-result").textContent = "";
    const t0 = performance.now();
    try {
      const res = await (await api("v1/arena/battles", { method: "POST", json: { prompt, kind: "chat" } })).json();
      arena.id = res.id;
      $("#arena-a").textContent = res.outputs[0].text;
      $("#arena-b").textContent = res.outputs[1].text;
      votes.forEach((b) => { b.disabled = false; });
      $("#arena-stats").textContent = `answered in ${elapsed(t0)} s; which answer is better?`;
      votes[0].focus();
    } catch (err) {
      showError("arena-error", err);
    } finally {
      busy(run, false, true);
    }
  });
  for (const b of votes) {
    b.addEventListener("click", async () => {
      if (!arena.id) return;
      showError("arena-error", null);
      votes.forEach((v) => { v.disabled = true; });
      try {
        const res = await (await api(`v1/arena/battles/${encodeURIComponent(arena.id)}/vote`,
          { method: "POST", json: { winner: b.dataset.winner } })).json();
        arena.id = null;
        $("#arena-name-a").textContent = `Model A: ${res.models[0]}`;
        $("#arena-name-b").textContent = `Model B: ${res.models[1]}`;
        if (res.winner !== "tie") $(`#arena-${res.winner}`).parentElement.classList.add("winner");
        $("#arena-vote-result").textContent = res.winner === "tie" ? `Tie between ${res.models[0]} and ${res.models[1]}.`
          : `You preferred ${res.models[res.winner === "a" ? 0 : 1]}.`;
        await refreshLeaderboard();
      } catch (err) {
        showError("arena-error", err);
        if (err.status !== 409 && err.status !== 404) votes.forEach((v) => { v.disabled = false; });
      }
    });
  }
  $("#arena-refresh").addEventListener("click", refreshLeaderboard);
  // the CSV link carries the API key when one is set (a plain link cannot send a header)
  $("#arena-csv").addEventListener("click", async (e) => {
    if (!apiKey()) return;
    e.preventDefault();
    try {
      const blob = await (await api("v1/arena/leaderboard.csv")).blob();
      const a = document.createElement("a");
      a.href = URL.createObjectURL(blob);
      a.download = "arena_leaderboard.csv";
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
    } catch (err) { showError("arena-error", err); }
  });
}

// ------------------------------------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  const selectTab = setupTabs();
  const keyInput = $("#api-key");
  keyInput.value = apiKey();
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    try {
      if (keyInput.value.trim()) localStorage.setItem(KEY_STORE, keyInput.value.trim());
      else localStorage.removeItem(KEY_STORE);
    } catch { /* storage disabled: the key is lost on reload */ }
    loadModels();
  });
  setupChat();
  setupCompletion();
  setupInpaint();
  setupImages(async (b64, modelId) => {
    const sel = $("#inp-model");
    if ([...sel.options].some((o) => o.value === modelId)) { sel.value = modelId; sel.dispatchEvent(new Event("change")); }
    selectTab($("#tab-inpaint"), true);
    await inpaintSetImage(b64ToBlob(b64));
  });
  setupRag();
  setupArena();
  loadModels();
  window.genlabReady = true;
});
