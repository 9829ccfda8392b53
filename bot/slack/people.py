"""Who may do what: experts approve/correct/reject, admins run `/apprentice`.

An expert is a configured id (settings.experts or settings.admins: admins are experts too), a
Member row an admin added, or a member of settings.expert_usergroup. The check runs in the handler
on every click and command (anyone who can see a button can click it), so it must be fast: the
configured ids and one indexed query; the user group's members are cached for a minute because
`usergroups.users.list` is a Web API round trip.
"""

from __future__ import annotations

import logging
import threading
import time

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from sqlalchemy import Engine

from bot.settings import Settings
from bot.store import session_scope
from bot.store.members import list_members, member_roles
from bot.store.models import Role

log = logging.getLogger(__name__)

USERGROUP_TTL_S = 60.0
NOT_EXPERT = (
    "Only experts can approve, correct or reject answers. Use 👍 / 👎 to say what you think, or "
    "🙋 Ask an expert; an admin can add experts with `/apprentice experts add @you`."
)
NOT_ADMIN = "Only Apprentice admins can use `/apprentice`. Ask an admin ({admins}) for help."


class People:
    def __init__(self, *, settings: Settings, db: Engine, client: WebClient | None) -> None:
        self.settings = settings
        self.db = db
        self.client = client
        self._group: frozenset[str] = frozenset()
        self._group_at = float("-inf")
        self._lock = threading.Lock()

    def is_admin(self, user_id: str) -> bool:
        if user_id in self.settings.admins:
            return True
        with session_scope(self.db) as session:
            return Role.ADMIN.value in member_roles(session=session, user_id=user_id)

    def is_expert(self, user_id: str) -> bool:
        if user_id in self.settings.admins or user_id in self.settings.experts:
            return True
        with session_scope(self.db) as session:
            if member_roles(session=session, user_id=user_id):  # expert or admin row
                return True
        return user_id in self.usergroup_members()

    def expert_ids(self) -> list[str]:
        """Everyone to tag for 🙋 Ask an expert, configured ones first."""
        ids = list(dict.fromkeys([*self.settings.experts, *self.settings.admins]))
        with session_scope(self.db) as session:
            ids += [m.user_id for m in list_members(session=session) if m.user_id not in ids]
        return list(dict.fromkeys(ids))

    def admin_mentions(self) -> str:
        return ", ".join(f"<@{u}>" for u in self.settings.admins) or "your workspace admin"

    def usergroup_members(self) -> frozenset[str]:
        group = self.settings.expert_usergroup
        if not group or self.client is None:
            return frozenset()
        with self._lock:
            if time.monotonic() - self._group_at < USERGROUP_TTL_S:
                return self._group
            try:
                users = self.client.usergroups_users_list(usergroup=group).get("users") or []
                self._group = frozenset(users)
            except SlackApiError as exc:  # keep the last known members; say why in the log
                log.warning("could not list expert user group %s: %s", group, exc)
            self._group_at = time.monotonic()
            return self._group
