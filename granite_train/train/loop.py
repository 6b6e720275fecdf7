"""`train(cfg)`: the training entry point the CLI calls (`python -m granite_train`); the work is
`train.trainer.Trainer`'s."""

from granite_train.train.trainer import Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "train"]
