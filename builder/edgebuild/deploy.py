"""Fleet manifests: Kubernetes objects that run a bundle's runtime image on every matching device.

One DaemonSet per bundle (one server per device), placed by node labels derived from the
bundle's target, with the NVIDIA runtime class on GPU targets, KServe v2 health probes, resource
limits, and the bundle either baked into the image or read from a directory on each node.
``fleet_objects`` returns plain dicts (what ``kubectl apply`` takes); the click group ``deploy``
writes them as YAML.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgebuild.errors import UsageError, handle_cli_errors
from edgerun._privacy import TELEMETRY_OPT_OUT

PORT = 8000
BUNDLE_MOUNT = "/bundle"
# The runtime images run as this uid (Dockerfile.x86 / Dockerfile.jetson).
RUNTIME_UID = 10001
# Owner group of the Tegra GPU device nodes on L4T; the server needs it to reach the GPU.
VIDEO_GID = 44
# EDGERUN_CACHE_DIR: TensorRT engine/timing caches, self-benchmark decisions, kept versions.
CACHE_DIR = "/var/cache/edgerun"
# Nodes opt in to a target with `kubectl label node NODE edgebuild.dev/target=jetson`: the
# architecture alone cannot tell a Jetson from a Raspberry Pi.
TARGET_LABEL = "edgebuild.dev/target"
ARCH_LABEL = "kubernetes.io/arch"
# Built-in targets whose bundles may predate the container platform field.
_KNOWN_ARCH = {"x86": "amd64", "arm64": "arm64", "jetson": "arm64"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass
class FleetOptions:
    """What the operator chooses; everything else comes from the bundle's manifest."""

    image: str
    name: str | None = None
    namespace: str = "default"
    # Added to (and overriding) the labels derived from the target.
    node_selector: dict[str, str] = field(default_factory=dict)
    cpu: str | None = None
    memory: str | None = None
    # None: the bundle baked into the image at /bundle. A path: that directory on every node.
    bundle_host_path: str | None = None
    # None: runtime cache in the pod (kept across container restarts). A path: kept on the node.
    cache_host_path: str | None = None
    # A Secret whose key "token" the server requires as a Bearer token (health stays open).
    token_secret: str | None = None
    service: str = "none"  # none | local | cluster


@dataclass
class _Target:
    name: str
    gpu: bool
    arch: str | None
    runtime_class: str | None


def _target_of(bundle: Path) -> tuple[str, _Target]:
    from edgerun.manifest import read_manifest

    manifest = read_manifest(bundle)  # a BundleError names what is wrong with it (exit 2)
    target = manifest.target or {}
    name = str(target.get("name") or "")
    if not name:
        raise UsageError(
            f"{bundle}: the manifest records no target name; rebuild the bundle with `edgebuild pack --target ...`"
        )
    container = target.get("container") or {}
    platform = str(container.get("platform") or "")
    arch = platform.split("/", 1)[1] if platform.startswith("linux/") else _KNOWN_ARCH.get(name)
    gpu = target.get("device") == "gpu"
    runtime_class = container.get("runtime") or ("nvidia" if gpu else None)
    return manifest.name, _Target(name=name, gpu=gpu, arch=arch, runtime_class=runtime_class)


