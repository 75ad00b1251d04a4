// Cohort dashboard: one vanilla module, no dependencies, talks only to the
// proxy's REST API (/api/v1) with the token kept in sessionStorage.

const TOKEN_KEY = "cohort.token";
const main = document.getElementById("main");
let me = null; // whoami: {name, role, namespaces}
let pageAbort = null; // aborts the current page's fetches and live stream

// ---------- helpers ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function render(...nodes) {
  main.replaceChildren(...nodes.flat().filter(Boolean));
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// "JOB_STATE_RUNNING", "running", 3 -> "running"
const STATES = ["unspecified", "queued", "starting", "running", "stopping", "succeeded", "failed", "stopped", "deleting"];
function stateName(s) {
  if (typeof s === "number") return STATES[s] || String(s);
  return String(s || "unspecified").replace(/^JOB_STATE_/i, "").toLowerCase();
}
const FINAL = new Set(["succeeded", "failed", "stopped"]);

function badge(text, cls) {
  return el("span", { class: `badge ${cls || text}` }, text);
}

function fmtTime(ms) {
  const n = Number(ms);
  if (!n) return "—";
  return new Date(n).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function fmtNum(x, digits = 4) {
  const n = Number(x);
  if (x === undefined || x === null || Number.isNaN(n)) return "—";
  return n.toFixed(digits);
}

function fmtPct(x) {
  const n = Number(x);
  if (x === undefined || x === null || Number.isNaN(n) || n === 0) return "—";
  return `${(n * 100).toFixed(1)}%`;
}

function fmtDuration(ms) {
  const n = Number(ms);
  if (!n) return "—";
  if (n < 1000) return `${n} ms`;
  if (n < 60000) return `${(n / 1000).toFixed(1)} s`;
  return `${Math.floor(n / 60000)} min ${Math.round((n % 60000) / 1000)} s`;
}

function fmtBytes(n) {
  const b = Number(n) || 0;
  if (b < 1024) return `${b} B`;
  if (b < 1024 * 1024) return `${(b / 1024).toFixed(1)} KiB`;
  if (b < 1024 * 1024 * 1024) return `${(b / 1024 / 1024).toFixed(1)} MiB`;
  return `${(b / 1024 / 1024 / 1024).toFixed(1)} GiB`;
}

function canWrite() {
  return me && me.role && String(me.role).toLowerCase() !== "viewer";
}

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

async function api(path, opts = {}) {
  const headers = new Headers(opts.headers || {});
  const t = token();
  if (t) headers.set("Authorization", `Bearer ${t}`);
  if (!headers.has("Accept")) headers.set("Accept", "application/json");
  const resp = await fetch(path, { ...opts, headers, signal: opts.signal || (pageAbort && pageAbort.signal) });
  if (!resp.ok) {
    let problem = null;
    try {
      problem = await resp.json();
    } catch (_) {
      problem = { title: resp.statusText };
    }
    if (resp.status === 401 && !opts.noRedirect) {
      sessionStorage.removeItem(TOKEN_KEY);
      me = null;
      location.hash = "#/login";
    }
    throw new ApiError(resp.status, problem);
  }
  if (opts.raw) return resp;
  if (resp.status === 204) return null;
  const type = resp.headers.get("content-type") || "";
  return type.includes("json") ? resp.json() : resp.text();
}

function errorBox(e) {
  const p = e.problem || {};
  return el("div", { class: "error", role: "alert" },
    `${p.title || "Error"}${p.status ? ` (${p.status})` : ""}: ${p.detail || e.message}`,
    p.field ? el("div", {}, "Field: ", el("code", {}, p.field)) : null);
}

// A section whose endpoint the server does not offer (404/501) says so
// instead of showing made-up data.
function unavailable(what, e) {
  if (e instanceof ApiError && (e.status === 404 || e.status === 501 || e.status === 405)) {
    return el("p", { class: "unavailable" }, `${what}: not available from this server.`);
  }
  return errorBox(e);
}

function list(x, key) {
  if (Array.isArray(x)) return x;
  if (x && Array.isArray(x[key])) return x[key];
  return [];
}

// ---------- plots (inline SVG) ----------

function linePlot(title, points, opts = {}) {
  const W = 560, H = 260, L = 56, R = 16, T = 14, B = 40;
  const box = el("div", { class: "plot card", "data-plot": opts.id || title });
  box.append(el("div", { class: "title" }, title));
  if (!points.length) {
    box.append(el("p", { class: "muted" }, "No rounds yet."));
    return box;
  }
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  const xmin = Math.min(...xs), xmax = Math.max(...xs);
  let ymin = opts.ymin ?? Math.min(...ys), ymax = opts.ymax ?? Math.max(...ys);
  if (ymax - ymin < 1e-9) { ymin -= 0.5; ymax += 0.5; }
  const sx = (x) => L + (xmax === xmin ? (W - L - R) / 2 : ((x - xmin) / (xmax - xmin)) * (W - L - R));
  const sy = (y) => T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B);
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const y = ymin + ((ymax - ymin) * i) / 4;
    g.append(svg("line", { class: "gridline", x1: L, x2: W - R, y1: sy(y), y2: sy(y) }));
    g.append(svg("text", { class: "tick", x: L - 8, y: sy(y) + 4, "text-anchor": "end" }, opts.pct ? `${(y * 100).toFixed(0)}%` : y.toPrecision(3)));
  }
  const step = Math.max(1, Math.ceil((xmax - xmin + 1) / 10));
  for (let x = xmin; x <= xmax; x += step) {
    g.append(svg("text", { class: "tick", x: sx(x), y: H - B + 18, "text-anchor": "middle" }, x));
  }
  g.append(svg("text", { class: "tick", x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "round"));
  g.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  g.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const color = opts.color || "#2458c6";
  g.append(svg("polyline", { class: "series", stroke: color, points: points.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ") }));
  for (const p of points) {
    g.append(svg("circle", { class: "dot", fill: color, cx: sx(p.x), cy: sy(p.y), r: 4 },
      svg("title", {}, `round ${p.x}: ${opts.pct ? fmtPct(p.y) : fmtNum(p.y)}`)));
  }
  box.append(g);
  return box;
}

// ---------- pages ----------

function loginPage(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("who").replaceChildren();
  const input = el("input", { id: "token", type: "password", autocomplete: "off", placeholder: "cohort_…", "aria-label": "API token" });
  const out = el("div");
  const form = el("form", { class: "card", id: "login-form" },
    el("h1", {}, "Sign in to Cohort"),
    el("p", { class: "muted" }, "Paste an API token (for example the admin token ",
      el("code", {}, "cohort up"), " printed). It is kept in this browser tab only."),
    el("label", {}, "Token", input),
    el("div", { class: "row" }, el("button", { class: "primary", type: "submit", id: "login" }, "Sign in")),
    out);
  if (message) out.append(el("div", { class: "error" }, message));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      me = await api("/api/v1/whoami", { noRedirect: true });
      location.hash = "#/jobs";
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      out.replaceChildren(errorBox(e));
    }
  });
  render(el("div", { class: "login" }, form));
  input.focus();
}

