"""Which instances are frontal chest radiographs the models may score at all.

Like a hanging protocol's series selector, the rules live in configuration
(``eligibility`` section of settings/config.py) so a site can accept THORAX or refuse AP
without a release.  An ineligible instance is never dropped silently: the reason is
returned ("ineligible: view position LL") for the worker to store and the worklist to show.

Header-less images (PNG/JPEG datasets for training, or a file dropped in by hand) carry
no Modality, Body Part or View Position.  Decision: no header rule refuses them; they are
flagged "no DICOM header" so the flag travels with any result from them, and once decoded
their pixels are judged instead (``dicom_io.image_scope``: colour, size, shape, contrast).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from settings import EligibilityConfig

NO_HEADER = "no DICOM header"
# Photometric interpretations the pixel path renders (dicom_io.decode).
RENDERED_PHOTOMETRIC = frozenset(
    {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
)
# Species values that still mean a person (PS3.3 C.7.1.1 Patient Species Description).
HUMAN_SPECIES = frozenset({"HOMO SAPIENS", "HUMAN", "HOMO SAPIENS SAPIENS"})

Header = Dataset | Mapping[str, Any]


@dataclass(frozen=True)
class Eligibility:
    """``reason`` is None when eligible; ``reasons`` lists every rule that failed."""

    eligible: bool
    reason: str | None
    reasons: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


def _get(header: Header, keyword: str) -> Any:
    if isinstance(header, Dataset):
        try:
            return header.get(keyword)
        except Exception:  # a malformed element must not stop the decision  # noqa: BLE001
            return None
    return header.get(keyword)


def _text(value: Any) -> str:
    """Normalise a CS/LO value (possibly multi-valued, possibly None) to one upper string."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if isinstance(value, str):
        return value.strip().upper()
    if isinstance(value, Iterable):
        return "\\".join(_text(v) for v in value).strip("\\")
    return str(value).strip().upper()


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _words(texts: Iterable[str]) -> set[str]:
    words: set[str] = set()
    for text in texts:
        words.update(w for w in re.split(r"[^A-Z0-9]+", text) if w)
    return words


def _code_meanings(header: Header, keyword: str) -> list[str]:
    seq = _get(header, keyword)
    out: list[str] = []
    if not seq:
        return out
    try:
        for item in seq:
            meaning = item.get("CodeMeaning") if hasattr(item, "get") else None
            if meaning:
                out.append(_text(meaning))
    except TypeError:
        return out
    return out


def _description_words(header: Header, rules: EligibilityConfig) -> set[str]:
    texts = [_text(_get(header, kw)) for kw in rules.hint_attributes]
    texts += _code_meanings(header, "ViewCodeSequence")
    return _words(texts)


def _non_human(header: Header, rules: EligibilityConfig, words: set[str]) -> str | None:
    species = _text(_get(header, "PatientSpeciesDescription"))
    if species and species not in HUMAN_SPECIES:
        return f"non-human subject (species {species})"
    for meaning in _code_meanings(header, "PatientSpeciesCodeSequence"):
        if meaning not in HUMAN_SPECIES:
            return f"non-human subject (species {meaning})"
    hits = sorted(words.intersection(rules.non_human_hints))
    if hits:
        return f"non-human subject (hint {', '.join(hits)})"
    return None


def check_eligibility(ds_or_header: Header | None, rules: EligibilityConfig | None = None) -> Eligibility:
    """Apply the rules to a pydicom Dataset or a keyword->value mapping (or None for a
    header-less PNG/JPEG).  Reads Modality, Body Part Examined, View Position, View Code
    Sequence, Number of Frames, Rows, Columns, Photometric Interpretation, Patient Species, and the free-text
    attributes in ``rules.hint_attributes``."""
    rules = rules or EligibilityConfig()
    if ds_or_header is None:
        return Eligibility(eligible=True, reason=None, flags=(NO_HEADER,))
    header = ds_or_header
    reasons: list[str] = []

    # Rows/Columns, not Pixel Data: callers may read headers with stop_before_pixels, and
    # objects without an image (SR, presentation states, KOS) have no Rows either.
    rows, cols = _int(_get(header, "Rows")), _int(_get(header, "Columns"))
    if rows is None or cols is None:
        reasons.append("not an image (no Rows/Columns)")

    modality = _text(_get(header, "Modality"))
    if modality not in rules.modalities:
        reasons.append(f"modality {modality or '(empty)'}")

    words = _description_words(header, rules)
    non_human = _non_human(header, rules, words)
    if non_human:
        reasons.append(non_human)

    view = _text(_get(header, "ViewPosition"))
    body = _text(_get(header, "BodyPartExamined"))
    if body:
        if body not in rules.body_parts:
            reasons.append(f"body part {body}")
    elif not (rules.allow_empty_body_part and view in rules.view_positions):
        reasons.append("body part empty without a frontal view position")

    if view:
        if view not in rules.view_positions:
            reasons.append(f"view position {view}")
    else:
        lateral = sorted(words.intersection(rules.lateral_hints))
        if lateral:
            reasons.append(f"view position empty, lateral hint {', '.join(lateral)}")
        elif not rules.allow_empty_view_position:
            reasons.append("view position empty")

    frames = _int(_get(header, "NumberOfFrames")) or 1
    if frames > 1 and not rules.allow_multiframe:
        reasons.append(f"multi-frame ({frames} frames)")

    if rows is not None and cols is not None:
        if rows < rules.min_rows or cols < rules.min_columns:
            reasons.append(f"too small ({rows}x{cols}, minimum {rules.min_rows}x{rules.min_columns})")
        elif rows > rules.max_rows or cols > rules.max_columns:
            reasons.append(f"too large ({rows}x{cols}, maximum {rules.max_rows}x{rules.max_columns})")

    photometric = _text(_get(header, "PhotometricInterpretation"))
    if photometric and photometric not in RENDERED_PHOTOMETRIC:
        reasons.append(f"photometric interpretation {photometric}")

    if reasons:
        return Eligibility(eligible=False, reason="ineligible: " + "; ".join(reasons), reasons=tuple(reasons))
    return Eligibility(eligible=True, reason=None)
