// FiLo Inspect QA console: the Admin section's threshold controls. A threshold and review margin by
// hand, the threshold's history, "Learn from reviews" (a dry-run preview, then apply), and admin errors
// shown beside the admin buttons (the reference buttons themselves are inspect.js's). Uses the shared
// library (lib.js) and keeps its safety rule: API text reaches the page only as text.
"use strict";

(function () {
  const C = window.FiloConsole;
  const Inspect = window.FiloInspect;
  const Tabs = window.FiloTabs;
  const $ = C.$;
  const CHANGES = {
    manual: "set by hand",
    removed: "manual threshold removed",
    review_margin: "review margin changed",
    learned: "learned from reviews",
    calibrated: "calibrated",
    references: "references changed",
  };

  const state = { planFor: null, generation: 0 };

  function category() {
    return Inspect.category();
  }

  function path(name, rest) {
    return `v1/categories/${encodeURIComponent(name)}/${rest}`;
  }

  // --- errors beside the buttons ------------------------------------------------------------------------

  function hideAdminError() {
    C.hideInlineError("admin-error");
    $("admin-error-learn").hidden = true;
    $("admin-error-review").hidden = true;
  }

  // Shows the error right after the row of buttons `row` (the one that was pressed); `explained`: the
  // page's own [title, sentence] instead of the one C.explain gives.
  function showAdminError(err, what, row, explained) {
    const box = $("admin-error");
    row.after(box);
    explained = explained || C.explain(err, what, { admin: true });
    const offerLearn = err.code === "not_enough_references";
    if (offerLearn) { // the console's own way out, rather than the API's "send labelled images"
      const held = /holds (\d+)/.exec(err.message || "");
      const count = held ? Number(held[1]) : null;
      explained = ["Not enough references to calibrate",
        `Calibrating from references needs at least 2 good references; ${category()} holds `
        + `${count === null ? "fewer" : count}. Register more good images above, or judge this category's `
        + "results in the Review view and use Learn from reviews: reviewed false alarms become references and "
        + "the threshold is set on the judged results."];
    }
    C.showInlineError("admin-error", err, what, { explained });
    $("admin-error-learn").hidden = !offerLearn;
    $("admin-error-review").hidden = !offerLearn;
  }

  // --- the threshold now and its history ---------------------------------------------------------------

  function changeText(h) {
    const name = CHANGES[h.source] || h.source;
    const arrow = `${h.previous === null || h.previous === undefined ? "default" : C.num(h.previous, 3)} → `
      + `${h.threshold === null || h.threshold === undefined ? "default" : C.num(h.threshold, 3)}`;
    return [name, arrow];
  }

  async function loadThresholds() {
    const name = category();
    const generation = ++state.generation;
    const list = $("threshold-history");
    if (!name) return;
    try {
      const data = await C.api(path(name, "thresholds"));
      if (generation !== state.generation || name !== category()) return;
      const now = data.current || {};
      $("review-margin-now").textContent = typeof now.review_margin === "number" && now.review_margin > 0
        ? C.num(now.review_margin, 3) : "off";
      $("review-margin").placeholder = typeof now.review_margin === "number" ? `now ${C.num(now.review_margin, 3)}` : "0 = off";
      $("manual-threshold").placeholder = typeof now.threshold === "number" ? `now ${C.num(now.threshold, 3)}` : "keep as it is";
      C.clear(list);
      for (const h of data.history || []) {
        const item = C.el("li");
        item.dataset.testid = "threshold-change";
        const [what, arrow] = changeText(h);
        const head = C.el("span", "change-head");
        head.appendChild(C.el("strong", "", what));
        const values = C.el("span", "change-values", arrow);
        values.dataset.testid = "threshold-change-values";
        head.appendChild(values);
        item.appendChild(head);
        const detail = h.detail || {};
        const extra = [];
        if (typeof detail.review_margin === "number") extra.push(`margin ${C.num(detail.review_margin, 3)}`);
        if (typeof detail.references === "number") extra.push(`${detail.references} references`);
        if (typeof detail.f1 === "number") extra.push(`F1 ${C.num(detail.f1, 3)}`);
        const who = C.el("span", "muted", `${C.when(h.at)} UTC · by ${h.actor}${extra.length ? " · " + extra.join(", ") : ""}`);
        who.dataset.testid = "threshold-change-who";
        item.appendChild(who);
        list.appendChild(item);
      }
      if (!list.children.length) list.appendChild(C.el("li", "muted", "no changes yet: the threshold is the default or the references'"));
    } catch (err) {
      if (generation !== state.generation) return;
      C.clear(list);
      list.appendChild(C.el("li", "muted", `history unavailable: ${C.explain(err, "the history", { read: true })[1]}`));
    }
  }

  function changed() {
    Inspect.refreshCategory();
    loadThresholds();
  }

  // --- a threshold by hand --------------------------------------------------------------------------

  function readUnit(id, what) {
    const text = $(id).value.trim();
    if (text === "") return null;
    const value = Number(text);
    if (!Number.isFinite(value) || value < 0 || value > 1) throw new Error(`${what} must be a number from 0 to 1`);
    return value;
  }

  async function putThreshold(body, done) {
    const name = category();
    if (!name) return;
    try {
      const data = await C.api(path(name, "threshold"), { method: "PUT", json: body, admin: true });
      hideAdminError();
      C.hideError();
      const now = data.current || {};
      Inspect.adminStatus(`${done}: ${name} threshold ${C.num(now.threshold, 3)} (${C.sourceText(now.source)}), `
        + `review margin ${now.review_margin > 0 ? C.num(now.review_margin, 3) : "off"}.`);
      $("manual-threshold").value = "";
      $("review-margin").value = "";
      changed();
    } catch (err) {
      Inspect.adminStatus("The threshold is unchanged.");
      showAdminError(err, "setting the threshold", $("threshold-actions"));
    }
  }

  function setThreshold() {
    let threshold;
    let margin;
    try {
      threshold = readUnit("manual-threshold", "The threshold");
      margin = readUnit("review-margin", "The review margin");
    } catch (problem) {
      const err = { status: 0, code: "not sent", message: problem.message, fields: [] };
      showAdminError(err, "the threshold", $("threshold-actions"), ["Check the numbers", `${problem.message}.`]);
      return;
    }
    if (threshold === null && margin === null) {
      Inspect.adminStatus("Type a threshold, a review margin, or both.");
      return;
    }
    const body = {};
    if (threshold !== null) body.threshold = threshold;
    if (margin !== null) body.review_margin = margin;
    putThreshold(body, threshold !== null ? "Set by hand" : "Review margin set");
  }

  function clearManual() {
    const body = { threshold: null };
    putThreshold(body, "Back to automatic");
  }

  // --- learn from reviews -------------------------------------------------------------------------------

  function showPlan(plan) {
    const box = $("learn-plan");
    C.clear(box);
    box.appendChild(C.el("p", "plan-title", plan.dry_run
      ? `Preview for ${plan.category}: nothing has changed yet.`
      : `Applied to ${plan.category}.`));
    const facts = C.el("dl", "admin-facts");
    C.fact(facts, "Reviewed", String(plan.reviewed), "learn-reviewed");
    C.fact(facts, "References", `${plan.references - plan.references_added} → ${plan.references} `
      + `(${plan.references_added} false alarms ${plan.dry_run ? "would be" : ""} added)`.replace("  ", " "), "learn-references");
    const t = plan.threshold;
    C.fact(facts, "Threshold", t
      ? `${C.num(t.before, 3)} → ${C.num(t.after, 3)} (learned; F1 ${C.num(t.f1, 3)} on ${t.n_good} good and `
        + `${t.n_defective} defective, ${t.how})`
      : "unchanged", "learn-threshold");
    box.appendChild(facts);
    const suggested = plan.suggested_descriptions || [];
    box.appendChild(C.el("h4", "", "Suggested descriptions"));
    const list = C.el("ul", "suggested");
    list.dataset.testid = "learn-suggested";
    for (const text of suggested) list.appendChild(C.el("li", "", text));
    if (!suggested.length) list.appendChild(C.el("li", "muted", "none: reviewers typed no new defect types"));
    box.appendChild(list);
    if (suggested.length) {
      box.appendChild(C.el("p", "muted", "Defect types reviewers typed that the category lacks. They are not added "
        + `by themselves: add them to ${plan.category}'s descriptions (PUT /v1/categories/${plan.category}).`));
    }
    for (const note of plan.notes || []) box.appendChild(C.el("p", "muted", note));
  }

  async function learn(dryRun) {
    const name = category();
    if (!name) return;
    if (!dryRun && state.planFor !== name) return;
    $("learn-apply").disabled = true;
    Inspect.adminStatus(dryRun ? `Working out what learning would do to ${name}…` : `Learning from the ${name} reviews…`);
    try {
      const answer = await C.api(`${path(name, "learn")}${dryRun ? "?dry_run=true" : ""}`, { method: "POST", admin: true });
      // learning itself runs as a background job of the category: followed here until it is done
      const plan = dryRun ? answer : await C.followJob(answer, (job) => {
        if (job.state === "running") {
          const steps = job.total ? ` (${job.done} of ${job.total})` : "";
          Inspect.adminStatus(`Learning from the ${name} reviews: ${job.stage || "starting"}${steps}…`);
        }
      });
      if (name !== category()) return;
      hideAdminError();
      C.hideError();
      showPlan(plan);
      state.planFor = dryRun ? name : null;
      $("learn-apply").disabled = !dryRun;
      Inspect.adminStatus(dryRun ? "Preview ready: press Apply to make these changes."
        : `Learned: ${plan.category} holds ${plan.references} references`
          + (plan.threshold ? `, threshold ${C.num(plan.threshold.after, 3)} (learned from reviews).` : "."));
      if (!dryRun) changed();
    } catch (err) {
      Inspect.adminStatus("Nothing was learned.");
      $("learn-apply").disabled = state.planFor !== name;
      showAdminError(err, "learning from reviews", $("learn-actions"));
    }
  }

  function resetPlan() {
    state.planFor = null;
    $("learn-apply").disabled = true;
    C.clear($("learn-plan"));
    hideAdminError();
  }

  function start() {
    document.addEventListener("filo:admin-error", (event) => {
      showAdminError(event.detail.err, event.detail.what, $("reference-actions"));
    });
    // pressing any admin button starts afresh: the previous error goes
    $("admin").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (button && !button.closest("#admin-error")) hideAdminError();
    }, true);
    $("set-threshold").addEventListener("click", setThreshold);
    $("clear-manual-threshold").addEventListener("click", clearManual);
    $("learn-preview").addEventListener("click", () => learn(true));
    $("learn-apply").addEventListener("click", () => learn(false));
    $("admin-error-learn").addEventListener("click", () => {
      hideAdminError();
      learn(true).then(() => $("learn-plan").scrollIntoView({ block: "nearest" }));
    });
    $("admin-error-review").addEventListener("click", () => {
      const select = $("review-category");
      if (Array.from(select.options).some((o) => o.value === category())) select.value = category();
      Tabs.showView("review", true);
    });
    $("category").addEventListener("change", () => {
      resetPlan();
      loadThresholds();
    });
    $("admin").addEventListener("toggle", () => {
      if ($("admin").open) loadThresholds();
    });
    new MutationObserver(() => {
      if ($("admin").open) loadThresholds();
    }).observe($("category"), { childList: true });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
