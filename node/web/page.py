"""The console's page: one server-sent HTML document whose script calls the API (``/api/v1``) for everything.

No framework, no files from elsewhere (a node has no internet): plain DOM code, every value inserted as text
(``textContent``), never as HTML. Each view re-reads the API after a change, so what the page shows is what the
node has in force. Buttons carry ``data-action`` names the browser tests press.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-node console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:center}
header h1{font-size:1.1em;margin:0}nav button{background:none;border:0;color:#cfe0f5;cursor:pointer;font-size:1em}
nav button.on{color:#fff;text-decoration:underline}main{padding:1em}
table{border-collapse:collapse;background:#fff;margin:.5em 0}td,th{border:1px solid #d0d4da;padding:.3em .6em;
text-align:left;font-size:.9em}.ok{color:#11703a}.bad{color:#b3261e;font-weight:bold}.muted{color:#666}
form.inline input{width:9em}#msg{margin:.5em 0;min-height:1.2em}.bar{background:#d0d4da;width:20em;height:1em}
.bar div{background:#1f3a5f;height:1em}#login{max-width:20em;margin:4em auto;background:#fff;padding:1em}
</style></head><body>
<header><h1>cxr-node</h1><nav id="nav"></nav><span id="who" style="margin-left:auto"></span>
<button id="logout" data-action="logout" hidden>Log out</button></header>
<main><div id="msg" role="status"></div>
<form id="login" hidden><h2>Log in</h2>
<p><label>User <input name="name" id="login-name" autocomplete="username" required></label></p>
<p><label>Password <input name="password" id="login-password" type="password" autocomplete="current-password"
required></label></p><p><button type="submit" data-action="login">Log in</button></p></form>
<div id="view"></div></main>
<script>
"use strict";
const VIEWS = ["Overview", "Destinations", "Receiving", "Thresholds", "Failed work", "Results", "Audit", "Sites"];
let me = null, current = "Overview";
const $ = (sel) => document.querySelector(sel);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "on") { for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f); }
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
function say(text, bad) { const m = $("#msg"); m.textContent = text; m.className = bad ? "bad" : "ok"; }
async function api(method, path, body) {
  const opts = {method, headers: {"X-CXR-Console": "1"}, credentials: "same-origin"};
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch("/api/v1" + path, opts);
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (r.status === 401) { showLogin(); throw new Error("please log in"); }
  if (!r.ok && !(data && "ok" in data)) {
    const why = data ? (data.detail || data.title) + (data.errors ? ": " + data.errors.join("; ") : "") : r.status;
    throw new Error(why);
  }
  return data;
}
function table(headers, rows) {
  return el("table", {}, el("tr", {}, headers.map((h) => el("th", {}, h))),
    rows.map((r) => el("tr", {}, r.map((c) => el("td", {}, c)))));
}
function state(up) {
  return up === null || up === undefined ? el("span", {class: "muted"}, "no sends yet")
    : el("span", {class: up ? "ok" : "bad"}, up ? "up" : "DOWN");
}
function admin() { return me && me.role === "admin"; }
function button(label, action, f, attrs) {
  return el("button", {"data-action": action, disabled: !admin(), ...(attrs || {}), on: {click: async (ev) => {
    ev.preventDefault();
    try { await f(); } catch (e) { say(label + ": " + e.message, true); }
  }}}, label);
}
const RENDER = {
  async "Overview"() {
    const o = await api("GET", "/overview");
    const act = o.activity.map((h) => [h.hour.slice(0, 16).replace("T", " "), h.received, h.done, h.skipped, h.failed]);
    const pct = Math.round(100 * (1 - o.disk.free_mb / Math.max(1, o.disk.total_mb)));
    return [el("h2", {}, "Overview"),
      table(["check", "state", "detail"], o.health.map((c) => [c.name,
        el("span", {class: c.ok ? "ok" : "bad", "data-check": c.name}, c.ok ? "ok" : "FAILED"), c.detail])),
      el("p", {}, "Model: ", o.model ? o.model.name + " " + o.model.version : "none in this process",
        " | SCP ", o.scp.ae_title, " port ", o.scp.port, " ", o.scp.listening ? "listening" : "not listening"),
      el("p", {}, "Disk: ", o.disk.free_mb, " MB free of ", o.disk.total_mb, " MB (refuses images below ",
        o.disk.min_free_mb, " MB)"), el("div", {class: "bar"}, el("div", {style: "width:" + pct + "%"})),
      el("h3", {}, "Queue"), table(Object.keys(o.jobs), [Object.values(o.jobs)]),
      el("h3", {}, "Destinations"), table(["name", "AE", "address", "state", "waiting", "last sent"],
        o.destinations.map((d) => [d.name, d.ae_title, d.host + ":" + d.port, state(d.up), d.waiting,
          d.last_sent || ""])),
      el("h3", {}, "Last 24 hours"), table(["hour (UTC)", "received", "analysed", "skipped", "failed"], act)];
  },
  async "Destinations"() {
    const ds = await api("GET", "/destinations");
    const rows = ds.map((d) => [d.name, d.ae_title, d.host, d.port, d.calling_ae || "(node's)", d.shadow ? "yes" : "",
      state(d.up), d.source + (d.version ? " v" + d.version + " by " + d.changed_by : ""),
      el("span", {}, el("button", {"data-action": "echo", "data-name": d.name, on: {click: async (ev) => {
          ev.preventDefault();
          const r = await api("POST", "/destinations/" + encodeURIComponent(d.name) + "/echo");
          const out = document.querySelector("[data-echo-result='" + CSS.escape(d.name) + "']");
          out.textContent = (r.ok ? "echo OK: " : "echo FAILED: ") + r.detail;
          out.className = r.ok ? "ok" : "bad";
        }}}, "Echo"), " ",
        button("Remove", "remove", async () => {
          await api("DELETE", "/destinations/" + encodeURIComponent(d.name));
          say("removed " + d.name); show("Destinations");
        }, {"data-name": d.name}),
        el("div", {"data-echo-result": d.name}))]);
    const form = el("form", {id: "add-destination", class: "inline"},
      ["name", "ae_title", "host", "port", "calling_ae"].map((k) =>
        el("label", {}, k + " ", el("input", {name: k, required: k !== "calling_ae"}))),
      el("label", {}, " shadow ", el("input", {name: "shadow", type: "checkbox"})),
      button("Add or change", "add-destination", async () => {
        const f = new FormData(form), body = {};
        for (const k of ["name", "ae_title", "host", "calling_ae"]) body[k] = f.get(k) || "";
        body.port = parseInt(f.get("port"), 10); body.shadow = f.get("shadow") === "on";
        const exists = ds.some((d) => d.name === body.name);
        await api(exists ? "PUT" : "POST", "/destinations" + (exists ? "/" + encodeURIComponent(body.name) : ""), body);
        say((exists ? "changed " : "added ") + body.name); show("Destinations");
      }));
    return [el("h2", {}, "Destinations"), table(["name", "AE title", "host", "port", "our AE", "shadow", "state",
      "source", ""], rows), el("h3", {}, "Add (or change by name)"), form];
  },
  async "Receiving"() {
    const s = await api("GET", "/scp");
    const rows = Object.entries(s).map(([k, v]) => [k, JSON.stringify(v.value),
      v.source + (v.version ? " v" + v.version + " by " + v.changed_by + " at " + v.changed_at : ""),
      v.restart ? (v.pending_restart ? "PENDING RESTART" : "needs a restart") : "at once"]);
    const callers = (s.allowed_callers.value || []).join(" ");
    const form = el("form", {id: "receiving", class: "inline"},
      el("label", {}, "AE title (at the next start) ", el("input", {name: "ae_title", value: s.ae_title.value})),
      el("label", {}, " allowed callers (space-separated; empty: any) ",
        el("input", {name: "allowed_callers", value: callers, style: "width:24em"})),
      el("label", {}, " max associations ", el("input", {name: "max_associations", type: "number",
        value: s.max_associations.value})),
      button("Save", "save-receiving", async () => {
        const f = new FormData(form);
        const list = String(f.get("allowed_callers") || "").split(/\\s+/).filter((x) => x);
        const body = {allowed_callers: list, max_associations: parseInt(f.get("max_associations"), 10)};
        if (f.get("ae_title") !== s.ae_title.value) body.ae_title = f.get("ae_title");
        await api("PATCH", "/scp", body);
        say("receiving settings saved"); show("Receiving");
      }));
    return [el("h2", {}, "Receiving"), table(["key", "value", "source", "takes effect"], rows), form];
  },
  async "Thresholds"() {
    const t = await api("GET", "/thresholds");
    const rows = t.thresholds.map((x) => {
      const input = el("input", {type: "number", step: "0.0001", min: "0", max: "1", "data-label": x.label,
        value: x.override ? x.override.value : ""});
      return [x.sets_triage_flag ? x.label : x.label + " (informational: sets no triage flag)",
        x.package ? x.package.value.toFixed(4) + " (" + x.package.method + ")" : "",
        x.node_toml === null ? "" : x.node_toml, input,
        x.override ? "v" + x.override.version + " by " + x.override.changed_by + " at " + x.override.changed_at : "",
        el("b", {"data-in-force": x.label}, x.in_force === null ? "" : Number(x.in_force).toFixed(4)),
        el("span", {}, button("Set", "set-threshold", async () => {
          const v = input.value === "" ? null : Number(input.value);
          const b = {}; b[x.label] = v;
          await api("PUT", "/thresholds", b); say(x.label + " threshold saved"); show("Thresholds");
        }, {"data-label": x.label}), " ", button("Clear", "clear-threshold", async () => {
          const b = {}; b[x.label] = null;
          await api("PUT", "/thresholds", b); say(x.label + " override removed"); show("Thresholds");
        }, {"data-label": x.label}))];
    });
    return [el("h2", {}, "Thresholds"), el("p", {}, t.model ? "Model " + t.model.name + " " + t.model.version : "",
      " | ", t.note), table(["label", "package", "node.toml", "override", "changed", "in force", ""], rows)];
  },
  async "Failed work"() {
    const f = await api("GET", "/failures");
    const act = (what, id, action) => button(action === "retry" ? "Retry" : "Discard", action + "-" + what,
      async () => { await api("POST", "/" + what + "/" + id + "/" + action); say(action + " " + what + " " + id);
        show("Failed work"); }, {"data-id": id});
    return [el("h2", {}, "Failed work"), el("h3", {}, "Sends"),
      table(["id", "destination", "kind", "result UID", "state", "attempts", "error", ""], f.sends.map((s) => [s.id,
        s.destination, s.kind, s.sop_instance_uid, s.state, s.attempts, s.error,
        el("span", {}, act("sends", s.id, "retry"), " ", s.state === "failed" ? act("sends", s.id, "discard") : "")])),
      el("h3", {}, "Jobs"), table(["id", "image UID", "caller", "attempts", "error", ""], f.jobs.map((j) => [j.id,
        j.sop_instance_uid, j.calling_ae, j.attempts, j.error,
        el("span", {}, act("jobs", j.id, "retry"), " ", act("jobs", j.id, "discard"))]))];
  },
  async "Results"() {
    const rs = await api("GET", "/results?limit=50");
    return [el("h2", {}, "Recent results"), table(["time", "image UID", "caller", "result", "scores", "sent"],
      rs.map((r) => [r.at.slice(0, 19).replace("T", " "), r.sop_instance_uid, r.calling_ae, r.result,
        Object.entries(r.findings || {}).filter(([, f]) => "probability" in f).map(([l, f]) =>
          l + " " + f.probability.toFixed(3) + (f.present ? " >= " : " < ") + f.threshold.toFixed(3) +
          (f.informational ? " (info)" : "")).join("; "),
        r.sent.map((s) => s.kind + "->" + s.destination + ": " + s.state).join("; ")]))];
  },
  async "Audit"() {
    const es = await api("GET", "/audit?limit=200");
    return [el("h2", {}, "Audit trail"), table(["time", "event", "outcome", "actor", "address", "detail"],
      es.map((e) => [e.at.slice(0, 19).replace("T", " "), e.event, e.outcome, e.actor, e.address,
        Object.entries(e.detail).map(([k, v]) => k + "=" + v).join(" ")]))];
  },
  async "Sites"() {
    const ss = await api("GET", "/sites");
    const rows = [];
    for (const s of ss) for (const [label, f] of Object.entries(s.labels)) rows.push([s.site, s.images, label,
      f.drift === undefined || f.drift === null ? "" : Number(f.drift).toFixed(3), f.alert ? "ALERT" : "",
      Number(f.threshold).toFixed(4), f.suggested_threshold == null ? "" : Number(f.suggested_threshold).toFixed(4)]);
    return [el("h2", {}, "Sites: score drift"), table(["site", "images", "label", "drift (KS)", "", "threshold",
      "suggested"], rows)];
  },
};
async function show(name) {
  current = name;
  for (const b of document.querySelectorAll("#nav button")) b.className = b.dataset.view === name ? "on" : "";
  try { $("#view").replaceChildren(...(await RENDER[name]())); }
  catch (e) { if (me) say(name + ": " + e.message, true); }
}
function showLogin() { me = null; $("#login").hidden = false; $("#view").replaceChildren(); $("#nav").hidden = true;
  $("#logout").hidden = true; $("#who").textContent = ""; }
async function start() {
  const r = await fetch("/api/v1/me", {headers: {"X-CXR-Console": "1"}, credentials: "same-origin"});
  if (!r.ok) { showLogin(); return; }
  me = await r.json();
  $("#login").hidden = true; $("#nav").hidden = false; $("#logout").hidden = false;
  $("#who").textContent = me.name + " (" + me.role + ")";
  $("#nav").replaceChildren(...VIEWS.map((v) => el("button", {"data-view": v, on: {click: () => { say("");
    show(v); }}}, v)));
  show(current);
}
$("#login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await fetch("/api/v1/session", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({name: $("#login-name").value, password: $("#login-password").value})});
  if (!r.ok) { const d = await r.json().catch(() => ({})); say("login failed: " + (d.detail || r.status), true);
    return; }
  say("");
  start();
});
$("#logout").addEventListener("click", async () => { await fetch("/api/v1/session", {method: "DELETE"});
  showLogin(); });
start();
</script></body></html>
"""
