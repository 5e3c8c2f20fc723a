"""The one target rule: a regular expression matched in full against module names, with a slice suffix.

``blocks\\.\\d+\\.mlp\\.fc1`` selects every ``fc1`` of a timm ViT. A trailing ``[q,v]`` (any comma-separated
subset of ``q``, ``k``, ``v``) selects output slices of a fused qkv layer instead of the whole layer:
``blocks\\.\\d+\\.attn\\.qkv[q,v]`` puts one adapter on the q rows and one on the v rows of each ``qkv``
Linear, and leaves the k rows alone. The suffix belongs to one top-level alternative, so
``.*attn\\.qkv[q,v]|.*attn\\.proj`` adapts the q and v slices of ``qkv`` and the whole ``proj``.

A trailing ``[q]``, ``[k]`` or ``[v]`` is always read as the slice suffix. To end an alternative with a regex
character class write it without commas and with more than one letter (``to_[qv]``) or as a group (``to_(q|v)``).

Fused layers are split in three equal parts in the order q, k, v (timm, open_clip and the backbone layer's
normalised attention all use this order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

SLICE_NAMES = ("q", "k", "v")
_SLICE_SUFFIX = re.compile(r"\[([qkv](?:,[qkv])*)\]$")


@dataclass(frozen=True)
class TargetRule:
    """One top-level alternative of a target expression."""

    pattern: re.Pattern
    slices: tuple[str, ...] | None
    """Slices of a fused qkv layer (in q, k, v order), or ``None`` for the whole layer."""


def _split_alternatives(target: str) -> list[str]:
    """Split at ``|`` characters that are outside groups, character classes and escapes."""
    parts, start, depth, in_class, i = [], 0, 0, False, 0
    while i < len(target):
        c = target[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            # a ']' right after '[' or '[^' is a literal member of the class
            if target[i + 1 : i + 2] == "^":
                i += 1
            if target[i + 1 : i + 2] == "]":
                i += 1
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(target[start:i])
            start = i + 1
        i += 1
    parts.append(target[start:])
    return parts


def _is_escaped(text: str, index: int) -> bool:
    n = 0
    while index - 1 - n >= 0 and text[index - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


def parse_target(target: str) -> list[TargetRule]:
    """Parse a target expression into rules; raises ``ValueError`` naming the problem."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError("target must be a non-empty regular expression (matched in full against module names)")
    rules = []
    for alternative in _split_alternatives(target):
        slices = None
        match = _SLICE_SUFFIX.search(alternative)
        if match and not _is_escaped(alternative, match.start()):
            letters = match.group(1).split(",")
            if len(set(letters)) != len(letters):
                raise ValueError(f"target {target!r}: slice suffix [{match.group(1)}] repeats a slice")
            slices = tuple(s for s in SLICE_NAMES if s in letters)
            alternative = alternative[: match.start()]
        if not alternative:
            raise ValueError(f"target {target!r} has an empty alternative")
        try:
            pattern = re.compile(alternative)
        except re.error as err:
            raise ValueError(f"target {target!r}: {alternative!r} is not a valid regular expression ({err})") from None
        rules.append(TargetRule(pattern, slices))
    return rules


def match_rules(rules: list[TargetRule], module_name: str) -> TargetRule | None:
    """The first rule whose pattern matches ``module_name`` in full, or ``None``."""
    for rule in rules:
        if rule.pattern.fullmatch(module_name):
            return rule
    return None


def supported_kind(module: nn.Module) -> str | None:
    """``'linear'`` or ``'conv'`` when an adapter can wrap the module, else ``None``.

    Supported: ``nn.Linear`` (and subclasses), and ``nn.Conv2d`` with a 1x1 kernel, ``groups=1`` and zero
    padding mode (a linear map over channels).
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    ):
        return "conv"
    return None


def slice_bounds(out_features: int, slices: tuple[str, ...], module_name: str) -> dict[str, tuple[int, int]]:
    """Row ranges of the requested slices of a fused qkv layer with ``out_features`` outputs."""
    if out_features % 3:
        raise ValueError(
            f"{module_name}: slice suffix [{','.join(slices)}] needs a fused qkv layer whose output size is a "
            f"multiple of 3, got {out_features}"
        )
    d = out_features // 3
    return {s: (SLICE_NAMES.index(s) * d, (SLICE_NAMES.index(s) + 1) * d) for s in slices}


def format_name(module_name: str, slices: tuple[str, ...] | None) -> str:
    return f"{module_name}[{','.join(slices)}]" if slices else module_name