async function jobsPage(params) {
  const ns = params.get("namespace") || "";
  const state = params.get("state") || "";
  const pageToken = params.get("page_token") || "";
  const nsSel = el("select", { id: "filter-namespace" }, el("option", { value: "" }, "all"),
    ...(me.namespaces || []).filter((n) => n !== "*").map((n) => el("option", { value: n, selected: n === ns }, n)));
  const stSel = el("select", { id: "filter-state" }, el("option", { value: "" }, "any"),
    ...STATES.slice(1).map((s) => el("option", { value: s, selected: s === state }, s)));
  const apply = () => {
    const q = new URLSearchParams();
    if (nsSel.value) q.set("namespace", nsSel.value);
    if (stSel.value) q.set("state", stSel.value);
    location.hash = `#/jobs?${q}`;
  };
  nsSel.addEventListener("change", apply);
  stSel.addEventListener("change", apply);
  const body = el("div", {}, el("p", { class: "muted" }, "Loading jobs…"));
  render(
    el("div", { class: "row pagehead" }, el("h1", {}, "Jobs"),
      el("div", { class: "actions" }, canWrite() ? el("a", { href: "#/new" }, el("button", { class: "primary" }, "New job")) : null)),
    el("div", { class: "card row" }, el("label", {}, "Namespace", nsSel), el("label", {}, "State", stSel)),
    body);
  const q = new URLSearchParams({ page_size: "50" });
  if (ns) q.set("namespace", ns);
  if (state) q.set("state", state);
  if (pageToken) q.set("page_token", pageToken);
  let resp;
  try {
    resp = await api(`/api/v1/jobs?${q}`);
  } catch (e) {
    body.replaceChildren(unavailable("Jobs", e));
    return;
  }
  const jobs = list(resp, "jobs");
  if (!jobs.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No jobs match."));
    return;
  }
  const rows = jobs.map((j) => {
    const st = stateName(j.state);
    const { done, total } = progress(j);
    const pct = total ? Math.min(100, Math.round((done / total) * 100)) : 0;
    const bar = el("span", { class: "progress" }, el("span", { class: `w${pct}` }));
    bar.firstChild.style.width = `${pct}%`;
    return el("tr", { "data-job": j.id },
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.name || j.id), el("div", { class: "muted small mono" }, j.id)),
      el("td", {}, j.namespace || "—"),
      el("td", {}, badge(st)),
      el("td", {}, bar, `${done}/${total || "?"}`),
      el("td", { class: "num accuracy" }, fmtPct(lastAccuracy(j))),
      el("td", {}, fmtTime(j.created_at_ms)));
  });
  fillAccuracies(jobs, rows);
  const next = resp && resp.next_page_token;
  body.replaceChildren(
    el("table", { id: "jobs" },
      el("thead", {}, el("tr", {}, el("th", {}, "Job"), el("th", {}, "Namespace"), el("th", {}, "State"),
        el("th", {}, "Progress"), el("th", { class: "num" }, "Accuracy"), el("th", {}, "Created"))),
      el("tbody", {}, rows)),
    ...(next ? [el("p", {}, el("a", { href: `#/jobs?${new URLSearchParams({ namespace: ns, state, page_token: next })}` }, "Next page →"))] : []));
}

