// FiLo Inspect QA console: the shared library (window.FiloConsole) that every view script uses; loaded
// first, it draws no view of its own. It owns the calls to the API and what an API error means to a
// person (the page-top banner, or a box beside a view), the API and admin key fields and their storage
// for the tab, small DOM and formatting helpers, downloads, and images drawn on a canvas (the heatmap's
// jet colours).
//
// Safety rule for every console script: each text that comes from the API (category names, nouns,
// descriptions, phrases, messages) reaches the page through textContent, createElement or setAttribute
// on a non-script attribute; never through an HTML parser. The page's CSP also requires Trusted Types
// with no policy, so the browser refuses HTML strings anyway.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORE = "filo.console.apiKey";
  const ADMIN_STORE = "filo.console.adminKey";
  const THRESHOLD_SOURCES = {
    default: "server default",
    references: "calibrated from good references",
    labelled: "calibrated on labelled images",
    learned: "learned from reviews",
    manual: "set by hand",
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

  // A heatmap's opacity follows its slider (0..100), from now on and at once.
  function linkOpacity(slider, overlay) {
    const applyOpacity = () => {
      overlay.style.opacity = String(Number(slider.value) / 100);
    };
    slider.addEventListener("input", applyOpacity);
    applyOpacity();
  }

  // True when a key press belongs to a text field, a list box or a slider, not to page shortcuts.
  function isTyping(event) {
    const t = event.target;
    if (!t || !t.tagName) return false;
    if (t.isContentEditable) return true;
    return ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName) || t.getAttribute("role") === "tab";
  }

  // --- formatting ----------------------------------------------------------------------------------

  function num(value, digits) {
    if (typeof value !== "number" || !Number.isFinite(value)) return "–";
    const text = value.toFixed(digits);
    return /^-0\.?0*$/.test(text) ? text.slice(1) : text; // no "-0.000"
  }

  function sourceText(source) {
    return THRESHOLD_SOURCES[source] || "server setting";
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

  // The key in its field, kept for the tab (survives a reload).
  function keepApiKey() {
    storeKey(KEY_STORE, apiKey());
  }

  function keepAdminKey() {
    storeKey(ADMIN_STORE, adminKey());
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

  // The service's readiness as a phrase for the connection line; never throws.
  async function readiness() {
    try {
      const response = await fetch("readyz", { headers: authHeaders(false), cache: "no-store" });
      const body = await response.json();
      return body.ready ? `service ready (${body.mode})` : `service starting (${body.mode})…`;
    } catch (_) {
      return "service unreachable";
    }
  }

  // --- errors a person can act on ------------------------------------------------------------------

  // A background job (POST .../learn answers one) followed to its end: `onProgress(job)` after each look; resolves
  // with the job's result, or throws an ApiError with the job's error (a failed or lost job).
  async function followJob(job, onProgress) {
    let current = job;
    while (current.state === "running") {
      if (onProgress) onProgress(current);
      await new Promise((resolve) => setTimeout(resolve, 500));
      current = await api(`/v1/jobs/${encodeURIComponent(current.id)}`, { admin: true });
    }
    if (onProgress) onProgress(current);
    if (current.state !== "succeeded") {
      const err = current.error || { code: "job_" + current.state, message: `the job ended ${current.state}` };
      throw new ApiError(409, err.code, err.message, null);
    }
    return current.result;
  }

  // A sentence a person can act on, for an ApiError raised while doing `what` (e.g. "fabric_good.png").
  // `opts.admin`: the admin key was used; `opts.read`: reading records (a camera key may not);
  // `opts.retryIn`: the page itself tries again in that many seconds.
  function explain(err, what, opts) {
    const { admin, read, retryIn } = opts || {};
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
        if (err.code === "outside_key_limits") {
          return ["Outside this key's limits", `${msg}. This key reaches some categories and sources only.`];
        }
        if (read) return readRefused(msg);
        return ["Not allowed", admin ? `${msg}. Changing references or thresholds needs the admin key.` : `${msg}.`];
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

  // The page-top banner.
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

  // A key that may not read records (a camera key: it inspects only), said where the records would be.
  function readRefused(msg) {
    return ["This key may not read records", "A camera key inspects only. To see the inspection records, enter "
      + `a reader, reviewer or admin key in API key and press Connect. The server said: ${msg}.`];
  }

  // True for the refusal of a key whose role may not read records (not one outside a limited key's reach).
  function mayNotRead(err) {
    return Boolean(err) && err.status === 403 && err.code === "forbidden";
  }

  // An error shown next to a view or a row of buttons: elements `${prefix}`, `${prefix}-title`, ...
  // `extra.explained`: the caller's own [title, sentence] instead of the one explain gives.
  function showInlineError(prefix, err, what, extra) {
    const [title, message] = extra && extra.explained ? extra.explained : explain(err, what, extra);
    $(`${prefix}-title`).textContent = title;
    $(`${prefix}-message`).textContent = message;
    $(`${prefix}-code`).textContent = err.status ? `HTTP ${err.status} · ${err.code}` : err.code;
    $(prefix).hidden = false;
  }

  function hideInlineError(prefix) {
    $(prefix).hidden = true;
  }

  // --- downloads -----------------------------------------------------------------------------------

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

  // --- images on a canvas --------------------------------------------------------------------------

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

  // The jet colour of the 8-bit value `v` (0 blue .. 255 red) as [red, green, blue].
  function jetColour(v) {
    return [JET[3 * v], JET[3 * v + 1], JET[3 * v + 2]];
  }

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

  // A grayscale map (its red channel read as 0..255) in jet colours, as a PNG data URL.
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

  // --- start ---------------------------------------------------------------------------------------

  // The key fields as the tab left them, kept as they are typed; the banner's Dismiss button.
  function start() {
    $("api-key").value = storedKey(KEY_STORE);
    $("admin-key").value = storedKey(ADMIN_STORE);
    $("api-key").addEventListener("input", keepApiKey);
    $("admin-key").addEventListener("input", keepAdminKey);
    $("error-dismiss").addEventListener("click", hideError);
  }

  window.FiloConsole = Object.freeze({
    $, el, svgEl, clear, fact, linkOpacity, isTyping,
    num, sourceText, when, localToIso, pct,
    storedKey, storeKey, apiKey, adminKey, keepApiKey, keepAdminKey,
    api, followJob, readiness, explain, mayNotRead, showError, hideError, showInlineError, hideInlineError,
    download, jetColour, imageCanvas, colourMap,
  });

  document.addEventListener("DOMContentLoaded", start);
})();
