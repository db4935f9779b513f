// The demo chat's page: joins with a name, keeps the members online and the messages of one
// channel, posts through the backend. No build step: an ES module using ucc.js.
import { UccClient } from "/ucc.js";

const $ = (id) => document.getElementById(id);
const stateBadge = $("state");
const membersList = $("members");
const messagesList = $("messages");
const errorBox = $("error");

let me = null; // {user, name, channel, token}
let client = null;
const members = new Map(); // user id -> name
let memberFetch = null; // {events: [...]} while /members is being fetched
let memberRefetch = false;
const seen = new Set(); // "epoch:offset" of the messages shown (or "id:..." without history)
let historyLoaded = false;
let postQueue = Promise.resolve();
const MAX_SHOWN = 1000; // messages kept on the page (the oldest go first)

// --- the backend --------------------------------------------------------------------------

async function api(method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let reply = null;
  try {
    reply = await response.json();
  } catch {
    reply = null;
  }
  if (!response.ok) {
    const error = new Error((reply && reply.message) || `${path}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return reply;
}

async function freshToken() {
  const reply = await api("POST", "/token", { name: me.name });
  me.token = reply.token;
  return reply.token;
}

function showError(text) {
  errorBox.textContent = text || "";
  errorBox.classList.toggle("shown", Boolean(text));
}

// --- members online -----------------------------------------------------------------------

function renderMembers() {
  const sorted = [...members].sort((a, b) => a[1].localeCompare(b[1]) || a[0] - b[0]);
  membersList.replaceChildren(
    ...sorted.map(([user, name]) => {
      const item = document.createElement("li");
      item.dataset.user = String(user);
      item.textContent = name;
      if (user === me.user) item.classList.add("me");
      return item;
    }),
  );
  $("count").textContent = `(${members.size})`;
}

function applyPresence(kind, user, name) {
  if (kind === "join") members.set(user, name || members.get(user) || `user ${user}`);
  else members.delete(user);
}

// Fetch who is online, then replay on top of it the join/leave frames that arrived meanwhile
// (the last word on a user is the latest frame, whether the list saw it or not).
async function refreshMembers() {
  if (memberFetch) {
    memberRefetch = true;
    return;
  }
  memberFetch = { events: [] };
  try {
    const list = await api("GET", "/members");
    members.clear();
    for (const { user, name } of list) members.set(user, name);
    for (const [kind, user] of memberFetch.events) applyPresence(kind, user);
    membersList.classList.toggle("stale", client.state !== "open");
    renderMembers();
  } catch (error) {
    showError(`cannot list the members: ${error.message}`);
  } finally {
    memberFetch = null;
    if (memberRefetch) {
      memberRefetch = false;
      refreshMembers();
    }
  }
}

function onPresence(kind, frame) {
  if (frame.channel !== me.channel) return;
  const known = members.has(frame.user);
  if (memberFetch) memberFetch.events.push([kind, frame.user]);
  applyPresence(kind, frame.user);
  renderMembers();
  if (kind === "join" && !known) refreshMembers(); // for its name
}

// --- messages -----------------------------------------------------------------------------

function nearBottom() {
  return messagesList.scrollHeight - messagesList.scrollTop - messagesList.clientHeight < 40;
}

function messageItem(data, epoch, offset) {
  const item = document.createElement("li");
  item.className = "msg";
  if (offset !== undefined) {
    item.dataset.epoch = epoch;
    item.dataset.offset = String(offset);
  }
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = String(data.name ?? `user ${data.user}`);
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = String(data.text ?? "");
  const time = document.createElement("span");
  time.className = "time";
  if (typeof data.ts === "number") {
    time.textContent = new Date(data.ts * 1000).toLocaleTimeString([], { timeStyle: "short" });
  }
  item.append(name, text, time);
  if (data.user === me.user) item.classList.add("mine");
  return item;
}

// Shown once each, in offset order within an epoch (a replay or the history may bring older
// messages after newer ones); a new epoch (the server lost its history) starts after the rest.
function addMessage(data, epoch, offset, id) {
  if (!data || typeof data !== "object") return;
  const key = offset !== undefined ? `${epoch}:${offset}` : id !== undefined ? `id:${id}` : null;
  if (key !== null) {
    if (seen.has(key)) return;
    seen.add(key);
  }
  const stick = nearBottom();
  const item = messageItem(data, epoch, offset);
  if (key !== null) item.dataset.key = key;
  // from the end: a live message goes last, a replayed or reloaded one a little before
  let before = null;
  if (offset !== undefined) {
    for (let other = messagesList.lastElementChild; other; other = other.previousElementSibling) {
      if (other.dataset.epoch !== epoch) continue;
      if (Number(other.dataset.offset) < offset) break;
      before = other;
    }
  }
  messagesList.insertBefore(item, before);
  while (messagesList.childElementCount > MAX_SHOWN) {
    const oldest = messagesList.firstElementChild;
    seen.delete(oldest.dataset.key);
    oldest.remove();
  }
  if (stick) messagesList.scrollTop = messagesList.scrollHeight;
}

function addNote(text) {
  const item = document.createElement("li");
  item.className = "note";
  item.textContent = text;
  messagesList.append(item);
}

// The channel's kept messages (at the first connect, and when a resume could not recover).
async function loadHistory() {
  try {
    const history = await api("GET", "/history");
    for (const { offset, data } of history.messages) addMessage(data, history.epoch, offset);
    // resume from here after a reconnect, even if no live message has arrived by then
    if (history.epoch && client.positions && !client.positions.has(me.channel)) {
      client.positions.set(me.channel, { offset: history.offset, epoch: history.epoch });
    }
    historyLoaded = true;
  } catch (error) {
    showError(`cannot load the history: ${error.message}`);
  }
}

// --- posting ------------------------------------------------------------------------------

async function post(text) {
  try {
    await api("POST", "/post", { text }, me.token);
  } catch (error) {
    if (error.status !== 401) throw error;
    await api("POST", "/post", { text }, await freshToken()); // the token expired: once more
  }
}

$("compose").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  // one at a time, in the order typed
  postQueue = postQueue.then(() =>
    post(text).then(
      () => showError(""),
      (error) => {
        showError(`not sent: ${error.message}`);
        if (!input.value) input.value = text;
      },
    ),
  );
});

// --- connecting ---------------------------------------------------------------------------

async function join(name) {
  showError("");
  const first = await api("POST", "/token", { name });
  me = { user: first.user, name: first.name, channel: first.channel, token: first.token };
  document.body.classList.add("joined");
  $("whoami").textContent = `as ${me.name}`;
  document.title = `ucc chat: ${me.name}`;
  let initial = first.token;
  client = new UccClient({
    url: first.url,
    // the first token, then a fresh one at every reconnect
    token: () => {
      const token = initial;
      initial = null;
      return token || freshToken();
    },
  });
  client.on("state", (state) => {
    stateBadge.textContent = state;
    stateBadge.dataset.state = state;
    membersList.classList.toggle("stale", state !== "open");
  });
  client.on("hello", () => {
    showError("");
    refreshMembers();
    if (!historyLoaded) loadHistory();
  });
  client.on("message", (event) => {
    if (event.channel !== me.channel) return;
    addMessage(event.data, event.epoch, event.offset, event.id);
  });
  client.on("resumed", (frame) => {
    if (frame.channel === me.channel && frame.recovered === false) {
      addNote("some messages could not be recovered; reloading the history");
      loadHistory();
    }
  });
  client.on("join", (frame) => onPresence("join", frame));
  client.on("leave", (frame) => onPresence("leave", frame));
  client.on("presence_changed", (frame) => {
    if (frame.channel === me.channel) refreshMembers();
  });
  client.on("error", (frame) => showError(`server: ${frame.message || frame.code}`));
  client.on("stopped", ({ code, reason }) => {
    showError(`disconnected for good (${code}${reason ? `: ${reason}` : ""}); reload to join again`);
  });
  window.chat = { client, me }; // for the console (and tests)
  client.connect();
  $("text").focus();
}

$("join").addEventListener("submit", (event) => {
  event.preventDefault();
  join($("name").value).catch((error) => showError(error.message));
});

const preset = new URLSearchParams(location.search).get("name");
if (preset) join(preset).catch((error) => showError(error.message));
