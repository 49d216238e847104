"""The KubeRay manifests in cluster/ are what the API server and our CLI would accept (fast: no Ray start).

- Ray resources validate against the real KubeRay CRD schemas (../shared/data/kuberay-crds/), read the way
  the API server reads them: OpenAPI `nullable` and `x-kubernetes-int-or-string` translated to JSON Schema,
  and unknown fields rejected where the schema does not preserve them (what `kubectl apply`'s default
  strict field validation does; the API server would otherwise drop a misspelt field silently). The CEL
  rules (`x-kubernetes-validations`) are not evaluated.
- Plain Kubernetes objects (Secrets, ConfigMaps, PVCs) validate against the Kubernetes schemas that
  `kubernetes-validate` ships offline (strict).
- RayJob entrypoints name real `motiondirector` commands and flags (each command's --help must run), and
  the spec files they name are in the mounted ConfigMap, which equals configs/ (generated, not stale).
- Images, Secrets (and their keys), ConfigMaps, volumes and claims that manifests reference exist in the repo.
- The RayService's serveConfigV2 is what cluster/generate.py produces from the Serve app now.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
NOT_MANIFESTS = {"serve-args.yaml"}  # the Serve app's build args (cluster/generate.py), not a Kubernetes object
MANIFESTS = sorted(path for path in CLUSTER.glob("*.yaml") if path.name not in NOT_MANIFESTS)
# The CRDs are ~1 MB each: libyaml's loader reads them in a fraction of a second (pure Python: ~10 s).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
RAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
PLAIN_KINDS = {"Secret", "ConfigMap", "PersistentVolumeClaim"}
KUBERNETES_VERSION = "1.33.0"  # schemas shipped by kubernetes-validate
SPECS_MOUNT = "/opt/motiondirector/configs"


def _crd_folder() -> Path:
    """../shared/data/kuberay-crds beside the checkout (a worktree may sit deeper: look further up)."""
    for folder in ROOT.parents:
        candidate = folder / "shared" / "data" / "kuberay-crds"
        if candidate.is_dir():
            return candidate
    pytest.fail(f"KubeRay CRDs not found: expected shared/data/kuberay-crds beside the checkout ({ROOT.parent})")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in MANIFESTS:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((f"{path.name}[{index}]", document))
    return documents


DOCUMENTS = _documents()


def _of_kind(*kinds: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, doc) for name, doc in DOCUMENTS if doc.get("kind") in kinds]


def _ids(pairs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in pairs]


# --- CRD schemas -------------------------------------------------------------------------------------
def _to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema with the API server's strictness."""
    if isinstance(node, list):
        return [_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema = {key: _to_json_schema(value) if key not in ("enum", "default", "example") else value
              for key, value in node.items()}
    if schema.pop("x-kubernetes-int-or-string", False) and "type" not in schema and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.pop("nullable", False) and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    preserve = schema.pop("x-kubernetes-preserve-unknown-fields", False)
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
            and not preserve:
        schema["additionalProperties"] = False
    for key in [k for k in schema if k.startswith("x-kubernetes-")]:  # CEL rules, list/map types: not checked
        del schema[key]
    return schema


@functools.cache
def _crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    crd = yaml.load((_crd_folder() / RAY_KINDS[kind]).read_text(), Loader=_LOADER)  # noqa: S506 - a safe loader
    group = crd["spec"]["group"]
    versions = {f"{group}/{v['name']}": v for v in crd["spec"]["versions"] if v.get("served")}
    if api_version not in versions:
        pytest.fail(f"{kind}: apiVersion {api_version!r} is not served by the CRD (served: {sorted(versions)})")
    schema = _to_json_schema(copy.deepcopy(versions[api_version]["schema"]["openAPIV3Schema"]))
    schema["properties"].pop("status", None)  # written by the operator, never by us
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _errors(validator: jsonschema.protocols.Validator, document: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def test_every_manifest_is_a_known_kind_with_a_valid_name():
    assert {doc["kind"] for _, doc in DOCUMENTS} >= set(RAY_KINDS), "a RayCluster, RayJob and RayService each"
    for name, doc in DOCUMENTS:
        assert doc.get("kind") in set(RAY_KINDS) | PLAIN_KINDS, f"{name}: unexpected kind {doc.get('kind')!r}"
        object_name = doc.get("metadata", {}).get("name", "")
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", object_name) and len(object_name) <= 63, \
            f"{name}: metadata.name {object_name!r} is not a DNS-1123 label"


@pytest.mark.parametrize(("name", "document"), _of_kind(*RAY_KINDS), ids=_ids(_of_kind(*RAY_KINDS)))
def test_ray_resources_validate_against_the_kuberay_crds(name, document):
    errors = _errors(_crd_validator(document["kind"], document["apiVersion"]), document)
    assert not errors, f"{name} does not validate against the {document['kind']} CRD:\n" + "\n".join(errors)


def test_crd_validation_rejects_what_the_api_server_would():
    """The translated schemas can fail: a misspelt field, a wrong type, a bad quantity, an int-or-string."""
    _, cluster = next(pair for pair in DOCUMENTS if pair[1]["kind"] == "RayCluster")
    validator = _crd_validator("RayCluster", cluster["apiVersion"])
    assert not _errors(validator, cluster)

    def broken(change) -> list[str]:
        document = copy.deepcopy(cluster)
        change(document)
        return _errors(validator, document)

    assert any("workerGroupSpec" in e for e in broken(lambda d: d["spec"].update(
        workerGroupSpec=d["spec"].pop("workerGroupSpecs"))))
    assert any("maxReplicas" in e for e in broken(lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="8")))
    container = ("spec", "headGroupSpec", "template", "spec", "containers", 0)

    def in_container(update):
        def change(document):
            node = document
            for key in container:
                node = node[key]
            update(node)
        return change

    assert broken(in_container(lambda c: c["resources"]["limits"].update(memory="8 gigs")))
    assert any("imagePullPolcy" in e for e in broken(in_container(lambda c: c.update(imagePullPolcy="Always"))))
    assert not broken(in_container(lambda c: c["ports"][0].update(containerPort=6380)))  # int-or-string neighbours
    assert not broken(in_container(lambda c: c.update(livenessProbe={"httpGet": {"port": "dashboard"}})))
    assert broken(in_container(lambda c: c.update(livenessProbe={"httpGet": {"port": 1.5}})))


# --- plain Kubernetes objects --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "document"), _of_kind(*PLAIN_KINDS), ids=_ids(_of_kind(*PLAIN_KINDS)))
def test_plain_kubernetes_objects_validate_against_the_kubernetes_schemas(name, document):
    import kubernetes_validate

    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        pytest.fail(f"{name}: {error.path}: {error.message}")
    broken = {**document, "metadata": {**document["metadata"], "nmae": "typo"}}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: unknown fields are errors
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# --- pods ----------------------------------------------------------------------------------------------
def _cluster_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[document["kind"]]


def _groups(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = _cluster_spec(document)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def _containers(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for group_name, group in _groups(document):
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            yield group_name, pod, container


RAY_DOCUMENTS = _of_kind(*RAY_KINDS)


@pytest.mark.parametrize(("name", "document"), RAY_DOCUMENTS, ids=_ids(RAY_DOCUMENTS))
def test_pods_have_shm_gpu_settings_autoscaling_and_token_auth(name, document):
    spec = _cluster_spec(document)
    constraints = _constraints()
    assert spec["rayVersion"] == constraints["ray"], f"{name}: rayVersion differs from constraints.txt"
    assert spec.get("authOptions") == {"mode": "token", "secretName": "motiondirector-ray-auth"}, \
        f"{name}: Ray token auth must be on, from the motiondirector-ray-auth Secret"
    assert spec.get("enableInTreeAutoscaling") is True, f"{name}: autoscaling off"
    for group_name, group in _groups(document):
        pod = group["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for container in pod["containers"]:
            mounts = {mount["mountPath"]: mount["name"] for mount in container.get("volumeMounts", [])}
            assert "/dev/shm" in mounts and volumes[mounts["/dev/shm"]].get("emptyDir", {}).get("medium") == \
                "Memory", f"{name}/{group_name}: /dev/shm must be a memory-backed emptyDir"
            limits = container["resources"]["limits"]
            gpus = int(limits.get("nvidia.com/gpu", 0))
            tolerated = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            assert bool(gpus) == tolerated, f"{name}/{group_name}: GPU limit and GPU toleration go together"
            assert container["image"].endswith("-gpu" if gpus else "-cpu"), \
                f"{name}/{group_name}: {'GPU' if gpus else 'CPU'} pods use the {'gpu' if gpus else 'cpu'} image"
        if group_name != "head":
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], \
                f"{name}/{group_name}: autoscaling bounds must satisfy min <= replicas <= max"


# --- references ----------------------------------------------------------------------------------------
@functools.cache
def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _defined(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in _of_kind(kind)}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _secret_keys(secret: dict[str, Any]) -> set[str]:
    return set(secret.get("stringData", {})) | set(secret.get("data", {}))


@pytest.mark.parametrize(("name", "document"), RAY_DOCUMENTS, ids=_ids(RAY_DOCUMENTS))
def test_referenced_secrets_configmaps_claims_and_volumes_exist(name, document):
    secrets, configmaps, claims = _defined("Secret"), _defined("ConfigMap"), _defined("PersistentVolumeClaim")
    auth = _cluster_spec(document)["authOptions"]["secretName"]
    assert "auth_token" in _secret_keys(secrets[auth]), f"{name}: Secret {auth} needs the key auth_token"
    for node in _walk(document):
        if "secretKeyRef" in node:
            ref = node["secretKeyRef"]
            assert ref["name"] in secrets and ref["key"] in _secret_keys(secrets[ref["name"]]), f"{name}: {ref}"
        if "secretRef" in node:
            assert node["secretRef"]["name"] in secrets, f"{name}: Secret {node['secretRef']['name']} not defined"
        if "secret" in node and "secretName" in node["secret"]:
            assert node["secret"]["secretName"] in secrets, f"{name}: Secret {node['secret']['secretName']}"
        if "configMap" in node:
            assert node["configMap"]["name"] in configmaps, f"{name}: ConfigMap {node['configMap']['name']}"
        if "persistentVolumeClaim" in node:
            assert node["persistentVolumeClaim"]["claimName"] in claims, f"{name}: {node['persistentVolumeClaim']}"
    for group_name, pod, container in _containers(document):
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        missing = {m["name"] for m in container.get("volumeMounts", [])} - volumes
        assert not missing, f"{name}/{group_name}: mounts of undefined volumes {sorted(missing)}"


def test_images_are_built_by_the_dockerfile_from_the_pinned_ray_image():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_version = _constraints()["ray"]
    python = re.search(r">=\s*3\.(\d+)", project["requires-python"]).group(1)
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    bases = dict(re.findall(r"^ARG (RAY_IMAGE_\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert bases == {"RAY_IMAGE_CPU": f"rayproject/ray:{ray_version}-py3{python}",
                     "RAY_IMAGE_GPU": f"rayproject/ray:{ray_version}-py3{python}-gpu"}
    for needed in ("constraints.txt", "pyproject.toml", "motiondirector", "pipelines", "serve"):
        assert re.search(rf"^COPY .*\b{re.escape(needed)}\b", dockerfile, re.MULTILINE), f"Dockerfile copies {needed}"
    makefile = (ROOT / "Makefile").read_text()
    repository = re.search(r"^IMAGE \?= (\S+)$", makefile, re.MULTILINE).group(1)
    built = {f"{repository}:{project['version']}-{flavor}" for flavor in ("cpu", "gpu")}
    for flavor in ("cpu", "gpu"):
        assert f"--build-arg FLAVOR={flavor}" in makefile and f"$(IMAGE):$(VERSION)-{flavor}" in makefile
    used = {container["image"] for _, doc in RAY_DOCUMENTS for _, _, container in _containers(doc)}
    assert used and used <= built, f"images not built by `make image-cpu/image-gpu`: {sorted(used - built)}"


# --- entrypoints: real commands, real flags, mounted spec files -------------------------------------------
def _entrypoints() -> list[tuple[str, list[str]]]:
    return [(name, shlex.split(doc["spec"]["entrypoint"])) for name, doc in _of_kind("RayJob")]


def _flags_used(words: list[str]) -> list[str]:
    return [word.split("=", 1)[0] for word in words if word.startswith("-")]


@pytest.mark.parametrize(("name", "words"), _entrypoints(), ids=[name for name, _ in _entrypoints()])
def test_rayjob_entrypoints_are_real_cli_commands_with_real_flags(name, words):
    import typer.main
    from typer.testing import CliRunner

    from motiondirector.cli import app

    assert words[0] == "motiondirector", f"{name}: the entrypoint runs the motiondirector CLI"
    command = words[1]
    result = CliRunner().invoke(app, [command, "--help"])
    group = typer.main.get_command(app)
    assert command in group.commands and result.exit_code == 0, \
        f"{name}: `motiondirector {command} --help` failed (exit {result.exit_code}): the command " \
        f"{command!r} does not exist in this checkout (known: {', '.join(sorted(group.commands))})"
    known = {opt for param in group.commands[command].params for opt in (*param.opts, *param.secondary_opts)}
    unknown = [flag for flag in _flags_used(words[2:]) if flag not in known]
    assert not unknown, f"{name}: `motiondirector {command}` has no option(s) {unknown} (it has {sorted(known)})"
    for flag in _flags_used(words[2:]):
        assert flag in result.output, f"{name}: {flag} not shown by `motiondirector {command} --help`"


@pytest.mark.parametrize(("name", "words"), _entrypoints(), ids=[name for name, _ in _entrypoints()])
def test_rayjob_spec_files_are_the_mounted_configs(name, words):
    _, job = next(pair for pair in DOCUMENTS if pair[0] == name)
    specs = [word for word in words[2:] if word.startswith(SPECS_MOUNT + "/")]
    assert specs, f"{name}: the entrypoint names no spec file under {SPECS_MOUNT}"
    configmap = _defined("ConfigMap")["motiondirector-specs"]
    head = _cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    volume = next(m["name"] for c in head["containers"] for m in c["volumeMounts"] if m["mountPath"] == SPECS_MOUNT)
    assert any(v["name"] == volume and v.get("configMap", {}).get("name") == "motiondirector-specs"
               for v in head["volumes"]), f"{name}: {SPECS_MOUNT} is not the motiondirector-specs ConfigMap"
    for spec in specs:
        file_name = spec.removeprefix(SPECS_MOUNT + "/")
        assert file_name in configmap["data"], f"{name}: {file_name} is not in the motiondirector-specs ConfigMap"
        assert (ROOT / "configs" / file_name).read_text() == configmap["data"][file_name]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0


# --- generated files ---------------------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("cluster_generate", CLUSTER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_specs_configmap_is_generated_from_configs():
    assert (CLUSTER / "specs-configmap.yaml").read_text() == _generator().render_specs_configmap(), \
        "cluster/specs-configmap.yaml is stale: run `python cluster/generate.py`"


def test_rayservice_serve_config_is_valid_and_what_the_generator_produces_now():
    from ray.serve.schema import ServeDeploySchema

    _, service = next(pair for pair in DOCUMENTS if pair[1]["kind"] == "RayService")
    committed = service["spec"]["serveConfigV2"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(committed))
    (application,) = config.applications
    generator = _generator()
    assert application.import_path == "serve.app:build_app" and application.args == generator.serve_args()
    assert {"base", "catalog"} <= set(application.args)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if importlib.util.find_spec("serve.app") is None:
        pytest.fail("serve/app.py (the Serve app of issue 12) is missing from this checkout: cannot check that "
                    "rayservice.yaml's serveConfigV2 matches it")
    assert committed == generator.render_serve_config(), \
        "rayservice.yaml's serveConfigV2 is stale (the Serve app or serve-args.yaml changed): run " \
        "`python cluster/generate.py`"
    assert generator.render_rayservice(committed) == (CLUSTER / "rayservice.yaml").read_text()


# --- local-cluster scripts ---------------------------------------------------------------------------------
def _ray_invocations(script: Path) -> list[tuple[str, list[str]]]:
    """`"$RAY" <command> --flags...` calls of a script (continuation lines joined)."""
    text = script.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith('"$RAY" '):
            words = line.split()
            calls.append((words[1], [w for w in words[2:] if w.startswith("--")]))
    return calls


@pytest.mark.parametrize("script", ["local-up.sh", "local-down.sh"])
def test_local_cluster_scripts_use_real_ray_cli_flags(script):
    from ray.scripts.scripts import cli

    calls = _ray_invocations(CLUSTER / script)
    assert calls, f"{script} calls no `ray` command"
    for command, flags in calls:
        assert command in cli.commands, f"{script}: `ray {command}` does not exist in Ray {_constraints()['ray']}"
        known = {opt for param in cli.commands[command].params for opt in param.opts}
        assert set(flags) <= known, f"{script}: `ray {command}` has no {sorted(set(flags) - known)}"
    assert (CLUSTER / script).stat().st_mode & 0o111, f"{script} is not executable"


def test_the_jobs_and_the_service_share_one_storage_layout():
    """Ingest writes where train-batch reads; train-batch registers where the RayService serves from."""
    words = dict(_entrypoints())
    ingest, train = words["rayjob-ingest.yaml[0]"], words["rayjob-train-batch.yaml[0]"]

    def option(command: list[str], flag: str) -> str:
        return command[command.index(flag) + 1]

    spec = yaml.safe_load((ROOT / "configs" / "train_batch_reference.yaml").read_text())
    sources = spec["from_ingest"] if isinstance(spec["from_ingest"], list) else [spec["from_ingest"]]
    read = {source if isinstance(source, str) else source["uri"] for source in sources}
    read |= {job["dataset"].split("#", 1)[0] for job in spec.get("jobs", []) if job.get("dataset")}
    assert read == {option(ingest, "--output")}, "train-batch must read the ingest job's output"
    assert _generator().serve_args()["catalog"] == option(train, "--catalog"), \
        "the RayService must serve the catalog train-batch registers into"
    assert all(uri.startswith(("s3://", "gs://")) for uri in (option(ingest, "--output"), option(train, "--storage")))
