"""Adult and paediatric operating points: the population from real DICOM headers, in predict and the worker.

Headers are real files (SIIM CR, pydicom-data RG1) with their age fields rewritten, read back
with pydicom exactly as the worker and ``predict`` read them.  The model is the shipped one,
copied with a card whose paediatric and adult thresholds lie on either side of the real
score, so the same pixels flag at one operating point and not at the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from models.card import ModelCard
from models.findings import FINDING_NAMES
from models.operating_points import (
    ADULT,
    ADULT_AGE_YEARS,
    PAEDIATRIC,
    PopulationDecision,
    decide_population,
    parse_age_string,
    population_from_header,
)
from models.registry import DEFAULT_MODEL_DIR, TriageModel
from settings import Settings
from tests.conftest import pydicom_data_file, shared_file
from triage.operating import operating_points
from triage.policy import Level, flags_for
from triage.service import ImageInput, Scorer
from worker.scoring import PendingInstance, StudyWork, decide_study, run_pipeline
from xray_triage.cli import main
from xray_triage.predict import judge_files, predict_record

KEYS = {"path", "eligible", "reason", "scores", "flags", "model", "priority", "priority_reason"}
SIIM = ("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
DATE_KEYWORDS = ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")


def _siim() -> Dataset:
    return pydicom.dcmread(shared_file(*SIIM))


def _rg1() -> Dataset:
    return pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def _with(ds: Dataset, **values: str | None) -> Dataset:
    """Set (or, with None, delete) header elements by keyword."""
    for keyword, value in values.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _no_dates(ds: Dataset) -> Dataset:
    return _with(ds, **dict.fromkeys(DATE_KEYWORDS))


def _saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path)
    return path


# --------------------------------------------------------------------------- the header rule


@pytest.mark.parametrize(
    ("age", "population"),
    [
        ("006Y", PAEDIATRIC),
        ("018M", PAEDIATRIC),
        ("003W", PAEDIATRIC),
        ("010D", PAEDIATRIC),
        ("000Y", PAEDIATRIC),
        ("017Y", PAEDIATRIC),  # the last paediatric year
        ("018Y", ADULT),  # 18 is adult
        ("215M", PAEDIATRIC),
        ("216M", ADULT),  # 18 years in months
        ("939W", PAEDIATRIC),
        ("940W", ADULT),
        ("045Y", ADULT),
        ("090Y", ADULT),
    ],
)
@pytest.mark.parametrize("reader", [_siim, _rg1], ids=["siim", "rg1"])
def test_patients_age_decides_on_real_headers(reader, age, population, tmp_path) -> None:
    ds = _with(reader(), PatientAge=age)
    decision = decide_population(ds)
    assert decision == PopulationDecision(population, f"Patient's Age {age}")
    assert population_from_header(ds) == population
    # The same through a file written and read back, as the worker reads the spool.
    reread = pydicom.dcmread(_saved(ds, tmp_path / "x.dcm"))
    assert decide_population(reread) == decision


def test_patients_age_wins_over_the_birth_date() -> None:
    ds = _with(_rg1(), PatientAge="045Y", PatientBirthDate="20150301", StudyDate="20210615")
    assert decide_population(ds) == PopulationDecision(ADULT, "Patient's Age 045Y")
    ds = _with(_rg1(), PatientAge="006Y")  # RG1's own birth date makes the patient 64
    assert decide_population(ds).population == PAEDIATRIC


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # pydicom warns when writing them: on purpose here
@pytest.mark.parametrize("age", ["abc", "12", "6Y", "06Y", "0006Y", "006y", "006X", "-06Y", "6.5Y", "006Y\\007Y"])
def test_malformed_ages_are_unknown_and_unknown_is_adult(age, tmp_path) -> None:
    ds = _no_dates(_with(_siim(), PatientAge=age))
    ds = pydicom.dcmread(_saved(ds, tmp_path / "x.dcm"))
    decision = decide_population(ds)
    assert decision.population == ADULT
    assert decision.reason == "malformed Patient's Age; no birth date: adult operating point"
    assert parse_age_string(ds.get("PatientAge")) is None


def test_empty_or_missing_age_without_dates_is_adult(tmp_path) -> None:
    for value in ("", None):
        ds = _no_dates(_with(_siim(), PatientAge=value))
        ds = pydicom.dcmread(_saved(ds, tmp_path / "x.dcm"))
        assert decide_population(ds) == PopulationDecision(ADULT, "no age in header: adult operating point")


def test_the_real_headers_as_shipped() -> None:
    # SIIM stores its age as "62": not a DICOM age string, so it is unknown, hence adult.
    siim = decide_population(_siim())
    assert siim == PopulationDecision(ADULT, "malformed Patient's Age; no birth date: adult operating point")
    # RG1 has no age, but a birth date (1940) and a study date (2004).
    rg1 = decide_population(_rg1())
    assert rg1 == PopulationDecision(ADULT, "age 64 years from Patient's Birth Date and Study Date")
    assert decide_population(None) == PopulationDecision(ADULT, "no DICOM header: adult operating point")
    assert decide_population(None).note == "operating point: adult (no DICOM header: adult operating point)"


@pytest.mark.parametrize(
    ("birth", "study", "population", "years"),
    [
        ("20150301", "20210615", PAEDIATRIC, 6),
        ("19400305", "20040826", ADULT, 64),
        ("20000615", "20180614", PAEDIATRIC, 17),  # the day before the 18th birthday
        ("20000615", "20180615", ADULT, 18),  # the birthday itself
        ("20040229", "20220228", PAEDIATRIC, 17),  # born on 29 February
        ("20040229", "20220301", ADULT, 18),
        ("20210101", "20210101", PAEDIATRIC, 0),
    ],
)
def test_birth_date_and_study_date_without_age(birth, study, population, years, tmp_path) -> None:
    ds = _with(_rg1(), PatientAge=None, PatientBirthDate=birth, StudyDate=study)
    ds = pydicom.dcmread(_saved(ds, tmp_path / "x.dcm"))
    assert decide_population(ds) == PopulationDecision(
        population, f"age {years} years from Patient's Birth Date and Study Date"
    )
    assert (years < ADULT_AGE_YEARS) == (population == PAEDIATRIC)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_malformed_age_falls_back_to_the_birth_date() -> None:
    ds = _with(_rg1(), PatientAge="12", PatientBirthDate="20150301", StudyDate="20210615")
    decision = decide_population(ds)
    assert decision.population == PAEDIATRIC
    assert decision.reason == "malformed Patient's Age; age 6 years from Patient's Birth Date and Study Date"


@pytest.mark.parametrize(
    ("keyword", "words"),
    [("SeriesDate", "Series Date"), ("AcquisitionDate", "Acquisition Date"), ("ContentDate", "Content Date")],
)
def test_study_date_falls_back_to_series_acquisition_content_date(keyword, words) -> None:
    ds = _with(_no_dates(_rg1()), PatientAge=None, PatientBirthDate="20150301", **{keyword: "20210615"})
    assert decide_population(ds) == PopulationDecision(PAEDIATRIC, f"age 6 years from Patient's Birth Date and {words}")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")  # written malformed on purpose
@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"PatientBirthDate": "1940-03-05"}, "malformed Patient's Birth Date: adult operating point"),
        ({"PatientBirthDate": "20151301"}, "malformed Patient's Birth Date: adult operating point"),
        ({"PatientBirthDate": "abc"}, "malformed Patient's Birth Date: adult operating point"),
        ({"PatientBirthDate": "20150301", "StudyDate": "2021"}, "malformed Study Date: adult operating point"),
        ({"PatientBirthDate": "20150301", "StudyDate": "20210231"}, "malformed Study Date: adult operating point"),
        (
            {"PatientBirthDate": "20150301", "StudyDate": "20100101"},
            "Study Date before birth date: adult operating point",
        ),
        (
            {
                "PatientBirthDate": "20150301",
                "StudyDate": None,
                "SeriesDate": None,
                "AcquisitionDate": None,
                "ContentDate": None,
            },
            "birth date but no study date: adult operating point",
        ),
        ({"PatientBirthDate": ""}, "no age in header: adult operating point"),
    ],
)
def test_malformed_or_missing_dates_are_adult(values, reason, tmp_path) -> None:
    ds = _with(_rg1(), PatientAge=None, **values)
    ds = pydicom.dcmread(_saved(ds, tmp_path / "x.dcm"))
    assert decide_population(ds) == PopulationDecision(ADULT, reason)


def test_dates_converted_by_pydicom_are_read_too() -> None:
    """Sites may turn on pydicom's date conversion; DA values then arrive as ``date`` objects."""
    path = pydicom_data_file("RG1_UNCR.dcm")
    old = pydicom.config.datetime_conversion
    pydicom.config.datetime_conversion = True
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ds.PatientBirthDate = "20150301"
        ds.StudyDate = "20210615"
        assert not isinstance(ds.StudyDate, str)
        assert decide_population(ds).population == PAEDIATRIC
    finally:
        pydicom.config.datetime_conversion = old


