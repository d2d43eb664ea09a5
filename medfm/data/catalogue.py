"""The public data sets medfm's recipes, notebooks and benchmarks use: where each lives, what it weighs, its
licence and citation, and how it becomes a medfm manifest (``medfm data list | info | fetch | prepare``).

Each :class:`Source` lists its files (:class:`Remote`: URL, published checksum) and a ``prepare`` function
that turns the unpacked files into the layout medfm reads (docs/data.md) with the official splits. MedMNIST
entries come from the ``medmnist`` package's own table (URLs and MD5 of every size) and the Decathlon entries
from MONAI's ``DecathlonDataset`` (URLs and MD5), so they stay what those projects publish.

Files live under :func:`data_root` (``$MEDFM_DATA``, default ``~/.cache/medfm/data``), one folder a source:
``downloads/`` (the verified files), ``raw/`` (unpacked) and the prepared manifest. A file without a direct
download (a Kaggle or Mendeley page) is fetched by hand and given with ``--file``.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from medfm.atomic import atomic_path

from . import prepare as layouts
from .download import FetchError, download, verify


@dataclass(frozen=True)
class Remote:
    """One file of a source. ``url`` None: no direct download (``Source.homepage`` says where to get it)."""

    filename: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    size: int | None = None  # bytes, where published exactly
    unpack: bool = True


@dataclass(frozen=True)
class Source:
    name: str
    title: str
    task: str
    size: str  # as published ("27 MB"), or an estimate marked "about"
    licence: str
    citation: str
    homepage: str
    remotes: tuple[Remote, ...]
    prepare: Callable[[Path, Path], Path]  # (source folder, its raw/ folder) -> the data path recipes take
    notes: str = ""
    example: str = ""
    bundled: str | None = None  # a package that ships the files: nothing to download

    @property
    def checksums(self) -> str:
        if self.bundled:
            return f"none needed (ships with the {self.bundled} package)"
        known = [r for r in self.remotes if r.md5 or r.sha256]
        if len(known) == len(self.remotes):
            return "published (" + ", ".join("MD5" if r.md5 else "SHA-256" for r in self.remotes) + ")"
        return "not published: the SHA-256 of the first download is recorded and checked on every later fetch"


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    SOURCES[source.name] = source
    return source


def data_root() -> Path:
    """``$MEDFM_DATA``, else ``$XDG_CACHE_HOME/medfm/data``, else ``~/.cache/medfm/data``."""
    if os.environ.get("MEDFM_DATA"):
        return Path(os.environ["MEDFM_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "medfm" / "data"


def get_source(name: str) -> Source:
    _builtin()
    if name not in SOURCES:
        import difflib

        near = difflib.get_close_matches(name, SOURCES, n=3)
        raise KeyError(f"no data set {name!r}" + (f"; did you mean {', '.join(near)}?" if near else "")
                       + " (`medfm data list` shows them all)")
    return SOURCES[name]


def list_sources(match: str = "") -> list[Source]:
    _builtin()
    return [s for s in SOURCES.values() if match.lower() in s.name]


def folder(name: str, root: str | os.PathLike | None = None) -> Path:
    return Path(root).expanduser() if root else data_root() / name


def fetch(name: str, dest: str | os.PathLike | None = None, file: str | os.PathLike | None = None,
          mirror: str | None = None, progress: bool = True) -> Path:
    """Download (resuming), verify and unpack ``name`` into ``dest`` (default ``data_root()/name``); returns
    that folder. A second fetch re-verifies and downloads nothing. ``file``: a copy downloaded by hand (a
    single-file source). ``mirror``: a base URL that serves the same file names (an institutional mirror)."""
    source = get_source(name)
    where = folder(name, dest)
    if source.bundled:
        return where
    if file is not None and len(source.remotes) != 1:
        raise FetchError(f"{name}: --file takes the one file of a single-file source; {name} has "
                         + ", ".join(r.filename for r in source.remotes) + f": put them in {where / 'downloads'}")
    for remote in source.remotes:
        target = where / "downloads" / remote.filename
        if file is not None:
            _adopt(Path(file), target, remote)
        elif remote.url is None and not target.exists():
            raise FetchError(f"{name}: {remote.filename} has no direct download: get it from {source.homepage} and run "
                             f"`medfm data fetch {name} --file PATH` (or put it at {target})")
        else:
            url = f"{mirror.rstrip('/')}/{remote.filename}" if mirror else remote.url
            try:
                download(url or "", target, md5=remote.md5, sha256=remote.sha256, size=remote.size, progress=progress)
            except FetchError as e:
                raise FetchError(f"{name}: {e}. A copy downloaded by hand goes to {target} (or "
                                 f"`medfm data fetch {name} --file PATH`)") from None
        if remote.unpack:
            _unpack(target, where / "raw")
    return where


def _adopt(file: Path, target: Path, remote: Remote) -> None:
    """A hand-downloaded copy: verified against the published checksum, then copied into ``downloads/``."""
    if not file.is_file():
        raise FetchError(f"{file}: no such file")
    verify(file, md5=remote.md5, sha256=remote.sha256, size=remote.size)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.stat().st_size != file.stat().st_size:
        with atomic_path(target) as tmp:
            shutil.copyfile(file, tmp)


def _unpack(archive: Path, raw: Path) -> None:
    """Unpacks once: ``raw/.unpacked-NAME`` marks an archive whose every member is out."""
    marker = raw / f".unpacked-{archive.name}"
    if marker.exists():
        return
    raw.mkdir(parents=True, exist_ok=True)
    try:
        shutil.unpack_archive(str(archive), str(raw))
    except (shutil.ReadError, ValueError, EOFError, OSError) as e:
        raise FetchError(f"{archive}: cannot unpack ({e}); delete it and fetch again") from e
    marker.write_text("")


def prepare(name: str, dest: str | os.PathLike | None = None, file: str | os.PathLike | None = None,
            mirror: str | None = None, progress: bool = True) -> Path:
    """Fetch ``name`` if needed and convert it into medfm's layout; returns what ``--data`` takes (a
    manifest, or an npz for MedMNIST)."""
    source = get_source(name)
    where = fetch(name, dest, file=file, mirror=mirror, progress=progress)
    where.mkdir(parents=True, exist_ok=True)
    return source.prepare(where, where / "raw")


def describe(source: Source) -> str:
    """The ``medfm data info`` text."""
    lines = [f"{source.name}: {source.title}", f"  task:      {source.task}", f"  size:      {source.size}",
             f"  licence:   {source.licence}", f"  cite:      {source.citation}", f"  homepage:  {source.homepage}"]
    for r in source.remotes:
        checksum = f"MD5 {r.md5}" if r.md5 else f"SHA-256 {r.sha256}" if r.sha256 else "no published checksum"
        lines.append(f"  file:      {r.filename}  {r.url or '(no direct download: see homepage)'}  [{checksum}]")
    if source.bundled:
        lines.append(f"  files:     ship with the {source.bundled} package (nothing to download)")
    lines.append(f"  checksums: {source.checksums}")
    if source.notes:
        lines.append(f"  notes:     {source.notes}")
    lines.append(f"  stored in: {folder(source.name)}")
    lines.append(f"  use:       medfm data prepare {source.name}" + (f"  then  {source.example}" if source.example else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the catalogue
MEDMNIST_CITE = "Yang et al., MedMNIST v2: a large-scale lightweight benchmark for 2D and 3D biomedical image " \
                "classification, Scientific Data 10, 41 (2023)"
MSD_CITE = "Antonelli et al., The Medical Segmentation Decathlon, Nature Communications 13, 4128 (2022)"
MSD_SIZES = {"Task01_BrainTumour": "7.1 GB", "Task02_Heart": "435 MB", "Task03_Liver": "27 GB",
             "Task04_Hippocampus": "27 MB", "Task05_Prostate": "229 MB", "Task06_Lung": "8.5 GB",
             "Task07_Pancreas": "11.4 GB", "Task08_HepaticVessel": "8.8 GB", "Task09_Spleen": "1.5 GB",
             "Task10_Colon": "5.8 GB"}


def _medmnist() -> None:
    from medmnist.info import INFO  # the package's own table: every size's URL and MD5

    for key, info in INFO.items():
        dims = 3 if key.endswith("3d") else 2
        for size in (28, 64, 128, 224):
            suffix = "" if size == 28 else f"_{size}"
            if f"url{suffix}" not in info:
                continue
            n = sum(info["n_samples"].values())
            mb = n * size ** dims * info["n_channels"] / 1e6
            classes = ", ".join(list(info["label"].values())[:4]) + (", ..." if len(info["label"]) > 4 else "")
            register_source(Source(
                name=key + suffix, title=f"{info['python_class']} ({size}{'³' if dims == 3 else ' px'}): {classes}",
                task=f"{dims}D classification ({info['task']}); train/val/test {info['n_samples']['train']:,}/"
                     f"{info['n_samples']['val']:,}/{info['n_samples']['test']:,}",
                size=f"about {mb / 1000:.1f} GB" if mb >= 1000 else f"about {mb:,.0f} MB" if mb >= 1 else "under 1 MB",
                licence=info["license"], citation=MEDMNIST_CITE, homepage="https://medmnist.com/",
                remotes=(Remote(f"{key}{suffix}.npz", info[f"url{suffix}"], md5=info[f"MD5{suffix}"], unpack=False),),
                prepare=functools.partial(layouts.medmnist, f"{key}{suffix}.npz"),
                example=f"medfm finetune classify_{dims}d --data {data_root() / (key + suffix) / (key + suffix)}.npz"))


def _decathlon() -> None:
    from monai.apps import DecathlonDataset  # MONAI's table: the AWS mirror's URLs and MD5

    for task, url in DecathlonDataset.resource.items():
        organ = task.split("_", 1)[1].lower()
        register_source(Source(
            name=f"msd_{organ}", title=f"Medical Segmentation Decathlon {task}",
            task="3D segmentation (NIfTI image + label map); labelled cases split train/val 80/20 by case (seed 0); "
                 "the unlabelled test images are listed in test.csv",
            size=MSD_SIZES.get(task, "?"), licence="CC BY-SA 4.0", citation=MSD_CITE,
            homepage="http://medicaldecathlon.com/",
            remotes=(Remote(f"{task}.tar", url, md5=DecathlonDataset.md5[task]),), prepare=layouts.decathlon,
            example="medfm finetune segment_3d --data " + str(data_root() / f"msd_{organ}" / "manifest.csv")))


@functools.cache
def _builtin() -> None:
    _medmnist()
    _decathlon()
    for source in (
        Source("mni152", "MNI152 2009a T1 brain template with grey/white-matter maps (nilearn)",
               "3D tissue segmentation (hemispheres: train left, val right) and a 2D slice set (slice level)",
               "9 MB", "free with attribution (MNI)",
               "Fonov et al., Unbiased average age-appropriate atlases for pediatric studies, NeuroImage 54 (2011)",
               "https://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009", (), layouts.mni152, bundled="nilearn",
               example="medfm finetune segment_3d --data " + str(data_root() / "mni152" / "hemispheres" / "manifest.csv")),
        Source("iu_xray", "Indiana University chest X-rays (Open-i): 7,470 PNG images with 3,955 radiology reports",
               "report generation, image-text pretraining; one row per image with its study's findings + impression, "
               "split by study 80/10/10 (seed 0)", "about 1.4 GB", "CC BY-NC-ND 4.0",
               "Demner-Fushman et al., Preparing a collection of radiology examinations for distribution and "
               "retrieval, JAMIA 23 (2016)", "https://openi.nlm.nih.gov/faq#collection",
               (Remote("NLMCXR_png.tgz", "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_png.tgz"),
                Remote("NLMCXR_reports.tgz", "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_reports.tgz")),
               layouts.iu_xray, notes="the reports alone also ship with torchxrayvision (medfm.data.reports.read_iu_xray)",
               example="medfm finetune report_2d --data " + str(data_root() / "iu_xray" / "manifest.csv")),
        Source("vqa_rad", "VQA-RAD: 3,515 radiology question-answer pairs on 315 MedPix images",
               "visual question answering; official train/test split, val = 10 % of the train images (seed 0)",
               "about 40 MB", "CC0 1.0", "Lau et al., A dataset of clinically generated visual questions and answers "
               "about radiology images, Scientific Data 5, 180251 (2018)", "https://osf.io/89kps/",
               (Remote("med-vqa-0cca681.zip", "https://github.com/Awenbocc/med-vqa/archive/"
                       "0cca6811e38cf54aff6a7cce3442296d07875e64.zip"),), layouts.vqa_rad,
               notes="the standard MEVF split files (trainset.json / testset.json) from github.com/Awenbocc/med-vqa; "
                     "the official split divides questions, not images (reading the manifest warns that test images are "
                     "also in train)"),
        Source("medpix2", "MedPix 2.0: CT and MR images with captions, modality, plane and body region",
               "image-text pretraining, caption generation, zero-shot classification; official train/dev/test split "
               "by case", "about 1 GB", "NLM open access",
               "Siragusa et al., MedPix 2.0: a comprehensive multimodal biomedical data set for advanced AI "
               "applications with retrieval augmented generation and knowledge graphs (2024)",
               "https://github.com/CHILab1/MedPix-2.0",
               (Remote("MedPix-2.0-dbb2eab.zip", "https://github.com/CHILab1/MedPix-2.0/archive/"
                       "dbb2eab9c6076b60e1c13930ac5ac348c5bb42cf.zip"),), layouts.medpix2,
               example="medfm pretrain clip_2d --data " + str(data_root() / "medpix2" / "manifest.csv")),
        Source("bus_bra", "BUS-BRA: 1,875 breast ultrasound images of 1,064 patients, four scanners, lesion masks",
               "benign vs malignant classification, lesion segmentation, scanner shift; official 5-fold partition: "
               "folds 1-3 train, 4 val, 5 test", "about 100 MB", "CC BY 4.0",
               "Gómez-Flores et al., BUS-BRA: a breast ultrasound dataset for assessing computer-aided diagnosis "
               "systems, Medical Physics 51 (2024)", "https://zenodo.org/records/8231412",
               (Remote("BUS-BRA.zip"),), layouts.bus_bra,
               notes="download the record's archive from Zenodo and give it with --file; images of one patient "
                     "share the `patient` column"),
        Source("busi", "BUSI: 780 breast ultrasound images (normal, benign, malignant) with lesion masks, Cairo",
               "classification, segmentation, a second site for BUS-BRA models; split train/val/test 80/10/10 "
               "(seed 0)", "about 200 MB", "CC0 1.0 (per Kaggle)",
               "Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 28, 104863 (2020)",
               "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset",
               (Remote("Dataset_BUSI.zip", "https://scholar.cu.edu.eg/Dataset_BUSI.zip"),), layouts.busi,
               notes="near-duplicate images are common, some with different labels; the split is by file"),
        Source("pediatric_cxr", "Pediatric chest X-rays (Kermany et al.): 5,856 images, normal vs pneumonia",
               "2D classification (the source of PneumoniaMNIST); official train/test, val = 10 % of train (seed 0)",
               "1.2 GB", "CC BY 4.0", "Kermany et al., Identifying medical diagnoses and treatable diseases by "
               "image-based deep learning, Cell 172 (2018)", "https://data.mendeley.com/datasets/rscbjbr9sj/2",
               (Remote("ChestXRay2017.zip"),), layouts.pediatric_cxr,
               notes="Mendeley offers no stable direct link: download ChestXRay2017.zip and give it with --file"),
        Source("lgg_flair", "TCGA-LGG brain MR slices with FLAIR-abnormality masks (Buda et al., 110 patients)",
               "2D segmentation; split by patient 80/10/10 (seed 0)", "about 750 MB",
               "CC BY-NC-SA 4.0 (per Kaggle)",
               "Buda et al., Association of genomic subtypes of lower-grade gliomas with shape features "
               "automatically extracted by a deep learning algorithm, Computers in Biology and Medicine 109 (2019)",
               "https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation", (Remote("archive.zip"),),
               layouts.lgg_flair, notes="Kaggle needs a login: download the archive and give it with --file"),
    ):
        register_source(source)
