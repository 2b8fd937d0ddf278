"""Checkpoints: ``safetensors`` files plus a JSON manifest; re-shardable, atomic, checked on load.

Layout of a checkpoint directory ``DIR``::

    DIR/LATEST                      name of the newest completed checkpoint (atomically replaced)
    DIR/step-000120/manifest.json   format, step, world size, MoE layer configs, file index, extra
    DIR/step-000120/model.safetensors         every non-expert tensor (written by rank 0)
    DIR/step-000120/experts-rank0.safetensors whole experts, one tensor per expert

What a checkpoint guarantees:

- **Nothing completed is lost.** A save writes and fsyncs everything in a ``.partial``
  directory, then publishes it; ``LATEST`` always names a complete checkpoint, whichever
  point a crash (or ``kill -9``) interrupts, re-saves of an existing step included.
  Retention keeps ``keep`` checkpoints by the step in their manifests and never deletes
  the one just written or the one ``LATEST`` names (see ``directory``).
- **Re-shardable.** Experts are stored whole, per expert, whatever the world size and
  placement that wrote them; any world size loads them (see ``layout``).
- **Checked before anything loads.** Every name in ``LATEST`` and the manifest stays
  inside the checkpoint; every tensor of the model, the experts and the optimizer state
  has the model's dtype and shape; nothing is missing or extra. Otherwise
  ``CheckpointError`` names the culprit and the model and optimizer are untouched. No
  code runs on load: JSON and safetensors only, no pickle.

Every rank calls ``save_checkpoint`` / ``load_checkpoint`` (collectives when the model has
distributed MoE layers). ``torch.distributed.checkpoint`` is not used: its resharding needs
DTensor-sharded parameters (flexmoe shards gated experts in two halves and permutes them
by placement), its Hugging Face storage holds tensors only (optimizer values and groups
would still need this manifest), and it leaves atomic publication and retention to the
caller.
"""

from flexmoe.checkpoint.directory import latest_checkpoint
from flexmoe.checkpoint.errors import CheckpointError
from flexmoe.checkpoint.load import load_checkpoint
from flexmoe.checkpoint.save import save_checkpoint

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
