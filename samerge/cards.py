"""The pieces every merged model's README.md shares: Hugging Face front matter and the recipe that merges it again.

``samerge merge`` (:func:`samerge.api.model_card`) and ``samerge merge-lora`` (:func:`samerge.lora.lora_card`) write
their cards with these, so the Hub reads ``base_model``, ``library_name`` and ``tags`` alike from both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=1000, allow_unicode=True).strip()


def front_matter(base_model: str | None, tags: Sequence[str], library_name: str | None = None) -> list[str]:
    """The card's opening ``---`` block (the Hugging Face model card metadata; no ``base_model`` for a base given in
    memory, which nothing names)."""
    front: dict[str, Any] = {"base_model": base_model} if base_model else {}
    if library_name:
        front["library_name"] = library_name
    front["tags"] = list(tags)
    return ["---", _dump(front), "---"]


def recipe_section(command: str, recipe: Mapping[str, Any]) -> list[str]:
    """``## Recipe``: the ``--config`` file of ``command`` that merges the same inputs again."""
    return ["", "## Recipe", "", f"`{command} --config recipe.yaml --out OUT` with this `recipe.yaml` merges it again:",
            "", "```yaml", _dump(dict(recipe)), "```"]
