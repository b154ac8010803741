// ditmem web UI: vanilla JavaScript over the same HTTP API (/generate, /jobs, /memory).
"use strict";

const KEY_STORAGE = "ditmem.apiKey";
const ACTIVE = new Set(["queued", "running"]);
const PAGE_SIZE = 12;
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- API and helpers

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.details = error.details;
  }
}

async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  return new ApiError(response.status, body);
}

async function api(path, { method = "GET", json } = {}) {
  const init = { method, headers: authHeaders() };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

// Media behind a key cannot be loaded by <img>/<video> (no headers): fetch it into a blob URL.
const blobUrls = new Map();
async function mediaUrl(path) {
  if (!apiKey()) return path;
  if (blobUrls.has(path)) return blobUrls.get(path);
  const response = await fetch(path, { headers: authHeaders() });
  if (!response.ok) throw await errorFrom(response);
  const url = URL.createObjectURL(await response.blob());
  blobUrls.set(path, url);
  return url;
}

function setMedia(element, attribute, path) {
  mediaUrl(path).then((url) => { element[attribute] = url; }, () => { element.hidden = true; });
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && !name.startsWith("aria-") && !name.startsWith("data-")) node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function say(message, bad = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("bad", bad);
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

const fmtScore = (score) => (score === null || score === undefined ? "pinned" : score.toFixed(3));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function posterImg(clipId, caption) {
  const img = el("img", { alt: `Poster frame of clip ${clipId}: ${caption}`, loading: "lazy", width: 160, height: 120 });
  setMedia(img, "src", `/memory/${clipId}/poster`);
  return img;
}

// ---------------------------------------------------------------- views

const VIEWS = ["generate", "jobs", "memory"];

function show(view) {
  if (!VIEWS.includes(view)) view = "generate";
  for (const name of VIEWS) {
    $(`view-${name}`).hidden = name !== view;
    const tab = $(`tab-${name}`);
    if (name === view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
  if (view === "jobs") loadJobs();
  if (view === "memory") loadGallery();
}

// ---------------------------------------------------------------- Generate

function readNumber(input) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  const value = Number(raw);
  return Number.isFinite(value) ? value : raw; // let the API name the bad field
}

function generateRequest() {
  const request = { prompt: $("gen-prompt").value.trim() };
  const negative = $("gen-negative").value.trim();
  if (negative) request.negative_prompt = negative;
  const numbers = { num_frames: "gen-frames", width: "gen-width", height: "gen-height",
    steps: "gen-steps", guidance_scale: "gen-guidance", seed: "gen-seed" };
  for (const [field, id] of Object.entries(numbers)) {
    const value = readNumber($(id));
    if (value !== undefined) request[field] = value;
  }
  const memoryGuidance = $("gen-memory-guidance").value;
  if (memoryGuidance) request.memory_guidance = memoryGuidance === "true";
  const profile = $("gen-profile").value;
  if (profile) request.profile = profile;
  const cache = $("gen-cache").value;
  if (cache) request.cache = { kind: cache };  // the kind's default threshold or interval
  if ($("gen-live-preview").checked) request.preview_every = 1;
  const memory = {};
  const k = readNumber($("gen-k"));
  if (k !== undefined) memory.k = k;
  const pins = $("gen-pins").value.split(",").map((part) => part.trim()).filter(Boolean);
  if (pins.length) memory.clip_ids = pins.map((part) => (/^\d+$/.test(part) ? Number(part) : part));
  request.memory = memory;
  return request;
}

const FIELD_INPUTS = { prompt: "gen-prompt", negative_prompt: "gen-negative", num_frames: "gen-frames",
  width: "gen-width", height: "gen-height", steps: "gen-steps", guidance_scale: "gen-guidance",
  seed: "gen-seed", memory_guidance: "gen-memory-guidance", "memory.k": "gen-k",
  "memory.clip_ids": "gen-pins", profile: "gen-profile", cache: "gen-cache", preview_every: "gen-live-preview" };

function markInvalid(details) {
  for (const id of Object.values(FIELD_INPUTS)) $(id).removeAttribute("aria-invalid");
  for (const problem of Array.isArray(details) ? details : []) {
    const field = String(problem.field || "").replace(/\.\d+$/, "");
    const id = FIELD_INPUTS[field];
    if (id) $(id).setAttribute("aria-invalid", "true");
  }
}

async function submitGeneration(event) {
  event.preventDefault();
  const errorBox = $("generate-error");
  errorBox.hidden = true;
  const request = generateRequest();
  if (!request.prompt) {
    markInvalid([{ field: "prompt" }]);
    errorBox.textContent = "prompt: enter a prompt";
    errorBox.hidden = false;
    $("gen-prompt").focus();
    return;
  }
  const button = $("generate-submit");
  button.disabled = true;
  try {
    const job = await api("/generate", { method: "POST", json: request });
    markInvalid([]);
    rememberPrompt(job.id, request.prompt);
    say(`Job ${job.id.slice(0, 8)} queued.`);
    show("jobs");
  } catch (error) {
    markInvalid(error.details);
    errorBox.textContent = error.message;
    errorBox.hidden = false;
    say(`Could not queue the job: ${error.message}`, true);
  } finally {
    button.disabled = false;
  }
}

let previewSeq = 0;
async function updatePreview() {
  const seq = ++previewSeq;
  const prompt = $("gen-prompt").value.trim();
  const list = $("preview-list");
  const info = $("preview-status");
  const k = readNumber($("gen-k"));
  if (!prompt) {
    list.replaceChildren();
    info.textContent = "Type a prompt to see matching clips.";
    return;
  }
  if (k === 0) {
    list.replaceChildren();
    info.textContent = "Memory is off (k = 0).";
    return;
  }
  const count = Number.isInteger(k) && k > 0 ? Math.min(k, 16) : 5;
  try {
    const result = await api(`/memory/search?q=${encodeURIComponent(prompt)}&k=${count}`);
    if (seq !== previewSeq) return; // a newer keystroke won
    info.textContent = result.hits.length
      ? `${result.hits.length} clip${result.hits.length === 1 ? "" : "s"} would be retrieved.`
      : "No clips in the memory bank match yet.";
    list.replaceChildren(...result.hits.map((hit) => el("li", { class: "card", "data-clip-id": hit.clip_id },
      posterImg(hit.clip_id, hit.caption),
      el("div", { class: "body" },
        el("span", { class: "caption", text: hit.caption }),
        el("span", { class: "meta" }, `clip ${hit.clip_id} · score `, el("span", { class: "score", text: fmtScore(hit.score) }))))));
  } catch (error) {
    if (seq !== previewSeq) return;
    list.replaceChildren();
    info.textContent = `Preview unavailable: ${error.message}`;
  }
}

// ---------------------------------------------------------------- Jobs

let jobsTimer = null;
let jobsLoading = false;

function scheduleJobs(ms) {
  clearTimeout(jobsTimer);
  jobsTimer = setTimeout(loadJobs, ms);
}

// The list is read once; each active job then follows its event stream (GET /jobs/{id}/events).
// A stream that keeps failing falls back to polling the list.
async function loadJobs() {
  if (jobsLoading) return;
  jobsLoading = true;
  let polling = false;
  try {
    const page = await api("/jobs?limit=50");
    renderJobs(page.items);
    for (const job of page.items) {
      if (!ACTIVE.has(job.status)) continue;
      if (streamsFailed >= STREAM_FAILURES_BEFORE_POLLING) polling = true;
      else followJob(job);
    }
  } catch (error) {
    say(`Could not load jobs: ${error.message}`, true);
  } finally {
    jobsLoading = false;
  }
  clearTimeout(jobsTimer);
  if (polling) scheduleJobs(1000);
}

// ---------------------------------------------------------------- Job event streams

const STREAM_FAILURES_BEFORE_POLLING = 3;
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const streams = new Map(); // job id -> AbortController
let streamsFailed = 0;

// Server-Sent Events over fetch: EventSource cannot send the Authorization header.
async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.search(/\r?\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(buffer[newline] === "\r" ? newline + 2 : newline + 1);
      if (line === "") {
        if (event.data.length) yield { ...event, data: event.data.join("\n") };
        event = { event: "message", data: [], id: null };
      } else if (!line.startsWith(":")) { // ":" lines are keep-alive comments
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(text);
        else if (field === "event") event.event = text;
        else if (field === "id") event.id = text;
      }
    }
  }
}

function followJob(job) {
  if (streams.has(job.id)) return;
  const controller = new AbortController();
  streams.set(job.id, controller);
  let lastId = null;
  const state = { ...job };
  (async () => {
    let failures = 0;
    while (!controller.signal.aborted) {
      try {
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const response = await fetch(job.links.events || `/jobs/${job.id}/events`, { headers, signal: controller.signal });
        if (!response.ok) throw await errorFrom(response);
        for await (const event of readEvents(response)) {
          failures = 0;
          lastId = event.id;
          const data = JSON.parse(event.data);
          if (data.error && typeof data.error === "object") data.error = data.error.message;
          Object.assign(state, data);
          if (event.event === "queued") state.progress = 0;
          if (event.event === "started") state.step = 0;
          showJobState(state);
          if (FINAL.has(event.event)) {
            streams.delete(job.id);
            // The final record once: result, seed, memory used and links.
            showJobState(await api(`/jobs/${job.id}`));
            return;
          }
        }
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error.status === 404) { streams.delete(job.id); return; }
        failures += 1;
      }
      if (failures >= 3) { // the stream is not getting through: poll instead
        streams.delete(job.id);
        streamsFailed += 1;
        scheduleJobs(1000);
        return;
      }
      await sleep(500 * failures);
    }
  })();
}

