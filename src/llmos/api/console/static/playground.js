// Playground: streaming chat with any chat model or adapter (two side by side on one prompt),
// embedding similarity, and classification / NER results marked in the text.
"use strict";
(() => {
  const { api, stream, el, replace, failed, modelsOf, fillSelect } = LLMOS;
  const byId = (id) => document.getElementById(id);

  async function chat(model, body, out) {
    replace(out);
    out.dataset.state = "streaming";
    try {
      for await (const chunk of stream("/v1/chat/completions", { ...body, model, stream: true })) {
        if (chunk.error) throw new LLMOS.ApiError(500, chunk);
        const delta = ((chunk.choices || [])[0] || {}).delta || {};
        if (delta.content) out.append(delta.content);
      }
      out.dataset.state = "done";
    } catch (error) {
      out.dataset.state = "failed";
      out.append(el("span", { class: "error" }, ` [${error.message}]`));
    }
  }

  byId("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = LLMOS.formJson(event.target);
    const messages = [];
    if (f.system) messages.push({ role: "system", content: f.system });
    messages.push({ role: "user", content: f.message });
    const body = { messages };
    for (const k of ["temperature", "top_p", "max_tokens", "seed", "presence_penalty", "frequency_penalty"]) {
      if (f[k] !== undefined) body[k] = f[k];
    }
    byId("out-a-title").textContent = f.model;
    byId("out-b-box").hidden = !f.model_b;
    const runs = [chat(f.model, body, byId("out-a"))];
    if (f.model_b) {
      byId("out-b-title").textContent = f.model_b;
      runs.push(chat(f.model_b, body, byId("out-b")));
    }
    await Promise.all(runs);
  });

  byId("embed-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = LLMOS.formJson(event.target);
    try {
      const result = await api("POST", "/v1/embeddings", { model: f.model, input: [f.a, f.b] });
      const [a, b] = result.data.map((d) => d.embedding);
      const dot = a.reduce((s, v, i) => s + v * b[i], 0);
      const norm = (v) => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
      byId("embed-out").textContent = `Cosine similarity: ${(dot / (norm(a) * norm(b))).toFixed(4)}`;
    } catch (error) { failed(error); }
  });

  let classifiers = [];
  byId("classify-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = LLMOS.formJson(event.target);
    const model = classifiers.find((m) => m.id === f.model);
    const out = byId("classify-out");
    try {
      if (model && model.task === "token-classification") {
        const result = await api("POST", "/v1/ner", { model: f.model, input: f.text });
        const entities = result.data[0].entities;
        const parts = [];
        let at = 0;
        for (const e of entities) {
          parts.push(f.text.slice(at, e.start));
          parts.push(el("mark", { class: "entity", "data-entity": e.entity, title: `${e.entity} ${e.score.toFixed(2)}` }, f.text.slice(e.start, e.end), el("small", {}, e.entity)));
          at = e.end;
        }
        parts.push(f.text.slice(at));
        replace(out, parts);
      } else {
        const result = await api("POST", "/v1/classifications", { model: f.model, input: f.text });
        const top = result.data[0];
        const scores = top.scores;
        // The text marked with its most likely label, then every label's score as a bar.
        const marked = el("p", {}, el("mark", { class: "label", "data-label": top.label, title: `${top.label} ${top.score.toFixed(2)}` }, f.text, el("small", {}, top.label)));
        replace(out, marked, scores.map((s) => el("div", {}, el("span", { class: "bar", style: null, "data-width": s.score }), ` ${s.label} ${(s.score * 100).toFixed(1)}%`)));
        out.querySelectorAll(".bar").forEach((bar) => { bar.style.width = `${Math.round(Number(bar.dataset.width) * 200)}px`; });
      }
    } catch (error) { failed(error); }
  });

  (async () => {
    const chatModels = await modelsOf(["chat", "completion"]);
    const wanted = new URLSearchParams(window.location.search).get("model");
    const names = chatModels.map((m) => m.id);
    if (wanted && !names.includes(wanted)) names.unshift(wanted);
    fillSelect(byId("chat-model"), names);
    if (wanted) byId("chat-model").value = wanted;
    fillSelect(byId("chat-model-b"), [{ value: "", label: "none" }, ...names.map((n) => ({ value: n, label: n }))]);
    fillSelect(byId("embed-model"), (await modelsOf(["embedding"])).map((m) => m.id));
    classifiers = await modelsOf(["sequence-classification", "token-classification"]);
    fillSelect(byId("classify-model"), classifiers.map((m) => m.id));
  })().catch(failed);
})();
