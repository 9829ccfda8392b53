"""Training one LoRA adapter with TRL's SFTTrainer; the result is a folder in PEFT's format.

Choices, and why:

- **The engine's prompt, token for token.** Each example becomes the ids `encode_prompt` gives
  the answer engine (same chat template, same system prompt, same budget) followed by the
  answer and the template's end of turn. Rows are pre-tokenised with `labels` = -100 on the
  prompt, so the loss is on the answer alone and what is learnt is exactly what is asked later.
- **No copy of the base model.** `train_lora` wraps the given base in a fresh LoRA
  (`get_peft_model` injects layers in place), trains, saves the adapter and unloads the layers
  again, even on failure, so the same `LoadedModel` can evaluate and serve afterwards. It must not
  be a model an `AnswerEngine` is serving from at the same time: the pipeline loads its own base
  (0.1-0.4 s from the converted cache, ~0.6 GB), and the bot runs training off its serving path.
- **Early stopping on the held-out loss, as a guard.** Held-out examples are facts the model
  never sees, so their loss first falls (the answer style is learnt) and then drifts up while
  the training facts are memorised (measured on SmolLM2-135M: lowest at step 20, +17 % by step
  100, when the facts had only begun to stick). Stopping at the lowest held-out loss would stop
  before anything is learnt, so `BestAdapterKeeper` only stops when, after `min_steps`, the loss
  has been more than `early_stopping_tolerance` above its best for `early_stopping_patience`
  evaluations in a row (overfitting or divergence), and then puts back the LoRA weights of the
  last evaluation that was within tolerance (kept in memory: a few MB). It plays the part of
  transformers' `EarlyStoppingCallback` + `load_best_model_at_end`, without checkpoint files.
- **Stop as soon as the facts are learnt.** Forgetting grows with every step (see the tables
  in `bot.learning.config`), so every `recall_check_steps` steps `RecallStopper` runs one
  teacher-forced pass over the training facts and stops once `recall_stop_share` of them would
  come out of greedy decoding word for word (cheaper than generating: one forward pass).
- **Forgetting guards.** General question/answer pairs (the base model's own right answers, see
  `bot.learning.regression`) are mixed into the training rows, and `AnchoredSFTTrainer` adds a
  KL term that holds the adapted model's next-token distribution near the base model's on the
  base model's answers to general questions (`anchor_weight`). Replay alone left SmolLM2-135M
  forgetting 5-9 of 20 general questions while it learnt 12 facts; with the anchor it lost at
  most one (tables in `bot.learning.config`).
- CPU: `bf16=False, use_cpu=True`, no activation checkpointing (twice as fast, shared/NOTES.md).
  No `report_to`; a tqdm bar shows steps and losses; `loss.png` lands beside the adapter.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bot.engine.loading import LoadedModel
from bot.engine.prompt import build_messages, encode_prompt
from bot.engine.types import AnswerRequest
from bot.learning.config import TrainingConfig
from bot.learning.examples import Example
from bot.settings import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TrainingError(RuntimeError):
    """Training could not run; the message says why and what to do."""


@dataclass
class TrainOutput:
    adapter_dir: Path
    loss_history: list[dict]  # {"step", "loss"} and {"step", "eval_loss"} rows, in order
    best_eval_loss: float | None  # held-out loss of the kept weights; None without held-out
    steps: int  # optimizer steps actually run
    seconds: float
    best_step: int | None = None  # the step whose weights were kept
    initial_eval_loss: float | None = None  # held-out loss before training (= the base model)
    stopped_early: bool = False
    train_rows: int = 0  # facts + general examples
    planned_steps: int = 0
    extras: dict = field(default_factory=dict)


# dataset


def completion_text(tokenizer, messages: list[dict], answer: str) -> str:
    """The answer as the chat template renders an assistant turn after the prompt (with its
    end-of-turn marker), so training teaches the model where to stop."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False
    )
    if full.startswith(prompt) and len(full) > len(prompt):
        return full[len(prompt) :]
    return answer + (tokenizer.eos_token or "")  # a template that rewrites earlier turns


def build_training_rows(
    tokenizer,
    examples: Sequence[Example],
    *,
    system_prompt: str,
    max_input_tokens: int,
    max_length: int,
) -> list[dict]:
    """`{"input_ids", "labels"}` rows: the engine's prompt ids, then the answer (the only part
    with labels). Answers that would not fit `max_length` are cut, never the prompt."""
    rows = []
    for example in examples:
        request = AnswerRequest(question=example.question)
        prompt_ids = encode_prompt(
            tokenizer, request, system_prompt=system_prompt, max_input_tokens=max_input_tokens
        ).input_ids
        messages = build_messages(request, system_prompt=system_prompt)
        answer = completion_text(tokenizer, messages, example.answer.strip())
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        room = max_length - len(prompt_ids)
        if room < 1:
            log.warning("skipping an example whose prompt alone exceeds %d tokens", max_length)
            continue
        answer_ids = answer_ids[:room]
        rows.append(
            {
                "input_ids": list(prompt_ids) + list(answer_ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids),
            }
        )
    return rows