function showJobState(job) {
  const item = document.querySelector(`#jobs-list [data-job-id="${job.id}"]`);
  if (item) updateJobItem(item, job);
}

function renderJobs(jobs) {
  const list = $("jobs-list");
  $("jobs-empty").hidden = jobs.length > 0;
  const keep = new Set(jobs.map((job) => job.id));
  for (const item of [...list.children]) if (!keep.has(item.dataset.jobId)) item.remove();
  jobs.forEach((job, index) => {
    let item = list.querySelector(`[data-job-id="${job.id}"]`);
    if (!item) item = createJobItem(job);
    updateJobItem(item, job);
    if (list.children[index] !== item) list.insertBefore(item, list.children[index] || null);
  });
}

// The API does not echo prompts back; remember the ones submitted from this browser.
const PROMPTS_STORAGE = "ditmem.prompts";
function rememberPrompt(jobId, prompt) {
  const prompts = JSON.parse(localStorage.getItem(PROMPTS_STORAGE) || "{}");
  prompts[jobId] = prompt;
  const ids = Object.keys(prompts);
  for (const old of ids.slice(0, Math.max(0, ids.length - 200))) delete prompts[old];
  localStorage.setItem(PROMPTS_STORAGE, JSON.stringify(prompts));
}

function jobTitle(job) {
  if (job.kind === "ingest") return "Memory clip ingest";
  const prompts = JSON.parse(localStorage.getItem(PROMPTS_STORAGE) || "{}");
  return prompts[job.id] ? `“${prompts[job.id]}”` : "Video generation";
}

