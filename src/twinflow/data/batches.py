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

import torch
from torch import Tensor

from twinflow.checks import is_integer


class EpochOrder:
    """The shared mechanics of a resumable batch order: state ``(epoch, position)``, an epoch's
    order drawn once from ``seed + epoch``, and the next batch taken from it.

    Subclasses say how an epoch is ordered (:meth:`epoch_order`), how many positions an epoch has
    (``positions``) and how many one batch uses (``step``: items or one batch), and how a batch
    is read from the order (:meth:`take`).
    """

    positions: int  # positions in one epoch
    step: int  # positions one batch uses

    def __init__(self) -> None:
        self._epoch = 0
        self._position = 0
        self._order = None

    @property
    def epoch(self) -> int:
        """The epoch the next batch is read from, unless the current one has no full batch left."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many positions of the current epoch have been handed out."""
        return self._position

    def epoch_order(self, epoch: int):
        raise NotImplementedError

    def take(self, order, position: int) -> Tensor:
        raise NotImplementedError

    def next_indices(self) -> Tensor:
        """Return the next batch of indices (int64), advancing the state."""
        if self._position + self.step > self.positions:
            self._epoch += 1
            self._position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self._epoch)
        batch = self.take(self._order, self._position)
        self._position += self.step
        return batch.clone()

    def state_dict(self) -> dict[str, int]:
        """The resumable state: ``{"epoch": int, "position": int}``."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a state from :meth:`state_dict`; the following batches match an uninterrupted run."""
        self._epoch, self._position = read_order_state(state, type(self).__name__, self.positions)
        self._order = None


class ShuffledBatches(EpochOrder):
    """Endless, seeded, resumable stream of index batches over ``range(num_items)``.

    Args:
        num_items: number of items to draw from (indices ``0..num_items-1``).
        batch_size: indices per batch; must not exceed ``num_items``.
        seed: base seed; epoch ``e`` is shuffled with seed ``seed + e``.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0) -> None:
        if not is_integer(num_items) or num_items < 1:
            raise ValueError(f"ShuffledBatches num_items must be a positive int, got {num_items!r}")
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"ShuffledBatches batch_size must be a positive int, got {batch_size!r}")
        if batch_size > num_items:
            raise ValueError(
                f"ShuffledBatches batch_size {batch_size} is larger than num_items {num_items}; "
                f"not even one full batch fits in an epoch"
            )
        if not is_integer(seed):
            raise ValueError(f"ShuffledBatches seed must be an int, got {seed!r}")
        super().__init__()
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.positions, self.step = self.num_items, self.batch_size  # the position counts items

    @property
    def batches_per_epoch(self) -> int:
        """Number of full batches in one epoch, ``num_items // batch_size``."""
        return self.num_items // self.batch_size

    def permutation(self, epoch: int) -> Tensor:
        """The item order of ``epoch``: ``torch.randperm(num_items)`` seeded with ``seed + epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def epoch_order(self, epoch: int) -> Tensor:
        return self.permutation(epoch)

    def take(self, order: Tensor, position: int) -> Tensor:
        return order[position : position + self.batch_size]


class BucketBatches(EpochOrder):
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
        if not is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"BucketBatches batch_size must be a positive int, got {batch_size!r}")
        if not is_integer(seed):
            raise ValueError(f"BucketBatches seed must be an int, got {seed!r}")
        super().__init__()
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
        self.positions, self.step = self.batches_per_epoch, 1  # the position counts batches

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

    def epoch_order(self, epoch: int) -> list[Tensor]:
        return self.batches(epoch)

    def take(self, order: list[Tensor], position: int) -> Tensor:
        return order[position]


def read_order_state(state: Mapping[str, int], owner: str, positions: int) -> tuple[int, int]:
    """Check a ``{"epoch", "position"}`` batch-order state (position in ``[0, positions]``); errors name ``owner``."""
    for key in ("epoch", "position"):
        if key not in state:
            raise ValueError(f"{owner} state is missing key {key!r}; got keys {sorted(state)}")
    epoch, position = state["epoch"], state["position"]
    if not is_integer(epoch) or epoch < 0:
        raise ValueError(f"{owner} state 'epoch' must be a non-negative int, got {epoch!r}")
    if not is_integer(position) or not 0 <= position <= positions:
        raise ValueError(f"{owner} state 'position' must be an int in [0, {positions}], got {position!r}")
    return int(epoch), int(position)


