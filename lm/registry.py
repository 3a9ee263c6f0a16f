"""Name -> class registries, so a config can say `attention="gqa"` or `norm="rmsnorm"` in YAML.

    ATTENTION = Registry("attention")

    @ATTENTION.register("manual")
    class ManualAttention(nn.Module): ...

    ATTENTION.get("manual")   # the class; an unknown name raises, listing the known ones

The four component registries below are filled when `lm` imports the component modules;
`lm.config` checks names against them. Tokenizers keep theirs (kind -> class) in
`lm.tokenizers.TOKENIZERS`. This module imports nothing from `lm`.
"""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown component name; the message lists the known names."""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is registered twice.")
            self._entries[name] = cls
            return cls

        return add

    def get(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}.") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self.names()})"


ATTENTION = Registry("attention")
POSITIONS = Registry("position encoding")
NORMS = Registry("norm")
FEEDFORWARD = Registry("feed-forward")
# Where GPT.from_pretrained finds pretrained weights: `lm.hf` registers "huggingface" (the hub). The
# model cannot import lm.hf itself, which builds models: the registry keeps the imports one-way.
PRETRAINED = Registry("pretrained-model source")
