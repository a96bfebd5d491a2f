"""The federation engine: clients hosted by ranks, local training, ONE all-reduce per round.

Its modules: ``clients`` (the client record and the seeded draws of who trains when), ``core`` (the round),
``snapshot`` (the round's copy of the global model and the passes over the weights), ``state`` (what a
client keeps between rounds).

The engine knows models, datasets and process groups, not files or grades: a
client is a name, a sample count, something to train on and a state that
persists between rounds. A rank hosts one or more clients (hospital ``i`` of
``N`` lives on rank ``i mod W``). Each round a rank trains its participating
clients one after another, each from the global model, and accumulates their
sample-weighted models into one buffer; then one all-reduce gives every rank
the weighted mean, and every rank applies the same server step
(:mod:`fedsim.strategies`). With SCAFFOLD the clients' control-variate updates
ride in the same all-reduce.

The figures of a client's update, with ``w_g`` the round's global weights,
``w_k`` the client's after local training and ``w_new`` the aggregate:
``drift`` = ||w_k - w_g||, ``rel_drift`` = drift / ||w_g||, ``divergence`` =
||w_k - w_new||, ``cosine`` = cos(w_k - w_g, w_new - w_g) and
``global_update_norm`` = ||w_new - w_g||. A diverging client shows a drift
that grows round over round while the others settle, a low or negative
cosine, and a growing divergence.

Every draw depends on (seed, round, client index, purpose) alone: the
participants of a round, a client's drop-out or straggling, its data order and
augmentation are the same whatever the number of ranks.
"""

from fedsim.engine.clients import Client, ClientId, ClientOutcome, EngineSettings, Faults, hosted_by, participants
from fedsim.engine.core import Engine
from fedsim.engine.snapshot import SKETCH_SIZE, Snapshot
from fedsim.engine.state import ClientStateStore, local_tensors, set_local_tensors

__all__ = [
    "SKETCH_SIZE",
    "Client",
    "ClientId",
    "ClientOutcome",
    "ClientStateStore",
    "Engine",
    "EngineSettings",
    "Faults",
    "Snapshot",
    "hosted_by",
    "local_tensors",
    "participants",
    "set_local_tensors",
]
