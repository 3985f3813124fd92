// FiLo Inspect QA console: the tabs that switch between the Inspect, Review and Trends views, and the
// view named in the address (#review, #trends). What the other scripts may ask of it is window.FiloTabs.
// Loaded after lib.js and inspect.js, before the scripts of the other views.
"use strict";

(function () {
  const $ = window.FiloConsole.$;
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

  window.FiloTabs = Object.freeze({ showView, currentView, onShow });

  document.addEventListener("DOMContentLoaded", () => {
    wireTabs();
    // after the other scripts wired their views (their DOMContentLoaded handlers run in load order)
    setTimeout(() => showView(location.hash.slice(1), false), 0);
  });
})();
