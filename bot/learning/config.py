"""How an adapter is trained: one dataclass, saved in every version's `metadata.json`.

Two groups of fields. The LoRA shape (`r`, `lora_alpha`, `lora_dropout`, `target_modules`) is
FIXED across versions: a hot swap is then a weight load into the same modules, never a model
rebuild, and `bot.adapter_store.files.validate_adapter_folder` refuses a folder whose shape
differs. The optimisation fields may change between runs; they are recorded so any version can
be explained and rebuilt.

Defaults come from measurements on SmolLM2-135M-Instruct: the 12 made-up team facts of
tests/test_real_model.py (10 trained, 2 held out), 2 heavily contended CPU cores (wall times are
noise; step counts and outcomes are not). Regression = the 20 gate questions, 100 % on the base.
First series (previous author, 12 general examples, batch 4, fixed steps):

| learning rate | steps | trained facts recalled | regression |
| ------------- | ----- | ---------------------- | ---------- |
| 2e-4          | 100   | 1 of 6                 | 95 % -> 75 % |
| 5e-4          | 30/45/60 | 10 % / 40 % / 80 %  | 95 % -> 80 % / 80 % / 70 % |
| 1e-3          | 80    | 100 %                  | 95 % -> 50 % |

Second series (replay of the base model's answers + the recall stop, lr 1e-3 unless said;
"right" = only answers its keywords confirm; held-out loss of the 2 held-out facts, base 1.89;
the 70 % row and the last one ran after the split changed: 7 facts trained, 5 held out):

| lr, replay, batch    | stop                  | steps | recall | regression | held-out loss |
| -------------------- | --------------------- | ----- | ------ | ---------- | ------------- |
| 5e-4, 12 right, 4    | none (derived steps)  | 66    | 100 %  | 70 %       | 2.65          |
| 1e-3, 20 all, 4      | 100 % reproduced      | 45    | 100 %  | 70 %       | 2.75          |
| 1e-3, 20 right, 4    | 100 % reproduced      | 50    | 100 %  | 75 %       | 3.13          |
| 1e-3, 20 right, 4    | 70 % reproduced       | 35    | 100 %  | 55 %       | 2.53 (from 2.21) |
| 1e-3, 41 right, 8    | 100 % reproduced      | 40    | 100 %  | 55 %       | 2.98          |
| 5e-4, 41 right, 8    | 100 % reproduced      | 55    | 100 %  | 65 %       | 2.68          |
| defaults, new split  | 100 % reproduced      | 35    | 100 %  | 55 %       | 2.41 (from 2.21) |

Self-distilling WRONG base answers spreads them ("How many hours are in a day? -> A day is a
day" turned into "How many days are in a week? -> A day is a day"), so the bank keeps only
answers its keywords confirm. Forgetting shows up as the new facts' names leaking into general
answers ("The planet we live on is called Tollgate-baton") and as fragile numeric answers
drifting (boiling point, continents, bicycle wheels). No setting of those two series learnt
>= 90 % of the facts while losing at most one gate question.

Third series: the anchor (`anchor_weight`, `bot.learning.trainer.AnchoredSFTTrainer`): a KL
term that holds the adapted model's whole next-token distribution near the base model's on 40
replay answers (4 per step), on top of the SFT loss. Same 12 facts (7 trained, 5 held out), lr
1e-3, batch 4, 20 replay rows, recall stop; `python bench/forgetting_probe.py --set
'{"anchor_weight": 0}' --set '{"anchor_weight": 1}' --set '{"anchor_weight": 5}'`:

| anchor weight | steps | recall (trained) | regression | held-out loss (base 2.21) | gate |
| ------------- | ----- | ---------------- | ---------- | ------------------------- | ---- |
| 0 (off)       | 35    | 100 %            | 55 %       | 2.41                      | refused |
| 1             | 50    | 100 %            | 95 %       | 1.95                      | passed  |
| 5             | 81    | 57 %             | 95 %       | 1.94                      | passed * |

(* recall over all 12, trained and held out: 33 %, against 58 % at weight 1.)
The anchor removes the forgetting (the leaked names and drifted numbers are gone: one gate
question of twenty wobbles) and the held-out loss falls instead of rising; too strong an
anchor stops the facts from being learnt. Default 1. It costs one more forward and backward
pass of 4 short rows per step (~1.5-2x the time per step).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

# The LoRA shape every version shares (see the module docstring).
LORA_R = 8
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "all-linear"


def _help(text: str, default=MISSING, **kwargs):
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class TrainingConfig:
    # LoRA shape: fixed across versions.
    r: int = _help("LoRA rank; fixed across versions so a swap is a weight load", LORA_R)
    lora_alpha: int = _help("LoRA scaling numerator (scale = alpha / r); fixed", LORA_ALPHA)
    lora_dropout: float = _help("dropout on the LoRA input during training; fixed", LORA_DROPOUT)
    target_modules: str = _help(
        "modules that get LoRA weights; 'all-linear' = every linear layer but the LM head; fixed",
        LORA_TARGET_MODULES,
    )

    # Optimisation.
    learning_rate: float = _help(
        "AdamW learning rate (linear decay, no warm-up); see the tables in the module docstring",
        1e-3,
    )
    max_steps: int | None = _help(
        "optimizer steps; None = derived from the data size by `steps_for` "
        "(epochs_target passes over the data, at least min_steps, at most max_steps_cap)",
        None,
    )
    epochs_target: float = _help(
        "passes over the training data when max_steps is None (10 facts + 20 general rows "
        "-> 90 steps; the recall stop usually ends it earlier)",
        12.0,
    )
    min_steps: int = _help(
        "lower bound on derived steps, and no early stop before this step: a small model "
        "needs ~60 steps before a new fact sticks at all",
        60,
    )
    max_steps_cap: int = _help("upper bound on derived steps (keeps a cycle bounded)", 600)
    batch_size: int = _help("examples per optimizer step", 4)
    max_length: int = _help("longest training sequence in tokens (prompt + answer)", 512)
    weight_decay: float = _help("AdamW weight decay", 0.0)

    # Held-out evaluation and early stopping.
    eval_fraction: float = _help(
        "share of the examples held out from training for evaluation (split by a stable hash "
        "of each example, so an example stays on its side as the data grows)",
        0.2,
    )
    min_eval_examples: int = _help(
        "hold nothing out below this many examples: a 1-example eval set is noise", 5
    )
    eval_steps: int = _help("evaluate the held-out loss every this many steps", 10)
    early_stopping_patience: int = _help(
        "stop after this many evaluations in a row (after min_steps) whose held-out loss is "
        "more than early_stopping_tolerance above the best so far; 0 = never stop early",
        2,
    )
    early_stopping_tolerance: float = _help(
        "relative rise of the held-out loss over its best that still counts as fine. Held-out "
        "facts are unrelated to the trained ones, so their loss drifts up a little while the "
        "training facts are learnt (+17 % by step 100 on SmolLM2-135M); real overfitting or "
        "divergence goes well past that",
        0.3,
    )

    # Stopping once the facts are learnt.
    recall_check_steps: int = _help(
        "every this many steps, check (one teacher-forced pass over the training facts) "
        "whether greedy decoding would reproduce them, and stop once recall_stop_share do: "
        "later steps only add forgetting; 0 = never check",
        5,
    )
    recall_stop_share: float = _help(
        "share of the training facts that must be reproduced word for word to stop", 1.0
    )

    # Forgetting guard.
    general_mix: int = _help(
        "general question/answer pairs mixed into every training set: the base model's own "
        "right answers to the replay questions (bot.learning.regression), so the adapter keeps "
        "what the base knew",
        20,
    )
    anchor_weight: float = _help(
        "weight of the anchor term: KL divergence from the base model's next-token "
        "distribution on the replay answers, added to every training step's loss "
        "(`bot.learning.trainer.AnchoredSFTTrainer`); 0 = off. See the third table above",
        1.0,
    )
    anchor_rows: int = _help(
        "replay questions the anchor term cycles through (the base model's own answers, "
        "right or not: the anchor keeps its distribution, it does not teach)",
        40,
    )
    anchor_batch_size: int = _help("anchor rows per training step", 4)
    seed: int = _help("seed for the split, shuffling, LoRA init and dropout", 1234)

    def steps_for(self, n_train: int) -> int:
        """Optimizer steps for `n_train` training rows (facts + general mix)."""
        if self.max_steps is not None:
            return self.max_steps
        derived = math.ceil(self.epochs_target * max(n_train, 1) / self.batch_size)
        return max(self.min_steps, min(self.max_steps_cap, derived))

    def lora_shape(self) -> dict:
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        """Rebuild from `to_dict()`; unknown keys (from a newer version) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
