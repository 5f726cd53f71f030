"""Zero-shot prompts of the CLIP suites: templates per task, and class names where the dataset's own differ.

The eight tasks of Task Arithmetic (Ilharco et al., 2023): SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB,
MNIST, DTD. A class's head vector is the normalized mean over templates of CLIP's normalized text embeddings, the
head the published experts were fine-tuned against (their text tower stays frozen). The templates and class names
are the prompt lists of OpenAI's CLIP evaluation, as Task Arithmetic and FusionBench use them; spelling quirks
("horizonal", "bicyle") are kept on purpose: the experts were trained against exactly these embeddings.

Class names are listed by label index where the dataset's ClassLabel names are not prompt-ready (EuroSAT's and
GTSRB's are category codes); elsewhere (SUN397, Cars) the dataset's own names are used, cleaned by
:func:`clean_classname`. A list here must have exactly the dataset's number of classes (checked at load).
Templates use ``{}`` for the class name.
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

_DIGITS = [str(i) for i in range(10)]
_RWC = "red and white circle"
_RWT = "red and white triangle"
_BCW = "blue circle with white"

CLASSNAMES: dict[str, list[str]] = {
    "mnist": _DIGITS,
    "svhn": _DIGITS,
    "eurosat": ["annual crop land", "forest", "brushland or shrubland", "highway or road",
                "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
                "residential buildings or homes or apartments", "river", "lake or sea"],
    "gtsrb": [
        *(f"{_RWC} {v} kph speed limit" for v in (20, 30, 50, 60, 70, 80)),
        "end / de-restriction of 80 kph speed limit",
        f"{_RWC} 100 kph speed limit", f"{_RWC} 120 kph speed limit",
        f"{_RWC} red car and black car no passing", f"{_RWC} red truck and black car no passing",
        f"{_RWT} road intersection warning", "white and yellow diamond priority road",
        "red and white upside down triangle yield right-of-way", "stop", "empty red and white circle",
        f"{_RWC} no truck entry", "red circle with white horizonal stripe no entry",
        f"{_RWT} with exclamation mark warning", f"{_RWT} with black left curve approaching warning",
        f"{_RWT} with black right curve approaching warning", f"{_RWT} with black double curve approaching warning",
        f"{_RWT} rough / bumpy road warning", f"{_RWT} car skidding / slipping warning",
        f"{_RWT} with merging / narrow lanes warning",
        f"{_RWT} with person digging / construction / road work warning",
        f"{_RWT} with traffic light approaching warning", f"{_RWT} with person walking warning",
        f"{_RWT} with child and person walking warning", f"{_RWT} with bicyle warning",
        f"{_RWT} with snowflake / ice warning", f"{_RWT} with deer warning",
        "white circle with gray strike bar no speed limit",
        f"{_BCW} right turn arrow mandatory", f"{_BCW} left turn arrow mandatory",
        f"{_BCW} forward arrow mandatory", f"{_BCW} forward or right turn arrow mandatory",
        f"{_BCW} forward or left turn arrow mandatory", f"{_BCW} keep right arrow mandatory",
        f"{_BCW} keep left arrow mandatory", f"{_BCW} arrows indicating a traffic circle",
        "white circle with gray strike bar indicating no passing for cars has ended",
        "white circle with gray strike bar indicating no passing for trucks has ended",
    ],
    "resisc45": [
        "airplane", "airport", "baseball diamond", "basketball court", "beach", "bridge", "chaparral", "church",
        "circular farmland", "cloud", "commercial area", "dense residential", "desert", "forest", "freeway",
        "golf course", "ground track field", "harbor", "industrial area", "intersection", "island", "lake", "meadow",
        "medium residential", "mobile home park", "mountain", "overpass", "palace", "parking lot", "railway",
        "railway station", "rectangular farmland", "river", "roundabout", "runway", "sea ice", "ship", "snowberg",
        "sparse residential", "stadium", "storage tank", "tennis court", "terrace", "thermal power station",
        "wetland",
    ],
    "dtd": [
        "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
        "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
        "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
        "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
        "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
        "wrinkled", "zigzagged",
    ],
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
