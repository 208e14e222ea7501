"""Deterministic, resumable orders of mini-batch indices: over all items, or one bucket at a time.

:class:`ShuffledBatches`: epoch ``e`` visits the items in the order of
``torch.randperm(num_items, generator=torch.Generator().manual_seed(seed + e))`` and is cut into
consecutive batches of ``batch_size`` indices; the incomplete tail (``num_items % batch_size``
items) is dropped and the next epoch starts. Because each epoch's permutation depends only on
``seed`` and the epoch number, the pair ``(epoch, position)`` is the whole state: saving it with
:meth:`ShuffledBatches.state_dict` and restoring it with :meth:`ShuffledBatches.load_state_dict`
continues the sequence exactly where it left off.

:class:`BucketBatches` does the same for data of several shapes (aspect-ratio buckets,
:mod:`twinflow.data.buckets`): every batch holds items of one bucket only, and its state, also
``(epoch, position)``, counts batches rather than items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral

import torch
from torch import Tensor


class ShuffledBatches:
    """Endless, seeded, resumable stream of index batches over ``range(num_items)``.

    Args:
        num_items: number of items to draw from (indices ``0..num_items-1``).
        batch_size: indices per batch; must not exceed ``num_items``.
        seed: base seed; epoch ``e`` is shuffled with seed ``seed + e``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0) -> None:
        if not _is_int(num_items) or num_items < 1:
            raise ValueError(f"ShuffledBatches num_items must be a positive int, got {num_items!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"ShuffledBatches batch_size must be a positive int, got {batch_size!r}")
        if batch_size > num_items:
            raise ValueError(
                f"ShuffledBatches batch_size {batch_size} is larger than num_items {num_items}; "
                f"not even one full batch fits in an epoch"
            )
        if not _is_int(seed):
            raise ValueError(f"ShuffledBatches seed must be an int, got {seed!r}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._epoch = 0
        self._position = 0
        self._permutation: Tensor | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch is read from, unless the current one has no full batch left."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch's permutation have been handed out."""
        return self._position

    @property
    def batches_per_epoch(self) -> int:
        """Number of full batches in one epoch, ``num_items // batch_size``."""
        return self.num_items // self.batch_size

    def permutation(self, epoch: int) -> Tensor:
        """The item order of ``epoch``: ``torch.randperm(num_items)`` seeded with ``seed + epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def next_indices(self) -> Tensor:
        """Return the next ``batch_size`` indices (int64, shape ``(batch_size,)``), advancing the state."""
        if self._position + self.batch_size > self.num_items:
            self._epoch += 1
            self._position = 0
            self._permutation = None
        if self._permutation is None:
            self._permutation = self.permutation(self._epoch)
        start = self._position
        self._position += self.batch_size
        return self._permutation[start : self._position].clone()

    def state_dict(self) -> dict[str, int]:
        """The resumable state: ``{"epoch": int, "position": int}``."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a state from :meth:`state_dict`; the following batches match an uninterrupted run."""
        epoch, position = read_order_state(state, "ShuffledBatches", self.num_items)
        self._epoch = int(epoch)
        self._position = int(position)
        self._permutation = None


class BucketBatches:
    """Endless, seeded, resumable batches that each hold items of one bucket only.

    Epoch ``e`` uses ``torch.Generator().manual_seed(seed + e)`` to shuffle the members of each
    bucket (buckets in increasing id order), cuts each into full batches of ``batch_size`` (a
    bucket's incomplete tail is dropped for that epoch) and shuffles the order of all those
    batches with the same generator. The state is ``(epoch, position)``, ``position`` being the
    number of *batches* of the epoch handed out; :meth:`state_dict` / :meth:`load_state_dict`
    resume exactly, as with :class:`~twinflow.data.ShuffledBatches`.

    Args:
        bucket_ids: the bucket of every item, shape ``(N,)`` (e.g. ``CaptionedImages.bucket_ids``
            or ``CachedLatents.bucket_ids``).
        batch_size: indices per batch; some bucket must hold at least this many items.
        seed: base seed; epoch ``e`` is shuffled with seed ``seed + e``.
    """

    def __init__(self, bucket_ids: Tensor | Sequence[int], batch_size: int, seed: int = 0) -> None:
        ids = torch.as_tensor(bucket_ids)
        if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"BucketBatches bucket_ids must be a non-empty 1-D integer sequence, got {bucket_ids!r}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"BucketBatches batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(seed):
            raise ValueError(f"BucketBatches seed must be an int, got {seed!r}")
        ids = ids.to(torch.int64)
        self._members = [torch.nonzero(ids == bucket).flatten() for bucket in torch.unique(ids).tolist()]
        self.num_items = int(ids.numel())
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_epoch = sum(len(members) // self.batch_size for members in self._members)
        if self.batches_per_epoch == 0:
            sizes = sorted(len(members) for members in self._members)
            raise ValueError(
                f"BucketBatches batch_size {batch_size} is larger than every bucket (bucket sizes {sizes}); "
                f"not even one full batch fits in an epoch"
            )
        self._epoch = 0
        self._position = 0
        self._batches: list[Tensor] | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch is read from, unless the current one is used up."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many batches of the current epoch have been handed out."""
        return self._position

    def batches(self, epoch: int) -> list[Tensor]:
        """The ``batches_per_epoch`` index batches of ``epoch`` in the order they are handed out."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        pieces: list[Tensor] = []
        for members in self._members:
            shuffled = members[torch.randperm(len(members), generator=generator)]
            usable = len(shuffled) // self.batch_size * self.batch_size
            pieces.extend(shuffled[:usable].split(self.batch_size))
        order = torch.randperm(len(pieces), generator=generator).tolist()
        return [pieces[index] for index in order]

    def next_indices(self) -> Tensor:
        """Return the next ``batch_size`` indices (int64, all from one bucket), advancing the state."""
        if self._position >= self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._batches = None
        if self._batches is None:
            self._batches = self.batches(self._epoch)
        batch = self._batches[self._position]
        self._position += 1
        return batch.clone()

    def state_dict(self) -> dict[str, int]:
        """The resumable state: ``{"epoch": int, "position": int}`` (position counts batches)."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a state from :meth:`state_dict`; the following batches match an uninterrupted run."""
        epoch, position = read_order_state(state, "BucketBatches", self.batches_per_epoch)
        self._epoch = int(epoch)
        self._position = int(position)
        self._batches = None


def read_order_state(state: Mapping[str, int], owner: str, positions: int) -> tuple[int, int]:
    """Check a ``{"epoch", "position"}`` batch-order state (position in ``[0, positions]``); errors name ``owner``."""
    for key in ("epoch", "position"):
        if key not in state:
            raise ValueError(f"{owner} state is missing key {key!r}; got keys {sorted(state)}")
    epoch, position = state["epoch"], state["position"]
    if not _is_int(epoch) or epoch < 0:
        raise ValueError(f"{owner} state 'epoch' must be a non-negative int, got {epoch!r}")
    if not _is_int(position) or not 0 <= position <= positions:
        raise ValueError(f"{owner} state 'position' must be an int in [0, {positions}], got {position!r}")
    return int(epoch), int(position)


def _is_int(value: object) -> bool:
    """True for integers (Python or numpy) but not bools."""
    return isinstance(value, Integral) and not isinstance(value, bool)
