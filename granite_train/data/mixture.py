"""data.sources: several sources mixed by weight into one deterministic sequence of steps.

Each source is read in its own shuffled order (a permutation per pass, from trainer.seed, the
source's position and the pass; a source that runs out starts another pass, counted). The
sources are interleaved into one sequence: the next example always comes from the source
furthest behind its share of the tokens so far (the least tokens / share), so after every
example each source's tokens are within about one document of its share. Steps cut that
sequence greedily at trainer.tokens_per_step. None of this sees micro_batch_tokens or the number
of ranks; `plan_step` then splits each step over ranks as for single sources.

The position is the whole state: per source (pass, examples taken in it, tokens taken), so
resume is exact and costs O(sources). A mixture has no epochs: it runs for trainer.max_steps /
trainer.max_tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from granite_train.config import DataConfig, SourceConfig, TrainerConfig
from granite_train.data.docs import Example, Examples, Flat, ranges
from granite_train.data.examples import load_examples
from granite_train.data.plan import plan_step
from granite_train.data.prefetch import StepSource
from granite_train.data.stats import PrepStats
from granite_train.data.train_step import TrainStep, check_state, materialize
from granite_train.data.tokenizer import Tokenizer
from granite_train.errors import UserError

log = logging.getLogger("granite_train.data")
MIX_SALT = 0x6D6978  # "mix": the sources' pass orders, apart from single-source epoch orders


@dataclass
class MixSource:
    name: str
    share: float  # weight / sum of weights
    examples: Examples
    stats: PrepStats
    offset: int  # global example ids of this source start here

    @property
    def mean_length(self) -> float:
        return max(1.0, float(self.examples.pieces.num_tokens) / max(1, len(self.examples)))


def source_name(cfg: SourceConfig) -> str:
    if cfg.name:
        return cfg.name
    path = cfg.path.rstrip("/")
    return path.split(":", 1)[1] if path.startswith("demo:") else (Path(path).stem or path)


class _Cursor:
    """One source's position: its pass, the examples taken in that pass, the tokens taken overall."""

    def __init__(self, n: int, seed: int, index: int) -> None:
        self.n, self.seed, self.index = n, seed, index
        self.passes, self.taken, self.tokens = 0, 0, 0
        self.base = 0  # tokens when the current weights took effect: shares count from here
        self._orders: Dict[int, np.ndarray] = {}  # pass -> its order (the current pass and a few ahead)

    def order(self, p: Optional[int] = None) -> np.ndarray:
        p = self.passes if p is None else p
        if p not in self._orders:
            self._orders[p] = np.random.default_rng([self.seed, MIX_SALT, self.index, p]).permutation(self.n)
        return self._orders[p]

    def peek(self) -> int:
        return int(self.order()[self.taken])

    def advance(self, length: int) -> bool:
        """Take the peeked example; True when that ended a pass (the next one starts reshuffled)."""
        return self.take(1, length) > 0

    def upcoming(self, m: int) -> np.ndarray:
        """The local ids of the next m examples, across passes."""
        out, p, t = [], self.passes, self.taken
        while m > 0:
            chunk = self.order(p)[t: t + m]
            out.append(chunk)
            m, p, t = m - chunk.size, p + 1, 0
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def take(self, count: int, tokens: int) -> int:
        """Take the next `count` examples (`tokens` in all); returns how many passes that ended."""
        self.tokens += tokens
        ended, self.taken = divmod(self.taken + count, self.n)
        if ended:
            self.passes += ended
            self._orders = {p: o for p, o in self._orders.items() if p >= self.passes}
        return ended

    def reset_orders(self) -> None:
        self._orders = {}


