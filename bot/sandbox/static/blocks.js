// Block Kit to HTML, the subset Apprentice sends (and a little more): header, section (text,
// fields, a button accessory), context, actions (buttons), divider, rich_text, image (as its
// alt text: the sandbox loads nothing from outside), and input (in modals).
//
// Buttons become <button data-action-id=…>; the caller knows where they sit (a message or a
// view) and sends the click to the sandbox server, which clicks it through the emulator.
"use strict";

const Blocks = (() => {
  const esc = Mrkdwn.escapeHtml;

  function textObject(obj, ctx) {
    if (!obj) return "";
    if (obj.type === "mrkdwn") return Mrkdwn.render(obj.text, ctx);
    return Mrkdwn.plain(obj.text || "");
  }

  function button(el) {
    const style = el.style === "primary" || el.style === "danger" ? ` ${el.style}` : "";
    const label = Mrkdwn.plain((el.text && el.text.text) || "");
    if (el.url && Mrkdwn.safeUrl(el.url)) {
      return `<a class="btn${style}" href="${esc(el.url)}" target="_blank" rel="noopener noreferrer">${label}</a>`;
    }
    return `<button type="button" class="btn${style}" data-action-id="${esc(el.action_id || "")}">${label}</button>`;
  }

  function element(el, ctx) {
    if (!el) return "";
    if (el.type === "button") return button(el);
    if (el.type === "mrkdwn" || el.type === "plain_text") return `<span>${textObject(el, ctx)}</span>`;
    if (el.type === "image") return `<span class="img-alt">[${esc(el.alt_text || "image")}]</span>`;
    return `<span class="unsupported">[${esc(el.type || "element")}]</span>`;
  }

  function richText(block, ctx) {
    const inline = (els) => (els || []).map((e) => {
      if (e.type === "text") {
        let html = Mrkdwn.plain(e.text || "");
        const s = e.style || {};
        if (s.code) html = `<code>${html}</code>`;
        if (s.bold) html = `<b>${html}</b>`;
        if (s.italic) html = `<i>${html}</i>`;
        if (s.strike) html = `<s>${html}</s>`;
        return html;
      }
      if (e.type === "user") return Mrkdwn.render(`<@${e.user_id}>`, ctx);
      if (e.type === "channel") return Mrkdwn.render(`<#${e.channel_id}>`, ctx);
      if (e.type === "link") return Mrkdwn.render(`<${e.url}${e.text ? "|" + e.text : ""}>`, ctx);
      if (e.type === "emoji") return Mrkdwn.plain(`:${e.name}:`);
      return "";
    }).join("");
    return (block.elements || []).map((part) => {
      if (part.type === "rich_text_preformatted") return `<pre class="code">${inline(part.elements)}</pre>`;
      if (part.type === "rich_text_quote") return `<blockquote>${inline(part.elements)}</blockquote>`;
      if (part.type === "rich_text_list") {
        const items = (part.elements || []).map((i) => `<li>${inline(i.elements)}</li>`).join("");
        return part.style === "ordered" ? `<ol>${items}</ol>` : `<ul>${items}</ul>`;
      }
      return `<div>${inline(part.elements)}</div>`;
    }).join("");
  }

  function input(block, ctx, errors) {
    const el = block.element || {};
    const id = `in-${esc(block.block_id || "")}`;
    const data = `data-block-id="${esc(block.block_id || "")}" data-action-id="${esc(el.action_id || "")}"`;
    let field;
    if (el.type === "static_select") {
      const options = (el.options || []).map((o) =>
        `<option value="${esc(o.value)}">${Mrkdwn.plain((o.text && o.text.text) || o.value)}</option>`).join("");
      field = `<select id="${id}" class="input" ${data}><option value=""></option>${options}</select>`;
    } else if (el.type === "plain_text_input") {
      const ph = el.placeholder ? ` placeholder="${esc(el.placeholder.text)}"` : "";
      const max = el.max_length ? ` maxlength="${Number(el.max_length)}"` : "";
      const value = esc(el.initial_value || "");
      field = el.multiline
        ? `<textarea id="${id}" class="input" rows="6" ${data}${ph}${max}>${value}</textarea>`
        : `<input id="${id}" class="input" ${data}${ph}${max} value="${value}">`;
    } else {
      field = `<div class="unsupported">[${esc(el.type || "input")} is not supported here]</div>`;
    }
    const optional = block.optional ? ` <span class="muted">(optional)</span>` : "";
    const hint = block.hint ? `<div class="hint">${textObject(block.hint, ctx)}</div>` : "";
    const error = errors && errors[block.block_id]
      ? `<div class="field-error">${Mrkdwn.plain(errors[block.block_id])}</div>` : "";
    return `<div class="block input-block"><label for="${id}">${textObject(block.label, ctx)}${optional}</label>${field}${hint}${error}</div>`;
  }

  function block(b, ctx, errors) {
    switch (b.type) {
      case "header":
        return `<div class="block header">${textObject(b.text, ctx)}</div>`;
      case "section": {
        const text = b.text ? `<div class="section-text">${textObject(b.text, ctx)}</div>` : "";
        const fields = b.fields
          ? `<div class="fields">${b.fields.map((f) => `<div>${textObject(f, ctx)}</div>`).join("")}</div>` : "";
        const accessory = b.accessory ? `<div class="accessory">${element(b.accessory, ctx)}</div>` : "";
        return `<div class="block section"><div class="section-main">${text}${fields}</div>${accessory}</div>`;
      }
      case "context":
        return `<div class="block context">${(b.elements || []).map((e) => element(e, ctx)).join("")}</div>`;
      case "actions":
        return `<div class="block actions">${(b.elements || []).map((e) => element(e, ctx)).join("")}</div>`;
      case "divider":
        return `<hr class="block divider">`;
      case "rich_text":
        return `<div class="block rich">${richText(b, ctx)}</div>`;
      case "image":
        return `<div class="block img-alt">[${esc(b.alt_text || "image")}]</div>`;
      case "input":
        return input(b, ctx, errors);
      default:
        return `<div class="block unsupported">[${esc(b.type || "block")} block]</div>`;
    }
  }

  // `ctx` as for Mrkdwn.render; `errors`: a modal's {block_id: message}
  function render(blocks, ctx, errors) {
    return (blocks || []).map((b) => block(b, ctx, errors)).join("");
  }

  return { render, textObject };
})();
