"""mimic: audit self-supervised image encoders for backdoors and sanitize them with MIMIC.

The core library depends on PyTorch and torchvision only; orchestration (Prefect, MLflow, DVC,
S3) lives outside this package.
"""

from mimic.errors import MimicError

__all__ = ["MimicError", "__version__"]
__version__ = "0.1.0"
