// Shared by the console's pages (docs/console.md). Everything shown is built with
// createElement and textContent: no text from the network is ever parsed as HTML.
"use strict";

window.ChatConsole = {
  // An element with a class (optional) and children: strings become text nodes.
  el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  },

  clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  },

  $(id) {
    return document.getElementById(id);
  },

  async fetchJson(path, token) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    return { status: response.status, body };
  },

  // {dev: bool, admin_scope: string}
  async config() {
    const { status, body } = await ChatConsole.fetchJson("/console/config.json");
    return status === 200 && body ? body : { dev: false, admin_scope: "chatgateway:admin" };
  },

  // A development token from /dev/token (fetched, never navigated to: it stays out of the history).
  async devToken(profile, device, admin) {
    const query = new URLSearchParams({ profile });
    if (device) query.set("device", device);
    if (admin) query.set("admin", "1");
    const { status, body } = await ChatConsole.fetchJson("/dev/token?" + query.toString());
    if (status !== 200 || !body || !body.token) throw new Error("no development token (HTTP " + status + ")");
    return body.token;
  },

  time(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return isNaN(date) ? "" : date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  },
};
