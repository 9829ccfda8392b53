"""Serving a LoRA adapter merged into the base weights: no per-token cost, swaps between steps.

An unmerged PEFT adapter adds two small matmuls and a Python wrapper to every linear layer on
every token: 1.5-2x the base model's time per token on a CPU. A merged one costs nothing: each
targeted weight becomes `W + scale * B @ A`, and the model runs exactly as the base does. We
merge ourselves rather than through `PeftModel.merge_adapter()` because the LoRA wrapper layers
would stay in the forward path even when merged (still a Python call per layer), and because
reading the adapter file is then all a swap needs: no module rebuild, no wrapper to remove.

A swap is: read and check the new adapter completely (shapes against the base model) while the
old one keeps serving, then replace the old one's delta by the new one's in place.

Rows of other versions (`MergedWeights.mixed`): a swap does not wait for the answers in flight.
Those rows keep their version through a per-row low-rank correction: a row on version `g` while
`c` is merged needs `x (W + D_g)^T = x (W + D_c)^T + x (D_g - D_c)^T`, and with `D = s B A` the
last term is two thin matmuls. So while such rows decode, each targeted layer's forward is
replaced by one that adds `((x A^T) * M) B^T` over the stacked factors `A = [A_c; A_g; ...]`,
`B = [-s_c B_c, s_g B_g, ...]` and a (rows, rank) mask `M` that picks each row's factors. The
replaced forwards exist only until no row of another version is left (`unmix`); the rest of the
time a merged adapter costs nothing. Greedy answers equal those of the version alone (tested):
the correction is exact up to float rounding. Where the engine installed the skinny kernel
(bot/engine/skinny.py) for a step's row count, the correction rides on the base product in one
call (`RowLinear.corrector`, bound once a layer when the mix is built): the factors, padded to
a multiple of 16 rank columns, extend each weight row's dot product and stream with the weight.
As three torch ops with factors read cold after the weights streamed through, it cost +13 % an
8-row step; in the kernel +8 % (Xeon, 29 Nov 2026), of which about a third was Python: the
checks and argument list a call rebuilt (+1.1 ms a step, AVX-512 EPYC, 6 Dec 2026), now bound
once, which left +0-4 % an 8-row step. Since each layer of a step is one kernel call (`extension`
hands it the factors) the plain step has shed its torch ops, and a mixed 8-row step measures
+4-12 % over a plain one there: the factors' bytes and sums.

A float32 swap is one pass over each targeted weight, `W += D_new - D_old`; the round trips
leave an error of a few ulp (measured < 1e-6 absolute), far below what changes a greedy token.
In bf16 or fp16 each round trip would lose up to half a unit in the last place and drift over
many swaps, so there every merge is computed afresh from the base weight, `W = base + D_new`:
read from the model's safetensors file (memory-mapped, nothing stays resident) where the model
came from one, else from a copy kept in memory at the first merge.

Only plain LoRA on linear layers is merged. DoRA, `modules_to_save`, trained biases, embedding
LoRA or per-module alpha patterns are refused with a message (the project's trainer never makes
them: the LoRA configuration is fixed across versions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bot.engine import skinny
from bot.engine.types import EngineError

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPart:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    transposed: bool  # fan_in_fan_out (Conv1D-style weights, GPT-2)

    def delta(self, *, device) -> torch.Tensor:
        product = self.b.to(device, torch.float32) @ self.a.to(device, torch.float32)
        product = product * self.scale
        return product.T if self.transposed else product

    def add_to(self, weight: torch.Tensor, *, sign: float) -> None:
        """weight += sign * scale * B @ A, in place and in one fused op (float32 weights).

        No full-size temporary: a swap touches all 210 linear layers of SmolLM2-135M, and the
        product, its scaled copy and the add took 0.1-1.7 s a merge and unmerge on the engine
        thread and 13 s on busy cores; `addmm_` takes 75-85 ms and gives the same bits.
        """
        a = self.a.to(weight.device, torch.float32)
        b = self.b.to(weight.device, torch.float32)
        if self.transposed:
            a, b = b.T, a.T
        weight.addmm_(b, a, alpha=sign * self.scale)


@dataclass
class LoraAdapter:
    """A LoRA adapter read from its folder: one `LoraPart` per targeted module path."""

    version: str
    parts: dict[str, LoraPart]


def read_adapter(path: Path, *, version: str, base_model) -> LoraAdapter:
    """Read and check the adapter in `path` against `base_model`, without touching the model.

    One read of the folder: the swap reads it on the engine's thread, between two steps of
    every row decoding (reading the weights twice, once to check them and once to keep them,
    took 22 ms of SmolLM2's rank-8 adapter; once, ~10)."""
    config, weights, layers = _checked_folder(path, base_model=base_model)
    refused = [
        name
        for name, value in (
            ("use_dora", getattr(config, "use_dora", False)),
            ("modules_to_save", getattr(config, "modules_to_save", None)),
            ("alpha_pattern", getattr(config, "alpha_pattern", None)),
        )
        if value
    ]
    if getattr(config, "bias", "none") != "none":
        refused.append(f"bias={config.bias}")
    if refused:
        raise EngineError(
            f"it uses {', '.join(refused)}, which the engine does not merge; train it with the "
            "project's fixed LoRA configuration (plain LoRA on linear layers)"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        for marker in (".lora_A.", ".lora_B."):
            if marker in key:
                module = key.split(marker)[0].removeprefix(PEFT_PREFIX)
                pairs.setdefault(module, {})[marker[1:-1]] = tensor
                break
        else:
            raise EngineError(f"it holds {key}, which is not a LoRA A/B matrix of a linear layer")
    parts = {}
    for module_path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise EngineError(f"{module_path} has only {', '.join(pair)}; both A and B are needed")
        layer = layers[module_path]
        if not isinstance(getattr(layer, "weight", None), torch.Tensor) or layer.weight.dim() != 2:
            raise EngineError(f"{module_path} is not a linear layer; only those are merged")
        rank = pair["lora_A"].shape[0]
        alpha = config.lora_alpha
        scale = alpha / math.sqrt(rank) if getattr(config, "use_rslora", False) else alpha / rank
        part = LoraPart(
            a=pair["lora_A"],
            b=pair["lora_B"],
            scale=scale,
            transposed=bool(getattr(config, "fan_in_fan_out", False)),
        )
        expected = tuple(layer.weight.shape)
        got = (part.b.shape[0], part.a.shape[1])
        if (got[::-1] if part.transposed else got) != expected:
            raise EngineError(f"{module_path}: B @ A is {got}, the base weight {expected}")
        parts[module_path] = part
    if not parts:
        raise EngineError("it holds no LoRA weights")
    return LoraAdapter(version=version, parts=parts)


@dataclass
class MergedWeights:
    """Which adapter is merged into `model`'s weights right now, and how to take it out."""

    model: object
    adapter: LoraAdapter | None = None
    # bf16/fp16 weights: a function giving a base weight by parameter name (read from the
    # model's file), so that no copy stays resident; without one a copy is kept in memory
    base_weights: Callable[[str], torch.Tensor] | None = None
    _originals: dict[str, torch.Tensor] = field(default_factory=dict)
    _mix: _VersionMix | None = None
    # the last mixes taken out (`unmix`), by key, kept for the next that wants the same
    # versions: with every row finishing at once, the batch empties between two admissions,
    # and a rebuild (the stacked factors of every layer) cost ~10-26 ms each time. Two: under
    # swaps every few questions, admissions alternate between two sets of versions (one was
    # kept before, and the benchmark's swap runs rebuilt a mix at ~2 of every 7 admissions)
    _idle: dict[tuple, _VersionMix] = field(default_factory=dict)
    idle_kept = 2

    @property
    def version(self) -> str | None:
        return None if self.adapter is None else self.adapter.version

    @property
    def mixing(self) -> bool:
        """Whether the correcting forwards are in place (rows of another version decoded)."""
        return self._mix is not None

    @contextmanager
    def mixed(
        self, versions: Sequence[str | None], adapters: Mapping[str, LoraAdapter]
    ) -> Iterator[None]:
        """Within the block, the batch's row `i` runs as if `versions[i]` were merged.

        `versions` names each row of the next forward, in batch order (None: the base model);
        `adapters` holds every version named other than the merged one. The replaced forwards
        stay in place between blocks (a forward outside a block, or one whose rows are all on
        the merged version, is not corrected) until `unmix`.
        """
        others = tuple(sorted({v for v in versions if v != self.version}, key=str))
        if not others:
            yield
            return
        key = (self.version, others)
        if self._mix is None or self._mix.key != key:
            self.unmix()
            idle = self._idle.pop(key, None)
            if idle is not None:
                idle.install()  # a key names the same weights: its factors still hold
                self._mix = idle
            else:
                self._mix = _VersionMix(self, others, adapters)
        self._mix.select(versions)
        try:
            yield
        finally:
            self._mix.select(None)

    @torch.no_grad()
    def apply(self, adapter: LoraAdapter | None) -> None:
        """Take the merged adapter out (if any) and merge `adapter` (None: the base alone)."""
        self.unmix()  # its factors were built against the adapter merged until now
        self._idle.clear()  # keyed by the version merged until now: no longer wanted
        old = self.adapter
        old_parts = old.parts if old is not None else {}
        new_parts = adapter.parts if adapter is not None else {}
        for module_path in sorted({*old_parts, *new_parts}):
            self._set(module_path, new=new_parts.get(module_path), old=old_parts.get(module_path))
        self.adapter = adapter
        if adapter is None:
            self._originals.clear()  # every weight is the base again

    def _set(self, module_path: str, *, new: LoraPart | None, old: LoraPart | None) -> None:
        weight = _base_layer(self.model, module_path).weight
        if weight.dtype == torch.float32:
            # in place, one pass: W += D_new - D_old as one `addmm_` of the stacked factors
            pieces = [(part, sign) for part, sign in ((new, 1.0), (old, -1.0)) if part]
            if len({part.transposed for part, _ in pieces}) > 1:  # never from our trainer
                for part, sign in pieces:
                    part.add_to(weight, sign=sign)
                return
            a = torch.cat([part.a.to(weight.device, torch.float32) for part, _ in pieces])
            b = torch.cat(
                [part.b.to(weight.device, torch.float32) * (sign * part.scale)
                 for part, sign in pieces],
                dim=1,
            )  # fmt: skip
            if pieces[0][0].transposed:
                a, b = b.T, a.T
            weight.addmm_(b, a)
            return
        # low precision: W = base + D_new, from the base weights, never by subtracting
        base = self._base_weight(module_path, weight)
        if new is None:
            weight.copy_(base)
        else:
            merged = base.to(weight.device, torch.float32) + new.delta(device=weight.device)
            weight.copy_(merged.to(weight.dtype))

    def _base_weight(self, module_path: str, weight: torch.Tensor) -> torch.Tensor:
        """The base model's weight: read from its file, or a copy kept at the first merge."""
        if self.base_weights is not None:
            return self.base_weights(f"{module_path}.weight").to(weight.device)
        original = self._originals.get(module_path)
        if original is None:  # first touched now, so the weight is still the base
            original = self._originals[module_path] = weight.detach().clone()
        return original

    def unmix(self) -> None:
        """Give the layers their own forwards back (no row of another version is left); the
        mix is kept aside for a next one of the same versions (the last `idle_kept`)."""
        if self._mix is not None:
            self._mix.remove()
            self._idle.pop(self._mix.key, None)
            self._idle[self._mix.key] = self._mix
            self._mix = None
            while len(self._idle) > self.idle_kept:
                self._idle.pop(next(iter(self._idle)))


class _VersionMix:
    """Replaced layer forwards that correct the rows of versions other than the merged one."""

    def __init__(
        self, weights: MergedWeights, others: tuple, adapters: Mapping[str, LoraAdapter]
    ) -> None:
        merged = weights.adapter
        self.key = (weights.version, others)
        # the components: the merged adapter taken out (every row of another version), and
        # each other version put in (its own rows); None, the base model, adds nothing
        components: list[tuple[int, LoraAdapter, float]] = []
        if merged is not None:
            components.append((0, merged, -1.0))
        for index, version in enumerate(others, start=1):
            if version is not None:
                if version not in adapters:
                    raise EngineError(f"rows decode on adapter {version}, which is not in memory")
                components.append((index, adapters[version], 1.0))
        self.others = others
        self._padding = len(others) + 1  # the component of padding columns: no row uses it
        # each layer's component per rank column, numbered; the masks of the next forwards by
        # that number: (rows, 1, rank) over a row's tokens, its (rows, rank) view, and that in
        # float32 for the kernel's layer step (the same tensor where the weights are float32)
        self._layouts: dict[tuple[int, ...], int] = {}
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._selected: tuple | None = None  # the last rows named and their masks
        self._forwards = []  # (layer, its correcting forward), in place while rows are mixed
        self._device, self._dtype = None, None
        paths = sorted({path for _, adapter, _ in components for path in adapter.parts})
        for path in paths:
            layer = _base_layer(weights.model, path)
            weight = layer.weight
            self._device, self._dtype = weight.device, weight.dtype
            a_parts, b_parts, columns = [], [], []
            for index, adapter, sign in components:
                part = adapter.parts.get(path)
                if part is None:
                    continue
                a_parts.append(part.a.to(weight.device, weight.dtype))
                b_parts.append(part.b.to(weight.device, weight.dtype) * (sign * part.scale))
                columns.extend([index] * part.a.shape[0])
            # zero rank columns up to a multiple of the kernel's step: they add nothing, and
            # the skinny kernel takes the factors as an extension of its dot products
            padding = -len(columns) % skinny.EXTENSION_STEP
            columns.extend([self._padding] * padding)
            a_parts.append(weight.new_zeros(padding, weight.shape[1]))
            b_parts.append(weight.new_zeros(weight.shape[0], padding))
            layout = self._layouts.setdefault(tuple(columns), len(self._layouts))
            a_rows = torch.cat(a_parts).contiguous()  # (rank, in)
            b_cols = torch.cat(b_parts, dim=1).contiguous()  # (out, rank)
            self._forwards.append((layer, self._forward(layer, a_rows, b_cols, layout)))
        self.install()

    def _forward(self, layer, a_rows: torch.Tensor, b_cols: torch.Tensor, layout: int):
        """The layer's forward with the correction: an instance attribute, not a forward hook
        (any hook sends every call through nn.Module's slow path: ~2x the cost, measured)."""
        # the base product of the layer's class: plain nn.Linear, or the engine's RowLinear
        # (bot.engine.kernels) when the worker installed it
        base_forward = type(layer).forward
        # RowLinear's product and correction in one pass of the skinny kernel, the weight and
        # factors bound once (None elsewhere)
        corrector = getattr(layer, "corrector", None)
        corrected = corrector(a_rows, b_cols) if corrector is not None else None
        a, b = a_rows.T, b_cols.T  # (in, rank), (rank, out): views for torch's products
        # the kernel's whole-layer step takes float32 factors whatever the weights' dtype:
        # bf16's are copied once, where the engine installed the kernel on this layer
        wide = (a_rows, b_cols)
        if a_rows.dtype != torch.float32 and getattr(layer, "library", None) is not None:
            wide = (a_rows.float(), b_cols.float())

        def forward(x: torch.Tensor) -> torch.Tensor:
            masks = self._masks
            if masks is None:
                return base_forward(layer, x)
            mask, flat_mask, _ = masks[layout]
            if corrected is not None and x.shape[1] == 1:  # a decoding step, one token a row:
                # in one pass of the skinny kernel where the worker installed it for these rows
                output = corrected(x.reshape(x.shape[0], -1), flat_mask)
                if output is not None:
                    return output.view(*x.shape[:-1], output.shape[-1])
            # the general form (a prefill; a step the kernel does not take): 2-D and in place
            flat = x.reshape(-1, x.shape[-1])
            low = torch.mm(flat, a).view(*x.shape[:-1], -1).mul_(mask)
            output = base_forward(layer, x)
            output.view(flat.shape[0], -1).addmm_(low.view(flat.shape[0], -1), b)
            return output

        def extension():
            """What the kernel's whole-layer step (`skinny.layer_step`) streams beside the
            weight for the rows of the next forward: (A, B, mask), or None (no correction)."""
            masks = self._masks
            return None if masks is None else (*wide, masks[layout][2])

        forward.extension = extension
        return forward

    def select(self, versions: Sequence[str | None] | None) -> None:
        """Name the rows of the next forwards (None: correct nothing until named again).

        The same rows as the last time get the same mask tensors back (most steps: rows
        change only as answers join or finish)."""
        if versions is None:
            self._masks = None
            return
        versions = tuple(versions)
        if self._selected is not None and self._selected[0] == versions:
            self._masks = self._selected[1]
            return
        # rows[i, k]: whether row i uses component k (0: the merged one taken out)
        rows = torch.zeros((len(versions), len(self.others) + 2), dtype=torch.bool)
        for row, version in enumerate(versions):
            if version in self.others:
                rows[row, 0] = True
                rows[row, self.others.index(version) + 1] = True
        self._masks = {}
        for layout, number in self._layouts.items():
            mask = rows[:, list(layout)].to(self._device, self._dtype)
            wide = mask if mask.dtype == torch.float32 else mask.float()  # the kernel's step's
            self._masks[number] = (mask[:, None], mask, wide)
        self._selected = (versions, self._masks)

    def install(self) -> None:
        for layer, forward in self._forwards:
            layer.forward = forward

    def remove(self) -> None:
        for layer, _ in self._forwards:
            del layer.forward  # the class's own forward again
        self._masks = None


def check_adapter_folder(path: Path, *, base_model) -> None:
    """Refuse a folder that is not a LoRA adapter for `base_model`, without touching the model."""
    _checked_folder(path, base_model=base_model)


def _checked_folder(path: Path, *, base_model) -> tuple[object, dict, dict]:
    """`check_adapter_folder`'s checks; then the folder's PEFT config, its weights by key and
    the base layer of each module they name."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise EngineError(f"{path / 'adapter_config.json'} is missing")
    config = PeftConfig.from_pretrained(str(path))
    if str(config.peft_type).upper().rsplit(".", 1)[-1] != "LORA":
        raise EngineError(f"it is a {config.peft_type} adapter, not LoRA")
    weights = load_peft_weights(str(path), device="cpu")
    if not weights:
        raise EngineError("it holds no weights")
    layers: dict[str, object] = {}
    for key, tensor in weights.items():
        for marker, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if marker not in key:
                continue
            module_path = key.split(marker)[0].removeprefix(PEFT_PREFIX)
            layer = layers.get(module_path)
            if layer is None:
                layer = layers[module_path] = _base_layer(base_model, module_path)
            weight = getattr(layer, "weight", None)
            if weight is None or weight.dim() != 2:
                continue
            expected = weight.shape[dim]
            if tensor.shape[dim] != expected:
                raise EngineError(
                    f"{key} has shape {tuple(tensor.shape)}, the base layer {expected} features: "
                    "it was trained for a different base model"
                )
    return config, weights, layers


def _base_layer(model, module_path: str):
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise EngineError(f"its layer {module_path} is not in the base model") from None
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module