// Rounds finished and asked for.
function progress(job) {
  const done = Number(job.round ?? job.rounds_completed) || 0;
  const total = Number(typeof job.rounds === "number" ? job.rounds : job.rounds_total) || 0;
  return { done, total };
}

// A listing carries no rounds: a job that has some gets its last evaluated
// accuracy from its rounds, filled in as they arrive.
function fillAccuracies(jobs, rows) {
  jobs.forEach((j, i) => {
    if (lastAccuracy(j) !== undefined || !progress(j).done) return;
    api(`/api/v1/jobs/${encodeURIComponent(j.id)}/rounds`)
      .then((resp) => {
        const rounds = list(resp, "rounds");
        const acc = lastAccuracy({ rounds_summary: rounds });
        if (acc !== undefined) rows[i].querySelector("td.accuracy").textContent = fmtPct(acc);
      })
      .catch(() => {});
  });
}

function lastAccuracy(job) {
  if (job.last_accuracy !== undefined && job.last_accuracy !== null) return job.last_accuracy;
  if (job.accuracy !== undefined) return job.accuracy;
  const rounds = list(job.rounds_summary || job.rounds, "rounds");
  for (let i = rounds.length - 1; i >= 0; i--) {
    const a = roundAccuracy(rounds[i]);
    if (a) return a;
  }
  return undefined;
}

function roundAccuracy(r) {
  if (!r) return undefined;
  if (r.accuracy !== undefined && r.accuracy !== null) return Number(r.accuracy);
  if (r.evaluation && r.evaluation.accuracy !== undefined) return Number(r.evaluation.accuracy);
  return undefined;
}

function roundLoss(r) {
  if (r.loss !== undefined && r.loss !== null) return Number(r.loss);
  if (r.evaluation && r.evaluation.loss !== undefined) return Number(r.evaluation.loss);
  return undefined;
}

// Per round, the parties selected and how each ended, in whatever shape the
// rounds endpoint gives them.
function roundParties(r) {
  const ps = r.parties || r.selected || r.tasks || [];
  if (!Array.isArray(ps)) return [];
  return ps.map((p) => (typeof p === "string" ? { party: p } : p));
}

function partyCell(r) {
  const ps = roundParties(r);
  if (!ps.length) return el("span", { class: "muted" }, r.updates !== undefined ? `${r.updates} updates` : "—");
  return el("div", {}, ps.map((p) => {
    const outcome = String(p.outcome || p.state || p.result || "").toLowerCase();
    const cls = /fail|refus|drop|timed|left/.test(outcome) ? "bad" : outcome ? "ok" : "";
    return el("div", { class: "small" }, p.party || p.name || "?", " ", outcome ? badge(outcome, cls) : null,
      p.reason ? el("span", { class: "muted" }, ` ${p.reason}`) : null);
  }));
}

