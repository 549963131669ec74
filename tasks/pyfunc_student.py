"""MLflow "model from code" for a sanitized student: weights in safetensors, no pickled objects.

``mlflow.pyfunc.load_model(uri).predict(images)`` returns L2-normalised features for uint8 images
(NHWC or NCHW; float input in [0, 1] is quantised to uint8 first). Logged by ``tasks.tracking``; the weights load through mimic's
safe, strict loader.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class SanitizedEncoder(PythonModel):
    def load_context(self, context) -> None:
        from mimic.checkpoints import load_encoder

        self.encoder = load_encoder(context.artifacts["student"]).encoder.eval()

    # np.ndarray: MLflow infers no schema from it (image batches of any size) and so does not warn
    # that predict lacks type hints
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        from mimic.evaluate import extract_features

        x = torch.as_tensor(np.asarray(model_input))
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2).contiguous()
        return extract_features(self.encoder, x).numpy()


mlflow.models.set_model(SanitizedEncoder())
