"""The Serve application on the real local Ray cluster with the toy model (docs/serve.md).

Multiplexing and batching do not work in Serve's local testing mode, so everything here goes through
the shared cluster fixture, loopback HTTP only. Generations are kept tiny (2 steps, 4 frames).
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from motiondirector import api

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
TINY = {"steps": 2, "frames": 4}


def client(app, **kwargs) -> httpx.Client:
    return httpx.Client(base_url=app.url, timeout=120, **kwargs)


def generate(http: httpx.Client, body: dict, wait: bool = True) -> httpx.Response:
    return http.post("/v1/generations", params={"wait": "true"} if wait else None, json=body)


def wait_done(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/generations/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished after {timeout}s")


def test_a_composition_through_the_api_equals_the_library(serve_app, tmp_path):
    ids = serve_app.ids
    body = {"prompt": "a red square zigzagging", "negative_prompt": "blurry", "seed": 1234, "steps": 3,
            "motions": [{"lora_id": ids["zigzag"], "scale": 0.8}, {"lora_id": ids["bounce"], "scale": 1.2}],
            "appearance": {"lora_id": ids["red-square"], "scale": 0.5}}
    with client(serve_app) as http:
        response = generate(http, body)
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "done" and job["seed"] == 1234
        assert job["progress"] == {"phase": "sample", "done": 3, "total": 3}
        # The parameters actually used: the request's, with the toy model's defaults for what it left out.
        params = job["params"]
        assert (params["steps"], params["frames"], params["height"], params["width"]) == (3, 8, 32, 32)
        assert params["guidance"] == 6.0 and params["negative_prompt"] == "blurry"
        assert response.headers["location"] == job["links"]["self"] == f"/v1/generations/{job['id']}"
        served_gif = http.get(job["links"]["video_gif"]).content
        served_mp4 = http.get(job["links"]["video_mp4"])
        sidecar = http.get(job["links"]["sidecar"]).json()
    assert served_mp4.headers["content-type"] == "video/mp4" and len(served_mp4.content) > 100
    assert [(lora["role"], lora["reference"], lora["scale"]) for lora in sidecar["loras"]] == [
        ("motion", ids["zigzag"], 0.8), ("motion", ids["bounce"], 1.2), ("appearance", ids["red-square"], 0.5)]

    catalog = api.open_catalog(str(serve_app.catalog))
    params = api.GenerationParams(
        base="toy", prompts=[body["prompt"]], negative_prompt="blurry", seed=1234, steps=3,
        motions=[api.LoraChoice(reference=ids["zigzag"], scale=0.8), api.LoraChoice(reference=ids["bounce"], scale=1.2)],
        appearances=[api.LoraChoice(reference=ids["red-square"], scale=0.5)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the replica (settings.threads = 1): same kernels, same bits
    try:
        [video] = api.generate(params, backbone=api.load_backbone("toy", "cpu"), catalog=catalog)
    finally:
        torch.set_num_threads(threads)
    files = api.save_video(video, tmp_path)
    assert files["gif"].read_bytes() == served_gif
    assert sidecar["params"] == video.sidecar["params"]


def test_catalog_routes_filter_sort_and_page(serve_app):
    ids = serve_app.ids
    with client(serve_app) as http:
        everything = http.get("/v1/loras", params={"limit": 200}).json()
        assert everything["total"] == 6
        motions = http.get("/v1/loras", params={"kind": "temporal", "sort": "name"}).json()
        assert [item["name"] for item in motions["items"]] == ["bounce", "orbit", "other-base", "zigzag"]
        assert http.get("/v1/loras", params={"tag": "demo"}).json()["total"] == 2
        assert [i["name"] for i in http.get("/v1/loras", params={"text": "SQUARE"}).json()["items"]] == ["red-square"]
        page = http.get("/v1/loras", params={"sort": "name", "limit": 2, "offset": 2}).json()
        assert page["total"] == 6 and [i["name"] for i in page["items"]] == page_names(everything, 2, 2)
        bad_sort = http.get("/v1/loras", params={"sort": "colour"})
        assert bad_sort.status_code == 422 and bad_sort.json()["field"] == "sort"

        entry = http.get(f"/v1/loras/{ids['bounce']}").json()
        assert entry["lineage"] == [ids["zigzag"]] and entry["manifest"]["kind"] == "temporal"
        preview = http.get(entry["preview"])
        assert preview.headers["content-type"] == "image/gif"
        assert preview.content == (serve_app.root / "bounce.gif").read_bytes()
        assert http.get(f"/v1/loras/{ids['orbit']}").json()["preview"] is None
        assert http.get(f"/v1/loras/{ids['orbit']}/preview.gif").status_code == 404
        unknown = http.get("/v1/loras/01JC9W5D3Q8X7K2M4N6P8R0T2V")
        assert unknown.status_code == 404 and unknown.json()["field"] == "lora_id"
        for bad in ("not-an-id", "..%2F..%2Fetc", "01jc9w5d3q8x7k2m4n6p8r0t2v"):
            assert http.get(f"/v1/loras/{bad}").status_code in (404, 422)


def page_names(everything: dict, offset: int, limit: int) -> list[str]:
    return sorted(item["name"] for item in everything["items"])[offset:offset + limit]


def test_health_docs_and_page(serve_app):
    with client(serve_app) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        assert ready["status"] == "ready" and ready["model"] == "toy"
        spec = http.get("/openapi.json").json()
        assert {"/v1/generations", "/v1/generations/{job_id}", "/v1/loras", "/v1/loras/{lora_id}"} <= set(spec["paths"])
        assert http.get("/docs").status_code == 200
        page = http.get("/")
        assert page.status_code == 200 and "motiondirector" in page.text
        assert http.get("/web/app.js").status_code == 200
        assert http.get("/web/..%2Fsettings.py").status_code == 404


# ---- validation ----------------------------------------------------------------------------------

def malformed_requests(ids: dict[str, str]) -> list[tuple[str, dict | bytes, int, str | None]]:
    """(label, body, expected status, expected field) for requests the API must refuse."""
    good = {"prompt": "a square", **TINY}
    return [
        ("unknown motion", {**good, "motions": [{"lora_id": "01JC9W5D3Q8X7K2M4N6P8R0T2V"}]}, 404, "motions.0.lora_id"),
        ("spatial as motion", {**good, "motions": [{"lora_id": ids["red-square"]}]}, 422, "motions.0.lora_id"),
        ("temporal as appearance", {**good, "appearance": {"lora_id": ids["orbit"]}}, 422, "appearance.lora_id"),
        ("other base", {**good, "motions": [{"lora_id": ids["other-base"]}]}, 422, "motions.0.lora_id"),
        ("frames over limit", {**good, "frames": 65}, 422, "frames"),
        ("size over limit", {**good, "height": 2048}, 422, "height"),
        ("size not a multiple", {**good, "width": 34}, 422, "width"),
        ("steps over limit", {**good, "steps": 101}, 422, "steps"),
        ("guidance over limit", {**good, "guidance": 31}, 422, "guidance"),
        ("negative frames", {**good, "frames": -1}, 422, "frames"),
        ("no prompt", {"steps": 2}, 422, "prompt"),
        ("empty prompt", {**good, "prompt": ""}, 422, "prompt"),
        ("unknown field", {**good, "colour": "red"}, 422, "colour"),
        ("path as id", {**good, "motions": [{"lora_id": "../../etc/passwd"}]}, 422, "motions.0.lora_id"),
        ("scale out of range", {**good, "motions": [{"lora_id": ids["zigzag"], "scale": 99}]}, 422,
         "motions.0.scale"),
        ("noise prior", {**good, "noise_prior": 0.3}, 422, "noise_prior"),
        ("seed negative", {**good, "seed": -3}, 422, "seed"),
        ("too many motions", {**good, "motions": [{"lora_id": ids["zigzag"]}] * 5}, 422, "motions"),
        ("not json", b"{prompt: nope", 422, None),
        ("json list", b"[1, 2]", 422, None),
        ("body too large", {**good, "prompt": "x" * 70_000}, 413, None),
    ]


def send(http: httpx.Client, body: dict | bytes, wait: bool = True) -> httpx.Response:
    params = {"wait": "true"} if wait else None
    if isinstance(body, bytes):
        return http.post("/v1/generations", params=params, content=body, headers={"content-type": "application/json"})
    return http.post("/v1/generations", params=params, json=body)


def test_bad_requests_get_a_4xx_naming_the_field(serve_app):
    with client(serve_app) as http:
        for label, body, status, field in malformed_requests(serve_app.ids):
            response = send(http, body)
            assert response.status_code == status, (label, response.text)
            error = response.json()
            assert set(error) == {"error", "detail", "field"} and error["detail"], label
            if field is not None:
                assert error["field"] == field, (label, error)
        missing = http.get("/v1/generations/0123456789abcdef0123456789abcdef")
        assert missing.status_code == 404 and missing.json()["field"] == "job_id"
        assert http.get("/v1/generations/..%2F..%2Fetc").status_code in (404, 422)
        assert http.get("/v1/generations/0123456789abcdef0123456789abcdef/video.avi").status_code == 422


def test_a_failing_generation_is_failed_with_its_reason_and_the_replica_keeps_serving(serve_app, tmp_path):
    from test_package import write_random_package

    catalog = api.open_catalog(str(serve_app.catalog))
    toy = api.load_backbone("toy", "cpu")
    broken = catalog.add(write_random_package(toy, tmp_path / "broken", "temporal", seed=11), name="broken")
    weights = serve_app.catalog / "loras" / broken.id / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)  # content no longer matches its sha256
    with client(serve_app) as http:
        failed = generate(http, {"prompt": "x", **TINY, "motions": [{"lora_id": broken.id}]}).json()
        assert failed["status"] == "failed" and "sha256" in failed["reason"] and broken.id in failed["reason"]
        assert http.get(f"/v1/generations/{failed['id']}/video.mp4").status_code == 404
        ok = generate(http, {"prompt": "x", **TINY, "motions": [{"lora_id": serve_app.ids["zigzag"]}]}).json()
        assert ok["status"] == "done"
    catalog.remove(broken.id)


def test_a_full_queue_answers_429_and_the_accepted_jobs_finish(serve_app):
    limit = serve_app.settings.queue_limit
    body = {"prompt": "queue", **TINY, "motions": [{"lora_id": serve_app.ids["orbit"]}]}
    with client(serve_app) as http:
        # Submit until the queue refuses; jobs may finish meanwhile, so it takes at least `limit` first.
        answers = []
        try:
            while len(answers) < 4 * limit and (not answers or answers[-1].status_code == 202):
                answers.append(send(http, body, wait=False))
            codes = [answer.status_code for answer in answers]
            assert codes[-1] == 429 and codes.count(202) >= limit and set(codes) == {202, 429}, codes
            assert answers[-1].headers.get("retry-after") == "1"
            assert answers[-1].json()["error"] == "queue_full"
        finally:  # the accepted jobs finish, and the next test starts with an empty queue
            accepted = [a.json()["id"] for a in answers if a.status_code == 202]
            assert all(wait_done(http, job_id)["status"] == "done" for job_id in accepted)


def test_load_of_200_requests_with_a_fifth_malformed(serve_app):
    """Loopback load: 0 5xx, every malformed request a 4xx, every valid one done."""
    ids = serve_app.ids
    rng = random.Random(0)
    bad = malformed_requests(ids)
    sets = [[ids["zigzag"]], [ids["orbit"]], [ids["zigzag"], ids["bounce"]]]
    requests = []
    for i in range(200):
        if i % 5 == 4:
            label, body, status, _ = bad[rng.randrange(len(bad))]
            requests.append(("bad", label, body, status))
        else:
            motions = [{"lora_id": lora_id} for lora_id in sets[i % 3]]
            appearance = {"lora_id": ids["blue-disc"]} if i % 7 == 0 else None
            body = {"prompt": f"video {i}", "seed": i, **TINY, "motions": motions, "appearance": appearance}
            requests.append(("good", str(i), body, 200))

    started = time.perf_counter()
    with client(serve_app, limits=httpx.Limits(max_connections=8)) as http, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda request: send(http, request[2]), requests))
    seconds = time.perf_counter() - started
    server_errors = [(r[1], answer.status_code) for r, answer in zip(requests, responses, strict=True)
                     if answer.status_code >= 500]
    assert not server_errors, server_errors
    for (kind, label, _, status), answer in zip(requests, responses, strict=True):
        if kind == "bad":
            assert 400 <= answer.status_code < 500 and answer.status_code == status, (label, answer.text)
        else:
            assert answer.status_code == 200 and answer.json()["status"] == "done", (label, answer.text)
    assert sum(kind == "bad" for kind, *_ in requests) == 40
    print(f"200 requests in {seconds:.1f}s")


def test_auth_on_and_off(serve_app, tmp_path):
    from ray import serve

    from serve.app import application

    # Off: the shared app has no token configured (no env var, no file).
    with client(serve_app) as http:
        assert http.get("/v1/loras").status_code == 200
        assert http.get("/v1/info").json()["auth"] is False
    # On: a second app reading its token from a file.
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    secured = serve_app.settings.model_copy(update={"api_token_file": str(token_file), "app_name": "md-secured",
                                                    "route_prefix": "/secured"})
    serve.run(application(secured), name="md-secured", route_prefix="/secured")
    try:
        with client(serve_app) as http:
            refused = http.get("/secured/v1/loras")
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert refused.json()["error"] == "unauthorized"
            wrong = http.get("/secured/v1/loras", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            assert http.post("/secured/v1/generations", json={"prompt": "x"}).status_code == 401
            good = {"Authorization": "Bearer s3cret-token"}
            assert http.get("/secured/v1/loras", headers=good).json()["total"] >= 6
            assert http.get("/secured/v1/info", headers=good).json()["auth"] is True
            assert http.get("/secured/healthz").status_code == 200  # health stays open for probes
            job = http.post("/secured/v1/generations", params={"wait": "true"}, headers=good,
                            json={"prompt": "x", **TINY}).json()
            assert job["status"] == "done" and job["links"]["self"].startswith("/secured/v1/generations/")
            assert http.get(job["links"]["video_gif"], headers=good).status_code == 200
            assert http.get(job["links"]["video_gif"]).status_code == 401
    finally:
        serve.delete("md-secured")


def test_batched_jobs_share_one_sampler_call(serve_app):
    """Eight concurrent requests for one LoRA set and settings: fewer sampler calls than requests."""
    from ray import serve

    body = {"prompt": "batch", **TINY, "motions": [{"lora_id": serve_app.ids["bounce"]}]}
    with client(serve_app) as http, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: send(http, {**body, "seed": i}), range(8)))
    assert all(a.json()["status"] == "done" for a in answers)
    seeds = [a.json()["seed"] for a in answers]
    assert seeds == list(range(8))
    handle = serve.get_deployment_handle("Generator", app_name="md-test")
    stats = handle.stats.remote().result()
    assert max(stats["batch_sizes"]) > 1, stats
    gifs = {json.dumps(a.json()["params"]) for a in answers}
    assert len(gifs) == 8  # each job kept its own seed and prompt


def test_the_cli_serves_on_a_joined_cluster_and_stops_on_ctrl_c(serve_app, tmp_path):
    """`motiondirector serve` in a subprocess joining the test cluster: its app answers, SIGINT stops only it."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    import ray

    config = tmp_path / "serve.yaml"
    config.write_text(f"app_name: md-cli\nroute_prefix: /cli\ngenerator_cpus: 0\nthreads: 1\n"
                      f"port: {serve_app.url.rsplit(':', 1)[1]}\n")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    process = subprocess.Popen([sys.executable, "-m", "motiondirector.cli", "serve", "--config", str(config),
                                "--base", "toy", "--catalog", str(serve_app.catalog), "--device", "cpu"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               # A suite started as a background job hands SIGINT down ignored; a terminal would not.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        # Started = the command said so (serve.run returned), not merely the first answer of its ingress.
        while time.monotonic() < deadline and process.poll() is None and not any("serving toy at" in line
                                                                                  for line in lines):
            time.sleep(0.5)
        with client(serve_app) as http:
            assert http.get("/cli/readyz").json()["model"] == "toy", lines
            job = http.post("/cli/v1/generations", params={"wait": "true"},
                            json={"prompt": "cli", **TINY, "motions": [{"lora_id": serve_app.ids["zigzag"]}]}).json()
            assert job["status"] == "done"
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
            reader.join(timeout=10)
            output = "".join(lines)
            assert process.returncode == 0, output
            assert "stopping" in output
            assert http.get("/cli/healthz").status_code == 404  # its app is gone...
            assert http.get("/healthz").status_code == 200  # ...the other one still serves
    finally:
        if process.poll() is None:
            process.kill()


def test_a_running_job_reports_the_samplers_progress(serve_app):
    body = {"prompt": "slow", "steps": 40, "frames": 4, "motions": [{"lora_id": serve_app.ids["orbit"]}]}
    seen = []
    with client(serve_app) as http:
        job_id = send(http, body, wait=False).json()["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            job = http.get(f"/v1/generations/{job_id}").json()
            seen.append((job["status"], job["progress"] and job["progress"]["done"]))
            if job["status"] in ("done", "failed"):
                break
            time.sleep(0.05)
    running = [done for status, done in seen if status == "running" and done]
    assert running and min(running) < 40 and running == sorted(running), seen
    assert seen[-1] == ("done", 40)
