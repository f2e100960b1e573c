"""Filter step: frontal human chest radiographs are analysed, everything else is skipped with a reason."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from node.config import FilterSettings
from node.filter import RULES_FILE, Decision, FilterRules, FilterRulesError, decide, normalise

ANALYSE = FilterSettings()
SKIP = FilterSettings(no_view_policy="skip")


@pytest.fixture(scope="module")
def rules() -> FilterRules:
    return FilterRules.load(None)


def make_ds(modality: str = "CR", **attrs: object) -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"  # must never appear in a reason
    ds.PatientID = "PID-4711"
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def code_item(scheme: str, value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator, item.CodeValue, item.CodeMeaning = scheme, value, meaning
    return item


def check(decision: Decision, accepted: bool, *words: str) -> None:
    assert decision.accepted is accepted, decision.reason
    assert decision.reason.startswith("accepted: " if accepted else "skipped: "), decision.reason
    for word in words:
        assert word in decision.reason, decision.reason
    assert "Doe" not in decision.reason and "4711" not in decision.reason


# --- rules file -------------------------------------------------------------------------------


def test_bundled_rules_load(rules: FilterRules) -> None:
    assert rules.source == str(RULES_FILE)
    assert {r.kind for r in rules.views} >= {"frontal", "lateral", "oblique", "decubitus"}


def test_rules_errors_name_the_rule(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text(
        RULES_FILE.read_text(encoding="utf-8")
        + '\n[[view]]\nname = "sideways"\nkind = "lateral"\npatterns = ["LAT"]\n'
        + '\n[[view]]\nname = "broken"\nkind = "upside down"\npatterns = [\'^(LAT$\']\ncodes = ["SCT"]\n'
    )
    with pytest.raises(FilterRulesError) as info:
        FilterRules.load(bad)
    text = str(info.value)
    assert str(bad) in text
    assert "'sideways'" in text and "anchored with ^ and $, found 'LAT'" in text
    assert "'broken'" in text and "kind: expected one of" in text and "'upside down'" in text
    assert "invalid regular expression '^(LAT$'" in text
    assert "expected 'SCHEME VALUE' codes" in text and "'SCT'" in text


def test_rules_unknown_keyword_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text(RULES_FILE.read_text(encoding="utf-8").replace('"ProtocolName"', '"ProtocolNam"', 1))
    with pytest.raises(FilterRulesError, match="unknown keyword 'ProtocolNam'"):
        FilterRules.load(bad)
    with pytest.raises(FilterRulesError, match="file not found"):
        FilterRules.load(tmp_path / "absent.toml")


def test_normalise() -> None:
    assert normalise("  Tórax_lat ") == "TORAX LAT"
    assert normalise("view: PA") == "VIEW PA"
    assert normalise(["A", "P"]) == "A P"
    assert normalise(None) == ""


# --- modality, species ------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["CR", "DX", "DR", "RG"])
def test_modalities_accepted(rules: FilterRules, modality: str) -> None:
    check(decide(make_ds(modality, BodyPartExamined="CHEST", ViewPosition="PA"), ANALYSE, rules), True,
          modality)


@pytest.mark.parametrize("modality", ["CT", "MG", "US", "OT", ""])
def test_other_modalities_skipped(rules: FilterRules, modality: str) -> None:
    decision = decide(make_ds(modality, BodyPartExamined="CHEST", ViewPosition="PA"), ANALYSE, rules)
    check(decision, False, "modality", "one of CR, DX, DR, RG")


def test_modality_quoted_only_when_a_defined_term(rules: FilterRules) -> None:
    """A defined term (CT) helps the administrator; any other value is the sender's and is not echoed."""
    ct = decide(make_ds("CT", BodyPartExamined="CHEST", ViewPosition="PA"), ANALYSE, rules)
    assert ct == Decision(False, "skipped: modality CT is not one of CR, DX, DR, RG")
    made_up = decide(make_ds("ZQXMOD", BodyPartExamined="CHEST", ViewPosition="PA"), ANALYSE, rules)
    check(made_up, False, "modality is not a DICOM defined term")
    assert "ZQXMOD" not in made_up.reason


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, ("species is not human",)),
        ({"PatientSpeciesCodeSequence": [code_item("SCT", "448771007", "Canis lupus familiaris")]},
         ("not a human code (PatientSpeciesCodeSequence)",)),
        ({"PatientBreedDescription": "Beagle"}, ("breed",)),
        ({"PatientBreedCodeSequence": [code_item("SCT", "132592004", "Beagle dog breed")]}, ("breed",)),
        ({"AcquisitionDeviceProcessingDescription": "FELINE THORAX VD"}, ("FELINE",)),
        ({"StudyDescription": "Röntgen Thorax Hund"}, ("HUND", "StudyDescription")),
    ],
)
def test_non_human_never_analysed(rules: FilterRules, attrs: dict[str, object], words: tuple[str]) -> None:
    ds = make_ds(BodyPartExamined="CHEST", ViewPosition="PA", **attrs)
    check(decide(ds, ANALYSE, rules), False, *words)


