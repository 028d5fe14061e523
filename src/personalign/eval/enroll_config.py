"""What :mod:`personalign.eval.enroll` runs: the method and source names and :class:`EnrollConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from personalign.errors import ValidationError
from personalign.eval.adapters import ADAPTER_METHODS
from personalign.preference import EMBEDDER_CLASSES
from personalign.preference.featurizer import FeaturizerConfig

EMBEDDERS = EMBEDDER_CLASSES
METHODS = (*EMBEDDERS, "oracle", *ADAPTER_METHODS)
SOURCES = ("psoups", "hh", "popquorn", "prefeval", "synthetic")
ACTIVE_METHODS = ("pal", "vpl")
# What a fit user loses when it overlaps a test user's held-out items: the prompt, except where
# every item shares one prompt by construction (POPQUORN's single question, synthetic's pool).
EXCLUDE = {"synthetic": "pair", "popquorn": "pair"}


@dataclass
class EnrollConfig:
    """What to run. ``shots`` per source default to 1, 2, 4 on P-SOUPS (4-item histories) and 1-8 elsewhere."""

    data: list[str]
    methods: list[str] = field(default_factory=lambda: ["bt", "meandiff", "pal", "vpl", "oracle"])
    shots: list[int] | None = None
    seeds: int = 3
    fit_data: str | None = None
    test_fraction: float = 0.2
    features: tuple[str, ...] = ("response", "prompt_x_response", "log_length")
    active: bool = False
    active_users: int = 40
    active_pool: int = 48
    active_steps: int = 8
    adapter_users: int = 20
    adapter_seeds: int = 1
    bank_k: int = 4
    bank_pairs: int = 32
    synthetic_users: int = 200
    item_effects: bool = False
    data_root: str | None = None

    def __post_init__(self) -> None:
        if not self.data:
            raise ValidationError(
                "data", "is empty", f"name a source ({', '.join(SOURCES)}) or a .jsonl file"
            )
        for name in self.data:
            if name not in SOURCES and not name.endswith(".jsonl"):
                raise ValidationError(
                    "data", f"has unknown source {name!r}", f"use {', '.join(SOURCES)} or a .jsonl path", name
                )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValidationError(
                "methods",
                f"has unknown method(s) {unknown}",
                f"choose from {', '.join(METHODS)}",
                self.methods,
            )
        if self.shots is not None and (not self.shots or any(n < 1 for n in self.shots)):
            raise ValidationError("shots", "must be positive integers", "e.g. --shots 1,2,4,8", self.shots)
        if self.seeds < 1:
            raise ValidationError("seeds", "must be at least 1", "e.g. --seeds 3", self.seeds)
        FeaturizerConfig(parts=self.features)  # validates the names

    def shots_for(self, source: str) -> list[int]:
        if self.shots is not None:
            return list(self.shots)
        return [1, 2, 4] if source == "psoups" else [1, 2, 4, 8]
