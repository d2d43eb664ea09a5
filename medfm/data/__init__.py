"""Data: readers (NIfTI, DICOM, PNG/JPEG, MedMNIST npz), manifests, transforms, datasets."""

from .datasets import FolderDataset, JoinedDataset, ManifestDataset, NpzDataset, SampleDataset, collate, open_dataset, split_names
from .errors import DataError, MissingFileError
from .io import load, load_mask
from .manifest import read_records, read_rows
from .npz import npz_splits, read_npz
from .preprocess import Preprocess
from .transforms import PRESETS, ct_3d, mr_3d, radiograph_2d

__all__ = [
    "Preprocess",
    "load",
    "load_mask",
    "collate",
    "DataError",
    "MissingFileError",
    "ManifestDataset",
    "FolderDataset",
    "JoinedDataset",
    "open_dataset",
    "split_names",
    "NpzDataset",
    "SampleDataset",
    "read_npz",
    "npz_splits",
    "read_rows",
    "read_records",
    "radiograph_2d",
    "ct_3d",
    "mr_3d",
    "PRESETS",
]
