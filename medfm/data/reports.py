"""Radiology report text: the IU X-ray reports, report cleaning, and section extraction.

The Indiana University chest X-ray collection (Demner-Fushman et al., JAMIA 2016)
ships inside ``torchxrayvision`` as ``data/NLMCXR_reports.tgz``: one XML file per
study with the COMPARISON / INDICATION / FINDINGS / IMPRESSION sections, the MeSH
"major" tags a librarian assigned (``Cardiomegaly/mild``, ``Opacity/lung/base/left``,
``normal``, ...) and the ids of the study's images. :func:`read_iu_xray` reads it
without unpacking and turns the MeSH tags into multi-hot labels over
:data:`IU_LABELS`. Reports paired with images in any other dataset go through the
generic manifest (``medfm.data.ManifestDataset(..., text_key="report")``).
"""

from __future__ import annotations

import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError, MissingFileError
from .samples import iu_xray_reports

# label -> MeSH headings (the tag's first segment, lower case) that carry it
IU_LABELS: dict[str, tuple[str, ...]] = {
    "normal": ("normal",),
    "cardiomegaly": ("cardiomegaly",),
    "opacity": ("opacity", "density", "airspace disease", "infiltrate", "consolidation"),
    "effusion": ("pleural effusion",),
    "atelectasis": ("pulmonary atelectasis", "atelectasis"),
    "granuloma": ("calcified granuloma", "granulomatous disease", "granuloma"),
    "calcinosis": ("calcinosis",),
    "nodule": ("nodule",),
    "emphysema": ("emphysema", "pulmonary emphysema", "pulmonary disease, chronic obstructive"),
    "edema": ("pulmonary edema", "pulmonary congestion"),
    "pneumonia": ("pneumonia",),
    "pneumothorax": ("pneumothorax",),
    "scoliosis": ("scoliosis",),
    "fracture": ("fractures, bone",),
    "hiatal hernia": ("hernia, hiatal",),
    "device": ("catheters, indwelling", "implanted medical device", "surgical instruments", "medical device"),
}
SECTIONS = ("comparison", "indication", "findings", "impression")
_DEID = re.compile(r"\bX{2,}\b")  # IU's de-identification placeholder "XXXX"
_HEADING = re.compile(r"\b(" + "|".join(SECTIONS) + r")\s*:", re.IGNORECASE)


def clean_text(text: str | None, lower: bool = True, deid: str = "") -> str:
    """One report string as a tokenizer wants it: de-identification placeholders (``XXXX``) replaced by
    ``deid``, runs of whitespace collapsed to one space, stripped, and lower-cased when ``lower``
    (uncased tokenizers such as MiniLM's lower-case anyway; cased ones should get ``lower=False``)."""
    text = _DEID.sub(deid, text or "")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,;:])", r"\1", text)  # a removed placeholder leaves "lung ." behind
    return text.lower() if lower else text


def split_sections(text: str) -> dict[str, str]:
    """Free-text report -> ``{section: text}`` for the headings ``COMPARISON:``, ``INDICATION:``,
    ``FINDINGS:``, ``IMPRESSION:`` (any case); text before the first heading goes under ``""``."""
    out: dict[str, str] = {}
    parts = _HEADING.split(text)
    if parts[0].strip():
        out[""] = parts[0].strip()
    for name, body in zip(parts[1::2], parts[2::2]):
        key = name.lower()
        out[key] = (out[key] + " " + body.strip()).strip() if key in out else body.strip()
    return out


def mesh_labels(tags: list[str], labels: dict[str, tuple[str, ...]] = IU_LABELS) -> np.ndarray:
    """Multi-hot float32 vector over ``labels`` from MeSH major tags (matched on the tag's heading)."""
    heads = {t.split("/")[0].strip().lower() for t in tags}
    return np.array([float(any(h in heads for h in syn)) for syn in labels.values()], dtype=np.float32)


@dataclass
class Report:
    """One IU X-ray study: its sections, MeSH major tags, image ids and multi-hot labels."""

    uid: str
    sections: dict[str, str]
    mesh: list[str]
    image_ids: list[str]
    labels: np.ndarray = field(repr=False)

    @property
    def findings(self) -> str:
        return self.sections.get("findings", "")

    @property
    def impression(self) -> str:
        return self.sections.get("impression", "")

    def text(self, sections: tuple[str, ...] = ("findings", "impression"), lower: bool = True) -> str:
        """The chosen sections, cleaned and joined with their names (``findings: ... impression: ...``)."""
        parts = [f"{s}: {clean_text(self.sections[s], lower=False)}" for s in sections if self.sections.get(s)]
        return clean_text(" ".join(parts), lower=lower)


def _parse(data: bytes, name: str) -> Report:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(f"{name}: not a readable XML report ({e})") from e
    uid = root.find("uId")
    sections = {}
    for a in root.iter("AbstractText"):
        label = (a.get("Label") or "").lower()
        if label in SECTIONS and (a.text or "").strip():
            sections[label] = clean_text(a.text, lower=False)
    mesh = [m.text.strip() for m in root.iter("major") if m.text and m.text.strip()]
    images = [im.get("id") for im in root.findall("parentImage") if im.get("id")]
    return Report(uid=uid.get("id") if uid is not None else os.path.basename(name), sections=sections,
                  mesh=mesh, image_ids=images, labels=mesh_labels(mesh))


def read_iu_xray(path: str | os.PathLike | None = None) -> list[Report]:
    """All reports of the IU X-ray archive (``None``: the copy inside torchxrayvision), ordered by study
    number. A damaged archive or XML file raises a :class:`DataError` naming it."""
    if path is None:
        path = iu_xray_reports()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"{path}: no such file (the IU X-ray reports ship with `pip install torchxrayvision`)")
    reports = []
    try:
        with tarfile.open(path, "r|*") as tar:  # streamed: one pass over the gzip, not a seek per member
            for member in tar:
                if member.isfile() and member.name.endswith(".xml"):
                    reports.append((member.name, _parse(tar.extractfile(member).read(), f"{path}:{member.name}")))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .tgz archive of XML reports ({e})") from e
    if not reports:
        raise DataError(f"{path}: the archive holds no .xml reports")
    key = lambda item: int(re.sub(r"\D", "", os.path.basename(item[0])) or 0)  # noqa: E731
    return [r for _, r in sorted(reports, key=key)]
