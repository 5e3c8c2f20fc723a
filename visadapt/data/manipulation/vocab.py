"""The fixed label vocabularies of manipulation data: categories, judgment cues and the generator's editors.

The 12 categories and 12 cues are ManipBench's as the reference notes give them (third-party summaries of the
ManipShield paper, not its full text): categories are semantic (addition, removal, replacement, action change),
visual (background, colour, material, expression, resizing) and textual (scene, handwritten, scanning text); cues are
high-level (shape, structure, relation, text, pose, expression) and low-level (texture, blur, noise, light, detail,
colour). The order of each tuple is the index order of the ``category`` and ``cues`` fields of a sample.
"""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = (
    "addition", "removal", "replacement", "action_change",
    "background", "color", "material", "expression", "resizing",
    "scene_text", "handwritten_text", "scanning_text",
)
"""ManipBench's 12 manipulation categories; a sample's ``category`` is an index into this tuple (-1: authentic or
unknown)."""

CUES: tuple[str, ...] = (
    "shape", "structure", "relation", "text", "pose", "expression",
    "texture", "blur", "noise", "light", "detail", "color",
)
"""The 12 judgment cues (6 high-level, then 6 low-level); a sample's ``cues`` is a multi-hot vector in this order."""

EDITORS: tuple[str, ...] = (
    "splicing", "copy_move", "removal", "color_change", "material_change",
    "resizing", "text_insertion", "blur", "noise", "jpeg",
)
"""The offline generator's manipulation families, each acting as one "editing model" (hold editors out to measure
generalisation to unseen editors). Real images carry the editor name ``"authentic"``."""

AUTHENTIC = "authentic"

EDITOR_CATEGORY: dict[str, str] = {
    "splicing": "addition",          # an object from another photo is added
    "copy_move": "addition",         # a part of the same photo is duplicated elsewhere
    "removal": "removal",            # a region is filled by inpainting
    "color_change": "color",
    "material_change": "material",
    "resizing": "resizing",
    "text_insertion": "scene_text",
    # The low-level editors have no semantic category of their own in ManipBench; these are nominal choices:
    "blur": "background",            # a local defocus edit, the usual "blur the background" retouch
    "noise": "material",             # the surface grain of a region changes
    "jpeg": "replacement",           # the region is replaced by a recompressed copy of itself
}
"""Category of each generator editor (the last three are nominal, see the comments)."""


def category_index(name: str | None) -> int:
    """Index of category ``name`` in :data:`CATEGORIES`; ``None`` or ``""`` gives -1 (authentic / unknown)."""
    if not name:
        return -1
    key = name.strip().lower().replace(" ", "_").replace("-", "_").replace("colour", "color")
    if key not in CATEGORIES:
        raise ValueError(f"unknown manipulation category {name!r}; the 12 categories are: {', '.join(CATEGORIES)}")
    return CATEGORIES.index(key)


def cue_index(name: str) -> int:
    """Index of cue ``name`` in :data:`CUES`."""
    key = name.strip().lower().replace("colour", "color")
    if key not in CUES:
        raise ValueError(f"unknown judgment cue {name!r}; the 12 cues are: {', '.join(CUES)}")
    return CUES.index(key)


__all__ = ["AUTHENTIC", "CATEGORIES", "CUES", "EDITORS", "EDITOR_CATEGORY", "category_index", "cue_index"]