function createJobItem(job) {
  const short = job.id.slice(0, 8);
  const progressId = `progress-${job.id}`;
  const item = el("li", { class: "job", "data-job-id": job.id },
    el("div", { class: "job-head" },
      el("span", { class: "job-title" }),
      el("span", { class: "badge", "data-role": "status" }),
      el("button", { type: "button", class: "danger", "data-role": "cancel", "aria-label": `Cancel job ${short}`, text: "Cancel",
        onclick: () => cancelJob(job.id) })),
    el("div", { class: "meta", "data-role": "meta" }),
    el("div", { class: "progress-row", "data-role": "progress-row" },
      el("label", { for: progressId, "data-role": "progress-label" }),
      el("progress", { id: progressId, max: 1, value: 0 })),
    el("img", { class: "live-preview", "data-role": "live", alt: `Live preview of job ${short}`, hidden: true }),
    el("p", { class: "error", "data-role": "error", role: "alert", hidden: true }),
    el("div", { "data-role": "result" }),
    el("ul", { class: "used", "data-role": "used", "aria-label": `Memory clips used by job ${short}` }));
  return item;
}

function updateJobItem(item, job) {
  const part = (role) => item.querySelector(`[data-role="${role}"]`);
  const short = job.id.slice(0, 8);
  item.dataset.status = job.status;
  item.querySelector(".job-title").textContent = `${jobTitle(job)} · ${short}`;
  const badge = part("status");
  badge.textContent = job.status;
  badge.className = `badge ${job.status}`;
  part("cancel").hidden = !ACTIVE.has(job.status);

  const created = new Date(job.created_at).toLocaleTimeString();
  const bits = [`${job.kind}`, `created ${created}`];
  if (job.result && job.result.seed !== undefined) bits.push(`seed ${job.result.seed}`);
  if (job.result && job.result.clip_id !== undefined) bits.push(`clip ${job.result.clip_id}`);
  if (job.started_at && job.finished_at) {
    bits.push(`took ${((new Date(job.finished_at) - new Date(job.started_at)) / 1000).toFixed(1)} s`);
  }
  part("meta").textContent = bits.join(" · ");

  const progress = item.querySelector("progress");
  const row = part("progress-row");
  row.hidden = job.status !== "running" && job.status !== "queued";
  if (job.status === "queued") {
    progress.removeAttribute("value");
    const ahead = Number.isInteger(job.queue_position) ? ` (${job.queue_position} ahead)` : "";
    part("progress-label").textContent = `Job ${short}: waiting in the queue${ahead}`;
  } else {
    progress.value = job.progress;
    part("progress-label").textContent = job.total_steps
      ? `Job ${short}: step ${job.step} of ${job.total_steps}`
      : `Job ${short}: ${Math.round(job.progress * 100)}%`;
  }

  const live = part("live");
  const previewUrl = job.status === "running" ? job.preview_url || (job.links && job.links.preview) : null;
  live.hidden = !previewUrl;
  if (previewUrl && live.dataset.src !== previewUrl) {
    live.dataset.src = previewUrl;
    fetch(previewUrl, { headers: authHeaders() })
      .then((response) => (response.ok ? response.blob() : null))
      .then((blob) => {
        if (!blob || live.dataset.src !== previewUrl) return;
        if (live.src.startsWith("blob:")) URL.revokeObjectURL(live.src);
        live.src = URL.createObjectURL(blob);
      }, () => {});
  }

  const error = part("error");
  error.hidden = !job.error;
  error.textContent = job.error ? `Error: ${job.error}` : "";

  const result = part("result");
  if (job.status === "succeeded" && job.kind === "generate" && !result.dataset.filled) {
    result.dataset.filled = "1";
    const video = el("video", { controls: true, preload: "metadata", playsInline: true, "aria-label": `Video of job ${short}` });
    const link = el("a", { class: "button", download: `${job.id}.mp4`, text: "Download mp4" });
    setMedia(video, "src", job.links.video);
    setMedia(link, "href", job.links.video);
    result.append(video, el("p", {}, link));
  }

  const used = part("used");
  if (used.childElementCount !== job.memory_used.length) {
    used.replaceChildren(...job.memory_used.map((clip) => el("li", { class: "card", "data-clip-id": clip.clip_id },
      posterImg(clip.clip_id, clip.caption),
      el("div", { class: "body" },
        el("span", { class: "caption", text: clip.caption }),
        el("span", { class: "meta" }, `clip ${clip.clip_id} · score `, el("span", { class: "score", text: fmtScore(clip.score) }))))));
  }
}

