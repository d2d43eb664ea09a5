"""Report and caption readers on real text: IU X-ray (torchxrayvision), MedPix 2.0 captions."""

from __future__ import annotations

import numpy as np
import pytest

from medfm.data import DataError, ManifestDataset
from medfm.data.reports import IU_LABELS, clean_text, read_iu_xray, split_sections

from .conftest import shared_path


# --------------------------------------------------------------------------- reports
def test_iu_xray_reader_returns_every_report_with_sections_and_mesh_labels(iu_reports):
    assert len(iu_reports) == 3955  # the count the archive holds (3,955 studies)
    with_text = sum(bool(r.findings or r.impression) for r in iu_reports)
    assert with_text / len(iu_reports) > 0.98
    assert sum(bool(r.findings) for r in iu_reports) > 3300 and sum(bool(r.impression) for r in iu_reports) > 3800
    labels = np.stack([r.labels for r in iu_reports])
    assert labels.shape == (3955, len(IU_LABELS)) and set(np.unique(labels)) <= {0.0, 1.0}
    counts = dict(zip(IU_LABELS, labels.sum(0)))
    assert 1300 < counts["normal"] < 1500 and counts["cardiomegaly"] > 300 and counts["effusion"] > 100
    first = iu_reports[0]
    assert first.uid == "CXR1" and first.image_ids and first.mesh
    text = first.text()
    assert text.startswith("findings:") or text.startswith("impression:")
    assert "xxxx" not in text and text == text.lower() and "  " not in text
    # normal studies carry no other finding label far more often than not
    normal = labels[:, 0] == 1
    assert labels[normal, 1:].sum(1).mean() < 0.1


def test_report_cleaning_and_sections():
    assert clean_text("Clear lung XXXX  bilaterally .\n No effusion.") == "clear lung bilaterally. no effusion."
    assert clean_text("Heart  SIZE normal", lower=False) == "Heart SIZE normal"
    s = split_sections("Chest PA. FINDINGS: Heart normal.  Lungs clear. impression: No acute disease.")
    assert s == {"": "Chest PA.", "findings": "Heart normal.  Lungs clear.", "impression": "No acute disease."}


def test_damaged_or_missing_report_archive_is_named(tmp_path):
    bad = tmp_path / "reports.tgz"
    bad.write_bytes(b"not a tar archive at all")
    with pytest.raises(DataError, match="reports.tgz"):
        read_iu_xray(bad)
    with pytest.raises(FileNotFoundError, match="nothere.tgz"):
        read_iu_xray(tmp_path / "nothere.tgz")


def test_medpix_captions_load_through_the_generic_manifest_reader():
    manifest = shared_path("medpix2", "manifest.csv")
    ds = ManifestDataset(manifest, split="dev", text_key="caption", label_keys="type")
    assert len(ds) == 197
    s = ds[0]
    assert s["image"].ndim == 3 and isinstance(s["text"], str) and len(s["text"]) > 10
    assert set(ds.classes) == {"CT", "MR"}