class MixtureTrainData(StepSource):
    """Steps of a weighted mixture of map-style sources (raw or prepared)."""

    num_steps_per_epoch: Optional[int] = None

    def __init__(self, sources: List[MixSource], data_cfg: DataConfig, trainer_cfg: TrainerConfig, rank: int,
                 world_size: int, pad_id: int) -> None:
        self.sources = sources
        self.rank, self.world_size = rank, world_size
        self._pad_id = pad_id
        self._padded = data_cfg.packing == "none"
        self._budget = trainer_cfg.tokens_per_step
        self._micro = trainer_cfg.micro_batch_tokens
        self._seed = trainer_cfg.seed
        self._cursors = [_Cursor(len(s.examples), self._seed, k) for k, s in enumerate(sources)]
        self._step = 0
        self.prefetch_steps = data_cfg.prefetch_steps
        self.lengths = np.concatenate([s.examples.lengths for s in sources])
        self.n_trained = np.concatenate([s.examples.n_trained for s in sources])
        self._offsets = np.array([s.offset for s in sources] + [self.lengths.size], dtype=np.int64)
        self.stats = sources[0].stats if len(sources) == 1 else _combined(sources)
        self._flat = self._fetch_flat if all(s.examples.reads_flat for s in sources) else None
        self._fingerprint_now = {
            "seed": self._seed, "tokens_per_step": self._budget, "max_length": data_cfg.max_length,
            "sources": [[len(s.examples), s.examples.pieces.num_tokens] for s in sources]}

    def _select(self) -> List[List[int]]:
        """The next step's examples per source (local ids), advancing the cursors: the sequence
        of `_select_one_by_one` computed in bulk. Taking the source with the least counted
        tokens / share each time is a merge of the sources by key = (counted tokens before the
        example) / share, ties to the earlier source: sort a window of each source's next
        examples by (key, source) and cut at the budget. The cut is exact when no source's
        window is used up; otherwise that window doubles and the step is sorted again."""
        cursors, budget = self._cursors, self._budget
        windows = [max(16, int(1.5 * s.share * budget / s.mean_length) + 16) for s in self.sources]
        while True:
            ids, lens, keys, src = [], [], [], []
            for j, (s, c) in enumerate(zip(self.sources, cursors)):
                u = c.upcoming(windows[j])
                n = s.examples.lengths[u]
                before = np.cumsum(n) - n + (c.tokens - c.base)
                ids.append(u), lens.append(n), keys.append(before / s.share), src.append(np.full(u.size, j))
            order = np.lexsort((np.concatenate(src), np.concatenate(keys)))
            cum = np.cumsum(np.concatenate(lens)[order])
            n_taken = max(1, int(np.searchsorted(cum, budget, side="right")))
            counts = np.bincount(np.concatenate(src)[order[:n_taken]], minlength=len(cursors))
            short = [j for j in range(len(cursors)) if counts[j] >= windows[j]]
            if not short:
                break
            for j in short:
                windows[j] *= 2
        picked: List[List[int]] = []
        for j, c in enumerate(cursors):
            t = int(counts[j])
            picked.append(ids[j][:t].tolist())
            if c.take(t, int(lens[j][:t].sum())):
                log.info("data.sources: %s ran out in step %d; pass %d starts, reshuffled",
                         self.sources[j].name, self._step, c.passes + 1)
        return picked

    def _select_one_by_one(self) -> List[List[int]]:
        """`_select` written as the definition (the exact reference it is tested against): the next
        example of the sequence is always the source furthest behind its share (least counted
        tokens / share, ties to the earlier source), and the step ends where the next one does
        not fit. Hot (tokens_per_step / mean length picks a step, on every rank): plain Python
        ints and lists inside the loop."""
        cursors, budget = self._cursors, self._budget
        sources = range(len(cursors))
        picked: List[List[int]] = [[] for _ in sources]
        shares = [s.share for s in self.sources]
        lengths = [s.examples.lengths for s in self.sources]
        counted = [c.tokens - c.base for c in cursors]
        nexts = [int(lengths[j][c.peek()]) for j, c in enumerate(cursors)]
        used = 0
        while True:
            k = 0
            for j in sources:  # division, not a product with 1/share: no 0 * inf for tiny shares
                if counted[j] / shares[j] < counted[k] / shares[k]:
                    k = j
            n = nexts[k]
            if used and used + n > budget:
                return picked  # the step is full; this example opens the next one
            c = cursors[k]
            picked[k].append(c.peek())
            used += n
            counted[k] += n
            if c.advance(n):
                log.info("data.sources: %s ran out at step %d (%d tokens so far); pass %d starts, reshuffled",
                         self.sources[k].name, self._step, c.tokens, c.passes + 1)
            nexts[k] = int(lengths[k][c.peek()])

    def _fetch(self, ids: Sequence[int]) -> Dict[int, Example]:
        out: Dict[int, Example] = {}
        ids = np.asarray(ids, dtype=np.int64)
        which = np.searchsorted(self._offsets, ids, side="right") - 1
        for k in np.unique(which).tolist():
            mine = ids[which == k]
            got = self.sources[k].examples.fetch((mine - self._offsets[k]).tolist())
            out.update({int(g): got[int(g - self._offsets[k])] for g in mine})
        return out

    def _fetch_flat(self, ids: Sequence[int]) -> Flat:
        """The examples `ids` in order, flattened: each source's share in one gather, placed."""
        ids = np.asarray(ids, dtype=np.int64)
        lengths = self.lengths[ids]
        tokens = np.empty(int(lengths.sum()), dtype=np.int64)
        labels = np.empty_like(tokens)
        before = np.cumsum(lengths) - lengths
        which = np.searchsorted(self._offsets, ids, side="right") - 1
        for k in np.unique(which).tolist():
            sel = np.flatnonzero(which == k)
            x, y, n = self.sources[k].examples.fetch_flat(ids[sel] - self._offsets[k])
            out = ranges(before[sel], n)
            tokens[out] = x
            labels[out] = x if y is None else y
        return tokens, labels, lengths

    def _produce(self) -> Iterator[TrainStep]:
        while True:
            before = [c.tokens for c in self._cursors]
            picked = self._select()
            flat = np.concatenate([self._offsets[k] + np.asarray(ids, dtype=np.int64)
                                   for k, ids in enumerate(picked)])
            p = plan_step(flat, self.lengths, self.n_trained, epoch=0, step_in_epoch=self._step,
                          micro_batch_tokens=self._micro, world_size=self.world_size, padded=self._padded)
            self._step += 1
            names = [s.name for s in self.sources]
            yield TrainStep(self._step - 1, 0, self._step - 1,
                            materialize(p, self.rank, self._fetch, self._padded, self._pad_id, self._flat),
                            p.num_trained_tokens, p.num_input_tokens, p.num_slots, p.example_ids,
                            source_tokens={n: c.tokens - b for n, c, b in zip(names, self._cursors, before)},
                            source_tokens_seen={n: c.tokens for n, c in zip(names, self._cursors)})

    def _position(self) -> Dict[str, Any]:
        return {"kind": "mixture", "step": self._step, "global_step": self._step,
                "sources": [{"name": s.name, "share": s.share, "passes": c.passes, "taken": c.taken,
                             "tokens": c.tokens, "base": c.base} for s, c in zip(self.sources, self._cursors)],
                "fingerprint": self._fingerprint_now}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        check_state(state, "mixture", self._fingerprint_now)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._stop()  # a live steps() would set its own position back when closed
        self.check_state_dict(state)
        self._set_position(state)

    def _set_position(self, state: Dict[str, Any]) -> None:
        self._step = int(state["step"])
        reweighted = any(abs(float(saved["share"]) - s.share) > 1e-12 for s, saved in zip(self.sources, state["sources"]))
        for c, saved in zip(self._cursors, state["sources"]):
            c.passes, c.taken, c.tokens = int(saved["passes"]), int(saved["taken"]), int(saved["tokens"])
            c.base = c.tokens if reweighted else int(saved["base"])
            c.reset_orders()
        if reweighted and self.rank == 0:
            log.info("data.sources: weights changed since the checkpoint (%s -> %s); every source continues where "
                     "it was and the new shares count from step %d", [round(float(x["share"]), 4) for x in state["sources"]],
                     [round(s.share, 4) for s in self.sources], self._step)


