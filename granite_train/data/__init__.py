"""Data pipeline: sources -> tokenized examples -> token-budgeted optimizer steps -> micro-batches.

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.path)
    data = build_train_data(cfg.data, cfg.trainer, tokenizer, rank, world_size,
                            gather=gather_ints(env))  # gather: streams shared by rank, several ranks
    for step in data.steps():
        step.micro_batches  # this rank's; step.num_trained_tokens etc. are global
"""

from granite_train.data.collator import collate_packed, collate_padded, empty_micro_batch, is_empty
from granite_train.data.eval import EvalData, build_eval_data
from granite_train.data.train_data import StreamTrainData, TrainData, TrainStep, build_train_data
from granite_train.data.stats import PrepStats
from granite_train.data.tokenizer import Tokenizer, granite_chat_template, load_tokenizer

__all__ = [
    "EvalData", "PrepStats", "StreamTrainData", "Tokenizer", "TrainData", "TrainStep", "build_eval_data",
    "build_train_data",
    "collate_packed", "collate_padded", "empty_micro_batch", "granite_chat_template", "is_empty",
    "load_tokenizer",
]
