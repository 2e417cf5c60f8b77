"""Networks, (x, t, cond) -> tensor: the UNet and DiT denoisers, the KL-VAE, conditioning, text encoders, presets."""
