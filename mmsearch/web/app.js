// The mmsearch web app: a search box over the HTTP API of `mmsearch serve`.
// Plain JS, no build step, no dependencies. Every text that comes from the
// server or the user goes into the page through textContent or attributes,
// never as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const el = {
    form: $("search-form"), q: $("q"), file: $("file"), k: $("k"),
    rerank: $("rerank"), rerankOption: $("rerank-option"),
    example: $("example"), exampleImg: $("example-img"), exampleClear: $("example-clear"),
    status: $("status"), spinner: $("spinner"), statusText: $("status-text"), error: $("error"),
    tokenForm: $("token-form"), token: $("token"),
    empty: $("empty"), emptyHint: $("empty-hint"), welcome: $("welcome"), welcomeInfo: $("welcome-info"),
    grid: $("grid"), texts: $("texts"),
    viewer: $("viewer"), viewerImg: $("viewer-img"), viewerPath: $("viewer-path"), viewerMeta: $("viewer-meta"),
    similar: $("similar"), original: $("original"), close: $("close"), prev: $("prev"), next: $("next"),
    drop: $("drop"),
  };

  // What is being searched for. Exactly one of query/example/similar drives a
  // search (query and example together are summed by the server).
  const state = {
    query: "",
    example: null,      // a File or Blob: search by example
    exampleUrl: null,   // its object URL, for the preview
    similar: null,      // a catalogue id: "more like this"
    similarPath: "",
    results: [],
    viewing: -1,        // index into results of the open large view
    hasReranker: false,
    maxUpload: 0,       // bytes; 0 when the server does not say
    controller: null,   // aborts the search in flight when a new one starts
  };

  // -- auth ---------------------------------------------------------------
  // With a token, the server itself keeps it in an HttpOnly cookie: opening
  // /?token=TOKEN (the link `mmsearch serve` prints) sets the cookie and
  // redirects here without it. fetch() and <img> carry the cookie, so the
  // page never handles the token; on 401 it offers to open that link.

  class AuthError extends Error {}

  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, credentials: "same-origin" });
    if (response.status === 401) {
      showTokenForm();
      throw new AuthError("this server needs its access token");
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    return response.json();
  }

  // The one-line message of an API error: {"detail": ...} or {"error": ...}, else the text.
  async function errorMessage(response) {
    let text = "";
    try { text = await response.text(); } catch (_) { /* no body */ }
    try {
      const body = JSON.parse(text);
      let msg = body.error ?? body.detail ?? body.message;
      if (msg && typeof msg === "object") msg = msg.message ?? msg.msg ?? (Array.isArray(msg) ? msg[0]?.msg : "");
      if (typeof msg === "string" && msg) text = msg;
    } catch (_) { /* not JSON */ }
    text = String(text).trim().split("\n")[0];
    return text || `the server answered ${response.status} ${response.statusText}`.trim();
  }

  function showTokenForm() {
    el.tokenForm.hidden = false;
    el.token.focus();
  }

  // -- the address: a search is a link ------------------------------------

  function fromUrl() {
    const params = new URLSearchParams(location.search);
    state.query = params.get("q") || "";
    const similar = params.get("similar");
    state.similar = similar && /^\d+$/.test(similar) ? similar : null;
    state.similarPath = "";
    clearExample();
    el.q.value = state.query;
    setTarget(params.get("texts") === "1" ? "texts" : "images");
    const rerank = params.get("rerank");
    if (rerank !== null) el.rerank.checked = rerank === "1";
    const k = params.get("k");
    if (k && /^\d+$/.test(k)) {
      if (![...el.k.options].some((o) => o.value === k)) el.k.add(new Option(k));
      el.k.value = k;
    }
  }

  function toUrl(push) {
    const params = new URLSearchParams();
    if (state.similar) params.set("similar", state.similar);
    else if (state.query && !state.example) params.set("q", state.query);
    if (target() === "texts") params.set("texts", "1");
    if (state.hasReranker && el.rerank.checked) params.set("rerank", "1");
    if (el.k.value !== "48") params.set("k", el.k.value);
    const search = params.toString();
    const url = location.pathname + (search ? `?${search}` : "");
    if (url === location.pathname + location.search) return;
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
  }

  // -- options --------------------------------------------------------------

  function target() {
    return el.form.elements.target.value === "texts" ? "texts" : "images";
  }

  function setTarget(value) {
    for (const radio of el.form.elements.target) radio.checked = radio.value === value;
  }

  // The API re-ranks text queries, and an example image only against texts
  // (image→text, without words added); the switch says when it cannot apply.
  function rerankAllowed() {
    if (!state.hasReranker || state.similar) return false;
    return !state.example || (target() === "texts" && !state.query);
  }

  function updateRerankOption() {
    const allowed = rerankAllowed();
    el.rerank.disabled = state.hasReranker && !allowed;
    el.rerankOption.classList.toggle("off", el.rerank.disabled);
    el.rerankOption.title = allowed || !state.hasReranker
      ? "Re-score the best candidates with the model's cross-attention re-ranker"
      : "Re-ranking applies to text queries, and to an example image when finding texts";
  }

  // -- searching ------------------------------------------------------------

  function hasSomething() {
    return Boolean(state.query || state.example || state.similar);
  }

  async function search({ push = true } = {}) {
    updateRerankOption();
    toUrl(push);
    document.title = state.query ? `${state.query} · mmsearch` : "mmsearch";
    if (!hasSomething()) {
      state.controller?.abort();
      setBusy(false);
      showResults([], null);
      return;
    }
    state.controller?.abort();
    const controller = new AbortController();
    state.controller = controller;
    const texts = target() === "texts";
    const k = el.k.value;
    const rerank = rerankAllowed() && el.rerank.checked ? "1" : "0";
    setBusy(true);
    hideError();
    try {
      let body;
      if (state.similar) {
        body = await api(`/api/similar/${encodeURIComponent(state.similar)}?k=${encodeURIComponent(k)}`,
          { signal: controller.signal });
      } else if (state.example) {
        const form = new FormData();
        form.append("image", state.example, state.example.name || "image");
        if (state.query) form.append("q", state.query);
        form.append("k", k);
        form.append("texts", texts ? "1" : "0");
        form.append("rerank", rerank);
        body = await api("/api/search", { method: "POST", body: form, signal: controller.signal });
      } else {
        const params = new URLSearchParams({ q: state.query, k, texts: texts ? "1" : "0", rerank });
        body = await api(`/api/search?${params}`, { signal: controller.signal });
      }
      if (controller !== state.controller) return;
      el.tokenForm.hidden = true;
      showResults(Array.isArray(body.results) ? body.results : [], body.took_ms);
    } catch (err) {
      if (err.name === "AbortError" || controller !== state.controller) return;
      // an upload the server refused is dropped; the results shown so far stay
      if (state.example && !(err instanceof AuthError)) clearExample();
      el.empty.hidden = true;
      el.welcome.hidden = true;
      showError(err instanceof Error ? err.message : String(err));
    } finally {
      if (controller === state.controller) setBusy(false);
    }
  }

  function setBusy(busy) {
    el.spinner.hidden = !busy;
    document.body.classList.toggle("busy", busy);
    el.grid.setAttribute("aria-busy", busy ? "true" : "false");
    if (busy) el.statusText.textContent = "Searching…";
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
    el.statusText.textContent = "";
  }

  function hideError() {
    el.error.hidden = true;
    el.error.textContent = "";
  }

  // -- results --------------------------------------------------------------

  function basename(path) {
    const parts = String(path || "").split(/[\\/]/);
    return parts[parts.length - 1] || String(path || "");
  }

  function score(value) {
    return typeof value === "number" ? value.toFixed(3) : "";
  }

  function describe() {
    if (state.similar) return `like ${state.similarPath ? basename(state.similarPath) : `image ${state.similar}`}`;
    if (state.example && state.query) return `for the example image + “${state.query}”`;
    if (state.example) return "for the example image";
    return `for “${state.query}”`;
  }

  function showResults(results, tookMs) {
    state.results = results;
    el.grid.replaceChildren();
    el.texts.replaceChildren();
    el.empty.hidden = true;
    el.welcome.hidden = true;
    if (!hasSomething()) {
      el.statusText.textContent = "";
      el.welcome.hidden = false;
      return;
    }
    if (results.length === 0) {
      el.statusText.textContent = "";
      el.empty.hidden = false;
      el.emptyHint.textContent = target() === "texts"
        ? "Nothing matched among the texts. Try other words, or switch to Images."
        : "Nothing matched among the images. Try other words, or switch to Texts.";
      return;
    }
    const isText = results.some((r) => typeof r.text === "string" && r.path === undefined);
    const noun = isText ? (results.length === 1 ? "text" : "texts") : (results.length === 1 ? "image" : "images");
    const took = typeof tookMs === "number" ? ` · ${Math.round(tookMs)} ms` : "";
    el.statusText.textContent = `${results.length} ${noun} ${describe()}${took}`;
    if (isText) renderTexts(results);
    else renderGrid(results);
  }

  function renderGrid(results) {
    const items = results.map((result, i) => {
      const li = document.createElement("li");
      const card = document.createElement("button");
      card.type = "button";
      card.className = "card";
      card.title = String(result.path ?? "");
      card.dataset.index = String(i);
      card.dataset.id = String(result.id);
      const frame = document.createElement("span");
      frame.className = "thumb";
      const img = document.createElement("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = basename(result.path);
      img.addEventListener("error", () => frame.classList.add("broken"), { once: true });
      img.src = result.thumb || `/api/thumb/${encodeURIComponent(result.id)}`;
      frame.append(img);
      const caption = document.createElement("span");
      caption.className = "caption";
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = basename(result.path);
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = score(result.score);
      caption.append(name, value);
      card.append(frame, caption);
      li.append(card);
      return li;
    });
    el.grid.replaceChildren(...items);
  }

  function renderTexts(results) {
    const items = results.map((result) => {
      const li = document.createElement("li");
      const value = document.createElement("span");
      value.className = "score";
      value.textContent = score(result.score);
      const body = document.createElement("span");
      body.className = "text";
      body.textContent = String(result.text ?? "");
      const id = document.createElement("span");
      id.className = "id";
      id.textContent = String(result.id ?? "");
      li.append(value, body, id);
      return li;
    });
    el.texts.replaceChildren(...items);
  }

  // -- the large view -------------------------------------------------------

  function openViewer(index) {
    const result = state.results[index];
    if (!result || result.path === undefined) return;
    state.viewing = index;
    const id = encodeURIComponent(result.id);
    // the thumbnail (cached) shows at once; the original replaces it when loaded
    el.viewerImg.src = result.thumb || `/api/thumb/${id}`;
    const full = new Image();
    full.addEventListener("load", () => {
      if (state.viewing === index) el.viewerImg.src = full.src;
    }, { once: true });
    full.src = `/api/file/${id}`;
    el.viewerImg.alt = basename(result.path);
    el.viewerPath.textContent = String(result.path);
    const dual = typeof result.dual_score === "number" ? ` (before re-ranking ${score(result.dual_score)})` : "";
    el.viewerMeta.textContent = `#${result.rank ?? index + 1} · score ${score(result.score)}${dual} · id ${result.id}`;
    el.original.href = `/api/file/${id}`;
    el.prev.disabled = index === 0;
    el.next.disabled = index === state.results.length - 1;
    if (!el.viewer.open) el.viewer.showModal();
    el.similar.focus();
  }

  function closeViewer() {
    if (el.viewer.open) el.viewer.close();
  }

  function moreLikeThis() {
    const result = state.results[state.viewing];
    if (!result) return;
    closeViewer();
    state.similar = String(result.id);
    state.similarPath = String(result.path ?? "");
    state.query = "";
    el.q.value = "";
    clearExample();
    setTarget("images");
    search();
  }

  // -- search by example ----------------------------------------------------

  function useExample(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "that file"} is not an image`);
      return;
    }
    if (state.maxUpload && file.size > state.maxUpload) {
      const mib = (n) => `${(n / 1048576).toFixed(1)} MiB`;
      showError(`${file.name || "that image"} is ${mib(file.size)}; the server takes images up to ${mib(state.maxUpload)}`);
      return;
    }
    clearExample();
    state.example = file;
    state.exampleUrl = URL.createObjectURL(file);
    el.exampleImg.src = state.exampleUrl;
    el.example.hidden = false;
    state.similar = null;
    state.query = el.q.value.trim();
    search();
  }

  function clearExample() {
    if (state.exampleUrl) URL.revokeObjectURL(state.exampleUrl);
    state.example = null;
    state.exampleUrl = null;
    el.example.hidden = true;
    el.exampleImg.removeAttribute("src");
    el.file.value = "";
  }

  function imageFrom(items) {
    for (const item of items || []) {
      const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
      if (file && (!file.type || file.type.startsWith("image/"))) return file;
    }
    return null;
  }

  // -- what the server holds: counts, model, whether it can re-rank ---------

  async function loadInfo() {
    try {
      const info = await api("/api/info");
      state.hasReranker = info.reranker === true;
      state.maxUpload = typeof info.max_upload_bytes === "number" ? info.max_upload_bytes : 0;
      el.rerankOption.hidden = !state.hasReranker;
      const parts = [];
      if (typeof info.images === "number") parts.push(`${info.images.toLocaleString()} images`);
      if (typeof info.texts === "number") parts.push(`${info.texts.toLocaleString()} texts`);
      if (info.model) parts.push(`model ${info.model}`);
      el.welcomeInfo.textContent = parts.join(" · ");
      if (info.images === 0 && info.texts === 0) {
        el.welcomeInfo.textContent = "Nothing is indexed here yet: run `mmsearch index FOLDER` (and `mmsearch add-texts FILE`), then search.";
      }
      return true;
    } catch (err) {
      showError(err.message);
      return false;
    }
  }

  // -- wiring ---------------------------------------------------------------

  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    state.query = el.q.value.trim();
    state.similar = null;
    search();
  });

  for (const radio of el.form.elements.target) {
    radio.addEventListener("change", () => {
      if (state.similar && target() === "texts") state.similar = null; // "like this image" finds images only
      state.query = el.q.value.trim();
      search();
    });
  }
  el.rerank.addEventListener("change", () => search());
  el.k.addEventListener("change", () => search());
  el.file.addEventListener("change", () => useExample(el.file.files[0]));
  el.exampleClear.addEventListener("click", () => {
    clearExample();
    state.query = el.q.value.trim();
    search();
    el.q.focus();
  });

  el.grid.addEventListener("click", (event) => {
    const card = event.target.closest(".card");
    if (card) openViewer(Number(card.dataset.index));
  });
  el.similar.addEventListener("click", moreLikeThis);
  el.close.addEventListener("click", closeViewer);
  el.prev.addEventListener("click", () => openViewer(state.viewing - 1));
  el.next.addEventListener("click", () => openViewer(state.viewing + 1));
  el.viewer.addEventListener("click", (event) => {
    if (event.target === el.viewer) closeViewer(); // a click on the backdrop
  });
  el.viewer.addEventListener("close", () => {
    const card = el.grid.querySelector(`.card[data-index="${state.viewing}"]`);
    state.viewing = -1;
    el.viewerImg.removeAttribute("src");
    card?.focus();
  });
  el.viewer.addEventListener("keydown", (event) => {
    if (event.key === "ArrowLeft" && state.viewing > 0) openViewer(state.viewing - 1);
    else if (event.key === "ArrowRight" && state.viewing < state.results.length - 1) openViewer(state.viewing + 1);
  });

  document.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement;
    if (event.key === "/" && !typing && !el.viewer.open) {
      event.preventDefault();
      el.q.focus();
      el.q.select();
    } else if (event.key === "Escape" && event.target === el.q && el.q.value === "" && state.example) {
      clearExample();
    }
  });

  document.addEventListener("paste", (event) => {
    const file = imageFrom(event.clipboardData?.files) || imageFrom(event.clipboardData?.items);
    if (file) {
      event.preventDefault();
      useExample(file);
    }
  });

  let dragDepth = 0;
  const dragsFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");
  window.addEventListener("dragenter", (event) => {
    if (!dragsFiles(event)) return;
    dragDepth += 1;
    el.drop.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) el.drop.hidden = true;
  });
  window.addEventListener("dragover", (event) => {
    if (dragsFiles(event)) event.preventDefault();
  });
  window.addEventListener("drop", (event) => {
    if (!dragsFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    el.drop.hidden = true;
    const file = imageFrom(event.dataTransfer.files);
    if (file) useExample(file);
    else showError("drop an image file (JPEG, PNG, WebP, …) to search by example");
  });

  el.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    // the server checks it, sets its cookie and redirects back to this search
    const params = new URLSearchParams(location.search);
    params.set("token", el.token.value.trim());
    location.assign(`${location.pathname}?${params}`);
  });

  window.addEventListener("popstate", () => {
    closeViewer();
    fromUrl();
    search({ push: false });
  });

  async function start() {
    fromUrl();
    if (!hasSomething()) {
      el.welcome.hidden = false;
      el.q.focus();
    }
    const ok = await loadInfo();
    if (ok && hasSomething()) search({ push: false });
    else if (ok) showResults([], null);
  }

  start();
})();
