"""Integrations with training frameworks. Each submodule imports its framework when it is imported itself, never
when fastdistill is: `from fastdistill.integrations.transformers import DistillationTrainer`."""
