// Fine-tuning: create a job (supervised, DPO or pre-training: pretrain.js) with every method
// setting and hyperparameter, follow the selected job's loss and accuracy curves (a DPO job's
// reward margin, a pretrain job's loss per character and samples too) from its metrics events,
// its events and checkpoints, and cancel / pause / resume it; chat with a checkpoint in the playground.
"use strict";
(() => {
  const { api, el, table, replace, notice, failed, when, every, modelsOf, fillSelect } = LLMOS;
  const byId = (id) => document.getElementById(id);
  const HYPER = ["n_epochs", "batch_size", "learning_rate_multiplier"];
  const SETTINGS = ["max_seq_length", "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler", "early_stopping_patience", "packing", "group_by_length"];
  const ADAPTER = ["r", "alpha", "dropout", "num_virtual_tokens"];
  // The accuracy each task reports: chat SFT's token accuracy, a classifier's, DPO's pairs ranked right.
  const ACCURACIES = ["mean_token_accuracy", "accuracy", "preference_accuracy"];
  let selected = window.location.hash.slice(1) || null;

  function jobBody(f) {
    const hyperparameters = {};
    for (const k of HYPER) if (f[k] !== undefined) hyperparameters[k] = f[k];
    const type = f.method_type || "supervised";
    if (type === "pretrain") return LLMOSPretrain.body(f, hyperparameters);
    if (type === "dpo" && f.beta !== undefined) hyperparameters.beta = f.beta;
    const adapter = { type: f.adapter_type };
    if (f.adapter_type !== "full") {
      for (const k of ADAPTER) if (f[k] !== undefined) adapter[k] = f[k];
      if (f.target_modules) adapter.target_modules = f.target_modules.includes(",") ? f.target_modules.split(",").map((s) => s.trim()) : f.target_modules;
    }
    const settings = { hyperparameters, adapter };
    for (const k of SETTINGS) if (f[k] !== undefined && f[k] !== false) settings[k] = f[k];
    if (f.fgm_epsilon !== undefined) settings.adversarial = { type: "fgm", epsilon: f.fgm_epsilon };
    if (f.eda_probability !== undefined) settings.augmentation = { type: "eda", probability: f.eda_probability, copies: f.eda_copies || 1 };
    const body = { model: f.model, training_file: f.training_file, method: { type, [type]: settings } };
    for (const k of ["validation_file", "suffix", "seed"]) if (f[k] !== undefined) body[k] = f[k];
    return body;
  }

  // A pretrain job trains text files (purpose pretrain), the others chat, task or preference lines.
  async function fillFiles(purpose) {
    const files = (await api("GET", `/v1/files?purpose=${purpose}&limit=100`)).data.filter((f) => f.status === "processed");
    const options = files.map((f) => ({ value: f.id, label: `${f.filename} (${f.id})` }));
    fillSelect(byId("job-training"), options);
    fillSelect(byId("job-validation"), [{ value: "", label: "none" }, ...options]);
  }

  // Each method's own fields are shown and live only while it is chosen; beta is DPO's alone.
  byId("job-method").addEventListener("change", (event) => {
    const method = event.target.value;
    byId("dpo-beta").disabled = method !== "dpo";
    for (const box of document.querySelectorAll("#job-form [data-methods]")) {
      const mine = box.dataset.methods.split(" ").includes(method);
      box.hidden = !mine;
      if (box.tagName === "FIELDSET") box.disabled = !mine;
      else for (const input of box.querySelectorAll("input, select")) input.disabled = !mine;
    }
    fillFiles(method === "pretrain" ? "pretrain" : "fine-tune").catch(failed);
  });

  byId("job-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const job = await api("POST", "/v1/fine_tuning/jobs", jobBody(LLMOS.formJson(event.target)));
      notice(`Job ${job.id} created`, "ok");
      select(job.id);
      await jobs();
    } catch (error) { failed(error); }
  });

  function select(id) {
    selected = id;
    window.location.hash = id;
    detail().catch(failed);
  }

  async function jobs() {
    const list = await api("GET", "/v1/fine_tuning/jobs?limit=50");
    replace("jobs", table([
      { title: "job", cell: (j) => el("button", { type: "button", class: "secondary", onclick: () => select(j.id) }, j.id) },
      { title: "model", cell: (j) => j.model },
      { title: "status", cell: (j) => j.status },
      { title: "result", cell: (j) => j.fine_tuned_model || "-" },
      { title: "created", cell: (j) => when(j.created_at) },
    ], list.data, "No job yet."));
  }

  function curve(points, name, field) {
    return { name, points: points.filter((p) => p[field] !== undefined && p[field] !== null).map((p) => [p.step, p[field]]) };
  }

  async function detail() {
    if (!selected) return;
    const job = await api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(selected)}`);
    byId("job-detail").hidden = false;
    byId("h-job").textContent = `Job ${job.id}`;
    replace("job-summary", el("p", { id: "job-status", "data-status": job.status },
      `${job.model} · ${job.status}${job.fine_tuned_model ? ` · result ${job.fine_tuned_model}` : ""}${job.error && job.error.message ? ` · ${job.error.message}` : ""}`));
    const act = (label, verb) => el("button", { type: "button", class: "secondary", onclick: async () => {
      try { await api("POST", `/v1/fine_tuning/jobs/${job.id}/${verb}`); notice(`${label}: ${job.id}`, "ok"); await detail(); } catch (error) { failed(error); }
    } }, label);
    replace("job-actions", act("Cancel", "cancel"), act("Pause", "pause"), act("Resume", "resume"));
    const events = await api("GET", `/v1/fine_tuning/jobs/${job.id}/events?limit=500`);
    const metrics = events.data.filter((e) => e.type === "metrics" && e.data).map((e) => e.data).sort((a, b) => a.step - b.step);
    LLMOSCharts.line(byId("loss-chart"), [curve(metrics, "train loss", "train_loss"), curve(metrics, "valid loss", "valid_loss")], { title: "loss by step" });
    const accuracy = ACCURACIES.find((k) => metrics.some((m) => m[`train_${k}`] !== undefined || m[`valid_${k}`] !== undefined)) || ACCURACIES[0];
    const shown = accuracy.replaceAll("_", " ");
    LLMOSCharts.line(byId("accuracy-chart"), [curve(metrics, `train ${shown}`, `train_${accuracy}`), curve(metrics, `valid ${shown}`, `valid_${accuracy}`)], { title: `${shown} by step` });
    const dpo = Boolean(job.method && job.method.type === "dpo");
    byId("reward-box").hidden = !dpo;
    if (dpo) {
      LLMOSCharts.line(byId("reward-chart"), [curve(metrics, "valid reward margin", "valid_reward_margin"), curve(metrics, "valid chosen reward", "valid_chosen_reward"), curve(metrics, "valid rejected reward", "valid_rejected_reward")], { title: "validation rewards by step" });
    }
    const pretrain = Boolean(job.method && job.method.type === "pretrain");
    byId("pretrain-box").hidden = !pretrain;
    byId("samples-box").hidden = !pretrain;
    if (pretrain) LLMOSPretrain.show(metrics, events.data, byId("char-chart"), byId("job-samples"));
    replace("job-events", table([
      { title: "at", cell: (e) => when(e.created_at) },
      { title: "level", cell: (e) => e.level },
      { title: "message", cell: (e) => e.message },
    ], events.data.slice(0, 50), "No event yet."));
    const checkpoints = await api("GET", `/v1/fine_tuning/jobs/${job.id}/checkpoints?limit=50`);
    replace("job-checkpoints", table([
      { title: "step", cell: (c) => c.step_number },
      { title: "model", cell: (c) => el("a", { href: `/ui/playground?model=${encodeURIComponent(c.fine_tuned_model_checkpoint)}` }, c.fine_tuned_model_checkpoint) },
      { title: "metrics", cell: (c) => Object.entries(c.metrics || {}).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", ") },
    ], checkpoints.data, "No checkpoint yet."));
  }

  (async () => {
    fillSelect(byId("job-model"), (await modelsOf()).filter((m) => !["lora", "prefix"].includes(m.format)).map((m) => m.id));
    await fillFiles("fine-tune");
  })().catch(failed);
  every(2000, () => Promise.all([jobs(), detail()]));
})();
