"""How a model is cut over ranks: one home for parallelism.

`parallelize.parallelize(model, cfg, env)` is the one place that decides it, in a fixed
order, and returns the `Engine` the trainer steps, whose `plan` (`ParallelPlan`) says what was
done. The model itself knows nothing of ranks: expert parallelism hands each MoE layer a
dispatcher, DeepSpeed wraps the whole model.

- env.py: rank, world, device, precision; the process group
- plan.py: ParallelPlan / ExpertParallelPlan (which weights are experts', their groups)
- expert_parallel.py: experts split over ranks, the all-to-all dispatcher
- engine.py: the Engine interface, plain data parallel
- deepspeed_engine.py: DeepSpeed ZeRO 0-3
- grad_norm.py: global-norm clipping, experts counted once
"""

from granite_train.parallel.engine import Engine
from granite_train.parallel.env import Env, init_env, main_rank_first
from granite_train.parallel.plan import ExpertParallelPlan, ParallelPlan

__all__ = ["Engine", "Env", "ExpertParallelPlan", "ParallelPlan", "init_env", "main_rank_first"]
