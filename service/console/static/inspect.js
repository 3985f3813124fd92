// FiLo Inspect QA console: the Inspect view. Connecting with the API key and loading the categories,
// choosing images and inspecting them one by one, each result drawn (verdict, heatmap over the image,
// colour scale, boxes, top anomaly types), the history and its CSV, and the Admin section's reference
// buttons (register, calibrate, remove). What the other views may ask of it is window.FiloInspect.
// Uses the shared library, window.FiloConsole (lib.js), and its safety rule: API text reaches the page
// only as text.
"use strict";

(function () {
  const C = window.FiloConsole;
  const $ = C.$;
  const CATEGORY_STORE = "filo.console.category"; // the chosen category, for the tab (survives a reload)
  const LABELS_STORE = "filo.console.boxLabels"; // "hidden" when box labels are switched off
  const HEATMAP_MEDIA = new Set(["image/png", "image/jpeg"]);
  const STOP_BATCH = [0, 401, 403, 429, 503]; // statuses after which the rest of a batch is not sent
  const RETRYABLE = [0, 401, 403, 429, 503, 504]; // the file itself was fine: it stays chosen

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

  // --- connecting and categories -------------------------------------------------------------------

  async function connect() {
    clearTimeout(state.retryTimer);
    C.keepApiKey();
    const select = $("category");
    const ready = await C.readiness();
    try {
      const data = await C.api("v1/categories");
      C.hideError();
      fillCategories(data.categories || []);
      $("connection").textContent = `${ready} · ${state.categories.size} categories`;
    } catch (err) {
      select.disabled = true;
      if (err.status === 401 && !C.apiKey()) {
        $("connection").textContent = `${ready} · enter your API key to load the categories`;
        return;
      }
      $("connection").textContent = ready;
      if (err.status === 503) { // still loading, or no worker yet: come back by itself
        const wait = Math.min(30, Math.max(1, parseInt(err.retryAfter, 10) || 2));
        state.retryTimer = setTimeout(connect, wait * 1000);
        C.showError(err, "loading the categories", { retryIn: wait });
      } else {
        C.showError(err, "loading the categories");
      }
    }
    updateInspectButton();
  }

  function fillCategories(list) {
    const select = $("category");
    const remembered = select.value ? "" : C.storedKey(CATEGORY_STORE);
    const previous = select.value || remembered;
    state.categories.clear();
    C.clear(select);
    for (const cat of list) {
      state.categories.set(cat.name, cat);
      const option = C.el("option", "", `${cat.name} — ${cat.noun}`);
      option.value = cat.name;
      select.appendChild(option);
    }
    // the category chosen before (this page or before a reload); gone from the server: the first one
    if (state.categories.has(previous)) select.value = previous;
    if (remembered && !state.categories.has(remembered)) {
      $("progress").textContent = `The category ${remembered} chosen before is no longer on this server.`;
    }
    C.storeKey(CATEGORY_STORE, select.value);
    select.disabled = list.length === 0;
    showCategory();
  }

  function showCategory() {
    const name = $("category").value;
    const cat = state.categories.get(name);
    const list = $("descriptions");
    C.clear(list);
    if (!cat) {
      $("category-info").textContent = "";
      return;
    }
    for (const text of cat.descriptions || []) list.appendChild(C.el("li", "", text));
    for (const id of ["reference-count", "threshold", "threshold-source"]) $(id).textContent = "–";
    adminStatus("");
    renderCategoryFacts(cat);
    loadDetail(name);
  }

  function renderCategoryFacts(cat) {
    const parts = [`noun: ${cat.noun}`];
    if (typeof cat.threshold === "number") parts.push(`threshold ${C.num(cat.threshold, 3)} (${C.sourceText(cat.threshold_source)})`);
    if (typeof cat.references === "number") parts.push(`${cat.references} references`);
    $("category-info").textContent = parts.join(" · ");
    if (typeof cat.references === "number") $("reference-count").textContent = String(cat.references);
    if (typeof cat.threshold === "number") $("threshold").textContent = C.num(cat.threshold, 3);
    if (cat.threshold_source) $("threshold-source").textContent = C.sourceText(cat.threshold_source);
  }

  async function loadDetail(name) {
    try {
      const detail = await C.api(`v1/categories/${encodeURIComponent(name)}`);
      if ($("category").value === name) renderCategoryFacts(detail);
    } catch (_) {
      /* the list entry is shown already; the detail only adds threshold and references */
    }
  }

  // Keeps a "category" <select> (first option: all categories) in step with this view's list.
  function mirrorCategories(select) {
    const source = $("category");
    const copy = () => {
      const previous = select.value;
      while (select.options.length > 1) select.remove(1);
      for (const option of source.options) {
        const o = C.el("option", "", option.textContent);
        o.value = option.value;
        select.appendChild(o);
      }
      select.value = Array.from(select.options).some((o) => o.value === previous) ? previous : "";
    };
    new MutationObserver(copy).observe(source, { childList: true });
    copy();
  }

  // --- choosing images -----------------------------------------------------------------------------

  function setPending(files) {
    state.pending = Array.from(files || []);
    const list = $("pending");
    C.clear(list);
    for (const file of state.pending) list.appendChild(C.el("li", "", `${file.name} (${Math.ceil(file.size / 1024)} KB)`));
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
    C.hideError();
    const results = $("results");
    const view = clearResults(false);
    const retry = []; // files worth sending again: not sent, or refused for a reason that may pass
    let done = 0;
    let tried = 0;
    for (const file of files) {
      tried += 1;
      $("progress").textContent = `Inspecting ${done + 1} of ${files.length}: ${file.name}…`;
      try {
        const response = await C.api("v1/inspect", { method: "POST", body: inspectForm(file, category) });
        const entry = {
          id: state.nextId++, file, url: URL.createObjectURL(file), category, response,
          when: new Date(), reference: false,
        };
        state.entries.push(entry);
        if (state.view === view) results.appendChild(renderResult(entry)); // else: the pane shows another view now
        addHistory(entry);
        done += 1;
      } catch (err) {
        C.showError(err, file.name);
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
    C.clear(results);
    if (hint !== false && state.emptyResults) results.appendChild(state.emptyResults.cloneNode(true));
    state.view += 1;
    return state.view;
  }

  function renderFailure(file, err) {
    const [title, message] = C.explain(err, file.name);
    const card = C.el("article", "result failed");
    card.dataset.testid = "result-failed";
    card.appendChild(C.el("strong", "", title));
    card.appendChild(C.el("p", "", message));
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
    q("score").textContent = C.num(r.score, 3);
    card.querySelector(".versus").textContent = ng ? "≥" : "<";
    q("result-threshold").textContent = C.num(r.threshold, 3);
    const refs = typeof r.references === "number" && r.references > 0 ? `, ${r.references} references used` : "";
    q("result-threshold-source").textContent = `(${C.sourceText(r.threshold_source)}${refs})`;

    const original = q("original");
    const overlay = q("overlay");
    const slider = q("opacity");
    original.src = entry.url;
    original.alt = entry.file.name;
    C.linkOpacity(slider, overlay);
    showHeatmap(r, overlay, q("heatmap-note"));
    showLegend(r, q("legend"));
    original.addEventListener("load", () => drawBoxes(q("boxes"), r.boxes || [], original.naturalWidth, original.naturalHeight));
    if (original.complete && original.naturalWidth) drawBoxes(q("boxes"), r.boxes || [], original.naturalWidth, original.naturalHeight);

    const top = q("top-types");
    // One fixed scale for every image: the bar is the similarity on 0..1 (a full bar is 1, half is 0.5;
    // a negative cosine shows an empty bar), so bars of different images compare directly.
    for (const t of r.top_types || []) {
      const item = C.el("li");
      item.appendChild(C.el("span", "type-name", t.description));
      item.appendChild(C.el("span", "type-sim", C.num(t.similarity, 3)));
      const track = C.el("span", "type-track");
      track.dataset.testid = "type-track";
      const bar = C.el("span", "type-bar");
      bar.dataset.testid = "type-bar";
      const share = Number.isFinite(t.similarity) ? Math.min(1, Math.max(0, t.similarity)) : 0;
      bar.style.width = `${(100 * share).toFixed(2)}%`;
      track.appendChild(bar);
      item.appendChild(track);
      top.appendChild(item);
    }

    const boxList = q("box-list");
    if (!(r.boxes || []).length) boxList.appendChild(C.el("li", "muted", "none (grounding off or nothing found)"));
    const ordered = (r.boxes || []).filter((b) => b.valid).concat((r.boxes || []).filter((b) => !b.valid));
    for (const b of ordered) {
      const item = C.el("li", b.valid ? "valid" : "invalid", boxText(b));
      item.dataset.testid = "box-item";
      if (!b.valid) item.title = "not an anomaly phrase: ignored by the verdict";
      boxList.appendChild(item);
    }

    q("position").textContent = r.position || "all nine averaged";
    const t = r.timing_ms || {};
    q("timings").textContent = `queue ${C.num(t.queue_wait, 0)} ms · model ${C.num(t.model, 0)} ms · total ${C.num(t.total, 0)} ms`;
    q("model").textContent = r.model ? `${r.model.name} ${r.model.version}` : "–";
    q("request-id").textContent = r.request_id || "–";

    const pick = q("reference-pick");
    pick.checked = entry.reference;
    pick.addEventListener("change", () => {
      entry.reference = pick.checked;
    });
    return card;
  }

  // The colour scale under the heatmap: the map's jet colours over its fixed 0..1 range (the server clips
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
        strip.data.set([...C.jetColour(i), 255], 4 * i);
      }
      ctx.putImageData(strip, 0, 0);
    }
    const marker = legend.querySelector('[data-testid="legend-threshold"]');
    const caption = legend.querySelector('[data-testid="legend-caption"]');
    if (typeof r.threshold === "number" && Number.isFinite(r.threshold)) {
      marker.style.left = `${(100 * Math.min(1, Math.max(0, r.threshold))).toFixed(2)}%`;
      marker.title = `threshold ${C.num(r.threshold, 3)}`;
      caption.textContent = `pixel anomaly value on a fixed 0–1 scale; marker: threshold ${C.num(r.threshold, 3)}, `
        + "applied to the image score (mean of the text probability and the map's peak)";
    } else {
      marker.hidden = true;
      caption.textContent = "pixel anomaly value on a fixed 0–1 scale";
    }
  }

  function applyBoxLabels() {
    const shown = $("box-labels").checked;
    document.body.classList.toggle("box-labels-hidden", !shown);
    C.storeKey(LABELS_STORE, shown ? "" : "hidden");
  }

  // The heatmap to show over the original: a grayscale map coloured here, or a server-made overlay.
  function showHeatmap(r, overlay, note) {
    const heat = r.heatmap;
    if (heat && heat.base64 && HEATMAP_MEDIA.has(heat.media_type)) {
      const url = `data:${heat.media_type};base64,${heat.base64}`;
      if (heat.kind === "map") {
        C.colourMap(url).then((coloured) => {
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


  function boxText(b) {
    return `${b.phrase} ${C.num(b.confidence, 2)}`;
  }

  function shorten(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  // Boxes in original pixels on an SVG whose viewBox is the original size, so they scale with the
  // image. Valid boxes (an anomaly phrase) are labelled; the others are dashed, their text in a tooltip.
  function drawBoxes(svg, boxes, width, height) {
    C.clear(svg);
    if (!width || !height) return;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const fontSize = Math.max(8, Math.round(Math.max(width, height) / 40));
    for (const b of boxes) {
      const group = C.svgEl("g", { class: b.valid ? "box valid" : "box invalid", "data-testid": "box" });
      const title = C.svgEl("title");
      title.textContent = boxText(b) + (b.valid ? "" : " (not an anomaly phrase: ignored)");
      group.appendChild(title);
      group.appendChild(C.svgEl("rect", {
        x: b.x1, y: b.y1, width: Math.max(0, b.x2 - b.x1), height: Math.max(0, b.y2 - b.y1),
        "vector-effect": "non-scaling-stroke",
      }));
      svg.appendChild(group);
      if (b.valid) { // placed once in the page, where its laid-out size is known
        const label = C.svgEl("text", { "font-size": fontSize, "data-testid": "box-label" });
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
    const item = C.el("li");
    const button = C.el("button", "history-item");
    button.type = "button";
    button.dataset.testid = "history-item";
    button.dataset.entry = String(entry.id);
    const thumb = C.el("img", "thumb");
    thumb.src = entry.url;
    thumb.alt = "";
    button.appendChild(thumb);
    const verdict = C.el("span", `verdict small ${r.is_anomalous ? "ng" : "ok"}`, r.is_anomalous ? "NG" : "OK");
    button.appendChild(verdict);
    const text = C.el("span", "history-text");
    text.appendChild(C.el("span", "file-name", entry.file.name));
    text.appendChild(C.el("span", "muted", `${entry.category} · ${C.num(r.score, 3)}`));
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
      C.storeKey(CATEGORY_STORE, entry.category);
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

  function exportHistoryCsv() {
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
    C.download(new Blob([rows.join("\r\n") + "\r\n"], { type: "text/csv" }),
      `filo-inspections-${new Date().toISOString().replace(/[:.]/g, "-")}.csv`);
  }


  // --- admin: references and calibration ----------------------------------------------------------

  function adminStatus(text) {
    $("admin-status").textContent = text;
  }

  // Admin errors are shown beside the admin buttons (admin.js draws them), where the admin is looking,
  // not in the page-top banner, which is scrolled out of view by then.
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
    C.keepAdminKey();
    const form = new FormData();
    for (const file of files) form.append("images", file, file.name);
    adminStatus(`Registering ${files.length} images as ${category} references…`);
    try {
      const data = await C.api(`v1/categories/${encodeURIComponent(category)}/references`,
        { method: "PUT", body: form, admin: true });
      C.hideError();
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
    C.keepAdminKey();
    adminStatus(`Calibrating the ${category} threshold from its references…`);
    try {
      const data = await C.api(`v1/categories/${encodeURIComponent(category)}/calibrate`, { method: "POST", admin: true });
      C.hideError();
      $("threshold").textContent = C.num(data.threshold, 3);
      $("threshold-source").textContent = C.sourceText(data.threshold_source);
      const defective = data.n_defective ? ` and ${data.n_defective} defective` : "";
      adminStatus(`New ${data.category} threshold ${C.num(data.threshold, 3)} from ${data.n_good} good${defective} images.`);
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
    C.keepAdminKey();
    try {
      const data = await C.api(`v1/categories/${encodeURIComponent(category)}/references`,
        { method: "DELETE", admin: true });
      C.hideError();
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
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      clearTimeout(state.keyTimer);
      connect();
    });
    $("api-key").addEventListener("input", () => { // lib.js keeps the key; this connects with it
      clearTimeout(state.keyTimer);
      state.keyTimer = setTimeout(connect, 600);
    });
    $("category").addEventListener("change", () => {
      C.storeKey(CATEGORY_STORE, $("category").value);
      clearResults(); // the results shown were for the old category (the history keeps them)
      $("progress").textContent = "";
      showCategory();
      updateInspectButton();
    });
    $("box-labels").checked = C.storedKey(LABELS_STORE) !== "hidden";
    $("box-labels").addEventListener("change", applyBoxLabels);
    applyBoxLabels();
    $("inspect").addEventListener("click", inspectAll);
    $("export-csv").addEventListener("click", exportHistoryCsv);
    $("register-references").addEventListener("click", registerReferences);
    $("calibrate").addEventListener("click", calibrate);
    $("clear-references").addEventListener("click", clearReferences);
    wireDropzone();
    connect();
  }

  // What review.js, trends.js and admin.js ask of this view (they load after this file).
  window.FiloInspect = Object.freeze({
    adminStatus, mirrorCategories,
    category: () => $("category").value,
    categories: () => Array.from(state.categories.values()),
    refreshCategory: () => { if ($("category").value) loadDetail($("category").value); },
  });

  document.addEventListener("DOMContentLoaded", start);
})();
