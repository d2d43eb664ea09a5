"""`medfm data`: fetch (resumable, verified), prepare (each source's real layout -> a medfm manifest), with
no internet: a local HTTP server on 127.0.0.1 serves small fixture archives built in each source's own
layout (file names, folders, split files as the publishers ship them)."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medfm.cli import main
from medfm.data import catalogue
from medfm.data.catalogue import Remote, get_source, register_source
from medfm.data.download import FetchError, download

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- the local server
class Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 with HTTP Range support; ``cut[name] = n`` makes the
    next plain GET of ``name`` stop after n bytes (a dropped connection). Records each request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                server.requests.append((name, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                if start >= len(data) and start:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if not start and name in server.cut:
                    body = body[:server.cut.pop(name)]
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, name: str, data: bytes) -> Remote:
        self.files[name] = data
        return Remote(name, f"{self.url}/{name}", md5=hashlib.md5(data).hexdigest())

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_DATA", str(tmp_path / "cache"))
    catalogue.list_sources()  # the built-in entries registered before the snapshot
    saved = dict(catalogue.SOURCES)
    yield tmp_path / "cache"
    catalogue.SOURCES.clear()
    catalogue.SOURCES.update(saved)


def local(name: str, *remotes: Remote, as_name: str | None = None):
    """The real catalogue entry ``name`` (its real prepare function), its files served locally."""
    real = {r.filename: r for r in get_source(name).remotes}
    remotes = tuple(replace(r, unpack=real[r.filename].unpack) if r.filename in real else r for r in remotes)
    source = replace(get_source(name), name=as_name or name, remotes=remotes)
    return register_source(source)


# --------------------------------------------------------------------------- archives in each source's layout
def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gray(size=32):
    return RNG.integers(0, 255, (size, size))


def nifti(array) -> bytes:
    return gzip.compress(nib.Nifti1Image(np.asarray(array), np.eye(4)).to_bytes())  # .nii.gz


def archive(files: dict[str, bytes], kind: str = "zip") -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz" if kind == "tgz" else "w") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def msd_tar(n=10) -> bytes:
    """Task04_Hippocampus.tar as MONAI's mirror ships it: dataset.json, imagesTr/, labelsTr/, imagesTs/."""
    files, training = {}, []
    for i in range(1, n + 1):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4:10, 4:12, 5:11] = 1
        label[10:13, 4:12, 5:11] = 2
        image = (label * 40 + RNG.normal(50, 10, label.shape)).astype(np.float32)
        files[f"Task04_Hippocampus/imagesTr/hippocampus_{i:03d}.nii.gz"] = nifti(image)
        files[f"Task04_Hippocampus/labelsTr/hippocampus_{i:03d}.nii.gz"] = nifti(label)
        training.append({"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz", "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"})
    files["Task04_Hippocampus/imagesTs/hippocampus_900.nii.gz"] = nifti(np.zeros((16, 16, 16), np.float32))
    files["Task04_Hippocampus/dataset.json"] = json.dumps({
        "name": "Hippocampus", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": n, "training": training, "test": ["./imagesTs/hippocampus_900.nii.gz"]}).encode()
    return archive(files, "tar")


def medmnist_npz() -> bytes:
    buf = io.BytesIO()
    arrays = {}
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        arrays[f"{split}_images"] = (RNG.integers(0, 60, (n, 28, 28)) + 150 * labels[:, None, None]).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(buf, **arrays)
    return buf.getvalue()


def vqa_zip() -> bytes:
    top = "med-vqa-0cca6811e38cf54aff6a7cce3442296d07875e64/data/"
    files = {f"{top}images/synpic{i}.jpg": png(gray()) for i in range(10)}
    q = lambda i, img, split: {"qid": i, "image_name": f"synpic{img}.jpg", "image_organ": "HEAD",  # noqa: E731
                               "answer": "Yes" if i % 2 else "axial", "answer_type": "CLOSED" if i % 2 else "OPEN",
                               "question_type": "PRES", "question": f"is there a lesion {i}?", "phrase_type": split}
    files[top + "trainset.json"] = json.dumps([q(i, i % 10, "freeform") for i in range(30)]).encode()
    files[top + "testset.json"] = json.dumps([q(100 + i, i % 10, "test_freeform") for i in range(5)]).encode()
    return archive(files)


def medpix_zip() -> bytes:
    top = "MedPix-2.0-dbb2eab9c6076b60e1c13930ac5ac348c5bb42cf/MedPix-2-0/"
    files = {}
    for split in ("train", "dev", "test"):
        lines = []
        for i in range(4):
            image = f"MPX{split}{i}_synpic{i}"
            files[f"{top}images/{image}.png"] = png(gray())
            lines.append(json.dumps({"Type": "CT" if i % 2 else "MRI", "U_id": f"MPX{split}{i // 2}", "image": image,
                                     "Description": {"Age": "60", "Caption": f"caption {i}\nsecond line",
                                                     "Modality": "CT - noncontrast", "Plane": "Axial", "Sex": "female"},
                                     "Location": "Chest, Pulmonary", "Location Category": "Thorax"}))
        files[f"{top}splitted_dataset/descriptions_{split}.jsonl"] = "\n".join(lines).encode()
    return archive(files)


def bus_bra_zip() -> bytes:
    files, data, folds = {}, ["ID,Case,Histology,Pathology,BIRADS,Device,Width,Height,Side,BBOX"], \
        ["ID,Pathology,kFold,valid_1,valid_2,valid_3,valid_4,valid_5"]
    for case in range(1, 6):
        for side in "lr":
            ident = f"bus_{case:04d}-{side}"
            path = "malignant" if case % 2 else "benign"
            files[f"BUSBRA/Images/{ident}.png"] = png(gray())
            files[f"BUSBRA/Masks/mask_{case:04d}-{side}.png"] = png((gray() > 128) * 255)
            data.append(f'{ident},{case},fibroadenoma,{path},4,GE Logiq 7 @10-14MHz,32,32,left,"[1,1,5,5]"')
            folds.append(f"{ident},{path},{case},1,1,1,1,1")
    files["BUSBRA/bus_data.csv"] = "\n".join(data).encode()
    files["BUSBRA/5-fold-cv.csv"] = "\n".join(folds).encode()
    return archive(files)


def busi_zip() -> bytes:
    files = {}
    for label in ("benign", "malignant", "normal"):
        for i in range(1, 5):
            files[f"Dataset_BUSI_with_GT/{label}/{label} ({i}).png"] = png(gray())
            files[f"Dataset_BUSI_with_GT/{label}/{label} ({i})_mask.png"] = png((gray() > 128) * 255)
    return archive(files)


def iu_xray_files() -> tuple[bytes, bytes]:
    images, reports = {}, {}
    for study in range(1, 11):
        ids = [f"CXR{study}_IM-{study:04d}-{k}001" for k in (1, 2)]
        for i in ids:
            images[f"{i}.png"] = png(gray())
        xml = (f'<eCitation><uId id="CXR{study}"/><MedlineCitation><Article><Abstract>'
               f'<AbstractText Label="FINDINGS">Heart size normal {study}.</AbstractText>'
               f'<AbstractText Label="IMPRESSION">No acute disease.</AbstractText></Abstract></Article></MedlineCitation>'
               f'<MeSH><major>normal</major></MeSH>' + "".join(f'<parentImage id="{i}"/>' for i in ids) + "</eCitation>")
        reports[f"ecgen-radiology/{study}.xml"] = xml.encode()
    return archive(images, "tgz"), archive(reports, "tgz")


def pediatric_zip() -> bytes:
    return archive({f"chest_xray/{split}/{cls}/person{i}_{cls.lower()}.jpeg": png(gray())
                    for split in ("train", "test") for cls in ("NORMAL", "PNEUMONIA") for i in range(6)})


def lgg_zip() -> bytes:
    files = {}
    for p in range(1, 11):
        for s in (1, 2):
            files[f"kaggle_3m/TCGA_CS_{p:04d}_19970105/TCGA_CS_{p:04d}_19970105_{s}.tif"] = png(gray())
            files[f"kaggle_3m/TCGA_CS_{p:04d}_19970105/TCGA_CS_{p:04d}_19970105_{s}_mask.tif"] = png((gray() > 128) * 255)
    return archive(files)


# --------------------------------------------------------------------------- fetch: verify, resume, refuse
def test_fetch_prepare_and_a_recipe_trains_on_the_decathlon_layout(server, data_root, tmp_path, capsys):
    local("msd_hippocampus", server.serve("Task04_Hippocampus.tar", msd_tar()))
    assert main(["data", "prepare", "msd_hippocampus", "--quiet"]) == 0
    manifest = data_root / "msd_hippocampus" / "manifest.csv"
    assert f"ready at {manifest}" in capsys.readouterr().out
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == 10 and {r["split"] for r in rows} == {"train", "val"}
    assert sum(r["split"] == "val" for r in rows) == 2 and len({r["case_id"] for r in rows}) == 10
    assert list(csv.DictReader(open(data_root / "msd_hippocampus" / "test.csv")))[0]["split"] == "test"
    out = tmp_path / "seg"
    assert main(["finetune", "segment_3d", "--profile", "tiny", "--data", str(manifest), "--out", str(out),
                 "segmentation.num_classes=3", "data.test_split=null", "trainer.enable_progress_bar=false"]) == 0
    assert "mean_dice" in json.loads((out / "metrics.json").read_text())["val"]
    # a second fetch verifies what is there and asks the server for nothing
    before = len(server.requests)
    assert main(["data", "fetch", "msd_hippocampus", "--quiet"]) == 0
    assert len(server.requests) == before


def test_a_medmnist_npz_is_fetched_by_its_published_name_and_trains(server, data_root, tmp_path, capsys):
    local("pneumoniamnist", server.serve("pneumoniamnist.npz", medmnist_npz()))
    assert main(["data", "prepare", "pneumoniamnist", "--quiet"]) == 0
    npz = data_root / "pneumoniamnist" / "pneumoniamnist.npz"
    assert f"ready at {npz}" in capsys.readouterr().out
    out = tmp_path / "cls"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--data", str(npz), "--out", str(out),
                 "data.test_split=null", "trainer.enable_progress_bar=false"]) == 0
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["val"]["auroc"] <= 1.0


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    data = RNG.integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    remote = server.serve("big.bin", data)
    server.cut["big.bin"] = 100_000
    with pytest.raises(FetchError, match="run the same command again to resume"):
        download(remote.url, tmp_path / "big.bin", md5=remote.md5, progress=False)
    part = tmp_path / "big.bin.part"
    assert part.stat().st_size == 100_000 and not (tmp_path / "big.bin").exists()  # never taken for complete
    download(remote.url, tmp_path / "big.bin", md5=remote.md5, progress=False)
    assert server.requests[-1] == ("big.bin", "bytes=100000-")  # asked only for the rest
    assert (tmp_path / "big.bin").read_bytes() == data and not part.exists()
    # a .part that is already whole (stopped before its rename): the server answers 416, the file is kept
    (tmp_path / "big.bin").rename(part)
    download(remote.url, tmp_path / "big.bin", md5=remote.md5, progress=False)
    assert server.requests[-1] == ("big.bin", "bytes=300000-") and (tmp_path / "big.bin").read_bytes() == data


