"""What every DICOM object we write shares: deterministic UIDs, the algorithm's identity, the
"not for diagnostic use" wording, and the Contributing Equipment item IHE AI Results asks for.

The object builders (``dicom_io.sr``, ``dicom_io.sc``) take plain data from here and from the
caller; nothing in this room knows about models, the database or the queue.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

# The wording a person sees wherever our results appear (SR text, Series Description, banners).
DISCLAIMER = "Decision support – not for diagnostic use"
MANUFACTURER = "xray-triage"
# IHE AI Results: the algorithm that made the object, in the Contributing Equipment Sequence.
# highdicom's ContributingEquipment accepts DCM purposes only, so the item is built here.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm", scheme_version="1630")


def derived_uid(*parts: str) -> str:
    """A ``2.25`` UID (PS3.5 B.2) from a SHA-256 of `parts`: the same inputs give the same UID.

    A retried or repeated export therefore sends the same instance again and the receiving
    PACS de-duplicates it; anything that changes an input (another model version, another
    set of source images) makes a new object.
    """
    digest = hashlib.sha256("\x1f".join(("xray-triage", *parts)).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class Algorithm:
    """The model that produced a result, as IHE AIR identifies an algorithm."""

    name: str
    version: str
    preprocessing_version: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def device_uid(self) -> str:
        """Device UID of the algorithm: changes whenever the model (or its preprocessing) changes."""
        return derived_uid("device", self.ref, self.preprocessing_version)

    @property
    def software_versions(self) -> list[str]:
        return [self.version, self.preprocessing_version]


def contributing_equipment(algorithm: Algorithm, when: datetime) -> Dataset:
    """One Contributing Equipment Sequence item naming the algorithm (purpose: Processing Algorithm)."""
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    purpose.CodingSchemeVersion = PROCESSING_ALGORITHM.scheme_version
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = algorithm.name[:64]
    item.SoftwareVersions = [v[:64] for v in algorithm.software_versions]
    item.DeviceUID = algorithm.device_uid
    item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S%z")
    item.ContributionDescription = f"AI triage; {DISCLAIMER}"[:1024]
    return item


_AGE = re.compile(r"\d{3}[DWMY]")


@contextmanager
def quiet_person_names() -> Iterator[None]:
    """highdicom warns about unusual person names by quoting them: patient data must not reach the logs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        yield


def drop_invalid_copies(ds: Dataset) -> None:
    """Remove values copied from the source that are invalid in our object (e.g. Patient's Age "62":
    AS needs "062Y"); they are optional here, and an invalid value would fail validation at the PACS."""
    age = ds.get("PatientAge")
    if age is not None and not _AGE.fullmatch(str(age)):
        del ds.PatientAge


def finish_derived(ds: Dataset, algorithm: Algorithm, when: datetime, series_description: str) -> None:
    """What every object we write carries besides its content.

    UTF-8 (our wording has an en dash; the source's Latin-1 or ASCII would turn it into "?"),
    dates from `when` (the stored result's time, so rebuilding an object gives the same
    content), the algorithm's software versions and its Contributing Equipment item.
    """
    drop_invalid_copies(ds)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = series_description[:64]
    day, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = day, time
    ds.SeriesDate, ds.SeriesTime = day, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = day, time
    ds.SoftwareVersions = algorithm.software_versions
    items = list(ds.get("ContributingEquipmentSequence", []))
    items.append(contributing_equipment(algorithm, when))
    ds.ContributingEquipmentSequence = items
