"""Training-loop utilities shared by CLIP pretraining/adaptation and MaskFormer training."""
