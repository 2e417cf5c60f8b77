"""The objectives by the name a saved model records (objective.json), to rebuild the one it was trained with."""

from __future__ import annotations

from modules.config import DDPMArguments, FlowArguments, UserError, VAEArguments
from modules.objectives.autoencoder import VAEObjective
from modules.objectives.ddpm import DDPMObjective
from modules.objectives.flow import FlowObjective
from modules.records import OBJECTIVE_FILE, from_dict


def objective_from_config(config: dict):
    """Rebuild the objective recorded next to a saved model."""

    kinds = {
        "flow": (FlowObjective, FlowArguments),
        "ddpm": (DDPMObjective, DDPMArguments),
        "vae": (VAEObjective, VAEArguments),
    }
    if config.get("objective") not in kinds:
        raise UserError(f"unknown objective {config.get('objective')!r} in {OBJECTIVE_FILE}")
    cls, args_cls = kinds[config["objective"]]
    return cls(from_dict(args_cls, config["args"]))
