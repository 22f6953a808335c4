"""The one scoring service: image in, judgement out, the same for the worker, `predict` and the analyse page.

For every image: read it (DICOM file or bytes, PNG, JPEG), check eligibility with the site's
rules (a PNG or JPEG has no header, so its pixels are checked instead: ``dicom_io.image_scope``),
decide its operating point from the header's age, turn its pixels into the model's
tensor through the one pixel path, score, and flag at the thresholds in force there (the
card's point with the site's overrides) with the findings allowed to steer there.  Before
this existed the chain was written three times and the copies disagreed (``predict`` ignored
a site's eligibility rules and thresholds).

No database, no files written: callers store or show what comes back.  Images that cannot be
read or decoded come back as ``failed`` with the reason; they never stop the others.  An
ineligible image is never scored, for any caller: a score for a film the model should not read
(a leg, a dog, a photograph) is read as an answer however it is labelled.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from db.models import StudyState
from dicom_io.eligibility import check_eligibility
from dicom_io.errors import PixelError
from dicom_io.image_scope import check_image_scope
from dicom_io.inflate import dcmread_bounded
from dicom_io.pixels import PixelResult, load_image, model_decode_size, to_model_tensor
from models.operating_points import ADULT, decide_population
from models.registry import TriageModel
from settings import Settings
from triage.operating import at_point, operating_points, steering_points
from triage.policy import Decision, InstanceOutcome, Level, decide, flags_for

Source = Path | str | bytes | Dataset

SCORED, INELIGIBLE, FAILED = StudyState.SCORED, StudyState.INELIGIBLE, StudyState.FAILED


@dataclass(frozen=True)
class ImageInput:
    """One image to judge: ``key`` names it in the result (a path, a SOP Instance UID, an upload)."""

    key: str
    source: Source


@dataclass
class Judgement:
    """What the service says of one image.

    ``scores`` are present only for an eligible image whose pixels could be decoded (an
    ineligible one has its ``reason`` instead); ``flags`` are
    score >= threshold at ``population``'s operating point; ``steering`` are the findings that
    may raise a study's priority there.  ``image`` is the decoded image (for display) when
    asked for; ``heatmaps`` is (n_findings, H, W) aligned with the model tensor when asked for.
    """

    key: str
    outcome: StudyState
    eligible: bool
    reason: str | None
    kind: str
    notes: list[str] = field(default_factory=list)
    population: str = ADULT
    thresholds: dict[str, float] = field(default_factory=dict)
    steering: frozenset[str] = frozenset()
    scores: dict[str, float] | None = None
    flags: dict[str, bool] = field(default_factory=dict)
    heatmaps: np.ndarray | None = None
    image: PixelResult | None = None
    # Where a failed image failed: "read" (not a DICOM, PNG or JPEG file) or "pixels" (undecodable).
    failed_at: str | None = None

    def as_outcome(self) -> InstanceOutcome:
        """The policy's view of this image: what ``triage.policy.decide`` judges a study by."""
        if self.outcome == SCORED and self.scores is not None:
            return InstanceOutcome(self.key, SCORED, None, self.scores, self.thresholds, self.population)
        return InstanceOutcome(self.key, self.outcome, self.reason)

    @property
    def informational(self) -> list[str]:
        """Findings scored here that do not steer priority at this operating point."""
        return sorted(f for f in (self.scores or {}) if f not in self.steering)


@dataclass
class _Read:
    kind: str
    header: Dataset | None
    pixels: Any


def sniff(head: bytes) -> str:
    """ "png", "jpeg", "dicom" (preamble and DICM), or "dicom?" (perhaps DICOM without a preamble)."""
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return "dicom?"


class _Unreadable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_READ_ERRORS = (InvalidDicomError, AttributeError, EOFError, ValueError, OSError, KeyError)


def _kind_of(source: Source) -> str:
    """What the first bytes say the source is (``sniff``); a Dataset is DICOM."""
    if isinstance(source, Dataset):
        return "dicom"
    if isinstance(source, bytes):
        return sniff(source[:132])
    with Path(source).open("rb") as fh:
        return sniff(fh.read(132))


def _read(source: Source, max_pixel_bytes: int) -> _Read:
    """Header (DICOM only) and what to hand the pixel path; ``_Unreadable`` on a file that is no image.

    The reason says what the bytes looked like: a file with the DICOM preamble that cannot be
    parsed is an unreadable DICOM; anything else is not an image we read at all.  A dataset
    without Pixel Data is no image either: pydicom reads almost any bytes leniently, and
    without this a text file would be judged "ineligible", a verdict about an image, and
    (never being decoded, as an ineligible image is not) never reported as a failure.
    """
    try:
        kind = _kind_of(source)
    except OSError as exc:
        raise _Unreadable(f"file cannot be opened: {type(exc).__name__}") from None
    what = "unreadable DICOM: {}" if kind == "dicom" else "not a DICOM, PNG or JPEG image ({})"
    try:
        read = _parse(source, kind, max_pixel_bytes)
    except _READ_ERRORS as exc:
        raise _Unreadable(what.format(type(exc).__name__)) from None
    if read.header is not None and "PixelData" not in read.header:
        raise _Unreadable(what.format("no Pixel Data"))
    return read


def _parse(source: Source, kind: str, max_pixel_bytes: int) -> _Read:
    if isinstance(source, Dataset):
        return _Read("dicom", source, source)
    if kind in ("png", "jpeg"):
        return _Read(kind, None, source if isinstance(source, bytes) else Path(source))
    ds = dcmread_bounded(source if isinstance(source, bytes) else Path(source), force=kind == "dicom?",
                         max_pixel_bytes=max_pixel_bytes)  # fmt: skip
    return _Read("dicom", ds, ds)


