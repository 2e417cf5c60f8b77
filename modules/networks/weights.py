"""Whether a state dict fits a network: the parameters it lacks, has beyond the network's, or has in another shape.
`--init_from` (artifacts/model_folder.py) and the video UNet's image weights (networks/video_unet.py) say it so."""

from __future__ import annotations

import torch


def state_dict_mismatches(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """One line per parameter that differs between a network's state dict `own` and `state`, the one to load:
    "<key> missing" (in own, not in state), "<key> unexpected" (the reverse), "<key> (saved shape) vs (own shape)"."""
    problems = [f"{k} missing" for k in own if k not in state]
    problems += [f"{k} unexpected" for k in state if k not in own]
    problems += [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    return problems


def kept_as_built(own: dict[str, torch.Tensor], own_config, saved_config: dict) -> set[str]:
    """The parameters of a network (its state dict `own`, its config) that loading a saved network's weights leaves
    as built: the interval embedding of a network that takes r (MeanFlow), when the saved one does not. That
    embedding's last layer starts at zero, so the network then computes exactly what the saved one did:
    u(z, r, t) = v(z, t) for every r."""
    if own_config.get("interval_embedding") and not saved_config.get("interval_embedding"):
        return {k for k in own if k.startswith("cond_embed.interval.")}
    return set()
