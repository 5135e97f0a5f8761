"""The AtteNT teacher inside other trainers: Hugging Face `Trainer` (pip install "attent-scale[hf]") and
PyTorch Lightning (pip install "attent-scale[lightning]")."""

from attent_scale.integrations.sampler import (
    ID_KEY,
    AttentBatchSampler,
    IdCollator,
    IndexedDataset,
    PadCollator,
)
from attent_scale.teacher.session import default_teacher_config

__all__ = ["ID_KEY", "AttentBatchSampler", "AttentCallback", "AttentTrainer", "IdCollator", "IndexedDataset",
           "PadCollator", "default_teacher_config"]


def __getattr__(name: str):  # transformers / Lightning are imported only when their integration is used
    if name in ("AttentTrainer", "causal_lm_per_sample"):
        from attent_scale.integrations import hf

        return getattr(hf, name)
    if name in ("AttentCallback", "causal_lm_loss"):
        from attent_scale.integrations import lightning

        return getattr(lightning, name)
    raise AttributeError(name)
