"""Cohort manifests, label vocabulary, the preprocessing cache and the dataset."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from ai.preprocess import PreprocessSpec, preprocess_gray
from training.data import CohortError, CxrDataset, PreprocessCache, load_cohort
from training.labels import CANONICAL_LABELS, NIH_FINDINGS, LabelError, canonical_label, label_columns

HEADER = "image,patient_id,site,label_tb,label_Effusion,sex,age,lung_mask\n"


def write_png(path: Path, seed: int, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size + 8)) * 200 + 20).astype(np.uint8)
    cv2.imwrite(str(path), img)


def make_cohort(tmp_path: Path, rows: list[str], prefix: str = "") -> Path:
    """CSV in tmp_path/data/sets/c.csv; images at tmp_path/data/<prefix>img/*.png."""
    csv_path = tmp_path / "data" / "sets" / "c.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return csv_path


def test_vocabulary_and_aliases() -> None:
    assert len(NIH_FINDINGS) == 14 and "Pleural_Thickening" in NIH_FINDINGS
    assert CANONICAL_LABELS[0] == "Tuberculosis" and "No Finding" in CANONICAL_LABELS
    assert canonical_label("label_tb") == "Tuberculosis"
    assert canonical_label("Pleural Thickening") == "Pleural_Thickening"
    assert canonical_label("label_no_finding") == "No Finding"
    assert label_columns(["image", "label_tb", "label_Mass", "age"]) == {
        "Tuberculosis": "label_tb",
        "Mass": "label_Mass",
    }
    with pytest.raises(LabelError, match="'Covid' is not in the canonical vocabulary"):
        canonical_label("Covid")
    with pytest.raises(LabelError, match="both name label 'Tuberculosis'"):
        label_columns(["label_tb", "label_Tuberculosis"])


def test_load_cohort_paths_relative_to_csv_parent(tmp_path: Path) -> None:
    # Shenzhen's layout: the CSV in data/tb/, images named relative to data/.
    for i in range(3):
        write_png(tmp_path / "data" / "sets" / "img" / f"{i}.png", i)
    write_png(tmp_path / "data" / "sets" / "mask" / "0.png", 9)
    csv_path = make_cohort(
        tmp_path,
        [
            "sets/img/0.png,P0,a,1,,Female,54,sets/mask/0.png",
            "sets/img/1.png,P0,a,0,1,Male,,",
            "img/2.png,P1,b,0,0.0,,7,",  # relative to the CSV's own folder
        ],
    )
    cohort = load_cohort(csv_path)
    assert cohort.name == "c" and len(cohort) == 3
    assert cohort.labels == ("Tuberculosis", "Effusion")
    assert cohort.paths[0] == tmp_path / "data" / "sets" / "img" / "0.png"
    assert cohort.paths[2] == tmp_path / "data" / "sets" / "img" / "2.png"
    assert cohort.masks[0] == tmp_path / "data" / "sets" / "mask" / "0.png" and cohort.masks[1] is None
    assert cohort.images[0] == "sets/img/0.png"
    np.testing.assert_array_equal(cohort.y, [[1, np.nan], [0, 1], [0, 0]])
    assert cohort.ages[0] == 54 and math.isnan(cohort.ages[1]) and cohort.sexes[1] == "Male"
    aligned = cohort.with_labels(["Effusion", "Pneumonia"])
    np.testing.assert_array_equal(aligned.y[:, 0], [np.nan, 1, 0])
    assert np.isnan(aligned.y[:, 1]).all()
    assert cohort.subset([2, 0]).patient_ids == ("P1", "P0")
    assert cohort.summary()["labels"]["Tuberculosis"] == {"positive": 1, "negative": 2, "unknown": 0}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("img/0.png,P0,a,2,,,,", r"line 2 column 'label_tb': expected 1, 0 or empty, found '2'"),
        ("img/0.png,P0,a,yes,,,,", r"found 'yes'"),
        ("img/0.png,,a,1,,,,", r"line 2: empty 'patient_id'"),
        ("img/0.png,P0,a,1,,,old,", r"column 'age': expected a number"),
        ("img/missing.png,P0,a,1,,,,", r"1 file\(s\) not found .*img/missing.png"),
        ("img/0.png,P0,a,1,,,,nomask.png", r"nomask.png"),
    ],
)
def test_load_cohort_names_the_problem(tmp_path: Path, row: str, message: str) -> None:
    write_png(tmp_path / "data" / "sets" / "img" / "0.png", 0)
    with pytest.raises(CohortError, match=message):
        load_cohort(make_cohort(tmp_path, [row]))


def test_load_cohort_missing_column_and_duplicate(tmp_path: Path) -> None:
    write_png(tmp_path / "img" / "0.png", 0)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label_tb\nimg/0.png,1\n")
    with pytest.raises(CohortError, match=r"missing required column\(s\) \['patient_id', 'site'\]"):
        load_cohort(bad)
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("image,patient_id,site\nimg/0.png,P,a\n")
    with pytest.raises(CohortError, match="no label column"):
        load_cohort(nolabel)
    dup = tmp_path / "dup.csv"
    dup.write_text("image,patient_id,site,label_tb\nimg/0.png,P,a,1\nimg/0.png,P,a,1\n")
    with pytest.raises(CohortError, match=r"line 3: image 'img/0\.png' already listed on line 2"):
        load_cohort(dup)


def test_cache_stores_the_node_preprocessing(tmp_path: Path) -> None:
    image_path = tmp_path / "x.png"
    write_png(image_path, 3, size=80)
    spec = PreprocessSpec(size=32)
    cache = PreprocessCache(tmp_path / "cache", spec)
    first = cache.get(image_path)
    from ai.pixels import read_image_file

    expected, _ = preprocess_gray(read_image_file(image_path), spec)
    np.testing.assert_array_equal(first, expected)
    assert len(list(cache.folder.glob("*.npy"))) == 1
    np.testing.assert_array_equal(cache.get(image_path), first)  # served from the cache
    other = PreprocessCache(tmp_path / "cache", PreprocessSpec(size=24))
    assert other.folder != cache.folder and other.get(image_path).shape == (24, 24)
    stacked = cache.load_many([image_path, image_path])
    assert stacked.shape == (2, 32, 32) and stacked.dtype == np.uint8


def test_dataset_items_are_model_inputs(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=16)
    images = np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8)
    y = np.array([[1.0], [0.0], [np.nan]], dtype=np.float32)
    x, target = CxrDataset(images, y, spec)[2]
    assert tuple(x.shape) == (3, 16, 16) and float(x.max()) <= 1.0
    assert np.isnan(target.numpy()).all()

    def shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.roll(img, int(rng.integers(1, 5)), axis=1)

    ds = CxrDataset(images, y, spec, augment=shift, seed=1)
    epoch0 = [ds[i][0].numpy() for i in range(3)]
    assert all(np.array_equal(a, ds[i][0].numpy()) for i, a in enumerate(epoch0))  # same epoch, same draws
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.add(ds[0][0].numpy().tobytes())
    assert len(draws) > 1  # the draws change with the epoch


@pytest.mark.shared_data
def test_shenzhen_and_montgomery_manifests(data_dir: Path) -> None:
    shenzhen = load_cohort(data_dir / "tb" / "shenzhen.csv")
    assert len(shenzhen) == 662 and shenzhen.labels == ("Tuberculosis",)
    assert shenzhen.paths[0].is_file() and shenzhen.images[0].startswith("tb/shenzhen/images/")
    assert shenzhen.summary()["labels"]["Tuberculosis"]["positive"] == 336
    montgomery = load_cohort(data_dir / "tb" / "montgomery.csv")
    assert len(montgomery) == 138 and np.isnan(montgomery.ages).all()


@pytest.mark.shared_data
def test_cache_reads_dicom_png_and_jpeg(data_dir: Path, tmp_path: Path) -> None:
    """A manifest mixing the three formats (absolute paths) goes through the node's readers into the cache."""
    files = [
        data_dir / "dicom" / "rsna_cr_pa_jpeg_baseline.dcm",
        data_dir / "dicom" / "rsna_cr_pa_monochrome1_variant.dcm",
        data_dir / "tb" / "montgomery" / "images" / "MCUCXR_0068_0.png",
        data_dir / "views" / "images" / "lateral_000.jpg",
    ]
    csv_path = tmp_path / "mixed.csv"
    rows = [f"{path},P{i},mixed,{i % 2}" for i, path in enumerate(files)]
    csv_path.write_text("image,patient_id,site,label_Pneumonia\n" + "\n".join(rows) + "\n")
    cohort = load_cohort(csv_path)
    assert cohort.paths == tuple(files)
    images = PreprocessCache(tmp_path / "cache", PreprocessSpec(size=64)).load_many(cohort.paths)
    assert images.shape == (4, 64, 64) and images.dtype == np.uint8
    assert all(image.std() > 10 for image in images)  # real content, not a blank canvas


def test_pediatric_and_nih_pneumonia_are_two_labels() -> None:
    assert canonical_label("Pediatric Pneumonia") == "Pediatric_Pneumonia"
    assert canonical_label("paediatric_pneumonia") == "Pediatric_Pneumonia"
    assert canonical_label("label_pneumonia") == "Pneumonia"  # the bare name stays NIH's finding


def test_load_cohort_with_its_own_column_names(tmp_path: Path) -> None:
    # The pediatric set's layout: no patient_id (group_hint groups a child's images), no site, label_pneumonia.
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", i)
    csv_path = tmp_path / "ped.csv"
    csv_path.write_text("image,label_pneumonia,group_hint,label_tb\n"
                        "img/0.png,1,bacteria:person1,\nimg/1.png,1,bacteria:person1,1\nimg/2.png,0,normal:IM-2,0\n")
    cohort = load_cohort(csv_path, patient_column="group_hint", site="guangzhou",
                         label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    assert cohort.labels == ("Pediatric_Pneumonia",)  # exactly the mapped columns: label_tb is not a label
    assert cohort.patient_ids == ("bacteria:person1", "bacteria:person1", "normal:IM-2")
    assert cohort.sites == ("guangzhou",) * 3
    assert cohort.y[:, 0].tolist() == [1.0, 1.0, 0.0]
    # a pattern takes the patient out of the column: a child's images under two subtypes are one group
    csv_path.write_text("image,label_pneumonia,group_hint\n"
                        "img/0.png,1,bacteria:person1\nimg/1.png,1,virus:person1\nimg/2.png,0,normal:IM-2\n")
    cohort = load_cohort(csv_path, patient_column="group_hint", site="guangzhou", patient_pattern=r"person\d+",
                         label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    assert cohort.patient_ids == ("person1", "person1", "normal:IM-2")
    # NIH's bare finding columns, mapped by name.
    nih = tmp_path / "nih.csv"
    nih.write_text("image,patient_id,Atelectasis,Hernia\nimg/0.png,7,1,0\nimg/1.png,8,0,\n")
    cohort = load_cohort(nih, site="nih", label_columns={"Atelectasis": "Atelectasis", "Hernia": "hernia"})
    assert cohort.labels == ("Atelectasis", "Hernia") and math.isnan(cohort.y[1, 1])


@pytest.mark.parametrize(
    ("header", "kwargs", "message"),
    [
        ("image,label_pneumonia\n", {"patient_column": "group_hint", "site": "g"},
         r"missing required column\(s\) \['group_hint'\]"),
        ("image,patient_id,site,label_pneumonia\n", {"site": "g"}, "has a 'site' column and the configuration gives"),
        ("image,patient_id,pneu\n", {"site": "g", "label_columns": {"pneumonia": "Pediatric_Pneumonia"}},
         r"label column\(s\) \['pneumonia'\] not in the manifest"),
        ("image,patient_id,a\n", {"site": "g", "label_columns": {"a": "Covid"}}, "'Covid' is not in the canonical"),
        ("image,group_hint,label_pneumonia\n", {"patient_column": "group_hint", "site": "g"},
         "line 2: empty 'group_hint'"),
    ],
)
def test_column_options_name_the_problem(tmp_path: Path, header: str, kwargs: dict, message: str) -> None:
    write_png(tmp_path / "0.png", 0)
    csv_path = tmp_path / "c.csv"
    first = header.strip().split(",")
    csv_path.write_text(header + ",".join("0.png" if c == "image" else ("" if c == "group_hint" else "1")
                                          for c in first) + "\n")
    with pytest.raises(CohortError, match=message):
        load_cohort(csv_path, **kwargs)


@pytest.mark.shared_data
def test_pediatric_and_nih_manifests(data_dir: Path) -> None:
    pediatric = load_cohort(data_dir / "pediatric_pneumonia" / "train.csv", patient_column="group_hint",
                            site="guangzhou", label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    assert len(pediatric) == 5216 and pediatric.labels == ("Pediatric_Pneumonia",)
    assert pediatric.summary()["labels"]["Pediatric_Pneumonia"]["positive"] == 3875
    assert len(set(pediatric.patient_ids)) < len(pediatric)  # a child's images share a group
    # the file names' personN: one child's bacteria and virus images, split apart by the subtype prefix, regrouped
    by_person = load_cohort(data_dir / "pediatric_pneumonia" / "train.csv", patient_column="group_hint",
                            patient_pattern=r"person\d+", site="guangzhou",
                            label_columns={"label_pneumonia": "Pediatric_Pneumonia"})
    assert len(set(by_person.patient_ids)) == len(set(pediatric.patient_ids)) - 808  # 808 children in both
    nih = load_cohort(data_dir / "nih14" / "nih14.csv", site="nih",
                      label_columns={finding: finding for finding in NIH_FINDINGS})
    assert len(nih) == 500 and nih.labels == NIH_FINDINGS
    counts = {label: nih.summary()["labels"][label]["positive"] for label in ("Hernia", "Edema", "Pneumonia")}
    assert counts == {"Hernia": 16, "Edema": 13, "Pneumonia": 21}
