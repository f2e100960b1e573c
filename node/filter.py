"""Filter step: decide whether a received instance is a frontal human chest radiograph.

Every instance is stored; only those that pass are analysed. The rules are data
(``node/filter_rules.toml``, or ``settings.filter.rules_file``), validated when loaded. Each
:class:`Decision` carries a short reason that is stored, logged and shown by ``status``. A reason names
attributes by keyword and quotes only words from our own vocabularies: a literal term of a rule that
matched (``LL``, ``CHEST``), a rule's name, a code listed in the rules, a configured modality or a
DICOM defined term for Modality. A value as the sender wrote it is never quoted (a sender can put
anything, a patient's name or ID included, into BodyPartExamined or a code meaning).

Checks, in order: Modality -> species (Patient Species / Breed, animal words in descriptions) ->
body part (BodyPartExamined, Anatomic Region Sequence, then descriptions) -> view (ViewPosition and
View Code Sequence, then descriptions). An image whose body part or view is not stated at all
follows ``settings.no_view_policy``.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from node.config import ConfigError, FilterSettings, Settings

RULES_FILE = Path(__file__).with_name("filter_rules.toml")
FRONTAL = "frontal"
AMBIGUOUS = "ambiguous"
VIEW_KINDS = (FRONTAL, "lateral", "oblique", "decubitus", "other", AMBIGUOUS)
_NON_WORD = re.compile(r"[\W_]+")
_CODE_RE = re.compile(r"^[A-Za-z0-9_.-]+ [^ ]+$")
_LITERAL_TERM = re.compile(r"[^\W_]+( [^\W_]+)*")  # words and single spaces: no regex syntax
_TERM_GROUP = "(?P<term>"
# Modality defined terms (PS3.3 C.7.3.1.1.1, current and retired) and the common "DR": a Modality
# value outside the configured ones is quoted in a reason only when it is one of these.
MODALITY_TERMS = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DOC", "DX", "ECG", "EPS",
    "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO", "LEN", "LS", "MG", "MR",
    "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PLAN", "PR",
    "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD",
    "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR", "SRF", "STAIN", "TEXTUREMAP",
    "TG", "US", "VA", "XA", "XAPROTOCOL", "XC", "CD", "CF", "CP", "CS", "DD", "DF", "DM", "DS", "EC",
    "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF", "DR"
})


class FilterRulesError(ConfigError):
    """The filter rules file is invalid; ``problems`` names each rule with what was expected and found."""


@dataclass(frozen=True)
class Decision:
    """Whether an instance is analysed, and why (human-readable, stored with the instance)."""

    accepted: bool
    reason: str


@dataclass(frozen=True)
class Rule:
    """Named anchored patterns (matched on normalised text) and codes ("SCHEME VALUE") of one kind."""

    name: str
    kind: str
    patterns: tuple[re.Pattern[str], ...] = ()
    codes: frozenset[str] = frozenset()

    @cached_property
    def terms(self) -> frozenset[str]:
        """The literal alternatives of the patterns' ``term`` groups: the words a reason may quote."""
        return frozenset(t for p in self.patterns for t in literal_terms(p.pattern))

    def match(self, text: str) -> str | None:
        """What a reason says when a pattern matches ``text``, None when none does.

        The matched ``term`` when it is one of the rule's literal terms (a word of our rules file),
        else the rule's name: text matched by a wildcard is the sender's, never quoted.
        """
        for pattern in self.patterns:
            m = pattern.match(text)
            if m:
                term = m.groupdict().get("term")
                return term if term and term in self.terms else self.name
        return None


def literal_terms(pattern: str) -> list[str]:
    """The literal alternatives of the ``(?P<term>...)`` group of a pattern's source ("LL", "CHEST").

    Alternatives holding any regex syntax are left out: only words written in the rules file count.
    """
    start = pattern.find(_TERM_GROUP)
    if start < 0:
        return []
    depth, i, begin = 0, start + len(_TERM_GROUP), start + len(_TERM_GROUP)
    alternatives: list[str] = []
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif c == ")" or (c == "|" and not depth):
            alternatives.append(pattern[begin:i])
            begin = i + 1
            if c == ")":
                break
        i += 1
    return [a for a in alternatives if _LITERAL_TERM.fullmatch(a)]


