"""Expert parallelism over ``torch.distributed`` (the only package that talks to it).

``MoELayer(..., group=pg)`` spreads its experts over ``pg``; see ``placement`` for
where experts live and what a plan changes, ``expert_parallel`` for the exchange, and
``runtime`` for launching and the data-parallel recipe.
"""

from flexmoe.parallel.comm import CollectiveTimeoutError
from flexmoe.parallel.expert_parallel import ExpertParallel
from flexmoe.parallel.placement import Placement
from flexmoe.parallel.runtime import (
    all_ranks_ok,
    all_reduce_mean,
    barrier,
    clip_grad_norm_,
    ddp_ignore_expert_parameters,
    expert_parameters,
    init_distributed,
    is_distributed,
    is_expert_parameter,
    rank_and_world,
    scale_expert_gradients,
    shutdown,
    stable_hash,
    tag_expert_parameters,
    wrap_data_parallel,
)

__all__ = [
    "CollectiveTimeoutError",
    "ExpertParallel",
    "Placement",
    "all_ranks_ok",
    "all_reduce_mean",
    "barrier",
    "clip_grad_norm_",
    "ddp_ignore_expert_parameters",
    "expert_parameters",
    "init_distributed",
    "is_distributed",
    "is_expert_parameter",
    "rank_and_world",
    "scale_expert_gradients",
    "shutdown",
    "stable_hash",
    "tag_expert_parameters",
    "wrap_data_parallel",
]