async function jobPage(id) {
  const head = el("div", {}, el("p", { class: "muted" }, "Loading job…"));
  const roundsBox = el("div", { id: "rounds" });
  const plots = el("div", { class: "plots", id: "plots" });
  const eventsBox = el("div", { id: "events" });
  const live = el("span", { id: "live" });
  // Outside the head, which every live update redraws.
  const msg = el("div", { id: "job-message" });
  const buttons = jobButtons(id, msg);
  render(head, msg, el("h2", {}, "Metrics"), plots, el("h2", {}, "Round timeline ", live), roundsBox, el("h2", {}, "Events"), eventsBox);

  const refresh = async (job) => {
    if (!job) job = await api(`/api/v1/jobs/${encodeURIComponent(id)}`);
    renderJobHead(head, buttons, job);
    let rounds = null;
    try {
      rounds = list(await api(`/api/v1/jobs/${encodeURIComponent(id)}/rounds`), "rounds");
    } catch (e) {
      if (!(e instanceof ApiError && (e.status === 404 || e.status === 501))) throw e;
      rounds = list(job.rounds_summary || job.rounds, "rounds"); // the job's own round summaries
    }
    renderRounds(roundsBox, plots, rounds);
    try {
      const evs = list(await api(`/api/v1/jobs/${encodeURIComponent(id)}/events`), "events");
      renderEvents(eventsBox, evs);
    } catch (e) {
      eventsBox.replaceChildren(unavailable("Events", e));
    }
    return job;
  };

  let job;
  try {
    job = await refresh();
  } catch (e) {
    head.replaceChildren(errorBox(e));
    return;
  }
  if (!FINAL.has(stateName(job.state))) watchJob(id, live, refresh);
}

// Follows /watch with fetch() streaming (EventSource cannot send the
// Authorization header); every `data:` line is the job as it now is.
async function watchJob(id, live, refresh) {
  const signal = pageAbort.signal;
  live.className = "live";
  live.textContent = "live";
  try {
    const resp = await api(`/api/v1/jobs/${encodeURIComponent(id)}/watch`, { raw: true, headers: { Accept: "text/event-stream" }, signal });
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let pending = Promise.resolve();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const lines = block.split("\n");
        const data = lines.filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (lines.includes("event: error")) {
          live.className = "muted";
          live.textContent = `(live updates: ${data})`;
          continue;
        }
        let job;
        try { job = JSON.parse(data); } catch (_) { continue; }
        pending = pending.then(() => refresh(job.job || job)).catch(() => {});
      }
    }
    await pending;
  } catch (e) {
    if (signal.aborted) return;
    live.className = "muted";
    live.textContent = `(live updates stopped: ${e.message})`;
    return;
  }
  if (!signal.aborted) {
    live.className = "muted";
    live.textContent = "(finished)";
    refresh().catch(() => {});
  }
}

