// Usage: tokens by day as a chart, and the ledger's rows (a tenant sees its own).
"use strict";
(() => {
  const { api, table, replace, failed } = LLMOS;
  (async () => {
    const rows = (await api("GET", "/v1/usage")).data;
    const days = [...new Set(rows.map((r) => r.day))].sort();
    const sum = (day, field) => rows.filter((r) => r.day === day).reduce((s, r) => s + r[field], 0);
    const x = (day) => Date.parse(day) / 1000;
    LLMOSCharts.line(document.getElementById("usage-chart"), [
      { name: "prompt tokens", points: days.map((d) => [x(d), sum(d, "prompt_tokens")]) },
      { name: "completion tokens", points: days.map((d) => [x(d), sum(d, "completion_tokens")]) },
    ], { title: "tokens by day", xFormat: (t) => new Date(t * 1000).toISOString().slice(0, 10) });
    replace("usage-table", table([
      { title: "day", cell: (r) => r.day },
      { title: "tenant", cell: (r) => r.tenant },
      { title: "model", cell: (r) => r.model },
      { title: "kind", cell: (r) => r.kind },
      { title: "requests", cell: (r) => r.requests },
      { title: "prompt tokens", cell: (r) => r.prompt_tokens },
      { title: "completion tokens", cell: (r) => r.completion_tokens },
    ], rows, "No usage yet."));
  })().catch(failed);
})();
