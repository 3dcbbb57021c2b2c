"""Generation with per-position top-k alternatives, through the output guard when given."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from layerfed.clients.events import Alternative, FieldError, InvalidFeedback
from layerfed.clients.guard import OutputGuard
from layerfed.clients.losses import encode
from layerfed.layers.device import model_device

__all__ = ["Generation", "GenerationError", "generate"]


class GenerationError(FieldError):
    """A generation request was unusable (e.g. an empty prompt)."""


@dataclass(frozen=True)
class Generation:
    """A continuation: text, token ids, per-position top-k ``(id, logprob)``, guard verdict.

    ``guarded`` is ``True`` when the output guard changed this output (masked a token
    the model would have emitted, or replaced the text by its refusal; then
    ``alternatives`` is empty).
    """

    prompt: str
    text: str
    tokens: tuple[int, ...]
    alternatives: tuple[tuple[tuple[int, float], ...], ...]
    guarded: bool = False

    def alternative(self, position: int, chosen_token: int) -> Alternative:
        """The feedback event "at ``position`` I prefer ``chosen_token`` (a top-k candidate)"."""
        if not 0 <= position < len(self.alternatives):
            expected = f"a position < {len(self.alternatives)} with recorded alternatives"
            raise InvalidFeedback("position", expected, position)
        candidates = tuple(t for t, _ in self.alternatives[position])
        return Alternative(
            prompt=self.prompt,
            response=self.text,
            position=position,
            chosen_token=chosen_token,
            candidates=candidates,
            response_ids=self.tokens,
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 8,
    top_k: int = 5,
    temperature: float = 0.0,
    guard: OutputGuard | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode greedily (``temperature=0``) or by sampling, through ``guard`` when given."""
    ids = encode(tokenizer, prompt)
    if not ids:
        raise GenerationError("prompt", "text that encodes to at least one token", prompt)
    device = model_device(model)
    tokens: list[int] = []
    alternatives: list[tuple[tuple[int, float], ...]] = []
    guarded = False
    for _ in range(max_new_tokens):
        context = ids + tokens
        row = torch.tensor([context], dtype=torch.long, device=device)
        logits = model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0, -1].float()
        logits = logits.cpu()  # the guard's masks and the sampler's generator live on the CPU
        token = _pick(logits, temperature, generator)
        if guard is not None:
            banned = guard.is_banned(token, context)
            logits = guard.mask(logits, context)
            if banned:
                guarded, token = True, _pick(logits, temperature, generator)
        logps = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logps, min(top_k, logps.shape[-1]))
        alternatives.append(tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        if token == tokenizer.eos_token_id:
            alternatives.pop()
            break
        tokens.append(token)
    text = str(tokenizer.decode(tokens, skip_special_tokens=True))
    if guard is not None and guard.violates(text):
        refusal = encode(tokenizer, guard.refusal)
        return Generation(prompt, guard.refusal, tuple(refusal), (), guarded=True)
    return Generation(prompt, text, tuple(tokens), tuple(alternatives), guarded)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """Greedy when ``temperature`` is 0, else one draw from ``softmax(logits / temperature)``."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
