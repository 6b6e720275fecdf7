"""Steps made ahead on a background thread while the current one trains (data.prefetch_steps).

Making a step (the split over ranks and micro-batches, reading its tokens, collating; for streams
also tokenizing) is host work the accelerator would otherwise wait for on every step. A thread
makes the next steps into a bounded queue; tokenizers, numpy and the memory-mapped reads release
the GIL for their heavy parts. The steps and their order are exactly those made without it.

The data position then runs ahead of training, so every step comes with a snapshot of the
position after it, and a data source's `state_dict()` is the snapshot of the last step handed
out, never the thread's live position.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Dict, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")
_END = object()
POLL_S = 0.1  # how often a thread blocked on a full queue checks whether it should stop


def run_ahead(items: Iterator[T], depth: int, name: str = "granite-train-data") -> Iterator[T]:
    """`items`, made up to `depth` ahead on a daemon thread (depth 0: on the caller's thread).
    An exception in `items` is raised here, at the item it replaced. Closing this generator
    stops the thread and waits for it, so nothing runs ahead of the consumer afterwards."""
    if depth <= 0:
        yield from items
        return
    box: "queue.Queue[Tuple[Any, Optional[BaseException]]]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: Tuple[Any, Optional[BaseException]]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((_END, exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = box.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


class StepSource:
    """What the kinds of train data share: `steps()` made ahead (`run_ahead`), and a position
    that is always the last step handed out.

    A subclass makes steps in `_produce` (which advances its own position, on the data thread)
    and says its position in `_position()` / sets it in `_set_position()`; `_main` may finish
    each made item on the caller's thread (collectives must run there) into (step, state)."""

    prefetch_steps: int = 0
    _last: Optional[Dict[str, Any]] = None  # the position after the last step handed out
    _running: Any = None  # a weak reference to the live steps() generator, if any

    def _produce(self) -> Iterator[Any]:
        raise NotImplementedError

    def _position(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _set_position(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def _made(self) -> Iterator[Tuple[Any, Dict[str, Any]]]:
        for item in self._produce():  # on the data thread: the position right after each item
            yield item, self._position()

    def _main(self, made: Iterator[Tuple[Any, Dict[str, Any]]]) -> Iterator[Tuple[Any, Dict[str, Any]]]:
        return made

    def steps(self) -> Iterator[Any]:
        """Optimizer steps from the current position. A second call first stops the first; so
        does `load_state_dict` (`_stop`). An abandoned generator stops its thread when it is
        collected (held here only weakly), or at once with `contextlib.closing`."""
        self._stop()
        running = self._steps()
        self._running = weakref.ref(running)
        return running

    def _stop(self) -> None:
        """Stop the live steps() generator, if any: its thread ends, the position is the last step handed out."""
        running = self._running() if self._running is not None else None
        if running is not None:
            running.close()
        self._running = None

    def _steps(self) -> Iterator[Any]:
        self._last = self._position()
        made = run_ahead(self._made(), self.prefetch_steps)
        try:
            for step, state in self._main(made):
                self._last = state
                yield step
        finally:
            made.close()  # the thread is stopped: the position is ours again
            last, self._last, self._running = self._last, None, None
            self._set_position(last)

    def state_dict(self) -> Dict[str, Any]:
        return dict(self._last) if self._last is not None else self._position()
