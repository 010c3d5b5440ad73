// The try-it page: pick a model from /v1/models, give it an image, draw the answer.
// Plain JavaScript, no build step, nothing loaded from elsewhere; it calls the public
// API only and sends the API key the user gave (sessionStorage) as a Bearer token.
"use strict";

const HornetPage = (() => {
  const KEY_STORAGE = "hornet-api-key";
  // Detections are asked for down to the slider's lowest value; the slider filters them.
  const DETECT_FLOOR = 0.05;
  const PALETTE = [
    [230, 25, 75], [60, 180, 75], [67, 99, 216], [245, 130, 49], [145, 30, 180],
    [66, 212, 244], [240, 50, 230], [191, 239, 69], [250, 190, 212], [70, 153, 144],
    [220, 190, 255], [154, 99, 36], [255, 250, 200], [128, 0, 0], [170, 255, 195],
    [128, 128, 0], [255, 216, 177], [0, 0, 117], [169, 169, 169],
  ];
  const SHAPES = ["circle", "square", "triangle"];

  const $ = (id) => document.getElementById(id);
  const state = { models: [], image: null, answer: null, generation: 0 };

  // ---- colours -------------------------------------------------------------------

  /** The colour of class `index`: distinct within a model, the same on every view. */
  function classColour(index) {
    if (index < PALETTE.length) return PALETTE[index];
    const hue = (index * 137.508) % 360; // golden angle: neighbours far apart
    return hslToRgb(hue / 360, 0.65, 0.55);
  }

  function hslToRgb(h, s, l) {
    const a = s * Math.min(l, 1 - l);
    const channel = (n) => {
      const k = (n + h * 12) % 12;
      return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
    };
    return [channel(0), channel(8), channel(4)];
  }

  const css = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;
  const isBackground = (label) => label.toLowerCase() === "background";
  const readableOn = ([r, g, b]) => (0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff");

  // ---- COCO compressed RLE -------------------------------------------------------

  /** The run lengths of a COCO compressed RLE string (pycocotools' rleFrString): each
   * count in 6-bit characters from '0', 5 bits of value and a continuation bit, the last
   * character's 0x10 bit the sign; from the third count on, a delta from the count two
   * before. Arithmetic instead of 32-bit shifts, so counts of large images stay exact. */
  function rleCounts(text) {
    const counts = [];
    let p = 0;
    while (p < text.length) {
      let value = 0;
      let scale = 1;
      let more = true;
      while (more) {
        const c = text.charCodeAt(p) - 48;
        value += (c & 0x1f) * scale;
        scale *= 32;
        more = (c & 0x20) !== 0;
        p += 1;
        if (!more && (c & 0x10)) value -= scale;
      }
      if (counts.length > 2) value += counts[counts.length - 2];
      counts.push(value);
    }
    return counts;
  }

  /** Calls visit(i) for each 1 pixel of a COCO RLE {size: [h, w], counts}, i its
   * row-major index. Runs alternate 0s and 1s, starting with 0s, over the pixels in
   * column-major order. */
  function forEachMaskPixel(rle, visit) {
    const [height, width] = rle.size;
    let position = 0;
    rleCounts(rle.counts).forEach((run, n) => {
      if (n % 2 === 1) {
        for (let k = position; k < position + run; k += 1) visit((k % height) * width + Math.floor(k / height));
      }
      position += run;
    });
  }

  /** A COCO RLE as a row-major Uint8Array of 0/1 (h * w). */
  function decodeRle(rle) {
    const mask = new Uint8Array(rle.size[0] * rle.size[1]);
    forEachMaskPixel(rle, (i) => {
      mask[i] = 1;
    });
    return mask;
  }

  // ---- the API -------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** "code: detail" from the API's {"error", "detail"} body. */
  function errorMessage(status, body) {
    if (!body || typeof body.error !== "string") return `HTTP ${status}`;
    const detail = body.detail;
    let text = "";
    if (typeof detail === "string") text = detail;
    else if (Array.isArray(detail)) {
      text = detail.map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d))).join("; ");
    } else if (detail != null) text = JSON.stringify(detail);
    return text ? `${body.error}: ${text}` : body.error;
  }

  // `seen`, when given, gets the answer's Server-Timing header (its `timing`).
  async function callApi(path, init = {}, seen = {}) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = key ? { Authorization: `Bearer ${key}` } : {};
    let response;
    try {
      response = await fetch(path, { ...init, headers });
    } catch (err) {
      throw new ApiError(0, `the server did not answer (${err.message})`);
    }
    seen.timing = response.headers.get("Server-Timing");
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) throw new ApiError(response.status, errorMessage(response.status, body));
    return body;
  }

  // ---- status, errors, the key -----------------------------------------------------

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").textContent = "";
  }

  function setResultState(value) {
    $("result").dataset.state = value;
  }

  function refuse(err) {
    if (err.status === 401) {
      $("key-panel").open = true;
      $("key-state").textContent = "The server needs an API key: enter one above.";
    }
    showError(err.message);
    setStatus("");
    $("answer").replaceChildren();
    $("timing").textContent = "";
    setResultState("error");
  }

  function showKeyState() {
    const key = sessionStorage.getItem(KEY_STORAGE);
    $("key-state").textContent = key
      ? "A key is set for this tab; it is sent with every API call."
      : "Only needed when the server was started with API keys; kept in this tab only.";
  }

  // ---- models --------------------------------------------------------------------

  const selectedModel = () => state.models.find((m) => m.name === $("model").value) || null;

  async function loadModels() {
    setStatus("Loading the models…");
    let body;
    try {
      body = await callApi("/v1/models");
    } catch (err) {
      refuse(err);
      return;
    }
    clearError();
    const previous = $("model").value;
    state.models = body.models;
    $("model").replaceChildren(
      ...state.models.map((m) => new Option(`${m.name} · ${m.task}${m.demo ? " · demo" : ""}`, m.name)),
    );
    if (state.models.some((m) => m.name === previous)) $("model").value = previous;
    modelChanged(false);
    setStatus(state.models.length ? "Choose, drop or paste an image, or generate a sample scene." : "The server serves no model.");
  }

  function modelChanged(rerun = true) {
    const model = selectedModel();
    $("model-info").textContent = model
      ? `${model.task} · input ${model.input_size.join("×")} · ${model.labels} labels · ${model.engine}` +
        (model.demo ? " · demo model" : "") + (model.ready ? "" : " · loading")
      : "";
    for (const option of document.querySelectorAll(".option")) {
      option.hidden = !model || !option.dataset.for.split(" ").includes(model.task);
    }
    if (rerun) run();
  }

  // ---- images in -----------------------------------------------------------------

  function useImage(blob, name) {
    if (state.image) URL.revokeObjectURL(state.image.url);
    state.image = { blob, name, url: URL.createObjectURL(blob) };
    run();
  }

  function firstImage(files) {
    return Array.from(files || []).find((f) => f.type.startsWith("image/")) || (files && files[0]) || null;
  }

  const pick = (lo, hi) => lo + Math.random() * (hi - lo);
  const randomColour = () => [0, 1, 2].map(() => Math.floor(Math.random() * 256));
  const distance = (a, b) => Math.hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]);

  function contrasting(under) {
    let best = randomColour();
    for (let i = 0; i < 40 && distance(best, under) < 110; i += 1) {
      const colour = randomColour();
      if (distance(colour, under) > distance(best, under)) best = colour;
    }
    return best;
  }

  function drawShape(ctx, label, cx, cy, radius, angle) {
    ctx.beginPath();
    if (label === "circle") ctx.arc(cx, cy, radius, 0, 2 * Math.PI);
    else {
      const corners = label === "square" ? 4 : 3;
      for (let k = 0; k < corners; k += 1) {
        const a = angle + (2 * Math.PI * k) / corners;
        ctx.lineTo(cx + radius * Math.cos(a), cy + radius * Math.sin(a));
      }
      ctx.closePath();
    }
    ctx.fill();
  }

  /** A PNG of random circles, squares and triangles, as the demo models were trained
   * on: one centred shape for a classifier (which sees the centre crop), 1-4 for the
   * others. Drawn here, so it works with no network. */
  function sampleScene(task) {
    const width = 320;
    const height = 240;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    const base = randomColour();
    const other = base.map((v) => Math.max(0, Math.min(255, Math.round(v + pick(-90, 90)))));
    const gradient = ctx.createLinearGradient(0, 0, width * Math.random(), height);
    gradient.addColorStop(0, css(base));
    gradient.addColorStop(1, css(Math.random() < 0.5 ? base : other));
    ctx.fillStyle = gradient;
    ctx.fillRect(0, 0, width, height);
    const under = base.map((v, i) => (v + other[i]) / 2);
    const short = Math.min(width, height);
    const single = task === "classify";
    const count = single ? 1 : 1 + Math.floor(Math.random() * 4);
    const placed = [];
    for (let n = 0; n < count; n += 1) {
      const radius = short * (single ? pick(0.18, 0.34) : pick(0.09, 0.2));
      for (let attempt = 0; attempt < 30; attempt += 1) {
        const cx = single ? width / 2 + pick(-0.1, 0.1) * short : pick(radius, width - radius);
        const cy = single ? height / 2 + pick(-0.1, 0.1) * short : pick(radius, height - radius);
        if (placed.some((p) => Math.hypot(p.cx - cx, p.cy - cy) < 0.9 * (p.radius + radius))) continue;
        placed.push({ cx, cy, radius });
        ctx.fillStyle = css(contrasting(under));
        drawShape(ctx, SHAPES[Math.floor(Math.random() * 3)], cx, cy, radius, pick(0, 2 * Math.PI));
        break;
      }
    }
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  // ---- asking the model ----------------------------------------------------------

  async function run() {
    const model = selectedModel();
    if (!model || !state.image) return;
    const generation = (state.generation += 1);
    clearError();
    setResultState("busy");
    setStatus(`Asking ${model.name}…`);
    const form = new FormData();
    form.append("file", state.image.blob, state.image.name);
    const params = new URLSearchParams({ model: model.name });
    if (model.task === "classify") params.set("top_k", String(Math.max(1, Number($("top-k").value) || 1)));
    if (model.task === "detect") params.set("score_threshold", String(DETECT_FLOOR));
    const started = performance.now();
    const seen = {};
    let body;
    try {
      body = await callApi(`/${model.task}?${params}`, { method: "POST", body: form }, seen);
    } catch (err) {
      if (generation === state.generation) refuse(err);
      return;
    }
    const ms = performance.now() - started;
    if (generation !== state.generation) return; // a newer request took this one's place
    state.answer = { model, result: body.results[0], ms, stages: serverStages(seen.timing) };
    try {
      await showAnswer();
    } catch (err) {
      refuse(new ApiError(0, `could not draw the answer: ${err.message}`));
      return;
    }
    if (generation !== state.generation) return;
    setStatus("");
    setResultState("done");
  }

  // ---- drawing the answer --------------------------------------------------------

  async function loadPhoto() {
    const photo = $("photo");
    if (photo.src === state.image.url) return;
    photo.src = state.image.url;
    photo.alt = state.image.name;
    try {
      await photo.decode();
    } catch {
      photo.alt = `${state.image.name} (this browser cannot show it; the server could read it)`;
    }
  }

  function sizeStage(width, height) {
    const stage = $("stage");
    stage.style.aspectRatio = `${width} / ${height}`;
    stage.style.width = `min(100%, calc(58vh * ${width / height}))`;
  }

  /** Canvas pixels per image pixel for boxes and text: the screen's pixels where the
   * image is shown larger (1 to 4), so lines and labels stay sharp. Box coordinates
   * times this scale are canvas pixels. */
  function boxScale(width) {
    const shown = $("stage").clientWidth * (window.devicePixelRatio || 1);
    return Math.max(1, Math.min(4, Math.ceil(shown / width)));
  }

  function resetCanvas(canvas, width, height) {
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").clearRect(0, 0, width, height);
  }

  // The server's account of a request's time, its Server-Timing header: stage -> ms.
  function serverStages(header) {
    const stages = {};
    for (const entry of (header || "").split(",")) {
      const [name, ...params] = entry.trim().split(";");
      const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
      if (name && duration) stages[name] = Number(duration.slice(4));
    }
    return stages;
  }

  const STAGE_NAMES = [
    ["compute_input", "decoding"],
    ["queue", "queue"],
    ["compute_infer", "engine"],
    ["compute_output", "answer"],
  ];

  function inTheServer(stages) {
    const known = STAGE_NAMES.filter(([name]) => Number.isFinite(stages[name]));
    if (!known.length) return "";
    const parts = known.map(([name, said]) => `${said} ${stages[name].toFixed(1)}`);
    return ` (in the server: ${parts.join(", ")} ms)`;
  }

  async function showAnswer() {
    const { model, result, ms, stages } = state.answer;
    await loadPhoto();
    const width = result.width || $("photo").naturalWidth || 1;
    const height = result.height || $("photo").naturalHeight || 1;
    sizeStage(width, height);
    const scale = boxScale(width);
    resetCanvas($("overlay"), width, height);
    resetCanvas($("boxes"), width * scale, height * scale);
    $("boxes").dataset.scale = String(scale);
    $("overlay").style.opacity = $("opacity").value;
    $("result").dataset.task = model.task;
    $("result").dataset.model = model.name;
    $("timing").textContent =
      `${Math.round(ms)} ms round trip${inTheServer(stages)} · ${model.name} · ${model.engine}`;
    if (model.task === "classify") showClasses(result);
    else if (model.task === "segment") await showSegmentation(result);
    else showDetections();
  }

  function showClasses(result) {
    const list = document.createElement("ol");
    list.className = "topk";
    for (const entry of result.top_k) {
      const item = document.createElement("li");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = entry.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${(100 * entry.score).toFixed(1)}%`;
      bar.append(fill);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `${(100 * entry.score).toFixed(1)}%`;
      item.append(label, bar, score);
      list.append(item);
    }
    $("answer").replaceChildren(list);
  }

  async function decodeMaskPng(base64, width, height) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
    if (bitmap.width !== width || bitmap.height !== height) {
      throw new Error(`the mask is ${bitmap.width}×${bitmap.height}, the image ${width}×${height}`);
    }
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    return ctx.getImageData(0, 0, width, height).data; // grey value = class index
  }

  async function showSegmentation(result) {
    const { width, height } = result;
    if (result.classes.some((c) => c.index > 255)) {
      throw new Error("its mask is a 16-bit PNG (over 256 classes), which a canvas reads as 8 bits");
    }
    const grey = await decodeMaskPng(result.mask_png, width, height);
    const labels = new Map(result.classes.map((c) => [c.index, c.label]));
    const ctx = $("overlay").getContext("2d");
    const overlay = ctx.createImageData(width, height);
    for (let i = 0; i < width * height; i += 1) {
      const index = grey[4 * i];
      if (isBackground(labels.get(index) || "")) continue;
      const [r, g, b] = classColour(index);
      overlay.data.set([r, g, b, 255], 4 * i);
    }
    ctx.putImageData(overlay, 0, 0);
    const legend = document.createElement("ul");
    legend.className = "legend";
    for (const entry of [...result.classes].sort((a, b) => b.fraction - a.fraction)) {
      const colour = classColour(entry.index);
      const item = document.createElement("li");
      item.dataset.label = entry.label;
      item.dataset.colour = isBackground(entry.label) ? "" : colour.join(",");
      const swatch = document.createElement("span");
      swatch.className = isBackground(entry.label) ? "swatch none" : "swatch";
      if (!isBackground(entry.label)) swatch.style.background = css(colour);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = entry.label;
      const fraction = document.createElement("span");
      fraction.className = "score";
      fraction.textContent = `${(100 * entry.fraction).toFixed(1)}%`;
      item.append(swatch, label, fraction);
      legend.append(item);
    }
    $("answer").replaceChildren(legend);
  }

  /** The detections at or above the threshold, drawn: instance masks on the overlay
   * (under the opacity slider), boxes and their labels on the box canvas, and a table. */
  function showDetections() {
    const { result } = state.answer;
    const threshold = Number($("threshold").value);
    const shown = result.detections.filter((d) => d.score >= threshold).sort((a, b) => a.score - b.score);
    const { width, height } = result;
    const maskCtx = $("overlay").getContext("2d");
    const masks = maskCtx.createImageData(width, height);
    for (const detection of shown) {
      if (!detection.mask) continue;
      const [r, g, b] = classColour(detection.index);
      forEachMaskPixel(detection.mask, (i) => {
        masks.data[4 * i] = r;
        masks.data[4 * i + 1] = g;
        masks.data[4 * i + 2] = b;
        masks.data[4 * i + 3] = 255;
      });
    }
    maskCtx.putImageData(masks, 0, 0);
    const boxCanvas = $("boxes");
    const scale = Number(boxCanvas.dataset.scale);
    const perCssPixel = boxCanvas.width / Math.max(1, $("stage").clientWidth);
    const ctx = boxCanvas.getContext("2d");
    ctx.clearRect(0, 0, boxCanvas.width, boxCanvas.height);
    const line = Math.max(1, Math.round(2 * perCssPixel)); // about 2 and 12 CSS pixels
    const font = Math.max(8, Math.round(12 * perCssPixel));
    ctx.font = `600 ${font}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    for (const detection of shown) drawBox(ctx, detection, scale, line);
    for (const detection of shown) drawTag(ctx, detection, scale, line, font);
    $("answer").replaceChildren(detectionTable(result.detections.length, shown.reverse(), threshold));
  }

  function drawBox(ctx, detection, scale, line) {
    const [x1, y1, x2, y2] = detection.box.map((v) => Math.round(v * scale));
    ctx.fillStyle = css(classColour(detection.index));
    ctx.fillRect(x1, y1, x2 - x1, line);
    ctx.fillRect(x1, y2 - line, x2 - x1, line);
    ctx.fillRect(x1, y1, line, y2 - y1);
    ctx.fillRect(x2 - line, y1, line, y2 - y1);
  }

  /** "label score" on a tag of the box's colour, above its top-left corner (inside
   * the box when there is no room above). */
  function drawTag(ctx, detection, scale, line, font) {
    const colour = classColour(detection.index);
    const [x1, y1] = detection.box.map((v) => Math.round(v * scale));
    const text = `${detection.label} ${detection.score.toFixed(2)}`;
    const tagWidth = ctx.measureText(text).width + 2 * line;
    const tagHeight = font + line;
    const tagY = y1 - tagHeight >= 0 ? y1 - tagHeight : y1 + line;
    const tagX = Math.max(0, Math.min(x1, ctx.canvas.width - tagWidth));
    ctx.fillStyle = css(colour);
    ctx.fillRect(tagX, tagY, tagWidth, tagHeight);
    ctx.fillStyle = readableOn(colour);
    ctx.fillText(text, tagX + line, tagY + line / 2);
  }

  function detectionTable(total, shown, threshold) {
    const wrapper = document.createElement("div");
    const caption = document.createElement("p");
    caption.className = "hint";
    caption.textContent = `${shown.length} of ${total} detections at score ≥ ${threshold.toFixed(2)}`;
    const table = document.createElement("table");
    table.className = "detections";
    const head = table.createTHead().insertRow();
    for (const title of ["", "label", "score", "box (x1, y1, x2, y2)"]) {
      const cell = document.createElement("th");
      cell.textContent = title;
      head.append(cell);
    }
    const body = table.createTBody();
    for (const detection of shown) {
      const row = body.insertRow();
      const colour = classColour(detection.index);
      row.dataset.label = detection.label;
      row.dataset.box = detection.box.join(",");
      row.dataset.colour = colour.join(",");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = css(colour);
      row.insertCell().append(swatch);
      row.insertCell().textContent = detection.label;
      row.insertCell().textContent = detection.score.toFixed(3);
      row.insertCell().textContent = detection.box.map((v) => Math.round(v)).join(", ");
    }
    wrapper.append(caption, table);
    return wrapper;
  }

  // ---- wiring --------------------------------------------------------------------

  function showSliderValues() {
    $("opacity-value").textContent = `${Math.round(100 * Number($("opacity").value))}%`;
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  }

  function start() {
    $("model").addEventListener("change", () => modelChanged());
    $("file").addEventListener("change", () => {
      const file = firstImage($("file").files);
      if (file) useImage(file, file.name);
    });
    $("sample").addEventListener("click", async () => {
      const model = selectedModel();
      useImage(await sampleScene(model ? model.task : "detect"), "sample-scene.png");
    });
    const zone = $("dropzone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const file = firstImage(event.dataTransfer.files);
      if (file) useImage(file, file.name || "dropped-image");
    });
    document.addEventListener("paste", (event) => {
      const file = firstImage(event.clipboardData && event.clipboardData.files);
      if (file) useImage(file, file.name || "pasted-image.png");
    });
    $("top-k").addEventListener("change", run);
    $("opacity").addEventListener("input", () => {
      showSliderValues();
      $("overlay").style.opacity = $("opacity").value;
    });
    $("threshold").addEventListener("input", () => {
      showSliderValues();
      if (state.answer && state.answer.model.task === "detect") showDetections();
    });
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      showKeyState();
      loadModels();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      showKeyState();
    });
    showSliderValues();
    showKeyState();
    loadModels();
  }

  document.addEventListener("DOMContentLoaded", start);
  return { decodeRle, classColour };
})();
