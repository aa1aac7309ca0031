// One device's connection to the gateway (docs/protocol.md), for the chat page: /ws with the
// chat.v1.json subprotocol, signed in with the first frame (never ?access_token=, which
// would leave the token in the history and the access logs), commands with their replies,
// and reconnects with full-jitter backoff (docs/protocol.md#reconnect-hints).
"use strict";

(() => {
  const SUBPROTOCOL = "chat.v1.json";
  const TYPE = "type.googleapis.com/chat.v1.";
  const BACKOFF_BASE_MS = 1000;
  const BACKOFF_CAP_MS = 30000;
  const COMMAND_TIMEOUT_MS = 15000; // the gateway answers within CORE_TIMEOUT_SEC; past this, give up
  const HINT = /reconnect in (\d+(?:\.\d+)?) ?s/;
  const RESUME_KEY = "chatgateway.console.resume";
  const POSITIONS_KEY = "chatgateway.console.positions";
  const ACK_DELAY_MS = 1000; // acks go out at most this often, for the newest event of each room

  // The delay before reconnect attempt ``attempt`` (0, 1, ...) after a close with ``reason``:
  // random in [0, min(cap, base * 2^attempt)], never sooner than the gateway's hint.
  function reconnectDelay(attempt, reason) {
    let delay = Math.random() * Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const hint = HINT.exec(reason || "");
    if (hint) delay = Math.max(delay, parseFloat(hint[1]) * 1000);
    return delay;
  }

  class Connection {
    // handlers: onFrame(frame) for every frame but command results; onStatus(kind, text)
    // with kind "up", "wait" or "down"; refreshToken() -> a new token or null, after a 4401
    // (null: the connection stops and onRefused(reason) is called).
    constructor({ token, device, onFrame, onStatus, refreshToken, onRefused }) {
      Object.assign(this, { token, device, onFrame, onStatus, refreshToken, onRefused });
      this.ws = null;
      this.stopped = true;
      this.attempt = 0;
      this.retryTimer = null;
      this.nextRequest = 1;
      this.pending = new Map(); // requestId -> {resolve, reject, bodies}
      // Per room the position of the last event received, {epoch, offset}, kept in the tab:
      // the first frame gives them back and acks report them (docs/protocol.md, the guide
      // for client authors), so a gateway with resume sends what was missed, once.
      this.positions = new Map(Object.entries(JSON.parse(sessionStorage.getItem(POSITIONS_KEY) || "{}")));
      this.unacked = new Map(); // room id -> {eventId, epoch, offset} not acknowledged yet
      this.ackTimer = null;
    }

    start() {
      clearTimeout(this.retryTimer);
      this.stopped = false;
      this.onStatus("wait", "connecting…");
      const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
      const ws = new WebSocket(url, SUBPROTOCOL);
      this.ws = ws;
      ws.onopen = () => {
        const first = { authToken: this.token, deviceId: this.device };
        const resume = sessionStorage.getItem(RESUME_KEY);
        if (resume) first.resumeToken = resume; // both ignored by a gateway without resume
        if (this.positions.size) {
          first.positions = [...this.positions].map(([roomId, p]) => ({ roomId, epoch: p.epoch, offset: p.offset }));
        }
        ws.send(JSON.stringify(first));
      };
      ws.onmessage = (message) => {
        if (ws !== this.ws) return;
        let frame;
        try {
          frame = JSON.parse(message.data);
        } catch (e) {
          return;
        }
        this.received(frame);
      };
      ws.onclose = (event) => {
        if (ws === this.ws) this.closed(event.code, event.reason || "");
      };
    }

    stop() {
      this.stopped = true;
      clearTimeout(this.retryTimer);
      if (this.ws) this.ws.close(1000);
      this.ws = null;
      clearTimeout(this.ackTimer);
      sessionStorage.removeItem(RESUME_KEY);
      sessionStorage.removeItem(POSITIONS_KEY);
    }

    received(frame) {
      if (frame.connected) {
        this.attempt = 0;
        if (frame.connected.resumeToken) sessionStorage.setItem(RESUME_KEY, frame.connected.resumeToken);
        const rooms = new Set(frame.connected.roomIds || []);
        for (const roomId of [...this.positions.keys()]) if (!rooms.has(roomId)) this.positions.delete(roomId);
        this.savePositions();
      }
      if (frame.commandResult) this.answered(frame.commandResult);
      else if (this.advanced(frame)) this.onFrame(frame);
    }

    // Whether a frame is new: one at or below the room's position (same epoch) was had
    // already (the gateway does not send one; this is the guide's defensive check).
    advanced(frame) {
      const roomId = (frame.message || frame.receiptEvent || {}).roomId;
      if (!roomId || !frame.epoch || !frame.offset) return true; // no position (typing, presence...)
      const offset = Number(frame.offset);
      const known = this.positions.get(roomId);
      if (known && known.epoch === frame.epoch && Number(known.offset) >= offset) return false;
      this.positions.set(roomId, { epoch: frame.epoch, offset: String(offset) }); // a new epoch voids the old
      this.savePositions();
      if (frame.message) {
        this.unacked.set(roomId, { eventId: frame.message.id, roomId, epoch: frame.epoch, offset: String(offset) });
        if (!this.ackTimer) this.ackTimer = setTimeout(() => this.ack(), ACK_DELAY_MS);
      }
      return true;
    }

    ack() {
      this.ackTimer = null;
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return; // the positions go in the next first frame
      for (const ack of this.unacked.values()) this.ws.send(JSON.stringify({ ack }));
      this.unacked.clear();
    }

    savePositions() {
      sessionStorage.setItem(POSITIONS_KEY, JSON.stringify(Object.fromEntries(this.positions)));
    }

    closed(code, reason) {
      this.ws = null;
      for (const { reject } of this.pending.values()) reject(new Error("connection lost"));
      this.pending.clear();
      if (this.stopped) return;
      if (code === 4001) {
        this.stopped = true;
        this.onStatus("down", "replaced by a newer connection of this device");
        return;
      }
      const delay = reconnectDelay(this.attempt, reason);
      this.attempt += 1;
      this.onStatus("down", "disconnected (" + code + "): reconnecting in " + (delay / 1000).toFixed(1) + " s");
      this.retryTimer = setTimeout(async () => {
        if (this.stopped) return;
        if (code === 4401) {
          // Not retried with the same token (docs/protocol.md#reconnect-hints).
          const token = await this.refreshToken().catch(() => null);
          if (!token) {
            this.stopped = true;
            this.onStatus("down", "token refused: sign in again");
            this.onRefused(reason);
            return;
          }
          this.token = token;
        }
        this.start();
      }, delay);
    }

    answered(result) {
      const pending = this.pending.get(result.requestId);
      if (!pending) return;
      if (result.error) {
        this.pending.delete(result.requestId);
        pending.reject(new Error((result.error.status || "ERROR") + ": " + (result.error.message || "")));
        return;
      }
      if (result.body) pending.bodies.push(result.body);
      if (!result.more) {
        this.pending.delete(result.requestId);
        pending.resolve(pending.bodies);
      }
    }

    // A command; resolves with the bodies of its results (one, or one per page of SearchRooms).
    command(kind, body) {
      return new Promise((resolve, reject) => {
        const requestId = String(this.nextRequest++);
        const timer = setTimeout(() => {
          if (this.pending.delete(requestId)) reject(new Error(kind + ": no answer"));
        }, COMMAND_TIMEOUT_MS);
        const done = (settle) => (value) => {
          clearTimeout(timer);
          settle(value);
        };
        this.pending.set(requestId, { resolve: done(resolve), reject: done(reject), bodies: [] });
        if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
          this.pending.delete(requestId);
          done(reject)(new Error("not connected"));
          return;
        }
        this.ws.send(JSON.stringify({ command: { requestId, [kind]: body } }));
      });
    }

    // One of the ten forwarded methods, its request inline with its @type.
    call(method, body) {
      return this.command("call", { method, body: { "@type": TYPE + method + "Request", ...body } });
    }
  }

  window.ChatConsole.Connection = Connection;
  window.ChatConsole.reconnectDelay = reconnectDelay;
})();
