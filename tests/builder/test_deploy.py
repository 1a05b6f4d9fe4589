"""Fleet manifests, validated with the official Kubernetes client's models (not by text)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgebuild.bundle import write_bundle
from edgebuild.deploy import FleetOptions, deploy, fleet_objects, render
from edgebuild.errors import UsageError
from edgebuild.targets import load_target
from edgerun.errors import BundleError
from edgerun.manifest import FORMAT_VERSION, Manifest, ModelFile, TensorSpec

kubernetes = pytest.importorskip("kubernetes")
yaml = pytest.importorskip("yaml")
from kubernetes.client import ApiClient  # noqa: E402


def make_bundle(tmp_path: Path, target: str, name: str = "digits") -> Path:
    """A bundle directory with a real manifest; the model bytes do not matter here."""
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        created=datetime.now(timezone.utc).isoformat(),
        target=load_target(target).model_dump(mode="json"),
        model=ModelFile(path="model.onnx", sha256="", size_bytes=0, precision="fp32", opset=17),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 4])],
    )
    return write_bundle(tmp_path / f"{name}-{target}", manifest, {"model.onnx": b"not used"})


def as_model(obj: dict, kind: str):
    """Deserialize with the client's models and check nothing was dropped on the way back.

    The client ignores keys it does not know, so a round trip that loses data means a
    misspelt or misplaced field; required fields missing raise during deserialization.
    """
    client = ApiClient()
    model = client._ApiClient__deserialize(obj, kind)
    assert client.sanitize_for_serialization(model) == obj
    return model


def by_kind(objects):
    return {o["kind"]: o for o in objects}


def test_jetson_daemonset(tmp_path):
    bundle = make_bundle(tmp_path, "jetson")
    objects = fleet_objects(bundle, FleetOptions(image="registry.local/edgerun-jetson:1"))
    assert [o["kind"] for o in objects] == ["DaemonSet"]
    ds = as_model(objects[0], "V1DaemonSet")
    assert ds.metadata.name == "digits-jetson"
    assert ds.metadata.namespace == "default"
    pod = ds.spec.template.spec
    assert pod.runtime_class_name == "nvidia"
    assert pod.node_selector == {"edgebuild.dev/target": "jetson", "kubernetes.io/arch": "arm64"}
    # The selector matches the template (the API server refuses it otherwise).
    assert ds.spec.selector.match_labels.items() <= ds.spec.template.metadata.labels.items()
    (container,) = pod.containers
    assert container.image == "registry.local/edgerun-jetson:1"
    assert container.args[:3] == ["/bundle", "--host", "0.0.0.0"]
    assert container.liveness_probe.http_get.path == "/v2/health/live"
    assert container.readiness_probe.http_get.path == "/v2/health/ready"
    assert container.startup_probe.http_get.path == "/v2/health/live"
    assert container.ports[0].container_port == 8000
    assert container.liveness_probe.http_get.port == container.ports[0].name
    assert container.resources.limits == {"cpu": "2", "memory": "2Gi"}
    assert container.security_context.run_as_non_root and container.security_context.run_as_user == 10001
    assert 44 in pod.security_context.supplemental_groups
    mounts = {m.mount_path: m for m in container.volume_mounts}
    assert "/var/cache/edgerun" in mounts and "/bundle" not in mounts  # bundle baked into the image
    env = {e.name: e for e in container.env}
    assert env["EDGERUN_CACHE_DIR"].value == "/var/cache/edgerun"
    assert "EDGERUN_TOKEN" not in env
    assert env["ORT_DISABLE_TELEMETRY"].value == env["ORT_TELEMETRY_DISABLED"].value == "1"
    assert ds.spec.update_strategy.type == "RollingUpdate"


def test_x86_daemonset_has_no_gpu_runtime(tmp_path):
    bundle = make_bundle(tmp_path, "x86")
    (obj,) = fleet_objects(bundle, FleetOptions(image="edgerun-x86:2", cpu="500m", memory="256Mi"))
    ds = as_model(obj, "V1DaemonSet")
    pod = ds.spec.template.spec
    assert pod.runtime_class_name is None
    assert pod.node_selector == {"edgebuild.dev/target": "x86", "kubernetes.io/arch": "amd64"}
    assert pod.containers[0].resources.limits == {"cpu": "500m", "memory": "256Mi"}
    assert pod.containers[0].resources.requests == {"cpu": "500m", "memory": "256Mi"}
    assert pod.security_context.supplemental_groups is None


def test_arm64_bundle_selects_arm_nodes(tmp_path):
    (obj,) = fleet_objects(make_bundle(tmp_path, "arm64"), FleetOptions(image="edgerun:arm64"))
    ds = as_model(obj, "V1DaemonSet")
    assert ds.spec.template.spec.node_selector["kubernetes.io/arch"] == "arm64"
    assert ds.spec.template.spec.runtime_class_name is None


def test_host_path_bundle_service_and_options(tmp_path):
    bundle = make_bundle(tmp_path, "jetson")
    options = FleetOptions(
        image="edgerun-jetson:1",
        name="vision",
        namespace="edge",
        node_selector={"edgebuild.dev/site": "plant-2", "kubernetes.io/arch": "arm64"},
        bundle_host_path="/opt/edgebuild/bundles/current",
        cache_host_path="/var/cache/edgerun",
        service="local",
        token_secret="edgerun-token",
    )
    objects = by_kind(fleet_objects(bundle, options))
    ds = as_model(objects["DaemonSet"], "V1DaemonSet")
    svc = as_model(objects["Service"], "V1Service")
    pod = ds.spec.template.spec
    assert pod.node_selector == {
        "edgebuild.dev/target": "jetson",
        "kubernetes.io/arch": "arm64",
        "edgebuild.dev/site": "plant-2",
    }
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["bundle"].host_path.path == "/opt/edgebuild/bundles/current"
    assert volumes["cache"].host_path.path == "/var/cache/edgerun"
    token = {e.name: e for e in pod.containers[0].env}["EDGERUN_TOKEN"]
    assert token.value_from.secret_key_ref.name == "edgerun-token" and token.value_from.secret_key_ref.key == "token"
    mounts = {m.mount_path: m for m in pod.containers[0].volume_mounts}
    assert mounts["/bundle"].read_only is True and mounts["/bundle"].name == "bundle"
    assert svc.metadata.namespace == "edge" and ds.metadata.namespace == "edge"
    assert svc.spec.type == "ClusterIP" and svc.spec.internal_traffic_policy == "Local"
    assert svc.spec.selector == ds.spec.selector.match_labels
    assert svc.spec.ports[0].target_port == "http"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(name="Vision_Model"), r"--name 'Vision_Model' is not a valid Kubernetes name"),
        (dict(namespace="Edge"), r"--namespace 'Edge'"),
        (dict(cpu="two"), r"--cpu 'two' is not a Kubernetes quantity"),
        (dict(memory="1GB"), r"--memory '1GB'"),
        (dict(node_selector={"bad key": "x"}), r"--node-selector 'bad key=x'"),
        (dict(bundle_host_path="bundles/current"), r"--bundle-host-path 'bundles/current' must be an absolute path"),
        (dict(image="edge run"), r"--image 'edge run'"),
        (dict(token_secret="My_Token"), r"--token-secret 'My_Token'"),
    ],
)
def test_bad_options_are_usage_errors(tmp_path, options, message):
    bundle = make_bundle(tmp_path, "x86")
    with pytest.raises(UsageError, match=message):
        fleet_objects(bundle, FleetOptions(**{"image": "edgerun:1", **options}))


def test_not_a_bundle_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match=r"no manifest.json"):
        fleet_objects(tmp_path, FleetOptions(image="edgerun:1"))


def test_cli_writes_yaml_that_validates(tmp_path):
    bundle = make_bundle(tmp_path, "jetson")
    result = CliRunner().invoke(
        deploy,
        [
            "k8s",
            str(bundle),
            "--image",
            "edgerun-jetson:1",
            "--node-selector",
            "edgebuild.dev/site=plant-2",
            "--service",
            "cluster",
            "--memory",
            "3Gi",
        ],
    )
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.output))
    assert [d["kind"] for d in docs] == ["DaemonSet", "Service"]
    ds = as_model(docs[0], "V1DaemonSet")
    assert ds.spec.template.spec.node_selector["edgebuild.dev/site"] == "plant-2"
    assert ds.spec.template.spec.containers[0].resources.limits["memory"] == "3Gi"
    as_model(docs[1], "V1Service")


def test_cli_writes_json_list_to_a_file(tmp_path):
    bundle = make_bundle(tmp_path, "x86")
    out = tmp_path / "fleet.json"
    result = CliRunner().invoke(deploy, ["k8s", str(bundle), "--image", "edgerun:1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out)
    data = json.loads(out.read_text())
    assert data["kind"] == "List"
    as_model(data["items"][0], "V1DaemonSet")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--node-selector", "novalue"], "must be KEY=VALUE"),
        (["--cpu", "lots"], "is not a Kubernetes quantity"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(tmp_path, args, message):
    bundle = make_bundle(tmp_path, "x86")
    result = CliRunner().invoke(deploy, ["k8s", str(bundle), "--image", "edgerun:1", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_cli_missing_bundle_exits_2(tmp_path):
    result = CliRunner().invoke(deploy, ["k8s", str(tmp_path / "nope"), "--image", "edgerun:1"])
    assert result.exit_code == 2
    assert "no manifest.json" in result.output


def test_render_yaml_round_trips(tmp_path):
    objects = fleet_objects(make_bundle(tmp_path, "x86"), FleetOptions(image="edgerun:1", service="local"))
    text = render(objects)
    assert list(yaml.safe_load_all(text)) == objects
    assert "&id" not in text and "*id" not in text  # plain YAML, no anchors
