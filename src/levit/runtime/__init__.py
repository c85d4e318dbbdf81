"""Inference runtimes: deploy backends, exports, the prediction pipeline."""
