"""ovseg_core: the OVSeg library (datasets, CLIP, MaskFormer, mining, metrics).

Knows torch, open_clip, transformers, nltk, pycocotools, webdataset, pyarrow and safetensors; never DVC or
Prefect.
"""