// The stop and delete buttons, made once per job page: a live update redraws
// the head every round, and a button replaced under the pointer loses its click.
function jobButtons(id, msg) {
  const ro = !canWrite();
  const why = ro ? "Viewers cannot stop or delete jobs" : null;
  const stop = el("button", { class: "danger", id: "stop-job", disabled: ro, title: why }, "Stop");
  const del = el("button", { class: "danger", id: "delete-job", disabled: ro, title: why }, "Delete");
  const buttons = { stop, del, ro, why, name: id, stopRequested: false };
  stop.addEventListener("click", async () => {
    if (!confirm(`Stop job ${buttons.name}?`)) return;
    try {
      await api(`/api/v1/jobs/${encodeURIComponent(id)}/stop`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ reason: `stopped from the dashboard by ${me.name}` }),
      });
      msg.replaceChildren(el("div", { class: "notice" }, "Stop requested."));
      buttons.stopRequested = true;
      stop.disabled = true;
    } catch (e) {
      msg.replaceChildren(errorBox(e));
    }
  });
  del.addEventListener("click", async () => {
    if (!confirm(`Delete job ${buttons.name} and its records?`)) return;
    try {
      await api(`/api/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
      location.hash = "#/jobs";
    } catch (e) {
      msg.replaceChildren(errorBox(e));
    }
  });
  return buttons;
}

function renderJobHead(head, buttons, job) {
  const st = stateName(job.state);
  const { stop, del, ro, why } = buttons;
  buttons.name = job.name || job.id;
  stop.disabled = ro || buttons.stopRequested || FINAL.has(st) || st === "stopping";
  const { done, total } = progress(job);
  // The title row (with the buttons) is built once and updated in place.
  if (!buttons.title) {
    buttons.title = el("h1");
    buttons.grid = el("div", { class: "card grid" });
    head.replaceChildren(
      el("div", { class: "row pagehead" }, buttons.title, el("div", { class: "actions" }, stop, del)),
      ...(ro ? [el("p", { class: "muted small", id: "viewer-note" }, `Signed in as a viewer: ${why.toLowerCase()}.`)] : []),
      buttons.grid);
  }
  buttons.title.replaceChildren(job.name || job.id, " ", badge(st));
  buttons.grid.replaceChildren(
    kv("Job id", el("span", { class: "mono" }, job.id)), kv("Namespace", job.namespace || "—"),
    kv("Rounds", `${done} / ${total || "?"}`, "rounds-done"), kv("Best round", job.best_round || "—"),
    kv("Model", job.model_name ? el("a", { href: `#/models/${encodeURIComponent(job.model_name)}` }, job.model_name) : "—"),
    kv("Accuracy", fmtPct(lastAccuracy(job))),
    kv("Created", fmtTime(job.created_at_ms)), kv("Updated", fmtTime(job.updated_at_ms)),
    kv("Reason", job.reason || "—"));
}

function kv(k, v, id) {
  return el("div", {}, el("div", { class: "k" }, k), el("div", { class: "v", id }, v));
}

function renderRounds(box, plots, rounds) {
  rounds = [...rounds].sort((a, b) => Number(a.round) - Number(b.round));
  const acc = rounds.map((r) => ({ x: Number(r.round), y: roundAccuracy(r) })).filter((p) => p.y !== undefined && !Number.isNaN(p.y));
  const loss = rounds.map((r) => ({ x: Number(r.round), y: roundLoss(r) })).filter((p) => p.y !== undefined && !Number.isNaN(p.y));
  plots.replaceChildren(
    linePlot("Accuracy (federated evaluation)", acc, { id: "accuracy", pct: true, ymin: 0, ymax: 1, color: "#1f7a3f" }),
    linePlot("Loss (federated evaluation)", loss, { id: "loss", color: "#b3261e" }));
  if (!rounds.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No rounds completed yet."));
    return;
  }
  box.replaceChildren(el("table", { id: "rounds-table" },
    el("thead", {}, el("tr", {}, el("th", {}, "Round"), el("th", {}, "Parties and outcome"), el("th", { class: "num" }, "Duration"),
      el("th", { class: "num" }, "Accuracy"), el("th", { class: "num" }, "Loss"), el("th", { class: "num" }, "Train loss"),
      el("th", {}, "Model"), el("th", {}, "Problems"))),
    el("tbody", {}, rounds.map((r) => el("tr", { "data-round": r.round },
      el("td", {}, r.round),
      el("td", {}, partyCell(r)),
      el("td", { class: "num" }, fmtDuration(r.duration_ms)),
      el("td", { class: "num" }, fmtPct(roundAccuracy(r))),
      el("td", { class: "num" }, fmtNum(roundLoss(r))),
      el("td", { class: "num" }, fmtNum(r.train_loss)),
      el("td", {}, r.model_version ? `v${r.model_version}` : "—"),
      el("td", { class: "small" }, problems(r)))))));
}

function problems(r) {
  const out = [];
  if (Number(r.task_failures)) out.push(`${r.task_failures} failed`);
  if (Number(r.dropped_updates)) out.push(`${r.dropped_updates} dropped`);
  if (Number(r.refused_updates)) out.push(`${r.refused_updates} refused`);
  return out.length ? out.join(", ") : "—";
}

function renderEvents(box, events) {
  if (!events.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No events."));
    return;
  }
  box.replaceChildren(el("table", { class: "events", id: "events-table" },
    el("thead", {}, el("tr", {}, el("th", {}, "Time"), el("th", {}, "What"), el("th", {}, "Round"), el("th", {}, "Party"), el("th", {}, "Reason"))),
    el("tbody", {}, events.map((e) => {
      const from = stateName(e.from);
      const what = e.kind ? e.kind.replaceAll("_", " ") : from === "unspecified" ? `→ ${stateName(e.to)}` : `${from} → ${stateName(e.to)}`;
      return el("tr", {},
        el("td", { class: "small" }, fmtTime(e.time_ms)),
        el("td", {}, what),
        el("td", {}, e.round || "—"),
        el("td", {}, e.party || "—"),
        el("td", { class: "reason" }, e.reason || ""));
    }))));
}

const SAMPLE_SPEC = `name: my-job
model: {arch: mlp, hidden: [32]}
data: {dataset: digits}
training: {epochs: 1, batch_size: 16, optimizer: {name: sgd, lr: 0.1}}
rounds: 5
clients: {per_round: 2, min: 2, round_timeout: 60s}
`;

function newJobPage() {
  const area = el("textarea", { id: "spec", spellcheck: "false", "aria-label": "Job spec (YAML)" });
  area.value = sessionStorage.getItem("cohort.draft") || SAMPLE_SPEC;
  const out = el("div", { id: "create-result" });
  const submit = el("button", { class: "primary", id: "create-job", type: "submit", disabled: !canWrite() }, "Create job");
  const form = el("form", { class: "card" },
    el("p", { class: "muted" }, "The job spec in YAML, as for ", el("code", {}, "cohort job create"), ". The server validates it."),
    area, el("div", { class: "row" }, submit), out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("cohort.draft", area.value);
    out.replaceChildren(el("p", { class: "muted" }, "Submitting…"));
    try {
      const job = await api("/api/v1/jobs", { method: "POST", headers: { "Content-Type": "application/yaml" }, body: area.value });
      sessionStorage.removeItem("cohort.draft");
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      out.replaceChildren(fieldError(area.value, e));
      const line = e.problem && e.problem.field && findFieldLine(area.value, e.problem.field);
      if (line) {
        // Put the cursor on the field's line, selected.
        const starts = area.value.split("\n").slice(0, line.n - 1).reduce((n, l) => n + l.length + 1, 0);
        area.focus();
        area.setSelectionRange(starts, starts + area.value.split("\n")[line.n - 1].length);
      }
    }
  });
  render(el("h1", {}, "New job"), canWrite() ? null : el("p", { class: "error" }, "Viewers cannot create jobs."), form);
}

// Shows the server's problem at its field: the message, the field's path,
// and the spec's line that sets it when it can be found.
function fieldError(spec, e) {
  const p = e.problem || {};
  const box = el("div", { class: "error", id: "field-error", role: "alert" });
  if (p.field) {
    box.append(el("div", {}, "Field ", el("code", { class: "field-error", id: "error-field" }, p.field), `: ${p.detail || p.title || e.message}`));
    const line = findFieldLine(spec, p.field);
    if (line) box.append(el("pre", { class: "small" }, `line ${line.n}: ${line.text}`));
  } else {
    box.append(`${p.title || "Error"}${p.status ? ` (${p.status})` : ""}: ${p.detail || e.message}`);
  }
  return box;
}

function findFieldLine(spec, field) {
  const parts = String(field).split(".").map((s) => s.replace(/\[\d+\]$/, "")).filter(Boolean);
  const lines = spec.split("\n");
  let from = 0, found = null;
  for (const part of parts) {
    const re = new RegExp(`^\\s*-?\\s*${part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}\\s*:`);
    let hit = -1;
    for (let i = from; i < lines.length; i++) if (re.test(lines[i])) { hit = i; break; }
    if (hit < 0) break;
    found = { n: hit + 1, text: lines[hit].trim() };
    from = hit + 1;
  }
  return found;
}

async function modelsPage() {
  const body = el("div", {}, el("p", { class: "muted" }, "Loading models…"));
  render(el("h1", {}, "Models"), body);
  let resp;
  try {
    resp = await api("/api/v1/models");
  } catch (e) {
    body.replaceChildren(unavailable("Models", e));
    return;
  }
  const models = list(resp, "models");
  if (!models.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No models yet."));
    return;
  }
  body.replaceChildren(el("table", { id: "models" },
    el("thead", {}, el("tr", {}, el("th", {}, "Model"), el("th", {}, "Namespace"), el("th", { class: "num" }, "Versions"),
      el("th", { class: "num" }, "Latest"), el("th", {}, "Updated"))),
    el("tbody", {}, models.map((m) => {
      const versions = list(m.versions, "versions");
      const latest = versions[versions.length - 1] || {};
      const count = typeof m.versions === "number" ? m.versions : versions.length;
      return el("tr", {},
        el("td", {}, el("a", { href: `#/models/${encodeURIComponent(m.name)}` }, m.name)),
        el("td", {}, m.namespace || latest.namespace || "—"),
        el("td", { class: "num" }, count || "—"),
        el("td", { class: "num" }, m.latest_version ? `v${m.latest_version}` : "—"),
        el("td", {}, fmtTime(m.latest_created_at_ms || latest.created_at_ms)));
    }))));
}

async function modelPage(name) {
  const body = el("div", {}, el("p", { class: "muted" }, "Loading…"));
  const msg = el("div", { id: "download-result" });
  render(el("h1", {}, `Model ${name}`), msg, body);
  let resp;
  try {
    resp = await api(`/api/v1/models/${encodeURIComponent(name)}`);
  } catch (e) {
    body.replaceChildren(unavailable("Model", e));
    return;
  }
  const versions = [...list(resp, "versions")].sort((a, b) => Number(b.version) - Number(a.version));
  if (!versions.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No versions."));
    return;
  }
  body.replaceChildren(el("table", { id: "versions" },
    el("thead", {}, el("tr", {}, el("th", {}, "Version"), el("th", {}, "Lineage"), el("th", {}, "Parties"),
      el("th", { class: "num" }, "Accuracy"), el("th", { class: "num" }, "Loss"), el("th", { class: "num" }, "Size"),
      el("th", {}, "Created"), el("th", {}, ""))),
    el("tbody", {}, versions.map((v) => {
      const lin = v.lineage || {};
      const dl = el("button", { class: "download", "data-version": v.version }, "Download");
      dl.addEventListener("click", () => download(name, v, msg));
      return el("tr", { "data-version": v.version },
        el("td", {}, `v${v.version}`, el("div", { class: "muted small mono" }, String(v.digest || "").slice(0, 12))),
        el("td", { class: "small" },
          lin.job_id ? el("div", {}, "job ", el("a", { href: `#/jobs/${encodeURIComponent(lin.job_id)}` }, lin.job_id)) : el("div", { class: "muted" }, "uploaded"),
          lin.round ? el("div", {}, `round ${lin.round}`) : null,
          lin.parent_version ? el("div", {}, `from v${lin.parent_version}`) : null),
        el("td", { class: "small" }, list(lin.parties).join(", ") || "—"),
        el("td", { class: "num" }, fmtPct(v.accuracy ?? (v.metrics && v.metrics.accuracy))),
        el("td", { class: "num" }, fmtNum(v.loss ?? (v.metrics && v.metrics.loss))),
        el("td", { class: "num" }, fmtBytes(v.size_bytes)),
        el("td", { class: "small" }, fmtTime(v.created_at_ms)),
        el("td", {}, dl));
    }))));
}

// Downloads with the Authorization header, checks the digest, and hands the
// bytes to the browser as a file.
async function download(name, v, msg) {
  msg.replaceChildren(el("p", { class: "muted" }, `Downloading v${v.version}…`));
  try {
    const resp = await api(`/api/v1/models/${encodeURIComponent(name)}/versions/${v.version}/download`, { raw: true, headers: { Accept: "application/octet-stream" } });
    const bytes = await resp.arrayBuffer();
    // crypto.subtle exists in secure contexts only (https, localhost).
    const hash = crypto.subtle
      ? Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)), (b) => b.toString(16).padStart(2, "0")).join("")
      : "";
    const matches = !v.digest || !hash || v.digest === hash;
    const url = URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" }));
    const a = el("a", { href: url, download: `${name}-v${v.version}.safetensors` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    msg.replaceChildren(el("div", { class: matches ? "notice" : "error", id: "downloaded", "data-bytes": bytes.byteLength, "data-sha256": hash },
      `Downloaded ${name} v${v.version}: ${bytes.byteLength} bytes, sha256 ${hash.slice(0, 16)}… `,
      !hash ? "(digest not checked: no WebCrypto here)" : matches ? "(matches the stored digest)" : `(does NOT match the stored digest ${v.digest})`));
  } catch (e) {
    msg.replaceChildren(errorBox(e));
  }
}

