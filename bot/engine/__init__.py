"""The answer engine: a base model wearing the active LoRA adapter, owned by one worker.

Only `bot.engine.types` is torch-free; import the rest lazily from the model side.
"""