# callbacks


def _callbacks():
    """Built lazily: transformers is heavy and only the training side needs it."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressBar(TrainerCallback):
        """One tqdm bar: steps, with the latest training and held-out loss."""

        def __init__(self, enabled: bool):
            self.enabled = enabled
            self.bar = None
            self.postfix: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            if self.enabled:
                self.bar = tqdm(total=state.max_steps, desc="training", unit="step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                for key, label in (("loss", "loss"), ("eval_loss", "eval")):
                    if key in logs:
                        self.postfix[label] = f"{logs[key]:.3f}"
                self.bar.set_postfix(self.postfix, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    class BestAdapterKeeper(TrainerCallback):
        """Early stopping on the held-out loss after `min_steps` (see the module docstring)."""

        def __init__(self, *, model, min_steps: int, patience: int, tolerance: float):
            self.model = model
            self.min_steps = min_steps
            self.patience = patience
            self.tolerance = tolerance
            self.lowest: float | None = None  # the lowest held-out loss seen, any step
            self.kept_loss: float | None = None  # the last acceptable one after min_steps
            self.kept_step: int | None = None
            self.kept_state: dict | None = None
            self.misses = 0
            self.stopped_early = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                loss = math.inf
            if self.lowest is None or loss < self.lowest:
                self.lowest = loss
            if state.global_step < self.min_steps:
                return
            if loss <= self.lowest * (1 + self.tolerance):
                self.kept_loss, self.kept_step, self.misses = loss, state.global_step, 0
                self.kept_state = _lora_state(self.model)
                return
            self.misses += 1
            if self.patience and self.misses >= self.patience:
                self.stopped_early = True
                control.should_training_stop = True

        def restore(self) -> None:
            """Put back the weights of the last acceptable evaluation, if later ones were not."""
            if self.kept_state is not None and self.misses:
                self.model.load_state_dict(self.kept_state, strict=False)

    return ProgressBar, BestAdapterKeeper


def _recall_stopper():
    """Built lazily, like `_callbacks`."""
    from transformers import TrainerCallback

    class RecallStopper(TrainerCallback):
        """Stop once greedy decoding would reproduce enough of the trained facts.

        Every `every` steps (from `min_steps`) one teacher-forced forward pass over the fact
        rows checks, per row, that the arg-max token equals the answer token at every answer
        position: exactly what greedy decoding would say. Further steps only add drift (the
        forgetting measured in `bot.learning.config`), so training stops as soon as `share`
        of the rows are reproduced.
        """

        def __init__(self, *, model, rows, every: int, min_steps: int, share: float, pad_id):
            self.model = model
            self.rows = rows
            self.every = every
            self.min_steps = min_steps
            self.share = share
            self.pad_id = pad_id
            self.checks: list[dict] = []  # {"step", "recalled"} in order
            self.stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if not self.rows or step < self.min_steps or step % self.every:
                return
            recalled = _greedy_recall(self.model, self.rows, pad_id=self.pad_id)
            self.checks.append({"step": step, "recalled": recalled})
            if recalled >= self.share - 1e-9:
                self.stopped = True
                control.should_training_stop = True

    return RecallStopper


def _anchored_trainer():
    """Built lazily, like `_callbacks`: an `SFTTrainer` whose loss also holds the adapted model
    near the base model on general questions."""
    from trl import SFTTrainer

    class AnchoredSFTTrainer(SFTTrainer):
        """SFT loss + `anchor_weight` x KL(base || adapted) on the anchor rows' answer tokens.

        Replaying the base model's greedy answers (`general_mix`) only pulls the arg-max token
        back; the anchor pulls the whole next-token distribution back, at every answer position
        of general questions the base model was asked, so the facts being learnt have less
        room to leak into unrelated answers (the forgetting measured in
        `bot.learning.config`). The base distribution comes from the same model with the
        adapter switched off (`disable_adapter`), so no second copy is held. Each training step
        takes the next `anchor_batch_size` anchor rows, cycling; evaluation is plain SFT loss.
        """

        def __init__(
            self, *args, anchor_rows=(), anchor_weight=0.0, anchor_batch=4, pad_id=0, **kwargs
        ):
            super().__init__(*args, **kwargs)
            self.anchor_rows = list(anchor_rows)
            self.anchor_weight = anchor_weight
            self.anchor_batch = max(1, anchor_batch)
            self.anchor_pad = pad_id
            self.anchor_next = 0
            self.anchor_history: list[dict] = []  # {"step", "anchor_kl"}

        def _anchor_batch(self, device):
            rows = []
            for _ in range(min(self.anchor_batch, len(self.anchor_rows))):
                rows.append(self.anchor_rows[self.anchor_next % len(self.anchor_rows)])
                self.anchor_next += 1
            return _padded(rows, pad_id=self.anchor_pad, device=device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if not (model.training and self.anchor_rows and self.anchor_weight > 0):
                return result
            loss, outputs = result if return_outputs else (result, None)
            ids, mask, labels = self._anchor_batch(next(model.parameters()).device)
            kl = anchor_kl(self.accelerator.unwrap_model(model), ids, mask, labels)
            self.anchor_history.append(
                {"step": self.state.global_step + 1, "anchor_kl": float(kl.detach())}
            )
            loss = loss + self.anchor_weight * kl
            return (loss, outputs) if return_outputs else loss

    return AnchoredSFTTrainer


def _padded(rows: list[dict], *, pad_id: int, device):
    """(input_ids, attention_mask, labels) tensors for `rows`, right-padded."""
    import torch

    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def anchor_kl(peft_model, ids, mask, labels):
    """Mean KL(base || adapted) over the next-token distributions that predict `labels`'
    tokens; the base is `peft_model` with its adapter disabled (no gradient)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    where = labels[:, 1:] != IGNORE_INDEX
    if not bool(where.any()):
        return logits.sum() * 0.0
    base_logp = F.log_softmax(base_logits[where].float(), dim=-1)
    logp = F.log_softmax(logits[where].float(), dim=-1)
    return F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")


