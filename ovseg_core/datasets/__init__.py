"""Dataset readers for the official layouts (`registry` and one module per format), and the one
prepared form they all convert to (`prepared`).

Import from the submodules: this package loads nothing itself, so that a pipeline stage that only
reads prepared data does not depend (in dvc.yaml) on every reader.
"""
