"""Why the AI gave no answer, in words for the radiologist; the technical detail is for admins.

The stored reasons are written for the people who fix things ("AI error: TruncatedPixelData:
Pixel Data holds 2000 bytes but ..."); a radiologist needs one line that says what it means
for the study.  Pages and API answers show the plain line to everyone and the detail only to
admins (``for_user``).
"""

from __future__ import annotations

from typing import Any

INELIGIBLE_PREFIX = "ineligible: "

# (what the technical reason contains, the words for it), first match wins.
_FAILED = (
    (
        ("TruncatedPixelData", "holds", "incomplete", "truncated", "premature end"),
        "image could not be decoded: the file is incomplete",
    ),
    (("decod", "codec", "transfer syntax", "JPEG", "pixel data", "PixelData"), "image could not be decoded"),
    (("too large", "exceeds", "budget"), "image too large to read safely"),
    (("InvalidDicomError", "not a DICOM", "not DICOM"), "the file is not a readable DICOM image"),
)


def plain_reason(ai_state: str, technical: str | None) -> str | None:
    """One line for a failed or ineligible study (or instance), None for the others."""
    if ai_state == "ineligible":
        parts = [p.strip() for p in (technical or "").split(";") if p.strip()]
        parts = list(dict.fromkeys(p.removeprefix(INELIGIBLE_PREFIX).strip() for p in parts))
        return "outside what the model reads" + (f": {'; '.join(parts)}" if parts else "")
    if ai_state == "failed":
        text = technical or ""
        for needles, words in _FAILED:
            if any(n.lower() in text.lower() for n in needles):
                return words
        return "the AI could not process this study"
    return None


def for_user(data: dict[str, Any], is_admin: bool) -> dict[str, Any]:
    """A study row or detail as this user may see it: technical reasons removed for non-admins."""
    out = dict(data)
    if not is_admin:
        out.pop("ai_detail", None)
        out.pop("state_reason", None)
        if "instances" in out:
            out["instances"] = [
                {
                    **i,
                    "result": None if i["result"] is None else {k: v for k, v in i["result"].items() if k != "detail"},
                }
                for i in out["instances"]
            ]
        if "history" in out:
            out["history"] = [{k: v for k, v in h.items() if k != "detail"} for h in out["history"]]
    return out
