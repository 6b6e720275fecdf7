"""One optimizer step of data, as every data source yields it, and what all sources share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from granite_train.data.collator import MicroBatch, collate_flat, collate_packed, collate_padded, empty_micro_batch
from granite_train.data.plan import StepPlan
from granite_train.errors import UserError


@dataclass
class TrainStep:
    index: int  # optimizer steps yielded before this one since training began (0-based, all epochs)
    epoch: int
    step_in_epoch: int
    micro_batches: List[MicroBatch]  # this rank's, CPU tensors; the same count on every rank
    num_trained_tokens: int  # GLOBAL over ranks and micro-batches
    num_input_tokens: int  # GLOBAL
    num_slots: int  # GLOBAL
    # GLOBAL: ids of this step's examples (pieces; streams: raw row numbers; mixtures: offset by source).
    example_ids: List[int] = field(default_factory=list)
    # Mixtures (data.sources): GLOBAL input tokens of this step per source, and through this step.
    source_tokens: Dict[str, int] = field(default_factory=dict)
    source_tokens_seen: Dict[str, int] = field(default_factory=dict)

    @property
    def packing_efficiency(self) -> float:
        return self.num_input_tokens / self.num_slots if self.num_slots else 0.0


def materialize(plan: StepPlan, rank: int, fetch, padded: bool, pad_id: int, fetch_flat=None) -> List[MicroBatch]:
    """This rank's micro-batch tensors; `fetch(ids)` returns {id: example dict}. Packed, with
    `fetch_flat(ids)` (the examples flattened, `docs.Flat`), each micro-batch is read in one
    vectorized gather instead (the same tensors)."""
    mine = plan.ranks[rank]
    if fetch_flat is not None and not padded:
        return [collate_flat(*fetch_flat(list(mb))) if mb else empty_micro_batch(False) for mb in mine]
    examples = fetch(sorted({i for mb in mine for i in mb}))
    out = []
    for mb in mine:
        if not mb:
            out.append(empty_micro_batch(padded))
        elif padded:
            out.append(collate_padded([examples[i] for i in mb], pad_id))
        else:
            out.append(collate_packed([examples[i] for i in mb]))
    return out


# Fingerprint keys newer than some saved states, and the value those states had.
ADDED_KEYS = {"overlong": "truncate",  # before data.overlong=auto, long documents were truncated
              "share": "all"}  # before data.stream_share, every rank read the whole stream
# The setting a changed fingerprint key names, to reproduce the checkpoint's data.
SETTING_OF = {"overlong": "data.overlong", "share": "data.stream_share"}


def check_fingerprint(saved: Dict[str, Any], now: Dict[str, Any]) -> None:
    old = {**{k: v for k, v in ADDED_KEYS.items() if k not in saved}, **saved}
    changed = [k for k in now if old.get(k) != now[k]]
    if "ranks" in old and "ranks" not in now:  # a stream shared by rank, resumed on one rank or shared by all
        changed.append("ranks")
    if changed:
        named = [f"{SETTING_OF[k]}={old.get(k)}" for k in changed if k in SETTING_OF and k in old]
        hint = f" ({' '.join(named)} reproduces the checkpoint's examples)" if named else ""
        if "ranks" in changed and old.get("ranks") is not None:
            hint += f" (a stream shared by rank resumes on the same {old['ranks']} data-parallel ranks)"
        text = ", ".join(f"{k} {old.get(k)} -> {now.get(k)}" for k in changed)
        raise UserError(f"cannot resume the data position: {text} changed since the "
                        f"checkpoint{hint}; restore those settings (data, data.overlong, data.eval_fraction, "
                        f"trainer.seed, tokens_per_step, max_length, packing) or start a fresh run")


# How a refusal names the kind of data a state came from.
_KINDS = {"map": "map-style data (data.path, data.streaming=false)", "stream": "a stream (data.streaming=true)",
          "mixture": "a data.sources mixture"}


def check_state(state: Dict[str, Any], kind: str, fingerprint: Dict[str, Any]) -> None:
    """One UserError line when a checkpoint's data `state` is of another kind or fixed another
    data order than `fingerprint`."""
    saved = state.get("kind")
    if saved != kind:
        raise UserError(f"the checkpoint's data state is from {_KINDS.get(saved, repr(saved))} and this run reads "
                        f"{_KINDS[kind]}; resume with the checkpoint's data settings or start a fresh run")
    check_fingerprint(state.get("fingerprint", {}), fingerprint)
