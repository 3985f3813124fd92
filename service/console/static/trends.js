// FiLo Inspect QA console: the Trends view. NG rate and false-alarm rate per category over time (an
// SVG drawn here with createElementNS), the counts per bucket, the filtered records and their CSV.
// Uses the shared library (lib.js) and keeps its safety rule: API text reaches the page only as text.
"use strict";

(function () {
  const C = window.FiloConsole;
  const Inspect = window.FiloInspect;
  const Tabs = window.FiloTabs;
  const $ = C.$;
  const PAGE = 50;
  const SERIES = 8; // colours series-0 .. series-7 in console.css
  const W = 560;
  const H = 220;
  const PAD = { left: 44, right: 12, top: 12, bottom: 30 };
  const COUNTS = ["inspected", "ng", "ng_rate", "reviewed", "confirmed_defects", "false_alarms", "false_rate", "misses"];

  // filters: those of the latest Show (still loading, perhaps); shown: those of the counts and records on
  // the page, which the CSV export uses (the defaults the page loaded with until a Show has drawn).
  const state = { generation: 0, cursor: null, filters: null, shown: null };

  // --- filters --------------------------------------------------------------------------------------

  function filters() {
    const out = {};
    const set = (name, value) => {
      if (value) out[name] = value;
    };
    set("category", $("trends-category").value);
    set("source", $("trends-source").value.trim());
    set("part_id", $("trends-part").value.trim());
    set("verdict", $("trends-verdict").value);
    set("reviewed", $("trends-reviewed").value);
    set("since", C.localToIso($("trends-since").value));
    set("until", C.localToIso($("trends-until").value));
    return out;
  }

  // The false-alarm rate: NG results judged good among the NG results judged at all.
  function falseRate(row) {
    const judged = row.false_alarms + row.confirmed_defects;
    return judged > 0 ? row.false_alarms / judged : null;
  }

  function ngRate(row) {
    return row.inspected > 0 ? row.ng / row.inspected : null;
  }

  // --- loading ----------------------------------------------------------------------------------------

  async function refresh() {
    const generation = ++state.generation;
    state.filters = filters();
    state.cursor = null; // the old list's next page is not one of this list's: no "Load more" until it loads
    $("records-more").hidden = true;
    const bucket = $("trends-bucket").value;
    $("trends-summary").textContent = "Loading…";
    try {
      const stats = await C.api(`v1/stats?${new URLSearchParams({ ...state.filters, bucket })}`);
      if (generation !== state.generation) return;
      state.shown = state.filters; // from here on the page shows these filters' counts and records
      drawStats(stats.items || [], bucket);
      C.clear($("records-table").tBodies[0]);
      await loadRecords(generation);
      C.hideInlineError("trends-error");
    } catch (err) {
      if (generation !== state.generation) return;
      $("trends-summary").textContent = "";
      if (C.mayNotRead(err)) denied(bucket);
      C.showInlineError("trends-error", err, "the trends", { read: true });
    }
  }

  // A key that may not read records (a camera key): no counts, charts or records of an earlier key stay shown.
  function denied(bucket) {
    drawStats([], bucket);
    C.clear($("trends-table").tBodies[0]);
    $("trends-table").tBodies[0].appendChild(emptyRow(2 + COUNTS.length, "This key may not read inspection records."));
    C.clear($("records-table").tBodies[0]);
    $("records-more").hidden = true;
    $("trends-summary").textContent = "";
  }

  async function loadRecords(generation) {
    const query = new URLSearchParams({ ...state.filters, limit: String(PAGE) });
    if (state.cursor) query.set("cursor", state.cursor);
    const page = await C.api(`v1/inspections?${query}`);
    if (generation !== state.generation) return;
    const body = $("records-table").tBodies[0];
    for (const r of page.items || []) body.appendChild(recordRow(r));
    if (!body.rows.length) body.appendChild(emptyRow(10, "No records match these filters."));
    state.cursor = page.next_cursor || null;
    $("records-more").hidden = !state.cursor;
  }

  async function moreRecords() {
    $("records-more").disabled = true;
    try {
      await loadRecords(state.generation);
      C.hideInlineError("trends-error");
    } catch (err) {
      C.showInlineError("trends-error", err, "more records", { read: true });
    }
    $("records-more").disabled = false;
  }

  // --- the counts and the charts -----------------------------------------------------------------------

  function cell(row, text, col) {
    const td = C.el("td", "", text);
    if (col) td.dataset.col = col;
    row.appendChild(td);
    return td;
  }

  function emptyRow(span, text) {
    const tr = C.el("tr");
    const td = C.el("td", "muted", text);
    td.colSpan = span;
    tr.appendChild(td);
    return tr;
  }

  function countCells(tr, c) {
    cell(tr, String(c.inspected), "inspected");
    cell(tr, String(c.ng), "ng");
    cell(tr, C.pct(c.ng, c.inspected), "ng_rate");
    cell(tr, String(c.reviewed), "reviewed");
    cell(tr, String(c.confirmed_defects), "confirmed_defects");
    cell(tr, String(c.false_alarms), "false_alarms");
    cell(tr, C.pct(c.false_alarms, c.false_alarms + c.confirmed_defects), "false_rate");
    cell(tr, String(c.misses), "misses");
  }

  function drawStats(items, bucket) {
    const table = $("trends-table");
    const body = table.tBodies[0];
    C.clear(body);
    if (table.tFoot) table.tFoot.remove();
    const categories = [...new Set(items.map((r) => r.category))].sort();
    const totals = new Map(categories.map((c) => [c, { inspected: 0, ng: 0, reviewed: 0, confirmed_defects: 0,
      false_alarms: 0, misses: 0 }]));
    const newestFirst = items.slice().sort((a, b) => (a.bucket_start < b.bucket_start ? 1 : a.bucket_start > b.bucket_start ? -1
      : a.category.localeCompare(b.category)));
    for (const r of newestFirst) {
      const tr = C.el("tr");
      tr.dataset.testid = "trends-row";
      cell(tr, C.when(r.bucket_start), "bucket");
      cell(tr, r.category, "category");
      countCells(tr, r);
      body.appendChild(tr);
      const t = totals.get(r.category);
      for (const k of Object.keys(t)) t[k] += r[k] || 0;
    }
    if (!items.length) body.appendChild(emptyRow(2 + COUNTS.length, "No inspections match these filters."));
    if (items.length) {
      const foot = table.createTFoot();
      for (const [category, t] of totals) {
        const tr = C.el("tr");
        tr.dataset.testid = "trends-total";
        cell(tr, "all shown", "bucket");
        cell(tr, category, "category");
        countCells(tr, t);
        foot.appendChild(tr);
      }
    }
    const sum = [...totals.values()].reduce((a, t) => ({ inspected: a.inspected + t.inspected, ng: a.ng + t.ng,
      reviewed: a.reviewed + t.reviewed, false_alarms: a.false_alarms + t.false_alarms }),
    { inspected: 0, ng: 0, reviewed: 0, false_alarms: 0 });
    $("trends-summary").textContent = `${sum.inspected} inspected, ${sum.ng} NG (${C.pct(sum.ng, sum.inspected)}), `
      + `${sum.reviewed} reviewed, ${sum.false_alarms} false alarms · per ${bucket}, times in UTC`;

    const colour = new Map(categories.map((c, i) => [c, i % SERIES]));
    drawChart($("chart-ng"), items, categories, colour, ngRate, bucket, (r) => `${r.ng} of ${r.inspected} NG`);
    drawChart($("chart-false"), items, categories, colour, falseRate, bucket,
      (r) => `${r.false_alarms} of ${r.false_alarms + r.confirmed_defects} reviewed NG judged good`);
    const legend = $("chart-legend");
    C.clear(legend);
    for (const c of categories) {
      const li = C.el("li");
      li.appendChild(C.el("span", `swatch series-${colour.get(c)}`));
      li.appendChild(C.el("span", "", c));
      legend.appendChild(li);
    }
  }

  function tickText(ms, bucket) {
    const iso = new Date(ms).toISOString();
    return bucket === "day" ? iso.slice(5, 10) : `${iso.slice(5, 10)} ${iso.slice(11, 13)}h`;
  }

  function drawChart(svg, items, categories, colour, rate, bucket, explainPoint) {
    C.clear(svg);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const step = bucket === "day" ? 86400000 : 3600000;
    const times = items.map((r) => Date.parse(r.bucket_start));
    const plotW = W - PAD.left - PAD.right;
    const plotH = H - PAD.top - PAD.bottom;
    let lo = Math.min(...times);
    let hi = Math.max(...times);
    if (!times.length) {
      const empty = C.svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" });
      empty.textContent = "no data";
      svg.appendChild(empty);
      return;
    }
    if (lo === hi) {
      lo -= step;
      hi += step;
    }
    const x = (ms) => PAD.left + ((ms - lo) / (hi - lo)) * plotW;
    const y = (v) => PAD.top + (1 - v) * plotH;
    for (const v of [0, 0.25, 0.5, 0.75, 1]) {
      svg.appendChild(C.svgEl("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
      const label = C.svgEl("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" });
      label.textContent = `${v * 100}%`;
      svg.appendChild(label);
    }
    const ticks = [...new Set(times)].sort((a, b) => a - b);
    const every = Math.max(1, Math.ceil(ticks.length / 6));
    ticks.forEach((ms, i) => {
      if (i % every) return;
      const label = C.svgEl("text", { x: x(ms), y: H - 10, "text-anchor": "middle", class: "axis" });
      label.textContent = tickText(ms, bucket);
      svg.appendChild(label);
    });
    categories.forEach((category, index) => {
      const nudge = (index - (categories.length - 1) / 2) * Math.min(6, 40 / categories.length); // equal rates stay visible
      const px = (ms) => x(ms) + nudge;
      const points = items.filter((r) => r.category === category && rate(r) !== null)
        .map((r) => ({ r, ms: Date.parse(r.bucket_start), v: rate(r) })).sort((a, b) => a.ms - b.ms);
      if (!points.length) return;
      const group = C.svgEl("g", { class: `series series-${colour.get(category)}`, "data-testid": "chart-series" });
      const title = C.svgEl("title");
      title.textContent = category;
      group.appendChild(title);
      if (points.length > 1) {
        group.appendChild(C.svgEl("polyline", {
          points: points.map((p) => `${px(p.ms).toFixed(1)},${y(p.v).toFixed(1)}`).join(" "),
        }));
      }
      for (const p of points) {
        const dot = C.svgEl("circle", { cx: px(p.ms).toFixed(1), cy: y(p.v).toFixed(1), r: 4, "data-testid": "chart-point" });
        const tip = C.svgEl("title");
        tip.textContent = `${category} · ${C.when(p.r.bucket_start)} UTC · ${(100 * p.v).toFixed(1)} % (${explainPoint(p.r)})`;
        dot.appendChild(tip);
        group.appendChild(dot);
      }
      svg.appendChild(group);
    });
  }

  // --- the records ------------------------------------------------------------------------------------

  function recordRow(r) {
    const tr = C.el("tr");
    tr.dataset.testid = "record-row";
    tr.dataset.id = r.id;
    const review = r.review || {};
    cell(tr, C.when(r.created_at), "time");
    cell(tr, r.category, "category");
    cell(tr, r.source || "", "source");
    cell(tr, r.part_id || "", "part_id");
    const verdict = cell(tr, "", "verdict");
    verdict.appendChild(C.el("span", `verdict small ${r.is_anomalous ? "ng" : "ok"}`, r.is_anomalous ? "NG" : "OK"));
    if (r.needs_review) verdict.appendChild(C.el("span", "tag", "borderline"));
    cell(tr, `${C.num(r.score, 3)} / ${C.num(r.threshold, 3)}`, "score");
    cell(tr, review.label || "", "review");
    cell(tr, review.defect_type || "", "defect_type");
    cell(tr, review.note || "", "note");
    cell(tr, review.reviewer || "", "reviewer");
    cell(tr, r.key_name || "", "key_name");
    cell(tr, r.id, "id").classList.add("mono");
    return tr;
  }

  async function exportRecordsCsv() {
    const button = $("trends-export");
    button.disabled = true;
    // the filters of the list shown, not the fields as they stand (edited, perhaps, without Show)
    const query = new URLSearchParams(state.shown);
    try {
      const blob = await C.api(`v1/inspections/export?${query}`, { blob: true });
      C.download(blob, `filo-records-${new Date().toISOString().replace(/[:.]/g, "-")}.csv`);
      C.hideInlineError("trends-error");
      $("trends-summary").textContent = `Exported the records of the filters shown (${Math.ceil(blob.size / 1024)} KB).`;
    } catch (err) {
      C.showInlineError("trends-error", err, "the CSV export", { read: true });
    }
    button.disabled = false;
  }

  function start() {
    Inspect.mirrorCategories($("trends-category"));
    state.shown = filters(); // the defaults the page loaded with
    $("trends-filters").addEventListener("submit", (event) => {
      event.preventDefault();
      refresh();
    });
    for (const id of ["trends-category", "trends-verdict", "trends-reviewed", "trends-bucket"]) {
      $(id).addEventListener("change", refresh);
    }
    $("trends-export").addEventListener("click", exportRecordsCsv);
    $("records-more").addEventListener("click", moreRecords);
    Tabs.onShow((view) => {
      if (view === "trends") refresh();
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
