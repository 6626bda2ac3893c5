// Hyperparameter searches: the list (status, trials done of the budget, best value), and the
// selected search's trials table, best parameters and model, its result files (Optuna's plots
// shown as images, fetched with the session and shown from blob URLs; the trials CSV to save),
// and cancel. Searches are created over the API or the CLI (docs/fine-tuning.md).
"use strict";
(() => {
  const { api, blob, el, table, replace, notice, failed, when, every } = LLMOS;
  const byId = (id) => document.getElementById(id);
  const POLL_MS = 2000;
  const FINISHED = ["succeeded", "failed", "cancelled"];
  let selected = window.location.hash.slice(1) || null;
  let shownFiles = null; // the result files drawn, so polling a finished search fetches them once
  let urls = []; // their blob URLs, released when others replace them

  const number = (v) => (typeof v === "number" ? String(Math.round(v * 10000) / 10000) : v ?? "-");
  const pairs = (object) => Object.entries(object || {}).map(([k, v]) => `${k}=${number(v)}`).join(", ");
  const done = (s) => s.trials.complete + s.trials.pruned + s.trials.failed;
  const best = (s) => (s.best_trial ? `${s.objective.metric} ${number(s.best_trial.value)}` : "-");
  const playground = (model) => el("a", { href: `/ui/playground?model=${encodeURIComponent(model)}` }, model);

  function select(id) {
    selected = id;
    shownFiles = null;
    window.location.hash = id;
    detail().catch(failed);
  }

  async function searches() {
    const list = await api("GET", "/v1/fine_tuning/searches?limit=50");
    replace("searches", table([
      { title: "search", cell: (s) => el("button", { type: "button", class: "secondary", onclick: () => select(s.id) }, s.id) },
      { title: "model", cell: (s) => s.model },
      { title: "status", cell: (s) => s.status },
      { title: "trials done / budget", cell: (s) => `${done(s)} / ${s.budget.max_trials}` },
      { title: "best", cell: best },
      { title: "created", cell: (s) => when(s.created_at) },
    ], list.data, "No search yet."));
  }

  async function detail() {
    if (!selected) return;
    const search = await api("GET", `/v1/fine_tuning/searches/${encodeURIComponent(selected)}`);
    byId("search-detail").hidden = false;
    byId("h-search").textContent = `Search ${search.id}`;
    const { metric, direction } = search.objective;
    replace("search-summary", el("p", { id: "search-status", "data-status": search.status },
      `${search.model} · ${search.status} · ${direction} ${metric} · sampler ${search.sampler.type} · pruner ${search.pruner.type}` +
      ` · ${done(search)} of ${search.budget.max_trials} trials done (${search.trials.running} running)` +
      ` · ${number(search.cpu_seconds)} CPU seconds${search.error ? ` · ${search.error.message}` : ""}`));
    replace("search-actions", el("button", { type: "button", class: "danger", disabled: FINISHED.includes(search.status), onclick: async () => {
      try { await api("POST", `/v1/fine_tuning/searches/${search.id}/cancel`); notice(`Cancelling ${search.id}`, "ok"); await detail(); } catch (error) { failed(error); }
    } }, "Cancel search"));
    const top = search.best_trial;
    replace("search-best", top
      ? el("p", { id: "best-trial" }, `trial ${top.number}: ${metric} ${number(top.value)} with ${pairs(top.params)} · model `,
        top.fine_tuned_model ? playground(top.fine_tuned_model) : "-")
      : el("p", { class: "empty" }, FINISHED.includes(search.status) ? "No trial completed." : "Known once the search ends."));
    const trials = await api("GET", `/v1/fine_tuning/searches/${search.id}/trials`);
    replace("search-trials", table([
      { title: "trial", cell: (t) => t.number },
      { title: "state", cell: (t) => t.state },
      { title: metric, cell: (t) => number(t.value) },
      { title: "parameters", cell: (t) => pairs(t.params) },
      { title: "per epoch", cell: (t) => Object.values(t.intermediate_values).map(number).join(", ") || "-" },
      { title: "job", cell: (t) => (t.fine_tuning_job_id ? el("a", { href: `/ui/fine-tuning#${t.fine_tuning_job_id}` }, t.fine_tuning_job_id) : "-") },
      { title: "model", cell: (t) => (t.fine_tuned_model ? playground(t.fine_tuned_model) : "-") },
      { title: "note", cell: (t) => t.note || "" },
    ], trials.data, "No trial yet."));
    const key = search.result_files.join(" ");
    if (key !== shownFiles) {
      shownFiles = key;
      try {
        await resultFiles(search);
      } catch (error) {
        replace("search-plots", el("p", { class: "error" }, `The result files could not be read: ${error.message}`));
        throw error;
      }
    }
  }

  // The plots as images and every file as a link that saves it; files need the `files` scope.
  async function resultFiles(search) {
    if (!search.result_files.length) {
      replace("search-plots", el("p", { class: "empty" }, "The plots are drawn when the search ends."));
      replace("search-files", el("p", { class: "empty" }, "None yet."));
      return;
    }
    for (const url of urls) URL.revokeObjectURL(url);
    urls = [];
    const plots = [], links = [];
    for (const id of search.result_files) {
      const file = await api("GET", `/v1/files/${id}`);
      const name = file.filename.startsWith(`${search.id}-`) ? file.filename.slice(search.id.length + 1) : file.filename;
      const png = name.endsWith(".png");
      const url = URL.createObjectURL(await blob(`/v1/files/${id}/content`, png ? "image/png" : "text/csv"));
      urls.push(url);
      if (png) plots.push(el("figure", {}, el("img", { src: url, alt: name.replace(".png", "").replaceAll("_", " "), "data-file": name, class: "plot" }), el("figcaption", {}, name)));
      links.push(el("li", {}, el("a", { href: url, download: file.filename }, file.filename)));
    }
    replace("search-plots", plots.length ? plots : el("p", { class: "empty" }, "No plot: they need complete trials."));
    replace("search-files", el("ul", {}, links));
  }

  every(POLL_MS, () => Promise.all([searches(), detail()]));
})();
