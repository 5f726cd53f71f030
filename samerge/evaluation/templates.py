"""Zero-shot prompts of the CLIP suites: the templates per task, and the helpers that fill them with class names.

The eight tasks of Task Arithmetic (Ilharco et al., 2023): SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD. A class's head vector is the normalized mean over templates of CLIP's normalized text embeddings, the
head the published experts were fine-tuned against (their text tower stays frozen). The templates are the prompt
lists of OpenAI's CLIP evaluation, as Task Arithmetic and FusionBench use them. Templates use ``{}`` for the class
name.

The built-in CLIP suites (``samerge/evaluation/hub/builtin/clip-vit-*.yaml``) spell out these templates and, where
the dataset's ClassLabel names are not prompt-ready, the class names by label index; :data:`TEMPLATES` is what a
user's CLIP suite gets for a task of one of these names that gives no ``templates`` of its own. Class names taken
from a dataset are cleaned by :func:`clean_classname`.
"""

from __future__ import annotations

_PHOTO = ["a photo of a {}.", "a photo of the {}."]
_NUMBER = ['a photo of the number: "{}".']

TEMPLATES: dict[str, list[str]] = {
    "sun397": _PHOTO,
    "stanford_cars": [*_PHOTO, "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.",
                      "a photo of my clean {}.", "a photo of my new {}.", "a photo of my old {}."],
    "resisc45": [f"{view} {kind} of {article}{{}}." for article in ("", "a ", "the ")
                 for view, kind in (("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
                                    ("aerial", "photo"), ("satellite", "view"), ("aerial", "view"))],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "svhn": _NUMBER,
    "gtsrb": ['a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'],
    "mnist": _NUMBER,
    "dtd": [f"a photo of {article} {{}} {thing}." for article in ("a", "the")
            for thing in ("texture", "pattern", "thing", "object")],
}


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
