"""Continuous batching: a hand-written greedy decode loop whose rows join and leave between steps.

`model.generate` runs a batch from its first token to its last: a question that arrives while it
runs waits for the whole batch. Here the engine owns the loop instead. A `DecodeBatch` holds
the rows decoding together and their shared KV cache (transformers' `DynamicCache`), left-padded
so every row's next token lands in the same column:

- **join**: newcomers are prefilled together as their own left-padded group (one forward over
  their prompts, fresh cache; through the kernel, `LeanStep.prefill`, where it applies), then
  their cache is concatenated onto the running one along the batch axis, the shorter side
  padded on the left with zeros that the attention mask hides;
- **step**: one forward for every row, one new token each (`logits_to_keep=1`: only the last
  position's logits are computed, the vocabulary projection is the largest matmul); the step's
  keys and values are written in place into buffers with spare columns (`GrowingLayer`), not
  concatenated onto a copy of the whole cache as `DynamicLayer` does;
- **leave**: finished rows are dropped from the cache (`batch_select_indices`), and columns that
  became padding for every remaining row are cut off, so a long prompt that left stops costing.

Positions are tracked per row (RoPE needs the row's own position, not the cache column); the
causal mask comes from the cache length and the 2D padding mask, as in `generate`. Greedy
decoding with padding masked out gives the same tokens as decoding each row alone (up to float
rounding; tested).

Prefix caching: every prompt starts with the same system prompt (about two thirds of a short
question's prompt). `set_prefix` names those shared tokens; their keys and values are computed
once and copied into each newcomer's cache, so a prefill only runs over the rest of the prompt.
Within a row the layout is then [prefix][padding][own tokens]: the padding mask is general, and
positions continue from the prefix. Prompts that do not start with the prefix (team notes change
the system message) are prefilled whole. The prefix's keys and values depend on the weights:
after an adapter swap `use_weights(version)` selects that version's (computed when first used;
the last few versions are kept, ~1.5 MB each for SmolLM2, so swapping back recomputes nothing).

Rows of several weight versions (`keys`): each row carries the key of the weights it decodes
with (an adapter version). When `weights_for` is set, every forward runs inside
`weights_for(keys of that forward's rows)`, which makes the model compute each row with its own
weights (the engine's per-row LoRA correction); prefix states are then per key as well.

Only plain `DynamicLayer` caches (made `GrowingLayer`s) can be merged this way. A model with
sliding-window or other special cache layers still works: `can_join` is then False and the
worker admits newcomers only when the batch is empty (static batching).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from bot.engine import skinny
from bot.engine.kernels import RowLinear


class DecodeBatch:
    """The rows decoding together, their KV cache, padding mask, positions and last tokens."""

    kept_prefixes = 3  # prefix states kept for weights other than the current ones

    def __init__(self, model, *, pad_id: int, device, lean: bool = True):
        """`lean`: decoding steps of a Llama-family model run `LeanStep` (where it applies)
        instead of the transformers forward; prefills always run the latter."""
        self.model = model
        self.pad_id = pad_id
        self.device = device
        self.lean = LeanStep.build(model) if lean else None
        self.rows: list[Any] = []  # the caller's per-row objects, in batch order
        self.keys: list[object] = []  # the weights each row decodes with (see `use_weights`)
        # keys of a forward's rows -> a context in which each row gets its own key's weights
        self.weights_for: Callable[[list], AbstractContextManager] | None = None
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns) 1 = a real token
        self.positions: torch.Tensor | None = None  # (rows,) the position of the next token
        self.tokens: torch.Tensor | None = None  # (rows,) the last token, fed at the next step
        self.prefix: tuple[int, ...] = ()  # token ids every prompt is expected to start with
        self._prefix_states: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._weights_key: object = None  # which weights the model has now (an adapter version)
        self._kept_states: dict[object, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def can_join(self) -> bool:
        """Whether newcomers can join rows already decoding (plain dynamic cache layers only;
        the same layers are those `LeanStep` can write)."""
        if self.cache is None:
            return True
        return all(type(layer) in (DynamicLayer, GrowingLayer) for layer in self.cache.layers)

    def set_prefix(self, ids: Sequence[int]) -> None:
        if tuple(ids) != self.prefix:
            self.prefix = tuple(ids)
            self._prefix_states = None
            self._kept_states = {}

    def use_weights(self, key: object) -> None:
        """The model's weights are now those named `key` (an adapter version; None: the base).

        The prefix states of other weights stay kept (the last `kept_prefixes` keys), so that
        swapping back to them computes nothing. A key must always name the same weights.
        """
        if key == self._weights_key:
            return
        if self._prefix_states is not None:
            self._kept_states[self._weights_key] = self._prefix_states
        self._weights_key = key
        self._prefix_states = self._kept_states.pop(key, None)
        self._trim_kept()

    def join(
        self,
        prompts: Sequence[Sequence[int]],
        rows: Sequence[Any],
        keys: Sequence[object] | None = None,
    ) -> torch.Tensor:
        """Prefill `prompts` and merge them into the batch; return their last logits.

        `keys`: the weights each newcomer decodes with (default: the current ones). The rows
        are appended in a new order: those starting with the prefix first. The logits follow
        the order of `self.rows[-len(rows):]`.
        """
        keys = list(keys) if keys is not None else [self._weights_key] * len(prompts)
        size = len(self.prefix)
        shared = [i for i, ids in enumerate(prompts) if size and len(ids) > size
                  and tuple(ids[:size]) == self.prefix]  # fmt: skip
        whole = [i for i in range(len(prompts)) if i not in set(shared)]
        logits = []
        for group, skip in ((shared, size), (whole, 0)):
            if group:
                group_keys = [keys[i] for i in group]
                logits.append(
                    self._join_group([prompts[i] for i in group], keys=group_keys, skip=skip)
                )
                self.rows.extend(rows[i] for i in group)
                self.keys.extend(group_keys)
        return torch.cat(logits)

    def _weights(self, keys: list):
        """The context a forward over rows of `keys` runs in."""
        if self.weights_for is None:
            return contextlib.nullcontext()
        return self.weights_for(keys)

    def _join_group(
        self, prompts: Sequence[Sequence[int]], *, keys: list, skip: int
    ) -> torch.Tensor:
        """Prefill one group (their first `skip` tokens from the prefix cache) and merge it."""
        tails = [list(ids[skip:]) for ids in prompts]
        width = max(len(ids) for ids in tails)
        ids = torch.full((len(tails), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(tails), width), dtype=torch.long)
        for row, tail in enumerate(tails):  # left padding: every row ends in the last column
            ids[row, width - len(tail) :] = torch.tensor(tail, dtype=torch.long)
            mask[row, width - len(tail) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = skip + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _growing(DynamicCache(config=self.model.config))
        if skip:
            states = {key: self._prefix_cache(key) for key in dict.fromkeys(keys)}
            for index, layer in enumerate(cache.layers):
                if len(states) == 1:  # one version: one prefix, expanded
                    prefix_keys, prefix_values = next(iter(states.values()))[index]
                    layer.update(
                        prefix_keys.expand(len(tails), -1, -1, -1).contiguous(),
                        prefix_values.expand(len(tails), -1, -1, -1).contiguous(),
                    )
                else:  # each row the prefix of its own version
                    layer.update(
                        torch.cat([states[key][index][0] for key in keys]),
                        torch.cat([states[key][index][1] for key in keys]),
                    )
            prefix_mask = torch.ones((len(tails), skip), dtype=torch.long, device=self.device)
            mask = torch.cat([prefix_mask, mask], dim=1)
        with self._weights(keys):
            logits = None
            if self.lean is not None:
                logits = self.lean.prefill(ids, mask, skip, cache)
            if logits is None:
                logits = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1, :]
        next_positions = mask.sum(-1)
        if self.cache is None:
            self.cache, self.mask, self.positions = cache, mask, next_positions
        else:
            self._merge(cache, mask, next_positions)
        return logits

    def _prefix_cache(self, key: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The prefix's keys and values for the weights `key` (computed once, then kept)."""
        current = key == self._weights_key
        states = self._prefix_states if current else self._kept_states.get(key)
        if states is None:
            cache = DynamicCache(config=self.model.config)
            with self._weights([key]):
                self.model(
                    input_ids=torch.tensor([self.prefix], dtype=torch.long, device=self.device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
            states = [(layer.keys, layer.values) for layer in cache.layers]
            if current:
                self._prefix_states = states
            else:
                self._kept_states[key] = states
                self._trim_kept()
        return states

    def _trim_kept(self) -> None:
        """Keep the prefix states of the last `kept_prefixes` other weights (oldest out first)."""
        while len(self._kept_states) > self.kept_prefixes:
            self._kept_states.pop(next(iter(self._kept_states)))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row its last token (`tokens`, shape (rows,)); return the next logits."""
        self.tokens = tokens
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        with self._weights(self.keys):
            if self.lean is not None and self.can_join:
                logits = self.lean(tokens, self.positions, self.mask, self.cache)
            else:
                logits = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=self.mask,
                    position_ids=self.positions[:, None],
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1, :]
        self.positions = self.positions + 1
        return logits

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at `indices` (in that order); the others leave the batch."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.clear()
            return
        index = torch.tensor(list(indices), dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in indices]
        self.keys = [self.keys[i] for i in indices]
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        if self.tokens is not None:
            self.tokens = self.tokens[index]
        used = self.mask.any(dim=0)
        first = int(used.to(torch.long).argmax())  # columns before it are padding for every row
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.positions, self.tokens = [], None, None, None, None
        self.keys = []

    def _merge(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        width = max(self.width, int(mask.shape[1]))
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)])
        self.positions = torch.cat([self.positions, positions])


class LeanStep:
    """One decoding step of a Llama-family model (one token a row) in as few ops as it takes.

    The transformers forward spends about a third of a batch-1 step on this project's CPU in
    Python and dispatch (module calls, decorators, argument handling, mask building: ~700
    small ops; `bench/profile_decode.py`), as much as the products of most layers. This is the
    same computation written straight: per layer RMSNorm, the q/k/v projections, RoPE, the
    cache update, SDPA, the output projection, RMSNorm and the gated MLP; then the final norm
    and the vocabulary projection of the last position only. The projections are the
    model's own modules, called as modules: an adapter merged into their weights, the
    engine's row kernels and its per-row LoRA correction (a replaced forward) all apply. The
    mask is the padding mask alone (a step's one query may see every column before it).

    Where the engine installed the skinny kernel (on a CPU, `bot/engine/kernels.py`)
    and it takes the step's rows, each layer is one call of it instead (`skinny.layer_step`):
    norms, the seven products, RoPE, the cache write, attention, SiLU and the residual adds in
    one parallel region, the per-row LoRA correction's factors streamed beside the weights as
    `corrector` streams them. Through torch's ops the ~40 small ops a layer cost ~10 ms of a
    33 ms batch-1 step on an AVX-512 EPYC (6 Dec 2026); in one call the step took 24.6 ms, of
    which 22 are the products (8 rows: 31.4 ms, 26.7 in the products). `prefill` runs a
    group's prompts the same way (only their real tokens: no padding rows). bf16 weights
    too: the kernel keeps the stream and its sums in float32 and rounds only what the cache
    keeps, so its logits lie within 0.3-1 % of the largest of the same weights computed in
    float32, where transformers' bf16 forward (rounding after every op) strays 1.4-4.7 %
    (tested); a bf16 step decoded at 73 tokens/s against 43 through torch's ops (AVX-512
    Xeon with AMX, 6 Dec 2026), and its answers came closer to float32's.

    `build` returns None for anything it does not know exactly (another architecture, a
    sliding window, an activation other than SiLU, an attention implementation other than
    sdpa/eager): those keep the transformers forward. Logits equal the transformers forward's
    within float rounding (tested; equal bits at batch 1 in float32 through torch's ops, within
    1e-4 through the kernel, whose sums run in another order).
    """

    def __init__(self, model):
        inner = model.model
        config = model.config
        self.model, self.inner = model, inner
        self.layers = list(inner.layers)
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.eps = config.rms_norm_eps
        self.gqa = config.num_key_value_heads != config.num_attention_heads
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        # each layer's projections and norms, in the kernel's order (`skinny.layer_step`)
        self.parts = [
            (
                (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                 layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                 layer.mlp.down_proj),
                (layer.input_layernorm, layer.post_attention_layernorm),
            )
            for layer in self.layers
        ]  # fmt: skip
        self._modules = [m for projections, norms in self.parts for m in (*projections, *norms)]
        self._bound: tuple | None = None  # (library, weights, each layer's bound step)

    @classmethod
    def build(cls, model) -> LeanStep | None:
        from transformers.models.llama.modeling_llama import LlamaForCausalLM

        config = getattr(model, "config", None)
        if (
            type(model) is not LlamaForCausalLM
            or getattr(config, "hidden_act", None) != "silu"
            or getattr(config, "sliding_window", None)
            or getattr(config, "_attn_implementation", None) not in ("sdpa", "eager")
            or getattr(config, "pretraining_tp", 1) != 1
        ):
            return None
        return cls(model)

    def _norm(self, x: torch.Tensor, module) -> torch.Tensor:
        if x.dtype == torch.float32:  # one op; in other dtypes the module's float32 round trip
            return F.rms_norm(x, (x.shape[-1],), module.weight, self.eps)
        return module(x)

    def __call__(self, tokens, positions, mask, cache) -> torch.Tensor:
        """Logits (rows, vocabulary) for `tokens` (rows,) at `positions` (rows,), with the 2-D
        padding `mask` (rows, columns) that already includes this step's column."""
        planned = None
        if (
            cache is not None
            and _growing_only(cache, len(self.layers))
            and mask.shape[1] == cache.layers[0].keys.shape[-2] + 1
        ):
            planned = self._kernel_plan(tokens.shape[0])
        if planned is not None:
            return self._kernel_step(tokens, positions, mask, cache, *planned)
        rows, head_dim, half = tokens.shape[0], self.head_dim, self.head_dim // 2
        x = self.inner.embed_tokens(tokens[:, None])  # (rows, 1, hidden)
        cos, sin = self.inner.rotary_emb(x, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # (rows, 1, 1, head_dim): over the heads
        attend = None if bool(mask.all()) else mask[:, None, None, :].bool()
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            h = self._norm(x, layer.input_layernorm)
            q = attention.q_proj(h).view(rows, 1, -1, head_dim).transpose(1, 2)
            k = attention.k_proj(h).view(rows, 1, -1, head_dim).transpose(1, 2)
            v = attention.v_proj(h).view(rows, 1, -1, head_dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            k, v = cache.layers[index].update(k, v)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attend, scale=attention.scaling, enable_gqa=self.gqa
            )
            x = x + attention.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            h = self._norm(x, layer.post_attention_layernorm)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.model.lm_head(self._norm(x[:, -1], self.inner.norm))

    def _kernel_plan(self, rows: int) -> tuple | None:
        """(each layer's bound kernel step, each layer's corrections) where `rows` rows can run
        each layer as one call of the skinny kernel (`skinny.layer_step`): on the CPU, float32
        or bf16 weights, the engine's kernel installed on every projection and taking `rows`
        rows, no biases, and no replaced forward other than the engine's per-row LoRA
        correction (whose factors, float32 whatever the weights' dtype, the kernel then
        streams). None: torch's ops."""
        first = self.parts[0][0][0]
        library = getattr(first, "library", None)
        if (
            library is None
            or type(first) is not RowLinear
            or first.weight.dtype not in skinny.DTYPES
            or first.weight.device.type != "cpu"
            or not first._takes(rows)
        ):
            return None
        plan, bound = first.row_plan, self._bound
        if bound is None or bound[0] is not library or not self._still_bound(bound[1]):
            bound = self._bound = (library, self._weights(), self._bind(library))
        if bound[2] is None:
            return None
        corrections = []
        for projections, _ in self.parts:
            layer = None
            for index, module in enumerate(projections):
                own = vars(module)  # (nn.Module's __getattr__ costs ~1 us a lookup, 210 a step)
                if (
                    type(module) is not RowLinear
                    or own.get("library") is not library
                    or own.get("row_plan") is not plan
                    or own["_parameters"].get("bias") is not None
                ):
                    return None
                forward = own.get("forward")
                if forward is not None:  # a replaced forward: only the engine's correction
                    extension = getattr(forward, "extension", None)
                    if extension is None:
                        return None
                    correction = extension()
                    if correction is not None:
                        if correction[0].dtype != torch.float32:
                            return None
                        layer = layer or [None] * len(projections)
                        layer[index] = correction
            corrections.append(layer)
        return bound[2], corrections

    def _weights(self) -> list[torch.Tensor]:
        return [m._parameters["weight"] for m in self._modules]

    def _still_bound(self, weights: list[torch.Tensor]) -> bool:
        """Whether every layer still has the weight tensors its step was bound to (merges
        change them in place; a module given another tensor needs its step bound again)."""
        return all(a is b for a, b in zip(self._weights(), weights, strict=True))

    def _bind(self, library) -> list | None:
        """Each layer's `skinny.layer_step` (None where a layer is not one it steps)."""
        try:
            return [
                skinny.layer_step(
                    library,
                    tuple(module.weight for module in projections),
                    tuple(norm.weight.float() for norm in norms),  # bf16's: a float32 copy
                    eps=self.eps,
                    heads=self.heads,
                    kv_heads=self.kv_heads,
                    scale=layer.self_attn.scaling,
                )
                for layer, (projections, norms) in zip(self.layers, self.parts, strict=True)
            ]
        except ValueError:
            return None

    def _kernel_step(self, tokens, positions, mask, cache, steps, corrections) -> torch.Tensor:
        """The step with each layer one call of the kernel (see `_kernel_plan`)."""
        rows = tokens.shape[0]
        # (rows, hidden), float32 whatever the weights' dtype: updated in place
        x = self.inner.embed_tokens(tokens).float().contiguous()
        cos, sin = self.inner.rotary_emb(x, positions[:, None])
        cos = cos.reshape(rows, -1).contiguous()
        sin = sin.reshape(rows, -1).contiguous()
        mask = mask.to(torch.int64).contiguous()
        for step, layer, correction in zip(steps, cache.layers, corrections, strict=True):
            keys, values, length = layer.slot()
            step(x, cos, sin, keys, values, length, mask, correction)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and the vocabulary projection of the kernel's float32 residual
        stream, rounded first to the model's dtype (bf16: as its own stream would be)."""
        return self.model.lm_head(self._norm(x.to(self.inner.norm.weight.dtype), self.inner.norm))

    def prefill(self, ids, mask, skip: int, cache) -> torch.Tensor | None:
        """A group's prefill with each layer one call of the kernel, where it applies: the
        logits of each row's last token, its keys and values written into `cache` (after its
        `skip` prefix columns, left-padded as `mask` says). None where it does not apply (then
        nothing was changed): the caller runs the transformers forward.

        `ids` and `mask`: (rows, width) left-padded tails and their (rows, skip + width) mask.
        Only the real tokens are computed (no padding rows): sequence i's tokens are rows of
        one product, each placed at its own cache column (`skinny.layer_step`'s `where`); rows
        of other versions get their correction, each token its sequence's row of the mask."""
        lengths = mask[:, skip:].sum(-1)
        tokens = int(lengths.sum())
        planned = self._kernel_plan(tokens) if tokens else None
        if (
            planned is None
            or len(cache.layers) != len(self.layers)
            or any(type(layer) is not GrowingLayer for layer in cache.layers)
            or any(layer.is_initialized and layer.keys.shape[-2] != skip for layer in cache.layers)
        ):
            return None
        rows, width = ids.shape
        real = mask[:, skip:].bool()
        seqs, cols = real.nonzero(as_tuple=True)  # row-major: each sequence's tokens in order
        cols = (cols + skip).contiguous()
        seqs = seqs.contiguous()
        positions = (skip + real.cumsum(-1) - 1)[real]  # each token's position in its row
        x = self.inner.embed_tokens(ids[real]).float().contiguous()  # (tokens, hidden)
        cos, sin = self.inner.rotary_emb(x[None], positions[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        mask = mask.to(torch.int64).contiguous()
        shape = (rows, self.kv_heads, 0, self.head_dim)
        corrections = _per_token(planned[1], seqs)
        for step, layer, correction in zip(planned[0], cache.layers, corrections, strict=True):
            if not layer.is_initialized:  # no prefix: empty buffers of the group's shape
                stored = self.parts[0][0][0].weight.dtype  # the cache's: the weights'
                empty = torch.empty(shape, dtype=stored, device=x.device)
                layer.update(empty, empty)
            keys, values, _ = layer.slot(width)
            keys[:, :, skip : skip + width].zero_()  # padding columns hold zeros, as torch's
            values[:, :, skip : skip + width].zero_()
            step(x, cos, sin, keys, values, skip, mask, correction, where=(seqs, cols))
        last = lengths.cumsum(0) - 1  # each sequence's last token among the rows
        return self._logits(x[last])


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views into buffers with spare columns.

    `DynamicLayer.update` concatenates: every decoding step allocates and copies the whole
    cache of every layer (60 tensors for SmolLM2), which at 8 rows cost more than the step's
    attention. Here a step writes its column in place; the buffers grow `spare` columns at a
    time. Whoever replaces `keys`/`values` (rows leaving, newcomers merged) gets them copied
    into fresh buffers at the next update.
    """

    spare = 32

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        buffers = self._room(length, length + key_states.shape[-2], key_states)
        buffers[0][:, :, length:].copy_(key_states)
        buffers[1][:, :, length:].copy_(value_states)
        return self.keys, self.values

    def slot(self, columns: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for `columns` more columns, which the caller writes (the kernel's layer step):
        the keys and values buffers (rows, heads, capacity, dim; contiguous) and the first
        new column's index. `keys`/`values` already include them."""
        length = self.keys.shape[-2]
        self._room(length, length + columns, self.keys)
        return self._buffers[0], self._buffers[1], length

    def _room(self, length: int, width: int, like: torch.Tensor) -> tuple:
        """Make `keys`/`values` views of `width` columns into buffers whose first `length`
        hold the cache so far; return those views."""
        views = getattr(self, "_views", None)
        if views is None or views[0] is not self.keys or views[1] is not self.values:
            self._buffers = None  # new contents from outside: copied into new buffers
        buffers = self._buffers
        if buffers is None or buffers[0].shape[-2] < width:
            buffers = self._buffers = tuple(
                self._grown(old, like, length=length, width=width)
                for old in (self.keys, self.values)
            )
        self.keys, self.values = buffers[0][:, :, :width], buffers[1][:, :, :width]
        self._views = (self.keys, self.values)
        return self._views

    def _grown(self, old: torch.Tensor, like: torch.Tensor, *, length: int, width: int):
        """A buffer of `width + spare` columns (rows and heads as `like`) holding `old` first."""
        shape = (*like.shape[:2], width + self.spare, like.shape[-1])
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        if length:
            buffer[:, :, :length].copy_(old)
        return buffer


def _per_token(corrections: list, seqs: torch.Tensor) -> list:
    """Each layer's corrections with each mask's rows taken per token (`seqs`: each token's
    sequence), for a prefill; a mask shared by several projections is gathered once."""
    gathered: dict[int, torch.Tensor] = {}

    def rows_of(mask: torch.Tensor) -> torch.Tensor:
        if id(mask) not in gathered:
            gathered[id(mask)] = mask.index_select(0, seqs).contiguous()
        return gathered[id(mask)]

    return [
        None
        if layer is None
        else [None if part is None else (part[0], part[1], rows_of(part[2])) for part in layer]
        for layer in corrections
    ]


def _growing_only(cache: DynamicCache, layers: int) -> bool:
    """Whether `cache` has `layers` initialized `GrowingLayer`s and nothing else."""
    return len(cache.layers) == layers and all(
        type(layer) is GrowingLayer and layer.is_initialized for layer in cache.layers
    )


def _growing(cache: DynamicCache) -> DynamicCache:
    """`cache` with its plain dynamic layers made `GrowingLayer`s (others are left alone)."""
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
    return cache


def greedy(logits: torch.Tensor, *, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """The argmax token of each row; `blocked` (rows, vocab) bool masks tokens out first."""
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    return logits.argmax(dim=-1)


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """Pad (rows, heads, columns, dim) key/value states with zeros on the left to `width`."""
    missing = width - states.shape[2]
    return states if missing == 0 else F.pad(states, (0, 0, missing, 0))


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing == 0 else F.pad(mask, (missing, 0))
