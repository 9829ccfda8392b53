// The sandbox page: polls /api/state for what the chosen person sees and renders it like a Slack
// channel; every click, message and slash command is POSTed to /api/act, where the sandbox
// server acts through the emulator, as that person. No framework, no build step.
"use strict";

(() => {
  const POLL_MS = 400;
  const $ = (selector, root = document) => root.querySelector(selector);
  const esc = Mrkdwn.escapeHtml;
  const params = new URLSearchParams(location.search);

  const ui = {
    me: params.get("as") || localStorage.getItem("sandbox.as") || "UALEX",
    channel: params.get("channel") || "CGENERAL",
    tab: "messages", // in the app's DM: "home" or "messages"
    thread: null, // {channel, ts} of the open thread
    state: null,
    version: null,
    follow: null, // my last top-level message: open its thread when the bot replies
    followAsk: null, // after /ask: open the thread of the bot's echo
    seen: new Map(), // ts -> when this page first saw it (shown as the time)
    modalKey: null,
    personasKey: null,
    lastChannel: null,
    homeRequested: false,
  };

  // -- talking to the sandbox server ---------------------------------------------------------

  async function act(action, args) {
    const response = await fetch("/api/act", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user: ui.me, action, ...args }),
    });
    let answer = {};
    try { answer = await response.json(); } catch (e) { answer = { error: response.statusText }; }
    if (!response.ok || answer.ok === false) {
      throw new Error(answer.error || `HTTP ${response.status}`);
    }
    if (answer.warning) toast(answer.warning);
    pollSoon();
    return answer;
  }

  let pollTimer = null;
  async function poll() {
    clearTimeout(pollTimer);
    try {
      const response = await fetch(`/api/state?user=${encodeURIComponent(ui.me)}`, { cache: "no-store" });
      if (response.ok) {
        const state = await response.json();
        if (state.version !== ui.version) {
          ui.version = state.version;
          ui.state = state;
          render();
        }
      } else {
        setStatus("failed", `the sandbox answered HTTP ${response.status}`);
      }
    } catch (e) {
      setStatus("failed", "the sandbox server is not reachable (stopped?)");
    }
    pollTimer = setTimeout(poll, POLL_MS);
  }
  function pollSoon() { clearTimeout(pollTimer); pollTimer = setTimeout(poll, 50); }

  function toast(message) {
    const box = $("#toast");
    box.textContent = message;
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  // -- helpers ------------------------------------------------------------------------------

  const ctx = () => ({ users: ui.state.users, channels: ui.state.channels, me: ui.me });
  const byTs = (a, b) => parseFloat(a.ts) - parseFloat(b.ts);
  const isTop = (m) => !m.thread_ts || m.thread_ts === m.ts;
  const channelInfo = (id) => ui.state.channels.find((c) => c.id === id);

  function colorFor(id) {
    let hash = 0;
    for (const ch of String(id)) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
    const colors = ["#e8912d", "#2bac76", "#1264a3", "#e01e5a", "#4a154b", "#36c5f0", "#7c3085"];
    return colors[hash % colors.length];
  }

  function timeOf(ts) {
    if (!ui.seen.has(ts)) ui.seen.set(ts, new Date());
    return ui.seen.get(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function author(m) {
    const users = ui.state.users;
    if (m.from_slack) return { id: "USLACKBOT", name: "Slackbot", role: "app", isBot: true };
    const id = m.is_ephemeral ? ui.state.bot_user : (m.user || ui.state.bot_user);
    const user = users[id] || { id, name: id, role: "" };
    const isBot = Boolean(user.is_bot || m.bot_id);
    return { id, name: isBot ? "Apprentice" : user.name, role: user.role, isBot };
  }

  // -- rendering ----------------------------------------------------------------------------

  function messageHtml(m, { inThread }) {
    const who = author(m);
    const avatar = who.isBot ? "🎓" : who.name.slice(0, 1).toUpperCase();
    const badge = who.isBot ? `<span class="badge">APP</span>`
      : (who.role && who.role !== "member" ? `<span class="role">${esc(who.role)}</span>` : "");
    let content;
    if (m.subtype === "tombstone") {
      content = `<div class="muted">This message was deleted.</div>`;
    } else if (who.isBot && m.blocks && m.blocks.length) {
      content = Blocks.render(m.blocks, ctx());
    } else {
      content = `<div class="text">${Mrkdwn.render(m.text, ctx())}</div>`;
    }
    const edited = m.edited && !who.isBot ? ` <span class="muted">(edited)</span>` : "";
    const replies = !inThread && m.reply_count
      ? `<button type="button" class="replies" data-thread="${esc(m.ts)}">${m.reply_count} ${m.reply_count === 1 ? "reply" : "replies"}</button>`
      : "";
    const ephemeral = m.is_ephemeral ? `<div class="ephemeral-note">Only visible to you</div>` : "";
    const classes = ["msg", m.is_ephemeral ? "ephemeral" : "", who.isBot ? "from-bot" : ""].join(" ");
    return `<div class="${classes}" data-ts="${esc(m.ts)}" data-channel="${esc(m.channel || "")}"${m.is_ephemeral ? ' data-ephemeral="1"' : ""}>
      <div class="avatar${who.isBot ? " bot" : ""}" style="background:${who.isBot ? "#4a154b" : colorFor(who.id)}">${esc(avatar)}</div>
      <div class="body">
        ${ephemeral}
        <div class="meta"><span class="author">${esc(who.name)}</span>${badge}<span class="time">${timeOf(m.ts)}</span></div>
        <div class="content">${content}${edited}</div>
        ${replies}
      </div>
    </div>`;
  }

  // Re-render only the messages that changed (keyed by ts), so a button under the pointer is
  // not replaced while the bot streams into another message.
  const rendered = new WeakMap(); // element -> html it was built from
  function renderList(element, items, options) {
    const nearBottom = element.scrollHeight - element.scrollTop - element.clientHeight < 120;
    const wanted = items.map((m) => ({ key: `${m.ts}${m.is_ephemeral ? "e" : ""}`, html: messageHtml(m, options) }));
    const current = [...element.children].filter((node) => node.dataset.key);
    const sameKeys = current.length === wanted.length && current.every((node, i) => node.dataset.key === wanted[i].key);
    if (sameKeys && wanted.length) {
      wanted.forEach((item, i) => {
        if (rendered.get(current[i]) === item.html) return;
        const fresh = build(item);
        current[i].replaceWith(fresh);
      });
    } else {
      element.replaceChildren(...wanted.map(build));
      if (!wanted.length) {
        element.innerHTML = `<div class="empty muted">${options.empty || "No messages yet."}</div>`;
      }
      if (options.afterRebuild) options.afterRebuild(element);
    }
    if (nearBottom || options.jump) element.scrollTop = element.scrollHeight;
  }

  function build(item) {
    const holder = document.createElement("template");
    holder.innerHTML = item.html.trim();
    const node = holder.content.firstElementChild;
    node.dataset.key = item.key;
    rendered.set(node, item.html);
    return node;
  }

  function setStatus(state, detail) {
    const pill = $("#bot-status");
    pill.className = `status ${state}`;
    pill.textContent = detail;
  }

  function renderPersonas() {
    const key = JSON.stringify(ui.state.personas) + ui.me;
    if (key === ui.personasKey) return;
    ui.personasKey = key;
    $("#persona").innerHTML = ui.state.personas.map((p) =>
      `<option value="${esc(p.id)}"${p.id === ui.me ? " selected" : ""}>${esc(p.label)}</option>`).join("");
  }

  function renderSidebar() {
    const item = (c, label) => `<li><button type="button" class="channel${c.id === ui.channel ? " active" : ""}" data-channel="${esc(c.id)}">${label}</button></li>`;
    $("#channel-list").innerHTML = ui.state.channels.filter((c) => c.kind === "channel")
      .map((c) => item(c, `<span class="hash">#</span> ${esc(c.name)}`)).join("");
    $("#app-list").innerHTML = ui.state.channels.filter((c) => c.kind === "im")
      .map((c) => item(c, `<span class="app-dot"></span> ${esc(c.name)}`)).join("");
  }

  function renderHeader(channel) {
    const isApp = channel.kind === "im";
    $("#channel-title").innerHTML = isApp
      ? `<b>Apprentice</b> <span class="badge">APP</span>`
      : `<b># ${esc(channel.name)}</b> <span class="muted">· ${channel.members} members</span>`;
    $("#channel-tabs").hidden = !isApp;
    for (const tab of document.querySelectorAll("#channel-tabs .tab")) {
      tab.classList.toggle("active", tab.dataset.tab === ui.tab);
    }
    $("#channel-note").textContent = channel.bot_member ? ""
      : "Apprentice is not in this channel: it hears nothing here (try #general or its DM).";
    const composer = $("#composer textarea");
    composer.placeholder = isApp ? "Message Apprentice — ask anything"
      : `Message #${channel.name} · @apprentice or /ask to ask a question`;
  }

  function followThreads(channel) {
    const messages = ui.state.messages[channel.id] || [];
    if (ui.follow && ui.follow.channel === channel.id) {
      const mine = messages.find((m) => m.ts === ui.follow.ts);
      if (mine && mine.reply_count) {
        ui.thread = { channel: channel.id, ts: mine.ts };
        ui.follow = null;
      }
    }
    if (ui.followAsk && ui.followAsk.channel === channel.id) {
      const echo = messages.filter(isTop).find((m) =>
        !ui.followAsk.known.has(m.ts) && m.user === ui.state.bot_user && m.reply_count);
      if (echo) {
        ui.thread = { channel: channel.id, ts: echo.ts };
        ui.followAsk = null;
      }
    }
  }

  function renderMain(channel) {
    const showHome = channel.kind === "im" && ui.tab === "home";
    $("#messages").hidden = showHome;
    $("#composer").hidden = showHome;
    $("#home").hidden = !showHome;
    if (showHome) {
      const home = ui.state.home;
      $("#home").innerHTML = home
        ? `<div class="home-view" data-view-id="${esc(home.id || "")}">${Blocks.render(home.blocks, ctx())}</div>`
        : `<div class="muted">Opening Home…</div>`;
      return;
    }
    const messages = (ui.state.messages[channel.id] || []).filter(isTop).map((m) => ({ ...m, channel: channel.id }));
    const ephemerals = ui.state.ephemerals.filter((e) => e.channel === channel.id && !e.thread_ts);
    const jump = ui.lastChannel !== channel.id;
    ui.lastChannel = channel.id;
    renderList($("#messages"), [...messages, ...ephemerals].sort(byTs), { inThread: false, jump });
  }

  function renderThread() {
    const pane = $("#thread");
    const thread = ui.thread;
    const messages = thread ? (ui.state.messages[thread.channel] || []) : [];
    const parent = thread && messages.find((m) => m.ts === thread.ts);
    if (!parent) {
      pane.hidden = true;
      ui.thread = null;
      return;
    }
    const first = pane.hidden || pane.dataset.ts !== thread.ts;
    pane.hidden = false;
    pane.dataset.ts = thread.ts;
    const channel = channelInfo(thread.channel);
    $("#thread-where").textContent = channel ? (channel.kind === "im" ? "Apprentice" : `#${channel.name}`) : "";
    const replies = messages.filter((m) => m.thread_ts === thread.ts && m.ts !== thread.ts);
    const ephemerals = ui.state.ephemerals.filter((e) => e.channel === thread.channel && e.thread_ts === thread.ts);
    const items = [parent, ...[...replies, ...ephemerals].sort(byTs)].map((m) => ({ ...m, channel: thread.channel }));
    const count = replies.length;
    renderList($("#thread-messages"), items, {
      inThread: true,
      jump: first,
      afterRebuild: (list) => {
        if (count > 0) {
          list.firstElementChild.insertAdjacentHTML("afterend",
            `<div class="reply-count">${count} ${count === 1 ? "reply" : "replies"}</div>`);
        }
      },
    });
  }

  function currentModalValues() {
    const values = {};
    for (const field of document.querySelectorAll("#modal [data-block-id]")) {
      values[field.dataset.blockId] = field.value;
    }
    return values;
  }

  function renderModal() {
    const view = ui.state.modal;
    const backdrop = $("#modal-backdrop");
    if (!view) {
      backdrop.hidden = true;
      ui.modalKey = null;
      return;
    }
    const key = JSON.stringify(view);
    if (key === ui.modalKey) return; // keep what the person is typing
    const sameView = ui.modalKey && $("#modal").dataset.viewId === view.id;
    const typed = sameView ? currentModalValues() : {};
    ui.modalKey = key;
    const errors = view.errors || {};
    const general = errors._response_action ? `<div class="field-error">${Mrkdwn.plain(errors._response_action)}</div>` : "";
    const title = (view.title && view.title.text) || "";
    const submit = view.submit ? `<button type="button" class="btn primary" data-modal="submit">${Mrkdwn.plain(view.submit.text)}</button>` : "";
    const close = (view.close && view.close.text) || "Cancel";
    const modal = $("#modal");
    modal.dataset.viewId = view.id;
    modal.innerHTML = `
      <div class="modal-head"><b>${Mrkdwn.plain(title)}</b><button type="button" class="icon" data-modal="close" aria-label="Close">×</button></div>
      <div class="modal-body">${Blocks.render(view.blocks, ctx(), errors)}${general}<div class="modal-error field-error" hidden></div></div>
      <div class="modal-foot"><button type="button" class="btn" data-modal="close">${Mrkdwn.plain(close)}</button>${submit}</div>`;
    for (const [block, value] of Object.entries(typed)) {
      const field = modal.querySelector(`[data-block-id="${CSS.escape(block)}"]`);
      if (field) field.value = value;
    }
    backdrop.hidden = false;
    const firstField = modal.querySelector(".input");
    if (firstField && !sameView) firstField.focus();
  }

  function render() {
    const state = ui.state;
    setStatus(state.bot.state, state.bot.detail);
    renderPersonas();
    let channel = channelInfo(ui.channel);
    if (!channel) {
      const previous = ui.channelKind || "channel";
      channel = state.channels.find((c) => c.kind === previous) || state.channels[0];
      ui.channel = channel.id;
    }
    ui.channelKind = channel.kind;
    if (channel.kind === "im" && ui.tab === "home" && !ui.homeRequested) {
      ui.homeRequested = true;
      act("open_home", {}).catch((e) => toast(e.message));
    }
    renderSidebar();
    renderHeader(channel);
    followThreads(channel);
    renderMain(channel);
    renderThread();
    renderModal();
  }

  // -- acting -------------------------------------------------------------------------------

  async function send(form) {
    const box = form.querySelector("textarea");
    const text = box.value.trim();
    if (!text) return;
    const inThread = form.id === "thread-composer";
    const channel = inThread ? ui.thread.channel : ui.channel;
    box.disabled = true;
    try {
      if (text.startsWith("/")) {
        const known = new Set((ui.state.messages[channel] || []).map((m) => m.ts));
        await act("command", { channel, text });
        if (/^\/ask\s/i.test(text)) ui.followAsk = { channel, known };
      } else {
        const answer = await act("post", { channel, text, thread_ts: inThread ? ui.thread.ts : null });
        if (!inThread) ui.follow = { channel, ts: answer.ts };
      }
      box.value = "";
      hideSuggestions(form);
    } catch (e) {
      toast(e.message);
    } finally {
      box.disabled = false;
      box.focus();
      autosize(box);
    }
  }

  async function click(button) {
    const actionId = button.dataset.actionId;
    const message = button.closest(".msg");
    const view = button.closest("[data-view-id]");
    button.disabled = true;
    try {
      if (message) {
        await act("click", { channel: message.dataset.channel, message_ts: message.dataset.ts, action_id: actionId });
      } else if (view) {
        await act("click_view", { view_id: view.dataset.viewId, action_id: actionId });
      }
    } catch (e) {
      toast(e.message);
    } finally {
      setTimeout(() => { button.disabled = false; }, 600);
    }
  }

  async function modalAction(kind) {
    const viewId = $("#modal").dataset.viewId;
    const problem = $("#modal .modal-error");
    try {
      if (kind === "close") {
        await act("close_view", { view_id: viewId });
        return;
      }
      const values = {};
      for (const field of document.querySelectorAll("#modal [data-block-id]")) {
        const value = field.value.trim() === "" ? null : field.value;
        values[field.dataset.blockId] = { [field.dataset.actionId]: value };
      }
      await act("submit_view", { view_id: viewId, values });
    } catch (e) {
      problem.textContent = e.message;
      problem.hidden = false;
    }
  }

  // -- slash command suggestions --------------------------------------------------------------

  function showSuggestions(form) {
    const box = form.querySelector("textarea");
    const list = form.querySelector(".suggestions");
    const typed = box.value;
    if (!ui.state || !typed.startsWith("/") || /\s/.test(typed)) return hideSuggestions(form);
    const matches = ui.state.commands.filter((c) => c.name.startsWith(typed.toLowerCase()));
    if (!matches.length) return hideSuggestions(form);
    list.innerHTML = matches.map((c) =>
      `<button type="button" class="suggestion" data-command="${esc(c.name)}"><b>${esc(c.name)}</b> <span class="muted">${esc(c.usage)}</span><div class="muted small">${esc(c.description)}</div></button>`).join("");
    list.hidden = false;
  }
  function hideSuggestions(form) { form.querySelector(".suggestions").hidden = true; }

  function autosize(box) {
    box.style.height = "auto";
    box.style.height = `${Math.min(box.scrollHeight, 200)}px`;
  }

  // -- wiring -------------------------------------------------------------------------------

  for (const form of [$("#composer"), $("#thread-composer")]) {
    const box = form.querySelector("textarea");
    form.addEventListener("submit", (event) => { event.preventDefault(); send(form); });
    box.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send(form);
      }
    });
    box.addEventListener("input", () => { autosize(box); showSuggestions(form); });
    form.querySelector(".suggestions").addEventListener("click", (event) => {
      const choice = event.target.closest("[data-command]");
      if (!choice) return;
      box.value = `${choice.dataset.command} `;
      hideSuggestions(form);
      box.focus();
    });
  }

  $("#persona").addEventListener("change", (event) => {
    ui.me = event.target.value;
    localStorage.setItem("sandbox.as", ui.me);
    ui.version = null;
    ui.modalKey = null;
    ui.homeRequested = false;
    ui.follow = ui.followAsk = null;
    pollSoon();
  });

  document.addEventListener("click", (event) => {
    const target = event.target;
    const actionButton = target.closest("button[data-action-id]");
    if (actionButton) return click(actionButton);
    const channelButton = target.closest("button.channel");
    if (channelButton) {
      ui.channel = channelButton.dataset.channel;
      const info = channelInfo(ui.channel);
      ui.tab = info && info.kind === "im" ? ui.tab : "messages";
      ui.homeRequested = false;
      return render();
    }
    const tab = target.closest("#channel-tabs .tab");
    if (tab) {
      ui.tab = tab.dataset.tab;
      ui.homeRequested = false;
      return render();
    }
    const replies = target.closest("button.replies");
    if (replies) {
      ui.thread = { channel: replies.closest(".msg").dataset.channel, ts: replies.dataset.thread };
      return render();
    }
    if (target.closest("#thread-close")) {
      ui.thread = null;
      return render();
    }
    const modalButton = target.closest("[data-modal]");
    if (modalButton) return modalAction(modalButton.dataset.modal);
    return undefined;
  });

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#modal-backdrop").hidden) modalAction("close");
  });

  poll();
})();
