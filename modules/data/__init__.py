"""Data: sources (images, latents, captions) opened and checked, and turned into batches in a resumable order."""