def test_a_header_that_cannot_be_read_is_adult_and_never_raises() -> None:
    class Hostile:
        def get(self, keyword: str) -> object:
            raise ValueError(f"cannot convert {keyword}")

    assert decide_population(Hostile()) == PopulationDecision(
        ADULT, "malformed Patient's Age; malformed Patient's Birth Date: adult operating point"
    )
    assert decide_population({"PatientAge": b"\xff\xfe6Y"}).population == ADULT
    assert decide_population({"PatientAge": 6}).population == ADULT  # not a string: not an AS value


# --------------------------------------------------------------------------- the card and the model


def _card_with_points(paediatric: dict[str, float], adult: dict[str, float]) -> ModelCard:
    card = ModelCard.load(DEFAULT_MODEL_DIR / "card.json")
    card.thresholds = dict(adult)
    card.thresholds_by_population = {PAEDIATRIC: dict(paediatric)}
    return card


def test_old_cards_load_and_judge_every_population_at_the_default_point(tmp_path) -> None:
    raw = json.loads((DEFAULT_MODEL_DIR / "card.json").read_text())
    for newer in ("thresholds_by_population", "steering_evidence"):  # a card written before these
        raw.pop(newer, None)
    (tmp_path / "card.json").write_text(json.dumps(raw))
    card = ModelCard.load(tmp_path / "card.json")
    assert card.thresholds_by_population == {}
    model = TriageModel(None, card)
    assert model.thresholds(PAEDIATRIC) == model.thresholds(ADULT) == {f: raw["thresholds"][f] for f in FINDING_NAMES}
    assert model.threshold("pneumonia", PAEDIATRIC) == model.threshold("pneumonia") == raw["thresholds"]["pneumonia"]


