"""Artifacts: what a run leaves behind and shares: model folders, the Hub, diffusers pipelines, image grids."""