class Scorer:
    """A model judged at a site: thresholds and steering per population, computed once."""

    def __init__(self, model: TriageModel, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.points = operating_points(model, settings)
        self.steering = steering_points(model, settings)
        self.forward_s = 0.0  # time spent in the model, summed over calls (the worker reports it)

    def judge(
        self,
        inputs: Sequence[ImageInput],
        *,
        heatmaps: bool = False,
        keep_image: bool = False,
        batch_size: int = 16,
    ) -> list[Judgement]:
        """One judgement per input, in order.

        ``heatmaps`` computes every finding's map in the same forward pass as the scores;
        ``keep_image`` keeps the decoded image for display, an ineligible one's too, so that a
        person sees what was refused.
        """
        size = max(1, batch_size)
        chunks = [inputs[i : i + size] for i in range(0, len(inputs), size)]

        def prepare(chunk: Sequence[ImageInput]) -> list[tuple[Judgement, np.ndarray | None]]:
            return [self.prepare(item, keep_image) for item in chunk]

        out: list[Judgement] = []
        if len(chunks) <= 1:  # nothing to overlap
            for chunk in chunks:
                prepared = prepare(chunk)
                self._forward(prepared, heatmaps)
                out += [j for j, _ in prepared]
            return out
        # Decode the next chunk while the model runs on this one: decoders and the model both
        # release the GIL, so on two cores the slower of the two sets the pace, not their sum.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-ahead") as pool:
            pending = pool.submit(prepare, chunks[0])
            for k in range(len(chunks)):
                prepared = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(prepare, chunks[k + 1])
                self._forward(prepared, heatmaps)
                out += [j for j, _ in prepared]
        return out

    def _forward(self, prepared: list[tuple[Judgement, np.ndarray | None]], heatmaps: bool) -> None:
        """One forward pass over the prepared images that have a tensor; fills their scores."""
        ready = [(j, t) for j, t in prepared if t is not None]
        if not ready:
            return
        findings = list(self.model.card.findings)
        x = np.stack([t for _, t in ready])
        t0 = time.perf_counter()
        if heatmaps:
            maps, probs = self.model.heatmaps(x, findings)
        else:
            maps, probs = None, self.model.predict_tensors(x, len(ready))
        self.forward_s += time.perf_counter() - t0
        for i, (j, _) in enumerate(ready):
            j.scores = {f: float(probs[i][k]) for k, f in enumerate(findings)}
            j.flags = flags_for(j.scores, j.thresholds)
            j.heatmaps = None if maps is None else maps[i]

    def priority_of(self, judgement: Judgement) -> tuple[str, str]:
        """(level name, reason) the worker would give a study of this one image."""
        d = self.decide([judgement.as_outcome()])
        return Level(d.priority).name.lower(), d.priority_reason

    def decide(self, outcomes: Sequence[InstanceOutcome]) -> Decision:
        """A study's state and priority from its images' outcomes, at this site.

        Each outcome is judged at the thresholds it carries (its operating point's), with the
        steering findings of that point; an outcome without thresholds at the adult point.
        For one image this is the priority the worker would give a study of that image alone.
        """
        return decide(outcomes, self.points[ADULT], self.settings.triage, self.steering[ADULT], self.steering)

    def prepare(self, item: ImageInput, keep_image: bool = False) -> tuple[Judgement, np.ndarray | None]:
        """The judgement before the model (eligibility, operating point, thresholds), and the
        tensor to score (None when there is nothing to score: failed or ineligible).

        A DICOM is judged by its header before any pixel is decoded; a PNG or JPEG only after,
        by its pixels.  An ineligible DICOM is decoded only when its image is to be shown, and
        then a decoding failure leaves it ineligible (its reason is the answer), not failed.
        """
        try:
            read = _read(item.source, self.settings.pixels.max_pixel_bytes)
        except _Unreadable as exc:
            return Judgement(item.key, FAILED, False, exc.reason, "unknown", failed_at="read"), None
        elig = check_eligibility(read.header, self.settings.eligibility)
        point = decide_population(read.header)
        j = Judgement(
            key=item.key,
            outcome=SCORED if elig.eligible else INELIGIBLE,
            eligible=bool(elig.eligible),
            reason=elig.reason,
            kind=read.kind,
            notes=[*elig.flags, point.note],
            population=point.population,
            thresholds=at_point(self.points, point.population),
            steering=self.steering.get(point.population, self.steering[ADULT]),
        )
        if not elig.eligible and not keep_image:
            return j, None
        try:
            # Only what the model needs (JPEG 2000 / JPEG at reduced resolution, dicom_io.reduced),
            # the same for every caller so that every caller gets the same scores.
            need = model_decode_size(self.model.input_size)
            image = load_image(read.pixels, self.settings.pixels, at_least=need)
            if read.header is None:
                scope = check_image_scope(image.pixels, self.settings.eligibility.headerless, image.full_shape)
                if not scope.eligible:
                    j = replace(j, outcome=INELIGIBLE, eligible=False, reason=scope.reason)
            tensor = to_model_tensor(image, size=self.model.input_size) if j.eligible else None
            if keep_image and image.pixels.shape[:2] != image.full_shape:
                image = load_image(read.pixels, self.settings.pixels)  # shown to a person: in full
        except PixelError as exc:
            if not j.eligible:
                return j, None
            return replace(
                j, outcome=FAILED, eligible=False, reason=f"{type(exc).__name__}: {exc}", failed_at="pixels"
            ), None
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file is that file's problem
            if not j.eligible:
                return j, None
            reason = f"pixel data not decodable: {type(exc).__name__}"
            return replace(j, outcome=FAILED, eligible=False, reason=reason, failed_at="pixels"), None
        if keep_image:
            j.image = image
        return j, tensor
