"""Batches from a dataset: deterministic per-epoch shuffling so training resumes exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bench.types import Batch, collate


class EpochLoader:
    """Re-iterable batches; with ``shuffle`` the order of epoch ``e`` depends only on
    (``seed``, ``e``), never on global RNG state, so a resumed run sees the same batches."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        collate_fn: Callable[[list], Batch] = collate,
    ) -> None:
        self.dataset, self.batch_size, self.collate_fn = dataset, batch_size, collate_fn
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self._order = _EpochOrder(len(dataset), shuffle, seed)
        self._loader: DataLoader | None = None

    @property
    def shuffle(self) -> bool:
        return self._order.shuffle

    @property
    def seed(self) -> int:
        return self._order.seed

    @property
    def epoch(self) -> int:
        return self._order.epoch

    def set_epoch(self, epoch: int) -> None:
        self._order.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is None:
            # one DataLoader for every epoch: with workers they persist across epochs instead of
            # being forked again each epoch (seconds per epoch for small training sets)
            self._loader = DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                sampler=self._order,
                # its own generator: making an iterator draws the workers' base seed, which must
                # not come from (and so shift) the global RNG that training restores on resume
                generator=torch.Generator().manual_seed(self.seed),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                drop_last=self.drop_last,
                collate_fn=self.collate_fn,
                persistent_workers=self.num_workers > 0 and self.shuffle,  # training loaders
            )
        return iter(self._loader)

    def close(self) -> None:
        """Stops persistent workers now rather than at garbage collection: a later loader's
        forked workers would otherwise inherit this iterator and complain when they drop it."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None


class _EpochOrder(Sampler[int]):
    """The sample order of the current epoch, shuffled by (seed, epoch) alone: the order a
    fresh DataLoader(shuffle=True, generator=that generator) gives, as before. It holds no
    reference to its EpochLoader, so an iterator outliving a temporary loader still works and
    the workers go when the loader does."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        # a DataLoader given this generator drew the workers' base seed from it first
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return iter(torch.randperm(self.size, generator=generator).tolist())
