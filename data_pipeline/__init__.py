"""The embedded world and the VQA synthesis pipeline."""
