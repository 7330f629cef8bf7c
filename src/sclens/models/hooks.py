"""TransformerLens-style hook points and an activation cache."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn


class HookPoint(nn.Module):
    """An identity module placed on every intermediate activation.

    Ordinary torch forward hooks on it can read (cache) or replace (intervene on) the activation, and
    its module path is its TransformerLens-style name, e.g. ``blocks.3.attn.hook_pattern``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        """True when some hook will look at this activation (lets the model skip optional work)."""
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)


class ActivationCache(Mapping[str, torch.Tensor]):
    """Read-only mapping hook name -> activation tensor (cells stacked along dim 0)."""

    def __init__(self, store: dict[str, torch.Tensor]):
        self._store = store

    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._store[key]
        except KeyError:
            raise KeyError(f"{key!r} was not cached; cached names: {sorted(self._store)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._store.items())
        return f"ActivationCache({shapes})"


NamesFilter = str | Iterable[str] | Callable[[str], bool] | None


class HookedRootModule(nn.Module):
    """Mixin giving a model of HookPoints TransformerLens-like hook management."""

    def setup_hooks(self) -> None:
        self.hook_dict: dict[str, HookPoint] = {}
        for name, mod in self.named_modules():
            if isinstance(mod, HookPoint):
                mod.name = name
                self.hook_dict[name] = mod

    def resolve_names(self, names: NamesFilter) -> list[str]:
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if names(n)]
        if isinstance(names, str):
            names = [names]
        names = list(names)
        unknown = [n for n in names if n not in self.hook_dict]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(n, list(self.hook_dict), n=2) for n in unknown}
            raise KeyError(
                f"unknown hook name(s) {unknown}; closest: {hints}. "
                f"This model has {len(self.hook_dict)} hook points, e.g. {list(self.hook_dict)[:4]}"
            )
        return names

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str | Callable[[str], bool], Callable]] = ()):
        """Context manager: attach ``(name, fn(activation, hook) -> activation | None)`` pairs, removed on exit."""
        handles = []
        try:
            for name, fn in fwd_hooks:
                for n in self.resolve_names(name):
                    hp = self.hook_dict[n]
                    handles.append(hp.register_forward_hook(lambda mod, inp, out, fn=fn: fn(out, mod)))
            yield self
        finally:
            for h in handles:
                h.remove()