async function cancelJob(jobId) {
  try {
    await api(`/jobs/${jobId}`, { method: "DELETE" });
    say(`Cancel requested for job ${jobId.slice(0, 8)}.`);
  } catch (error) {
    say(`Could not cancel: ${error.message}`, true);
  }
  loadJobs();
}

// ---------------------------------------------------------------- Memory

// Keyset pagination: the cursor each visited page started from (null: the newest clips).
let galleryCursors = [null];
let galleryQuery = "";

function firstGalleryPage() {
  galleryCursors = [null];
}

function clipCard(clip, score) {
  const tags = clip.tags && clip.tags.length
    ? el("ul", { class: "tags", "aria-label": "Tags" }, clip.tags.map((tag) => el("li", { text: tag })))
    : null;
  const meta = [`clip ${clip.clip_id}`];
  if (clip.duration_s !== undefined) meta.push(`${clip.duration_s.toFixed(1)} s`);
  if (clip.width) meta.push(`${clip.width}×${clip.height}`);
  if (score !== undefined) meta.push(`score ${fmtScore(score)}`);
  return el("li", { class: "card", "data-clip-id": clip.clip_id },
    posterImg(clip.clip_id, clip.caption),
    el("div", { class: "body" },
      el("span", { class: "caption", text: clip.caption }),
      el("span", { class: "meta", text: meta.join(" · ") }),
      tags,
      el("div", { class: "actions" },
        el("button", { type: "button", class: "danger", text: "Delete",
          "aria-label": `Delete clip ${clip.clip_id}: ${clip.caption}`, onclick: () => deleteClip(clip) }))));
}

