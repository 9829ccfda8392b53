"""Settings: one `Settings` object, read from the environment (and an `.env` file).

Slack's own variables keep Slack's names (`SLACK_BOT_TOKEN`, `SLACK_SIGNING_SECRET`,
`SLACK_APP_TOKEN`, `SLACK_API_URL`); everything of ours is `APPRENTICE_*`. Nothing is read at
import time: build a `Settings()` in a factory so tests can build as many as they like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
DEFAULT_SYSTEM_PROMPT = (
    "You are Apprentice, a concise assistant for a team. Answer the question directly in a few "
    "sentences. If team notes are given, prefer them over what you believe."
)
PLACEHOLDER_SECRETS = {"", "changethis", "changeme", "xoxb-your-token", "secret"}

UserIds = Annotated[list[str], NoDecode]


def _slack(name: str):
    return Field(default="", validation_alias=AliasChoices(name))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APPRENTICE_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # Slack (Slack's own names)
    slack_bot_token: str = _slack("SLACK_BOT_TOKEN")
    slack_signing_secret: str = _slack("SLACK_SIGNING_SECRET")
    slack_app_token: str = _slack("SLACK_APP_TOKEN")
    slack_api_url: str = Field(
        default="https://slack.com/api/", validation_alias=AliasChoices("SLACK_API_URL")
    )

    # Storage
    database_url: str = Field(default="sqlite:///./apprentice.db", description="SQLAlchemy URL")
    adapters_dir: Path = Field(default=Path("./adapters"), description="adapter version store")
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "apprentice" / "models",
        description="where converted base-model weights are cached as safetensors",
    )

    # Model and engine
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL,
        description="'smollm2-135m-instruct' (packaged), a local folder, or a hub id",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    serve_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="weights the bot answers with: auto = bfloat16 on CUDA, float32 on a CPU. "
        "bfloat16 on a CPU halves the weights' memory and, through the skinny kernel, decodes "
        "faster than float32 on SmolLM2 (20.9 against 15.6 tokens/s on an AVX2 EPYC; 24.3 "
        "against 23.2 and 37.2 against 33.7 in two runs on Xeons with AVX-512), "
        "but its answers may differ slightly from the float32 ones the learning gate checks. "
        "Training always uses float32 on a CPU",
    )
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_input_tokens: int = Field(default=1024, ge=32, description="prompt budget in tokens")
    max_new_tokens: int = Field(default=160, ge=1, le=4096)
    batch_size: int = Field(default=8, ge=1, le=256)
    answer_timeout_s: float = Field(default=180.0, gt=0)
    adapter_poll_s: float = Field(
        default=2.0, gt=0, description="how often a running bot checks the active-version pointer"
    )
    threads: int = Field(default=0, ge=0, description="torch CPU threads; 0 = torch's default")
    tune_threads: bool = Field(
        default=True,
        description="on a CPU, the engine measures its decoding steps on all threads and on one "
        "and keeps the faster (one wins by far when other work shares the cores)",
    )

    # People
    admins: UserIds = Field(default_factory=list, description="Slack user ids, comma-separated")
    experts: UserIds = Field(default_factory=list, description="Slack user ids, comma-separated")
    expert_usergroup: str = Field(default="", description="Slack user group id of experts")
    admin_channel: str = Field(default="", description="channel id for training reports")

    # HTTP
    host: str = "0.0.0.0"
    port: int = Field(default=3000, ge=0, le=65535)

    # Learning cycle
    train_cron: str = Field(
        default="0 3 * * *", description="crontab for scheduled cycles; '' = off"
    )
    train_min_new_verdicts: int = Field(
        default=20, ge=1, description="start a cycle once this many new expert verdicts arrived"
    )
    train_check_s: float = Field(default=60.0, gt=0, description="verdict-count check interval")
    train_threads: int = Field(
        default=0,
        ge=0,
        description="torch threads of the training process; 0 = half the cores (at least 1), "
        "so answering keeps the rest while a cycle runs",
    )
    train_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="niceness of the training process (0-19): at 19 it gets only the CPU time "
        "answering leaves, so users barely feel a cycle; 0 = same priority as the bot",
    )
    train_lock_ttl_s: float = Field(
        default=120.0,
        ge=3,
        description="lease of the training lock, renewed every third of it; a cycle whose "
        "heartbeat is older than this is presumed dead",
    )
    train_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="TrainingConfig fields to override, as JSON (e.g. '{\"learning_rate\": 3e-4}')",
    )

    # Retrieval: approved and corrected answers help the next asker at once (bot.knowledge)
    retrieval_enabled: bool = Field(
        default=True, description="use and cite approved answers in prompts; off = the model alone"
    )
    retrieval_threshold: float = Field(
        default=0.6, ge=-1, le=1, description="question similarity (cosine) to use a team note"
    )
    retrieval_exact_threshold: float = Field(
        default=0.98,
        ge=-1,
        le=1,
        description="similarity to answer with the approved text directly, without the model",
    )
    retrieval_k: int = Field(default=3, ge=1, le=10, description="team notes per answer, at most")

    @field_validator("admins", "experts", mode="before")
    @classmethod
    def _split_ids(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
        return value

    @property
    def slack_api_base(self) -> str:
        return self.slack_api_url if self.slack_api_url.endswith("/") else self.slack_api_url + "/"

    def slack_problems(self) -> list[str]:
        """What is missing before the bot can talk to Slack, as actionable sentences."""
        problems = []
        if self.slack_bot_token.strip() in PLACEHOLDER_SECRETS:
            problems.append("SLACK_BOT_TOKEN is not set: copy the Bot User OAuth Token (xoxb-…)")
        if not self.slack_app_token and self.slack_signing_secret.strip() in PLACEHOLDER_SECRETS:
            problems.append(
                "SLACK_SIGNING_SECRET is not set: copy it from the app's Basic Information page "
                "(or set SLACK_APP_TOKEN for Socket Mode)"
            )
        return problems
