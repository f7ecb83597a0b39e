// The stagepool dashboard: polls /v1/queues and /v1/jobs once a second; no dependencies.
// A gateway with a token: open /#token=<token> once (kept in localStorage).
"use strict";

const HISTORY = 120;
const COLORS = ["#6cc4ff", "#f0c35a", "#5fd38d", "#ff6b6b", "#c792ea", "#89ddff"];
const depths = {};  // stage -> queue depths, oldest first
const previews = {}; // job id -> object URL of its image

const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (hashToken) { localStorage.setItem("stagepool-token", hashToken); window.history.replaceState(null, "", "/"); }
const token = localStorage.getItem("stagepool-token");

async function api(path, asBlob) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const response = await fetch(path, { headers });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return asBlob ? response.blob() : response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function drawChart(stages) {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  let top = 4;  // at least 0..4 on the axis, in whole jobs
  for (const s of stages) top = Math.max(top, ...depths[s.stage]);
  ctx.strokeStyle = "#26303b"; ctx.fillStyle = "#7b8794"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = h - pad - (h - 2 * pad) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 4, y); ctx.stroke();
    ctx.fillText(String(Math.round(top * i / 4)), 2, y + 4);
  }
  let points = 0;
  stages.forEach((s, i) => {
    const values = depths[s.stage];
    ctx.strokeStyle = COLORS[i % COLORS.length]; ctx.lineWidth = 2; ctx.beginPath();
    values.forEach((v, j) => {
      const x = pad + (w - pad - 4) * (j + HISTORY - values.length) / (HISTORY - 1);
      const y = h - pad - (h - 2 * pad) * v / top;
      j ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
    });
    ctx.stroke();
    points += values.length;
  });
  canvas.dataset.points = String(points);
  canvas.dataset.max = String(Math.max(0, ...stages.map(s => Math.max(...depths[s.stage]))));
  document.getElementById("legend").replaceChildren(...stages.map((s, i) =>
    el("span", {}, Object.assign(el("i"), { style: `background:${COLORS[i % COLORS.length]}` }),
       `${s.stage} ${s.depth}`)));
}

function renderStages(queues) {
  const n = v => (v === null || v === undefined ? "–" : v);
  document.querySelector("#stages tbody").replaceChildren(...queues.stages.map(s =>
    el("tr", { "data-stage": s.stage, "data-depth": s.depth, "data-workers": n(s.workers) },
       el("td", {}, s.stage), el("td", { class: "num" }, s.depth),
       el("td", { class: "num" }, `${s.oldest_age_s.toFixed(1)}s`),
       el("td", { class: "num" }, n(s.in_flight)), el("td", { class: "num" }, n(s.workers)),
       el("td", { class: "num" }, s.ring_depth === null ? "–" : `${s.ring_depth}/${s.ring_capacity}`))));
  const broker = document.getElementById("broker");
  broker.textContent = queues.broker_up ? "broker up" : "broker down";
  broker.className = `pill ${queues.broker_up ? "up" : "down"}`;
  const t = queues.totals;
  document.getElementById("totals").textContent =
    `active ${t.active} · jobs ${t.jobs} · results ${t.results} · dead ${t.dead}`;
}

function preview(job) {
  const files = job.result && job.result.files;
  if (job.state !== "succeeded" || !files || !files.image) return "";
  const img = el("img", { class: "preview", alt: `result of ${job.job_id}` });
  if (previews[job.job_id]) img.src = previews[job.job_id];
  else api(`/v1/jobs/${encodeURIComponent(job.job_id)}/result?file=image`, true)
    .then(blob => { previews[job.job_id] = URL.createObjectURL(blob); img.src = previews[job.job_id]; })
    .catch(() => img.replaceWith("unavailable"));
  return img;
}

function renderJobs(jobs, nowMs) {
  document.querySelector("#jobs tbody").replaceChildren(...jobs.map(job => {
    const pct = job.progress === null ? (job.state === "succeeded" ? 1 : 0) : job.progress;
    const bar = el("span", { class: "bar", title: `${Math.round(pct * 100)}%` },
                   Object.assign(el("span"), { style: `width:${Math.round(pct * 100)}%` }));
    const prompt = (job.params && job.params.prompt) || "";
    return el("tr", { "data-job": job.job_id, "data-state": job.state },
      el("td", {}, job.job_id.slice(0, 12)),
      el("td", { class: `state-${job.state}` }, job.state),
      el("td", {}, job.stage), el("td", {}, bar),
      el("td", { class: "num" }, `${((nowMs - job.created_ms) / 1000).toFixed(1)}s`),
      el("td", { class: "prompt", title: prompt }, prompt),
      el("td", {}, preview(job)));
  }));
}

async function tick() {
  try {
    const [queues, list] = await Promise.all([api("/v1/queues"), api("/v1/jobs?limit=15")]);
    for (const s of queues.stages) {
      (depths[s.stage] ||= []).push(s.depth);
      if (depths[s.stage].length > HISTORY) depths[s.stage].shift();
    }
    drawChart(queues.stages);
    renderStages(queues);
    renderJobs(list.jobs, queues.now_ms);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.getElementById("error").hidden = true;
  } catch (err) {
    const box = document.getElementById("error");
    box.textContent = String(err); box.hidden = false;
  }
}

tick();
setInterval(tick, 1000);