async function loadGallery() {
  const gallery = $("gallery");
  const info = $("gallery-info");
  try {
    if (galleryQuery) {
      const result = await api(`/memory/search?q=${encodeURIComponent(galleryQuery)}&k=16`);
      const clips = await Promise.all(result.hits.map((hit) =>
        api(`/memory/${hit.clip_id}`).then((clip) => [clip, hit.score], () => [{ ...hit }, hit.score])));
      gallery.replaceChildren(...clips.map(([clip, score]) => clipCard(clip, score)));
      info.textContent = `${clips.length} clip${clips.length === 1 ? "" : "s"} matching “${galleryQuery}”.`;
      $("page-prev").disabled = true;
      $("page-next").disabled = true;
      return;
    }
    const cursor = galleryCursors[galleryCursors.length - 1];
    const query = cursor === null ? "" : `&cursor=${cursor}`;
    const page = await api(`/memory?limit=${PAGE_SIZE}${query}`);
    if (page.items.length === 0 && galleryCursors.length > 1) {
      galleryCursors.pop();  // the last clips of this page were deleted
      return loadGallery();
    }
    gallery.replaceChildren(...page.items.map((clip) => clipCard(clip)));
    const first = (galleryCursors.length - 1) * PAGE_SIZE;
    info.textContent = page.total
      ? `Clips ${first + 1}–${first + page.items.length} of ${page.total}.`
      : "The memory bank is empty: upload a clip above.";
    $("page-prev").disabled = galleryCursors.length === 1;
    $("page-next").disabled = page.next_cursor === null || page.next_cursor === undefined;
    $("page-next").dataset.cursor = page.next_cursor ?? "";
  } catch (error) {
    info.textContent = `Could not load the memory bank: ${error.message}`;
  }
}

async function deleteClip(clip) {
  if (!confirm(`Delete clip ${clip.clip_id} (“${clip.caption}”) from the memory bank?`)) return;
  try {
    await api(`/memory/${clip.clip_id}`, { method: "DELETE" });
    say(`Deleted clip ${clip.clip_id}.`);
  } catch (error) {
    say(`Could not delete clip ${clip.clip_id}: ${error.message}`, true);
  }
  loadGallery();
}

