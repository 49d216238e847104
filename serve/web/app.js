// The motiondirector web page: catalog grid, entry page, generate form. Talks to the /v1 API only.
"use strict";

const PAGE_SIZE = 12;
const state = { offset: 0, total: 0, motions: [], appearance: null, polling: null, objectUrls: [] };
const $ = (id) => document.getElementById(id);

function token() { return localStorage.getItem("md-token") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path.replace(/^\//, ""), Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = response.statusText;
    try { const body = await response.json(); detail = body.detail + (body.field ? " (" + body.field + ")" : ""); } catch (e) { /* not JSON */ }
    const error = new Error(response.status + ": " + detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

async function json(path, options) { return (await api(path, options)).json(); }

// Media behind auth cannot use a plain src: fetch it with the token and show an object URL.
async function mediaUrl(path) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  state.objectUrls.push(url);
  return url;
}

function el(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function kindLabel(kind) { return kind === "temporal" ? "motion" : "appearance"; }

// ---- catalog grid ----------------------------------------------------------------------------

function filterQuery() {
  const params = new URLSearchParams();
  const pairs = [["text", $("f-text").value], ["kind", $("f-kind").value], ["concept", $("f-concept").value],
                 ["tag", $("f-tag").value], ["sort", $("f-sort").value]];
  for (const [key, value] of pairs) if (value.trim()) params.set(key, value.trim());
  params.set("limit", PAGE_SIZE);
  params.set("offset", state.offset);
  return params.toString();
}

async function loadGrid() {
  const grid = $("grid");
  $("catalog-status").textContent = "Loading…";
  let page;
  try {
    page = await json("v1/loras?" + filterQuery());
  } catch (error) {
    $("catalog-status").textContent = "Could not load the catalog: " + error.message;
    grid.replaceChildren();
    return;
  }
  state.total = page.total;
  $("catalog-status").textContent = page.total + " LoRA" + (page.total === 1 ? "" : "s");
  $("page-info").textContent = page.total ? `${page.offset + 1}–${page.offset + page.items.length} of ${page.total}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + PAGE_SIZE >= page.total;
  grid.replaceChildren(...page.items.map(card));
}

function card(item) {
  const image = el("div", { class: "preview" }, [el("span", { class: "muted", text: "no preview" })]);
  if (item.preview) {
    mediaUrl(item.preview).then((url) => image.replaceChildren(el("img", { src: url, alt: item.name || item.id })))
      .catch(() => {});
  }
  const metrics = Object.entries(item.metrics).slice(0, 2).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(" · ");
  const use = el("button", { type: "button", class: "use", text: item.kind === "temporal" ? "+ motion" : "use appearance",
                             onclick: (event) => { event.preventDefault(); choose(item); } });
  return el("a", { class: "card", href: "#/lora/" + item.id, "data-id": item.id, "data-kind": item.kind }, [
    image,
    el("div", { class: "card-body" }, [
      el("strong", { text: item.name || item.id }),
      el("span", { class: "badge " + item.kind, text: kindLabel(item.kind) }),
      el("div", { class: "muted", text: [item.concept, "step " + item.step].filter(Boolean).join(" · ") }),
      el("div", { class: "muted", text: metrics }),
      use,
    ]),
  ]);
}

// ---- entry page ------------------------------------------------------------------------------

async function showEntry(id) {
  const box = $("entry");
  box.replaceChildren(el("p", { text: "Loading…" }));
  let entry;
  try { entry = await json("v1/loras/" + encodeURIComponent(id)); } catch (error) {
    box.replaceChildren(el("p", { class: "error", text: error.message }));
    return;
  }
  const m = entry.manifest;
  const rows = [["id", entry.id], ["kind", entry.kind + " (" + kindLabel(entry.kind) + ")"], ["concept", entry.concept || ""],
                ["base", m.base.model_id], ["architecture", m.base.architecture], ["rank / alpha", m.rank + " / " + m.alpha],
                ["mode", m.mode || ""], ["step", m.step], ["run", m.run_id || ""], ["created", m.created_at],
                ["tags", entry.tags.join(", ")], ["captions", (m.captions || []).join(" | ")],
                ["description", m.description || ""]];
  const table = el("table", { class: "facts" }, rows.map(([k, v]) => el("tr", {}, [el("th", { text: k }), el("td", { text: String(v) })])));
  const metrics = Object.entries(entry.metrics);
  const metricTable = metrics.length
    ? el("table", { class: "facts", id: "entry-metrics" }, metrics.map(([k, v]) => el("tr", {}, [el("th", { text: k }), el("td", { text: String(v) })])))
    : el("p", { class: "muted", text: "no metrics recorded" });
  const lineage = entry.lineage.length
    ? el("ul", { id: "entry-lineage" }, entry.lineage.map((parent) => el("li", {}, [el("a", { href: "#/lora/" + parent, text: parent })])))
    : el("p", { class: "muted", text: "no lineage" });
  const preview = el("div", { class: "preview large" }, [el("span", { class: "muted", text: "no preview" })]);
  if (entry.preview) mediaUrl(entry.preview).then((url) => preview.replaceChildren(el("img", { src: url, alt: "preview" }))).catch(() => {});
  box.replaceChildren(
    el("h1", { id: "entry-name", text: entry.name || entry.id }),
    el("div", { class: "entry" }, [preview, el("div", {}, [table,
      el("button", { type: "button", text: entry.kind === "temporal" ? "Add as motion" : "Use as appearance",
                     onclick: () => { choose(entry); location.hash = "#/generate"; } })])]),
    el("h2", { text: "Metrics" }), metricTable,
    el("h2", { text: "Lineage" }), lineage,
    el("h2", { text: "Manifest" }), el("pre", { id: "entry-manifest", text: JSON.stringify(m, null, 2) }),
  );
}

// ---- composition + generate form -------------------------------------------------------------

function choose(item) {
  if (item.kind === "temporal") {
    if (!state.motions.some((m) => m.id === item.id)) state.motions.push({ id: item.id, name: item.name || item.id, scale: 1.0 });
  } else {
    state.appearance = { id: item.id, name: item.name || item.id };
    ensureOption($("g-appearance"), item);
    $("g-appearance").value = item.id;
  }
  renderComposition();
}

function ensureOption(select, item) {
  if (![...select.options].some((o) => o.value === item.id)) select.append(el("option", { value: item.id, text: item.name || item.id }));
}

function renderComposition() {
  $("composition-count").textContent = state.motions.length ? "(" + state.motions.length + ")" : "";
  $("g-motions").replaceChildren(...state.motions.map((motion, index) => el("div", { class: "motion", "data-id": motion.id }, [
    el("span", { text: motion.name }),
    el("label", { class: "inline" }, ["scale ", el("input", { type: "number", step: "0.1", value: String(motion.scale), class: "motion-scale",
      oninput: (event) => { motion.scale = parseFloat(event.target.value); } })]),
    el("button", { type: "button", text: "remove", onclick: () => { state.motions.splice(index, 1); renderComposition(); } }),
  ])));
}

async function fillChoices() {
  for (const [kind, select] of [["temporal", $("g-add-motion")], ["spatial", $("g-appearance")]]) {
    try {
      const page = await json("v1/loras?limit=200&kind=" + kind);
      for (const item of page.items) ensureOption(select, item);
      select.dataset.items = JSON.stringify(page.items.map((i) => ({ id: i.id, name: i.name, kind: i.kind })));
    } catch (error) { /* shown by the grid */ }
  }
}

function numberOrNull(id) { const v = $(id).value.trim(); return v === "" ? null : Number(v); }

async function submitGeneration(event) {
  event.preventDefault();
  const appearanceId = $("g-appearance").value;
  const body = {
    prompt: $("g-prompt").value, negative_prompt: $("g-negative").value,
    motions: state.motions.map((m) => ({ lora_id: m.id, scale: m.scale })),
    appearance: appearanceId ? { lora_id: appearanceId, scale: Number($("g-appearance-scale").value || 1) } : null,
  };
  for (const [key, id] of [["seed", "g-seed"], ["steps", "g-steps"], ["frames", "g-frames"], ["guidance", "g-guidance"]]) {
    const value = numberOrNull(id);
    if (value !== null) body[key] = value;
  }
  $("job").hidden = false;
  $("job-result").replaceChildren();
  $("job-progress").value = 0;
  $("job-status").textContent = "Submitting…";
  $("job-status").className = "";
  try {
    const job = await json("v1/generations", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    poll(job.id);
  } catch (error) {
    $("job-status").textContent = "Refused: " + error.message;
    $("job-status").className = "error";
  }
}

function poll(id) {
  clearTimeout(state.polling);
  const tick = async () => {
    let job;
    try { job = await json("v1/generations/" + id); } catch (error) {
      $("job-status").textContent = error.message;
      return;
    }
    const p = job.progress;
    if (p && p.total) $("job-progress").value = p.done / p.total;
    if (job.status === "done") return showResult(job);
    if (job.status === "failed") {
      $("job-status").textContent = "Failed: " + job.reason;
      $("job-status").className = "error";
      return;
    }
    $("job-status").textContent = job.status + (p ? ` — ${p.phase} ${p.done}/${p.total}` : "") + " (job " + id + ")";
    state.polling = setTimeout(tick, 400);
  };
  tick();
}

async function showResult(job) {
  $("job-progress").value = 1;
  $("job-status").textContent = `Done in ${job.seconds}s — seed ${job.seed}`;
  $("job-status").className = "done";
  const video = el("video", { id: "result-video", controls: "", autoplay: "", loop: "", muted: "", playsinline: "" });
  video.muted = true;
  const gif = el("img", { id: "result-gif", alt: "generated video (gif)" });
  const p = job.params;
  const facts = `${p.frames} frames · ${p.height}×${p.width} · ${p.steps} steps · guidance ${p.guidance} · seed ${job.seed}`;
  $("job-result").replaceChildren(el("div", { class: "result" }, [video, gif]), el("p", { class: "muted", text: facts }),
    el("a", { href: "#", id: "sidecar-link", text: "replay sidecar (JSON)", onclick: async (e) => {
      e.preventDefault(); window.open(await mediaUrl(job.links.sidecar)); } }));
  video.src = await mediaUrl(job.links.video_mp4);
  gif.src = await mediaUrl(job.links.video_gif);
}

// ---- routing ---------------------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/";
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  if (hash.startsWith("#/lora/")) {
    $("view-entry").hidden = false;
    showEntry(decodeURIComponent(hash.slice("#/lora/".length)));
  } else if (hash.startsWith("#/generate")) {
    $("view-generate").hidden = false;
    renderComposition();
  } else {
    $("view-catalog").hidden = false;
  }
}

function init() {
  $("token").value = token();
  $("token").addEventListener("change", () => { localStorage.setItem("md-token", $("token").value.trim()); loadGrid(); fillChoices(); });
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); state.offset = 0; loadGrid(); });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_SIZE); loadGrid(); });
  $("next").addEventListener("click", () => { state.offset += PAGE_SIZE; loadGrid(); });
  $("g-add-motion").addEventListener("change", (event) => {
    const items = JSON.parse(event.target.dataset.items || "[]");
    const item = items.find((i) => i.id === event.target.value);
    if (item) choose(item);
    event.target.value = "";
  });
  $("generate-form").addEventListener("submit", submitGeneration);
  window.addEventListener("hashchange", route);
  route();
  loadGrid();
  fillChoices();
}

init();
