// Cluster (admin): the nodes with their CPUs, GPUs and memory (total and what is left), the engine
// replicas on them with their queues, and the jobs this server runs with their nodes and what
// their workers reserve there (memory, GPUs), read from
// /v1/admin/cluster every few seconds. In single-process mode the one node is this machine and
// each resident model is a replica.
"use strict";
(() => {
  const { api, table, replace, bytes, every } = LLMOS;
  const POLL_MS = 3000;

  const number = (n) => (n === null || n === undefined ? "-" : String(Math.round(n * 100) / 100));
  const count = (n) => (n === null || n === undefined ? "-" : String(n));
  // "available / total" of one resource, or the total alone when what is left is not known.
  function share(node, name, format) {
    const total = node.resources[name];
    if (total === undefined) return "-";
    const left = node.available ? node.available[name] : undefined;
    return left === undefined ? format(total) : `${format(left)} / ${format(total)}`;
  }

  function mode(view) {
    if (view.mode === "ray") {
      const alive = view.nodes.data.filter((n) => n.alive).length;
      return `Ray cluster mode: ${alive} of ${view.nodes.data.length} nodes alive, cluster address ${view.address}.`;
    }
    return "Single-process mode: Ray cluster mode is off (set ray_address or run llmos serve --ray), " +
      "so this machine serves every model in this server's process.";
  }

  async function refresh() {
    const view = await api("GET", "/v1/admin/cluster");
    const nodes = new Map(view.nodes.data.map((n) => [n.id, n]));
    const where = (id) => (nodes.has(id) ? nodes.get(id).address : id);
    replace("cluster-mode", mode(view));
    replace("cluster-nodes", table([
      { title: "node", cell: (n) => (n.id === view.server_node_id ? `${n.address} (this server)` : n.address) },
      { title: "id", cell: (n) => n.id },
      { title: "alive", cell: (n) => (n.alive ? "yes" : "no") },
      { title: "CPUs available / total", cell: (n) => share(n, "CPU", number) },
      { title: "GPUs available / total", cell: (n) => share(n, "GPU", number) },
      { title: "memory available / total", cell: (n) => share(n, "memory", bytes) },
    ], view.nodes.data, "No nodes."));
    replace("cluster-replicas", table([
      { title: "replica", cell: (r) => r.id },
      { title: "model", cell: (r) => r.model },
      { title: "node", cell: (r) => where(r.node_id) },
      { title: "state", cell: (r) => r.state },
      { title: "queue depth", cell: (r) => count(r.queue_depth) },
      { title: "running", cell: (r) => count(r.requests_running) },
      { title: "waiting", cell: (r) => count(r.requests_waiting) },
      { title: "tokens generated", cell: (r) => count(r.tokens_generated) },
      { title: "adapters", cell: (r) => r.adapters.join(", ") },
      { title: "pid", cell: (r) => count(r.pid) },
    ], view.replicas.data, view.mode === "ray" ? "No replicas yet: a model gets its first on its first request." : "No model is resident."));
    replace("cluster-jobs", table([
      { title: "job", cell: (j) => j.id },
      { title: "model", cell: (j) => j.model },
      { title: "tenant", cell: (j) => j.tenant },
      { title: "status", cell: (j) => j.status },
      { title: "node", cell: (j) => where(j.node_id) },
      // A worker started as a child of the API server reserves nothing: "-".
      { title: "memory reserved", cell: (j) => (j.memory_bytes ? bytes(j.memory_bytes) : "-") },
      { title: "GPUs reserved", cell: (j) => (j.gpus ? number(j.gpus) : "-") },
    ], view.jobs.data, "No job runs on this server's node."));
  }

  every(POLL_MS, refresh);
})();
