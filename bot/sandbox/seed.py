"""The sandbox's workspace: three people to act as, #general with the bot in it, #random without.

One person per role, so every part of the loop can be tried from one page: a member asks, an
expert corrects, an admin runs `/apprentice`. Their ids become the sandbox's `admins` and
`experts` settings. A welcome message is stored (not delivered: the bot never sees it) so the
page explains itself on first load.
"""

from __future__ import annotations

from dataclasses import dataclass

MEMBER, EXPERT, ADMIN = "member", "expert", "admin"
GENERAL, RANDOM = "CGENERAL", "CRANDOM"


@dataclass(frozen=True)
class Persona:
    user_id: str
    name: str
    real_name: str
    role: str  # member | expert | admin

    @property
    def label(self) -> str:
        return f"{self.name} ({self.role})"


PERSONAS = (
    Persona("UALEX", "alex", "Alex Member", MEMBER),
    Persona("UERIN", "erin", "Erin Expert", EXPERT),
    Persona("UADA", "ada", "Ada Admin", ADMIN),
)

WELCOME = (
    "Welcome to the *Apprentice sandbox*: a local Slack workspace with the bot in it. "
    "Ask a question by mentioning <@{bot}> here, in a DM to Apprentice, or with `/ask …`. "
    "Then switch to <@UERIN> (expert) to approve or ✏️ correct the answer, ask the same "
    "question again, and switch to <@UADA> (admin) to try `/apprentice status`."
)


def persona(user_id: str) -> Persona | None:
    return next((p for p in PERSONAS if p.user_id == user_id), None)


def role_ids(role: str) -> list[str]:
    return [p.user_id for p in PERSONAS if p.role == role]


def seed_workspace(emulator) -> None:
    """Add the personas, the channels, each person's DM with the bot and the welcome note."""
    for person in PERSONAS:
        emulator.add_user(
            person.user_id,
            name=person.name,
            real_name=person.real_name,
            is_admin=person.role == ADMIN,
        )
    people = [p.user_id for p in PERSONAS]
    bot = emulator.ws.bot_user_id
    emulator.add_channel(GENERAL, name="general", members=[*people, bot])
    emulator.add_channel(RANDOM, name="random", members=people)
    for person in PERSONAS:
        emulator.open_dm(person.user_id)
    emulator.post_message(
        user=role_ids(ADMIN)[0], channel=GENERAL, text=WELCOME.format(bot=bot), deliver=False
    )