async function partiesPage() {
  const body = el("div", {}, el("p", { class: "muted" }, "Loading parties…"));
  const msg = el("div");
  render(el("h1", {}, "Parties"), msg, body);
  let resp;
  try {
    resp = await api("/api/v1/clients");
  } catch (e) {
    body.replaceChildren(unavailable("Parties", e));
    return;
  }
  const clients = list(resp, "clients");
  if (!clients.length) {
    body.replaceChildren(el("p", { class: "muted" }, "No parties registered."));
    return;
  }
  const admin = me && String(me.role).toLowerCase() === "admin";
  body.replaceChildren(el("table", { id: "parties" },
    el("thead", {}, el("tr", {}, el("th", {}, "Party"), el("th", {}, "Connection"), el("th", {}, "Datasets"),
      el("th", {}, "Resources"), el("th", { class: "num" }, "Reliability"), el("th", { class: "num" }, "Tasks ok / failed"),
      el("th", {}, "Last seen"), admin ? el("th", {}, "") : null)),
    el("tbody", {}, clients.map((c) => {
      const st = c.revoked ? "revoked" : c.connected ? "connected" : "disconnected";
      const rel = c.reliability || {};
      const res = c.resources || c;
      const gpus = Array.isArray(res.gpus) ? res.gpus.length : res.gpus ?? 0;
      let revoke = null;
      if (admin && !c.revoked) {
        revoke = el("button", { class: "danger" }, "Revoke");
        revoke.addEventListener("click", async () => {
          if (!confirm(`Revoke party ${c.party}? Its certificate will be refused.`)) return;
          try {
            await api(`/api/v1/clients/${encodeURIComponent(c.party)}/revoke`, { method: "POST" });
            route();
          } catch (e) {
            msg.replaceChildren(errorBox(e));
          }
        });
      }
      return el("tr", { "data-party": c.party },
        el("td", { class: "nowrap" }, el("strong", {}, c.party)),
        el("td", {}, badge(st, st === "disconnected" ? "warn" : st)),
        el("td", { class: "small" }, list(c.datasets).map((d) =>
          el("div", {}, el("code", {}, d.name), ` ${d.samples ?? "?"} samples, ${d.features ?? "?"} features, ${d.classes ?? "?"} classes`))),
        el("td", { class: "small" }, `${res.cpus ?? "?"} CPUs, ${fmtBytes(res.memory_bytes)}, ${gpus} GPUs`),
        el("td", { class: "num" }, rel.score !== undefined ? Number(rel.score).toFixed(2) : "—",
          el("div", { class: "muted small" }, `${rel.finished ?? 0} done, ${rel.failed ?? 0} failed, ${rel.timed_out ?? 0} late`)),
        el("td", { class: "num" }, `${c.tasks_succeeded ?? 0} / ${c.tasks_failed ?? 0}`),
        el("td", { class: "small" }, fmtTime(c.last_seen_ms)),
        admin ? el("td", {}, revoke) : null);
    }))));
}