def test_card_population_thresholds_round_trip_and_fall_back_per_finding(tmp_path) -> None:
    card = _card_with_points({"pneumonia": 0.7}, {"pneumonia": 0.4, "mass": 0.2, "covid19": 0.3})
    card.save(tmp_path)
    loaded = ModelCard.load(tmp_path)
    assert loaded.thresholds_by_population == {PAEDIATRIC: {"pneumonia": 0.7}}
    model = TriageModel(None, loaded)
    assert model.thresholds(PAEDIATRIC) == {"pneumonia": 0.7, "mass": 0.2, "covid19": 0.3}
    assert model.thresholds(ADULT) == {"pneumonia": 0.4, "mass": 0.2, "covid19": 0.3}
    assert model.thresholds("unknown") == model.thresholds(ADULT)
    assert flags_for({"pneumonia": 0.5}, model.thresholds(PAEDIATRIC)) == {"pneumonia": False}
    assert flags_for({"pneumonia": 0.5}, model.thresholds()) == {"pneumonia": True}


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def siim_scores() -> dict[str, float]:
    """The shipped model's real scores on the SIIM film (its pixels, whatever its header says)."""
    model = TriageModel.load(DEFAULT_MODEL_DIR)
    [result] = judge_files(Scorer(model, Settings()), [shared_file(*SIIM)])
    assert result.scores is not None and result.eligible
    return result.scores


def _model_dir(tmp_path: Path, scores: dict[str, float]) -> tuple[Path, dict[str, float], dict[str, float]]:
    """models/default copied, its card's points on either side of every real score."""
    usable = {f: s for f, s in scores.items() if 0.0 < s < 1.0}
    assert set(usable) == set(FINDING_NAMES), scores  # a saturated score could not sit between two points
    paediatric = {f: s / 2 for f, s in usable.items()}  # below the score: flagged
    adult = {f: (1 + s) / 2 for f, s in usable.items()}  # above the score: not flagged
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy2(DEFAULT_MODEL_DIR / "model.keras", folder / "model.keras")
    card = json.loads((DEFAULT_MODEL_DIR / "card.json").read_text())
    card["thresholds"] = adult
    card["thresholds_by_population"] = {PAEDIATRIC: paediatric}
    # strong evidence everywhere, so these tests see the thresholds alone (steering: test_triage)
    strong = {"comparison": "test", "auc": 0.9, "auc_ci95": [0.85, 0.95], "n_pos": 50, "n_neg": 50}
    card["steering_evidence"] = {pop: dict.fromkeys(FINDING_NAMES, strong) for pop in (ADULT, PAEDIATRIC)}
    for op in (card["validation_metrics"].get("overall") or {}).values():
        op.setdefault("operating_point", {})["specificity"] = 0.9
    (folder / "card.json").write_text(json.dumps(card))
    return folder, paediatric, adult


