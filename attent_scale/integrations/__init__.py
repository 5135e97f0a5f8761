"""The AtteNT teacher inside other trainers: Hugging Face `Trainer` (pip install "attent-scale[hf]")."""

from attent_scale.integrations.sampler import (
    ID_KEY,
    AttentBatchSampler,
    IdCollator,
    IndexedDataset,
    PadCollator,
)

__all__ = ["ID_KEY", "AttentBatchSampler", "AttentTrainer", "IdCollator", "IndexedDataset",
           "PadCollator", "default_teacher_config"]


def __getattr__(name: str):  # transformers is imported only when the Trainer integration is used
    if name in ("AttentTrainer", "default_teacher_config", "causal_lm_per_sample"):
        from attent_scale.integrations import hf

        return getattr(hf, name)
    raise AttributeError(name)
