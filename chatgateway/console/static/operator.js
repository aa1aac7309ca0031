// The operator page (docs/console.md#the-operator-page): polls /console/status.json with
// an admin token in the Authorization header (kept in this tab's sessionStorage, never
// in a URL) and shows it. Read-only: it calls nothing else.
"use strict";

(() => {
  const C = window.ChatConsole;
  const $ = C.$;
  const POLL_MS = 2000;
  const TOKEN_KEY = "chatgateway.console.admin";
  const RATES = [
    ["commands_received", "commands received"],
    ["deliveries", "events delivered"],
    ["messages_delivered", "messages delivered"],
    ["closes", "connections closed by the gateway"],
    ["rate_limited", "commands refused by the rate limit"],
    ["connects_refused", "connections refused (connection rate)"],
    ["deliveries_dropped", "deliveries dropped under overload"],
    ["dependency_errors", "failed Redis / core operations"],
  ];
  let timer = null;

  function row(...cells) {
    const tr = C.el("tr");
    for (const cell of cells) tr.appendChild(typeof cell === "string" ? C.el("td", "", cell) : cell);
    return tr;
  }

  function fill(tableId, rows) {
    const body = $(tableId).querySelector("tbody");
    C.clear(body);
    for (const r of rows) body.appendChild(r);
  }

  function show(status) {
    const g = status.gateway;
    const transports = Object.entries(g.connections_by_transport || {})
      .filter(([, n]) => n)
      .map(([t, n]) => t + " " + n)
      .join(", ");
    fill("this-gateway", [
      row("id", g.id),
      row("ready", g.ready ? "yes" : "no"),
      row("draining", g.draining ? "yes" : "no"),
      row("connections", String(g.connections) + (transports ? " (" + transports + ")" : "")),
      row("rooms with connections", String(g.rooms)),
      row("addresses", (g.addresses || []).join(" ")),
      row("uptime", Math.round(g.uptime_sec) + " s"),
    ]);
    fill(
      "dependencies",
      Object.entries(g.dependencies || {}).map(([name, state]) => row(name, C.el("td", state === "up" ? "up" : "down", state))),
    );
    $("rates-interval").textContent = "(over the last " + status.rates.interval_sec + " s)";
    const perSec = status.rates.per_sec || {};
    const totals = status.totals || {};
    fill(
      "rates",
      RATES.map(([key, label]) => row(label, String(perSec[key] ?? 0), String(totals[key] ?? 0))),
    );
    $("store-kind").textContent = status.store === "redis" ? "(every gateway registered in Redis)" : "(in-memory store: this gateway only)";
    fill(
      "gateways",
      (status.gateways || []).map((entry) =>
        row(
          entry.gateway_id + (entry.gateway_id === g.id ? " (this one)" : ""),
          String(entry.connections ?? ""),
          String(entry.rooms ?? ""),
          (entry.addresses || []).join(" "),
          entry.started ? new Date(entry.started * 1000).toLocaleString() : "",
        ),
      ),
    );
    $("registry-error").textContent = status.registry_error ? "registry: " + status.registry_error : "";
    const updated = $("updated");
    updated.className = "status " + (g.ready ? "up" : "down");
    updated.textContent = (g.ready ? "ready" : "not ready") + " · updated " + new Date().toLocaleTimeString();
  }

  async function poll() {
    clearTimeout(timer);
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) return;
    try {
      const { status, body } = await C.fetchJson("/console/status.json", token);
      if (status === 401 || status === 403) {
        sessionStorage.removeItem(TOKEN_KEY);
        signin((body && body.error) || "HTTP " + status);
        return;
      }
      if (status === 200 && body) {
        $("admin-signin").hidden = true;
        $("status").hidden = false;
        $("forget").hidden = false;
        show(body);
      }
    } catch (e) {
      const updated = $("updated");
      updated.className = "status down";
      updated.textContent = "gateway unreachable · " + new Date().toLocaleTimeString();
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function signin(error) {
    clearTimeout(timer);
    $("admin-signin").hidden = false;
    $("status").hidden = true;
    $("forget").hidden = true;
    $("admin-error").textContent = error || "";
  }

  async function start() {
    const config = await C.config();
    $("admin-scope").textContent = config.admin_scope;
    $("dev-admin").hidden = !config.dev;
    $("admin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("admin-token").value.trim();
      $("admin-token").value = "";
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      poll();
    });
    $("dev-admin").addEventListener("click", async () => {
      try {
        sessionStorage.setItem(TOKEN_KEY, await C.devToken("operator", "console", true));
        poll();
      } catch (e) {
        $("admin-error").textContent = e.message;
      }
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      signin("");
    });
    if (sessionStorage.getItem(TOKEN_KEY)) poll();
    else signin("");
  }

  start();
})();
