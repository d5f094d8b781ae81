"""The training API in one import, for code written against `chatsmith.train.loop` before it was split.

chatsmith's own modules import from where each piece lives:

    config       TrainConfig, check_train_config           optim       build_optimizer, build_scheduler, ...
    batching     ShardedBatchSource, move_to_device        checkpoint  Checkpointer, save_final_model
    devices      resolve_dtype, autocast_context, ...      progress    Progress, TensorBoardWriter
    parallel     all_reduce_sum, sum_over_ranks, ...       run         Run, Stage, TrainResult, TrainingDiverged
    supervised   Trainer, evaluate_loss, lm_loss_on_targets
"""

from chatsmith.train.batching import BatchSource, ShardedBatchSource, move_to_device
from chatsmith.train.checkpoint import Checkpointer, save_final_model
from chatsmith.train.config import TrainConfig
from chatsmith.train.devices import LossModule, autocast_context, resolve_dtype, unwrap_model
from chatsmith.train.optim import build_optimizer, build_scheduler, keep_frozen_weights, lr_multiplier
from chatsmith.train.parallel import all_reduce_gradients, all_reduce_sum, sum_over_ranks
from chatsmith.train.progress import Progress
from chatsmith.train.run import Run, Stage, TrainingDiverged, TrainResult
from chatsmith.train.supervised import Trainer, default_count_targets, evaluate_loss, lm_loss_on_targets
from chatsmith.utils import MetricsLogger

__all__ = [
    "TrainConfig", "build_optimizer", "build_scheduler", "keep_frozen_weights", "lr_multiplier", "Checkpointer",
    "BatchSource", "ShardedBatchSource", "Progress", "MetricsLogger", "Trainer", "TrainResult", "LossModule",
    "TrainingDiverged", "default_count_targets", "evaluate_loss", "move_to_device", "autocast_context",
    "resolve_dtype", "unwrap_model", "lm_loss_on_targets", "save_final_model", "all_reduce_sum",
    "sum_over_ranks", "all_reduce_gradients", "Run", "Stage",
]
