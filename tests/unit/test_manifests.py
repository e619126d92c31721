"""The Kubernetes and Istio manifests in deploy/, checked offline with real tools: every
kustomization renders with kustomize (kubectl's built-in one) and lists only files inside its own
tree; every manifest validates against the Kubernetes schemas (kubernetes-validate --strict) and
the CRDs' schemas (Istio Telemetry, ServiceMonitor, PrometheusRule); the Deployment passes the Pod
Security "restricted" profile; the parts that must agree do (spool path, ports, probes, labels,
image version); and the Istio providers carry every header, filter state and attribute the
decoders read, in command operators a real Envoy accepts.

CRD schemas are read from the directory in ``MESHAUDIT_CRD_SCHEMAS`` (the CRDs catalog layout,
``<group>/<kind>_<version>.json``), by default ``shared/schemas/crds`` beside the repository."""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from infra.tools import envoy_binary
from meshaudit.config import Config, Policy
from meshaudit.engine.setup import build_engine
from meshaudit.loading import load
from meshaudit.receivers.envoy_als import decode as als_decode
from meshaudit.receivers.otlp import decode as otlp_decode
from meshaudit.sinks.kafka import KafkaConfig
from meshaudit.sinks.mqtt import MqttConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
OVERLAYS = DEPLOY / "kubernetes" / "overlays"
ISTIO = DEPLOY / "istio"
MESHCONFIG = ISTIO / "meshconfig.yaml"
KUBERNETES_VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
# The oldest Kubernetes the manifests are for (gRPC probes are GA from 1.27) and the newest schema
# kubernetes-validate has.
K8S_VERSIONS = ("1.28", "1.37")
CRD_SCHEMAS = Path(os.environ.get("MESHAUDIT_CRD_SCHEMAS") or REPO.parent / "shared/schemas/crds")
CRD_KINDS = {
    *("Telemetry", "ServiceMonitor", "PrometheusRule"),
    *("PeerAuthentication", "AuthorizationPolicy", "DestinationRule"),  # deploy/secure
}
# Custom resources the catalog has no schema for: test_deploy_secure checks their fields by hand.
HAND_CHECKED = {"Certificate"}  # cert-manager

Doc = dict[str, Any]


# --- kustomize: the files, and the real renderer ---------------------------------------------------
def kustomizations() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def overlays() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def kustomization(d: Path) -> Doc:
    doc: Doc = yaml.safe_load((d / "kustomization.yaml").read_text())
    return doc


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


@functools.cache
def kustomize_command() -> tuple[str, ...] | None:
    """A real kustomize v5 (the manifests use its `labels` and `patches`): the standalone
    binary, else the one built into kubectl 1.27 and later. None when neither is installed."""
    if exe := shutil.which("kustomize"):
        out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=30).stdout
        if re.search(r"\bv?([5-9]|\d\d)\.", out):
            return (exe, "build")
    if exe := shutil.which("kubectl"):
        out = subprocess.run([exe, "version", "--client"], capture_output=True, text=True, timeout=30).stdout
        if re.search(r"Kustomize Version: v([5-9]|\d\d)\.", out):
            return (exe, "kustomize")
    return None


def needs_kustomize() -> tuple[str, ...]:
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("no kustomize v5: install kustomize, or kubectl 1.27 or later, to render the overlays")
    return cmd


@functools.cache
def render(d: Path) -> list[Doc]:
    cmd = needs_kustomize()
    out = subprocess.run([*cmd, str(d)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kustomize could not render {rel(d)}:\n{out.stderr}"
    return [x for x in yaml.safe_load_all(out.stdout) if x]


def docs_of(path: Path) -> list[Doc]:
    return [x for x in yaml.safe_load_all(path.read_text()) if x]


def inside(child: Path, root: Path) -> bool:
    return child.resolve().is_relative_to(root.resolve())


def listed_resources(d: Path) -> list[Doc]:
    """What a kustomization declares, read without kustomize: its resource files, the resources of
    the kustomizations it includes, and the ConfigMaps it generates (a generator that merges into
    a base's adds none), less the resources a patch deletes, under the names a patch gives them.
    Patches are not applied otherwise."""
    k = kustomization(d)
    out: list[Doc] = []
    for entry in k.get("resources", []):
        target = d / entry
        out.extend(listed_resources(target) if target.is_dir() else docs_of(target))
    for gen in k.get("configMapGenerator", []):
        if gen.get("behavior", "create") == "create":
            out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}})
    for patch in k.get("patches", []):
        for doc in docs_of(d / patch["path"]):
            target = patched(patch, doc)
            if doc.get("$patch") == "delete":
                out = [x for x in out if key(x) != target]
            elif key(doc) != target:
                out = [{**x, "metadata": {**x["metadata"], "name": doc["metadata"]["name"]}} if key(x) == target
                       else x for x in out]  # fmt: skip
    return out


def key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def patched(patch: Doc, doc: Doc) -> tuple[str, str]:
    """The resource a patch document applies to: its ``target`` when it names one (a patch that
    renames, with ``allowNameChange``), else the document's own kind and name."""
    if "target" in patch:
        assert patch.get("options", {}).get("allowNameChange") or patch["target"]["name"] == doc["metadata"]["name"]
        return patch["target"]["kind"], patch["target"]["name"]
    return key(doc)


def _merge(into: Doc, patch: Doc) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def assembled(d: Path) -> list[Doc]:
    """Without kustomize: the listed resources with each kustomization's namespace and its
    patches applied as plain merges (enough for the patches here, which set fields and replace
    no list items); the ConfigMap's data read from its files."""
    k = kustomization(d)
    out: list[Doc] = []
    for entry in k.get("resources", []):
        target = d / entry
        out.extend(assembled(target) if target.is_dir() else copy.deepcopy(docs_of(target)))
    for gen in k.get("configMapGenerator", []):
        data = {f.split("=", 1)[0]: (d / f.split("=", 1)[-1]).read_text() for f in gen.get("files", [])}
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for patch in k.get("patches", []):
        for doc in docs_of(d / patch["path"]):
            _merge(next(x for x in out if key(x) == key(doc)), doc)
    if ns := k.get("namespace"):
        for doc in out:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = ns
    return out


