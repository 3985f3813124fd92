// FiLo Inspect QA console. Plain JavaScript, no build step, no outside resources.
//
// Safety rule for this file: every text that comes from the API (category names, nouns,
// descriptions, phrases, messages) reaches the page through textContent, createElement or
// setAttribute on a non-script attribute; never through an HTML parser. The page's CSP also
// requires Trusted Types with no policy, so the browser refuses HTML strings anyway.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORE = "filo.console.apiKey";
  const ADMIN_STORE = "filo.console.adminKey";
  const CATEGORY_STORE = "filo.console.category"; // the chosen category, for the tab (survives a reload)
  const LABELS_STORE = "filo.console.boxLabels"; // "hidden" when box labels are switched off
  const HEATMAP_MEDIA = new Set(["image/png", "image/jpeg"]);
  const STOP_BATCH = [0, 401, 403, 429, 503]; // statuses after which the rest of a batch is not sent
  const RETRYABLE = [0, 401, 403, 429, 503, 504]; // the file itself was fine: it stays chosen
  const THRESHOLD_SOURCES = {
    default: "server default",
    references: "calibrated from good references",
    labelled: "calibrated on labelled images",
    learned: "learned from reviews",
    manual: "set by hand",
  };

  const state = {
    categories: new Map(), // name -> {name, noun, descriptions, ...}
    pending: [], // File objects chosen, not yet inspected
    entries: [], // inspected images, oldest first
    nextId: 1,
    busy: false,
    keyTimer: 0,
    retryTimer: 0,
    view: 0, // bumped whenever the results pane is cleared: a running batch stops adding cards to it
    emptyResults: null, // the pane's initial hint, shown again when it is cleared
  };

  const $ = (id) => document.getElementById(id);

  // --- small DOM helpers: text only ---------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // One name/value pair of a <dl>, as text; `testid` marks the value for the tests.
  function fact(dl, name, value, testid) {
    dl.appendChild(el("dt", "", name));
    const dd = el("dd", "", value);
    if (testid) dd.dataset.testid = testid;
    dl.appendChild(dd);
  }

  function num(value, digits) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "–";
    const text = value.toFixed(digits);
    return /^-0\.?0*$/.test(text) ? text.slice(1) : text; // no "-0.000"
  }

  function sourceText(source) {
    return THRESHOLD_SOURCES[source] || "server setting";
  }

  // --- keys ----------------------------------------------------------------------------------------

  function storedKey(store) {
    try {
      return sessionStorage.getItem(store) || "";
    } catch (_) {
      return "";
    }
  }

  function storeKey(store, value) {
    try {
      if (value) sessionStorage.setItem(store, value);
      else sessionStorage.removeItem(store);
    } catch (_) {
      /* storage disabled: the key lives in the field only */
    }
  }

  function apiKey() {
    return $("api-key").value.trim();
  }

  function adminKey() {
    return $("admin-key").value.trim();
  }

  // --- the API -------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, retryAfter, fields) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
      this.fields = fields || [];
    }
  }

  // `key`: a key of the caller's choosing (the Review view's reviewer key); otherwise the admin or API key.
  function authHeaders(admin, key) {
    const headers = { Accept: "application/json" };
    if (key === undefined) key = admin ? adminKey() : apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  // `opts.json`: a JSON body; `opts.blob`: the answer's bytes as a Blob (a kept image, a CSV export), not JSON.
  async function api(path, options) {
    const opts = options || {};
    const headers = authHeaders(opts.admin, opts.key);
    let body = opts.body;
    if (opts.json !== undefined) { // a JSON body (the review and threshold routes)
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let response;
    try {
      response = await fetch(path, { method: opts.method || "GET", headers, body, cache: "no-store" });
    } catch (_) {
      throw new ApiError(0, "unreachable", "the service did not answer", null);
    }
    if (opts.blob && response.ok) return response.blob();
    let data = null;
    const type = response.headers.get("content-type") || "";
    if (type.includes("json")) {
      try {
        data = await response.json();
      } catch (_) {
        data = null;
      }
    }
    if (!response.ok) {
      const err = (data && data.error) || {};
      const retry = response.headers.get("retry-after");
      throw new ApiError(response.status, err.code || "http_" + response.status,
        err.message || response.statusText || "no message", retry, err.fields);
    }
    return data;
  }

  // A sentence a person can act on, for an ApiError raised while doing `what` (e.g. "fabric_good.png").
  // `opts.admin`: the admin key was used; `opts.retryIn`: the page itself tries again in that many seconds.
  function explain(err, what, opts) {
    const { admin, retryIn } = opts || {};
    const msg = err.message.charAt(0).toUpperCase() + err.message.slice(1);
    const wait = retryIn ? `The page retries by itself in ${retryIn} s.`
      : err.retryAfter ? `Try again in ${err.retryAfter} s.` : "Try again in a moment.";
    switch (err.status) {
      case 0:
        return ["Cannot reach the service", `No answer from ${location.host}. Is the server running?`];
      case 401:
        return admin
          ? ["Admin key not accepted", `The server said: ${msg}. Enter the admin key in the Admin section.`]
          : ["API key not accepted", `The server said: ${msg}. Enter the API key you were given and press Connect.`];
      case 403:
        return ["Not allowed", `${msg}. Changing references or thresholds needs the admin key.`];
      case 404:
        if (err.code === "unknown_category") return ["Unknown category", msg];
        return ["Not available", `This server has no such endpoint (${msg}); it may be an older version.`];
      case 413:
        return ["Too large", `${what}: ${msg}. Send a smaller image, or fewer at once.`];
      case 415:
        return [`${what} is not an image the service can read`, `${msg}. Send a PNG, JPEG, BMP or TIFF file.`];
      case 422: {
        const fields = err.fields.map((f) => `${f.field || "request"}: ${f.message}`).join("; ");
        return [`${what} was refused`, fields || msg];
      }
      case 429:
        return ["The service is busy", `Too many images are queued right now. ${wait}`];
      case 500:
        return [`The model failed on ${what}`, `${msg}. The other images are not affected.`];
      case 503:
        return ["The service is not ready", `${msg}. ${wait}`];
      case 504:
        return ["No answer in time", `${what}: ${msg}. The service may be overloaded. ${wait}`];
      default:
        return [`Error ${err.status}`, msg];
    }
  }

  function showError(err, what, opts) {
    const [title, message] = explain(err, what, opts);
    $("error-title").textContent = title;
    $("error-message").textContent = message;
    $("error-code").textContent = err.status ? `HTTP ${err.status} · ${err.code}` : err.code;
    $("error").hidden = false;
  }

  function hideError() {
    $("error").hidden = true;
  }

  // --- readiness and categories --------------------------------------------------------------------

  async function checkReady() {
    try {
      const response = await fetch("readyz", { headers: authHeaders(false), cache: "no-store" });
      const body = await response.json();
      return body.ready ? `service ready (${body.mode})` : `service starting (${body.mode})…`;
    } catch (_) {
      return "service unreachable";
    }
  }

  async function connect() {
    clearTimeout(state.retryTimer);
    storeKey(KEY_STORE, apiKey());
    const select = $("category");
    const ready = await checkReady();
    try {
      const data = await api("v1/categories");
      hideError();
      fillCategories(data.categories || []);
      $("connection").textContent = `${ready} · ${state.categories.size} categories`;
    } catch (err) {
      select.disabled = true;
      if (err.status === 401 && !apiKey()) {
        $("connection").textContent = `${ready} · enter your API key to load the categories`;
        return;
      }
      $("connection").textContent = ready;
      if (err.status === 503) { // still loading, or no worker yet: come back by itself
        const wait = Math.min(30, Math.max(1, parseInt(err.retryAfter, 10) || 2));
        state.retryTimer = setTimeout(connect, wait * 1000);
        showError(err, "loading the categories", { retryIn: wait });
      } else {
        showError(err, "loading the categories");
      }
    }
    updateInspectButton();
  }

  function fillCategories(list) {
    const select = $("category");
    const remembered = select.value ? "" : storedKey(CATEGORY_STORE);
    const previous = select.value || remembered;
    state.categories.clear();
    clear(select);
    for (const cat of list) {
      state.categories.set(cat.name, cat);
      const option = el("option", "", `${cat.name} — ${cat.noun}`);
      option.value = cat.name;
      select.appendChild(option);
    }
    // the category chosen before (this page or before a reload); gone from the server: the first one
    if (state.categories.has(previous)) select.value = previous;
    if (remembered && !state.categories.has(remembered)) {
      $("progress").textContent = `The category ${remembered} chosen before is no longer on this server.`;
    }
    storeKey(CATEGORY_STORE, select.value);
    select.disabled = list.length === 0;
    showCategory();
  }

  function showCategory() {
    const name = $("category").value;
    const cat = state.categories.get(name);
    const list = $("descriptions");
    clear(list);
    if (!cat) {
      $("category-info").textContent = "";
      return;
    }
    for (const text of cat.descriptions || []) list.appendChild(el("li", "", text));
    for (const id of ["reference-count", "threshold", "threshold-source"]) $(id).textContent = "–";
    adminStatus("");
    renderCategoryFacts(cat);
    loadDetail(name);
  }

  function renderCategoryFacts(cat) {
    const parts = [`noun: ${cat.noun}`];
    if (typeof cat.threshold === "number") parts.push(`threshold ${num(cat.threshold, 3)} (${sourceText(cat.threshold_source)})`);
    if (typeof cat.references === "number") parts.push(`${cat.references} references`);
    $("category-info").textContent = parts.join(" · ");
    if (typeof cat.references === "number") $("reference-count").textContent = String(cat.references);
    if (typeof cat.threshold === "number") $("threshold").textContent = num(cat.threshold, 3);
    if (cat.threshold_source) $("threshold-source").textContent = sourceText(cat.threshold_source);
  }

  async function loadDetail(name) {
    try {
      const detail = await api(`v1/categories/${encodeURIComponent(name)}`);
      if ($("category").value === name) renderCategoryFacts(detail);
    } catch (_) {
      /* the list entry is shown already; the detail only adds threshold and references */
    }
  }

  // --- choosing images -----------------------------------------------------------------------------

  function setPending(files) {
    state.pending = Array.from(files || []);
    const list = $("pending");
    clear(list);
    for (const file of state.pending) list.appendChild(el("li", "", `${file.name} (${Math.ceil(file.size / 1024)} KB)`));
    updateInspectButton();
  }

  function updateInspectButton() {
    $("inspect").disabled = state.busy || state.pending.length === 0 || !$("category").value;
  }

  function wireDropzone() {
    const zone = $("dropzone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      if (event.dataTransfer && event.dataTransfer.files.length) setPending(event.dataTransfer.files);
    });
    $("files").addEventListener("change", (event) => {
      setPending(event.target.files);
      event.target.value = ""; // choosing the same file again is a new choice, not a no-op
    });
  }

  // --- inspecting ----------------------------------------------------------------------------------

  // The raw 8-bit map (coloured here, so the opacity slider blends it over the original), at most
  // 1024 px on its long side: the page scales it to the image anyway.
  function inspectForm(file, category) {
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("category", category);
    const topK = parseInt($("top-k").value, 10);
    if (Number.isFinite(topK)) form.append("top_k", String(Math.min(100, Math.max(1, topK))));
    form.append("grounding", $("grounding").checked ? "true" : "false");
    form.append("heatmap", "map");
    form.append("heatmap_size", "1024");
    return form;
  }

  async function inspectAll() {
    const category = $("category").value;
    const files = state.pending.slice();
    if (!category || files.length === 0) return;
    state.busy = true;
    updateInspectButton();
    hideError();
    const results = $("results");
    const view = clearResults(false);
    const retry = []; // files worth sending again: not sent, or refused for a reason that may pass
    let done = 0;
    let tried = 0;
    for (const file of files) {
      tried += 1;
      $("progress").textContent = `Inspecting ${done + 1} of ${files.length}: ${file.name}…`;
      try {
        const response = await api("v1/inspect", { method: "POST", body: inspectForm(file, category) });
        const entry = {
          id: state.nextId++, file, url: URL.createObjectURL(file), category, response,
          when: new Date(), reference: false,
        };
        state.entries.push(entry);
        if (state.view === view) results.appendChild(renderResult(entry)); // else: the pane shows another view now
        addHistory(entry);
        done += 1;
      } catch (err) {
        showError(err, file.name);
        if (state.view === view) results.appendChild(renderFailure(file, err));
        if (RETRYABLE.includes(err.status)) retry.push(file);
        if (STOP_BATCH.includes(err.status)) break; // the rest would fail the same way
      }
    }
    const unsent = files.slice(tried);
    // Inspected (or refused for good) files leave the list: pressing Inspect again never sends them twice.
    setPending(retry.concat(unsent));
    const kept = state.pending.length ? `; ${state.pending.length} kept to try again` : "";
    $("progress").textContent = `${done} of ${files.length} inspected${unsent.length ? `; ${unsent.length} not sent` : ""}${kept}.`;
    state.busy = false;
    updateInspectButton();
  }

  // The results pane back to its hint (`hint` false: empty, a batch fills it). Returns the new view number.
  function clearResults(hint) {
    const results = $("results");
    clear(results);
    if (hint !== false && state.emptyResults) results.appendChild(state.emptyResults.cloneNode(true));
    state.view += 1;
    return state.view;
  }

  function renderFailure(file, err) {
    const [title, message] = explain(err, file.name);
    const card = el("article", "result failed");
    card.dataset.testid = "result-failed";
    card.appendChild(el("strong", "", title));
    card.appendChild(el("p", "", message));
    return card;
  }

  // --- one result ----------------------------------------------------------------------------------

  function renderResult(entry) {
    const r = entry.response;
    const card = $("result-template").content.firstElementChild.cloneNode(true);
    const q = (testid) => card.querySelector(`[data-testid="${testid}"]`);
    card.dataset.entry = String(entry.id);
    const ng = Boolean(r.is_anomalous);
    const verdict = q("verdict");
    verdict.textContent = ng ? "NG" : "OK";
    verdict.classList.add(ng ? "ng" : "ok");
    card.classList.add(ng ? "is-ng" : "is-ok");
    q("file-name").textContent = entry.file.name;
    q("score").textContent = num(r.score, 3);
    card.querySelector(".versus").textContent = ng ? "≥" : "<";
    q("result-threshold").textContent = num(r.threshold, 3);
    const refs = typeof r.references === "number" && r.references > 0 ? `, ${r.references} references used` : "";
    q("result-threshold-source").textContent = `(${sourceText(r.threshold_source)}${refs})`;

    const original = q("original");
    const overlay = q("overlay");
    const slider = q("opacity");
    original.src = entry.url;
    original.alt = entry.file.name;
    const applyOpacity = () => {
      overlay.style.opacity = String(Number(slider.value) / 100);
    };
    slider.addEventListener("input", applyOpacity);
    applyOpacity();
    showHeatmap(r, overlay, q("heatmap-note"));
    showLegend(r, q("legend"));
    original.addEventListener("load", () => drawBoxes(q("boxes"), r.boxes || [], original.naturalWidth, original.naturalHeight));
    if (original.complete && original.naturalWidth) drawBoxes(q("boxes"), r.boxes || [], original.naturalWidth, original.naturalHeight);

    const top = q("top-types");
    // One fixed scale for every image: the bar is the similarity on 0..1 (a full bar is 1, half is 0.5;
    // a negative cosine shows an empty bar), so bars of different images compare directly.
    for (const t of r.top_types || []) {
      const item = el("li");
      item.appendChild(el("span", "type-name", t.description));
      item.appendChild(el("span", "type-sim", num(t.similarity, 3)));
      const track = el("span", "type-track");
      track.dataset.testid = "type-track";
      const bar = el("span", "type-bar");
      bar.dataset.testid = "type-bar";
      const share = Number.isFinite(t.similarity) ? Math.min(1, Math.max(0, t.similarity)) : 0;
      bar.style.width = `${(100 * share).toFixed(2)}%`;
      track.appendChild(bar);
      item.appendChild(track);
      top.appendChild(item);
    }

    const boxList = q("box-list");
    if (!(r.boxes || []).length) boxList.appendChild(el("li", "muted", "none (grounding off or nothing found)"));
    const ordered = (r.boxes || []).filter((b) => b.valid).concat((r.boxes || []).filter((b) => !b.valid));
    for (const b of ordered) {
      const item = el("li", b.valid ? "valid" : "invalid", boxText(b));
      item.dataset.testid = "box-item";
      if (!b.valid) item.title = "not an anomaly phrase: ignored by the verdict";
      boxList.appendChild(item);
    }

    q("position").textContent = r.position || "all nine averaged";
    const t = r.timing_ms || {};
    q("timings").textContent = `queue ${num(t.queue_wait, 0)} ms · model ${num(t.model, 0)} ms · total ${num(t.total, 0)} ms`;
    q("model").textContent = r.model ? `${r.model.name} ${r.model.version}` : "–";
    q("request-id").textContent = r.request_id || "–";

    const pick = q("reference-pick");
    pick.checked = entry.reference;
    pick.addEventListener("change", () => {
      entry.reference = pick.checked;
    });
    return card;
  }

  // The colour scale under the heatmap: the map's JET colours over its fixed 0..1 range (the server clips
  // every pixel's anomaly value to [0, 1]; the map is not rescaled per image), and where the category's
  // threshold falls on that range. The threshold is compared with the image score, (text probability of
  // "abnormal" + the map's peak) / 2, on the same 0..1 range, not with single pixels.
  function showLegend(r, legend) {
    if (!r.heatmap || !r.heatmap.base64) {
      legend.hidden = true;
      return;
    }
    const canvas = legend.querySelector('[data-testid="legend-bar"]');
    const ctx = canvas.getContext("2d");
    if (ctx) {
      const strip = ctx.createImageData(256, 1);
      for (let i = 0; i < 256; i++) {
        strip.data.set([JET[3 * i], JET[3 * i + 1], JET[3 * i + 2], 255], 4 * i);
      }
      ctx.putImageData(strip, 0, 0);
    }
    const marker = legend.querySelector('[data-testid="legend-threshold"]');
    const caption = legend.querySelector('[data-testid="legend-caption"]');
    if (typeof r.threshold === "number" && Number.isFinite(r.threshold)) {
      marker.style.left = `${(100 * Math.min(1, Math.max(0, r.threshold))).toFixed(2)}%`;
      marker.title = `threshold ${num(r.threshold, 3)}`;
      caption.textContent = `pixel anomaly value on a fixed 0–1 scale; marker: threshold ${num(r.threshold, 3)}, `
        + "applied to the image score (mean of the text probability and the map's peak)";
    } else {
      marker.hidden = true;
      caption.textContent = "pixel anomaly value on a fixed 0–1 scale";
    }
  }

  function applyBoxLabels() {
    const shown = $("box-labels").checked;
    document.body.classList.toggle("box-labels-hidden", !shown);
    storeKey(LABELS_STORE, shown ? "" : "hidden");
  }

  // The heatmap to show over the original: a grayscale map coloured here, or a server-made overlay.
  function showHeatmap(r, overlay, note) {
    const heat = r.heatmap;
    if (heat && heat.base64 && HEATMAP_MEDIA.has(heat.media_type)) {
      const url = `data:${heat.media_type};base64,${heat.base64}`;
      if (heat.kind === "map") {
        colourMap(url).then((coloured) => {
          overlay.src = coloured;
        }, () => {
          note.textContent = "the heatmap could not be decoded";
        });
        note.textContent = "jet colour map: blue low, red high";
      } else {
        overlay.src = url;
        note.textContent = "server-blended overlay";
      }
    } else {
      overlay.hidden = true;
      note.textContent = "no heatmap in this answer";
    }
  }

  const JET = (() => {
    const lut = new Uint8ClampedArray(256 * 3);
    const ramp = (x) => Math.min(1, Math.max(0, x));
    for (let i = 0; i < 256; i++) {
      const v = i / 255;
      lut[3 * i] = 255 * ramp(1.5 - Math.abs(4 * v - 3));
      lut[3 * i + 1] = 255 * ramp(1.5 - Math.abs(4 * v - 2));
      lut[3 * i + 2] = 255 * ramp(1.5 - Math.abs(4 * v - 1));
    }
    return lut;
  })();

  // The image at `url` drawn on a canvas (scaled down to at most `maxSide` pixels a side when given).
  function imageCanvas(url, maxSide) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const canvas = document.createElement("canvas");
        canvas.width = maxSide ? Math.min(maxSide, img.naturalWidth) : img.naturalWidth;
        canvas.height = maxSide ? Math.min(maxSide, img.naturalHeight) : img.naturalHeight;
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
        resolve({ canvas, ctx, pixels: ctx.getImageData(0, 0, canvas.width, canvas.height) });
      };
      img.onerror = reject;
      img.src = url;
    });
  }

  async function colourMap(url) {
    const { canvas, ctx, pixels } = await imageCanvas(url);
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i];
      d[i] = JET[3 * v];
      d[i + 1] = JET[3 * v + 1];
      d[i + 2] = JET[3 * v + 2];
      d[i + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    return canvas.toDataURL("image/png");
  }

  function boxText(b) {
    return `${b.phrase} ${num(b.confidence, 2)}`;
  }

  function shorten(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  // Boxes in original pixels on an SVG whose viewBox is the original size, so they scale with the
  // image. Valid boxes (an anomaly phrase) are labelled; the others are dashed, their text in a tooltip.
  function drawBoxes(svg, boxes, width, height) {
    clear(svg);
    if (!width || !height) return;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const fontSize = Math.max(8, Math.round(Math.max(width, height) / 40));
    for (const b of boxes) {
      const group = svgEl("g", { class: b.valid ? "box valid" : "box invalid", "data-testid": "box" });
      const title = svgEl("title");
      title.textContent = boxText(b) + (b.valid ? "" : " (not an anomaly phrase: ignored)");
      group.appendChild(title);
      group.appendChild(svgEl("rect", {
        x: b.x1, y: b.y1, width: Math.max(0, b.x2 - b.x1), height: Math.max(0, b.y2 - b.y1),
        "vector-effect": "non-scaling-stroke",
      }));
      svg.appendChild(group);
      if (b.valid) { // placed once in the page, where its laid-out size is known
        const label = svgEl("text", { "font-size": fontSize, "data-testid": "box-label" });
        label.textContent = shorten(boxText(b), 28);
        group.appendChild(label);
        placeLabel(label, b, fontSize, width, height);
      }
    }
  }

  // Above the box when there is room, else just inside its top; always wholly inside the image: moved
  // left from the right edge, up from the bottom, and squeezed when wider than the image itself.
  function placeLabel(label, b, fontSize, width, height) {
    const pad = 2;
    let length = 0;
    try {
      length = label.getComputedTextLength(); // user units (original pixels), once laid out
    } catch (_) {
      length = 0;
    }
    if (!(length > 0)) length = label.textContent.length * fontSize * 0.62; // not rendered yet: bold estimate
    const room = width - 2 * pad;
    if (length > room) {
      label.setAttribute("textLength", String(Math.max(1, room)));
      label.setAttribute("lengthAdjust", "spacingAndGlyphs");
      length = room;
    }
    const x = Math.min(Math.max(pad, b.x1 + pad), width - pad - length);
    const ascent = fontSize;
    const descent = fontSize * 0.3;
    let y = b.y1 > ascent + 4 ? b.y1 - 4 : b.y1 + ascent;
    y = Math.min(Math.max(ascent, y), height - descent);
    label.setAttribute("x", x.toFixed(1));
    label.setAttribute("y", y.toFixed(1));
    let box = null;
    try {
      box = label.getBBox(); // the laid-out glyph box: corrects the font's real ascent and descent
    } catch (_) {
      box = null;
    }
    if (box && box.width > 0 && box.height > 0) {
      const dx = Math.max(0, -box.x) - Math.max(0, box.x + box.width - width);
      const dy = Math.max(0, -box.y) - Math.max(0, box.y + box.height - height);
      if (dx) label.setAttribute("x", (x + dx).toFixed(1));
      if (dy) label.setAttribute("y", (y + dy).toFixed(1));
    }
  }

  // --- history -------------------------------------------------------------------------------------

  function addHistory(entry) {
    const r = entry.response;
    const item = el("li");
    const button = el("button", "history-item");
    button.type = "button";
    button.dataset.testid = "history-item";
    button.dataset.entry = String(entry.id);
    const thumb = el("img", "thumb");
    thumb.src = entry.url;
    thumb.alt = "";
    button.appendChild(thumb);
    const verdict = el("span", `verdict small ${r.is_anomalous ? "ng" : "ok"}`, r.is_anomalous ? "NG" : "OK");
    button.appendChild(verdict);
    const text = el("span", "history-text");
    text.appendChild(el("span", "file-name", entry.file.name));
    text.appendChild(el("span", "muted", `${entry.category} · ${num(r.score, 3)}`));
    button.appendChild(text);
    button.addEventListener("click", () => reopen(entry));
    item.appendChild(button);
    $("history").prepend(item);
    $("export-csv").disabled = false;
  }

  function reopen(entry) {
    const select = $("category");
    if (select.value !== entry.category && state.categories.has(entry.category)) {
      select.value = entry.category; // the entry's category, with its descriptions and threshold
      storeKey(CATEGORY_STORE, entry.category);
      showCategory();
      updateInspectButton();
    }
    const results = $("results");
    clearResults(false);
    results.appendChild(renderResult(entry));
    results.scrollIntoView({ block: "start" });
  }

  // A CSV cell: quoted, and a leading = + - @ neutralised so a spreadsheet never runs it as a formula.
  function csvCell(value) {
    let text = value === null || value === undefined ? "" : String(value);
    if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = "'" + text;
    return `"${text.replace(/"/g, '""')}"`;
  }

  function exportCsv() {
    const header = ["time", "file", "category", "verdict", "score", "threshold", "threshold_source", "references",
      "position", "top_type", "top_similarity", "valid_boxes", "total_ms", "request_id", "model_version"];
    const rows = [header.map(csvCell).join(",")];
    for (const e of state.entries) {
      const r = e.response;
      const top = (r.top_types || [])[0] || {};
      rows.push([
        e.when.toISOString(), e.file.name, e.category, r.is_anomalous ? "NG" : "OK", r.score, r.threshold,
        r.threshold_source || "", typeof r.references === "number" ? r.references : "", r.position || "",
        top.description || "", typeof top.similarity === "number" ? top.similarity : "",
        (r.boxes || []).filter((b) => b.valid).length, r.timing_ms ? Math.round(r.timing_ms.total) : "",
        r.request_id || "", r.model ? r.model.version : "",
      ].map(csvCell).join(","));
    }
    download(new Blob([rows.join("\r\n") + "\r\n"], { type: "text/csv" }),
      `filo-inspections-${new Date().toISOString().replace(/[:.]/g, "-")}.csv`);
  }

  // A browser download of `blob` named `name` (a Blob URL: nothing leaves the page).
  function download(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = el("a");
    link.href = url;
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  // --- admin: references and calibration ----------------------------------------------------------

  function adminStatus(text) {
    $("admin-status").textContent = text;
  }

  // An admin error: in the banner as before, and beside the admin buttons (admin.js draws it there).
  // Admin errors are shown beside the admin buttons (admin.js), where the admin is looking, not in the
  // page-top banner, which is scrolled out of view by then.
  function adminError(err, what) {
    document.dispatchEvent(new CustomEvent("filo:admin-error", { detail: { err, what } }));
  }

  async function registerReferences() {
    const category = $("category").value;
    if (!category) return;
    const picked = state.entries.filter((e) => e.reference && e.category === category).map((e) => e.file);
    const files = picked.concat(Array.from($("reference-files").files || []));
    if (files.length === 0) {
      adminStatus(`Tick "good reference" on inspected ${category} images, or choose good images above.`);
      return;
    }
    storeKey(ADMIN_STORE, adminKey());
    const form = new FormData();
    for (const file of files) form.append("images", file, file.name);
    adminStatus(`Registering ${files.length} images as ${category} references…`);
    try {
      const data = await api(`v1/categories/${encodeURIComponent(category)}/references`,
        { method: "PUT", body: form, admin: true });
      hideError();
      $("reference-count").textContent = String(data.references);
      const memory = typeof data.memory_bytes === "number" ? `, ${(data.memory_bytes / 1048576).toFixed(1)} MB of features` : "";
      adminStatus(`Registered ${files.length} images: ${data.category} now holds ${data.references} references${memory}.`);
      $("reference-files").value = ""; // registered once: pressing again must not add them twice
      for (const e of state.entries) e.reference = false;
      for (const box of document.querySelectorAll('[data-testid="reference-pick"]')) box.checked = false;
      loadDetail(category);
    } catch (err) {
      adminStatus("Nothing was registered.");
      adminError(err, "registering references");
    }
  }

  async function calibrate() {
    const category = $("category").value;
    if (!category) return;
    storeKey(ADMIN_STORE, adminKey());
    adminStatus(`Calibrating the ${category} threshold from its references…`);
    try {
      const data = await api(`v1/categories/${encodeURIComponent(category)}/calibrate`, { method: "POST", admin: true });
      hideError();
      $("threshold").textContent = num(data.threshold, 3);
      $("threshold-source").textContent = sourceText(data.threshold_source);
      const defective = data.n_defective ? ` and ${data.n_defective} defective` : "";
      adminStatus(`New ${data.category} threshold ${num(data.threshold, 3)} from ${data.n_good} good${defective} images.`);
      loadDetail(category);
    } catch (err) {
      adminStatus("The threshold is unchanged.");
      adminError(err, "calibrating");
    }
  }

  // Removing every reference takes two clicks within 5 s (no modal dialog to block the page).
  async function clearReferences() {
    const category = $("category").value;
    const button = $("clear-references");
    if (!category) return;
    if (button.dataset.armed !== category) {
      button.dataset.armed = category;
      button.textContent = `Click again to remove all ${category} references`;
      setTimeout(() => {
        delete button.dataset.armed;
        button.textContent = "Remove all references";
      }, 5000);
      return;
    }
    delete button.dataset.armed;
    button.textContent = "Remove all references";
    storeKey(ADMIN_STORE, adminKey());
    try {
      const data = await api(`v1/categories/${encodeURIComponent(category)}/references`,
        { method: "DELETE", admin: true });
      hideError();
      $("reference-count").textContent = String(data.references);
      adminStatus(`Removed the references: ${data.category} is zero-shot again.`);
      loadDetail(category);
    } catch (err) {
      adminStatus("The references are unchanged.");
      adminError(err, "removing references");
    }
  }

  // --- start ---------------------------------------------------------------------------------------

  function start() {
    state.emptyResults = $("results").querySelector('[data-testid="results-empty"]');
    $("api-key").value = storedKey(KEY_STORE);
    $("admin-key").value = storedKey(ADMIN_STORE);
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      clearTimeout(state.keyTimer);
      connect();
    });
    $("api-key").addEventListener("input", () => {
      storeKey(KEY_STORE, apiKey());
      clearTimeout(state.keyTimer);
      state.keyTimer = setTimeout(connect, 600);
    });
    $("admin-key").addEventListener("input", () => storeKey(ADMIN_STORE, adminKey()));
    $("category").addEventListener("change", () => {
      storeKey(CATEGORY_STORE, $("category").value);
      clearResults(); // the results shown were for the old category (the history keeps them)
      $("progress").textContent = "";
      showCategory();
      updateInspectButton();
    });
    $("box-labels").checked = storedKey(LABELS_STORE) !== "hidden";
    $("box-labels").addEventListener("change", applyBoxLabels);
    applyBoxLabels();
    $("error-dismiss").addEventListener("click", hideError);
    $("inspect").addEventListener("click", inspectAll);
    $("export-csv").addEventListener("click", exportCsv);
    $("register-references").addEventListener("click", registerReferences);
    $("calibrate").addEventListener("click", calibrate);
    $("clear-references").addEventListener("click", clearReferences);
    wireDropzone();
    connect();
  }

  // What review.js, trends.js and admin.js use (loaded after this file; same safety rule).
  window.FiloConsole = Object.freeze({
    api, authHeaders, explain, showError, hideError, el, svgEl, clear, fact, num, download, sourceText,
    colourMap, imageCanvas,
    storedKey, storeKey, apiKey, adminKey, adminStatus,
    category: () => $("category").value,
    categories: () => Array.from(state.categories.values()),
    refreshCategory: () => { if ($("category").value) loadDetail($("category").value); },
  });

  document.addEventListener("DOMContentLoaded", start);
})();
