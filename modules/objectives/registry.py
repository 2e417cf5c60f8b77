"""The objectives by the name a saved model records (objective.json), to rebuild the one it was trained with."""

from __future__ import annotations

from modules.config import DDPMArguments, FlowArguments, UserError, VAEArguments
from modules.objectives.autoencoder import VAEObjective
from modules.objectives.ddpm import DDPMObjective
from modules.objectives.flow import FlowObjective
from modules.objectives.meanflow import MeanFlowObjective
from modules.objectives.protocol import Objective
from modules.records import OBJECTIVE_FILE, from_dict

# name -> (objective class, its settings dataclass)
OBJECTIVES = {
    FlowObjective.name: (FlowObjective, FlowArguments),
    MeanFlowObjective.name: (MeanFlowObjective, FlowArguments),
    DDPMObjective.name: (DDPMObjective, DDPMArguments),
    VAEObjective.name: (VAEObjective, VAEArguments),
}


def objective_from_config(config: dict) -> Objective:
    """Rebuild the objective recorded next to a saved model: {"objective": name, "args": its settings}."""
    if config.get("objective") not in OBJECTIVES:
        raise UserError(f"unknown objective {config.get('objective')!r} in {OBJECTIVE_FILE}")
    cls, args_cls = OBJECTIVES[config["objective"]]
    return cls(from_dict(args_cls, config["args"]))
