// ucc.js: a browser client for ucc's WebSocket protocol (docs/protocol.md).
//
// An ES module with no dependencies and no build step:
//
//   import { UccClient } from "./ucc.js";
//   const client = new UccClient({ url: "ws://127.0.0.1:8765/", token: fetchToken });
//   client.on("message", (m) => console.log(m.channel, m.data));
//   client.connect();
//
// What it does for you: fetches a token at every (re)connect, reconnects with exponential
// backoff and full jitter, honours `drain` and the close codes (4003: new token at once;
// 4001: stop), pings, keeps subscriptions across reconnects, tracks each channel's
// {offset, epoch} and resumes from it, drops repeated channel messages, and acknowledges
// (and dedupes) critical messages. See clients/js/README.md.

/** @typedef {"idle"|"connecting"|"open"|"reconnecting"|"stopped"} UccState */

/**
 * @typedef {object} UccPosition
 * @property {number} offset  the last offset handled on the channel (0: none yet)
 * @property {string} epoch   the epoch that offset belongs to ("" when unknown)
 */

/**
 * @typedef {object} UccMessage
 * @property {number} [channel]  the channel of a channel broadcast (absent: a message to the user)
 * @property {number} [offset]   the channel message's offset (with history on)
 * @property {string} [epoch]    the channel message's epoch (with history on)
 * @property {string} [id]       a critical message's id (acknowledged after the handlers ran)
 * @property {*} data            the JSON value the backend sent
 * @property {object} frame      the whole frame as received
 */

/**
 * @typedef {object} UccOptions
 * @property {string | (() => string | Promise<string>)} url
 *   "ws://host:port/", or a function called at each connect (pick a host)
 * @property {string | (() => string | Promise<string>)} token
 *   a token, or a function called at EVERY (re)connect (fetch a fresh one)
 * @property {number} [minBackoff=250]     ms: the first reconnect delay's upper bound
 * @property {number} [maxBackoff=10000]   ms: the largest reconnect delay
 * @property {number} [pingInterval=20000] ms: a ping every interval; nothing heard in two
 *   intervals closes the socket and reconnects
 * @property {boolean} [resume=true]   track {offset, epoch} per channel and resume on reconnect
 * @property {boolean} [autoAck=true]  ack critical messages once the "message" handlers ran
 */

/** Close codes with a meaning for the client (docs/protocol.md, "Heartbeat and close codes"). */
export const CloseCode = Object.freeze({
  GOING_AWAY: 1001, // server shutting down (after a drain frame)
  TRY_AGAIN: 1013, // a resume failed: reconnect and resume again
  DISCONNECTED: 4001, // disconnected by the backend: do not come back
  HEARTBEAT_TIMEOUT: 4002,
  TOKEN_EXPIRED: 4003, // reconnect at once with a fresh token
});

/** How many critical message ids are remembered for deduplication. */
const SEEN_IDS = 1000;
/** How many raw frames send() keeps while the socket is not open (the oldest are dropped). */
const QUEUE_LIMIT = 1000;
/** a reconnect without backoff (drain, 4003, 1013) at most this often, in ms */
const IMMEDIATE_EVERY = 30000;

/**
 * The delay before reconnect attempt `attempt` (0 for the first): exponential backoff with full
 * jitter, a uniform pick in [0, min(max, min * 2^attempt)). Pure: `random` is injectable.
 * @param {number} attempt   failed attempts so far (0, 1, 2, ...)
 * @param {number} min       ms: the first ceiling
 * @param {number} max       ms: the largest ceiling
 * @param {() => number} [random=Math.random]  a number in [0, 1)
 * @returns {number} ms
 */