@pytest.mark.parametrize("species", ["Homo sapiens", "HUMAN"])
def test_human_species_analysed(rules: FilterRules, species: str) -> None:
    ds = make_ds(BodyPartExamined="CHEST", ViewPosition="PA", PatientSpeciesDescription=species,
                 PatientSpeciesCodeSequence=[code_item("SCT", "337915000", "Homo sapiens")])
    check(decide(ds, ANALYSE, rules), True)


# --- body part --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # devices do send lower case, accents
@pytest.mark.parametrize(
    "body_part",
    ["CHEST", "THORAX", "TORAX", "TÓRAX", "THORAKS", "TORAKS", "TORACE", "POITRINE", "BRUST", "BRUSTKORB",
     "PECHO", "BORST", "LUNG", "LUNGS", "CHEST PA", "CHEST_PA", "chest", "Thorax ap", "ГРУДНАЯ КЛЕТКА"],
)
def test_chest_spellings(rules: FilterRules, body_part: str) -> None:
    check(decide(make_ds(BodyPartExamined=body_part, ViewPosition="PA"), ANALYSE, rules), True, "body part")


@pytest.mark.parametrize("body_part", ["HAND", "SKULL", "TSPINE", "THORACIC SPINE", "CHEST ABDOMEN", "RIBS",
                                       "ABDOMEN", "BREAST", "KNEE"])
def test_other_body_parts_skipped(rules: FilterRules, body_part: str) -> None:
    check(decide(make_ds(BodyPartExamined=body_part, ViewPosition="PA"), ANALYSE, rules), False,
          "BodyPartExamined")


@pytest.mark.parametrize(
    ("body_part", "reason"),
    [("HAND", "skipped: BodyPartExamined is not a chest body part"),
     ("KNEE ZQXBODY", "skipped: BodyPartExamined is not a chest body part"),
     ("THORACIC SPINE", "skipped: BodyPartExamined names SPINE, not chest"),
     ("CHEST ZQXBODY", "accepted: CR, body part CHEST, view PA")],
)
def test_body_part_reason_quotes_rule_terms_only(rules: FilterRules, body_part: str, reason: str) -> None:
    """Only a literal term of our rules is quoted; the rest of the sender's value never is."""
    assert decide(make_ds(BodyPartExamined=body_part, ViewPosition="PA"), ANALYSE, rules).reason == reason


@pytest.mark.parametrize(
    ("keyword", "text"),
    [("StudyDescription", "RX TÓRAX PA"), ("SeriesDescription", "Chest 1 view"),
     ("ProtocolName", "Thorax stehend"), ("AcquisitionDeviceProcessingDescription", "CHEST PA ADULT")],
)
def test_body_part_from_descriptions(rules: FilterRules, keyword: str, text: str) -> None:
    decision = decide(make_ds(ViewPosition="PA", **{keyword: text}), ANALYSE, rules)
    check(decision, True, f"({keyword})")


def test_description_names_other_body_part(rules: FilterRules) -> None:
    check(decide(make_ds(ViewPosition="PA", SeriesDescription="T-SPINE AP"), ANALYSE, rules), False,
          "SeriesDescription names SPINE, not chest")


def test_anatomic_region_codes(rules: FilterRules) -> None:
    chest = make_ds(ViewPosition="PA", AnatomicRegionSequence=[code_item("SCT", "51185008", "Chest")])
    check(decide(chest, ANALYSE, rules), True, "body part chest (SCT 51185008)")
    hand = make_ds(ViewPosition="PA", AnatomicRegionSequence=[code_item("SCT", "85562004", "Hand")])
    check(decide(hand, ANALYSE, rules), False, "AnatomicRegionSequence has no chest code")
    assert "Hand" not in decide(hand, ANALYSE, rules).reason and "85562004" not in decide(hand, ANALYSE, rules).reason


# --- view -------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("view", ["PA", "AP", "PA ERECT", "AP SUPINE", "AP PORTABLE", "pa", "P-A",
                                  "POSTERO-ANTERIOR", "FRONTAL"])
