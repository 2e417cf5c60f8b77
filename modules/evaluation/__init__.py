"""Evaluation: FID and KID with Inception, the Fashion-MNIST classifier's metrics."""
