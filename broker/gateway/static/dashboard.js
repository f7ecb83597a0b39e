// The stagepool dashboard: no dependencies, no build step. The overview polls /v1/queues,
// /v1/workers and /v1/jobs once a second and /v1/history (kept by the gateway, so a reload
// keeps the charts) every few seconds; `#job=<id>` is a job's page. Cancel and retry send the
// token: with a gateway token, open /#token=<token> once (kept in localStorage).
"use strict";

const COLORS = ["#6cc4ff", "#f0c35a", "#5fd38d", "#ff6b6b", "#c792ea", "#89ddff"];
const ENDED = new Set(["succeeded", "failed", "cancelled", "dead", "expired"]);
const RATE_BUCKETS = 30;  // the stages table's window: 30 buckets of the history (5 minutes)
const previews = {};  // job id -> object URL of its image
let history = null, live = {}, stageNames = [], lastHistory = 0;

const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (hashToken) { localStorage.setItem("stagepool-token", hashToken); window.history.replaceState(null, "", "/"); }
const token = localStorage.getItem("stagepool-token");

async function api(path, options = {}) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { method: options.method || "GET", headers });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).message; } catch (_) { /* not JSON */ }
    throw new Error(`${options.method || "GET"} ${path}: ${message}`);
  }
  return options.blob ? response.blob() : response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child !== null) node.append(child instanceof Node ? child : String(child));
  return node;
}

