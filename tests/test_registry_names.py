"""The MLflow registered-model name of a teacher lineage: ``gate.model_name`` as a template."""

from __future__ import annotations

import pytest

from mimic.config import load_config
from mimic.errors import ConfigError
from tasks.registry import model_name

FP = "0123456789abcdef" * 4


@pytest.mark.parametrize("template, uri, name", [
    ("{teacher}-sanitized", "/models/vendor/resnet18_v2.pt", "resnet18_v2-sanitized"),  # the default
    ("{teacher}-sanitized", "s3://bucket/incoming/enc.safetensors?versionId=7", "enc-sanitized"),
    ("{teacher}-sanitized", "/m/My Encoder (final).pth", "My-Encoder-final-sanitized"),  # MLflow-safe characters
    ("{teacher}-sanitized", "/m/.pt", "teacher-sanitized"),
    ("enc-{fingerprint}", "/any/path.pt", "enc-0123456789ab"),  # one model per teacher content
    ("acme-encoder", "/a.pt", "acme-encoder"),  # a fixed name: every audit is a version of one model
])
def test_the_name_follows_the_template(template, uri, name):
    assert model_name(template, uri, FP) == name


def test_a_template_with_another_placeholder_is_a_config_error():
    assert load_config(sets=["gate.model_name=lab-{fingerprint}"]).gate.model_name == "lab-{fingerprint}"
    with pytest.raises(ConfigError, match="placeholders"):
        load_config(sets=["gate.model_name={owner}-sanitized"])