def test_frontal_view_positions(rules: FilterRules, view: str) -> None:
    check(decide(make_ds(BodyPartExamined="CHEST", ViewPosition=view), ANALYSE, rules), True, "view")


@pytest.mark.parametrize(
    ("view", "kind"),
    [("LL", "lateral"), ("RL", "lateral"), ("LATERAL", "lateral"), ("LAT", "lateral"), ("LLD", "decubitus"),
     ("RLD", "decubitus"), ("AP LLD", "decubitus"), ("LAO", "oblique"), ("RPO", "oblique"),
     ("OBLIQUE", "oblique"), ("LORDOTIC", "other")],
)
def test_non_frontal_view_positions(rules: FilterRules, view: str, kind: str) -> None:
    decision = decide(make_ds(BodyPartExamined="CHEST", ViewPosition=view), ANALYSE, rules)
    check(decision, False, f"is {kind}")


def test_lateral_reason_is_readable(rules: FilterRules) -> None:
    decision = decide(make_ds(BodyPartExamined="CHEST", ViewPosition="LL"), ANALYSE, rules)
    assert decision == Decision(False, "skipped: view LL is lateral")
    decision = decide(make_ds(BodyPartExamined="CHEST", ViewPosition="PA"), ANALYSE, rules)
    assert decision == Decision(True, "accepted: CR, body part CHEST, view PA")


def test_body_part_names_lateral(rules: FilterRules) -> None:
    check(decide(make_ds(BodyPartExamined="CHEST_LAT"), ANALYSE, rules), False, "LAT", "is lateral")


@pytest.mark.parametrize(
    ("code", "accepted", "words"),
    [(code_item("SCT", "272479007", "postero-anterior"), True, "view PA (SCT 272479007)"),
     (code_item("SCT", "399348003", "antero-posterior"), True, "(SCT 399348003)"),
     (code_item("SRT", "R-10214", "postero-anterior"), True, "(SRT R-10214)"),
     (code_item("SCT", "399173006", "left lateral"), False, "view lateral (SCT 399173006) is lateral"),
     (code_item("SCT", "399198007", "right lateral"), False, "is lateral"),
     (code_item("SRT", "R-10236", "left lateral"), False, "is lateral"),
     (code_item("SCT", "399135007", "left anterior oblique"), False, "is oblique"),
     (code_item("99LOCAL", "X1", "Postero-anterior ZQXVIEW"), True,
      "view POSTERO ANTERIOR (ViewCodeSequence CodeMeaning)")],
)
def test_view_code_sequence(rules: FilterRules, code: Dataset, accepted: bool, words: str) -> None:
    ds = make_ds(BodyPartExamined="CHEST", ViewCodeSequence=[code])
    check(decide(ds, SKIP, rules), accepted, words)
    assert "ZQXVIEW" not in decide(ds, SKIP, rules).reason and "99LOCAL" not in decide(ds, SKIP, rules).reason


def test_view_attributes_disagree(rules: FilterRules) -> None:
    ds = make_ds(BodyPartExamined="CHEST", ViewPosition="PA",
                 ViewCodeSequence=[code_item("SCT", "399173006", "left lateral")])
    check(decide(ds, ANALYSE, rules), False, "disagree", "view PA is frontal", "is lateral")


@pytest.mark.parametrize(
    ("keyword", "text", "accepted", "words"),
    [("AcquisitionDeviceProcessingDescription", "CHEST PA", True, "view PA (AcquisitionDeviceProcessing"),
     ("AcquisitionDeviceProcessingDescription", "THORAX LATERAL", False, "LATERAL"),
     ("SeriesDescription", "view: AP", True, "view AP (SeriesDescription)"),
     ("SeriesDescription", "Thorax seitlich", False, "SEITLICH"),
     ("SeriesDescription", "Tórax perfil", False, "PERFIL"),
     ("SeriesDescription", "Thorax de face", True, "FACE"),
     ("ProtocolName", "CHEST AP BEDSIDE", True, "view AP (ProtocolName)"),
     ("StudyDescription", "XR CHEST PA", True, "(StudyDescription)")],
)
def test_view_from_descriptions(
    rules: FilterRules, keyword: str, text: str, accepted: bool, words: str
) -> None:
    ds = make_ds(BodyPartExamined="CHEST", **{keyword: text})
    check(decide(ds, SKIP, rules), accepted, words)


def test_two_views_in_study_description_decide_nothing(rules: FilterRules) -> None:
    ds = make_ds(BodyPartExamined="CHEST", StudyDescription="CHEST PA AND LATERAL")
    check(decide(ds, SKIP, rules), False, "view not stated", "no_view_policy skip")
    ds.SeriesDescription = "LAT"
    check(decide(ds, ANALYSE, rules), False, "view LAT (SeriesDescription) is lateral")


