"""CLIP side of OVSeg: model loading, text classifier, mask prompt tuning, training, zero-shot probes."""
from .models import ClipBundle, load_clip, register_model_configs, save_clip
from .mpt import MaskPromptedViT, MaskPrompts, encode_masked, load_prompts, patch_mask, save_prompts
from .text import VILD_TEMPLATES, TextFeatureCache, text_features
from .train import ClipTrainConfig, ClipTrainResult, DedupClipLoss, train_clip
from .zeroshot import ZeroShotResult, zero_shot_accuracy, zero_shot_predict

__all__ = [
    "ClipBundle",
    "ClipTrainConfig",
    "ClipTrainResult",
    "DedupClipLoss",
    "MaskPromptedViT",
    "MaskPrompts",
    "TextFeatureCache",
    "VILD_TEMPLATES",
    "ZeroShotResult",
    "encode_masked",
    "load_clip",
    "load_prompts",
    "patch_mask",
    "register_model_configs",
    "save_clip",
    "save_prompts",
    "text_features",
    "train_clip",
    "zero_shot_accuracy",
    "zero_shot_predict",
]