let pendingFile = null;

function chooseFile(file) {
  pendingFile = file || null;
  $("upload-file-name").textContent = file ? `Selected: ${file.name} (${(file.size / 1024).toFixed(0)} KiB)` : "No file selected.";
}

function postUpload(form, progress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/memory");
    const key = apiKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) progress.value = 0.5 * (event.loaded / event.total);
    };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, { error: { message: "network error during upload" } }));
    xhr.send(form);
  });
}

async function submitUpload(event) {
  event.preventDefault();
  const status = $("upload-status");
  const progress = $("upload-progress");
  const caption = $("upload-caption");
  status.classList.remove("error");
  const fail = (message) => {
    status.textContent = message;
    status.classList.add("error");
  };
  if (!pendingFile) return fail("Choose or drop a video file first.");
  if (!caption.value.trim()) {
    caption.setAttribute("aria-invalid", "true");
    caption.focus();
    return fail("caption: enter a caption for the clip.");
  }
  caption.removeAttribute("aria-invalid");
  const form = new FormData();
  form.append("file", pendingFile, pendingFile.name);
  form.append("caption", caption.value.trim());
  form.append("tags", $("upload-tags").value);
  const button = $("upload-submit");
  button.disabled = true;
  progress.value = 0;
  status.textContent = `Uploading ${pendingFile.name}…`;
  try {
    const accepted = await postUpload(form, progress);
    status.textContent = "Ingesting: decoding, encoding and indexing the clip…";
    progress.value = 0.5;
    let job = accepted;
    while (ACTIVE.has(job.status)) {
      await sleep(300);
      job = await api(`/jobs/${accepted.id}`);
      progress.value = 0.5 + 0.5 * (job.progress || 0);
    }
    if (job.status !== "succeeded") throw new ApiError(0, { error: { message: job.error || `ingest ${job.status}` } });
    progress.value = 1;
    const clipId = job.result.clip_id;
    status.textContent = job.result.created === false
      ? `Already in the bank as clip ${clipId}.`
      : `Added clip ${clipId}.`;
    say(status.textContent);
    chooseFile(null);
    $("upload-file").value = "";
    galleryQuery = "";
    $("memory-search").value = "";
    firstGalleryPage();
    await loadGallery();
    updatePreview();
  } catch (error) {
    progress.value = 0;
    const prefix = { 413: "Too large", 415: "Not a video", 422: "Rejected" }[error.status] || "Upload failed";
    fail(`${prefix}: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => show(tab.dataset.view));
  }
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));

  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    blobUrls.clear();
    say(key ? "API key saved in this browser." : "API key removed.");
    show(location.hash.slice(1));
  });
  $("key-clear").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    blobUrls.clear();
    say("API key removed.");
  });

  $("generate-form").addEventListener("submit", submitGeneration);
  const preview = debounce(updatePreview, 250);
  $("gen-prompt").addEventListener("input", preview);
  $("gen-k").addEventListener("input", preview);

  $("jobs-refresh").addEventListener("click", loadJobs);

  $("upload-form").addEventListener("submit", submitUpload);
  $("upload-file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  const zone = $("drop-zone");
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) chooseFile(file);
  });
  zone.addEventListener("keydown", (event) => {
    if ((event.key === "Enter" || event.key === " ") && event.target === zone) {
      event.preventDefault();
      $("upload-file").click();
    }
  });

  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    galleryQuery = $("memory-search").value.trim();
    firstGalleryPage();
    loadGallery();
  });
  $("page-prev").addEventListener("click", () => {
    if (galleryCursors.length > 1) galleryCursors.pop();
    loadGallery();
  });
  $("page-next").addEventListener("click", () => {
    const next = $("page-next").dataset.cursor;
    if (next) galleryCursors.push(Number(next));
    loadGallery();
  });

  show(location.hash.slice(1) || "generate");
}

document.addEventListener("DOMContentLoaded", init);
