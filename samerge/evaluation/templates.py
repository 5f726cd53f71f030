"""Zero-shot prompts of the CLIP suites: the templates per task, and the helpers that fill them with class names.

The eight tasks of Task Arithmetic (Ilharco et al., 2023): SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD. A class's head vector is the normalized mean over templates of CLIP's normalized text embeddings, the
head the published experts were fine-tuned against (their text tower stays frozen). The templates are the prompt
lists of OpenAI's CLIP evaluation, as Task Arithmetic and FusionBench use them. Templates use ``{}`` for the class
name.

The built-in CLIP suites (``samerge/evaluation/hub/builtin/clip-vit-*.yaml``) spell out these templates and, where
the dataset's ClassLabel names are not prompt-ready, the class names by label index. :func:`builtin_templates` reads
them from one of those files (once, when first asked): what a user's CLIP suite gets for a task of one of these
names that gives no ``templates`` of its own.
Class names taken from a dataset are cleaned by :func:`clean_classname`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml


@functools.cache
def builtin_templates() -> dict[str, list[str]]:
    """The templates of the eight tasks, read from the built-in CLIP suite that spells them out (one copy of them;
    read on first use, not when samerge is imported)."""
    path = Path(__file__).parent / "hub" / "builtin" / "clip-vit-b32.yaml"
    return {t["name"]: t["templates"] for t in yaml.safe_load(path.read_text(encoding="utf-8"))["tasks"]}


def clean_classname(raw: str) -> str:
    """A dataset label name made prompt-ready: ``"/a/apartment_building/outdoor"`` -> ``"apartment building outdoor"``.

    A leading SUN-style index path (``/a/``) is dropped, path separators and underscores become spaces.
    """
    name = raw.strip()
    if name.startswith("/") and len(name) > 3 and name[2] == "/":
        name = name[3:]
    return " ".join(name.replace("/", " ").replace("_", " ").split())


def prompts(templates: list[str], classname: str) -> list[str]:
    """Every template filled with one class name."""
    return [t.format(classname) for t in templates]
