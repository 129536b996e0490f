"""The official DictAS code (xiaozhen228/DictAS) run as its authors wrote it, for
:mod:`bench.parity.dictas_parity`: its own ``train.py`` ``train(args)`` and ``test.py``
``test(args)`` are called on data and weights the parity check hands them, and what they
compute is read back without changing it.

Nothing of the official code is copied: it is imported from the checkout. What stands around it:
- its loaders (``dataset.py``, which needs imgaug and albumentations and the authors' data
  layout) are replaced by :class:`GivenData`, which serves the parity check's tensors in the
  items' format (``img_ano``, ``img_good``, masks, ``cls_name``, ``anomaly``, paths);
- it runs on the CPU whatever the machine (``torch.cuda.is_available`` reads False in the
  block, and the one hard-coded ``.to('cuda')`` of its ViT, a discarded attention sum, goes to
  the CPU);
- ``ReduceLROnPlateau(verbose=True)`` is accepted (torch 2.13 dropped ``verbose``);
- its relative paths (the tokenizer's ``./models/bpe...`` at import, outputs under
  ``save_path``) resolve in a scratch folder, never in the checkout;
- its one dropout (0.1 in the generators' MLP) is set to 0 in training, so that one step is
  deterministic on both sides (ours runs with ``dropout=0``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import types
from argparse import Namespace
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import official_modules

#: the checkout's top-level modules (forgotten before and after, see ``official_modules``)
NAMES = ("models", "open_clip_local", "dataset", "dictas_official_train", "dictas_official_test")


class GivenData(torch.utils.data.Dataset):
    """The official ``MyDataset`` / ``Makedataset`` interface over given items: ``test`` items
    (one image each, batched by the official DataLoader), ``train`` batches and ``val`` items
    (already batched, as the official DataLoader yields them)."""

    test: list[dict[str, Any]] = []
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    categories: list[str] = []

    def __init__(self, *args, mode: str = "test", **kwargs) -> None:
        self.items = GivenData.test if mode == "test" else []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in self.items[i].items()}

    def get_cls_names(self) -> list[str]:
        return list(GivenData.categories)


class GivenLoaders:
    """``dataset.Makedataset``: ``make_dataset`` returns the given batches and categories."""

    def __init__(self, train_data_path, preprocess_test, mode, image_size=518) -> None:
        self.mode = mode

    def make_dataset(self, name, product_list, batchsize, args, k_shot=1, shuf=True):
        batches = GivenData.train if self.mode == "train_self" else GivenData.val
        copies = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches
        ]
        if self.mode == "train_self":
            return copies, list(GivenData.categories)
        return copies, sorted({c for b in batches for c in b["cls_name"]})


@dataclass
class Official:
    """The imported checkout: its modules, and the ``train.py`` / ``test.py`` modules."""

    root: Path
    scratch: Path
    clip: types.ModuleType  # models.model_CLIP
    dictas: types.ModuleType  # models.DictAS
    prompts: types.ModuleType  # models.prompt_ensemble
    utils: types.ModuleType  # models.utils
    metric: types.ModuleType  # models.metric_and_visualization
    train_module: types.ModuleType
    test_module: types.ModuleType
    captured: dict[str, Any] = field(default_factory=dict)

    def load_clip(self, path: Path, image_size: int) -> nn.Module:
        """The official ``Load_CLIP`` (OpenAI-format state dict file; fp16 round trip)."""
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its misaligned keys: none
            model, _, _ = self.clip.Load_CLIP(image_size, str(path), device="cpu")
        return model.eval()

    def train(self, args: Namespace, batch: dict, val: dict, categories: list[str]) -> nn.Module:
        """``train.train(args)`` on one given batch (and one validation item); returns its
        model, whose ``.grad`` hold the step's gradients. The losses it prints are parsed into
        ``captured["train_losses"]`` (query, TAC query, TAC retrieved, CQC)."""
        GivenData.train, GivenData.val, GivenData.categories = [batch], [val], list(categories)
        models: list[nn.Module] = []
        original = self.train_module.MyDictionary

        def build(config, args):
            model = original(config, args)
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
            models.append(model)
            return model

        printed = io.StringIO()
        self.train_module.MyDictionary = build
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
                self.train_module.train(args)
        finally:
            self.train_module.MyDictionary = original
        rows = [line.split() for line in printed.getvalue().splitlines()]
        losses = [r for r in rows if len(r) == 4 and all(_is_float(x) for x in r)]
        if len(losses) != 1:
            raise RuntimeError(f"expected one step's printed losses, got {losses}")
        self.captured["train_losses"] = [float(x) for x in losses[0]]
        return models[0]

    def test(self, args: Namespace, items: list[dict], categories: list[str]) -> dict[str, Any]:
        """``test.test(args)`` on the given items. Returns what it computed: ``layer_maps``
        (each image's ``MyDictionary`` test outputs, per layer and scale, at the token grid),
        ``results`` (its results dict: averaged unblurred maps, text scores), and per category
        ``pixel`` (the blurred maps) and ``image`` (the image scores) as
        ``calcuate_metric_pixel`` hands them to ``roc_auc_score``."""
        GivenData.test, GivenData.categories = items, list(categories)
        out: dict[str, Any] = {"layer_maps": [], "results": None, "roc": []}
        original_model = self.test_module.MyDictionary
        original_metric = self.test_module.calcuate_metric_pixel
        original_roc = self.metric.roc_auc_score

        def build(config, args):
            model = original_model(config, args)
            model.register_forward_hook(lambda m, i, o: out["layer_maps"].append(o[0]))
            return model

        def metric(results, *a, **k):
            out["results"] = results
            return original_metric(results, *a, **k)

        def roc(y_true, y_score, *a, **k):
            out["roc"].append(y_score.copy())
            return original_roc(y_true, y_score, *a, **k)

        self.test_module.MyDictionary = build
        self.test_module.calcuate_metric_pixel = metric
        self.metric.roc_auc_score = roc
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                self.test_module.test(args)
        finally:
            self.test_module.MyDictionary = original_model
            self.test_module.calcuate_metric_pixel = original_metric
            self.metric.roc_auc_score = original_roc
        return out


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def official_dictas(path: str | Path, scratch: Path) -> Iterator[Official]:
    """The checkout imported (with :class:`GivenData` as its ``dataset`` module), run on the
    CPU in ``scratch``; the process's logging, working folder and torch restored after."""
    root = Path(path).resolve()
    stub = types.ModuleType("dataset")
    stub.MyDataset, stub.Makedataset = GivenData, GivenLoaders
    cwd = Path.cwd()
    with official_modules(root, NAMES), _on_cpu(), _plateau_without_verbose(), _logging_kept():
        sys.modules["dataset"] = stub
        try:
            os.chdir(root)  # the tokenizer reads ./models/bpe_simple_vocab_16e6.txt.gz at import
            with _quiet():
                train_module = _load(root / "train.py", "dictas_official_train")
                test_module = _load(root / "test.py", "dictas_official_test")
            os.chdir(scratch)
            yield Official(
                root, scratch, sys.modules["models.model_CLIP"], sys.modules["models.DictAS"],
                sys.modules["models.prompt_ensemble"], sys.modules["models.utils"],
                sys.modules["models.metric_and_visualization"], train_module, test_module,
            )  # fmt: skip
        finally:
            os.chdir(cwd)


def _load(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources' deprecation notice
        yield


@contextlib.contextmanager
def _on_cpu() -> Iterator[None]:
    """``torch.cuda.is_available()`` is False and ``.to('cuda')`` stays on the CPU."""
    available, to = torch.cuda.is_available, torch.Tensor.to

    def cpu_to(self, *args, **kwargs):
        args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    torch.cuda.is_available, torch.Tensor.to = (lambda: False), cpu_to
    try:
        yield
    finally:
        torch.cuda.is_available, torch.Tensor.to = available, to


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


@contextlib.contextmanager
def _plateau_without_verbose() -> Iterator[None]:
    original = torch.optim.lr_scheduler.ReduceLROnPlateau

    class Plateau(original):
        def __init__(self, *args, verbose=None, **kwargs) -> None:
            super().__init__(*args, **kwargs)

    torch.optim.lr_scheduler.ReduceLROnPlateau = Plateau
    try:
        yield
    finally:
        torch.optim.lr_scheduler.ReduceLROnPlateau = original


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """The official scripts strip the root logger's handlers and add their own file and console
    handlers to 'train' / 'test': all of it undone after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for name in ("train", "test"):
            logger = logging.getLogger(name)
            for handler in logger.handlers[:]:
                handler.close()
                logger.removeHandler(handler)
        root.handlers[:] = handlers
        root.setLevel(level)
