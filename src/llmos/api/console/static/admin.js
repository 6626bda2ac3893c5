// Admin: tenants (create, disable / enable), API keys (create with scopes, revoke; a new key is
// shown once), and the audit log.
"use strict";
(() => {
  const { api, el, table, replace, notice, failed, when } = LLMOS;

  async function tenants() {
    const list = await api("GET", "/v1/admin/tenants");
    replace("tenants", table([
      { title: "id", cell: (t) => t.id },
      { title: "name", cell: (t) => t.name || "" },
      { title: "state", cell: (t) => (t.disabled ? "disabled" : "active") },
      { title: "", cell: (t) => el("button", { type: "button", class: "secondary", onclick: async () => {
        try { await api("PATCH", `/v1/admin/tenants/${t.id}`, { disabled: !t.disabled }); await tenants(); } catch (error) { failed(error); }
      } }, t.disabled ? "Enable" : "Disable") },
    ], list.data));
  }

  async function keys() {
    const list = await api("GET", "/v1/admin/keys");
    replace("keys", table([
      { title: "id", cell: (k) => k.id },
      { title: "name", cell: (k) => k.name },
      { title: "tenant", cell: (k) => k.tenant },
      { title: "scopes", cell: (k) => (k.scopes || []).join(", ") },
      { title: "state", cell: (k) => (k.revoked_at ? "revoked" : "active") },
      { title: "", cell: (k) => (k.revoked_at ? "" : el("button", { type: "button", class: "danger", "aria-label": `revoke ${k.name}`, onclick: async () => {
        if (!window.confirm(`Revoke ${k.name}?`)) return;
        try { await api("DELETE", `/v1/admin/keys/${k.id}`); await keys(); } catch (error) { failed(error); }
      } }, "Revoke")) },
    ], list.data));
  }

  async function audit() {
    const list = await api("GET", "/v1/admin/audit?limit=100");
    replace("audit", table([
      { title: "at", cell: (e) => when(e.at) },
      { title: "action", cell: (e) => e.action },
      { title: "tenant", cell: (e) => e.tenant || "" },
      { title: "target", cell: (e) => e.target || "" },
      { title: "client", cell: (e) => e.client || "" },
    ], list.data));
  }

  document.getElementById("tenant-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try { await api("POST", "/v1/admin/tenants", LLMOS.formJson(event.target)); notice("tenant created", "ok"); await tenants(); } catch (error) { failed(error); }
  });
  document.getElementById("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const scopes = [...document.querySelectorAll("#key-scopes input:checked")].map((i) => i.value);
    const f = LLMOS.formJson(event.target);
    try {
      const key = await api("POST", "/v1/admin/keys", { name: f.name, tenant: f.tenant, scopes });
      document.getElementById("new-key").textContent = `New key (shown once, store it now): ${key.key}`;
      await keys();
    } catch (error) { failed(error); }
  });
  Promise.all([tenants(), keys(), audit()]).catch(failed);
})();
