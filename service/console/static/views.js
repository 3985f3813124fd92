// FiLo Inspect QA console: the tabs (Inspect / Review / Trends) and what the Review, Trends and Admin
// scripts share. Loaded after console.js; uses window.FiloConsole. Same safety rule as console.js:
// text from the API reaches the page only through textContent, createElement or setAttribute.
"use strict";

(function () {
  const C = window.FiloConsole;
  const $ = (id) => document.getElementById(id);
  const VIEWS = ["inspect", "review", "trends"];
  const listeners = { show: [] };

  // --- tabs: a WAI-ARIA tab list (arrow keys, Home, End; Enter or Space activates) ------------------

  function tabs() {
    return VIEWS.map((v) => $(`tab-${v}`));
  }

  function currentView() {
    const active = tabs().find((t) => t.getAttribute("aria-selected") === "true");
    return active ? active.dataset.view : "inspect";
  }

  function showView(view, focus) {
    if (!VIEWS.includes(view)) view = "inspect";
    for (const v of VIEWS) {
      const tab = $(`tab-${v}`);
      const on = v === view;
      tab.setAttribute("aria-selected", on ? "true" : "false");
      tab.tabIndex = on ? 0 : -1;
      $(`view-${v}`).hidden = !on;
    }
    if (focus) $(`tab-${view}`).focus();
    const hash = view === "inspect" ? "" : `#${view}`;
    if (location.hash !== hash) history.replaceState(null, "", location.pathname + location.search + hash);
    for (const fn of listeners.show) fn(view);
  }

  function onShow(fn) {
    listeners.show.push(fn);
  }

  function wireTabs() {
    const list = tabs();
    list.forEach((tab, i) => {
      tab.addEventListener("click", () => showView(tab.dataset.view, false));
      tab.addEventListener("keydown", (event) => {
        let next = null;
        if (event.key === "ArrowRight") next = (i + 1) % list.length;
        else if (event.key === "ArrowLeft") next = (i - 1 + list.length) % list.length;
        else if (event.key === "Home") next = 0;
        else if (event.key === "End") next = list.length - 1;
        if (next === null) return;
        event.preventDefault();
        showView(list[next].dataset.view, true);
      });
    });
    window.addEventListener("hashchange", () => showView(location.hash.slice(1), false));
  }

  // --- shared helpers -------------------------------------------------------------------------------

  // True when a key press belongs to a text field, a list box or a slider, not to page shortcuts.
  function isTyping(event) {
    const t = event.target;
    if (!t || !t.tagName) return false;
    if (t.isContentEditable) return true;
    return ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName) || t.getAttribute("role") === "tab";
  }

  // An error shown next to a view or a row of buttons: elements `${prefix}`, `${prefix}-title`, ...
  function showInlineError(prefix, err, what, extra) {
    const [title, message] = extra && extra.explained ? extra.explained : C.explain(err, what, extra);
    $(`${prefix}-title`).textContent = title;
    $(`${prefix}-message`).textContent = message;
    $(`${prefix}-code`).textContent = err.status ? `HTTP ${err.status} · ${err.code}` : err.code;
    $(prefix).hidden = false;
  }

  function hideInlineError(prefix) {
    $(prefix).hidden = true;
  }

  // Keeps a "category" <select> (first option: all categories) in step with the Inspect view's list.
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

  // "2026-12-04T10:15:02.123Z" -> "2026-12-04 10:15:02" (UTC, as the API keeps it).
  function when(iso) {
    return typeof iso === "string" ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, "") : "–";
  }

  // A datetime-local value (the person's local time) as ISO-8601 UTC, or "" when empty.
  function localToIso(value) {
    if (!value) return "";
    const date = new Date(value);
    return Number.isNaN(date.getTime()) ? "" : date.toISOString();
  }

  function pct(part, whole) {
    return whole > 0 ? `${(100 * part / whole).toFixed(1)} %` : "–";
  }

  window.FiloViews = Object.freeze({
    showView, currentView, onShow, isTyping, showInlineError, hideInlineError,
    mirrorCategories, when, localToIso, pct,
  });

  document.addEventListener("DOMContentLoaded", () => {
    wireTabs();
    // after the other scripts wired their views (their DOMContentLoaded handlers run in load order)
    setTimeout(() => showView(location.hash.slice(1), false), 0);
  });
})();
