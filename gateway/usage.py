"""What one request used and cost: the ``Usage`` value every completed request produces.

Token types follow the provider: ``image``, ``reasoning`` and ``audio`` are parts of
``completion``, not added to it. Cost = prompt x prompt price + image x image price +
(completion - image) x completion price.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from gateway.config import Prices

TOKEN_TYPES = ("prompt", "completion", "image", "reasoning", "audio")


def cost_usd(prompt: int, completion: int, image: int, prices: Prices) -> float:
    text_completion = max(0, completion - image)
    return (prompt * prices.prompt + image * prices.image + text_completion * prices.completion) / 1_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int = 0
    completion: int = 0
    image: int = 0
    reasoning: int = 0
    audio: int = 0
    images_in: int = 0
    images_out: int = 0
    cost_usd: float = 0.0
    estimated: bool = False  # the provider said nothing; these are the gateway's estimates

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def tokens(self) -> dict[str, int]:
        return {t: getattr(self, t) for t in TOKEN_TYPES}

    def priced(self, prices: Prices) -> "Usage":
        return replace(self, cost_usd=cost_usd(self.prompt, self.completion, self.image, prices))

    @classmethod
    def from_provider(
        cls,
        usage: dict[str, Any] | None,
        *,
        prices: Prices,
        images_in: int = 0,
        images_out: int = 0,
        estimate: "Usage | None" = None,
    ) -> "Usage":
        """Read the provider's ``usage`` object (parsed JSON); fall back to ``estimate`` when it is absent."""
        if not isinstance(usage, dict):
            base = estimate or cls()
            return replace(base, images_in=images_in, images_out=images_out, estimated=True).priced(prices)
        details = usage.get("completion_tokens_details")
        if not isinstance(details, dict):
            details = {}
        prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        image = _int(details.get("image_tokens"))
        return cls(prompt=prompt, completion=completion, image=image, reasoning=_int(details.get("reasoning_tokens")),
                   audio=_int(details.get("audio_tokens")), images_in=images_in, images_out=images_out,
                   cost_usd=cost_usd(prompt, completion, image, prices))


MAX_TOKENS = 10**9  # more than any one request uses; keeps the ledger's sums exact integers


def _int(value: Any) -> int:
    """A count the provider reported: a positive integer, at most MAX_TOKENS; else 0."""
    if type(value) is not int or value <= 0:  # bool is an int subclass: not a count
        return 0
    return value if value <= MAX_TOKENS else MAX_TOKENS


PROMPT_CHARS_PER_TOKEN = 4
PROMPT_TOKENS_PER_IMAGE = 560
IMAGE_TOKENS = {"4K": 2000}  # per output image; 1K and 2K cost 1120
DEFAULT_IMAGE_TOKENS = 1120


def expected_image_tokens(body: dict[str, Any]) -> int:
    """Image tokens of the one image a request will likely get back (0 for text-only answers)."""
    modalities = body.get("modalities")
    if isinstance(modalities, list) and "image" not in modalities:
        return 0
    config = body.get("image_config")
    size = config.get("image_size") if isinstance(config, dict) else None
    return IMAGE_TOKENS.get(size, DEFAULT_IMAGE_TOKENS) if isinstance(size, str) else DEFAULT_IMAGE_TOKENS


def estimate(request) -> "Usage":
    """What a request is expected to use before the provider says: the token reservation, and
    the charge that stands when the provider never reports usage (its generation was under way).
    The expected image is priced as image tokens. ``request`` is a ``validate.ChatRequest``."""
    prompt = -(-request.text_chars // PROMPT_CHARS_PER_TOKEN) + PROMPT_TOKENS_PER_IMAGE * len(request.images)
    completion = request.max_completion_tokens or request.model.default_completion_tokens
    image = min(completion, expected_image_tokens(request.body))
    return Usage(prompt=max(1, prompt), completion=completion, image=image, images_in=len(request.images), estimated=True)