def test_predict_flags_children_and_adults_at_their_own_points(siim_scores, tmp_path, capsys) -> None:
    folder, _paediatric, _adult = _model_dir(tmp_path, siim_scores)
    child = _saved(_no_dates(_with(_siim(), PatientAge="006Y")), tmp_path / "child.dcm")
    grown = _saved(_no_dates(_with(_siim(), PatientAge="045Y")), tmp_path / "adult.dcm")
    born = _saved(
        _with(_siim(), PatientAge=None, PatientBirthDate="20150301", StudyDate="20210615"), tmp_path / "born.dcm"
    )
    jpeg = shared_file("kermany", "train", "NORMAL", "IM-0115-0001.jpeg")  # a child's film, but no header
    rc = main(["predict", "--json", "--model", str(folder), str(child), str(grown), str(born), str(jpeg)])
    assert rc == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"child.dcm", "adult.dcm", "born.dcm", jpeg.name}
    for r in rows.values():
        assert set(r) == KEYS  # the interface is unchanged: no new key
        assert set(r["flags"]) == {*FINDING_NAMES, "notes", "disclaimer"}
        assert all(isinstance(n, str) for n in r["flags"]["notes"])
    for name in ("child.dcm", "adult.dcm", "born.dcm"):
        assert rows[name]["eligible"] is True
        assert rows[name]["scores"] == pytest.approx(siim_scores, abs=1e-5)  # same pixels, same scores
    assert all(rows["child.dcm"]["flags"][f] is True for f in FINDING_NAMES)
    assert all(rows["born.dcm"]["flags"][f] is True for f in FINDING_NAMES)
    assert not any(rows["adult.dcm"]["flags"][f] for f in FINDING_NAMES)
    assert rows["child.dcm"]["flags"]["notes"][-1] == "operating point: paediatric (Patient's Age 006Y)"
    assert rows["adult.dcm"]["flags"]["notes"][-1] == "operating point: adult (Patient's Age 045Y)"
    assert rows["born.dcm"]["flags"]["notes"][-1] == (
        "operating point: paediatric (age 6 years from Patient's Birth Date and Study Date)"
    )
    assert rows[jpeg.name]["flags"]["notes"][-1] == "operating point: adult (no DICOM header: adult operating point)"


def test_judgement_keeps_the_population_beside_the_json(siim_scores, tmp_path) -> None:
    folder, paediatric, adult = _model_dir(tmp_path, siim_scores)
    model = TriageModel.load(folder)
    child = _saved(_no_dates(_with(_siim(), PatientAge="003W")), tmp_path / "child.dcm")
    [r] = judge_files(Scorer(model, Settings()), [child])
    assert r.population == PAEDIATRIC and "population" not in predict_record(r, model.ref)
    assert model.thresholds(PAEDIATRIC) == pytest.approx(paediatric)
    assert model.thresholds(ADULT) == pytest.approx(adult)


# --------------------------------------------------------------------------- the worker


def _settings(tmp_path: Path, **triage: object) -> Settings:
    return Settings.model_validate(
        {
            "storage": {"spool_dir": str(tmp_path / "spool")},
            "worker": {"heatmap_dir": str(tmp_path / "heatmaps")},
            "triage": triage,
        }
    )


def _spool(tmp_path: Path, name: str, ds: Dataset) -> PendingInstance:
    from db.models import utcnow

    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    _saved(ds, spool / name)
    n = len(list(spool.iterdir()))
    return PendingInstance(n, f"{ds.SOPInstanceUID}.{n}", name, utcnow())  # one heatmap path per instance


