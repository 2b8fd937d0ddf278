"""Expert parallelism over ``torch.distributed`` (the only package that talks to it).

It moves tensors between ranks and decides nothing: ``MoELayer(..., group=pg)`` spreads
its experts over ``pg``; ``expert_parallel`` runs a step's exchange and expert compute
under a given plan (``routes`` says where rows travel), ``layout`` makes the step's
global capacity decision from exchanged counts, ``moves`` re-places experts in place,
``comm`` holds the collectives and ``runtime`` launching and the data-parallel recipe.
It imports neither the planner nor the layer.
"""

from flexmoe.parallel.comm import CollectiveTimeoutError
from flexmoe.parallel.expert_parallel import ExpertParallel
from flexmoe.parallel.moves import MoveReport, move_experts
from flexmoe.parallel.runtime import (
    all_ranks_ok,
    all_reduce_mean,
    all_reduce_sum_,
    barrier,
    clip_grad_norm_,
    ddp_ignore_expert_parameters,
    expert_copies,
    expert_parameters,
    init_distributed,
    is_distributed,
    is_expert_parameter,
    on_every_rank,
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
    "MoveReport",
    "all_ranks_ok",
    "all_reduce_mean",
    "all_reduce_sum_",
    "barrier",
    "clip_grad_norm_",
    "ddp_ignore_expert_parameters",
    "expert_copies",
    "expert_parameters",
    "init_distributed",
    "is_distributed",
    "is_expert_parameter",
    "move_experts",
    "on_every_rank",
    "rank_and_world",
    "scale_expert_gradients",
    "shutdown",
    "stable_hash",
    "tag_expert_parameters",
    "wrap_data_parallel",
]
