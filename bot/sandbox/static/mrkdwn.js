// Slack's mrkdwn to safe HTML: *bold*, _italic_, ~strike~, `code`, ```blocks```, <@U…>
// mentions, <#C…|channel>, <url|text> links, :emoji: shortcodes.
//
// Safety first: every piece of text is HTML-escaped before any markup is added, and the only
// markup added is a fixed set of tags. Slack's own escaping (&amp; &lt; &gt;) is undone first, so
// "a < b" shows as typed. Links only for http(s) and mailto.
"use strict";

const Mrkdwn = (() => {
  const EMOJI = {
    white_check_mark: "✅", heavy_check_mark: "✔️", x: "❌", pencil2: "✏️", pencil: "📝",
    "+1": "👍", "-1": "👎", thumbsup: "👍", thumbsdown: "👎", warning: "⚠️", tada: "🎉",
    wave: "👋", robot_face: "🤖", thinking_face: "🤔", raising_hand: "🙋", hourglass: "⌛",
    hourglass_flowing_sand: "⏳", bulb: "💡", books: "📚", mag: "🔍", rocket: "🚀",
    information_source: "ℹ️", lock: "🔒", eyes: "👀", memo: "📝", sparkles: "✨",
    no_entry: "⛔", question: "❓", heart: "❤️", smile: "😄", slightly_smiling_face: "🙂",
  };

  function escapeHtml(text) {
    return String(text)
      .replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // Slack escapes exactly these three in message text
  function unescapeSlack(text) {
    return String(text).replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");
  }

  function safeUrl(url) {
    return /^(https?:\/\/|mailto:)/i.test(url) ? url : null;
  }

  function userName(users, id, fallback) {
    const user = users && users[id];
    return user ? user.name : (fallback || id);
  }

  // One <…> control sequence, already without its brackets.
  function control(inner, ctx) {
    const [target, label] = splitOnce(inner, "|");
    if (target.startsWith("@")) {
      const id = target.slice(1);
      const me = ctx.me === id ? " me" : "";
      return `<span class="mention${me}" data-user="${escapeHtml(id)}">@${escapeHtml(userName(ctx.users, id, label))}</span>`;
    }
    if (target.startsWith("#")) {
      const id = target.slice(1);
      const channel = (ctx.channels || []).find((c) => c.id === id);
      const name = channel ? channel.name : (label || id);
      return `<span class="mention channel">#${escapeHtml(unescapeSlack(name))}</span>`;
    }
    if (target.startsWith("!")) {
      const word = target.slice(1).split("^")[0];
      if (word === "subteam") return `<span class="mention">@${escapeHtml(label || "group")}</span>`;
      if (word === "date") return escapeHtml(unescapeSlack(label || ""));
      return `<span class="mention broadcast">@${escapeHtml(word)}</span>`;
    }
    const url = safeUrl(unescapeSlack(target));
    const text = escapeHtml(unescapeSlack(label || target));
    if (!url) return text;
    return `<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer">${text}</a>`;
  }

  function splitOnce(text, sep) {
    const at = text.indexOf(sep);
    return at < 0 ? [text, null] : [text.slice(0, at), text.slice(at + 1)];
  }

  function styles(html) {
    // runs on escaped text: the patterns only ever wrap it in fixed tags
    return html
      .replace(/(^|[^\w*])\*(?=\S)([^*\n]*?\S)\*(?!\w)/g, "$1<b>$2</b>")
      .replace(/(^|[^\w])_(?=\S)([^_\n]*?\S)_(?!\w)/g, "$1<i>$2</i>")
      .replace(/(^|[^\w~])~(?=\S)([^~\n]*?\S)~(?!\w)/g, "$1<s>$2</s>")
      .replace(/:([a-z0-9_+-]+):/g, (all, name) => EMOJI[name] || all)
      .replace(/\n/g, "<br>");
  }

  // `ctx`: {users: {id: {name}}, channels: [{id, name}], me: "U…"}
  function render(source, ctx) {
    ctx = ctx || {};
    const held = [];
    const hold = (html) => `\u0001${held.push(html) - 1}\u0002`;
    let text = String(source || "").replace(/[\u0001\u0002]/g, "");
    text = text.replace(/```([\s\S]*?)```/g, (_, code) =>
      hold(`<pre class="code">${escapeHtml(unescapeSlack(code.replace(/^\n/, "")))}</pre>`));
    text = text.replace(/`([^`\n]+)`/g, (_, code) =>
      hold(`<code>${escapeHtml(unescapeSlack(code))}</code>`));
    text = text.replace(/<([^<>\n]+)>/g, (_, inner) => hold(control(inner, ctx)));
    let html = styles(escapeHtml(unescapeSlack(text)));
    html = html.replace(/\u0001(\d+)\u0002/g, (_, i) => held[Number(i)]);
    return html;
  }

  function plain(text) {
    return escapeHtml(text).replace(/:([a-z0-9_+-]+):/g, (all, n) => EMOJI[n] || all)
      .replace(/\n/g, "<br>");
  }

  return { render, plain, escapeHtml, unescapeSlack, safeUrl };
})();
