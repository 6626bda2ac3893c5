// Overview: health, firing alerts, resident models and their memory, running jobs, and the
// server's last hour of throughput and latency (from /v1/admin/metrics/history).
"use strict";
(() => {
  const { api, el, table, replace, bytes, when, every, has } = LLMOS;

  async function health() {
    const resp = await fetch("/ready", { credentials: "same-origin" });
    const body = await resp.json().catch(() => ({}));
    const ok = resp.ok;
    replace("health", el("p", { class: ok ? "ok" : "error", id: "health-state" }, ok ? "Ready" : `Not ready: ${(body.error || {}).message || resp.status}`));
  }

  async function alerts() {
    if (!has("admin")) return replace("alerts", el("p", { class: "muted" }, "Alerts need the admin scope."));
    try {
      const list = await api("GET", "/v1/admin/alerts");
      const firing = (list.data || []).filter((a) => a.state === "firing");
      replace("alerts", table([
        { title: "rule", cell: (a) => a.rule },
        { title: "severity", cell: (a) => a.severity || "-" },
        { title: "state", cell: (a) => a.state },
      ], firing, "No alert is firing."));
    } catch (error) {
      replace("alerts", el("p", { class: "muted" }, error.status === 404 ? "Alerting is not available on this server." : error.message));
    }
  }

  async function resident() {
    if (!has("models")) return replace("resident", el("p", { class: "muted" }, "Resident models need the models scope."));
    const list = await api("GET", "/v1/resident_models");
    replace("resident",
      el("p", {}, `${bytes(list.resident_bytes)} of ${bytes(list.memory_budget_bytes)} in use`),
      table([
        { title: "model", cell: (m) => m.name },
        { title: "memory", cell: (m) => bytes(m.memory_bytes) },
        { title: "pinned", cell: (m) => (m.pinned ? "yes" : "no") },
        { title: "busy rows", cell: (m) => m.busy ?? "-" },
        { title: "adapters", cell: (m) => (m.adapters || []).join(", ") || "-" },
      ], list.data, "No model is in memory."));
  }

  async function jobs() {
    if (!has("fine-tune")) return replace("jobs", el("p", { class: "muted" }, "Jobs need the fine-tune scope."));
    const list = await api("GET", "/v1/fine_tuning/jobs?limit=50");
    const running = list.data.filter((j) => ["queued", "running", "validating_files"].includes(j.status));
    replace("jobs", table([
      { title: "job", cell: (j) => el("a", { href: `/ui/fine-tuning#${j.id}` }, j.id) },
      { title: "model", cell: (j) => j.model },
      { title: "status", cell: (j) => j.status },
      { title: "created", cell: (j) => when(j.created_at) },
    ], running, "No job is running."));
  }

  async function charts() {
    let history;
    try {
      history = await api("GET", "/v1/admin/metrics/history");
    } catch (error) {
      const text = error.status === 403 ? "Charts need the metrics scope." : "Metrics are not available on this server.";
      replace("throughput", el("p", { class: "muted" }, text));
      replace("latency", el("p", { class: "muted" }, text));
      return;
    }
    const points = history.data || [];
    const series = (name, field) => ({ name, points: points.map((p) => [p.time, p[field] ?? NaN]) });
    const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    LLMOSCharts.line(document.getElementById("throughput"), [
      series("tokens/s", "generation_tokens_per_second"),
      series("requests/s", "requests_per_second"),
    ], { title: "throughput", xFormat: clock });
    LLMOSCharts.line(document.getElementById("latency"), [
      series("TTFT (s)", "time_to_first_token_mean_seconds"),
      series("end to end (s)", "e2e_request_latency_mean_seconds"),
    ], { title: "latency", xFormat: clock });
  }

  every(5000, () => Promise.all([health(), alerts(), resident(), jobs(), charts()]));
})();
