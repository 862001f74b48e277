"""The MMEB dataset lists: 36 datasets, their meta-task, IND/OOD split and instructions.

MMEB (VLM2Vec, arXiv 2410.05160) has 36 evaluation datasets in 4 meta-tasks: classification 10,
VQA 10, retrieval 12, visual grounding 4. 20 are in-distribution (IND: their training split is in
MMEB-train) and 16 out-of-distribution (OOD). Scores are Precision@1 in percent; a meta-task score
is the mean of its datasets, IND the mean of 20, OOD of 16, Overall of 36 (facts.md).

Instructions are the fixed prefixes of the MMEB-eval texts ("Represent the given image with the
following question: {q}" keeps "Represent the given image with the following question:"). The
released MMEB-eval rows already carry them inline; a data set written without them (a user's own
rows, the synthetic benchmark) gets them through Embedder.prepare(instructions=...). See
`needs_instruction` for how the two are told apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
DISTRIBUTIONS = ("IND", "OOD")
# Leaderboard column headers, in META_TASKS order.
META_TASK_HEADERS = {"classification": "Cls", "vqa": "VQA", "retrieval": "Ret", "grounding": "Grd"}

# The placeholder MMEB texts use for "the image goes here".
IMAGE_PLACEHOLDER = "<|image_1|>"


@dataclass(frozen=True)
class MMEBTask:
    """One MMEB evaluation dataset.

    query_instruction / target_instruction: the fixed instruction prefix of query / candidate
    texts, "" where MMEB uses none (e.g. class names as classification candidates).
    """

    name: str
    meta_task: str
    distribution: str
    query_instruction: str
    target_instruction: str = ""


_CLS_IMAGE = "Represent the given image for classification"
_OBJECT = "Identify the object shown in the image"
_SCENE = "Identify the scene shown in the image"
_VQA = "Represent the given image with the following question:"
_IMAGE = "Represent the given image."
_CROP = "Represent the given cropped image of the object"
_WIKI_IMAGE = "Represent the given Wikipedia image with related text information:"
_REF_EXPR = "Select the portion of the image that follows the language expressions:"

_TASKS = (
    # Classification: the query is an image (N24News adds its caption), candidates are labels.
    MMEBTask("ImageNet-1K", "classification", "IND", _CLS_IMAGE),
    MMEBTask(
        "N24News",
        "classification",
        "IND",
        "Represent the given news image with the following caption for domain classification:",
    ),
    MMEBTask(
        "HatefulMemes",
        "classification",
        "IND",
        "Represent the given image for binary classification to determine whether it constitutes "
        "hateful speech or not",
    ),
    MMEBTask("VOC2007", "classification", "IND", _OBJECT),
    MMEBTask("SUN397", "classification", "IND", _SCENE),
    MMEBTask("Place365", "classification", "OOD", _SCENE),
    MMEBTask("ImageNet-A", "classification", "OOD", _CLS_IMAGE),
    MMEBTask("ImageNet-R", "classification", "OOD", _CLS_IMAGE),
    MMEBTask("ObjectNet", "classification", "OOD", _OBJECT),
    MMEBTask("Country211", "classification", "OOD", "Identify the country depicted in the image"),
    # VQA: image + question -> answer text.
    *(
        MMEBTask(name, "vqa", dist, _VQA)
        for name, dist in (
            ("OK-VQA", "IND"),
            ("A-OKVQA", "IND"),
            ("DocVQA", "IND"),
            ("InfographicsVQA", "IND"),
            ("ChartQA", "IND"),
            ("Visual7W", "IND"),
            ("ScienceQA", "OOD"),
            ("VizWiz", "OOD"),
            ("GQA", "OOD"),
            ("TextVQA", "OOD"),
        )
    ),
    # Retrieval: text <-> image, image + text -> image, text -> image + text.
    MMEBTask(
        "VisDial",
        "retrieval",
        "IND",
        "Represent the given dialogue about an image, which is used for image retrieval:",
        _IMAGE,
    ),
    MMEBTask(
        "CIRR",
        "retrieval",
        "IND",
        "Given an image, find a similar everyday image with the described changes:",
        _IMAGE,
    ),
    MMEBTask(
        "VisualNews_t2i", "retrieval", "IND", "Retrieve an image of this news caption.", _IMAGE
    ),
    MMEBTask(
        "VisualNews_i2t", "retrieval", "IND", "Find a caption for the news in the given photo."
    ),
    MMEBTask(
        "MSCOCO_t2i",
        "retrieval",
        "IND",
        "Find me an everyday image that matches the given caption:",
        _IMAGE,
    ),
    MMEBTask(
        "MSCOCO_i2t",
        "retrieval",
        "IND",
        "Find an image caption describing the given everyday image.",
    ),
    MMEBTask(
        "NIGHTS",
        "retrieval",
        "IND",
        "Find a day-to-day image that looks similar to the provided image.",
        _IMAGE,
    ),
    MMEBTask(
        "WebQA",
        "retrieval",
        "IND",
        "Find a Wikipedia image that answers this question:",
        _WIKI_IMAGE,
    ),
    MMEBTask(
        "OVEN",
        "retrieval",
        "OOD",
        "Retrieve a Wikipedia image-description pair that provides evidence for the question of "
        "this image:",
        _WIKI_IMAGE,
    ),
    MMEBTask(
        "FashionIQ",
        "retrieval",
        "OOD",
        "Find an image to match the fashion image and style note:",
        _IMAGE,
    ),
    MMEBTask(
        "EDIS",
        "retrieval",
        "OOD",
        "Find a news image that matches the provided caption:",
        "Represent the given image with related text information:",
    ),
    MMEBTask(
        "Wiki-SS-NQ",
        "retrieval",
        "OOD",
        "Find the document image that can answer the given query:",
        "Represent the given document image.",
    ),
    # Visual grounding: image + expression -> crop.
    MMEBTask(
        "MSCOCO",
        "grounding",
        "IND",
        "Select the portion of the image that isolates the object labeled as",
        _CROP,
    ),
    MMEBTask(
        "Visual7W-Pointing",
        "grounding",
        "OOD",
        "Select the portion of the image that answers the question:",
        _CROP,
    ),
    MMEBTask("RefCOCO", "grounding", "OOD", _REF_EXPR, _CROP),
    # Candidates are crops paired with the expression they are meant to match.
    MMEBTask("RefCOCO-Matching", "grounding", "OOD", _REF_EXPR, _REF_EXPR),
)

MMEB_TASKS: dict[str, MMEBTask] = {t.name: t for t in _TASKS}
assert len(MMEB_TASKS) == 36
assert sum(t.distribution == "IND" for t in _TASKS) == 20

# Expected number of datasets per group, for reporting partial runs honestly.
EXPECTED_COUNTS: dict[str, int] = {
    **{m: sum(t.meta_task == m for t in _TASKS) for m in META_TASKS},
    **{d: sum(t.distribution == d for t in _TASKS) for d in DISTRIBUTIONS},
    "overall": len(_TASKS),
}


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_NORMALISED = {_normalise_name(n): t for n, t in MMEB_TASKS.items()}


def find_task(name: str) -> MMEBTask | None:
    """The MMEB task of a dataset folder name, ignoring case and separators ("ImageNet_1K" is
    ImageNet-1K, as MMEB-train spells it); None for a dataset outside MMEB."""
    return _BY_NORMALISED.get(_normalise_name(name))


def _comparable(text: str) -> str:
    text = text.replace(IMAGE_PLACEHOLDER, " ")
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".:")


def needs_instruction(text: str | None, instruction: str) -> bool:
    """True when `instruction` should be given to the embedder for a row whose text is `text`.

    MMEB-eval rows carry their instruction inline ("<|image_1|>\\nRepresent the given image for
    classification"); adding it a second time would change the embedding, so it is only given
    when the text does not already start with it (placeholder, case, whitespace and the trailing
    "." or ":" ignored).
    """
    if not instruction:
        return False
    return not _comparable(text or "").startswith(_comparable(instruction))