def test_no_view_policy_both_ways(rules: FilterRules) -> None:
    ds = make_ds(BodyPartExamined="CHEST")
    check(decide(ds, ANALYSE, rules), True, "view not stated", "no_view_policy analyse")
    check(decide(ds, SKIP, rules), False, "view not stated", "no_view_policy skip")
    nothing = make_ds("DX")
    check(decide(nothing, ANALYSE, rules), True, "body part not stated")
    check(decide(nothing, SKIP, rules), False, "body part not stated")


def test_unrecognised_view_position_follows_policy(rules: FilterRules) -> None:
    ds = make_ds(BodyPartExamined="CHEST", ViewPosition="XYZ")
    check(decide(ds, ANALYSE, rules), True, "ViewPosition not recognised")
    check(decide(ds, SKIP, rules), False, "ViewPosition not recognised")
    assert "XYZ" not in decide(ds, SKIP, rules).reason


def test_view_reason_quotes_rule_terms_only(rules: FilterRules) -> None:
    """ViewPosition "LL ZQXVIEW" is lateral by the rule term LL; the rest of the value is not quoted."""
    ds = make_ds(BodyPartExamined="CHEST", ViewPosition="LL ZQXVIEW")
    assert decide(ds, ANALYSE, rules) == Decision(False, "skipped: view LL is lateral")
    ds = make_ds(BodyPartExamined="CHEST", ViewPosition="PA", SeriesDescription="ZQXVIEW LAT")
    assert decide(ds, ANALYSE, rules) == Decision(True, "accepted: CR, body part CHEST, view PA")


def test_rule_terms_are_the_literal_alternatives(tmp_path: Path) -> None:
    """A term matched by regex syntax (a wildcard) is the sender's text: the rule's name is shown instead."""
    text = RULES_FILE.read_text(encoding="utf-8").replace(
        "patterns = ['^(.* )?(?P<term>LAT|LATERAL|", "patterns = ['^(.* )?(?P<term>L.T|LATERAL|", 1)
    custom = tmp_path / "rules.toml"
    custom.write_text(text)
    rules = FilterRules.load(custom)
    lateral = next(r for r in rules.views if r.name == "lateral")
    assert "LATERAL" in lateral.terms and "LL" in lateral.terms and "L.T" not in lateral.terms
    assert lateral.match("CHEST LZT") == "lateral" and lateral.match("CHEST LL") == "LL"


# --- the real files ---------------------------------------------------------------------------


def read_real(data_dir: Path, name: str) -> Dataset:
    return pydicom.dcmread(data_dir / "dicom" / name, stop_before_pixels=True)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("name", "view"),
    [("rsna_cr_pa_jpeg_baseline.dcm", "view PA"), ("rsna_cr_pa_monochrome1_variant.dcm", "view PA"),
     ("rsna_cr_ap_jpeg_baseline.dcm", "view AP"), ("dx_pa_chest_j2k_lossless.dcm", "view PA"),
     ("cr_pa_chest_jpegls_near_lossless.dcm", "view PA")],
)
def test_real_frontal_files_accepted(data_dir: Path, rules: FilterRules, name: str, view: str) -> None:
    check(decide(read_real(data_dir, name), SKIP, rules), True, "body part CHEST", view)


@pytest.mark.shared_data
def test_real_canine_thorax_rejected(data_dir: Path, rules: FilterRules) -> None:
    ds = read_real(data_dir, "dx_thorax_canine_not_human.dcm")
    check(decide(ds, ANALYSE, rules), False, "non-human", "CANINE")
    assert "Dog" not in decide(ds, ANALYSE, rules).reason  # the file's PatientName is Dog^...


@pytest.mark.shared_data
def test_real_relabelled_lateral_rejected(data_dir: Path, rules: FilterRules) -> None:
    ds = read_real(data_dir, "rsna_cr_pa_jpeg_baseline.dcm")
    ds.ViewPosition = "LL"
    ds.SeriesDescription = "view: LL"
    check(decide(ds, ANALYSE, rules), False, "view LL is lateral")


@pytest.mark.shared_data
def test_real_no_view_file_follows_policy(data_dir: Path, rules: FilterRules) -> None:
    ds = read_real(data_dir, "cr_chest_monochrome1_jpeg_no_view_tags.dcm")
    check(decide(ds, ANALYSE, rules), True, "no_view_policy analyse")
    check(decide(ds, SKIP, rules), False, "no_view_policy skip")