def _combined(sources: List[MixSource]) -> PrepStats:
    stats = PrepStats(source="mixture of " + ", ".join(f"{s.name} ({s.share:.3g})" for s in sources))
    for s in sources:
        stats.add_counts(s.stats.counts())
    return stats


def build_mixture(data_cfg: DataConfig, trainer_cfg: TrainerConfig, tokenizer: Tokenizer, rank: int,
                  world_size: int) -> MixtureTrainData:
    t0 = time.perf_counter()
    total = sum(float(s.weight) for s in data_cfg.sources)
    tiny = [k for k, s in enumerate(data_cfg.sources) if float(s.weight) / total < 1e-9]
    if tiny:
        raise UserError(f"data.sources[{tiny[0]}].weight={data_cfg.sources[tiny[0]].weight} is below 1e-9 of the "
                        f"weights' sum: raise it or leave the source out")
    sources: List[MixSource] = []
    offset = 0
    names = [source_name(src) for src in data_cfg.sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"data.sources: two sources are named {twice[0]!r}; give them distinct names "
                        f"(data.sources[k].name)")
    for k, src in enumerate(data_cfg.sources):
        cfg = replace(data_cfg, path=src.path, sources=[], format=src.format or data_cfg.format)
        try:
            loaded = load_examples(cfg, trainer_cfg, tokenizer)
        except UserError as e:  # name the source as the config does
            raise UserError(str(e).replace(f"data.path={src.path}", f"data.sources[{k}].path={src.path}")) from None
        name = names[k]
        sources.append(MixSource(name, float(src.weight) / total, loaded.examples, loaded.stats, offset))
        offset += len(loaded.examples)
        loaded.stats.set_lengths(loaded.examples.lengths)
        log.info("data.sources[%d] %s, share %.4g: %s", k, name, float(src.weight) / total, loaded.stats.report())
    data = MixtureTrainData(sources, data_cfg, trainer_cfg, rank, world_size, tokenizer.eos_token_id)
    data.stats.set_lengths(data.lengths)
    data.stats.seconds = time.perf_counter() - t0
    log.info(data.stats.report())
    return data