// ---------- routing ----------

async function route() {
  if (pageAbort) pageAbort.abort();
  pageAbort = new AbortController();
  const [path, query] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  if (path === "/login" || !token()) {
    loginPage();
    return;
  }
  if (!me) {
    try {
      me = await api("/api/v1/whoami", { noRedirect: true });
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      loginPage(`Your token was refused: ${e.message}`);
      return;
    }
  }
  showWho();
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.nav === parts[0]);
  try {
    if (parts[0] === "jobs" && parts[1]) await jobPage(parts[1]);
    else if (parts[0] === "new") newJobPage();
    else if (parts[0] === "models" && parts[1]) await modelPage(parts[1]);
    else if (parts[0] === "models") await modelsPage();
    else if (parts[0] === "parties") await partiesPage();
    else await jobsPage(params);
  } catch (e) {
    if (!(e.name === "AbortError")) render(errorBox(e));
  }
}

function showWho() {
  document.getElementById("nav").hidden = false;
  const out = el("button", { id: "logout", type: "button" }, "Sign out");
  out.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    me = null;
    location.hash = "#/login";
  });
  document.getElementById("who").replaceChildren(
    el("span", { id: "whoami" }, `${me.name || "?"} · ${me.role || "?"}`), out);
}

window.addEventListener("hashchange", route);
route();
