"""The two secured deployments (deploy/secure): each embedded meshaudit configuration loads as
the daemon would load it (its certificate files stood in by test files at the same keys), and
says what each deployment promises. Their objects are validated offline with every other manifest
(test_manifests: kubernetes-validate --strict, the CRDs' schemas); cert-manager's Certificate, which
the CRDs catalog has no schema for, is checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from infra.certs import CA
from meshaudit.loading import load

REPO = Path(__file__).resolve().parents[2]
SECURE = REPO / "deploy" / "secure"
NO_SCHEMA = {("cert-manager.io/v1", "Certificate")}  # no schema in the CRDs catalog: checked by hand below


def objects(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((SECURE / name / "meshaudit.yaml").read_text()) if d]


def test_the_certificate_request_names_its_secret_and_issuer() -> None:
    """cert-manager's Certificate has no schema in the CRDs catalog (test_manifests validates every
    other object of deploy/secure): its fields are checked here."""
    [cert] = [o for o in objects("native-mtls") if (o["apiVersion"], o["kind"]) in NO_SCHEMA]
    assert cert["spec"]["secretName"] and cert["spec"]["issuerRef"]["name"]


def test_native_mtls_trusts_istios_root_and_requires_client_certificates(tmp_path: Path) -> None:
    objs = objects("native-mtls")
    [cm] = [o for o in objs if o["kind"] == "ConfigMap"]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    tls = config["receivers"]["tls"]
    assert (tls["client_auth"], tls["client_ca_file"]) == ("require", "/etc/istio-ca/root-cert.pem")
    [deploy] = [o for o in objs if o["kind"] == "Deployment"]
    mounts = {m["name"]: m["mountPath"] for m in deploy["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert Path(tls["cert_file"]).parent == Path(mounts["tls"])
    assert Path(tls["client_ca_file"]).parent == Path(mounts["istio-ca"])
    [dr] = [o for o in objs if o["kind"] == "DestinationRule"]
    assert {p["tls"]["mode"] for p in dr["spec"]["trafficPolicy"]["portLevelSettings"]} == {"ISTIO_MUTUAL"}
    # The configuration loads, with test certificates at its paths.
    ca = CA(tmp_path / "pki")
    server = ca.server()
    tls.update(cert_file=str(server.cert), key_file=str(server.key), client_ca_file=str(ca.cert_path))
    (tmp_path / "policy.yaml").write_text(cm["data"]["policy.yaml"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cfg, policy = load(tmp_path / "config.yaml")
    assert cfg.receivers.enforce_sources and cfg.receivers.authenticates
    assert [s.namespaces for s in policy.sources] == [["*"]]


def test_in_mesh_is_strict_behind_its_sidecar_and_trusts_only_its_xfcc(tmp_path: Path) -> None:
    objs = objects("in-mesh")
    kinds = {o["kind"]: o for o in objs}
    assert kinds["Namespace"]["metadata"]["labels"]["istio-injection"] == "enabled"
    assert kinds["PeerAuthentication"]["spec"]["mtls"]["mode"] == "STRICT"
    rule = kinds["AuthorizationPolicy"]["spec"]["rules"][0]
    assert rule["from"][0]["source"]["principals"] == ["cluster.local/ns/*/sa/*"]
    assert rule["to"][0]["operation"]["ports"] == ["4317", "4318"]
    ports = [p["name"] for p in kinds["Service"]["spec"]["ports"]]
    assert ports[:2] == ["grpc-receivers", "http-otlp"]  # HTTP to the sidecar: it adds the XFCC
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])
    (tmp_path / "policy.yaml").write_text(kinds["ConfigMap"]["data"]["policy.yaml"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cfg, _ = load(tmp_path / "config.yaml")
    assert cfg.receivers.tls is None and cfg.receivers.trust_forwarded_client_cert and cfg.receivers.enforce_sources
