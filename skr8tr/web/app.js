// skr8tr status page: follows /v1/watch and re-reads /api/state; read-only, no build step.
//
// Data flow: /api/config says where the WebSocket API is. /v1/watch sends a
// snapshot, then events. Events go to the event log (seeded from /api/events
// on every snapshot) and, debounced, trigger a re-read of /api/state, which is
// what the tables show. /api/state is also re-read every STATE_POLL_MS for
// heartbeat numbers (CPU, RAM), which are not events. Ages and elapsed times
// tick locally between reads. When the stream drops, the page says so and
// reconnects with jittered exponential backoff.
"use strict";

(() => {
  const RECONNECT_MIN_S = 0.5;
  const RECONNECT_MAX_S = 10;
  const CONNECT_TIMEOUT_MS = 5000;
  const FETCH_TIMEOUT_MS = 4000;
  const STATE_POLL_MS = 2000;
  const DEBOUNCE_MS = 100;
  const MAX_EVENTS = 200;

  const page = {
    config: null,
    state: null,
    stateAt: 0, // performance.now() when `state` arrived
    stateToken: 0,
    events: new Map(), // seq -> {seq, ts, event, data}
    renderedMaxSeq: 0,
    ws: null,
    attempt: 0,
    lostAt: null, // Date.now() when the stream dropped; null while live
    lostReason: "",
    retryAt: 0,
    retryTimer: null,
    pollTimer: null,
    debounceTimer: null,
    eventsFrame: 0,
    clockOffsetMs: 0, // conductor wall clock minus ours
  };

  // ------------------------------------------------------------------ helpers

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function badge(word, tone) {
    return el("span", { class: `badge tone-${tone}`, "data-badge": word, text: word });
  }

  function bar(fraction, tone, label) {
    const fill = el("div", { class: `bar-fill${tone ? ` tone-${tone}` : ""}` });
    fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
    return el("div", { class: "bar", "aria-hidden": label ? null : "true", title: label }, fill);
  }

  function fmtAge(s) {
    if (!Number.isFinite(s)) return "—";
    s = Math.max(0, s);
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.floor(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} m`;
  }

  function fmtMB(mb) {
    if (mb === null || mb === undefined) return "—";
    return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GB` : `${mb} MB`;
  }

  function fmtClock(tsSeconds) {
    const d = new Date(tsSeconds * 1000 - page.clockOffsetMs);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  // Seconds since `state` arrived; frozen while disconnected (the data is frozen too).
  function sinceState() {
    const now = page.lostAt === null ? performance.now()
      : performance.now() - (Date.now() - page.lostAt);
    return Math.max(0, (now - page.stateAt) / 1000);
  }

  function conductorNow() {
    return (Date.now() + page.clockOffsetMs) / 1000;
  }

  async function getJSON(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const resp = await fetch(path, { cache: "no-store", signal: ctl.signal });
      if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
      return await resp.json();
    } finally {
      clearTimeout(timer);
    }
  }

  // ------------------------------------------------------------------ connection

  function watchUrl(config) {
    if (config.ws_url) return config.ws_url;
    // The API listens on every address: use the host this page was loaded from.
    let host = location.hostname;
    if (host.includes(":") && !host.startsWith("[")) host = `[${host}]`;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    return `${scheme}://${host}:${config.ws_port}${config.ws_path}`;
  }

  const ANNOUNCE = {
    connecting: "Connecting to the conductor.",
    live: "Connected to the conductor; the page updates live.",
    disconnected: "Lost the conductor; reconnecting by itself.",
  };

  function setConn(state, text) {
    const box = $("conn");
    // Only a change of state is announced, not every tick of the countdown.
    if (box.dataset.state !== state) $("conn-announce").textContent = ANNOUNCE[state];
    box.dataset.state = state;
    if ($("conn-text").textContent !== text) $("conn-text").textContent = text;
  }

  async function connect() {
    clearTimeout(page.retryTimer);
    page.retryTimer = null;
    if (page.lostAt === null) setConn("connecting", "Connecting to the conductor…");
    else setConn("disconnected", `Disconnected · reconnecting now (attempt ${page.attempt + 1})`);
    let config;
    try {
      config = await getJSON("/api/config");
    } catch (err) {
      retry("the conductor's HTTP listener does not answer");
      return;
    }
    page.config = config;
    if (config.role === "follower") {
      // Several conductors on etcd: only the leader streams; point to its page.
      showFollower(config.leader);
      retry("this conductor is a follower");
      return;
    }
    showFollower(null, false);
    const url = watchUrl(config);
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      retry(`cannot open ${url}: ${err.message}`);
      return;
    }
    page.ws = ws;
    let live = false;
    const timer = setTimeout(() => ws.close(), CONNECT_TIMEOUT_MS);
    ws.onmessage = (msg) => {
      let doc;
      try {
        doc = JSON.parse(msg.data);
      } catch (err) {
        return; // not ours to fix; the next snapshot or event will do
      }
      if (doc.type === "error") {
        // A follower (or one that lost etcd) names the leader, then closes.
        showFollower(doc.error ? doc.error.leader : null);
        return;
      }
      if (doc.type === "snapshot") {
        clearTimeout(timer);
        live = true;
        onSnapshot(doc);
      } else if (doc.type === "event" && live) {
        onEvent(doc);
      }
    };
    ws.onclose = () => {
      clearTimeout(timer);
      if (page.ws !== ws) return;
      page.ws = null;
      stopPolling();
      retry(live ? "the watch stream closed" : `cannot reach ${url}`);
    };
  }

  // The follower banner: shown with a link to the leader's own status page (its
  // address comes from /api/state's conductors), or hidden.
  async function showFollower(leader, shown = true) {
    const box = $("follower");
    box.hidden = !shown;
    if (!shown) return;
    const slot = $("follower-leader");
    if (!leader) {
      slot.textContent = "No leader is elected yet; this page checks again by itself.";
      return;
    }
    let http = null;
    try {
      const state = await getJSON("/api/state");
      const entry = (state.conductors || []).find((c) => c.url === leader);
      http = entry && entry.http;
    } catch (err) {
      // The link is a comfort; the leader's URL is still shown.
    }
    slot.replaceChildren("The leader is ",
      http ? el("a", { id: "leader-link", href: http, text: http }) : el("code", { text: leader }),
      http ? ` (API ${leader}).` : ".");
  }

  function retry(reason) {
    if (page.lostAt === null) {
      page.lostAt = Date.now();
      page.lostReason = reason;
    }
    const base = Math.min(RECONNECT_MAX_S, RECONNECT_MIN_S * 2 ** page.attempt);
    const delayMs = base * (0.8 + Math.random() * 0.4) * 1000;
    page.attempt += 1;
    page.retryAt = Date.now() + delayMs;
    page.retryTimer = setTimeout(connect, delayMs);
    document.querySelector("main").classList.add("stale");
    renderConn();
    renderSummary();
  }

  function renderConn() {
    const banner = $("banner");
    const follower = !$("follower").hidden;
    if (page.lostAt !== null && page.retryTimer !== null) {
      const secs = Math.max(0, Math.ceil((page.retryAt - Date.now()) / 1000));
      if (follower) setConn("disconnected", `Follower · checking again in ${secs} s`);
      else setConn("disconnected", `Disconnected · reconnecting in ${secs} s (attempt ${page.attempt})`);
    }
    if (page.lostAt === null || follower) {
      banner.hidden = true;
      return;
    }
    const when = new Date(page.lostAt).toLocaleTimeString([], { hour12: false });
    const text = `Lost the conductor at ${when} (${page.lostReason}). ` +
      "Showing the last state received; it may be out of date. Reconnecting by itself.";
    // Several conductors: the others' pages (one of them leads now, or soon).
    const others = ((page.state && page.state.conductors) || [])
      .filter((c) => c.http && c.http !== location.origin);
    const full = others.length ? `${text} Other conductors: ${others.map((c) => c.http).join(" ")}` : text;
    banner.hidden = false;
    if (banner.dataset.text !== full) {
      banner.dataset.text = full;
      banner.replaceChildren(text, ...(others.length ? [" Other conductors of this cluster: ",
        ...others.flatMap((c, i) => [i ? ", " : "", el("a", { href: `${c.http}/`, class: "other-conductor", text: c.http })]),
        "."] : []));
    }
  }

  function onSnapshot(doc) {
    page.attempt = 0;
    page.lostAt = null;
    page.clockOffsetMs = doc.ts * 1000 - Date.now();
    document.querySelector("main").classList.remove("stale");
    setConn("live", "Live");
    renderConn();
    // The log restarts from the conductor's own recent events: after a
    // conductor restart the old sequence numbers mean nothing any more.
    page.events = new Map();
    page.renderedMaxSeq = doc.seq;
    applyState(doc.state);
    loadHistory();
    startPolling();
  }

  async function loadHistory() {
    try {
      const recent = await getJSON("/api/events");
      for (const ev of recent) addEvent(ev);
      scheduleEvents();
    } catch (err) {
      // The live stream still fills the log.
    }
  }

  function onEvent(doc) {
    addEvent({ seq: doc.seq, ts: doc.ts, event: doc.event, data: doc.data || {} });
    scheduleEvents();
    clearTimeout(page.debounceTimer);
    page.debounceTimer = setTimeout(refreshState, DEBOUNCE_MS);
  }

  function addEvent(ev) {
    page.events.set(ev.seq, ev);
    if (page.events.size > MAX_EVENTS) {
      const keep = [...page.events.keys()].sort((a, b) => b - a).slice(0, MAX_EVENTS);
      const kept = new Map(keep.map((seq) => [seq, page.events.get(seq)]));
      page.events = kept;
    }
  }

  function startPolling() {
    stopPolling();
    page.pollTimer = setInterval(refreshState, STATE_POLL_MS);
  }

  function stopPolling() {
    clearInterval(page.pollTimer);
    page.pollTimer = null;
    clearTimeout(page.debounceTimer);
  }

  async function refreshState() {
    if (page.ws === null) return;
    const token = ++page.stateToken;
    try {
      const state = await getJSON("/api/state");
      if (token === page.stateToken && page.lostAt === null) applyState(state);
    } catch (err) {
      // The stream's close handler reports a lost conductor.
    }
  }

  function applyState(state) {
    page.state = state;
    page.stateAt = performance.now();
    renderAll();
  }

  // ------------------------------------------------------------------ derived facts

  // The last link event per node: joined / disconnected / lost.
  function nodeLinks() {
    const links = {};
    const ordered = [...page.events.values()].sort((a, b) => a.seq - b.seq);
    for (const ev of ordered) {
      const node = ev.data && ev.data.node;
      if (ev.event === "node.joined") links[node] = "live";
      else if (ev.event === "node.disconnected") links[node] = "disconnected";
      else if (ev.event === "node.lost") links[node] = "expired";
    }
    return links;
  }

  function nodeStatus(node, ageS, links) {
    const timeout = page.config ? page.config.node_timeout_s : 15;
    const heartbeat = page.config ? page.config.heartbeat_s : 2;
    if (ageS >= timeout || links[node.node] === "expired") return ["expired", "idle"];
    if (links[node.node] === "disconnected") return ["disconnected", "warn"];
    if (ageS > 3 * heartbeat) return ["late", "warn"];
    return ["live", "ok"];
  }

  const REPLICA_TONES = {
    pending: "info", running: "info", ready: "ok", draining: "warn",
    stopping: "warn", exited: "idle", failed: "bad",
  };
  const ROLLOUT_TONES = {
    rolling: "info", complete: "ok", aborted: "warn", failed: "bad", rolled_back: "bad",
  };

  function rolloutTimes(r) {
    let started = null;
    let finished = null;
    for (const ev of page.events.values()) {
      if (!ev.data || ev.data.app !== r.app || ev.data.to_generation !== r.to_generation) continue;
      if (ev.event === "rollout.started") started = ev.ts;
      if (ev.event === "rollout.finished") finished = ev.ts;
    }
    return { started, finished };
  }

  function splitPhase(message) {
    const m = /^(.*) · (\d+(?:\.\d+)?) s$/s.exec(message || "");
    return m ? { phase: m[1], seconds: parseFloat(m[2]) } : { phase: message || "", seconds: null };
  }

  // ------------------------------------------------------------------ rendering

  function renderAll() {
    renderSummary();
    renderRollouts();
    renderNodes();
    renderApps();
    renderFooter();
  }

  function renderSummary() {
    const st = page.state;
    const cfg = page.config;
    if (!$("follower").hidden) {
      $("sum-conductor").textContent = "Follower";
      $("sum-conductor-note").textContent = "the cluster is on the leader's page";
    } else if (page.lostAt !== null) {
      $("sum-conductor").textContent = "Unreachable";
      $("sum-conductor-note").textContent = `since ${new Date(page.lostAt)
        .toLocaleTimeString([], { hour12: false })}`;
    } else if (st) {
      $("sum-conductor").textContent = "Healthy";
      const up = cfg ? fmtAge(conductorNow() - cfg.started) : "—";
      const peers = (st.conductors || []).length;
      const role = peers > 1 ? ` · leader of ${peers} conductors` : "";
      $("sum-conductor-note").textContent = cfg ? `v${cfg.version} · up ${up}${role}` : "";
    }
    if (!st) return;
    const links = nodeLinks();
    const dt = sinceState();
    const counts = { live: 0, late: 0, disconnected: 0, expired: 0 };
    for (const n of st.nodes) counts[nodeStatus(n, n.last_seen_s + dt, links)[0]] += 1;
    $("sum-nodes").textContent = `${counts.live + counts.late} / ${st.nodes.length}`;
    const notes = [];
    if (counts.late) notes.push(`${counts.late} late`);
    if (counts.disconnected) notes.push(`${counts.disconnected} disconnected`);
    if (counts.expired) notes.push(`${counts.expired} expired`);
    $("sum-nodes-note").textContent = st.nodes.length === 0 ? "no node has joined"
      : notes.length ? notes.join(" · ") : "all heartbeating";
    const desired = st.apps.reduce((sum, a) => sum + a.desired, 0);
    const ready = st.apps.reduce((sum, a) => sum + a.ready, 0);
    $("sum-replicas").textContent = `${ready} / ${desired}`;
    $("sum-replicas").dataset.ready = ready;
    $("sum-replicas").dataset.desired = desired;
    $("sum-replicas-note").textContent = [plural(st.apps.length, "app"), ...moving(st.apps),
      `${plural(st.replicas.length, "replica")} tracked`].join(" · ");
    const rolling = st.rollouts.filter((r) => r.state === "rolling");
    $("sum-rollouts").textContent = rolling.length ? `${rolling.length} running` : "None running";
    const ended = st.rollouts.filter((r) => r.state !== "rolling");
    $("sum-rollouts-note").textContent = rolling.length
      ? rolling.map((r) => `${r.app} ${r.replaced}/${r.total}`).join(" · ")
      : ended.length ? ended.map((r) => `${r.app}: ${r.state.replace("_", " ")}`).join(" · ")
        : "none since start";
  }

  // A rollout's batch judged on its traffic (DESIGN.md §11): the window's progress, the
  // verdict, and per generation what users saw since the rollout started.
  const VERDICT_TONES = { watching: "info", passed: "good", promoted: "good", failed: "bad" };
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmtRate = (v) => (isNum(v) ? `${(v * 100).toFixed(2).replace(/\.?0+$/, "")} %` : "–");
  const fmtMs = (v) => (isNum(v) ? (v >= 1000 ? `${(v / 1000).toFixed(2)} s` : `${v.toFixed(v < 10 ? 1 : 0)} ms`) : "–");

  function analysisBlock(r) {
    const a = r.analysis;
    const rows = Array.isArray(r.traffic) ? r.traffic.filter((t) => t && isNum(t.generation)) : [];
    if ((!a || typeof a !== "object") && !rows.some((t) => t.requests)) return null;
    const parts = [];
    if (a && typeof a === "object" && isNum(a.elapsed_s) && isNum(a.window_s)) {
      const verdict = String(a.verdict || "");
      const watching = verdict === "watching" && r.state === "rolling";
      const limits = [`max error rate ${fmtRate(a.max_error_rate)}`];
      if (isNum(a.max_p99_ms)) limits.push(`max p99 ${fmtMs(a.max_p99_ms)}`);
      if (isNum(a.min_requests)) limits.push(`min ${a.min_requests} requests`);
      const win = el("div", {
        class: "bar window", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": a.window_s,
        "aria-valuenow": Math.min(a.elapsed_s, a.window_s),
        "aria-label": `Analysis window of generation ${a.generation}`,
      }, el("div", { class: `bar-fill tone-${VERDICT_TONES[verdict] || "idle"}` }));
      win.firstChild.style.width = `${Math.min(1, a.elapsed_s / a.window_s) * 100}%`;
      parts.push(el("div", { class: "analysis-head" },
        el("strong", { text: `Traffic analysis of generation ${a.generation}` }),
        badge(watching ? "watching" : verdict, VERDICT_TONES[verdict] || "idle"),
        el("span", { class: "muted", text: limits.join(" · ") })));
      parts.push(el("div", { class: "progress-row" }, win, el("span", {
        class: "count", text: `${Math.round(a.elapsed_s)} s of ${Math.round(a.window_s)} s`,
      })));
    }
    if (rows.length) {
      parts.push(el("table", { class: "traffic" },
        el("thead", {}, el("tr", {}, ["Generation", "Requests", "Error rate", "p99"]
          .map((h) => el("th", { scope: "col", text: h })))),
        el("tbody", {}, rows.map((t) => {
          const bad = isNum(t.error_rate) && a && isNum(a.max_error_rate)
            && t.generation === a.generation && t.error_rate > a.max_error_rate;
          return el("tr", { "data-generation": t.generation },
            el("th", { scope: "row", text: `${t.generation}${t.generation === r.to_generation ? " (new)" : t.generation === r.from_generation ? " (old)" : ""}` }),
            el("td", { class: "num", text: isNum(t.requests) ? t.requests : "–" }),
            el("td", { class: `num${bad ? " tone-bad-text" : ""}`, "data-rate": "", text: fmtRate(t.error_rate) }),
            el("td", { class: "num", text: fmtMs(t.p99_ms) }));
        }))));
    }
    return el("div", { class: "analysis" }, parts);
  }

  function renderRollouts() {
    const box = $("rollouts");
    const list = [...page.state.rollouts].sort((a, b) =>
      (a.state !== "rolling") - (b.state !== "rolling") || a.app.localeCompare(b.app));
    if (!list.length) {
      box.replaceChildren(el("p", { class: "empty", text: "No rollout since the conductor started." }));
      return;
    }
    const dt = sinceState();
    box.replaceChildren(...list.map((r) => {
      const rolling = r.state === "rolling";
      const tone = ROLLOUT_TONES[r.state] || "idle";
      const total = Math.max(r.total, 0);
      const fraction = total ? r.replaced / total : (r.state === "complete" ? 1 : 0);
      const { phase, seconds } = splitPhase(r.message);
      const { started, finished } = rolloutTimes(r);
      const label = `${r.replaced} of ${total} replaced`;
      let elapsed = null;
      if (rolling && started !== null) {
        elapsed = el("span", { class: "elapsed", "data-tick": "elapsed", "data-base": started },
          `${fmtAge(conductorNow() - started)} elapsed`);
      } else if (!rolling && finished !== null) {
        const took = started !== null ? ` · took ${fmtAge(finished - started)}` : "";
        elapsed = el("span", { class: "elapsed", text: `ended ${fmtClock(finished)}${took}` });
      }
      const progress = el("div", {
        class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total,
        "aria-valuenow": r.replaced, "aria-valuetext": label, "aria-label": `Rollout of ${r.app}`,
      }, el("div", { class: `bar-fill${rolling ? "" : ` tone-${tone}`}` }));
      progress.firstChild.style.width = `${Math.min(1, fraction) * 100}%`;
      const detail = rolling
        ? el("p", { class: "phase" }, el("strong", { text: "Phase: " }), phase,
          seconds === null ? null : el("span", {
            "data-tick": "phase", "data-base": seconds, "data-at": page.stateAt,
            text: ` · ${fmtAge(seconds + dt)} in this phase`,
          }))
        : el("p", { class: "phase" },
          el("strong", { text: r.state === "complete" ? "Result: " : "Reason: " }), phase);
      return el("article", {
        class: "rollout", "data-app": r.app, "data-state": r.state,
        "data-replaced": r.replaced, "data-total": total, "aria-label": `Rollout of ${r.app}`,
      },
      el("div", { class: "rollout-head" },
        el("h3", { text: r.app }), badge(r.state.replace("_", " "), tone),
        rolling && r.paused === true ? badge("paused", "warn") : null,
        el("span", { class: "gens", text: `generation ${r.from_generation} → ${r.to_generation}` }),
        elapsed),
      el("div", { class: "progress-row" }, progress,
        el("span", { class: "count", text: label })),
      detail, analysisBlock(r));
    }));
  }

  function renderNodes() {
    const body = $("nodes");
    const nodes = page.state.nodes;
    if (!nodes.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "empty",
        text: "No node has joined yet." })));
      return;
    }
    const links = nodeLinks();
    const dt = sinceState();
    body.replaceChildren(...nodes.map((n) => {
      const age = n.last_seen_s + dt;
      const [status, tone] = nodeStatus(n, age, links);
      const cpuTone = n.cpu_pct >= 90 ? "bad" : n.cpu_pct >= 70 ? "warn" : null;
      return el("tr", { class: status === "expired" ? "expired" : null, "data-node": n.node,
        "data-status": status },
      el("th", { scope: "row", class: "mono", text: n.node }),
      el("td", { class: "mono", "data-label": "Address", text: n.address }),
      el("td", { "data-label": "Status" }, badge(status, tone)),
      el("td", { "data-label": "CPU" }, el("div", { class: "cpu" },
        bar(n.cpu_pct / 100, cpuTone, null),
        el("span", { class: "val", text: `${n.cpu_pct.toFixed(1)} %` }))),
      el("td", { class: "num nowrap", "data-label": "Free RAM", text: fmtMB(n.ram_free_mb) }),
      el("td", { "data-label": "Claimed ports" }, n.ports.length
        ? el("div", { class: "ports" }, n.ports.map((p) => el("span", { class: "port", text: p })))
        : el("span", { class: "muted", text: "none" })),
      el("td", { class: "num", "data-label": "Replicas", text: n.replicas }),
      el("td", { class: "num nowrap", "data-label": "Last heartbeat" }, el("span", {
        "data-tick": "age", "data-base": n.last_seen_s, text: `${fmtAge(age)} ago`,
      })));
    }));
  }

  // What the replicas that do not serve are doing, counted over apps: "+1 starting",
  // "1 draining" (a rollout's surge and the replicas it is taking out).
  function moving(apps) {
    const sum = (key) => apps.reduce((n, a) => n + (a[key] || 0), 0);
    const parts = [];
    if (sum("starting")) parts.push(`+${sum("starting")} starting`);
    if (sum("draining")) parts.push(`${sum("draining")} draining`);
    if (sum("stopping")) parts.push(`${sum("stopping")} stopping`);
    return parts;
  }

  function appHealth(app, rollout) {
    if (rollout && rollout.state === "rolling") return ["rolling", "info"];
    if (app.type === "job") {
      return app.running ? ["running", "info"] : ["finished", "idle"];
    }
    if (app.desired === 0) return ["scaled to zero", "idle"];
    if (app.ready >= app.desired) return ["healthy", "ok"];
    if (app.ready === 0) return ["down", "bad"];
    return ["degraded", "warn"];
  }

  function renderApps() {
    const box = $("apps");
    const st = page.state;
    if (!st.apps.length) {
      box.replaceChildren(el("p", { class: "empty", text: "No app is deployed." }));
      return;
    }
    const nodes = Object.fromEntries(st.nodes.map((n) => [n.node, n]));
    box.replaceChildren(...st.apps.map((app) => {
      const rollout = st.rollouts.find((r) => r.app === app.app);
      const [health, tone] = appHealth(app, rollout);
      const mine = st.replicas.filter((r) => r.app === app.app);
      const gens = [...new Set(mine.map((r) => r.generation))].sort((a, b) => b - a);
      const head = el("div", { class: "app-head" },
        el("h3", { text: app.app }), badge(health, tone),
        el("div", { class: "facts" },
          el("span", {}, "generation ", el("strong", { text: app.generation })),
          el("span", {}, "type ", el("strong", { text: app.type })),
          app.type === "job" ? el("span", {}, "completed ", el("strong", { text: app.completed }))
            : null),
        el("div", { class: "app-ready" },
          bar(app.desired ? Math.min(1, app.ready / app.desired) : 0,
            app.ready >= app.desired ? "ok" : "warn", null),
          el("span", { "data-ready": app.ready, "data-desired": app.desired },
            el("strong", { text: `${app.ready} / ${app.desired}` }),
            [" ready", ...moving([app])].join(", "))));
      const table = el("table", { class: "stack" },
        el("caption", { class: "sr-only", text: `Replicas of ${app.app} by generation` }),
        el("thead", {}, el("tr", {},
          el("th", { scope: "col", text: "Replica" }), el("th", { scope: "col", text: "Node" }),
          el("th", { scope: "col", text: "Endpoint" }),
          el("th", { scope: "col", class: "num", text: "PID" }),
          el("th", { scope: "col", class: "num", text: "Restarts" }),
          el("th", { scope: "col", text: "State" }))));
      if (!gens.length) {
        table.append(el("tbody", {}, el("tr", {}, el("td", { colspan: 6, class: "empty",
          text: "No replica right now." }))));
      }
      for (const gen of gens) {
        const rows = mine.filter((r) => r.generation === gen);
        let role = gen < app.generation ? "previous" : "";
        if (gen === app.generation) role = "current";
        if (rollout && rollout.state === "rolling" && gen === rollout.to_generation) {
          role = "new, rolling out";
        }
        const counts = {};
        for (const r of rows) counts[r.state] = (counts[r.state] || 0) + 1;
        const summary = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ");
        table.append(el("tbody", { class: "gen", "data-generation": gen },
          el("tr", {}, el("th", { scope: "rowgroup", colspan: 6, class: "gen-head",
            text: `Generation ${gen}${role ? ` (${role})` : ""} · ${summary}` })),
          rows.map((r) => {
            const address = nodes[r.node] ? nodes[r.node].address : "?";
            // A restarted replica has a new id in the same slot: the title says which.
            const slot = r.slot && r.slot !== r.replica
              ? `slot ${r.slot} · restart ${r.restarts}` : null;
            return el("tr", { "data-replica": r.replica, "data-state": r.state,
              "data-slot": r.slot },
              el("th", { scope: "row", class: "mono nowrap", title: slot, text: r.replica }),
              el("td", { class: "mono", "data-label": "Node", text: r.node }),
              el("td", { class: "mono", "data-label": "Endpoint",
                text: r.port ? `${address}:${r.port}` : address }),
              el("td", { class: "num mono", "data-label": "PID", text: r.pid ?? "—" }),
              el("td", { class: "num", "data-label": "Restarts", "data-restarts": r.restarts,
                text: r.restarts ?? "—" }),
              el("td", { "data-label": "State" },
                badge(r.state, REPLICA_TONES[r.state] || "idle"),
                r.probe && (r.state === "running" || r.state === "pending")
                  ? el("span", { class: "probe mono", "data-probe": "", text: r.probe }) : null,
                whyLine(r)));
          })));
      }
      return el("section", { class: "app", "data-app": app.app, "aria-label": `App ${app.app}` },
        head,
        app.message ? el("p", { class: "app-msg", text: app.message }) : null,
        el("div", { class: "table-wrap" }, table),
        historyList(app.app));
    }));
  }

  // Why a replica ended and when it restarts, or why the one before it in its slot ended.
  function whyText(r) {
    if (!r.reason) return null;
    if (r.state !== "exited" && r.state !== "failed") return `last: ${r.reason}`;
    if (typeof r.next_restart !== "number") return r.reason;
    const left = Math.max(0, r.next_restart - sinceState());
    return `${r.reason} · ${left >= 1 ? `restarting in ${Math.round(left)} s` : "restarting now"}`;
  }

  function whyLine(r) {
    const text = whyText(r);
    if (!text) return null;
    const ended = r.state === "exited" || r.state === "failed";
    return el("div", { class: `why${ended ? " why-ended" : ""}`, title: text, text });
  }

  // Each app's recent generations, newest first: rolled back, aborted and failed
  // rollouts stay listed after later ones (the rollouts panel shows only the last).
  function historyList(name) {
    const rows = ((page.state.history || {})[name] || []).slice().reverse();
    if (rows.length < 2) return null; // only `up`'s generation: nothing to tell yet
    return el("details", { class: "history", "data-history": name, open: true },
      el("summary", { text: `Rollout history · ${plural(rows.length, "generation")}` }),
      el("ol", { class: "history-list", reversed: true },
        rows.map((h) => el("li", { "data-generation": h.generation, "data-state": h.state },
          el("span", { class: "mono gen-no", text: `gen ${h.generation}` }),
          badge(h.state.replace("_", " "), ROLLOUT_TONES[h.state] || "idle"),
          el("span", { class: "muted nowrap",
            text: h.finished ? `ended ${fmtClock(h.finished)}`
              : h.started ? `started ${fmtClock(h.started)}` : "" }),
          h.message && h.state !== "complete"
            ? el("span", { class: "history-msg", title: h.message, text: h.message }) : null))));
  }

  function renderFooter() {
    const cfg = page.config;
    if (!cfg) return;
    $("foot-version").textContent = `skr8tr ${cfg.version} · watch stream ${watchUrl(cfg)} · ` +
      `node timeout ${cfg.node_timeout_s} s`;
  }

  // Events -------------------------------------------------------------

  const SUBJECT_KEYS = ["app", "replica", "node"];

  function eventTone(ev) {
    const name = ev.event;
    const d = ev.data || {};
    if (name === "rollout.finished") return ROLLOUT_TONES[d.state] || "idle";
    if (name === "rollout.analysis") return VERDICT_TONES[d.verdict] || "idle";
    if (/\.(failed|lost|unhealthy|unplaced)$/.test(name)) return "bad";
    if (/^(node\.disconnected|replica\.(draining|stopping)|app\.removed)$/.test(name)) return "warn";
    if (/^(replica\.ready|node\.joined|app\.created)$/.test(name)) return "ok";
    if (name === "replica.exited") return "idle";
    return "info";
  }

  function fmtValue(v) {
    if (Array.isArray(v)) return v.join(", ");
    if (v !== null && typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  const TEXT_KEYS = ["state", "phase", "reason", "message"];

  // One readable line from an event's data: free text first, then the facts.
  function eventDetails(ev) {
    const d = ev.data || {};
    const parts = [];
    for (const key of TEXT_KEYS) {
      if (d[key] !== undefined && d[key] !== null && d[key] !== "") parts.push(fmtValue(d[key]));
    }
    for (const [key, value] of Object.entries(d)) {
      if (SUBJECT_KEYS.includes(key) || TEXT_KEYS.includes(key)) continue;
      if (value === null || value === undefined || value === false) continue;
      if (key === "total" && d.replaced !== undefined) continue;
      if (key === "from_generation" && d.to_generation !== undefined) continue;
      if ((key === "exit_code" || key === "signal") && d.message) continue;
      const label = key.replace(/_(s|ms|mb)$/, "").replaceAll("_", " ");
      if (value === true) parts.push(label);
      else if (key === "replaced" && d.total !== undefined) parts.push(`replaced ${value}/${d.total}`);
      else if (key === "to_generation") {
        parts.push(d.from_generation !== undefined
          ? `generation ${d.from_generation} → ${value}` : `to generation ${value}`);
      } else if (key.endsWith("_s")) parts.push(`${label} ${value} s`);
      else if (key.endsWith("_ms")) parts.push(`${label} ${value} ms`);
      else if (key.endsWith("_mb")) parts.push(`${label} ${fmtMB(value)}`);
      else parts.push(`${label} ${fmtValue(value)}`);
    }
    return parts.join(" · ");
  }

  function scheduleEvents() {
    if (page.eventsFrame) return;
    page.eventsFrame = requestAnimationFrame(() => {
      page.eventsFrame = 0;
      renderEvents();
    });
  }

  function renderEvents() {
    const body = $("events");
    const list = [...page.events.values()].sort((a, b) => b.seq - a.seq);
    if (!list.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 4, class: "empty",
        text: "No events yet." })));
      return;
    }
    const fresh = page.renderedMaxSeq;
    body.replaceChildren(...list.map((ev) => {
      const d = ev.data || {};
      const subject = SUBJECT_KEYS.filter((k) => d[k]).map((k) => d[k]).join(" · ");
      return el("tr", { class: ev.seq > fresh ? "fresh" : null, "data-seq": ev.seq,
        "data-event": ev.event },
      el("td", { class: "col-time mono", title: new Date(ev.ts * 1000).toISOString(),
        text: fmtClock(ev.ts) }),
      el("td", { class: "ev-name" }, badge(ev.event, eventTone(ev))),
      el("td", { class: "mono subject" },
        el("span", { class: "subject-text", title: subject || null, text: subject || "—" })),
      el("td", { class: "details", text: eventDetails(ev) }));
    }));
    page.renderedMaxSeq = Math.max(fresh, list[0].seq);
    renderSummary(); // rollout times and node links come from events too
  }

  // Ticking -----------------------------------------------------------------

  function tick() {
    if (page.lostAt !== null) {
      renderConn();
      return;
    }
    if (!page.state) return;
    const dt = sinceState();
    for (const node of document.querySelectorAll("[data-tick]")) {
      const base = parseFloat(node.dataset.base);
      if (node.dataset.tick === "age") node.textContent = `${fmtAge(base + dt)} ago`;
      else if (node.dataset.tick === "phase") {
        node.textContent = ` · ${fmtAge(base + dt)} in this phase`;
      } else if (node.dataset.tick === "elapsed") {
        node.textContent = `${fmtAge(conductorNow() - base)} elapsed`;
      }
    }
    renderSummary();
  }

  setInterval(tick, 1000);
  connect();
})();
