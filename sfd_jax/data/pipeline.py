"""Deterministic, resumable training batches and a background prefetcher.

The batch at step k is a pure function of (dataset, batch size, seed, label filter, k): resuming at step k
yields exactly the batches an uninterrupted run would have seen, on any number of processes. This replaces the
original's EDM-style ``InfiniteSampler`` (rolling-window shuffle, rank-strided) with plain epoch permutations;
the order of examples therefore differs from the original's, the distribution (uniform, without replacement
within an epoch) does not.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from sfd_jax.data.images import ImageDataset, check_keep, flip_where, to_model_space

_FLIP_TAG = 0x666C6970   # 'flip': keeps the flip seeds [seed, TAG, step] apart from the epoch seeds [seed, epoch]


class BatchStream:
    """Global batches from an infinite sequence of epoch permutations, sliced per process.

    The stream is perm(0) ++ perm(1) ++ ... with perm(e) = ``np.random.default_rng([seed, e]).permutation(M)``
    over the M kept examples (all of them, or those whose label is in ``labels_keep``, in dataset order). The
    global batch at step k is stream positions [k*B, (k+1)*B) (batches run across epoch boundaries). Flips are
    drawn for the whole global batch from ``default_rng([seed, 0x666C6970, step])``, so the per-process slices
    concatenate to the global batch exactly.

    Args:
      dataset: an :class:`ImageDataset`.
      batch_size: the global batch B (over all processes); must be divisible by ``process_count``.
      seed: stream seed (the run's seed).
      flip: RandomHorizontalFlip(0.5) (config.data.random_flip).
      labels_keep: optional labels to keep (e.g. the remain classes); None keeps all.
      process_index, process_count: this process's slice; default ``jax.process_index()/process_count()``.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, seed: int = 0, flip: bool = True,
                 labels_keep: Sequence[int] | None = None, process_index: int | None = None,
                 process_count: int | None = None):
        if process_index is None or process_count is None:
            import jax
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        if batch_size % process_count:
            raise ValueError(f"global batch_size {batch_size} is not divisible by the process count "
                             f"{process_count}; choose a multiple of {process_count}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.flip = bool(flip)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.batch_size // self.process_count
        if labels_keep is None:
            self.indices = np.arange(len(dataset))
        else:
            keep = check_keep(labels_keep, dataset.n_classes, dataset.name)
            self.indices = np.flatnonzero(np.isin(dataset.labels, keep))
        if len(self.indices) == 0:
            raise ValueError(f"{dataset.name}: no examples to draw from (dataset size {len(dataset)}, "
                             f"labels_keep={None if labels_keep is None else list(labels_keep)})")
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def from_config(cls, dataset: ImageDataset, config, *, labels_keep=None, **kw) -> "BatchStream":
        """Batch size ``config.training.batch_size``, seed ``config.seed``, flip ``config.data.random_flip``.

        Refuses the original's data options we do not implement (logit transform, dequantisation,
        rescaled=False) with an error naming the key.
        """
        d = config.data
        for k in ("logit_transform", "uniform_dequantization", "gaussian_dequantization"):
            if d.get(k, False):
                raise ValueError(f"config.data.{k}=True is not supported (the SFD recipes leave it False)")
        if not d.get("rescaled", True):
            raise ValueError("config.data.rescaled=False is not supported (images are fed in [-1, 1])")
        return cls(dataset, config.training.batch_size, seed=config.get("seed", 0),
                   flip=d.get("random_flip", True), labels_keep=labels_keep, **kw)

    def __len__(self) -> int:
        """Number of examples drawn from (after label filtering)."""
        return len(self.indices)

    @property
    def steps_per_epoch(self) -> float:
        return len(self.indices) / self.batch_size

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            self._perms[epoch] = p
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return p

    def positions_to_indices(self, start: int, stop: int) -> np.ndarray:
        """Dataset indices of stream positions [start, stop)."""
        pos = np.arange(start, stop, dtype=np.int64)
        m = len(self.indices)
        epochs, offsets = pos // m, pos % m
        out = np.empty(len(pos), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return self.indices[out]

    def global_indices(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch at ``step`` (int64 [B])."""
        return self.positions_to_indices(step * self.batch_size, (step + 1) * self.batch_size)

    def _flips(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _FLIP_TAG, step]).random(self.batch_size) < 0.5

    def _batch(self, step: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        idx = self.positions_to_indices(step * self.batch_size + lo, step * self.batch_size + hi)
        images = to_model_space(self.dataset.images[idx])
        if self.flip:
            images = flip_where(images, self._flips(step)[lo:hi])
        return np.ascontiguousarray(images), self.dataset.labels[idx].astype(np.int32)

    def local_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's contiguous slice of the global batch at ``step``.

        Returns (images float32 [B/P, H, W, C] in [-1, 1], flipped when ``flip``; labels int32 [B/P]).
        """
        b = self.local_batch_size
        return self._batch(step, self.process_index * b, (self.process_index + 1) * b)

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole global batch at ``step`` (every process's slice, in process order)."""
        return self._batch(step, 0, self.batch_size)

    def iterate(self, start_step: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """local_batch(start_step), local_batch(start_step + 1), ... forever."""
        step = start_step
        while True:
            yield self.local_batch(step)
            step += 1

    def __iter__(self):
        return self.iterate(0)


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(source, to_device, q: queue.Queue, stop: threading.Event) -> None:
    # A plain function (no reference to the Prefetcher), so an abandoned Prefetcher can be collected and its
    # __del__ stops this thread.
    try:
        for item in source:
            if stop.is_set():
                return
            if to_device is not None:
                item = to_device(item)
            if not _put(q, stop, item):
                return
        _put(q, stop, _END)
    except BaseException as e:   # handed to the consumer, re-raised there
        _put(q, stop, _Raised(e))


class Prefetcher:
    """Iterator over ``iterator``'s items, produced ``size`` ahead by a daemon thread (see :func:`prefetch`)."""

    def __init__(self, iterator: Iterable, size: int = 2, to_device: Callable | None = None):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=_produce, args=(iter(iterator), to_device, self._queue, self._stop),
                                        name="sfd-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True          # producer stopped (closed) without a final item
                    raise StopIteration
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.exc
        return item

    def close(self, timeout: float = 5.0) -> None:
        """Stop the producer thread and drop queued items (idempotent)."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass


def prefetch(iterator: Iterable, size: int = 2, to_device: Callable | None = None) -> Prefetcher:
    """Run ``iterator`` (and ``to_device`` on each item) ``size`` items ahead in a daemon thread.

    An exception in the iterator or in ``to_device`` is re-raised by the consumer's ``next()`` at the point it
    occurred in the sequence. Use as a context manager or call ``close()`` to stop the thread early. With
    ``to_device=device_put_fn(sharding)`` host→device copies overlap the running step.
    """
    return Prefetcher(iterator, size=size, to_device=to_device)


def device_put_fn(sharding) -> Callable:
    """A ``to_device`` for :func:`prefetch`: each process's local batch (a pytree of numpy arrays, leading axis
    = local batch) becomes one global ``jax.Array`` laid out by ``sharding`` (e.g. ``parallel.batch_sharding``)."""
    import jax

    def put(tree):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), tree)

    return put