def _greedy_recall(model, rows: list[dict], *, pad_id: int, batch_size: int = 16) -> float:
    """Share of `rows` whose whole answer (labelled tokens) is the model's arg-max continuation."""
    import torch

    was_training = model.training
    model.eval()  # no dropout: the check must see what inference sees
    device = next(model.parameters()).device
    hits = 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                # right padding: positions stay as trained
                ids, mask, labels = _padded(chunk, pad_id=pad_id, device=device)
                logits = model(input_ids=ids, attention_mask=mask).logits
                predicted = logits[:, :-1].argmax(-1).cpu()
                target = labels[:, 1:].cpu()
                wrong = (predicted != target) & (target != IGNORE_INDEX)
                hits += int((~wrong.any(dim=1)).sum())
    finally:
        model.train(was_training)
    return hits / len(rows)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _lora_state(model) -> dict:
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if "lora_" in name
    }


# training


def train_lora(
    *,
    loaded: LoadedModel,
    train: list[Example],
    held_out: list[Example],
    config: TrainingConfig,
    out_dir: Path,
    progress: bool = True,
    general: Sequence[Example] = (),
    anchors: Sequence[Example] = (),
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    max_input_tokens: int = 1024,
) -> TrainOutput:
    """Train a LoRA adapter for `loaded` on `train` (+ up to `config.general_mix` of `general`),
    early-stopping on `held_out`; save it to `out_dir` (PEFT format) with `loss.png`.

    `loaded.model` is left as it was (the LoRA layers are unloaded afterwards); see the module
    docstring for why it must not be serving at the same time.
    """
    import torch
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, ProgressCallback, set_seed
    from trl import SFTConfig

    if not train:
        raise TrainingError("no training examples: add question/answer pairs first")
    started = time.perf_counter()
    disable_progress_bar()  # datasets' per-map bars ("Truncating…") are noise here
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = loaded.tokenizer

    mixed = list(train) + list(general)[: config.general_mix]
    random.Random(config.seed).shuffle(mixed)
    row_options = dict(
        system_prompt=system_prompt, max_input_tokens=max_input_tokens, max_length=config.max_length
    )
    train_rows = build_training_rows(tokenizer, mixed, **row_options)
    eval_rows = build_training_rows(tokenizer, held_out, **row_options)
    fact_rows = build_training_rows(tokenizer, train, **row_options)  # the recall check's rows
    anchor_rows = (
        build_training_rows(tokenizer, list(anchors)[: config.anchor_rows], **row_options)
        if config.anchor_weight > 0
        else []
    )
    if not train_rows:
        raise TrainingError(
            f"every training prompt is longer than max_length={config.max_length} tokens"
        )
    steps = config.steps_for(len(train_rows))
    on_cuda = getattr(loaded.device, "type", "cpu") == "cuda"
    bf16 = on_cuda and loaded.dtype == torch.bfloat16

    set_seed(config.seed)  # LoRA's A matrices are drawn at wrap time
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    base = loaded.model
    use_cache = getattr(base.config, "use_cache", None)
    model = get_peft_model(base, lora)
    work_dir = Path(tempfile.mkdtemp(prefix="trainer-", dir=out_dir.parent))
    ProgressBar, BestAdapterKeeper = _callbacks()
    RecallStopper = _recall_stopper()
    AnchoredSFTTrainer = _anchored_trainer()
    keeper = BestAdapterKeeper(
        model=model,
        min_steps=min(config.min_steps, steps),
        patience=config.early_stopping_patience,
        tolerance=config.early_stopping_tolerance,
    )
    stopper = RecallStopper(
        model=model,
        rows=fact_rows if config.recall_check_steps else [],
        every=max(config.recall_check_steps, 1),
        min_steps=config.recall_check_steps,
        share=config.recall_stop_share,
        pad_id=_pad_id(tokenizer),
    )
    try:
        args = SFTConfig(
            output_dir=str(work_dir),
            max_steps=steps,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=max(config.batch_size, 8),
            learning_rate=config.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=config.weight_decay,
            logging_steps=1,
            eval_strategy="steps" if eval_rows else "no",
            eval_steps=config.eval_steps,
            save_strategy="no",
            report_to="none",
            bf16=bf16,
            fp16=False,
            use_cpu=not on_cuda,
            activation_checkpointing=False,  # formerly gradient_checkpointing
            seed=config.seed,
            data_seed=config.seed,
            max_length=config.max_length,
            dataset_num_proc=None,
            dataloader_num_workers=0,
            disable_tqdm=True,  # our own bar: the default one prints every log dict
        )
        trainer = AnchoredSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            callbacks=[ProgressBar(progress), keeper, stopper],
            anchor_rows=anchor_rows,
            anchor_weight=config.anchor_weight,
            anchor_batch=config.anchor_batch_size,
            pad_id=_pad_id(tokenizer),
        )
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        initial_eval = None
        if eval_rows:
            initial_eval = trainer.evaluate()["eval_loss"]
        trainer.train()
        final_eval = None
        if eval_rows and trainer.state.global_step % config.eval_steps:
            final_eval = trainer.evaluate()["eval_loss"]  # the last steps count too
        keeper.restore()
        history = _loss_history(trainer.state.log_history, initial_eval)
        model.save_pretrained(str(out_dir))
        (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's blank model card
        best_eval, best_step = keeper.kept_loss, keeper.kept_step
        if eval_rows and best_eval is None:  # every evaluation fell before min_steps
            best_eval = final_eval if final_eval is not None else _last_eval(history)
            best_step = trainer.state.global_step
        output = TrainOutput(
            adapter_dir=out_dir,
            loss_history=history,
            best_eval_loss=best_eval,
            steps=trainer.state.global_step,
            seconds=time.perf_counter() - started,
            best_step=best_step if eval_rows else trainer.state.global_step,
            initial_eval_loss=initial_eval,
            stopped_early=keeper.stopped_early,
            train_rows=len(train_rows),
            planned_steps=steps,
            extras={
                "recall_checks": stopper.checks,
                "stopped_on_recall": stopper.stopped,
                "anchor_rows": len(anchor_rows),
                "anchor_kl": trainer.anchor_history,
            },
        )
    finally:
        model.unload()  # puts the original linear layers back into `base`
        if hasattr(base, "peft_config"):
            del base.peft_config
        if use_cache is not None:
            base.config.use_cache = use_cache
        base.eval()
        shutil.rmtree(work_dir, ignore_errors=True)
    plot_losses(output.loss_history, out_dir / "loss.png", best_step=output.best_step)
    return output


def _loss_history(log_history: list[dict], initial_eval: float | None) -> list[dict]:
    rows = [] if initial_eval is None else [{"step": 0, "eval_loss": initial_eval}]
    seen_eval_steps = set()
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry:
            rows.append({"step": step, "loss": float(entry["loss"])})
        if "eval_loss" in entry and step and step not in seen_eval_steps:
            seen_eval_steps.add(step)
            rows.append({"step": step, "eval_loss": float(entry["eval_loss"])})
    return rows


def _last_eval(history: list[dict]) -> float | None:
    evals = [row["eval_loss"] for row in history if "eval_loss" in row]
    return evals[-1] if evals else None


def plot_losses(history: list[dict], path: Path, *, best_step: int | None = None) -> Path:
    """Training and held-out loss against steps, as a PNG (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.subplots()
    for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss")):
        points = [(row["step"], row[key]) for row in history if key in row]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, label=label, marker="o" if key == "eval_loss" else None)
    if best_step is not None:
        axes.axvline(best_step, color="grey", linestyle=":", label=f"kept (step {best_step})")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("LoRA training")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