export function backoffDelay(attempt, min, max, random = Math.random) {
  const ceiling = Math.min(max, min * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** A client of one ucc user: one WebSocket at a time, replaced when it drops. */
export class UccClient {
  /** @param {UccOptions} options */
  constructor(options) {
    if (!options || !options.url || !options.token) {
      throw new TypeError("UccClient needs options.url and options.token");
    }
    this.options = {
      minBackoff: 250,
      maxBackoff: 10000,
      pingInterval: 20000,
      resume: true,
      autoAck: true,
      ...options,
    };
    /** @type {UccState} */
    this.state = "idle";
    /** @type {Map<number, UccPosition>} each channel's last handled position */
    this.positions = new Map();
    /** @type {number | null} the user id, from the last hello */
    this.user = null;

    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {WebSocket | null} */
    this._ws = null;
    this._generation = 0; // bumped whenever a socket is abandoned: stale callbacks bail out
    this._attempt = 0; // failed attempts since the last hello
    this._timer = null; // the pending reconnect
    this._pinger = null;
    this._lastHeard = 0;
    /** @type {Set<number>} channels subscribed with subscribe(): sent again on reconnect */
    this._channels = new Set();
    /** @type {Set<number>} channels left with unsubscribe(): left again on reconnect */
    this._left = new Set();
    /** @type {Map<number, object[]>} channel messages held until the channel's `resumed` */
    this._resuming = new Map();
    /** @type {Set<number>} channels whose resume only asks for a first position (_anchor) */
    this._anchoring = new Set();
    /** @type {Set<number> | null} the channels a resume may name: the last hello's (the token's) */
    this._resumable = null;
    this._lastImmediate = -Infinity; // when the last reconnect without backoff was scheduled
    /** @type {object[]} raw frames waiting for an open socket */
    this._queue = [];
    /** @type {Set<string>} critical ids seen (the last SEEN_IDS, in _seenOrder) */
    this._seen = new Set();
    /** @type {string[]} */
    this._seenOrder = [];
  }

  // -- events ------------------------------------------------------------------------------

  /**
   * Add a handler. Events: "state", "open", "hello", "message", "subscribed", "unsubscribed",
   * "resumed", "join", "leave", "presence_changed", "error", "drain", "close", "reconnecting",
   * "stopped".
   * @param {string} event
   * @param {(arg: any) => void} cb
   * @returns {this}
   */
  on(event, cb) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(cb);
    return this;
  }

  /**
   * Remove a handler added with on().
   * @param {string} event
   * @param {(arg: any) => void} cb
   * @returns {this}
   */
  off(event, cb) {
    this._handlers.get(event)?.delete(cb);
    return this;
  }

  /**
   * @param {string} event
   * @param {*} arg
   */
  _emit(event, arg) {
    for (const cb of [...(this._handlers.get(event) ?? [])]) {
      try {
        cb(arg);
      } catch (err) {
        // a handler's bug must not break the connection: report it like an uncaught error
        if (typeof reportError === "function") reportError(err);
        else console.error(err);
      }
    }
  }

  /** @param {UccState} state */
  _setState(state) {
    if (this.state !== state) {
      this.state = state;
      this._emit("state", state);
    }
  }

  // -- public API --------------------------------------------------------------------------

  /** Start connecting (and keep connected until close() or a 4001). @returns {this} */
  connect() {
    if (this.state === "idle" || this.state === "stopped") {
      this._attempt = 0;
      this._setState("connecting");
      this._open();
    }
    return this;
  }

  /**
   * Subscribe to a channel (the token must list it); kept across reconnects.
   * @param {number} channel
   */
  subscribe(channel) {
    this._channels.add(channel);
    this._left.delete(channel);
    this._sendNow({ type: "subscribe", channel });
  }

  /**
   * Unsubscribe from a channel; its position is forgotten (no resume of it on reconnect).
   * @param {number} channel
   */
  unsubscribe(channel) {
    this._channels.delete(channel);
    this._left.add(channel);
    this.positions.delete(channel);
    this._resuming.delete(channel);
    this._anchoring.delete(channel);
    this._sendNow({ type: "unsubscribe", channel });
  }

  /**
   * Send a raw frame (an object, sent as JSON); queued until the socket is open.
   * @param {object} frame
   */
  send(frame) {
    if (!this._sendNow(frame)) {
      this._queue.push(frame);
      if (this._queue.length > QUEUE_LIMIT) this._queue.shift();
    }
  }

  /** Stop for good: close the socket, no reconnect. */
  close() {
    if (this.state === "stopped") return;
    const wasConnected = this._ws !== null;
    this._abandon(1000, "closed by the client");
    this._stop(1000, wasConnected ? "closed by the client" : "stopped by the client");
  }

  // -- connection --------------------------------------------------------------------------

  /**
   * Write a frame if the socket is open.
   * @param {object} frame
   * @returns {boolean} whether it was written
   */
  _sendNow(frame) {
    const ws = this._ws;
    if (ws && ws.readyState === WebSocket.OPEN && this.state === "open") {
      ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  async _open() {
    const generation = ++this._generation;
    let url;
    let token;
    try {
      url = await resolve(this.options.url);
      token = await resolve(this.options.token);
    } catch (err) {
      if (generation !== this._generation) return;
      this._emit("error", { type: "error", code: "client_token", message: String(err) });
      this._retry(false);
      return;
    }
    if (generation !== this._generation) return; // closed (or restarted) meanwhile
    const separator = url.includes("?") ? "&" : "?";
    let ws;
    try {
      ws = new WebSocket(`${url}${separator}token=${encodeURIComponent(token)}`);
    } catch (err) {
      this._emit("error", { type: "error", code: "client_url", message: String(err) });
      this._retry(false);
      return;
    }
    this._ws = ws;
    this._lastHeard = Date.now();
    this._startPinger(generation);
    ws.onopen = () => {
      if (generation !== this._generation) return;
      this._lastHeard = Date.now();
      this._setState("open");
      this._restore();
      this._emit("open", undefined);
    };
    ws.onmessage = (event) => {
      if (generation !== this._generation) return;
      this._lastHeard = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // the server sends JSON only
      }
      this._handle(frame);
    };
    ws.onclose = (event) => {
      if (generation !== this._generation) return;
      this._closed({ code: event.code, reason: event.reason });
    };
    ws.onerror = () => {}; // always followed by close
  }

  /** Right after the socket opens: resume, resubscribe, then the queued frames. */
  _restore() {
    const ws = /** @type {WebSocket} */ (this._ws);
    const write = (frame) => ws.send(JSON.stringify(frame));
    this._resuming.clear();
    this._anchoring.clear();
    if (this.options.resume) {
      for (const [channel, { offset, epoch }] of this.positions) {
        // a channel the backend subscribed (the token does not list it) cannot be resumed:
        // the server would refuse it; its position still drops repeats
        if (this._resumable && !this._resumable.has(channel)) continue;
        this._resuming.set(channel, []);
        write({ type: "resume", channel, offset, epoch });
      }
    }
    for (const channel of this._channels) {
      if (!this._resuming.has(channel)) write({ type: "subscribe", channel });
    }
    const queued = this._queue.splice(0);
    for (const frame of queued) write(frame);
  }

  _startPinger(generation) {
    clearInterval(this._pinger);
    const interval = this.options.pingInterval;
    this._pinger = setInterval(() => {
      if (generation !== this._generation) return;
      if (Date.now() - this._lastHeard >= 2 * interval) {
        // nothing heard (no pong, not even an open) in two intervals: this socket is dead
        const reason = "no pong within two ping intervals";
        this._abandon(CloseCode.HEARTBEAT_TIMEOUT, reason);
        this._closed({ code: CloseCode.HEARTBEAT_TIMEOUT, reason });
      } else {
        this._sendNow({ type: "ping" });
      }
    }, interval);
  }

  /** Forget the current socket (its late events are ignored) and close it. */
  _abandon(code, reason) {
    this._generation++;
    clearInterval(this._pinger);
    this._pinger = null;
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    this._resuming.clear();
    this._anchoring.clear();
    if (ws && ws.readyState !== WebSocket.CLOSED && ws.readyState !== WebSocket.CLOSING) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
  }

  /** The socket closed (or was given up): decide between stopping and reconnecting. */
  _closed({ code, reason }) {
    this._abandon(1000, "");
    this._emit("close", { code, reason });
    if (code === CloseCode.DISCONNECTED) {
      this._stop(code, reason);
      return;
    }
    // 4003: a new token (the token function runs at every connect); 1013: resume again
    const now = code === CloseCode.TOKEN_EXPIRED || code === CloseCode.TRY_AGAIN;
    this._retry(now);
  }

  /**
   * Schedule the next attempt: at once when `now` and the last attempt got a hello, else after
   * the backoff delay.
   * @param {boolean} now  drain, 4003, 1013: no backoff for the first attempt
   */
  _retry(now) {
    // at once at most every IMMEDIATE_EVERY ms: a close that recurs right after each hello
    // (a 1013 on a hot channel, say) falls back to the backoff instead of a reconnect storm
    const at = Date.now();
    const immediate =
      now && this._attempt === 0 && at - this._lastImmediate >= IMMEDIATE_EVERY;
    if (immediate) this._lastImmediate = at;
    const delay = immediate
      ? 0
      : backoffDelay(this._attempt, this.options.minBackoff, this.options.maxBackoff);
    this._attempt++;
    this._setState("reconnecting");
    this._emit("reconnecting", { attempt: this._attempt, delay });
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this._timer = null;
      if (this.state === "reconnecting") this._open();
    }, delay);
  }

  _stop(code, reason) {
    this._abandon(1000, "");
    this._queue = [];
    this._setState("stopped");
    this._emit("stopped", { code, reason });
  }

  // -- frames ------------------------------------------------------------------------------

  /** @param {any} frame */
  _handle(frame) {
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "hello":
        this.user = frame.user;
        this._attempt = 0; // the token was good and the shard answered: a healthy connection
        this._resumable = new Set(frame.channels ?? []);
        for (const channel of [...this._resuming.keys()]) {
          // a resume the token does not allow is refused (before hello: silently): stop
          // holding that channel's messages, or they would wait forever
          if (!this._resumable.has(channel)) this._release(channel);
        }
        for (const channel of frame.channels ?? []) {
          // a channel of the token, left earlier with unsubscribe(): leave it again
          if (this._left.has(channel)) this._sendNow({ type: "unsubscribe", channel });
          else this._anchor(channel);
        }
        this._emit("hello", frame);
        break;
      case "message":
        this._message(frame);
        break;
      case "resumed":
        this._resumed(frame);
        break;
      case "subscribed":
      case "unsubscribed":
        if (frame.type === "unsubscribed" && this._left.has(frame.channel)) {
          this.positions.delete(frame.channel);
        }
        if (frame.type === "subscribed") this._anchor(frame.channel);
        this._emit(frame.type, frame.channel);
        break;
      case "drain":
        // the server is going away: reconnect now (url() may name another host)
        this._emit("drain", frame);
        this._abandon(1000, "drain");
        this._emit("close", { code: CloseCode.GOING_AWAY, reason: frame.reason ?? "drain" });
        this._attempt = 0;
        this._retry(true);
        break;
      case "join":
      case "leave":
      case "presence_changed":
      case "error":
        this._emit(frame.type, frame);
        break;
      default:
        break; // pong, refreshed, and frame types added later: nothing to do
    }
  }

  _message(frame) {
    const channel = frame.channel;
    if (typeof frame.id === "string") {
      this._critical(frame);
    } else if (channel !== undefined && typeof frame.offset === "number") {
      const held = this._resuming.get(channel);
      if (held) held.push(frame);
      else this._deliverChannel(frame);
    } else {
      this._deliver(frame);
    }
  }

  /** A channel message with an offset: dropped if not above the channel's position. */
  _deliverChannel(frame) {
    const { channel, offset, epoch } = frame;
    const known = this.positions.get(channel);
    if (known && known.epoch === epoch && offset <= known.offset) return; // a repeat
    if (this.options.resume && !this._left.has(channel)) {
      this.positions.set(channel, { offset, epoch });
    }
    this._deliver(frame);
  }

  /**
   * A channel joined without a position yet (the token's at hello, or subscribed): ask for
   * its position now (a resume from nothing: answered `resumed` with `recovered: false` and the
   * channel's current offset and epoch, replaying nothing), so that a reconnect before its
   * first message still resumes it and misses nothing sent meanwhile.
   * @param {number} channel
   */
  _anchor(channel) {
    if (!this.options.resume || this.positions.has(channel) || this._resuming.has(channel)) return;
    if (this._left.has(channel)) return;
    this._resuming.set(channel, []);
    this._anchoring.add(channel);
    this._sendNow({ type: "resume", channel, offset: 0, epoch: "" });
  }

  /**
   * Stop holding a channel's messages: hand over those held, in offset order, without repeats.
   * @param {number} channel
   */
  _release(channel) {
    const held = this._resuming.get(channel) ?? [];
    this._resuming.delete(channel);
    this._anchoring.delete(channel);
    held.sort((a, b) => a.offset - b.offset);
    for (const message of held) this._deliverChannel(message);
  }

  _resumed(frame) {
    const anchor = this._anchoring.has(frame.channel);
    this._release(frame.channel);
    const known = this.positions.get(frame.channel);
    const ahead = known && known.epoch === frame.epoch && known.offset > frame.offset;
    if (!this._left.has(frame.channel) && (!frame.recovered || !ahead)) {
      this.positions.set(frame.channel, { offset: frame.offset, epoch: frame.epoch });
    }
    if (!anchor) this._emit("resumed", frame); // an anchor is not news: nothing was missed
  }

  _critical(frame) {
    const id = frame.id;
    if (!this._seen.has(id)) {
      this._seen.add(id);
      this._seenOrder.push(id);
      if (this._seenOrder.length > SEEN_IDS) this._seen.delete(this._seenOrder.shift());
      this._deliver(frame);
    }
    // acked again when seen again: the first ack may have been lost
    if (this.options.autoAck) this._sendNow({ type: "ack", id });
  }

  _deliver(frame) {
    /** @type {UccMessage} */
    const message = { data: frame.data, frame };
    if (frame.channel !== undefined) message.channel = frame.channel;
    if (frame.offset !== undefined) message.offset = frame.offset;
    if (frame.epoch !== undefined) message.epoch = frame.epoch;
    if (frame.id !== undefined) message.id = frame.id;
    this._emit("message", message);
  }
}

/**
 * A value, or what a function (sync or async) returns.
 * @param {string | (() => string | Promise<string>)} value
 * @returns {Promise<string>}
 */
async function resolve(value) {
  return typeof value === "function" ? await value() : value;
}