def test_worker_picks_each_instances_thresholds_from_its_header_with_site_overrides_on_top(tmp_path) -> None:
    card = _card_with_points(
        {"pneumonia": 0.8, "mass": 0.6, "covid19": 0.7}, {"pneumonia": 0.5, "mass": 0.1, "covid19": 0.3}
    )
    model = TriageModel(None, card)
    settings = _settings(tmp_path, thresholds={"mass": 0.45})  # a site override wins for every population
    points = operating_points(model, settings)
    assert points == {
        ADULT: {"pneumonia": 0.5, "mass": 0.45, "covid19": 0.3},
        PAEDIATRIC: {"pneumonia": 0.8, "mass": 0.45, "covid19": 0.7},
    }
    scorer = Scorer(model, settings)
    assert scorer.points == points

    def prepared(name: str, ds: Dataset) -> tuple:
        _spool(tmp_path, name, ds)
        return scorer.prepare(ImageInput(name, tmp_path / "spool" / name))

    child = prepared("child.dcm", _with(_siim(), PatientAge="010D"))
    grown = prepared("adult.dcm", _with(_siim(), PatientAge="045Y"))
    unknown = prepared("siim.dcm", _siim())  # "62": malformed
    for judged, tensor in (child, grown, unknown):
        assert judged.outcome == "scored" and tensor is not None and tensor.shape == (224, 224, 1)
    assert child[0].population == PAEDIATRIC
    assert child[0].notes[-1] == "operating point: paediatric (Patient's Age 010D)"
    assert child[0].thresholds == points[PAEDIATRIC]
    assert grown[0].thresholds == points[ADULT]
    assert unknown[0].thresholds == points[ADULT]
    # An ineligible instance has an outcome and nothing to score: it is never flagged.
    animal = pydicom.dcmread(shared_file("dicom", "dx_for_presentation_animal_lateral.dcm"))
    ineligible, tensor = prepared("animal.dcm", animal)
    assert ineligible.outcome == "ineligible" and tensor is None and ineligible.flags == {}


def test_worker_pipeline_flags_stores_and_decides_each_instance_at_its_own_point(siim_scores, tmp_path) -> None:
    folder, paediatric, adult = _model_dir(tmp_path, siim_scores)
    model = TriageModel.load(folder)
    settings = _settings(tmp_path)
    child = _spool(tmp_path, "child.dcm", _with(_siim(), PatientAge="006Y"))
    grown = _spool(tmp_path, "adult.dcm", _with(_siim(), PatientAge="045Y"))
    scorer = Scorer(model, settings)
    rows, _ = run_pipeline(scorer, StudyWork(1, "1.2.826.0.1.3", None, [child, grown], []), settings)
    by_uid = {r.instance.sop_instance_uid: r for r in rows}
    c, a = by_uid[child.sop_instance_uid], by_uid[grown.sop_instance_uid]
    assert c.thresholds == pytest.approx(paediatric) and a.thresholds == pytest.approx(adult)
    assert c.outcome.thresholds == c.thresholds and a.outcome.thresholds == a.thresholds  # what decide sees
    assert c.flags == dict.fromkeys(FINDING_NAMES, True) and a.flags == dict.fromkeys(FINDING_NAMES, False)
    assert set(c.heatmaps or {}) == set(FINDING_NAMES) and a.heatmaps == {}  # heatmaps follow the flags
    assert all(Path(p).is_file() for p in (c.heatmaps or {}).values())

    assert (c.outcome.population, a.outcome.population) == (PAEDIATRIC, ADULT)  # stored with the result
    decision = decide_study(StudyWork(1, "1.2.826.0.1.3", None, [], []), rows, scorer)
    assert decision.flagged_findings == ",pneumonia,mass,covid19,"  # the child's film, at its point
    assert decision.ai_priority in (Level.URGENT, Level.CRITICAL)
    s, t = siim_scores["pneumonia"], paediatric["pneumonia"]
    assert f"pneumonia {s:.2f} ≥ {t:.2f}" in decision.priority_reason
    # The adult's film alone, at the adult point, flags nothing and stays routine.
    alone = decide_study(StudyWork(1, "1.2.826.0.1.3", None, [], []), [a], scorer)
    assert alone.ai_priority == Level.ROUTINE and alone.flagged_findings is None
    # A redelivery judges an already stored instance at the thresholds stored with it.
    redelivered = decide_study(StudyWork(1, "1.2.826.0.1.3", None, [], [c.outcome]), [a], scorer)
    assert redelivered == decision