def base_manifests() -> list[Doc]:
    """The resources of the default overlay as the cluster gets them: rendered by kustomize,
    else assembled from the files (so that the checks below run without a renderer too)."""
    if kustomize_command() is None:
        return assembled(OVERLAYS / "single")
    return render(OVERLAYS / "single")


def test_the_files_assemble_to_what_kustomize_renders() -> None:
    """The fallback above is a fair model of kustomize for these files."""
    rendered = {key(x): x for x in render(OVERLAYS / "single")}
    for doc in assembled(OVERLAYS / "single"):
        got = rendered[key(doc)]
        labels = {k: v for k, v in got["metadata"].get("labels", {}).items() if k != "app.kubernetes.io/part-of"}
        assert {**got, "metadata": {**got["metadata"], "labels": labels}} == {
            **doc,
            "metadata": {**doc["metadata"], "labels": doc["metadata"].get("labels", {})},
        }, key(doc)


def one(docs: list[Doc], kind: str, name: str = "meshaudit") -> Doc:
    found = [x for x in docs if key(x) == (kind, name)]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("d", kustomizations(), ids=rel)
def test_each_kustomization_lists_only_files_inside_its_own_tree(d: Path) -> None:
    """kustomize's load restrictor (LoadRestrictionsRootOnly, the default): a file outside the
    kustomization's directory is refused; only another kustomization directory may be outside."""
    k = kustomization(d)
    for entry in k.get("resources", []):
        target = d / entry
        assert target.exists(), f"{rel(d)}: resource {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{rel(d)}: {entry} is not a kustomization"
        else:
            assert inside(target, d), f"{rel(d)}: {entry} is outside the kustomization's tree"
    files = [p["path"] for p in k.get("patches", [])]
    for gen in k.get("configMapGenerator", []):
        files += [f.split("=", 1)[-1] for f in gen.get("files", [])]
    for f in files:
        assert (d / f).is_file(), f"{rel(d)}: {f} does not exist"
        assert inside(d / f, d), f"{rel(d)}: {f} is outside the kustomization's tree"


@pytest.mark.parametrize("d", [p for p in kustomizations() if kustomization(p).get("patches")], ids=rel)
def test_each_patch_targets_a_resource_of_its_bases(d: Path) -> None:
    known: set[tuple[str, str]] = set()
    for entry in kustomization(d).get("resources", []):
        target = d / entry
        known |= {key(x) for x in (listed_resources(target) if target.is_dir() else docs_of(target))}
    for patch in kustomization(d)["patches"]:
        for doc in docs_of(d / patch["path"]):
            target = patched(patch, doc)
            assert target in known, f"{rel(d)}: {patch['path']} patches {target}, which no base has"


@pytest.mark.parametrize("d", kustomizations(), ids=rel)
def test_each_kustomization_renders_what_it_lists(d: Path) -> None:
    rendered = render(d)
    assert sorted(map(key, rendered)) == sorted(map(key, listed_resources(d)))