@dataclass(frozen=True)
class FilterRules:
    """The validated contents of a filter rules file (see ``node/filter_rules.toml``)."""

    source: str
    species_text: tuple[str, ...]
    body_part_text: tuple[str, ...]
    view_text: tuple[str, ...]
    human: Rule  # species descriptions and codes meaning human
    non_human_text: Rule
    chest: Rule  # BodyPartExamined patterns and Anatomic Region codes
    chest_text: Rule
    not_chest: Rule
    views: tuple[Rule, ...]

    @classmethod
    def load(cls, path: str | Path | None = None) -> FilterRules:
        """Read and validate a rules file; None (or "") means the bundled ``node/filter_rules.toml``.

        Raises:
            FilterRulesError: naming the file and every invalid rule, the expected form and what was found.
        """
        p = Path(path) if path else RULES_FILE
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FilterRulesError([f"file not found: {p}"], f"filter rules {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise FilterRulesError([f"TOML syntax: {exc}"], f"filter rules {p}") from exc
        return _parse_rules(raw, str(p))

    @classmethod
    def for_settings(cls, settings: Settings) -> FilterRules:
        """The rules ``[filter] rules_file`` names (relative to the configuration's folder), or the bundled ones."""
        rules_file = settings.filter.rules_file
        return cls.load(settings.resolve(rules_file) if rules_file else None)


# --- loading and validation -------------------------------------------------------------------


def _check_keys(where: str, table: dict[str, Any], allowed: Iterable[str], problems: list[str]) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            problems.append(f"{where}.{key}: unknown key (expected one of {', '.join(allowed)})")


def _string_list(where: str, value: Any, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where}: expected a list of strings, found {value!r}")
        return []
    return value


def _patterns(where: str, value: Any, problems: list[str]) -> tuple[re.Pattern[str], ...]:
    out = []
    for text in _string_list(where, value, problems):
        if not (text.startswith("^") and text.endswith("$") and not text.endswith("\\$")):
            problems.append(f"{where}: expected a pattern anchored with ^ and $, found {text!r}")
            continue
        try:
            out.append(re.compile(text))
        except re.error as exc:
            problems.append(f"{where}: invalid regular expression {text!r} ({exc})")
    return tuple(out)


def _codes(where: str, value: Any, problems: list[str]) -> frozenset[str]:
    codes = _string_list(where, value, problems)
    for code in codes:
        if not _CODE_RE.match(code):
            problems.append(f"{where}: expected 'SCHEME VALUE' codes (e.g. 'SCT 272479007'), found {code!r}")
    return frozenset(c for c in codes if _CODE_RE.match(c))


def _keywords(where: str, value: Any, problems: list[str]) -> tuple[str, ...]:
    keywords = _string_list(where, value, problems)
    for kw in keywords:
        if tag_for_keyword(kw) is None:
            problems.append(f"{where}: expected DICOM keywords, found unknown keyword {kw!r}")
    return tuple(kw for kw in keywords if tag_for_keyword(kw) is not None)


def _table(where: str, raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    value = raw.get(where, {})
    if not isinstance(value, dict):
        problems.append(f"[{where}]: expected a table, found {value!r}")
        return {}
    return value


def _view_rules(raw: Any, problems: list[str]) -> tuple[Rule, ...]:
    if not isinstance(raw, list) or not raw:
        problems.append(f"[[view]]: expected at least one view rule, found {raw!r}")
        return ()
    rules: list[Rule] = []
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        where = f"view rule {i + 1} ({name!r})"
        if not isinstance(item, dict) or not isinstance(name, str) or not name.strip():
            problems.append(f"{where}: expected a table with a non-empty name, found {item!r}")
            continue
        _check_keys(where, item, ("name", "kind", "patterns", "codes"), problems)
        if any(r.name == name for r in rules):
            problems.append(f"{where}: name is used by an earlier view rule")
        kind = item.get("kind")
        if kind not in VIEW_KINDS:
            problems.append(f"{where}.kind: expected one of {', '.join(VIEW_KINDS)}, found {kind!r}")
        patterns = _patterns(f"{where}.patterns", item.get("patterns"), problems)
        codes = _codes(f"{where}.codes", item.get("codes"), problems)
        if not patterns and not codes:
            problems.append(f"{where}: expected patterns or codes, found neither")
        rules.append(Rule(name, str(kind), patterns, codes))
    return tuple(rules)


def _parse_rules(raw: dict[str, Any], source: str) -> FilterRules:
    """Validate the parsed TOML; collect every problem before raising."""
    problems: list[str] = []
    _check_keys("rules", raw, ("sources", "species", "body_part", "view"), problems)
    src = _table("sources", raw, problems)
    species = _table("species", raw, problems)
    body = _table("body_part", raw, problems)
    _check_keys("sources", src, ("species_text", "body_part_text", "view_text"), problems)
    _check_keys("species", species, ("human_descriptions", "human_codes", "non_human_text"), problems)
    _check_keys("body_part", body, ("chest", "chest_text", "not_chest", "chest_codes"), problems)
    rules = FilterRules(
        source=source,
        species_text=_keywords("sources.species_text", src.get("species_text"), problems),
        body_part_text=_keywords("sources.body_part_text", src.get("body_part_text"), problems),
        view_text=_keywords("sources.view_text", src.get("view_text"), problems),
        human=Rule("human", "human",
                   _patterns("species.human_descriptions", species.get("human_descriptions"), problems),
                   _codes("species.human_codes", species.get("human_codes"), problems)),
        non_human_text=Rule("animal", "non-human",
                            _patterns("species.non_human_text", species.get("non_human_text"), problems)),
        chest=Rule("chest", "chest", _patterns("body_part.chest", body.get("chest"), problems),
                   _codes("body_part.chest_codes", body.get("chest_codes"), problems)),
        chest_text=Rule("chest", "chest",
                        _patterns("body_part.chest_text", body.get("chest_text"), problems)),
        not_chest=Rule("not chest", "not chest",
                       _patterns("body_part.not_chest", body.get("not_chest"), problems)),
        views=_view_rules(raw.get("view"), problems),
    )
    if not rules.chest.patterns:
        problems.append("body_part.chest: expected at least one pattern, found none")
    if problems:
        raise FilterRulesError(problems, f"filter rules {source}")
    return rules


# --- reading the dataset ----------------------------------------------------------------------


def normalise(value: Any) -> str:
    """Upper case, accents removed, every run of non-letters/digits one space (how rules see values)."""
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = " ".join(str(v) for v in value)
    text = unicodedata.normalize("NFKD", str(value))
    text = "".join(c for c in text if not unicodedata.combining(c)).upper()
    return _NON_WORD.sub(" ", text).strip()


def _text(ds: Dataset, keyword: str) -> str:
    return normalise(ds.get(keyword))


def _codes_of(ds: Dataset, keyword: str) -> list[tuple[str, str]]:
    """("SCHEME VALUE", Code Meaning) for each item of a code sequence; [] when absent or empty."""
    out = []
    for item in ds.get(keyword) or []:
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
        value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "").strip()
        if scheme or value:
            out.append((f"{scheme} {value}", str(item.get("CodeMeaning", "") or "").strip()))
    return out


# --- the decision -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Evidence:
    """What one source says: ``kind`` (a view kind, "chest", "not chest", "conflict") and a label."""

    kind: str
    label: str


def _non_human(ds: Dataset, rules: FilterRules) -> str | None:
    """Why the patient is not human, or None when nothing says so."""
    for code, _meaning in _codes_of(ds, "PatientSpeciesCodeSequence"):
        if code not in rules.human.codes:
            return "patient species code is not a human code (PatientSpeciesCodeSequence)"
    species = _text(ds, "PatientSpeciesDescription")
    if species and rules.human.match(species) is None:
        return "patient species is not human (PatientSpeciesDescription)"
    if _text(ds, "PatientBreedDescription") or _codes_of(ds, "PatientBreedCodeSequence"):
        return "a patient breed is recorded, the patient is not human"
    for keyword in rules.species_text:
        term = rules.non_human_text.match(_text(ds, keyword))
        if term:
            return f"non-human patient, {term} in {keyword}"
    return None


def _body_part(ds: Dataset, rules: FilterRules) -> _Evidence | None:
    """The body part from BodyPartExamined, Anatomic Region Sequence or descriptions; None if unstated."""
    value = _text(ds, "BodyPartExamined")
    if value:
        term = rules.not_chest.match(value)
        if term:
            return _Evidence("not chest", f"BodyPartExamined names {term}, not chest")
        term = rules.chest.match(value)
        if term is None:
            return _Evidence("not chest", "BodyPartExamined is not a chest body part")
        return _Evidence("chest", f"body part {term}")
    codes = _codes_of(ds, "AnatomicRegionSequence")
    for code, _meaning in codes:
        if code in rules.chest.codes:  # a code of our rules: safe to quote
            return _Evidence("chest", f"body part {rules.chest.name} ({code})")
    if codes:
        return _Evidence("not chest", "AnatomicRegionSequence has no chest code, not chest")
    for keyword in rules.body_part_text:
        text = _text(ds, keyword)
        term = rules.not_chest.match(text)
        if term:
            return _Evidence("not chest", f"{keyword} names {term}, not chest")
        term = rules.chest_text.match(text)
        if term:
            return _Evidence("chest", f"body part {term} ({keyword})")
    return None


def _match_view(text: str, rules: FilterRules) -> tuple[Rule, str] | None:
    """The first view rule whose patterns match the normalised ``text``, with the matched term."""
    for rule in rules.views:
        term = rule.match(text)
        if term:
            return rule, term
    return None


def _structured_views(ds: Dataset, rules: FilterRules) -> list[_Evidence]:
    """What ViewPosition and View Code Sequence say (ambiguous or unrecognised values say nothing)."""
    found = []
    position = _text(ds, "ViewPosition")
    hit = _match_view(position, rules) if position else None
    if hit and hit[0].kind != AMBIGUOUS:
        found.append(_Evidence(hit[0].kind, f"view {hit[1]}"))
    for code, meaning in _codes_of(ds, "ViewCodeSequence"):
        rule = next((r for r in rules.views if code in r.codes), None)
        if rule is not None:  # a code of our rules: safe to quote
            label = f"view {rule.name} ({code})"
        else:
            hit = _match_view(normalise(meaning), rules) if meaning else None
            rule, label = (hit[0], f"view {hit[1]} (ViewCodeSequence CodeMeaning)") if hit else (None, "")
        if rule is not None and rule.kind != AMBIGUOUS:
            found.append(_Evidence(rule.kind, label))
    return found


def _view(ds: Dataset, rules: FilterRules) -> _Evidence | None:
    """The view: coded attributes first (they must agree), then the first description naming one view."""
    structured = _structured_views(ds, rules)
    if len({e.kind for e in structured}) > 1:
        said = "; ".join(f"{e.label} is {e.kind}" for e in structured)
        return _Evidence("conflict", f"view attributes disagree ({said})")
    if structured:
        return structured[0]
    for keyword in rules.view_text:
        text = _text(ds, keyword)
        hit = _match_view(text, rules) if text else None
        if hit and hit[0].kind != AMBIGUOUS:
            return _Evidence(hit[0].kind, f"view {hit[1]} ({keyword})")
    return None


def _not_stated(ds: Dataset) -> str:
    return "ViewPosition not recognised" if _text(ds, "ViewPosition") else "view not stated"


def _modality_said(modality: str) -> str:
    """How a reason names a Modality outside the configured ones: a defined term, else not the value."""
    if not modality:
        return "modality missing, not"
    if modality in MODALITY_TERMS:
        return f"modality {modality} is not"
    return "modality is not a DICOM defined term, nor"


def decide(ds: Dataset, settings: FilterSettings, rules: FilterRules) -> Decision:
    """Decide whether ``ds`` (the header is enough) is a frontal human chest radiograph to analyse.

    Args:
        ds: the received dataset, e.g. read with ``stop_before_pixels=True``.
        settings: the ``[filter]`` settings (modalities, no_view_policy).
        rules: the loaded filter rules.

    Returns:
        The decision with its reason, e.g. "accepted: CR, body part CHEST, view PA" or
        "skipped: view LL is lateral".
    """
    modality = _text(ds, "Modality")
    if modality not in {m.upper() for m in settings.modalities}:
        return Decision(False, f"skipped: {_modality_said(modality)} one of {', '.join(settings.modalities)}")
    why = _non_human(ds, rules)
    if why:
        return Decision(False, f"skipped: {why}")
    body = _body_part(ds, rules)
    if body is not None and body.kind != "chest":
        return Decision(False, f"skipped: {body.label}")
    view = _view(ds, rules)
    if view is not None and view.kind == "conflict":
        return Decision(False, f"skipped: {view.label}")
    if view is not None and view.kind != FRONTAL:
        return Decision(False, f"skipped: {view.label} is {view.kind}")
    said = ", ".join((
        modality,
        body.label if body else "body part not stated",
        view.label if view else _not_stated(ds),
    ))
    if body is not None and view is not None:
        return Decision(True, f"accepted: {said}")
    if settings.no_view_policy == "analyse":
        return Decision(True, f"accepted: {said} (no_view_policy analyse)")
    return Decision(False, f"skipped: {said} (no_view_policy {settings.no_view_policy})")
