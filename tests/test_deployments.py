"""prefect.yaml: each deployment's entrypoint is a flow, its parameters fit the flow's typed
signature, and the flows' parameter schemas are forms (pydantic models), not an untyped dict."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_deployments_match_the_flows():
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"audit", "watch"}
    required = {"audit": {"audit": {"teacher": "t.pt", "data": "synthetic"}}, "watch": {}}
    for name, d in deployments.items():
        assert d["work_pool"]["name"] == "mimic"
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"]))
        flow.validate_parameters({**d["parameters"], **required[name]})  # raises when a parameter does not fit
        schema = parameter_schema(flow).model_dump()
        assert "Settings" in schema["definitions"] and "Services" in schema["definitions"]
    assert deployments["watch"]["schedules"][0]["cron"]
    audit_schema = parameter_schema(load_flow_from_entrypoint(str(ROOT / "flows/audit.py:audit_flow"))).model_dump()
    fields = audit_schema["definitions"]["AuditInput"]["properties"]
    assert {"teacher", "data", "eval_data", "trigger", "target_class"} <= set(fields) and fields["teacher"]["description"]
    assert audit_schema["definitions"]["Services"]["properties"]["sse"]
