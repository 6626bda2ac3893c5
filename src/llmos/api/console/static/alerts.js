// Alerts: every rule's state, the rules (with a test-fire button) and the history of changes.
"use strict";
(() => {
  const { api, el, table, replace, notice, failed, when, every } = LLMOS;

  async function refresh() {
    let states;
    try {
      states = await api("GET", "/v1/admin/alerts");
    } catch (error) {
      if (error.status === 404) return replace("states", el("p", { class: "muted" }, "Alerting is not available on this server."));
      throw error;
    }
    replace("states", table([
      { title: "rule", cell: (s) => s.rule },
      { title: "severity", cell: (s) => s.severity },
      { title: "state", cell: (s) => el("span", { "data-state": s.state }, s.state) },
      { title: "alerts", cell: (s) => (s.alerts || []).map((a) => `${JSON.stringify(a.labels)} = ${a.value ?? "-"}`).join("; ") || "-" },
    ], states.data, "No rule."));
    const rules = await api("GET", "/v1/admin/alerts/rules");
    replace("rules", table([
      { title: "name", cell: (r) => r.name },
      { title: "condition", cell: (r) => JSON.stringify(r.condition || r.expr || {}) },
      { title: "for", cell: (r) => r.for ?? r.for_s ?? "-" },
      { title: "severity", cell: (r) => r.severity },
      { title: "", cell: (r) => el("button", { type: "button", class: "secondary", onclick: async () => {
        try { await api("POST", `/v1/admin/alerts/rules/${encodeURIComponent(r.name)}/test`); notice(`test notification of ${r.name} sent`, "ok"); } catch (error) { failed(error); }
      } }, "Test-fire") },
    ], rules.data, "No rule."));
    const history = await api("GET", "/v1/admin/alerts/history?limit=50");
    replace("history", table([
      { title: "at", cell: (h) => when(h.at) },
      { title: "rule", cell: (h) => h.rule },
      { title: "change", cell: (h) => `${h.previous ?? h.from_state ?? "?"} → ${h.state ?? h.to_state ?? "?"}` },
      { title: "labels", cell: (h) => JSON.stringify(h.labels || {}) },
    ], history.data, "No change yet."));
  }
  // Each classifier's label shares over the last hour (what the model-output drift rules compare).
  async function labelShares() {
    let history;
    try {
      history = await api("GET", "/v1/admin/metrics/history");
    } catch (error) {
      return replace("label-shares", el("p", { class: "muted" }, "Metrics are not available on this server."));
    }
    const points = history.data || [];
    const models = [...new Set(points.flatMap((p) => Object.keys(p.classification_label_shares || {})))].sort();
    if (!models.length) return replace("label-shares", el("p", { class: "muted" }, "No classification in the last hour."));
    const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const charts = models.map((model) => {
      const box = el("div", { class: "label-share-chart", "data-model": model });
      const shares = points.map((p) => [p.time, (p.classification_label_shares || {})[model]]);
      const labels = [...new Set(shares.flatMap(([, s]) => Object.keys(s || {})))].sort();
      LLMOSCharts.line(box, labels.map((label) => ({
        name: label,
        points: shares.map(([t, s]) => [t, s ? s[label] ?? 0 : NaN]),
      })), { title: `${model}: share of each label`, xFormat: clock });
      return el("figure", {}, el("figcaption", {}, model), box);
    });
    replace("label-shares", ...charts);
  }

  every(5000, refresh);
  every(5000, labelShares);
})();
