"""Objectives: the math of training and sampling (flow matching, DDPM, the autoencoder), apart from the networks."""
