"""Prefect tasks: thin wrappers over ``mimic`` that pass paths, URIs and run ids (never tensors).

The audit's heavy stages run as tasks cached on their stage keys (``tasks.stages``); network
steps (S3, MLflow) retry in exactly one layer each. Nothing here re-implements the science:
see ``mimic.audit`` and ``mimic.stages``.
"""