def test_the_single_overlay_runs_one_replica_that_stops_before_the_next_starts() -> None:
    deployment = one(base_manifests(), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # the ReadWriteOnce state volume
    assert {x["metadata"].get("namespace") for x in base_manifests() if x["kind"] != "Namespace"} == {"meshaudit"}


# --- schemas ---------------------------------------------------------------------------------------
def manifest_files() -> list[Path]:
    """Every Kubernetes resource file under deploy/ (not kustomizations, patches, the daemon's
    configuration files, Helm values or Prometheus' own rule files)."""
    skip = {
        MESHCONFIG,
        DEPLOY / "prometheus" / "meshaudit-rules.yaml",
        DEPLOY / "prometheus" / "meshaudit-rules.test.yaml",
    }
    patches = {d / p["path"] for d in kustomizations() for p in kustomization(d).get("patches", [])}
    out = []
    for p in sorted(DEPLOY.rglob("*.yaml")):
        if p.name == "kustomization.yaml" or p in skip or p in patches or "config" in p.relative_to(DEPLOY).parts:
            continue
        out.append(p)
    return out


def kubernetes_validate(path: Path, version: str) -> tuple[int, str]:
    exe = str(KUBERNETES_VALIDATE) if KUBERNETES_VALIDATE.exists() else shutil.which("kubernetes-validate")
    assert exe, "kubernetes-validate is missing: `make install` (a dev dependency)"
    out = subprocess.run([exe, "--strict", "--quiet", "-k", version, str(path)], capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def assert_valid(path: Path, docs: list[Doc], version: str) -> None:
    code, output = kubernetes_validate(path, version)
    assert code == 0, output
    # What kubernetes-validate has no schema for must be one of the CRDs validated below.
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    checked = CRD_KINDS | HAND_CHECKED
    assert unknown <= checked, f"{path.name}: not validated by any schema: {unknown - checked}"
    assert {x["kind"] for x in docs} - unknown, f"{path.name}: no resource was validated"


def has_core_kinds(docs: list[Doc]) -> bool:
    """Whether any resource is one the Kubernetes schemas cover (the rest are CRDs, checked below)."""
    return not {x["kind"] for x in docs} <= CRD_KINDS | HAND_CHECKED


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", [p for p in manifest_files() if has_core_kinds(docs_of(p))], ids=rel)
def test_each_manifest_file_validates_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    assert_valid(path, docs_of(path), version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("d", [d for d in kustomizations() if has_core_kinds(listed_resources(d))], ids=rel)
def test_each_rendered_kustomization_validates_against_the_kubernetes_schemas(
    d: Path, version: str, tmp_path: Path
) -> None:
    docs = render(d)
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    assert_valid(out, docs, version)


def test_kubernetes_validate_refuses_a_field_kubernetes_does_not_have(tmp_path: Path) -> None:
    """The check above can fail: --strict rejects an unknown field in our own Deployment."""
    broken = copy.deepcopy(one(base_manifests(), "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 4317}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(broken))
    code, output = kubernetes_validate(tmp_path / "d.yaml", K8S_VERSIONS[-1])
    assert code != 0 and "grpcc" in output


def crd_schema(doc: Doc) -> dict[str, Any]:
    if not CRD_SCHEMAS.is_dir():
        pytest.skip(f"no CRD schemas at {CRD_SCHEMAS}: set MESHAUDIT_CRD_SCHEMAS to a CRDs-catalog directory")
    group, version = doc["apiVersion"].split("/")
    path = CRD_SCHEMAS / group / f"{doc['kind'].lower()}_{version}.json"
    assert path.is_file(), f"no schema for {doc['apiVersion']} {doc['kind']} at {path}"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def crd_errors(doc: Doc) -> list[str]:
    schema = crd_schema(doc)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in cls(schema).iter_errors(doc)]


def crd_docs() -> Iterator[tuple[str, Doc]]:
    for path in manifest_files():
        for doc in docs_of(path):
            if doc["kind"] in CRD_KINDS:
                yield f"{rel(path)}:{doc['kind']}", doc


@pytest.mark.parametrize(("where", "doc"), list(crd_docs()), ids=[w for w, _ in crd_docs()])
def test_each_custom_resource_file_validates_against_its_crd_schema(where: str, doc: Doc) -> None:
    assert crd_errors(doc) == [], where


@pytest.mark.parametrize("d", kustomizations(), ids=rel)
def test_each_rendered_custom_resource_validates_against_its_crd_schema(d: Path) -> None:
    crs = [x for x in render(d) if x["kind"] in CRD_KINDS]
    for doc in crs:
        assert crd_errors(doc) == [], key(doc)


def test_every_crd_kind_shipped_is_checked() -> None:
    kinds = {x["kind"] for d in kustomizations() for x in listed_resources(d)}
    kinds |= {x["kind"] for p in manifest_files() for x in docs_of(p)}
    assert kinds & CRD_KINDS == CRD_KINDS, "a CRD kind named in CRD_KINDS is not shipped any more"
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "PersistentVolumeClaim", "Service",
            "PodDisruptionBudget", "NetworkPolicy"} <= kinds  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "breakage"),
    [
        ("Telemetry", lambda d: d["spec"]["accessLogging"][0].update(provider=[{"name": "x"}])),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval=30)),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(expr=None)),
    ],
)
def test_the_crd_schemas_refuse_what_the_crd_refuses(kind: str, breakage: Any) -> None:
    """The CRD check above can fail: a misspelt field, a number where a duration goes, no expr."""
    [(_, doc)] = [(w, x) for w, x in crd_docs() if x["kind"] == kind][:1]
    broken = copy.deepcopy(doc)
    breakage(broken)
    assert crd_errors(broken) != []


