"""Prefect tasks: thin wrappers over ``mimic`` that pass paths, URIs and run ids (never tensors).

Heavy tasks (MI, distillation, evaluation) are cached on content keys (teacher fingerprint, clean
data hash, the params of that stage, seed, code version); network tasks (S3, MLflow) retry with
backoff. Nothing here re-implements the science: see ``mimic.workspace``.
"""
