"""The family-agnostic Lightning engine: `ZooSystem` (loss sum, non-finite policy, logging, metrics, optimisers),
stages (one mechanism for every schedule), auxiliary (frozen helper models trained by a real Trainer) and the
shared callbacks. No family knowledge lives here."""

from zoo.engine.auxiliary import Auxiliary, load_auxiliary_checkpoints, prepare_auxiliaries
from zoo.engine.stages import Stage
from zoo.engine.system import ZooSystem

__all__ = ["Auxiliary", "Stage", "ZooSystem", "load_auxiliary_checkpoints", "prepare_auxiliaries"]
