// Shared helpers of the console's pages: the JSON API called with the session (its CSRF token
// on every state-changing request), server-sent events, and DOM building that never parses
// HTML from data (text nodes only), so nothing a model or a user wrote can run as script.
"use strict";

const LLMOS = (() => {
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const csrf = meta("csrf-token");
  const scopes = meta("scopes").split(" ").filter(Boolean);
  const has = (scope) => scopes.includes("admin") || scopes.includes(scope);

  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.code = error.code || null;
      this.param = error.param || null;
    }
  }

  function requestInit(method, body) {
    const headers = { "X-CSRF-Token": csrf };
    let payload;
    if (body instanceof FormData) {
      payload = body;
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    return { method, headers, body: payload, credentials: "same-origin" };
  }

  function sessionEnded(resp) {
    if (resp.status === 401) {
      window.location.assign("/ui/login?ended=1");
      return true;
    }
    return false;
  }

  async function api(method, path, body) {
    const resp = await fetch(path, requestInit(method, body));
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
    if (sessionEnded(resp) || !resp.ok) throw new ApiError(resp.status, data);
    return data;
  }

  // Throws the API's error for a refused response whose body was not read yet.
  async function refused(resp) {
    let data = null;
    try { data = await resp.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(resp.status, data);
  }

  // GETs ``path``'s bytes as a Blob of ``type`` (a stored file's content is served as octet-stream).
  async function blob(path, type) {
    const resp = await fetch(path, { credentials: "same-origin" });
    if (sessionEnded(resp) || !resp.ok) await refused(resp);
    return new Blob([await resp.arrayBuffer()], { type });
  }

  // POSTs ``body`` and yields each JSON payload of the server-sent events it answers with.
  async function* stream(path, body) {
    const resp = await fetch(path, requestInit("POST", body));
    if (sessionEnded(resp) || !resp.ok) await refused(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function table(columns, rows, empty) {
    if (!rows.length) return el("p", { class: "empty" }, empty || "Nothing yet.");
    return el("table", {},
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { scope: "col" }, c.title)))),
      el("tbody", {}, rows.map((row) => el("tr", {}, columns.map((c) => el("td", {}, c.cell(row)))))));
  }

  function replace(target, ...nodes) {
    const node = typeof target === "string" ? document.getElementById(target) : target;
    node.replaceChildren(...nodes.flat());
    return node;
  }

  function notice(message, kind) {
    const box = document.getElementById("notice");
    if (!box) return;
    box.className = kind || "info";
    box.textContent = message;
  }

  function failed(error) {
    notice(error.message || String(error), "error");
  }

  function bytes(n) {
    if (n === null || n === undefined) return "-";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "-";
  }

  function formJson(form) {
    const out = {};
    for (const input of form.querySelectorAll("[name]")) {
      const name = input.name;
      if (input.type === "checkbox") { if (input.dataset.json !== undefined) out[name] = input.checked; continue; }
      const value = input.value.trim();
      if (value === "") continue;
      out[name] = input.type === "number" ? Number(value) : value;
    }
    return out;
  }

  // Calls ``fn`` now and every ``ms`` while the page is visible; errors are shown, not thrown.
  function every(ms, fn) {
    const run = () => { if (!document.hidden) Promise.resolve(fn()).catch(failed); };
    run();
    return window.setInterval(run, ms);
  }

  async function modelsOf(tasks) {
    const list = await api("GET", "/v1/models");
    return list.data.filter((m) => !tasks || tasks.includes(m.task));
  }

  function fillSelect(select, values, label) {
    replace(select, values.map((v) => el("option", { value: v.value ?? v }, label ? label(v) : (v.label ?? v))));
  }

  return { api, blob, stream, el, table, replace, notice, failed, bytes, when, formJson, every, has, modelsOf, fillSelect, ApiError };
})();
