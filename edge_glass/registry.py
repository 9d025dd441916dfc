"""Name -> class registries, so the experiment config is the only place a component is chosen.

    POOLERS = Registry("pooler")

    @POOLERS.register("perceiver")
    class PerceiverResampler(nn.Module):
        Config = PerceiverConfig   # pydantic model with `type: Literal["perceiver"]`

Each registered class carries a pydantic ``Config`` whose ``type`` field is a Literal of its
registry name; ``Registry.config_union()`` turns all of them into one discriminated union, so a
YAML block is validated against exactly the component it names and errors carry the key path.
"""
from __future__ import annotations

from typing import Annotated, Any, Callable, TypeVar, Union

from pydantic import Field

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            cfg = getattr(cls, "Config", None)
            if cfg is None or "type" not in cfg.model_fields:
                raise TypeError(f"{self.kind} {name!r}: class needs a pydantic Config with a `type` field")
            self._items[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        """Instantiate the class named by ``cfg.type`` with the validated config."""
        return self.get(cfg.type)(cfg, *args, **kwargs)

    def config_union(self) -> Any:
        """A pydantic type accepting any registered component's config, chosen by `type`."""
        configs = [cls.Config for cls in self._items.values()]
        if len(configs) == 1:
            return configs[0]
        return Annotated[Union[tuple(configs)], Field(discriminator="type")]