def _dns_name(text: str) -> str:
    """A valid object name from a bundle and target name (lowercase, '-', at most 63 chars)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    return name or "edgerun"


def _check(options: FleetOptions, name: str) -> None:
    if not _DNS_LABEL.match(name) or len(name) > 63:
        raise UsageError(
            f"--name '{name}' is not a valid Kubernetes name: use lowercase letters, digits and '-', at most 63 characters"
        )
    if not _DNS_LABEL.match(options.namespace):
        raise UsageError(f"--namespace '{options.namespace}' is not a valid Kubernetes namespace name")
    if not options.image or any(c.isspace() for c in options.image):
        raise UsageError(f"--image '{options.image}' is not an image reference, e.g. registry.local/edgerun-digits:1")
    for flag, value in (("--cpu", options.cpu), ("--memory", options.memory)):
        if value is not None and not _QUANTITY.match(value):
            raise UsageError(f"{flag} '{value}' is not a Kubernetes quantity (e.g. --cpu 500m, --memory 512Mi)")
    for key, value in options.node_selector.items():
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise UsageError(
                f"--node-selector '{key}={value}' is not a valid label (key: [prefix/]name, value: up to 63 of [A-Za-z0-9-_.])"
            )
    for flag, path in (
        ("--bundle-host-path", options.bundle_host_path),
        ("--cache-host-path", options.cache_host_path),
    ):
        if path is not None and not path.startswith("/"):
            raise UsageError(f"{flag} '{path}' must be an absolute path on the nodes")
    if options.token_secret is not None and not _DNS_LABEL.match(options.token_secret):
        raise UsageError(f"--token-secret '{options.token_secret}' is not a valid Secret name")
    if options.service not in ("none", "local", "cluster"):
        raise UsageError(f"--service '{options.service}' must be none, local or cluster")


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def fleet_objects(bundle: Path, options: FleetOptions) -> list[dict[str, Any]]:
    """The Kubernetes objects (DaemonSet, optionally a Service) that serve ``bundle`` on a fleet."""
    bundle_name, target = _target_of(Path(bundle))
    name = options.name or _dns_name(f"{bundle_name}-{target.name}")
    _check(options, name)

    labels = {"app.kubernetes.io/name": "edgerun", "app.kubernetes.io/instance": name}
    pod_labels = {**labels, TARGET_LABEL: _dns_name(target.name)}
    node_selector = {TARGET_LABEL: target.name}
    if target.arch:
        node_selector[ARCH_LABEL] = target.arch
    node_selector.update(options.node_selector)

    # Engine builds need headroom on GPU targets; an ORT CPU server sits near 150 MB.
    cpu = options.cpu or "2"
    memory = options.memory or ("2Gi" if target.gpu else "512Mi")
    resources = {"limits": {"cpu": cpu, "memory": memory}, "requests": {"cpu": cpu, "memory": memory}}

    # The root filesystem is read-only; these are the places the server writes.
    volumes: list[dict[str, Any]] = [
        {"name": "tmp", "emptyDir": {}},
        {
            "name": "cache",
            **(
                {"hostPath": {"path": options.cache_host_path, "type": "DirectoryOrCreate"}}
                if options.cache_host_path
                else {"emptyDir": {}}
            ),
        },
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_DIR},
    ]
    env: list[dict[str, Any]] = [
        {"name": "EDGERUN_PORT", "value": str(PORT)},
        {"name": "EDGERUN_CACHE_DIR", "value": CACHE_DIR},
        # ONNX Runtime's telemetry off even for an image that does not set it (see the README's privacy note).
        *({"name": name, "value": "1"} for name in TELEMETRY_OPT_OUT),
    ]
    if options.token_secret:
        env.append(
            {"name": "EDGERUN_TOKEN", "valueFrom": {"secretKeyRef": {"name": options.token_secret, "key": "token"}}}
        )
    if options.bundle_host_path:
        volumes.append({"name": "bundle", "hostPath": {"path": options.bundle_host_path, "type": "Directory"}})
        mounts.append({"name": "bundle", "mountPath": BUNDLE_MOUNT, "readOnly": True})

    container = {
        "name": "edgerun",
        "image": options.image,
        # 0.0.0.0 inside the pod only: the pod network and the Service decide who can reach it.
        "args": [BUNDLE_MOUNT, "--host", "0.0.0.0", "--port", str(PORT)],
        "env": env,
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        # The first start on a GPU target builds TensorRT engines (minutes): the startup probe
        # holds liveness off until the server answers at all.
        "startupProbe": _probe("/v2/health/live", 5, 120 if target.gpu else 24),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "readinessProbe": _probe("/v2/health/ready", 5, 2),
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "nodeSelector": node_selector,
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {"runAsNonRoot": True},
    }
    if target.runtime_class:
        pod_spec["runtimeClassName"] = target.runtime_class
    if target.gpu:
        pod_spec["securityContext"]["supplementalGroups"] = [VIDEO_GID]

    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": labels,
            "annotations": {"edgebuild.dev/bundle": bundle_name, "edgebuild.dev/target": target.name},
        },
        "spec": {
            "selector": {"matchLabels": labels},
            # One device at a time, and old revisions kept for `kubectl rollout undo`.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "revisionHistoryLimit": 5,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }
    objects = [daemonset]
    if options.service != "none":
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": options.namespace, "labels": labels},
                "spec": {
                    "type": "ClusterIP",
                    "selector": labels,
                    "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
                    # local: a client on a device reaches that device's own server, never a neighbour's.
                    "internalTrafficPolicy": "Local" if options.service == "local" else "Cluster",
                },
            }
        )
    return objects


def render(objects: list[dict[str, Any]], fmt: str = "yaml") -> str:
    """Objects as a multi-document YAML stream, or one JSON ``List`` (both accepted by kubectl)."""
    if fmt == "json":
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}, indent=2) + "\n"
    try:
        import yaml
    except ImportError:
        raise UsageError("writing YAML needs PyYAML (pip install pyyaml); or write JSON with -o FILE.json") from None

    class _Dumper(yaml.SafeDumper):
        # Shared dicts (labels, selector) would otherwise come out as &id001 anchors: valid,
        # but unreadable and unlike what anyone writes by hand.
        def ignore_aliases(self, data):
            return True

    return "---\n".join(yaml.dump(obj, Dumper=_Dumper, sort_keys=False) for obj in objects)


def _parse_selector(values: tuple[str, ...]) -> dict[str, str]:
    selector = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(
                f"--node-selector '{item}' must be KEY=VALUE, e.g. --node-selector edgebuild.dev/site=plant-2"
            )
        selector[key] = value
    return selector


@click.group()
def deploy() -> None:
    """Generate deployment manifests that run a bundle on a fleet of devices."""


@deploy.command("k8s")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="Runtime image to run (built from Dockerfile.x86 / Dockerfile.jetson).")
@click.option("--name", help="DaemonSet/Service name (default: <bundle>-<target>).")
@click.option("--namespace", default="default", show_default=True)
@click.option(
    "--node-selector",
    "node_selector",
    multiple=True,
    metavar="KEY=VALUE",
    help=f"Extra node label to match; overrides the defaults ({TARGET_LABEL}=<target>, {ARCH_LABEL}). Repeatable.",
)
@click.option("--cpu", help="CPU limit and request (default 2).")
@click.option("--memory", help="Memory limit and request (default 512Mi; 2Gi on GPU targets).")
@click.option(
    "--bundle-host-path",
    help=f"Serve the bundle from this directory on each node (read-only at {BUNDLE_MOUNT}) instead of the one baked into the image.",
)
@click.option(
    "--cache-host-path",
    help=f"Keep the runtime cache ({CACHE_DIR}: TensorRT engines, kept versions) in this node directory, owned by uid {RUNTIME_UID}, so pod restarts reuse it.",
)
@click.option(
    "--token-secret",
    help="Secret (key 'token') whose value clients must send as a Bearer token; health probes stay open.",
)
@click.option(
    "--service",
    type=click.Choice(["none", "local", "cluster"]),
    default="none",
    show_default=True,
    help="Also write a ClusterIP Service; local routes each client to its own node's server.",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Write to FILE (.json for JSON) instead of stdout."
)
@handle_cli_errors
def k8s(
    bundle,
    image,
    name,
    namespace,
    node_selector,
    cpu,
    memory,
    bundle_host_path,
    cache_host_path,
    token_secret,
    service,
    output,
):
    """Kubernetes YAML for serving BUNDLE on every device of its target.

    Nodes opt in with `kubectl label node NODE edgebuild.dev/target=<target>`; GPU targets use
    the `nvidia` RuntimeClass. Apply with `kubectl apply -f FILE`.
    """
    options = FleetOptions(
        image=image,
        name=name,
        namespace=namespace,
        node_selector=_parse_selector(node_selector),
        cpu=cpu,
        memory=memory,
        bundle_host_path=bundle_host_path,
        cache_host_path=cache_host_path,
        token_secret=token_secret,
        service=service,
    )
    objects = fleet_objects(bundle, options)
    text = render(objects, "json" if output and output.suffix == ".json" else "yaml")
    if output:
        output.write_text(text)
        click.echo(str(output))
    else:
        click.echo(text, nl=False)
