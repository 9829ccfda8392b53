"""A tiny randomly initialised Llama with a ChatML tokenizer: a real model, built in 0.1 s.

Same architecture family as SmolLM2 (LlamaForCausalLM, ChatML chat template), so loading,
batching, LoRA training, publishing and swapping all run the real code paths. It emits nonsense:
use it for plumbing, and the real default model for behaviour.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Deploys go through the release train every Tuesday at noon.",
    "The on-call rotation is managed in PagerDuty by the platform team.",
    "Ask an expert in the thread if the answer looks wrong.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"-()[]{}<>/@#%&*+=_",
] * 20


def build_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Write a tokenizer and a randomly initialised 2-layer Llama to `folder`; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=fast.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    return folder


def tiny_engine(settings):
    """A started engine on the tiny model (`settings.base_model`), kept from whitespace-only
    tokens: at its random initialisation it repeats the prompt's last token, a newline, so
    without this every answer would strip to nothing."""
    from bot.engine.loading import load_from_settings
    from bot.engine.worker import AnswerEngine

    loaded = load_from_settings(settings)
    tokenizer = loaded.tokenizer
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    return AnswerEngine(
        loaded,
        system_prompt=settings.system_prompt,
        max_input_tokens=settings.max_input_tokens,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        generate_options={"suppress_tokens": blank},
    ).start()
