"""The Kubernetes manifests are valid for the Kubernetes versions we target,
checked offline against the schemas kubernetes-validate ships (strict mode:
unknown fields are errors)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
VERSION = "1.33"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_in_strict_mode(path: Path) -> None:
    for doc in _docs(path):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    job = _docs(K8S / "virtual-host-job.yaml")[0]
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolisy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSION, strict=True)


def test_every_service_container_has_a_grpc_startup_probe_and_shares_the_banks() -> None:
    spec = _docs(K8S / "virtual-host-job.yaml")[0]["spec"]["template"]["spec"]
    assert {v["name"]: v["emptyDir"]["medium"] for v in spec["volumes"] if "emptyDir" in v} == {"banks": "Memory"}
    sidecars = spec["initContainers"]
    assert [c["name"] for c in sidecars] == ["hypervisor", "guest0", "guest1", "dsa0", "dsa1"]
    ports = set()
    for c in sidecars:
        assert c["restartPolicy"] == "Always"
        port = c["startupProbe"]["grpc"]["port"]
        assert f"127.0.0.1:{port}" in c["args"]
        ports.add(port)
        assert any(m["mountPath"] == "/banks" for m in c["volumeMounts"])
        assert "requests" in c["resources"]
    assert len(ports) == len(sidecars), "containers of one Pod share the network: ports must differ"


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in MANIFESTS)