def test_a_corrupted_file_is_caught_by_its_checksum(server, data_root, capsys):
    good = medmnist_npz()
    remote = server.serve("pneumoniamnist.npz", good)
    server.files["pneumoniamnist.npz"] = good[:-10] + b"0123456789"  # the server sends other bytes
    local("pneumoniamnist", remote)
    assert main(["data", "fetch", "pneumoniamnist", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match the published" in err and "downloaded by hand goes to" in err
    downloads = data_root / "pneumoniamnist" / "downloads"
    assert not (downloads / "pneumoniamnist.npz").exists() and not (downloads / "pneumoniamnist.npz.part").exists()
    # a file damaged after a good fetch is caught on the next one
    server.files["pneumoniamnist.npz"] = good
    assert main(["data", "fetch", "pneumoniamnist", "--quiet"]) == 0
    with open(downloads / "pneumoniamnist.npz", "r+b") as f:
        f.write(b"XX")
    assert main(["data", "fetch", "pneumoniamnist", "--quiet"]) == 2
    assert "corrupt or not the published file" in capsys.readouterr().err


def test_without_a_published_checksum_the_first_download_is_recorded_and_checked(server, tmp_path):
    server.files["x.zip"] = b"first"
    url = f"{server.url}/x.zip"
    download(url, tmp_path / "x.zip", progress=False)
    assert (tmp_path / "x.zip.sha256").read_text().split()[0] == hashlib.sha256(b"first").hexdigest()
    (tmp_path / "x.zip").write_bytes(b"other")
    with pytest.raises(FetchError, match="SHA-256"):
        download(url, tmp_path / "x.zip", progress=False)


def test_offline_or_without_a_direct_link_is_one_line_saying_where_the_file_goes(data_root, capsys):
    local("msd_hippocampus", Remote("Task04_Hippocampus.tar", "http://127.0.0.1:9/Task04_Hippocampus.tar", md5="0" * 32))
    assert main(["data", "fetch", "msd_hippocampus", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot connect" in err
    assert str(data_root / "msd_hippocampus" / "downloads" / "Task04_Hippocampus.tar") in err
    assert main(["data", "fetch", "lgg_flair"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no direct download" in err and "kaggle.com" in err and "--file PATH" in err
    assert main(["data", "info", "nosuchset"]) == 2 and "medfm data list" in capsys.readouterr().err


def test_a_hand_downloaded_file_is_verified_then_used(tmp_path, data_root, capsys):
    path = tmp_path / "archive.zip"
    path.write_bytes(lgg_zip())
    assert main(["data", "prepare", "lgg_flair", "--file", str(path), "--quiet"]) == 0
    rows = list(csv.DictReader(open(data_root / "lgg_flair" / "manifest.csv")))
    assert len(rows) == 20 and {r["split"] for r in rows} == {"train", "val", "test"}
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())  # split by patient


# --------------------------------------------------------------------------- prepare: each layout
LAYOUTS = {
    "vqa_rad": (lambda: {"med-vqa-0cca681.zip": vqa_zip()}, 35, {"train", "val", "test"}),
    "medpix2": (lambda: {"MedPix-2.0-dbb2eab.zip": medpix_zip()}, 12, {"train", "dev", "test"}),
    "bus_bra": (lambda: {"BUS-BRA.zip": bus_bra_zip()}, 10, {"train", "val", "test"}),
    "busi": (lambda: {"Dataset_BUSI.zip": busi_zip()}, 12, {"train", "val", "test"}),
    "iu_xray": (lambda: dict(zip(("NLMCXR_png.tgz", "NLMCXR_reports.tgz"), iu_xray_files())), 20, {"train", "val", "test"}),
    "pediatric_cxr": (lambda: {"ChestXRay2017.zip": pediatric_zip()}, 24, {"train", "val", "test"}),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_source_layout_becomes_a_manifest_that_reads(name, server, data_root):
    from medfm.data import read_records

    files, n_rows, splits = LAYOUTS[name]
    local(name, *(server.serve(f, data) for f, data in files().items()))
    manifest = catalogue.prepare(name, progress=False)
    rows = list(csv.DictReader(open(manifest)))
    assert len(rows) == n_rows and {r["split"] for r in rows} == splits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VQA-RAD's official split shares images between train and test (warned)
        records, _, _ = read_records(manifest)  # every path resolves to a file
    assert len(records) == n_rows and all(Path(r.image).exists() for r in records)
    if name == "vqa_rad":  # val is carved by image: no image in two splits
        per_image = {}
        for r in rows:
            per_image.setdefault(r["image"], set()).add(r["split"] if r["split"] != "test" else "train")
        assert all(len(s) == 1 for s in per_image.values())
        assert {r["answer_type"] for r in rows} == {"OPEN", "CLOSED"}
    if name == "bus_bra":
        assert {r["split"] for r in rows if r["fold5"] in ("1", "2", "3")} == {"train"} and all(r["mask"] for r in rows)
    if name == "iu_xray":
        assert rows[0]["text"].startswith("findings: heart size normal")
    if name == "medpix2":
        assert rows[0]["caption"] == "caption 0 second line" and rows[0]["location_category"] == "Thorax"


def test_a_prepare_that_misses_a_file_names_it(server, data_root):
    files = {"Task04_Hippocampus/dataset.json": json.dumps({"training": [
        {"image": "./imagesTr/h_001.nii.gz", "label": "./labelsTr/h_001.nii.gz"}]}).encode()}
    local("msd_hippocampus", server.serve("Task04_Hippocampus.tar", archive(files, "tar")))
    with pytest.raises(Exception, match="imagesTr/h_001.nii.gz, which the archive does not hold"):
        catalogue.prepare("msd_hippocampus", progress=False)


def test_list_and_info_name_every_entry_with_size_licence_and_citation(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    names = [s.name for s in catalogue.list_sources()]
    for must in ("pneumoniamnist", "pneumoniamnist_224", "organmnist3d_64", "msd_hippocampus", "msd_spleen", "iu_xray",
                 "vqa_rad", "bus_bra", "busi", "mni152", "medpix2"):
        assert must in names
    for s in catalogue.list_sources():
        assert s.name in out and s.size and s.licence and s.citation
        assert main(["data", "info", s.name]) == 0
        info = capsys.readouterr().out
        assert f"cite:      {s.citation}" in info and "licence:" in info and "size:" in info
    assert get_source("pneumoniamnist").remotes[0].md5 == __import__("medmnist").INFO["pneumoniamnist"]["MD5"]


def test_the_bundled_mni152_needs_no_download(data_root, capsys):
    assert main(["data", "prepare", "mni152"]) == 0
    assert (data_root / "mni152" / "hemispheres" / "manifest.csv").exists()
    rows = list(csv.DictReader(open(data_root / "mni152" / "slices" / "manifest.csv")))
    assert len({r["image"] for r in rows}) == len(rows)  # no image twice, so none in two splits
