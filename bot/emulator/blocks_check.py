"""Block Kit validation: refuse what Slack refuses, with Slack's error codes.

Slack answers a bad `blocks` argument with `invalid_blocks` (or `invalid_blocks_format` when it is
not a JSON array) and lists what was wrong in `response_metadata.messages`, each with a JSON
pointer ("[ERROR] must be less than 3001 characters [json-pointer:/blocks/0/text/text]"). We do
the same, so a bot that passes here fails in the real workspace only for reasons we did not model.

Only the limits a bot is likely to hit are checked: block counts (50 a message, 100 a view),
section text (3,000) and fields (10 × 2,000), header (150), button text (75) and value (2,000),
action/block id length (255) and uniqueness, element counts, text objects' shape, the 40,000
characters of a message's `text`. Unknown block or element types are refused as well: a typo in
`type` is the commonest Block Kit bug.
"""

from __future__ import annotations

MAX_MESSAGE_BLOCKS = 50
MAX_VIEW_BLOCKS = 100
MAX_SECTION_TEXT = 3000
MAX_MESSAGE_TEXT = 40_000

BLOCK_TYPES = {
    "actions",
    "context",
    "divider",
    "file",
    "header",
    "image",
    "input",
    "markdown",
    "rich_text",
    "section",
    "video",
}
INPUT_ELEMENTS = {
    "checkboxes",
    "datepicker",
    "datetimepicker",
    "email_text_input",
    "file_input",
    "multi_static_select",
    "multi_users_select",
    "multi_conversations_select",
    "multi_channels_select",
    "multi_external_select",
    "number_input",
    "plain_text_input",
    "radio_buttons",
    "rich_text_input",
    "static_select",
    "users_select",
    "conversations_select",
    "channels_select",
    "external_select",
    "timepicker",
    "url_text_input",
}
INTERACTIVE_ELEMENTS = INPUT_ELEMENTS | {"button", "overflow", "image", "workflow_button"}
VIEW_TYPES = {"modal", "home"}


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, message: str, pointer: str) -> None:
        self.errors.append(f"[ERROR] {message} [json-pointer:{pointer}]")

    def text_object(self, obj, pointer: str, *, plain_only=False, max_len: int | None = None):
        if not isinstance(obj, dict):
            self.error("must be a text object", pointer)
            return
        kinds = {"plain_text"} if plain_only else {"plain_text", "mrkdwn"}
        if obj.get("type") not in kinds:
            self.error(f"must be one of {sorted(kinds)}", f"{pointer}/type")
        text = obj.get("text")
        if not isinstance(text, str) or not text:
            self.error("must be more than 0 characters", f"{pointer}/text")
        elif max_len is not None and len(text) > max_len:
            self.error(f"must be less than {max_len + 1} characters", f"{pointer}/text")

    def element(self, element, pointer: str, *, allowed: set[str], action_ids: set[str]):
        if not isinstance(element, dict) or not isinstance(element.get("type"), str):
            self.error("must be an object with a type", pointer)
            return
        kind = element["type"]
        if kind not in allowed:
            self.error(f"type '{kind}' is not allowed here", f"{pointer}/type")
            return
        action_id = element.get("action_id")
        if action_id is not None:
            if not isinstance(action_id, str) or not 0 < len(action_id) <= 255:
                self.error("must be 1 to 255 characters", f"{pointer}/action_id")
            elif action_id in action_ids:
                self.error(f"action_id '{action_id}' is already used", f"{pointer}/action_id")
            else:
                action_ids.add(action_id)
        if kind == "button":
            self.text_object(element.get("text"), f"{pointer}/text", plain_only=True, max_len=75)
            value = element.get("value")
            if value is not None and (not isinstance(value, str) or len(value) > 2000):
                self.error("must be a string of at most 2000 characters", f"{pointer}/value")
            if element.get("style") not in (None, "primary", "danger"):
                self.error("must be 'primary' or 'danger'", f"{pointer}/style")
            url = element.get("url")
            if url is not None and len(str(url)) > 3000:
                self.error("must be less than 3001 characters", f"{pointer}/url")
        elif kind in {"static_select", "multi_static_select", "radio_buttons", "checkboxes"}:
            options = element.get("options") or []
            groups = element.get("option_groups") or []
            if not options and not groups:
                self.error("must provide options", f"{pointer}/options")
            if len(options) > 100:
                self.error("must have at most 100 items", f"{pointer}/options")

    def block(self, block, pointer: str, *, seen_block_ids: set[str]):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            self.error("must be an object with a string `type`", pointer)
            return
        kind = block["type"]
        if kind not in BLOCK_TYPES:
            self.error(f"unknown block type '{kind}'", f"{pointer}/type")
            return
        block_id = block.get("block_id")
        if block_id is not None:
            if not isinstance(block_id, str) or not 0 < len(block_id) <= 255:
                self.error("must be 1 to 255 characters", f"{pointer}/block_id")
            elif block_id in seen_block_ids:
                self.error(f"block_id '{block_id}' is already used", f"{pointer}/block_id")
            else:
                seen_block_ids.add(block_id)
        action_ids: set[str] = set()
        if kind == "section":
            text, fields = block.get("text"), block.get("fields")
            if text is None and not fields:
                self.error("must provide `text` or `fields`", pointer)
            if text is not None:
                self.text_object(text, f"{pointer}/text", max_len=MAX_SECTION_TEXT)
            if fields is not None:
                if not isinstance(fields, list) or len(fields) > 10:
                    self.error("must be a list of at most 10 items", f"{pointer}/fields")
                else:
                    for i, field in enumerate(fields):
                        self.text_object(field, f"{pointer}/fields/{i}", max_len=2000)
            if "accessory" in block:
                self.element(
                    block["accessory"],
                    f"{pointer}/accessory",
                    allowed=INTERACTIVE_ELEMENTS,
                    action_ids=action_ids,
                )
        elif kind == "header":
            self.text_object(block.get("text"), f"{pointer}/text", plain_only=True, max_len=150)
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 0 < len(elements) <= 25:
                self.error("must be a list of 1 to 25 elements", f"{pointer}/elements")
                return
            for i, element in enumerate(elements):
                self.element(
                    element,
                    f"{pointer}/elements/{i}",
                    allowed=INTERACTIVE_ELEMENTS - {"image"},
                    action_ids=action_ids,
                )
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 0 < len(elements) <= 10:
                self.error("must be a list of 1 to 10 elements", f"{pointer}/elements")
                return
            for i, element in enumerate(elements):
                if isinstance(element, dict) and element.get("type") == "image":
                    continue
                self.text_object(element, f"{pointer}/elements/{i}")
        elif kind == "input":
            self.text_object(block.get("label"), f"{pointer}/label", plain_only=True, max_len=2000)
            if "element" not in block:
                self.error("must provide `element`", f"{pointer}/element")
            else:
                self.element(
                    block["element"],
                    f"{pointer}/element",
                    allowed=INPUT_ELEMENTS,
                    action_ids=action_ids,
                )
        elif kind == "markdown":
            text = block.get("text")
            if not isinstance(text, str) or not 0 < len(text) <= 12_000:
                self.error("must be 1 to 12000 characters", f"{pointer}/text")
        elif kind == "image":
            if not block.get("image_url") and not block.get("slack_file"):
                self.error("must provide `image_url` or `slack_file`", pointer)
            if not isinstance(block.get("alt_text"), str) or not block.get("alt_text"):
                self.error("must provide `alt_text`", f"{pointer}/alt_text")


