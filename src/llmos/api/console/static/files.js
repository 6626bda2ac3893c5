// Files: upload (the validation result, and its errors, shown as the API reports them), list,
// preview of the first lines, delete.
"use strict";
(() => {
  const { api, el, table, replace, notice, failed, bytes, when } = LLMOS;
  const PREVIEW_BYTES = 4096;

  async function refresh() {
    const list = await api("GET", "/v1/files?limit=100");
    replace("files", table([
      { title: "file", cell: (f) => el("button", { type: "button", class: "secondary", onclick: () => preview(f).catch(failed) }, f.filename) },
      { title: "id", cell: (f) => f.id },
      { title: "purpose", cell: (f) => f.purpose },
      { title: "size", cell: (f) => bytes(f.bytes) },
      { title: "status", cell: (f) => f.status + (f.status_details ? `: ${f.status_details}` : "") },
      { title: "created", cell: (f) => when(f.created_at) },
      { title: "", cell: (f) => el("button", { type: "button", class: "danger", "aria-label": `delete ${f.filename}`, onclick: async () => {
        if (!window.confirm(`Delete ${f.filename}?`)) return;
        try { await api("DELETE", `/v1/files/${f.id}`); await refresh(); } catch (error) { failed(error); }
      } }, "Delete") },
    ], list.data, "No file yet."));
  }

  async function preview(file) {
    const resp = await fetch(`/v1/files/${file.id}/content`, { credentials: "same-origin", headers: { Range: `bytes=0-${PREVIEW_BYTES - 1}` } });
    if (!resp.ok) throw new LLMOS.ApiError(resp.status, await resp.json().catch(() => null));
    const text = (await resp.text()).slice(0, PREVIEW_BYTES);
    document.getElementById("preview-box").hidden = false;
    document.getElementById("h-preview").textContent = `Preview of ${file.filename}`;
    document.getElementById("preview").textContent = text + (file.bytes > PREVIEW_BYTES ? "\n…" : "");
  }

  document.getElementById("upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = document.getElementById("upload-result");
    try {
      const file = await api("POST", "/v1/files", new FormData(event.target));
      const ok = file.status === "processed";
      replace(out, el("p", { class: ok ? "ok" : "error", id: "upload-status" },
        ok ? `Uploaded ${file.filename}: ${file.records ?? "?"} records` : `${file.filename} failed validation: ${file.status_details}`));
      await refresh();
    } catch (error) {
      replace(out, el("p", { class: "error", id: "upload-status" }, `Refused: ${error.message}`));
    }
    notice("");
  });
  refresh().catch(failed);
})();
