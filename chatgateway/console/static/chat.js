// The chat page (docs/console.md#the-chat-page): rooms, timeline, typing, receipts and
// presence over one device connection of the public protocol (connection.js).
"use strict";

(() => {
  const C = window.ChatConsole;
  const $ = C.$;
  const TYPING_RESEND_MS = 3000; // a typing=true is repeated while typing goes on
  const TYPING_IDLE_MS = 4000; // no key for this long: typing=false
  const TYPING_SHOWN_MS = 6000; // another member's typing shows this long without a repeat
  const HISTORY_PAGE = 30;
  const SESSION_KEY = "chatgateway.console.session";

  const state = {
    dev: false,
    profile: "",
    device: "",
    token: "",
    connection: null, // a ChatConsole.Connection (connection.js)
    rooms: new Map(), // room id -> {id, name, unread}
    open: null, // the room shown
    timelines: new Map(), // room id -> {events: Map(id -> RoomEvent), older: cursor, loading}
    receipts: new Map(), // room id -> Map(profile id -> event id)
    typing: new Map(), // room id -> Map(profile id -> timer)
    presence: new Map(), // profile id -> "ONLINE" | "OFFLINE"
    members: new Map(), // room id -> [profile id]
    onlineCounts: new Map(), // room id -> online count, for a room too large for names
    marked: new Map(), // room id -> the event id of our last read marker
    typingSentAt: 0,
    typingIdle: null,
  };

  function setStatus(kind, text) {
    const node = $("conn-status");
    node.className = "status " + kind;
    node.textContent = text;
  }

  function notice(text) {
    const node = $("notice");
    node.textContent = text;
    node.hidden = !text;
  }

  function command(kind, body) {
    return state.connection ? state.connection.command(kind, body) : Promise.reject(new Error("not connected"));
  }

  function call(method, body) {
    return state.connection ? state.connection.call(method, body) : Promise.reject(new Error("not connected"));
  }

  function connect() {
    if (state.connection) state.connection.stop();
    state.connection = new C.Connection({
      token: state.token,
      device: state.device,
      onFrame: handle,
      onStatus: setStatus,
      // In development a 4401 (the token expired) fetches a new one; in production: sign in again.
      refreshToken: async () => {
        if (!state.dev) return null;
        state.token = await C.devToken(state.profile, state.device);
        saveSession();
        return state.token;
      },
      onRefused: (reason) => showSignin("The gateway refused the token (" + reason + ")."),
    });
    state.connection.start();
  }

  // ------------------------------------------------------------------ frames

  function handle(frame) {
    if (frame.connected) return onConnected(frame.connected);
    if (frame.message) return onMessage(frame.message);
    if (frame.typingEvent) return onTyping(frame.typingEvent);
    if (frame.receiptEvent) return onReceipt(frame.receiptEvent);
    if (frame.presenceEvent) return onPresence(frame.presenceEvent);
    if (frame.subscriptionEvent) return onSubscription(frame.subscriptionEvent);
    if (frame.gap) return onMissed(frame.gap.roomId, "events of this room were missed (gap)");
    if (frame.error) {
      if (frame.error.status === "DATA_LOSS") return onMissed(null, "events were missed: " + frame.error.message);
      notice("gateway: " + (frame.error.status || "") + " " + (frame.error.message || ""));
    }
  }

  function onConnected(connected) {
    // Who we are is the token's (its sub and device_id claim), whatever the form said.
    state.profile = connected.profileId || state.profile;
    state.device = connected.deviceId || state.device;
    $("who").textContent = state.profile + " · " + state.device;
    saveSession();
    setStatus("up", "connected to " + connected.gatewayId);
    const ids = new Set(connected.roomIds || []);
    for (const id of [...state.rooms.keys()]) if (!ids.has(id)) state.rooms.delete(id);
    for (const id of ids) if (!state.rooms.has(id)) state.rooms.set(id, { id, name: id, unread: 0 });
    if (!connected.resumed) {
      // A new session: what happened while away is in the history, not in the stream.
      for (const id of [...state.timelines.keys()]) if (id !== state.open) state.timelines.delete(id);
    }
    renderRooms();
    loadRoomNames();
    if (state.open && !ids.has(state.open)) closeRoom();
    else if (state.open) reloadNewest(state.open);
  }

  function onMessage(event) {
    const room = state.rooms.get(event.roomId);
    if (!room) return;
    const timeline = state.timelines.get(event.roomId);
    if (timeline) timeline.events.set(event.id, event);
    if (event.roomId === state.open) {
      stopTyping(event.roomId, event.senderId);
      renderTimeline({ stick: true });
      if (event.type === "SYSTEM") loadMembers(event.roomId);
      markRead();
    } else if (event.senderId !== state.profile && event.type !== "SYSTEM") {
      room.unread += 1;
      renderRooms();
    }
  }

  function onTyping(typing) {
    if (typing.profileId === state.profile) return;
    const room = state.typing.get(typing.roomId) || new Map();
    state.typing.set(typing.roomId, room);
    clearTimeout(room.get(typing.profileId));
    if (typing.typing) {
      room.set(typing.profileId, setTimeout(() => stopTyping(typing.roomId, typing.profileId), TYPING_SHOWN_MS));
    } else {
      room.delete(typing.profileId);
    }
    renderTyping();
  }

  function stopTyping(roomId, profileId) {
    const room = state.typing.get(roomId);
    if (room && room.has(profileId)) {
      clearTimeout(room.get(profileId));
      room.delete(profileId);
      renderTyping();
    }
  }

  function onReceipt(receipt) {
    const room = state.receipts.get(receipt.roomId) || new Map();
    state.receipts.set(receipt.roomId, room);
    room.set(receipt.profileId, receipt.eventId);
    if (receipt.roomId === state.open) renderTimeline({ stick: true });
  }

  function onPresence(presence) {
    state.presence.set(presence.profileId, presence.status);
    renderMembers();
  }

  function onSubscription(change) {
    if (change.profileId !== state.profile) return;
    if (change.change === "REMOVED") {
      state.rooms.delete(change.roomId);
      state.timelines.delete(change.roomId);
      if (state.open === change.roomId) closeRoom();
    } else if (!state.rooms.has(change.roomId)) {
      state.rooms.set(change.roomId, { id: change.roomId, name: change.roomId, unread: 0 });
      loadRoomNames();
    }
    renderRooms();
  }

  function onMissed(roomId, text) {
    notice(text + " — reloading the history");
    if (roomId && roomId !== state.open) state.timelines.delete(roomId);
    else if (state.open) reloadNewest(state.open);
  }

  // ------------------------------------------------------------------ rooms

  async function loadRoomNames() {
    try {
      const pages = await call("SearchRooms", {});
      for (const page of pages) {
        for (const found of page.data || []) {
          const room = state.rooms.get(found.id);
          if (room) room.name = found.name || found.id;
        }
      }
      renderRooms();
      if (state.open) $("room-title").textContent = roomName(state.open);
    } catch (e) {
      /* names stay ids */
    }
  }

  function roomName(id) {
    const room = state.rooms.get(id);
    return room ? room.name : id;
  }

  function renderRooms() {
    const list = $("rooms");
    C.clear(list);
    const rooms = [...state.rooms.values()].sort((a, b) => a.name.localeCompare(b.name));
    for (const room of rooms) {
      const item = C.el("li", room.id === state.open ? "open" : "", room.name);
      item.dataset.roomId = room.id;
      item.title = room.id;
      if (room.unread) item.appendChild(C.el("span", "unread", String(room.unread)));
      item.addEventListener("click", () => openRoom(room.id));
      list.appendChild(item);
    }
  }

  async function openRoom(id) {
    state.open = id;
    const room = state.rooms.get(id);
    if (room) room.unread = 0;
    notice("");
    $("room-title").textContent = roomName(id);
    $("composer").hidden = false;
    $("leave-room").hidden = false;
    $("add-member").hidden = false;
    renderRooms();
    renderTyping();
    renderTimeline({ stick: true });
    loadMembers(id);
    if (!state.timelines.has(id)) await reloadNewest(id);
    else markRead();
  }

  function closeRoom() {
    state.open = null;
    $("room-title").textContent = "no room open";
    $("composer").hidden = true;
    $("leave-room").hidden = true;
    $("add-member").hidden = true;
    C.clear($("members"));
    C.clear($("timeline"));
    $("older").hidden = true;
    renderRooms();
    renderTyping();
  }

  async function loadMembers(id) {
    try {
      const pages = await call("SearchRoomSubscriptions", { roomId: id });
      state.members.set(
        id,
        pages.flatMap((page) => (page.data || []).map((sub) => sub.profileId)),
      );
      if (id === state.open) renderMembers();
    } catch (e) {
      /* shown again at the next change */
    }
    loadPresence(id);
  }

  // The room's online members, where the gateway answers the presence command
  // (issue 14, docs/protocol.md); elsewhere presence stays unknown until presenceEvents come.
  async function loadPresence(id) {
    let body;
    try {
      [body] = await command("presence", { roomId: id });
    } catch (e) {
      return;
    }
    if (!body) return;
    if (body.countsOnly) {
      state.onlineCounts.set(id, body.onlineCount || 0);
    } else {
      const online = new Set(body.profileIds || []);
      for (const profileId of state.members.get(id) || []) {
        state.presence.set(profileId, online.has(profileId) ? "ONLINE" : "OFFLINE");
      }
    }
    if (id === state.open) renderMembers();
  }

  function renderMembers() {
    const list = $("members");
    C.clear(list);
    if (state.onlineCounts.has(state.open)) {
      list.appendChild(C.el("li", "count", state.onlineCounts.get(state.open) + " online"));
    }
    for (const profileId of state.members.get(state.open) || []) {
      const online = state.presence.get(profileId) === "ONLINE";
      const item = C.el("li", online ? "online" : "", profileId);
      item.dataset.profileId = profileId;
      item.title = online ? "online" : state.presence.has(profileId) ? "offline" : "presence unknown";
      list.appendChild(item);
    }
  }

  // ------------------------------------------------------------------ history and timeline

  function timelineOf(id) {
    let timeline = state.timelines.get(id);
    if (!timeline) {
      timeline = { events: new Map(), older: "", loading: false };
      state.timelines.set(id, timeline);
    }
    return timeline;
  }

  // The newest page, merged by event id into what is shown (after a reconnect or a loss).
  // The newest page: merged by event id when it overlaps what is shown (nothing between is
  // missing), else it replaces it (more than a page was missed: older pages load on scroll).
  async function reloadNewest(id) {
    const timeline = timelineOf(id);
    try {
      const [page] = await call("GetHistory", { roomId: id, limit: HISTORY_PAGE });
      const events = page.events || [];
      const overlaps = events.some((event) => timeline.events.has(event.id));
      if (!overlaps) {
        timeline.events.clear();
        timeline.older = page.nextCursor || "";
      }
      for (const event of events) timeline.events.set(event.id, event);
      if (id === state.open) {
        renderTimeline({ stick: true });
        markRead();
      }
    } catch (e) {
      if (id === state.open) notice("history: " + e.message);
    }
  }

  async function loadOlder() {
    const id = state.open;
    const timeline = id && state.timelines.get(id);
    if (!timeline || !timeline.older || timeline.loading) return;
    timeline.loading = true;
    try {
      const [page] = await call("GetHistory", { roomId: id, limit: HISTORY_PAGE, cursor: timeline.older });
      for (const event of page.events || []) timeline.events.set(event.id, event);
      timeline.older = page.nextCursor || "";
      if (id === state.open) renderTimeline({ keepBottomOffset: true });
    } catch (e) {
      notice("history: " + e.message);
    } finally {
      timeline.loading = false;
    }
  }

  function ordered(events) {
    return [...events.values()].sort((a, b) => {
      const at = (a.sentAt || "").localeCompare(b.sentAt || "");
      if (at) return at;
      return (Number(a.offset) || 0) - (Number(b.offset) || 0);
    });
  }

  function describeSystem(event) {
    const p = event.payload || {};
    const who = p.profile_id || p.profileId || "";
    const actions = {
      room_created: "created the room",
      member_added: "added " + who,
      member_removed: "removed " + who,
      member_left: "left the room",
      role_changed: "changed the role of " + who,
      room_updated: "updated the room",
    };
    return actions[p.action] || String(p.action || "system event");
  }

  function renderTimeline({ stick = false, keepBottomOffset = false } = {}) {
    const box = $("timeline-box");
    const list = $("timeline");
    const fromBottom = box.scrollHeight - box.scrollTop;
    const atBottom = fromBottom - box.clientHeight < 40;
    C.clear(list);
    const timeline = state.open && state.timelines.get(state.open);
    $("older").hidden = !(timeline && timeline.older);
    if (!timeline) return;
    const seenBy = new Map(); // event id -> [profile id]
    for (const [profileId, eventId] of state.receipts.get(state.open) || []) {
      if (profileId === state.profile) continue;
      seenBy.set(eventId, [...(seenBy.get(eventId) || []), profileId]);
    }
    for (const event of ordered(timeline.events)) {
      const system = event.type === "SYSTEM";
      const mine = event.senderId === state.profile;
      const item = C.el("li", system ? "system" : mine ? "mine" : "");
      item.dataset.eventId = event.id;
      item.appendChild(C.el("span", "at", C.time(event.sentAt)));
      item.appendChild(C.el("span", "sender", event.senderId || ""));
      const text = system ? describeSystem(event) : (event.payload && event.payload.text) || "";
      item.appendChild(C.el("span", "text", String(text)));
      const seen = seenBy.get(event.id);
      if (seen) item.appendChild(C.el("span", "seen", "seen by " + seen.sort().join(", ")));
      list.appendChild(item);
    }
    if (keepBottomOffset) box.scrollTop = box.scrollHeight - fromBottom;
    else if (stick && atBottom) box.scrollTop = box.scrollHeight;
  }

  function renderTyping() {
    const names = [...(state.typing.get(state.open) || new Map()).keys()].sort();
    $("typing").textContent = names.length ? names.join(", ") + (names.length > 1 ? " are" : " is") + " typing…" : "";
  }

  // A read marker for the newest message of the open room, once per message, while visible.
  function markRead() {
    const id = state.open;
    const timeline = id && state.timelines.get(id);
    if (!timeline || document.visibilityState === "hidden") return;
    const newest = ordered(timeline.events)
      .filter((e) => e.type !== "SYSTEM")
      .pop();
    if (!newest || newest.senderId === state.profile || state.marked.get(id) === newest.id) return;
    state.marked.set(id, newest.id);
    command("readMarker", { roomId: id, eventId: newest.id }).catch(() => state.marked.delete(id));
  }

  // ------------------------------------------------------------------ what the user does

  function typed() {
    const id = state.open;
    if (!id) return;
    const now = Date.now();
    if (now - state.typingSentAt > TYPING_RESEND_MS) {
      state.typingSentAt = now;
      command("typing", { roomId: id, typing: true }).catch(() => {});
    }
    clearTimeout(state.typingIdle);
    state.typingIdle = setTimeout(() => stoppedTyping(id), TYPING_IDLE_MS);
  }

  function stoppedTyping(id) {
    clearTimeout(state.typingIdle);
    if (!state.typingSentAt) return;
    state.typingSentAt = 0;
    command("typing", { roomId: id, typing: false }).catch(() => {});
  }

  async function sendMessage(text) {
    const id = state.open;
    stoppedTyping(id);
    const [body] = await command("roomEvent", { roomId: id, type: "TEXT", payload: { text } });
    const event = body && (body.event || body);
    if (event && event.id) {
      timelineOf(id).events.set(event.id, event);
      if (id === state.open) renderTimeline({ stick: true });
    }
  }

  function guarded(action) {
    return async (event) => {
      if (event) event.preventDefault();
      try {
        await action(event);
      } catch (e) {
        notice(e.message);
      }
    };
  }

  function saveSession() {
    sessionStorage.setItem(
      SESSION_KEY,
      JSON.stringify({ profile: state.profile, device: state.device, token: state.token }),
    );
  }

  function showSignin(error) {
    $("signin").hidden = false;
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("signin-error").textContent = error || "";
  }

  function signedIn() {
    $("signin").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = state.profile + " · " + state.device;
    connect();
  }

  function signOut() {
    if (state.connection) state.connection.stop();
    state.connection = null;
    sessionStorage.removeItem(SESSION_KEY);
    state.rooms.clear();
    state.timelines.clear();
    closeRoom();
    setStatus("down", "not connected");
    showSignin("");
  }

  async function start() {
    const config = await C.config();
    state.dev = !!config.dev;
    $("token-label").hidden = state.dev;
    $("profile-label").hidden = !state.dev; // in production the profile is the token's sub
    $("profile").required = state.dev;
    $("signin-hint").textContent = state.dev
      ? "Development mode: pick any profile; the page fetches its token from /dev/token."
      : "Paste a token the gateway accepts (its sub is the profile).";

    $("signin-form").addEventListener(
      "submit",
      guarded(async () => {
        state.profile = $("profile").value.trim();
        state.device = $("device").value.trim() || "browser-" + Math.random().toString(16).slice(2, 8);
        try {
          state.token = state.dev
            ? await C.devToken(state.profile, state.device)
            : $("token").value.trim();
        } catch (e) {
          $("signin-error").textContent = e.message;
          return;
        }
        if (!state.token) {
          $("signin-error").textContent = "a token is required";
          return;
        }
        $("token").value = "";
        saveSession();
        signedIn();
      }),
    );
    $("sign-out").addEventListener("click", signOut);
    $("create-room").addEventListener(
      "submit",
      guarded(async () => {
        const name = $("room-name").value.trim();
        const memberIds = $("room-members")
          .value.split(",")
          .map((m) => m.trim())
          .filter((m) => m && m !== state.profile);
        const [body] = await call("CreateRoom", { name, memberIds });
        $("room-name").value = "";
        $("room-members").value = "";
        state.rooms.set(body.room.id, { id: body.room.id, name: body.room.name || body.room.id, unread: 0 });
        renderRooms();
        await openRoom(body.room.id);
      }),
    );
    $("add-member").addEventListener(
      "submit",
      guarded(async () => {
        const profileId = $("add-member-id").value.trim();
        if (!profileId || !state.open) return;
        await call("AddRoomSubscriptions", { roomId: state.open, members: [{ profileId }] });
        $("add-member-id").value = "";
        loadMembers(state.open);
      }),
    );
    $("leave-room").addEventListener(
      "click",
      guarded(async () => {
        if (state.open) await call("RemoveRoomSubscriptions", { roomId: state.open, profileIds: [state.profile] });
      }),
    );
    $("composer").addEventListener(
      "submit",
      guarded(async () => {
        const input = $("message");
        const text = input.value;
        if (!text.trim() || !state.open) return;
        input.value = "";
        await sendMessage(text);
      }),
    );
    $("message").addEventListener("input", typed);
    $("older").addEventListener("click", guarded(loadOlder));
    $("timeline-box").addEventListener("scroll", () => {
      if ($("timeline-box").scrollTop < 30) loadOlder();
    });
    $("notice").addEventListener("click", () => notice(""));
    document.addEventListener("visibilitychange", markRead);

    const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || "null");
    if (saved && saved.token) {
      Object.assign(state, saved);
      signedIn();
    } else {
      showSignin("");
    }
  }

  start();
})();