const seconds = ms => (ms === null || ms === undefined ? "–" : ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`);
const jobHref = id => `#job=${encodeURIComponent(id)}`;
const showError = err => { const box = document.getElementById("error"); box.textContent = String(err); box.hidden = !err; };

// -- actions ------------------------------------------------------------------------------

async function act(kind, jobId) {
  try {
    const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
    await api(kind === "cancel" ? path : `${path}/retry`, { method: kind === "cancel" ? "DELETE" : "POST" });
    showError("");
  } catch (err) { showError(err); }
  tick();
}

function actions(job) {
  const buttons = [];
  if (!ENDED.has(job.state)) buttons.push(el("button", { class: "cancel", "data-action": "cancel", onclick: () => act("cancel", job.job_id) }, "cancel"));
  else if (job.state !== "succeeded" && job.stage) buttons.push(el("button", { class: "retry", "data-action": "retry", onclick: () => act("retry", job.job_id) }, "retry"));
  return el("span", { class: "actions" }, ...buttons);
}

// -- overview -----------------------------------------------------------------------------

function drawChart() {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const points = (history ? history.points.filter(p => Object.keys(p.depth).length) : [])
    .map(p => ({ ts: p.ts_ms, depth: p.depth }));
  if (live.ts) points.push({ ts: live.ts, depth: live.depth });
  // From the oldest point (at least the last 10 minutes) to now, at most the history's window.
  const t1 = live.ts || Date.now(), window = history ? history.window_s * 1000 : 3600e3;
  const t0 = Math.max(t1 - window, Math.min(points.length ? points[0].ts : t1, t1 - 600e3));
  let top = 4;
  for (const p of points) for (const s of stageNames) top = Math.max(top, p.depth[s] || 0);
  ctx.strokeStyle = "#26303b"; ctx.fillStyle = "#7b8794"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = h - pad - (h - 2 * pad) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 4, y); ctx.stroke();
    ctx.fillText(String(Math.round(top * i / 4)), 2, y + 4);
  }
  ctx.fillText(`-${Math.round((t1 - t0) / 60e3)} min`, pad, h - 8); ctx.fillText("now", w - 30, h - 8);
  stageNames.forEach((stage, i) => {
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach((p, j) => {
      const x = pad + (w - pad - 4) * Math.max(0, p.ts - t0) / (t1 - t0);
      const y = h - pad - (h - 2 * pad) * (p.depth[stage] || 0) / top;
      j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
  });
  canvas.dataset.points = String(points.length);
  canvas.dataset.max = String(Math.max(0, ...points.flatMap(p => stageNames.map(s => p.depth[s] || 0))));
  document.getElementById("legend").replaceChildren(...stageNames.map((s, i) =>
    el("span", {}, Object.assign(el("i"), { style: `background:${COLORS[i % COLORS.length]}` }), `${s} ${live.depth ? live.depth[s] : ""}`)));
}

function rates(stage) {
  const recent = history ? history.points.slice(-RATE_BUCKETS) : [];
  let done = 0, failed = 0, runMs = 0;
  for (const p of recent) { done += p.done[stage] || 0; failed += p.failed[stage] || 0; runMs += p.run_ms[stage] || 0; }
  const minutes = RATE_BUCKETS * (history ? history.bucket_s : 10) / 60;
  return { perMin: done / minutes, failedPct: done + failed ? 100 * failed / (done + failed) : 0, meanMs: done ? runMs / done : null };
}

function renderStages(queues) {
  const n = v => (v === null || v === undefined ? "–" : v);
  document.querySelector("#stages tbody").replaceChildren(...queues.stages.map(s => {
    const r = rates(s.stage);
    return el("tr", { "data-stage": s.stage, "data-depth": s.depth, "data-workers": n(s.workers), "data-done-per-min": r.perMin.toFixed(2) },
      el("td", {}, s.stage), el("td", { class: "num" }, s.depth),
      el("td", { class: "num" }, `${s.oldest_age_s.toFixed(1)} s`),
      el("td", { class: "num" }, n(s.in_flight)), el("td", { class: "num" }, n(s.workers)),
      el("td", { class: "num" }, s.ring_depth === null ? "–" : `${s.ring_depth}/${s.ring_capacity}`),
      el("td", { class: "num" }, r.perMin.toFixed(1)),
      el("td", { class: `num ${r.failedPct ? "bad" : ""}` }, `${r.failedPct.toFixed(1)}%`),
      el("td", { class: "num" }, seconds(r.meanMs)));
  }));
  const broker = document.getElementById("broker");
  broker.textContent = queues.broker_up ? "broker up" : "broker down";
  broker.className = `pill ${queues.broker_up ? "up" : "down"}`;
  const t = queues.totals;
  document.getElementById("totals").textContent = `active ${t.active} · jobs ${t.jobs} · results ${t.results} · dead ${t.dead}`;
}

function renderWorkers(workers, nowMs) {
  document.querySelector("#workers tbody").replaceChildren(...workers.map(w => {
    const gpu = w.gpu;
    const job = w.jobs && w.jobs.length ? el("a", { href: jobHref(w.jobs[0]) }, w.jobs[0].slice(0, 12) + (w.step ? ` (${w.step})` : "")) : "idle";
    return el("tr", { "data-worker": w.worker_id, "data-stage": w.stage, "data-busy": w.busy ? "1" : "0" },
      el("td", {}, w.worker_id), el("td", {}, w.stage), el("td", {}, w.host),
      el("td", {}, w.device + (gpu ? ` (GPU ${gpu.index})` : "")), el("td", {}, job),
      el("td", { class: "num" }, w.jobs_done), el("td", { class: "num" }, `${(Math.max(0, nowMs - w.heartbeat_ms) / 1000).toFixed(1)} s ago`),
      el("td", {}, gpu ? `${(gpu.memory_used_mib / 1024).toFixed(1)}/${(gpu.memory_total_mib / 1024).toFixed(1)} GiB (own ${(gpu.process_reserved_mib / 1024).toFixed(1)})` : "–"),
      el("td", { class: "num" }, gpu ? `${Math.round(gpu.utilization_pct)}%` : "–"));
  }));
}

function preview(job) {
  const files = job.result && job.result.files;
  if (job.state !== "succeeded" || !files || !files.image) return null;
  const img = el("img", { class: "preview", alt: `result of ${job.job_id}` });
  if (previews[job.job_id]) img.src = previews[job.job_id];
  else api(`/v1/jobs/${encodeURIComponent(job.job_id)}/result?file=image`, { blob: true })
    .then(blob => { previews[job.job_id] = URL.createObjectURL(blob); img.src = previews[job.job_id]; })
    .catch(() => img.replaceWith("unavailable"));
  return img;
}

function progressBar(job) {
  const pct = job.progress === null ? 0 : job.progress;
  return el("span", { class: "bar", title: `${Math.round(pct * 100)}%` }, Object.assign(el("span"), { style: `width:${Math.round(pct * 100)}%` }));
}

function renderJobs(jobs, nowMs) {
  document.querySelector("#jobs tbody").replaceChildren(...jobs.map(job => {
    const prompt = (job.params && job.params.prompt) || "";
    const note = job.error ? el("span", { class: "bad", title: job.error }, job.error) : el("span", { title: prompt }, prompt);
    return el("tr", { "data-job": job.job_id, "data-state": job.state },
      el("td", {}, el("a", { href: jobHref(job.job_id) }, job.job_id.slice(0, 16))),
      el("td", { class: `state state-${job.state.split(":")[0]}` }, job.state),
      el("td", {}, job.stage), el("td", {}, progressBar(job)),
      el("td", { class: "num" }, seconds(nowMs - job.created_ms)),
      el("td", { class: "prompt" }, note, preview(job)), el("td", {}, actions(job)));
  }));
}

async function jobList() {
  const state = document.getElementById("filter-state").value;
  const stage = document.getElementById("filter-stage").value;
  const query = new URLSearchParams({ limit: "40" });
  if (state) query.set("state", state);
  if (stage) query.set("stage", stage);
  if (state) return (await api(`/v1/jobs?${query}`)).jobs;
  // Unfiltered: the running jobs first (with their steps), then the newest of the rest.
  const running = new URLSearchParams(query); running.set("state", "running");
  const [first, rest] = await Promise.all([api(`/v1/jobs?${running}`), api(`/v1/jobs?${query}`)]);
  const seen = new Set(first.jobs.map(j => j.job_id));
  return [...first.jobs, ...rest.jobs.filter(j => !seen.has(j.job_id))].slice(0, 40);
}

async function overview() {
  const wantHistory = Date.now() - lastHistory > 5000;
  const [queues, workers, jobs, hist] = await Promise.all([
    api("/v1/queues"), api("/v1/workers").catch(() => ({ workers: [] })), jobList(),
    wantHistory ? api("/v1/history") : Promise.resolve(null)]);
  if (hist) { history = hist; lastHistory = Date.now(); }
  if (!stageNames.length) {
    stageNames = queues.stages.map(s => s.stage);
    document.getElementById("filter-stage").append(...stageNames.map(s => el("option", {}, s)));
  }
  live = { ts: queues.now_ms, depth: Object.fromEntries(queues.stages.map(s => [s.stage, s.depth])) };
  drawChart();
  renderStages(queues);
  renderWorkers(workers.workers, queues.now_ms);
  renderJobs(jobs, queues.now_ms);
}

// -- a job's page -------------------------------------------------------------------------

function renderTimeline(job, nowMs) {
  const start = job.created_ms, end = ENDED.has(job.state) ? job.updated_ms : nowMs;
  const span = Math.max(1, end - start);
  const at = ms => `${(100 * (ms - start) / span).toFixed(2)}%`;
  const width = (a, b) => `${Math.max(0.3, 100 * (b - a) / span).toFixed(2)}%`;
  const rows = Object.entries(job.stages).map(([stage, s]) => {
    const track = el("div", { class: "track" });
    if (s.enqueued_ms) {
      const waitEnd = s.started_ms && s.started_ms >= s.enqueued_ms ? s.started_ms : (s.started_ms ? s.enqueued_ms : end);
      track.append(el("span", { class: "wait", style: `left:${at(s.enqueued_ms)};width:${width(s.enqueued_ms, waitEnd)}`, title: `waited ${seconds(waitEnd - s.enqueued_ms)}` }));
    }
    if (s.started_ms) {
      const runEnd = s.finished_ms || end;
      track.append(el("span", { class: s.finished_ms ? "run" : "run open", style: `left:${at(s.started_ms)};width:${width(s.started_ms, runEnd)}`, title: `ran ${seconds(runEnd - s.started_ms)}` }));
    }
    return el("div", { class: "lane", "data-stage": stage }, el("span", { class: "lane-name" }, stage), track);
  });
  document.getElementById("timeline").replaceChildren(...rows, el("div", { class: "muted" }, `${seconds(span)} from submit to ${ENDED.has(job.state) ? job.state : "now"}; light: waiting, dark: running`));
  document.querySelector("#job-stages tbody").replaceChildren(...Object.entries(job.stages).map(([stage, s]) =>
    el("tr", { "data-stage": stage },
      el("td", {}, stage), el("td", { class: "num" }, s.attempt ?? "–"), el("td", { class: "num" }, s.retries ?? 0),
      el("td", { class: "num" }, s.rewinds ?? 0), el("td", {}, s.worker || "–"),
      el("td", { class: "num" }, s.started_ms && s.enqueued_ms && s.started_ms >= s.enqueued_ms ? seconds(s.started_ms - s.enqueued_ms) : "–"),
      el("td", { class: "num" }, s.finished_ms && s.started_ms ? seconds(s.finished_ms - s.started_ms) : "–"),
      el("td", {}, s.step || ""))));
}

async function jobPage(jobId) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const [job, events] = await Promise.all([api(path), api(`${path}/events`)]);
  const nowMs = Date.now();
  const title = document.getElementById("job-title");
  title.replaceChildren(...[`job ${job.job_id} `, el("span", { class: `pill state state-${job.state.split(":")[0]}`, id: "job-state" }, job.state),
    job.progress !== null && !ENDED.has(job.state) ? el("span", { class: "muted" }, ` ${Math.round(job.progress * 100)}%`) : null].filter(x => x !== null));
  title.dataset.job = job.job_id; title.dataset.state = job.state;
  document.getElementById("job-actions").replaceChildren(actions(job));
  document.getElementById("job-error").textContent = job.error;
  renderTimeline(job, nowMs);
  document.querySelector("#job-events tbody").replaceChildren(...events.events.slice().reverse().map(e =>
    el("tr", { "data-event": e.event },
      el("td", {}, new Date(e.ts_ms).toLocaleTimeString()), el("td", { class: `state-${e.event}` }, e.event),
      el("td", {}, e.stage), el("td", { class: "num" }, e.attempt), el("td", {}, e.worker),
      el("td", { class: e.detail ? "detail bad" : "detail" }, e.detail || (e.ms !== null && e.ms !== undefined ? (e.event === "started" ? `waited ${seconds(e.ms)}` : `ran ${seconds(e.ms)}`) : "")))));
  document.getElementById("job-params").textContent = JSON.stringify(job.params, null, 2);
  const result = document.getElementById("job-result");
  const files = job.result && job.result.files;
  if (job.state === "succeeded" && files && files.video) {
    if (!result.querySelector("video")) result.replaceChildren(el("video", { controls: "", src: `${path}/result?file=video`, class: "result" }));
  } else if (job.state === "succeeded" && files && files.image) {
    if (!result.querySelector("img")) { const img = preview(job); img.className = "result"; result.replaceChildren(img); }
  } else result.replaceChildren(job.state === "succeeded" ? el("pre", {}, JSON.stringify(job.result, null, 2)) : el("span", { class: "muted" }, "none yet"));
}

// -- the loop -----------------------------------------------------------------------------

function route() {
  const jobId = new URLSearchParams(location.hash.slice(1)).get("job");
  document.getElementById("overview").hidden = Boolean(jobId);
  document.getElementById("job-page").hidden = !jobId;
  if (!jobId) document.getElementById("job-result").replaceChildren();
  return jobId;
}

let busy = false, tickFailed = false;  // an action's error stays until the next action
async function tick() {
  if (busy) return;
  busy = true;
  try {
    const jobId = route();
    await (jobId ? jobPage(jobId) : overview());
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (tickFailed) { showError(""); tickFailed = false; }
  } catch (err) {
    showError(err); tickFailed = true;
  } finally { busy = false; }
}

document.getElementById("search").addEventListener("submit", event => {
  event.preventDefault();
  const id = document.getElementById("search-id").value.trim();
  if (id) location.hash = `job=${encodeURIComponent(id)}`;
});
for (const id of ["filter-state", "filter-stage"]) document.getElementById(id).addEventListener("change", tick);
window.addEventListener("hashchange", tick);
tick();
setInterval(tick, 1000);