# --- Pod Security "restricted" ---------------------------------------------------------------------
# The profile's controls as the Kubernetes Pod Security Standards page lists them (baseline, then
# restricted), for a pod spec.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}  # fmt: skip
SELINUX_TYPES = {"container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: Doc, annotations: dict[str, str] | None = None) -> list[str]:
    bad: list[str] = []
    psc = pod.get("securityContext", {})
    containers = [
        *(("containers", c) for c in pod.get("containers", [])),
        *(("initContainers", c) for c in pod.get("initContainers", [])),
        *(("ephemeralContainers", c) for c in pod.get("ephemeralContainers", [])),
    ]
    # baseline
    for ns in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(ns):
            bad.append(f"host namespaces: {ns}")
    if psc.get("windowsOptions", {}).get("hostProcess"):
        bad.append("HostProcess")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    for v in pod.get("volumes", []):
        types = set(v) - {"name"}
        if "hostPath" in types:
            bad.append(f"hostPath volume {v['name']}")
        if not types <= RESTRICTED_VOLUMES:
            bad.append(f"volume type {sorted(types - RESTRICTED_VOLUMES)} ({v['name']})")
    for a, value in (annotations or {}).items():
        if a.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            bad.append(f"AppArmor {value}")

    def selinux(sc: Doc, where: str) -> None:
        opts = sc.get("seLinuxOptions", {})
        if opts.get("type") not in (None, "", *SELINUX_TYPES):
            bad.append(f"{where}: SELinux type {opts['type']}")
        if opts.get("user") or opts.get("role"):
            bad.append(f"{where}: SELinux user/role")

    def apparmor(sc: Doc, where: str) -> None:
        t = sc.get("appArmorProfile", {}).get("type")
        if t not in (None, "RuntimeDefault", "Localhost"):
            bad.append(f"{where}: AppArmor {t}")

    selinux(psc, "pod")
    apparmor(psc, "pod")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    for field, c in containers:
        where = f"{field}/{c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            bad.append(f"{where}: HostProcess")
        for p in c.get("ports", []):
            if p.get("hostPort"):
                bad.append(f"{where}: hostPort {p['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{where}: procMount {sc['procMount']}")
        selinux(sc, where)
        apparmor(sc, where)
        caps = sc.get("capabilities", {})
        added = set(caps.get("add", []))
        if not added <= BASELINE_CAPABILITIES:
            bad.append(f"{where}: adds {sorted(added - BASELINE_CAPABILITIES)}")
        # restricted
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation is not false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            bad.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccomp {seccomp}")
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{where}: capabilities do not drop ALL")
        if not added <= {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities other than NET_BIND_SERVICE")
    if psc.get("runAsUser") == 0:
        bad.append("pod: runAsUser 0")
    return bad


def pod_template() -> Doc:
    template: Doc = one(base_manifests(), "Deployment")["spec"]["template"]
    return template


def test_the_deployment_passes_pod_security_restricted() -> None:
    t = pod_template()
    assert restricted_violations(t["spec"], t["metadata"].get("annotations")) == []
    ns = one(base_manifests(), "Namespace")["metadata"]["labels"]
    assert ns["pod-security.kubernetes.io/enforce"] == "restricted"  # and the API server enforces it


def _container(spec: Doc) -> Doc:
    c: Doc = spec["containers"][0]
    return c


@pytest.mark.parametrize(
    ("name", "breakage"),
    [
        ("privileged", lambda s: _container(s)["securityContext"].update(privileged=True)),
        ("hostNetwork", lambda s: s.update(hostNetwork=True)),
        ("hostPID", lambda s: s.update(hostPID=True)),
        ("hostPath", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("nfs volume", lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}})),
        ("hostPort", lambda s: _container(s)["ports"][0].update(hostPort=4317)),
        ("escalation", lambda s: _container(s)["securityContext"].pop("allowPrivilegeEscalation")),
        (
            "root",
            lambda s: (s["securityContext"].pop("runAsNonRoot"), _container(s)["securityContext"].pop("runAsNonRoot")),
        ),
        ("uid 0", lambda s: _container(s)["securityContext"].update(runAsUser=0)),
        ("unconfined", lambda s: _container(s)["securityContext"].update(seccompProfile={"type": "Unconfined"})),
        (
            "no seccomp",
            lambda s: (
                s["securityContext"].pop("seccompProfile"),
                _container(s)["securityContext"].pop("seccompProfile"),
            ),
        ),
        ("capability", lambda s: _container(s)["securityContext"]["capabilities"].update(add=["NET_ADMIN"])),
        ("no drop ALL", lambda s: _container(s)["securityContext"]["capabilities"].update(drop=["NET_RAW"])),
        ("procMount", lambda s: _container(s)["securityContext"].update(procMount="Unmasked")),
        ("sysctl", lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
        ("selinux", lambda s: s["securityContext"].update(seLinuxOptions={"type": "spc_t"})),
        ("apparmor", lambda s: _container(s)["securityContext"].update(appArmorProfile={"type": "Unconfined"})),
        ("init container", lambda s: s.update(initContainers=[{"name": "i", "image": "x"}])),
    ],
)
def test_the_pod_security_check_catches_each_breach(name: str, breakage: Any) -> None:
    spec = copy.deepcopy(pod_template()["spec"])
    breakage(spec)
    assert restricted_violations(spec) != [], name


# --- what must agree -------------------------------------------------------------------------------
def dockerfile_final_stage() -> list[str]:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[start:]


def dockerfile_value(instruction: str) -> str:
    [value] = [line.split(None, 1)[1] for line in dockerfile_final_stage() if line.startswith(instruction + " ")]
    return value


def test_the_working_directory_spool_and_state_are_on_the_state_volume() -> None:
    """The image's WORKDIR, the container's workingDir and the state volume's mount are one
    directory, and every spool the ConfigMap's configuration gives (or a sink would get by
    default, once its section is uncommented) resolves into it."""
    workdir = dockerfile_value("WORKDIR")
    spec = pod_template()["spec"]
    c = _container(spec)
    assert c["workingDir"] == workdir
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    [state] = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
    assert mounts[state]["mountPath"] == workdir and not mounts[state].get("readOnly")
    claim = volumes[state]["persistentVolumeClaim"]["claimName"]
    assert one(base_manifests(), "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The root filesystem is read-only: /tmp (workers' coordinator socket) is an emptyDir.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[next(m["name"] for m in mounts.values() if m["mountPath"] == "/tmp")]

    cfg, _ = load(BASE / "config" / "config.yaml")
    sinks = (cfg.sinks.jsonl, cfg.sinks.kafka, cfg.sinks.mqtt, KafkaConfig(), MqttConfig())
    spools = [s.spool_dir for s in sinks if s is not None and s.spool_dir is not None]
    assert len(spools) >= 2  # Kafka's and MQTT's defaults at least
    for spool in spools:
        assert (Path(workdir) / spool).resolve().is_relative_to(workdir), f"{spool} is not on the state volume"
    state_file = cfg.rules.unexpected_edge.state_file
    if state_file:
        assert (Path(workdir) / state_file).resolve().is_relative_to(workdir)


def test_the_image_user_owns_the_working_directory_the_pod_runs_as() -> None:
    uid = dockerfile_value("USER").split(":")[0]
    text = "\n".join(dockerfile_final_stage())
    workdir = dockerfile_value("WORKDIR")
    assert re.search(rf"install -d -o {uid} -g \d+ -m \d+ {re.escape(workdir)}\b", text)
    psc = pod_template()["spec"]["securityContext"]
    assert str(psc["runAsUser"]) == uid and str(psc["fsGroup"]) == uid


def test_the_configmap_is_the_configuration_in_the_repository_and_it_is_valid(tmp_path: Path) -> None:
    cm = one(base_manifests(), "ConfigMap")
    assert set(cm["data"]) == {"config.yaml", "policy.yaml"}
    for name, text in cm["data"].items():
        assert text == (BASE / "config" / name).read_text()
        (tmp_path / name).write_text(text)
    meshaudit = Path(sys.executable).with_name("meshaudit")
    out = subprocess.run([str(meshaudit), "validate", str(tmp_path / "config.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning" not in out.stdout + out.stderr
    cfg, policy = load(tmp_path / "config.yaml")
    assert {cfg.listen.grpc, cfg.listen.http, cfg.listen.metrics} == {"0.0.0.0:4317", "0.0.0.0:4318", "0.0.0.0:9464"}
    assert policy.edges, "the shipped policy checks edges"
    # The pod reads it where the ConfigMap is mounted.
    c = _container(pod_template()["spec"])
    [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert c["args"] == ["run", "--config", f"{mount['mountPath']}/config.yaml"]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates: no reload


def test_ports_probes_and_selectors_agree() -> None:
    docs = base_manifests()
    cfg, _ = load(BASE / "config" / "config.yaml")
    spec = pod_template()["spec"]
    c = _container(spec)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    listen = {"grpc": cfg.listen.grpc, "http-otlp": cfg.listen.http, "http-metrics": cfg.listen.metrics}
    assert {n: int(a.rsplit(":", 1)[1]) for n, a in listen.items()} == ports
    svc = one(docs, "Service")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        n: (p, n) for n, p in ports.items()
    }
    assert {p["name"]: p["appProtocol"] for p in svc["spec"]["ports"]}["grpc"] == "grpc"
    pod_labels = pod_template()["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # probes: readiness on the gRPC health service of the port Envoy sends to, liveness /healthz
    assert c["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    # the ServiceMonitor scrapes that Service's metrics port, as job "meshaudit" (the Service's
    # name), which the alert rules select
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["http-metrics"] and "jobLabel" not in sm["spec"]
    rules = (DEPLOY / "prometheus" / "meshaudit-rules.yaml").read_text()
    assert set(re.findall(r'job="([^"]+)"', rules)) == {svc["metadata"]["name"]}


def test_the_network_policy_admits_the_mesh_to_the_receivers_and_only_prometheus_to_metrics() -> None:
    np = one(base_manifests(), "NetworkPolicy")["spec"]
    assert np["podSelector"]["matchLabels"].items() <= pod_template()["metadata"]["labels"].items()
    assert np["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[Doc]] = {}
    for rule in np["ingress"]:
        for p in rule["ports"]:
            by_port.setdefault(p["port"], []).extend(rule["from"])
    assert set(by_port) == {4317, 4318, 9464}  # every port the pod serves, nothing else
    assert by_port[4317] == by_port[4318]
    assert all(set(peer) == {"namespaceSelector"} for peer in by_port[4317])  # namespaces, never all
    selectors = json.dumps(by_port[4317])
    for label in ("istio-injection", "istio.io/rev", "istio.io/dataplane-mode", "istio-system"):
        assert label in selectors
    [prometheus] = by_port[9464]
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert "namespaceSelector" in prometheus


def test_the_image_is_this_version_of_meshaudit() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert _container(pod_template()["spec"])["image"] == f"meshaudit:{version}"
    assert f'org.opencontainers.image.version="{version}"' in (REPO / "Dockerfile").read_text()


# --- the distributed overlay: two tiers ------------------------------------------------------------
DISTRIBUTED = OVERLAYS / "distributed"
RECEIVER_PORTS = {"grpc", "http-otlp", "http-metrics"}  # ALS and OTLP/gRPC, OTLP/HTTP, metrics
EVALUATOR_PORTS = {"http-metrics"}  # evaluators read the hops topic: nobody sends to them


def workloads(docs: list[Doc]) -> list[Doc]:
    return [x for x in docs if x["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("d", overlays(), ids=rel)
def test_every_pod_of_every_overlay_passes_pod_security_restricted(d: Path) -> None:
    docs = render(d)
    assert workloads(docs), f"{rel(d)} runs no pod"
    for w in workloads(docs):
        t = w["spec"]["template"]
        assert restricted_violations(t["spec"], t["metadata"].get("annotations")) == [], key(w)
    assert one(docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {x["metadata"].get("namespace") for x in docs if x["kind"] != "Namespace"} == {"meshaudit"}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def role_of(w: Doc) -> str:
    args: list[str] = _container(w["spec"]["template"]["spec"])["args"]
    return args[args.index("--role") + 1] if "--role" in args else "all"


def tier_errors(docs: list[Doc]) -> list[str]:
    """What must agree between the two tiers of the distributed overlay, as a list of what does
    not (empty: all agree). Receivers serve 4317, 4318 and 9464 and are the only pods behind the
    Service Envoy sends to, its PDB and the NetworkPolicy that admits the mesh; evaluators serve
    9464 only, each with its own spool volume."""
    bad: list[str] = []
    by_role = {role_of(w): w for w in workloads(docs)}
    if set(by_role) != {"receiver", "evaluator"}:
        return [f"roles {sorted(by_role)}, not one receiver and one evaluator workload"]
    cfg = distributed_config()
    listen = {"grpc": cfg.listen.grpc, "http-otlp": cfg.listen.http, "http-metrics": cfg.listen.metrics}
    listen_ports = {n: int(a.rsplit(":", 1)[1]) for n, a in listen.items()}
    labels = {r: w["spec"]["template"]["metadata"]["labels"] for r, w in by_role.items()}
    for role, w in by_role.items():
        spec = w["spec"]["template"]["spec"]
        c = _container(spec)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        want = RECEIVER_PORTS if role == "receiver" else EVALUATOR_PORTS
        if ports != {n: listen_ports[n] for n in want}:
            bad.append(f"{role}: container ports {ports}, not {sorted(want)} as config.yaml listens")
        if not selects(w["spec"]["selector"]["matchLabels"], labels[role]):
            bad.append(f"{role}: the selector does not match its own pods")
        other = "evaluator" if role == "receiver" else "receiver"
        if selects(w["spec"]["selector"]["matchLabels"], labels[other]):
            bad.append(f"{role}: the selector matches the {other}s' pods too")
        if c["livenessProbe"].get("httpGet") != {"path": "/healthz", "port": "http-metrics"}:
            bad.append(f"{role}: liveness is not /healthz")
        ready = c["readinessProbe"]
        if role == "receiver" and ready.get("grpc", {}).get("port") != ports.get("grpc"):
            bad.append("receiver: readiness is not the gRPC health of the port Envoy sends to")
        if role == "evaluator" and ready.get("httpGet") != {"path": "/readyz", "port": "http-metrics"}:
            bad.append("evaluator: readiness is not /readyz (joined the group)")
    # Who selects which tier: Services, PDBs, NetworkPolicies.
    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
                       ("NetworkPolicy", ("spec", "podSelector", "matchLabels"))):  # fmt: skip
        for doc in (x for x in docs if x["kind"] == kind):
            sel = functools.reduce(lambda o, k: o[k], path, doc)
            chosen = sorted(r for r, lab in labels.items() if selects(sel, lab))
            if len(chosen) != 1:
                bad.append(f"{key(doc)} selects {chosen or 'no tier'}, not exactly one tier")
    receiver_svc = one(docs, "Service")  # "meshaudit": the address in deploy/istio
    if not selects(receiver_svc["spec"]["selector"], labels["receiver"]):
        bad.append("the Service Envoy sends to does not select the receivers")
    for svc in (x for x in docs if x["kind"] == "Service"):
        tier = "receiver" if selects(svc["spec"]["selector"], labels["receiver"]) else "evaluator"
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
        want = RECEIVER_PORTS if tier == "receiver" else EVALUATOR_PORTS
        if ports != {n: (listen_ports[n], n) for n in want}:
            bad.append(f"{key(svc)}: ports {ports}, not the {tier}s' {sorted(want)}")
    for np in (x for x in docs if x["kind"] == "NetworkPolicy"):
        tier = "receiver" if selects(np["spec"]["podSelector"]["matchLabels"], labels["receiver"]) else "evaluator"
        admitted = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
        want_ports = {listen_ports[n] for n in (RECEIVER_PORTS if tier == "receiver" else EVALUATOR_PORTS)}
        if admitted != want_ports:
            bad.append(f"{key(np)}: admits {sorted(admitted)}, the {tier}s serve {sorted(want_ports)}")
    return bad


@functools.cache
def distributed_loaded() -> tuple[Config, Policy]:
    """The overlay's config.yaml beside the base's policy.yaml, loaded as the pods mount them."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in one(render(DISTRIBUTED), "ConfigMap")["data"].items():
            (Path(tmp) / name).write_text(text)
        return load(Path(tmp) / "config.yaml")


def distributed_config() -> Config:
    return distributed_loaded()[0]


def test_the_distributed_tiers_serve_their_ports_and_each_selector_picks_one_tier() -> None:
    assert tier_errors(render(DISTRIBUTED)) == []


def _tier(docs: list[Doc], role: str) -> Doc:
    [w] = [w for w in workloads(docs) if role_of(w) == role]
    return w


@pytest.mark.parametrize(
    ("name", "breakage"),
    [
        ("evaluator serves 4317", lambda d: _container(_tier(d, "evaluator")["spec"]["template"]["spec"])["ports"]
         .append({"name": "grpc", "containerPort": 4317, "protocol": "TCP"})),
        ("receiver without OTLP/HTTP", lambda d: _container(_tier(d, "receiver")["spec"]["template"]["spec"])
         ["ports"].pop(1)),
        ("Service selects both tiers", lambda d: one(d, "Service")["spec"]["selector"]
         .pop("app.kubernetes.io/component")),
        ("PDB selects both tiers", lambda d: one(d, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
         .pop("app.kubernetes.io/component")),
        ("evaluators admitted on 4317", lambda d: one(d, "NetworkPolicy", "meshaudit-evaluator")["spec"]["ingress"][0]
         ["ports"].append({"port": 4317, "protocol": "TCP"})),
        ("evaluator readiness on gRPC", lambda d: _container(_tier(d, "evaluator")["spec"]["template"]["spec"])
         .update(readinessProbe={"grpc": {"port": 4317}})),
        ("evaluators as receivers", lambda d: _container(_tier(d, "evaluator")["spec"]["template"]["spec"])["args"]
         .__setitem__(-1, "receiver")),
    ],
)  # fmt: skip
def test_the_tier_check_catches_each_disagreement(name: str, breakage: Any) -> None:
    docs = copy.deepcopy(render(DISTRIBUTED))
    breakage(docs)
    assert tier_errors(docs) != [], name


def test_receivers_are_stateless_scaled_on_cpu_and_kept_two_at_least() -> None:
    docs = render(DISTRIBUTED)
    receiver = _tier(docs, "receiver")
    assert receiver["kind"] == "Deployment" and receiver["metadata"]["name"] == "meshaudit-receiver"
    assert "replicas" not in receiver["spec"]  # the HPA owns it: an apply must not reset it
    assert receiver["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    spec = receiver["spec"]["template"]["spec"]
    assert not [v for v in spec["volumes"] if "persistentVolumeClaim" in v]  # nothing to keep
    assert all(x["kind"] != "PersistentVolumeClaim" for x in docs)  # the base's state volume is gone
    c = _container(spec)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    [hpa] = [x for x in docs if x["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "meshaudit-receiver",
    }
    assert hpa["spec"]["minReplicas"] >= 2  # one receiver lost or drained, the Service keeps another
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in c["resources"]["requests"]  # utilization is a share of the request
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_evaluators_keep_their_own_spool_across_restarts_and_scale_downs() -> None:
    """A StatefulSet with a volume per member: alerts a sink has not delivered survive the pod
    (offsets are committed once hops are judged, not once their alerts are delivered)."""
    docs = render(DISTRIBUTED)
    evaluator = _tier(docs, "evaluator")
    assert evaluator["kind"] == "StatefulSet"
    assert evaluator["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    [claim] = evaluator["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    spec = evaluator["spec"]["template"]["spec"]
    c = _container(spec)
    workdir = dockerfile_value("WORKDIR")
    assert c["workingDir"] == workdir
    [mount] = [m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == workdir and not mount.get("readOnly")
    assert claim["metadata"]["name"] not in {v["name"] for v in spec["volumes"]}  # from the template only
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "tmp")
    # every spool the config gives (or a sink gets by default) is on that volume
    cfg = distributed_config()
    sinks = (cfg.sinks.jsonl, cfg.sinks.kafka, cfg.sinks.mqtt, KafkaConfig(), MqttConfig())
    spools = [s.spool_dir for s in sinks if s is not None and s.spool_dir is not None]
    assert cfg.sinks.kafka is not None and len(spools) >= 3
    for spool in spools:
        assert (Path(workdir) / spool).resolve().is_relative_to(workdir), f"{spool} is not on the member's volume"
    # the governing Service exists, is headless and selects the evaluators
    svc = one(docs, "Service", evaluator["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert selects(svc["spec"]["selector"], evaluator["spec"]["template"]["metadata"]["labels"])
    # at most as many members as partitions: the rest would sit idle
    assert cfg.distributed.partitions >= evaluator["spec"]["replicas"] >= 2
    pdb = one(docs, "PodDisruptionBudget", "meshaudit-evaluator")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_both_tiers_run_this_image_on_the_configmap_with_a_distributed_section(tmp_path: Path) -> None:
    docs = render(DISTRIBUTED)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    cm = one(docs, "ConfigMap")
    assert cm["data"]["config.yaml"] == (DISTRIBUTED / "config" / "config.yaml").read_text()
    assert cm["data"]["policy.yaml"] == (BASE / "config" / "policy.yaml").read_text()  # one policy for both layouts
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    meshaudit = Path(sys.executable).with_name("meshaudit")
    out = subprocess.run([str(meshaudit), "validate", str(tmp_path / "config.yaml")], capture_output=True, text=True)
    assert out.returncode == 0 and "warning" not in out.stdout + out.stderr, out.stdout + out.stderr
    cfg = distributed_config()
    assert "distributed" in yaml.safe_load(cm["data"]["config.yaml"])
    assert cfg.distributed.create_topic and cfg.distributed.retention_ms is not None
    # hops stay at least as long as a moved partition's new owner replays
    assert cfg.distributed.retention_ms >= build_engine(*distributed_loaded()).corr.ttl * 1000
    for w in workloads(docs):
        c = _container(w["spec"]["template"]["spec"])
        assert c["image"] == f"meshaudit:{version}", key(w)  # `kustomize edit set image meshaudit=...` sets both
        [mount] = [m for m in c["volumeMounts"] if m["name"] == "config"]
        assert c["args"] == ["run", "--config", f"{mount['mountPath']}/config.yaml", "--role", role_of(w)]
        assert "subPath" not in mount
        config_volume = next(v for v in w["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
        assert config_volume["configMap"]["name"] == cm["metadata"]["name"]


def test_prometheus_scrapes_both_tiers_as_the_job_the_alert_rules_select() -> None:
    docs = render(DISTRIBUTED)
    sm = one(docs, "ServiceMonitor")
    services = [x for x in docs if x["kind"] == "Service"]
    assert len(services) == 2
    rules = (DEPLOY / "prometheus" / "meshaudit-rules.yaml").read_text()
    jobs = set(re.findall(r'job="([^"]+)"', rules))
    for svc in services:
        labels = svc["metadata"]["labels"]
        assert selects(sm["spec"]["selector"]["matchLabels"], labels), key(svc)
        # The Prometheus Operator names the job after the Service's jobLabel label, else the Service.
        job = labels[sm["spec"]["jobLabel"]] if "jobLabel" in sm["spec"] else svc["metadata"]["name"]
        assert {job} == jobs, key(svc)
        assert {p["name"] for p in svc["spec"]["ports"]} >= {e["port"] for e in sm["spec"]["endpoints"]}
        for label in sm["spec"].get("targetLabels", []):
            assert label in labels  # each target says which tier it is
    assert sm["spec"]["targetLabels"] == ["app.kubernetes.io/component"]


# --- Istio: the providers and what the decoders read -----------------------------------------------
def providers() -> dict[str, Doc]:
    doc = yaml.safe_load(MESHCONFIG.read_text())
    return {p["name"]: p for p in doc["meshConfig"]["extensionProviders"]}


def provider(kind: str) -> Doc:
    found: list[Doc] = [p[kind] for p in providers().values() if kind in p]
    assert len(found) == 1, kind
    return found[0]


def test_each_telemetry_selects_providers_the_mesh_config_defines() -> None:
    defined = providers()
    kinds = {next(k for k in p if k != "name") for p in defined.values()}
    assert kinds == {"envoyHttpAls", "envoyTcpAls", "envoyOtelAls", "opentelemetry"}
    svc = one(base_manifests(), "Service")
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    for p in defined.values():
        body = next(v for k, v in p.items() if k != "name")
        assert (body["service"], body["port"]) == (host, grpc_port), p["name"]
    used: list[str] = []
    istio = [x for d in kustomizations() if d.is_relative_to(ISTIO) for x in render(d)]
    telemetries = [x for x in istio if x["kind"] == "Telemetry"]
    assert telemetries and {x["kind"] for x in istio} == {"Telemetry", "DestinationRule"}
    for t in telemetries:
        for section in ("accessLogging", "tracing"):
            for entry in t["spec"].get(section, []):
                used += [p["name"] for p in entry["providers"]]
    assert set(used) <= set(defined)
    assert {"meshaudit-als", "meshaudit-tcp", "meshaudit-otel"} <= set(used)


def test_the_receivers_destination_rule_ejects_a_dead_receiver_of_the_service_envoy_sends_to() -> None:
    """deploy/istio/distributed: outlier detection on the Service the mesh config names (the
    receivers of the distributed layout keep the base's Service), ejecting on one local failure."""
    (rule,) = [
        x for d in kustomizations() if d.is_relative_to(ISTIO) for x in render(d) if x["kind"] == "DestinationRule"
    ]
    svc = one(base_manifests(), "Service")
    assert rule["spec"]["host"] == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    assert rule["metadata"]["namespace"] == svc["metadata"]["namespace"]
    od = rule["spec"]["trafficPolicy"]["outlierDetection"]
    assert od["splitExternalLocalOriginErrors"] is True and od["consecutiveLocalOriginFailures"] == 1


def _calls(tree: ast.AST, funcs: set[str], first_arg: str) -> list[tuple[str, ...]]:
    """The string arguments of each call ``f(first_arg, "k1", "k2", ...)`` with f in ``funcs``."""
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in funcs
            and node.args
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == first_arg
        ):
            out.append(
                tuple(a.value for a in node.args[1:] if isinstance(a, ast.Constant) and isinstance(a.value, str))
            )
    return out


def _function(module: Any, name: str) -> ast.AST:
    tree = ast.parse(Path(module.__file__).read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def otel_log_attributes_read() -> list[tuple[str, ...]]:
    """Each log-record attribute the OTLP-logs decoder reads, as the spellings it accepts."""
    return _calls(_function(otlp_decode, "_log_hop"), {"_first", "_first_str", "_attr"}, "a")


def test_the_otel_access_log_provider_carries_every_attribute_the_decoder_reads() -> None:
    read = otel_log_attributes_read()
    assert len(read) >= 15, read  # the decoder reads the hop's fields from them
    labels = provider("envoyOtelAls")["logFormat"]["labels"]
    missing = [spellings for spellings in read if not set(spellings) & set(labels)]
    assert missing == [], f"attributes the decoder reads that the provider does not send: {missing}"
    unread = set(labels) - {k for spellings in read for k in spellings}
    assert unread == set(), f"labels the decoder never reads: {unread}"
    # The resource attributes name the sidecar: Envoy's OpenTelemetry access logger adds
    # log_name, zone_name, cluster_name and node_name itself.
    resource = _calls(_function(otlp_decode, "decode_logs"), {"_first", "_first_str"}, "res")
    assert resource and all(set(s) & {"log_name", "zone_name", "cluster_name", "node_name"} for s in resource)


def test_the_als_providers_log_every_header_and_filter_state_the_decoder_reads() -> None:
    tree = ast.parse(Path(als_decode.__file__).read_text())
    headers: set[str] = set()
    states: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
            continue
        owner = node.func.value
        arg = node.args[0] if node.args else None
        value = (
            arg.value
            if isinstance(arg, ast.Constant)
            else getattr(als_decode, arg.id, None)
            if isinstance(arg, ast.Name)
            else None
        )
        if isinstance(owner, ast.Attribute) and owner.attr == "request_headers" and isinstance(value, str):
            headers.add(value)
        if isinstance(owner, ast.Name) and owner.id == "fso" and isinstance(value, str):
            states.add(value)
    assert headers == {"traceparent", "x-forwarded-client-cert"}, headers  # what this test found to check
    assert states == {"downstream_peer", "upstream_peer"}, states
    http, tcp = provider("envoyHttpAls"), provider("envoyTcpAls")
    assert headers <= set(http["additionalRequestHeadersToLog"])
    assert states <= set(http["filterStateObjectsToLog"]) and states <= set(tcp["filterStateObjectsToLog"])


def envoy_with_otel_access_log(labels: dict[str, str], path: Path) -> subprocess.CompletedProcess[str]:
    """Envoy in validate mode on a listener whose OpenTelemetry access logger carries ``labels``
    as attributes, which is what Istio builds from an envoyOtelAls provider's logFormat.labels."""
    envoy_api = "type.googleapis.com/envoy.extensions"
    hcm = {
        "@type": f"{envoy_api}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "in",
        "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": f"{envoy_api}.filters.http.router.v3.Router"}}],
        "access_log": [{"name": "envoy.access_loggers.open_telemetry", "typed_config": {
            "@type": f"{envoy_api}.access_loggers.open_telemetry.v3.OpenTelemetryAccessLogConfig",
            "log_name": "meshaudit",
            "grpc_service": {"envoy_grpc": {"cluster_name": "meshaudit"}},
            "attributes": {"values": [{"key": k, "value": {"string_value": v}} for k, v in labels.items()]},
        }}],
    }  # fmt: skip
    cluster = {
        "name": "meshaudit",
        "type": "STATIC",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": f"{envoy_api}.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "meshaudit", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 4317}}}}]}]},
    }  # fmt: skip
    listener = {
        "name": "in",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    path.write_text(json.dumps({"static_resources": {"listeners": [listener], "clusters": [cluster]}}))
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_envoy_accepts_every_command_operator_of_the_otel_provider(tmp_path: Path) -> None:
    labels = provider("envoyOtelAls")["logFormat"]["labels"]
    ok = envoy_with_otel_access_log(labels, tmp_path / "envoy.json")
    assert ok.returncode == 0 and "OK" in ok.stdout + ok.stderr, ok.stderr[-2000:]
    # and refuses one it does not have, so the check above can fail
    bad = envoy_with_otel_access_log({**labels, "response_flags": "%RESPONSE_FLAGZ%"}, tmp_path / "bad.json")
    assert bad.returncode != 0 and "RESPONSE_FLAGZ" in bad.stderr + bad.stdout


# --- the documentation ------------------------------------------------------------------------------
def test_the_deploy_readme_names_every_kustomization_and_the_crd_catalog() -> None:
    text = (DEPLOY / "README.md").read_text()
    for d in kustomizations():
        if d != DEPLOY / "prometheus" and d != BASE:
            assert rel(d) in text, f"deploy/README.md does not say how to apply {rel(d)}"
    assert "https://raw.githubusercontent.com/datreeio/CRDs-catalog/main/{group}/{kind}_{version}.json" in text
    assert "MESHAUDIT_CRD_SCHEMAS" in text
