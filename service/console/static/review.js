// FiLo Inspect QA console: the Review view. The queue of unreviewed NG results and borderline ones
// (needs_review), newest first; one-key judgements (d = defect, g = good, arrow keys move).
// Uses the shared library (lib.js) and keeps its safety rule: API text reaches the page only as text.
"use strict";

(function () {
  const C = window.FiloConsole;
  const Inspect = window.FiloInspect;
  const Tabs = window.FiloTabs;
  const $ = C.$;
  const REVIEWER_STORE = "filo.console.reviewerKey";
  const PAGE = 20;

  const state = {
    items: [], // the queue as shown, newest first
    seen: new Set(),
    selected: -1,
    streams: [],
    more: false,
    generation: 0,
    judging: false,
    urls: [], // object URLs of the item shown
    shownId: null,
    denied: false, // the API key may not read records (a camera key): said in place of the queue
  };

  // --- keys -----------------------------------------------------------------------------------------

  function reviewerKey() {
    return $("reviewer-key").value.trim();
  }

  // The key a judgement is sent with: the reviewer key, else the admin key, else the API key (which the
  // server refuses with 403 when it is a camera or reader key; the page says so). The queue is read with the
  // API key, which a camera key may not do (the view says so in place of the queue).
  function judgeKey() {
    return reviewerKey() || C.adminKey() || C.apiKey();
  }

  // --- the queue: two keyset streams merged newest first ---------------------------------------------
  // NG results nobody judged, and OK results in the review band nobody judged (disjoint by verdict).

  function newer(a, b) {
    if (a.created_at !== b.created_at) return a.created_at > b.created_at;
    return a.id > b.id;
  }

  function streamsFor(category) {
    const base = category ? { category } : {};
    return [
      { params: { ...base, verdict: "ng", reviewed: "false" }, buffer: [], cursor: null, done: false },
      { params: { ...base, verdict: "ok", needs_review: "true", reviewed: "false" }, buffer: [], cursor: null, done: false },
    ];
  }

  async function fetchPage(stream) {
    const query = new URLSearchParams({ ...stream.params, limit: String(PAGE) });
    if (stream.cursor) query.set("cursor", stream.cursor);
    const data = await C.api(`v1/inspections?${query}`);
    stream.buffer.push(...(data.items || []));
    stream.cursor = data.next_cursor || null;
    stream.done = !stream.cursor;
  }

  async function fill(n, generation) {
    let added = 0;
    while (added < n) {
      for (const s of state.streams) if (!s.buffer.length && !s.done) await fetchPage(s);
      if (generation !== state.generation) return false;
      const heads = state.streams.filter((s) => s.buffer.length);
      if (!heads.length) break;
      let best = heads[0];
      for (const s of heads) if (newer(s.buffer[0], best.buffer[0])) best = s;
      const record = best.buffer.shift();
      if (state.seen.has(record.id)) continue;
      state.seen.add(record.id);
      state.items.push(record);
      added += 1;
    }
    state.more = state.streams.some((s) => s.buffer.length || !s.done);
    return true;
  }

  async function reload() {
    const generation = ++state.generation;
    const keep = state.items[state.selected] ? state.items[state.selected].id : null;
    state.items = [];
    state.seen = new Set();
    state.streams = streamsFor($("review-category").value);
    $("review-summary").textContent = "Loading…";
    state.denied = false;
    try {
      if (!(await fill(PAGE, generation))) return;
      C.hideInlineError("review-error");
    } catch (err) {
      if (generation !== state.generation) return;
      $("review-summary").textContent = "";
      state.denied = C.mayNotRead(err);
      C.showInlineError("review-error", err, "loading the review queue", { read: true });
    }
    const again = state.items.findIndex((r) => r.id === keep);
    state.selected = again >= 0 ? again : (state.items.length ? 0 : -1);
    render();
  }

  async function loadMore() {
    const generation = state.generation;
    $("review-more").disabled = true;
    try {
      await fill(PAGE, generation);
      C.hideInlineError("review-error");
    } catch (err) {
      C.showInlineError("review-error", err, "loading more results", { read: true });
    }
    $("review-more").disabled = false;
    if (state.selected < 0 && state.items.length) state.selected = 0;
    render();
  }

  // --- drawing --------------------------------------------------------------------------------------

  function verdictBadge(r) {
    const ng = Boolean(r.is_anomalous);
    const badge = C.el("span", `verdict small ${ng ? "ng" : "ok"}`, ng ? "NG" : "OK");
    badge.dataset.testid = "review-item-verdict";
    return badge;
  }

  function render() {
    const list = $("review-queue");
    C.clear(list);
    state.items.forEach((r, i) => {
      const item = C.el("li", "review-item");
      item.setAttribute("role", "option");
      item.setAttribute("aria-selected", i === state.selected ? "true" : "false");
      item.dataset.testid = "review-item";
      item.dataset.id = r.id;
      item.appendChild(verdictBadge(r));
      const text = C.el("span", "review-item-text");
      const head = C.el("span", "review-item-head");
      head.appendChild(C.el("span", "review-item-category", r.category));
      if (r.needs_review) head.appendChild(C.el("span", "tag", "borderline"));
      text.appendChild(head);
      text.appendChild(C.el("span", "muted", `${C.num(r.score, 3)} ${r.is_anomalous ? "≥" : "<"} ${C.num(r.threshold, 3)}`
        + ` · ${r.source || "no source"}` + (r.part_id ? ` · part ${r.part_id}` : "")
        + (r.key_name ? ` · key ${r.key_name}` : "")));
      text.appendChild(C.el("span", "muted", C.when(r.created_at)));
      item.appendChild(text);
      item.addEventListener("click", () => select(i));
      list.appendChild(item);
    });
    if (!state.items.length && state.denied) {
      const denied = C.el("li", "muted review-empty", "This key may not read inspection records: enter a reader, "
        + "reviewer or admin key in API key.");
      denied.dataset.testid = "review-denied";
      list.appendChild(denied);
    } else if (!state.items.length) {
      const empty = C.el("li", "muted review-empty", "Nothing waits for review here.");
      empty.dataset.testid = "review-empty";
      list.appendChild(empty);
    }
    $("review-more").hidden = !state.more;
    const count = state.items.length;
    $("review-summary").textContent = count
      ? `${count}${state.more ? "+" : ""} waiting${$("review-category").value ? ` in ${$("review-category").value}` : ""}`
      : "";
    const badge = $("review-badge");
    badge.textContent = count ? `${count}${state.more ? "+" : ""}` : "";
    badge.hidden = !count;
    const current = list.querySelector('[aria-selected="true"]');
    if (current) current.scrollIntoView({ block: "nearest" });
    showDetail(state.items[state.selected] || null);
  }

  function select(index) {
    if (index < 0 || index >= state.items.length || index === state.selected) return;
    state.selected = index;
    render();
  }

  function forgetUrls() {
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [];
  }

  function showDetail(r) {
    const box = $("review-detail");
    if (r && state.shownId === r.id) return; // the same item: keep what was typed
    state.shownId = r ? r.id : null;
    forgetUrls();
    C.clear(box);
    if (!r) {
      box.appendChild(C.el("p", "empty", "Nothing selected."));
      return;
    }
    const head = C.el("header", "result-head");
    const verdict = C.el("span", `verdict ${r.is_anomalous ? "ng" : "ok"}`, r.is_anomalous ? "NG" : "OK");
    verdict.dataset.testid = "review-verdict";
    head.appendChild(verdict);
    const title = C.el("div", "result-title");
    const name = C.el("span", "file-name", r.category);
    name.dataset.testid = "review-category-name";
    title.appendChild(name);
    const line = C.el("span", "score-line");
    line.appendChild(document.createTextNode("score "));
    const score = C.el("strong", "score", C.num(r.score, 3));
    score.dataset.testid = "review-score";
    line.appendChild(score);
    line.appendChild(document.createTextNode(` ${r.is_anomalous ? "≥" : "<"} threshold `));
    const threshold = C.el("span", "", C.num(r.threshold, 3));
    threshold.dataset.testid = "review-threshold";
    line.appendChild(threshold);
    const refs = r.references > 0 ? `, ${r.references} references` : "";
    line.appendChild(document.createTextNode(` (${C.sourceText(r.threshold_source)}${refs})`));
    title.appendChild(line);
    if (r.needs_review) title.appendChild(C.el("span", "tag", "borderline: within the review margin"));
    head.appendChild(title);
    box.appendChild(head);

    const body = C.el("div", "result-body");
    body.appendChild(viewer(r));
    const facts = C.el("div", "facts");
    facts.appendChild(C.el("h3", "", "Top anomaly types"));
    const top = C.el("ol", "top-types plain");
    top.dataset.testid = "review-top-types";
    for (const t of r.top_types || []) {
      const item = C.el("li");
      item.appendChild(C.el("span", "type-name", t.description));
      item.appendChild(C.el("span", "type-sim", C.num(t.similarity, 3)));
      top.appendChild(item);
    }
    if (!(r.top_types || []).length) top.appendChild(C.el("li", "muted", "none recorded"));
    facts.appendChild(top);
    const meta = C.el("dl", "meta");
    C.fact(meta, "Source", r.source || "none given", "review-source");
    C.fact(meta, "Part", r.part_id || "none given", "review-part");
    C.fact(meta, "Key", r.key_name || "–", "review-key");
    C.fact(meta, "Time (UTC)", C.when(r.created_at), "review-time");
    C.fact(meta, "Boxes", String((r.boxes || []).filter((b) => b.valid).length));
    C.fact(meta, "Position", r.position || "all nine averaged");
    C.fact(meta, "Model", r.model_version || "–");
    C.fact(meta, "Request", r.id, "review-id");
    facts.appendChild(meta);
    facts.appendChild(judgementForm(r));
    body.appendChild(facts);
    box.appendChild(body);
  }

  function viewer(r) {
    const figure = C.el("figure", "viewer");
    const stage = C.el("div", "stage");
    const original = C.el("img", "original");
    original.alt = `image of ${r.id}`;
    original.dataset.testid = "review-image";
    const overlay = C.el("img", "overlay");
    overlay.alt = "anomaly heatmap";
    overlay.dataset.testid = "review-heatmap";
    overlay.hidden = true;
    stage.appendChild(original);
    stage.appendChild(overlay);
    figure.appendChild(stage);
    const caption = C.el("figcaption");
    const label = C.el("label", "", "Heatmap opacity ");
    const slider = C.el("input", "opacity");
    slider.type = "range";
    slider.min = "0";
    slider.max = "100";
    slider.value = "50";
    slider.dataset.testid = "review-opacity";
    label.appendChild(slider);
    caption.appendChild(label);
    const note = C.el("span", "heatmap-note muted");
    note.dataset.testid = "review-heatmap-note";
    caption.appendChild(note);
    figure.appendChild(caption);
    C.linkOpacity(slider, overlay);

    const id = r.id;
    const notes = [];
    const say = () => {
      note.textContent = notes.join(" · ");
    };
    if (!r.has_image) {
      stage.hidden = true;
      label.hidden = true;
      notes.push("The image was not kept (the server's FILO_RECORDS_KEEP policy), so there is nothing to show.");
      say();
      return figure;
    }
    C.api(`v1/inspections/${encodeURIComponent(id)}/image`, { blob: true }).then((blob) => {
      if (state.shownId !== id) return;
      const url = URL.createObjectURL(blob);
      state.urls.push(url);
      original.src = url;
    }, (err) => {
      if (state.shownId !== id) return;
      notes.push(`The image could not be loaded: ${C.explain(err, "the image", { read: true })[1]}`);
      say();
    });
    if (!r.has_heatmap) {
      label.hidden = true;
      notes.push("The heatmap was not kept for this result.");
      say();
      return figure;
    }
    C.api(`v1/inspections/${encodeURIComponent(id)}/heatmap`, { blob: true }).then(async (blob) => {
      if (state.shownId !== id) return;
      const url = URL.createObjectURL(blob);
      state.urls.push(url);
      // The record says which kind it kept; only records kept before it said so (heatmap_kind null) are
      // told apart by the picture itself.
      const map = r.heatmap_kind ? r.heatmap_kind === "map" : await isGrey(url);
      overlay.src = map ? await C.colourMap(url) : url;
      overlay.hidden = false;
      notes.push(map ? "jet colour map: blue low, red high" : "server-blended overlay");
      say();
    }).catch((err) => {
      if (state.shownId !== id) return;
      const fromApi = err && err.status !== undefined;
      notes.push(fromApi ? `The heatmap could not be loaded: ${C.explain(err, "the heatmap", { read: true })[1]}`
        : "The heatmap could not be decoded.");
      say();
    });
    return figure;
  }

  // For old records without heatmap_kind only: a raw 8-bit map (kept when the client asked for
  // heatmap=map) is grey; a server overlay is coloured.
  async function isGrey(url) {
    const d = (await C.imageCanvas(url, 64)).pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      if (Math.abs(d[i] - d[i + 1]) > 8 || Math.abs(d[i] - d[i + 2]) > 8) return false;
    }
    return true;
  }

  // A labelled one-line text field appended to `form` (`id` is also its test hook).
  function textField(form, label, id, maxLength, placeholder) {
    const wrap = C.el("label", "", label);
    const input = C.el("input");
    input.type = "text";
    input.maxLength = maxLength;
    input.id = id;
    input.dataset.testid = id;
    input.placeholder = placeholder;
    wrap.appendChild(input);
    form.appendChild(wrap);
    return input;
  }

  function judgementForm(r) {
    const form = C.el("div", "judgement");
    form.appendChild(C.el("h3", "", "Judgement"));
    const type = textField(form, "Defect type ", "review-defect-type", 200,
      "optional; the category's descriptions are offered");
    type.setAttribute("list", "review-types");
    const note = textField(form, "Note ", "review-note", 2000, "optional");
    for (const field of [type, note]) {
      field.addEventListener("keydown", (event) => {
        if (event.key === "Escape") { // back to the queue, where d / g / arrows work
          event.preventDefault();
          field.blur();
          $("review-queue").focus();
        }
      });
    }
    const buttons = C.el("div", "judgement-buttons");
    const defect = C.el("button", "judge-defect", "Defect (d)");
    defect.type = "button";
    defect.dataset.testid = "review-defect";
    defect.addEventListener("click", () => judge("defect"));
    const good = C.el("button", "judge-good", "Good (g)");
    good.type = "button";
    good.dataset.testid = "review-good";
    good.addEventListener("click", () => judge("good"));
    buttons.appendChild(defect);
    buttons.appendChild(good);
    form.appendChild(buttons);
    const status = C.el("p", "muted");
    status.id = "review-status";
    status.dataset.testid = "review-status";
    form.appendChild(status);
    fillTypes(r.category);
    return form;
  }

  function fillTypes(category) {
    const list = $("review-types");
    C.clear(list);
    const cat = Inspect.categories().find((c) => c.name === category);
    for (const text of (cat && cat.descriptions) || []) {
      const option = C.el("option");
      option.value = text;
      list.appendChild(option);
    }
  }

  // --- judging --------------------------------------------------------------------------------------

  function explainJudgement(err) {
    if (err.status === 403 && err.code === "outside_key_limits") {
      return ["Outside this key's limits", "This key judges some categories and sources only. The server said: "
        + `${err.message}.`];
    }
    if (err.status === 403) {
      return ["Not allowed to judge", "This key may not judge: camera keys inspect, reader keys read. Enter a "
        + "reviewer key in Reviewer key (or the admin key in Admin). The server said: " + err.message + "."];
    }
    if (err.status === 401) {
      return ["Reviewer key not accepted", `The server said: ${err.message}. Check the key in Reviewer key.`];
    }
    if (err.status === 404 && err.code === "unknown_inspection") {
      return ["This result is gone", `${err.message}. It was removed from the queue.`];
    }
    return C.explain(err, "the judgement");
  }

  async function judge(label) {
    const r = state.items[state.selected];
    if (!r || state.judging) return;
    state.judging = true;
    C.storeKey(REVIEWER_STORE, reviewerKey());
    const type = $("review-defect-type");
    const note = $("review-note");
    const body = { label };
    if (type && type.value.trim()) body.defect_type = type.value.trim();
    if (note && note.value.trim()) body.note = note.value.trim();
    const status = $("review-status");
    if (status) status.textContent = `Sending "${label}"…`;
    try {
      const done = await C.api(`v1/inspections/${encodeURIComponent(r.id)}/review`,
        { method: "POST", json: body, key: judgeKey() });
      C.hideInlineError("review-error");
      addDone(done || { ...r, review: { label, ...body } });
      leave(r.id);
    } catch (err) {
      if (status) status.textContent = "Not judged.";
      C.showInlineError("review-error", err, "the judgement", { explained: explainJudgement(err) });
      if (err.status === 404 && err.code === "unknown_inspection") leave(r.id);
    } finally {
      state.judging = false;
    }
  }

  // The judged item leaves the queue; the next one (or the one before, at the end) is selected.
  function leave(id) {
    const index = state.items.findIndex((x) => x.id === id);
    if (index < 0) return;
    state.items.splice(index, 1);
    state.selected = state.items.length ? Math.min(index, state.items.length - 1) : -1;
    render();
    if (state.items.length < 3 && state.more) loadMore();
  }

  function addDone(record) {
    const review = record.review || {};
    const item = C.el("li", "review-done-item");
    item.dataset.testid = "review-done-item";
    item.dataset.id = record.id;
    const head = C.el("span", "review-item-head");
    const label = C.el("span", `label ${review.label === "defect" ? "ng" : "ok"}`,
      review.label === "defect" ? "defect" : "good");
    label.dataset.testid = "review-done-label";
    head.appendChild(label);
    head.appendChild(C.el("span", "", `${record.category} · ${C.num(record.score, 3)}`));
    item.appendChild(head);
    const source = C.el("span", "muted", `source: ${record.source || "none"}`);
    source.dataset.testid = "review-done-source";
    item.appendChild(source);
    if (record.key_name) {
      const key = C.el("span", "muted", `key: ${record.key_name}`);
      key.dataset.testid = "review-done-key";
      item.appendChild(key);
    }
    if (review.defect_type) {
      const type = C.el("span", "", `type: ${review.defect_type}`);
      type.dataset.testid = "review-done-type";
      item.appendChild(type);
    }
    if (review.note) {
      const note = C.el("span", "", `note: ${review.note}`);
      note.dataset.testid = "review-done-note";
      item.appendChild(note);
    }
    if (review.reviewer) item.appendChild(C.el("span", "muted", `by ${review.reviewer}`));
    $("review-done").prepend(item);
  }

  // --- keys: d, g, arrows (never while typing in a field) ---------------------------------------------

  function onKey(event) {
    if (Tabs.currentView() !== "review" || event.ctrlKey || event.metaKey || event.altKey || C.isTyping(event)) return;
    const key = event.key;
    if (key === "d" || key === "D") {
      event.preventDefault();
      judge("defect");
    } else if (key === "g" || key === "G") {
      event.preventDefault();
      judge("good");
    } else if (key === "ArrowDown" || key === "ArrowRight") {
      event.preventDefault();
      select(state.selected + 1);
    } else if (key === "ArrowUp" || key === "ArrowLeft") {
      event.preventDefault();
      select(state.selected - 1);
    }
  }

  function start() {
    $("reviewer-key").value = C.storedKey(REVIEWER_STORE);
    $("reviewer-key").addEventListener("input", () => C.storeKey(REVIEWER_STORE, reviewerKey()));
    Inspect.mirrorCategories($("review-category"));
    $("review-category").addEventListener("change", reload);
    $("review-refresh").addEventListener("click", reload);
    $("review-more").addEventListener("click", loadMore);
    $("review-queue").tabIndex = 0;
    document.addEventListener("keydown", onKey);
    Tabs.onShow((view) => {
      if (view === "review") reload();
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
