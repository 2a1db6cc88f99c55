"""CLIP side of OVSeg: model loading (`models`), text classifier (`text`), mask prompt tuning (`mpt`),
training (`train`), zero-shot probes (`zeroshot`, `probe`), adapted-CLIP bundles (`adapted`).

Import from the submodules: this package loads nothing itself, so that a pipeline stage depends (in
dvc.yaml) only on the modules it really runs.
"""