def check_blocks(blocks, *, surface: str = "message") -> tuple[str | None, list[str]]:
    """Validate `blocks` for a message (or a "modal"/"home" view).

    Returns (error code or None, Slack-style messages). `blocks=None` is valid (no blocks).
    """
    if blocks is None:
        return None, []
    if not isinstance(blocks, list):
        return "invalid_blocks_format", ["[ERROR] must be an array [json-pointer:/blocks]"]
    checker = _Checker()
    limit = MAX_MESSAGE_BLOCKS if surface == "message" else MAX_VIEW_BLOCKS
    if len(blocks) > limit:
        checker.error(f"must have at most {limit} items", "/blocks")
    seen: set[str] = set()
    for i, block in enumerate(blocks):
        checker.block(block, f"/blocks/{i}", seen_block_ids=seen)
    return ("invalid_blocks" if checker.errors else None), checker.errors


def check_message(*, text, blocks, attachments=None) -> tuple[str | None, list[str]]:
    """What chat.postMessage/update/postEphemeral check before storing a message."""
    if text is not None and not isinstance(text, str):
        text = str(text)
    if not text and not blocks and not attachments:
        return "no_text", []
    if text and len(text) > MAX_MESSAGE_TEXT:
        return "msg_too_long", [f"[ERROR] must be at most {MAX_MESSAGE_TEXT} characters"]
    return check_blocks(blocks, surface="message")


def check_view(view) -> tuple[str | None, list[str]]:
    """What views.open/update/push/publish check: type, title, submit, blocks."""
    if not isinstance(view, dict):
        return "invalid_arguments", ["[ERROR] view must be a JSON object [json-pointer:/view]"]
    checker = _Checker()
    kind = view.get("type")
    if kind not in VIEW_TYPES:
        checker.error(f"must be one of {sorted(VIEW_TYPES)}", "/view/type")
    if kind == "modal":
        checker.text_object(view.get("title"), "/view/title", plain_only=True, max_len=24)
        for key in ("submit", "close"):
            if key in view:
                checker.text_object(view[key], f"/view/{key}", plain_only=True, max_len=24)
        blocks = view.get("blocks") if isinstance(view.get("blocks"), list) else []
        has_input = any(isinstance(b, dict) and b.get("type") == "input" for b in blocks)
        if has_input and "submit" not in view:
            checker.error("must provide `submit` when the view has input blocks", "/view/submit")
    for key in ("callback_id", "external_id"):
        if key in view and len(str(view[key])) > 255:
            checker.error("must be less than 256 characters", f"/view/{key}")
    if len(str(view.get("private_metadata", ""))) > 3000:
        checker.error("must be less than 3001 characters", "/view/private_metadata")
    if not isinstance(view.get("blocks"), list):
        checker.error("must provide `blocks`", "/view/blocks")
    if checker.errors:
        return "invalid_arguments", checker.errors
    return check_blocks(view["blocks"], surface=kind)
