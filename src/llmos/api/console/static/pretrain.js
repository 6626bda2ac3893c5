// Pre-training on the fine-tuning page: the job body of method "pretrain" (a size preset or
// explicit dimensions, the BPE's vocabulary, the split, a sample prompt) built from the form, and
// a pretrain job's own views: validation loss per character beside per token, and the samples
// its validations wrote as events ("Sample: ...").
"use strict";

const LLMOSPretrain = (() => {
  const { el, replace, when } = LLMOS;
  const DIMS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"];
  // The loop settings a pretrain job takes (packing and length grouping are the chat rows' own:
  // a pretrain job always packs its windows).
  const SETTINGS = ["max_seq_length", "gradient_accumulation_steps", "warmup_ratio", "lr_scheduler", "early_stopping_patience"];
  const SAMPLE_PREFIX = "Sample: ";
  const SAMPLES_SHOWN = 4;

  function body(f, hyperparameters) {
    const options = { hyperparameters };
    for (const k of SETTINGS) if (f[k] !== undefined) options[k] = f[k];
    const architecture = {};
    for (const k of DIMS) if (f[k] !== undefined) architecture[k] = f[k];
    if (Object.keys(architecture).length) options.architecture = architecture;
    if (f.vocab_size !== undefined) options.tokenizer = { type: "bpe", vocab_size: f.vocab_size };
    if (f.validation_split !== undefined) options.validation_split = f.validation_split;
    if (f.sample_prompt !== undefined) options.samples = { prompts: [f.sample_prompt] };
    const job = { model: f.preset, training_file: f.training_file, method: { type: "pretrain", pretrain: options } };
    for (const k of ["validation_file", "suffix", "seed"]) if (f[k] !== undefined) job[k] = f[k];
    return job;
  }

  const validation = (metrics, name, field) => ({
    name,
    points: metrics.filter((m) => Number.isFinite(m[field])).map((m) => [m.step, m[field]]),
  });

  // events: the job's events, newest first; metrics: its metrics reports by step.
  function show(metrics, events, chart, samples) {
    LLMOSCharts.line(chart, [
      validation(metrics, "valid loss per char", "valid_loss_per_char"),
      validation(metrics, "valid loss per token", "valid_loss"),
    ], { title: "validation loss (nats) by step" });
    const written = events.filter((e) => typeof e.message === "string" && e.message.startsWith(SAMPLE_PREFIX));
    replace(samples, written.length
      ? el("ul", { class: "samples" }, written.slice(0, SAMPLES_SHOWN).map((e) =>
        el("li", {}, el("span", { class: "muted" }, `${when(e.created_at)} `), el("pre", { class: "sample" }, e.message.slice(SAMPLE_PREFIX.length)))))
      : el("p", { class: "empty" }, "No sample yet: one follows each validation."));
  }

  return { body, show };
})();
