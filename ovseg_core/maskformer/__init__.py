"""The proposal network: transformers' MaskFormer with a CLIP-text cosine class head, its targets,
augmentation and (distributed, resumable) training."""
from .model import (
    CosineClassHead,
    OpenVocabMaskFormer,
    PRESETS,
    ProposalNetConfig,
    build_model,
    load_backbone_weights,
    load_model,
    preset_config,
    save_model,
)

__all__ = [
    "CosineClassHead", "OpenVocabMaskFormer", "PRESETS", "ProposalNetConfig", "build_model",
    "load_backbone_weights", "load_model", "preset_config", "save_model",
]
