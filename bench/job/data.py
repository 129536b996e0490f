"""The data of a job: its test split, its fit's training images, and what they feed the detector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from bench.datasets import get_dataset
from bench.fingerprint import data_fingerprint
from bench.loading import EpochLoader
from bench.plan import Fit, Job, open_split, select
from bench.types import collate_training


def job_modality(detector, spec) -> str:
    """The input a job feeds the detector: the first modality it accepts that the dataset
    serves by default, else the first the dataset can provide."""
    accepted = detector.accepted_modalities(detector.get_params())
    for pool in (spec.modalities, spec.feeds):
        for modality in accepted:
            if modality in pool:
                return modality
    raise ValueError(
        f"{type(detector).__name__} accepts {accepted}; {spec.name} feeds {spec.feeds}"
    )


@dataclass
class JobData:
    spec: Any
    test_set: Any
    test: EpochLoader


def input_options(image_size, crop_size, resampling: str) -> dict[str, Any]:
    """A loader's input options; ``resampling`` only when not the loaders' default ("tensor"),
    so that loaders without RGB images to resize (point clouds) need not take it."""
    opts = {"image_size": image_size, "crop_size": crop_size}
    return opts if resampling == "tensor" else {**opts, "resampling": resampling}


def open_data(job: Job, device: torch.device, num_workers: int) -> JobData:
    """The evaluated category's test split (the training data belongs to the fit)."""
    spec = get_dataset(job.dataset.name)
    opts = {
        **input_options(job.image_size, job.crop_size, job.fit.resampling),
        **job.dataset.options,
    }
    test_set = spec.open(job.category, "test", job.root, **opts)
    pin = device.type == "cuda"
    test = EpochLoader(test_set, job.batch_size, num_workers=num_workers, pin_memory=pin)
    return JobData(spec, test_set, test)


def open_fit_data(
    fit: Fit, trainable: bool, device: torch.device, num_workers: int
) -> tuple[list[Any], EpochLoader]:
    """The training images of one fit (every part, pooled) and their batches."""
    sets = []
    for part in fit.parts:
        opts = input_options(fit.image_size, fit.crop_size, fit.resampling)
        split = get_dataset(part.dataset).open(
            part.category, "train", part.root, **opts, **json.loads(part.options)
        )
        sets.append(select(split, part.files))
    pooled = sets[0] if len(sets) == 1 else ConcatDataset(sets)
    loader = EpochLoader(
        pooled,
        fit.batch_size,
        shuffle=trainable,
        seed=fit.seed,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        drop_last=trainable and len(pooled) >= fit.batch_size,
        collate_fn=collate_training,
    )
    return sets, loader


def fit_size(fit: Fit) -> int:
    """How many training images the fit gets (from the plan's index, without loading)."""
    return sum(
        len(select(open_split(p.dataset, p.root, p.category, p.options, "train"), p.files))
        for p in fit.parts
    )


def current_train_fingerprint(fit: Fit) -> str:
    """The fingerprint of a fit's training files as they are now (not as planned)."""
    sets = [
        select(
            get_dataset(p.dataset).open(
                p.category, "train", p.root, image_size=None, **json.loads(p.options)
            ),
            p.files,
        )
        for p in fit.parts
    ]
    return data_fingerprint(*sets)
