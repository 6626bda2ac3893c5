// Models: every version as a tree of lineage (adapters and fine-tuned models under their base),
// description and tags, load (pin) / unload / delete, and pulls followed live over SSE.
"use strict";
(() => {
  const { api, el, table, replace, notice, failed, bytes, when, has } = LLMOS;
  const manage = has("models");
  const following = new Map();

  function byName(models) {
    const groups = new Map();
    for (const m of models) {
      if (!groups.has(m.id)) groups.set(m.id, []);
      groups.get(m.id).push(m);
    }
    for (const versions of groups.values()) versions.sort((a, b) => b.version - a.version);
    return groups;
  }

  function actions(m) {
    if (!manage) return null;
    const ref = encodeURIComponent(m.root);
    const act = (label, fn, cls) => el("button", { type: "button", class: cls || "secondary", onclick: () => fn().catch(failed), "aria-label": `${label} ${m.root}` }, label);
    return el("span", { class: "actions" },
      act("Load", async () => { await api("POST", `/v1/models/${ref}/load`, { pin: true }); notice(`${m.root} loaded and pinned`, "ok"); }),
      act("Unload", async () => { await api("POST", `/v1/models/${ref}/unload`); notice(`${m.root} unloaded`, "ok"); }),
      act("Edit", async () => editForm(m)),
      act("Delete", async () => {
        if (!window.confirm(`Delete ${m.root}?`)) return;
        await api("DELETE", `/v1/models/${ref}`);
        notice(`${m.root} deleted`, "ok");
        await refresh();
      }, "danger"));
  }

  function editForm(m) {
    const holder = document.getElementById(`edit-${m.root}`);
    const description = el("input", { id: `desc-${m.root}`, value: m.description || "", size: 50 });
    const tags = el("input", { id: `tags-${m.root}`, value: (m.tags || []).join(", "), size: 30 });
    const form = el("form", { class: "inline", onsubmit: async (event) => {
      event.preventDefault();
      try {
        const body = { description: description.value, tags: tags.value.split(",").map((t) => t.trim()).filter(Boolean) };
        await api("PATCH", `/v1/models/${encodeURIComponent(m.root)}`, body);
        notice(`${m.root} updated`, "ok");
        await refresh();
      } catch (error) { failed(error); }
    } },
      el("label", { for: description.id }, "Description", description),
      el("label", { for: tags.id }, "Tags (comma-separated)", tags),
      el("button", { type: "submit" }, "Save"));
    replace(holder, form);
    description.focus();
  }

  function node(name, groups, children) {
    const versions = groups.get(name);
    const newest = versions[0];
    const kids = children.get(name) || [];
    return el("li", { "data-model": name },
      el("strong", {}, name), " ",
      el("span", { class: "muted" }, `${newest.task} · ${newest.format} · ${bytes(newest.size_bytes)} · ${newest.owned_by}`), " ",
      (newest.tags || []).map((t) => el("span", { class: "tag" }, t)),
      newest.description ? el("div", { class: "description" }, newest.description) : null,
      el("ul", { "aria-label": `versions of ${name}` }, versions.map((v) => el("li", {},
        `version ${v.version} · created ${when(v.created)} `, actions(v), el("div", { id: `edit-${v.root}` })))),
      kids.length ? el("ul", { class: "tree", "aria-label": `derived from ${name}` }, kids.map((k) => node(k, groups, children))) : null);
  }

  async function refresh() {
    const list = await api("GET", "/v1/models?versions=true");
    const groups = byName(list.data);
    const children = new Map();
    const roots = [];
    for (const [name, versions] of groups) {
      const parent = versions[0].parent;
      if (parent && groups.has(parent) && parent !== name) {
        if (!children.has(parent)) children.set(parent, []);
        children.get(parent).push(name);
      } else roots.push(name);
    }
    replace("models", roots.length ? el("ul", { class: "tree", id: "model-tree" }, roots.map((r) => node(r, groups, children))) : el("p", { class: "empty" }, "No model yet."));
  }

  function pullRow(op) {
    const done = op.total_bytes ? Math.min(op.done_bytes, op.total_bytes) : null;
    return el("div", { class: "pull", "data-pull": op.id, "data-status": op.status },
      el("strong", {}, op.ref), ` · ${op.status}`, op.status === "running" ? el("span", { class: "stage" }, ` · ${op.stage}`) : null,
      done !== null ? el("span", {}, ` · ${bytes(done)} of ${bytes(op.total_bytes)}`) : null,
      op.status === "running" ? el("progress", { max: op.total_bytes || 1, value: done ?? 0, "aria-label": `progress of ${op.ref}` }) : null,
      op.status === "running" && manage ? el("button", { type: "button", class: "secondary", onclick: () => api("POST", `/v1/model_pulls/${op.id}/cancel`).catch(failed) }, "Cancel") : null,
      op.error ? el("p", { class: "error" }, op.error.message) : null,
      op.model ? el("span", {}, ` · registered ${op.model}`) : null);
  }

  function show(op) {
    const box = document.getElementById("pulls");
    const row = pullRow(op);
    const old = box.querySelector(`[data-pull="${op.id}"]`);
    if (old) old.replaceWith(row); else box.prepend(row);
  }

  function follow(op) {
    if (following.has(op.id)) return;
    const source = new EventSource(`/v1/model_pulls/${op.id}/events`);
    following.set(op.id, source);
    source.onmessage = (event) => {
      const state = JSON.parse(event.data);
      show(state);
      if (state.status !== "running") {
        source.close();
        following.delete(op.id);
        if (state.status === "succeeded") refresh().catch(failed);
      }
    };
    source.onerror = () => { source.close(); following.delete(op.id); };
  }

  async function pulls() {
    const list = await api("GET", "/v1/model_pulls");
    for (const op of list.data.slice(0, 10).reverse()) {
      show(op);
      if (op.status === "running") follow(op);
    }
  }

  if (manage) {
    document.getElementById("pull-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const op = await api("POST", "/v1/model_pulls", LLMOS.formJson(event.target));
        show(op);
        follow(op);
      } catch (error) { failed(error); }
    });
    pulls().catch(failed);
  } else {
    document.getElementById("pull-section").hidden = true;
  }
  refresh().catch(failed);
})();
