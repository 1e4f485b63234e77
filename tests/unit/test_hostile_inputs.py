"""Hostile inputs: each is refused with a clear error, and the service still answers /healthz.

Fast: no network, no model weights. Model directories are a config.json and a hand-written
safetensors file; the tokenizer is the small SmolLM2 fixture.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.testing import MINIMAL_SPEC, Harness, api_harness
from baking.events import BakeError
from baking.fetch import fetch_model
from tests.conftest import TOKENIZER_DIR

PROBLEM = "application/problem+json"
MAX_BODY = 64 * 1024


def write_safetensors(path: Path) -> None:
    """A valid one-tensor safetensors file: 8-byte header length, JSON header, data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 8)


def make_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    write_safetensors(path / "model.safetensors")
    return path


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture
def api(tmp_path: Path, sqlite_url: str, roots: Path) -> Iterator[Harness]:
    make_model_dir(roots / "good")
    with api_harness(
        data_dir=tmp_path / "data",
        database_url=sqlite_url,
        max_body_bytes=MAX_BODY,
        model_roots=str(roots),
        model_buckets="bakehouse-models",
    ) as harness:
        yield harness
        # Whatever was thrown at it, the service is still up.
        assert harness.client.get("/healthz").json() == {"status": "ok"}


def refused(api: Harness, response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["code"] == code and body["detail"]
    assert "Traceback" not in response.text
    assert api.client.get("/healthz").status_code == 200
    return body


def post_model(api: Harness, model: str) -> dict[str, Any]:
    body = refused(
        api, api.client.post("/v1/bake-jobs", json={**MINIMAL_SPEC, "model": model}), 422, "validation_error"
    )
    assert [e["field"] for e in body["errors"]] == ["model"]
    assert api.queue.job_ids == []
    return body


# --- model sources at the API ---------------------------------------------------------------


def test_the_good_model_is_accepted(api: Harness, roots: Path) -> None:
    assert api.create({**MINIMAL_SPEC, "model": f"file://{roots / 'good'}"})["status"] == "queued"


def test_file_model_outside_the_roots(api: Harness, tmp_path: Path) -> None:
    make_model_dir(tmp_path / "elsewhere")
    assert "outside the allowed model roots" in post_model(api, f"file://{tmp_path / 'elsewhere'}")["detail"]
    assert "outside the allowed model roots" in post_model(api, "file:///etc")["detail"]


def test_symlink_escaping_the_model_root_at_the_api(api: Harness, roots: Path, tmp_path: Path) -> None:
    make_model_dir(tmp_path / "secret")
    (roots / "innocent").symlink_to(tmp_path / "secret", target_is_directory=True)
    assert "outside the allowed model roots" in post_model(api, f"file://{roots / 'innocent'}")["detail"]


def test_s3_bucket_not_allowed(api: Harness) -> None:
    assert "bucket 'attacker-bucket' is not allowed" in post_model(api, "s3://attacker-bucket/m/")["detail"]


@pytest.mark.parametrize("model", ["http://evil.example/model", "https://evil.example/m", "ftp://evil/m"])
def test_remote_model_schemes(api: Harness, model: str) -> None:
    assert "must be bakehouse://NAME" in post_model(api, model)["detail"]


def test_cache_name_traversal(api: Harness) -> None:
    post_model(api, "bakehouse://../../etc")


# --- bodies ---------------------------------------------------------------------------------


def test_oversize_body_is_413(api: Harness) -> None:
    huge = {**MINIMAL_SPEC, "irrelevant_examples": ["x" * 1000] * 100}
    refused(api, api.client.post("/v1/bake-jobs", json=huge), 413, "payload_too_large")


def test_oversize_chunked_body_is_413(api: Harness) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "bakehouse://x", "irrelevant_examples": ["'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"]}'

    response = api.client.post("/v1/bake-jobs", content=chunks(), headers={"Content-Type": "application/json"})
    refused(api, response, 413, "payload_too_large")


@pytest.mark.parametrize("depth", [40, 5000, 30_000])
def test_deeply_nested_body_is_422_not_a_recursion_error(api: Harness, depth: int) -> None:
    body = b'{"model": "bakehouse://x", "metadata": ' + b"[" * depth + b"]" * depth + b"}"
    response = api.client.post("/v1/bake-jobs", content=body, headers={"Content-Type": "application/json"})
    assert "deeper than 32 levels" in refused(api, response, 422, "json_too_deep")["detail"]


@pytest.mark.parametrize("content_type", [None, "application/merge-patch+json", "Application/JSON; charset=utf-8"])
def test_deep_body_is_refused_whatever_json_type_it_claims(api: Harness, content_type: str | None) -> None:
    body = b"[" * 5000 + b"]" * 5000
    request = api.client.build_request("POST", "/v1/bake-jobs", content=body)
    if content_type is not None:  # with none at all FastAPI still parses the body as JSON
        request.headers["Content-Type"] = content_type
    else:
        assert "content-type" not in request.headers
    refused(api, api.client.send(request), 422, "json_too_deep")


def test_deep_value_inside_the_depth_limit_is_a_field_error(api: Harness) -> None:
    deep: Any = "leaf"
    for _ in range(20):
        deep = [deep]
    tool = {
        "name": "t",
        "description": "d",
        "parameters": {"type": "object", "properties": {"x": {"type": "array"}}},
        "examples": [{"query": "q", "arguments": {"x": deep}}],
    }
    body = refused(
        api, api.client.post("/v1/bake-jobs", json={**MINIMAL_SPEC, "tools": [tool]}), 422, "validation_error"
    )
    assert body["errors"][0]["field"] == "tools.0.examples.0.arguments"


# --- artifact names on the download endpoint -------------------------------------------------


@pytest.fixture
def job_with_artifact(api: Harness, tmp_path: Path) -> str:
    job_id: str = api.create()["id"]
    api.add_artifact(job_id, "model.safetensors", b"weights", tmp_path)
    return job_id


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2E%2E/%2E%2E/bakehouse.db",
        "%2Fetc%2Fpasswd",
        "merged%2F..%2F..%2Fsecret",
        "a%5C..%5C..%5Cwin.ini",
        "model.safetensors%00.txt",
        "%2E/model.safetensors",
    ],
)
def test_artifact_name_traversal_is_refused(api: Harness, job_with_artifact: str, name: str) -> None:
    response = api.client.get(f"/v1/bake-jobs/{job_with_artifact}/artifacts/{name}")
    body = refused(api, response, 422, "invalid_artifact_name")
    assert "invalid object key" in body["detail"]
    # The real artifact is still served.
    assert api.client.get(f"/v1/bake-jobs/{job_with_artifact}/artifacts/model.safetensors").content == b"weights"


def test_unknown_artifact_is_404(api: Harness, job_with_artifact: str) -> None:
    response = api.client.get(f"/v1/bake-jobs/{job_with_artifact}/artifacts/etc/passwd")
    refused(api, response, 404, "not_found")


# --- model directories at fetch (the worker's side) -----------------------------------------


def assert_bake_error(model: Path, code: str, fragment: str, models_dir: Path) -> None:
    with pytest.raises(BakeError) as err:
        fetch_model(f"file://{model}", models_dir)
    assert err.value.code == code and err.value.stage == "fetching"
    assert fragment in str(err.value.message)


def test_fetch_accepts_the_minimal_model(tmp_path: Path) -> None:
    fetched = fetch_model(f"file://{make_model_dir(tmp_path / 'm')}", tmp_path)
    assert [f.name for f in fetched.files] == ["config.json", "model.safetensors"]


def test_fetch_refuses_a_pickle_only_model(tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # The classic payload: unpickling this would call os.system. It must never be loaded.
    (model / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/bakehouse-pwned'\ntR.")
    assert_bake_error(model, "unsafe_model", "pickle can run code on load", tmp_path)
    assert not Path("/tmp/bakehouse-pwned").exists()


def test_fetch_refuses_a_symlink_escaping_the_model_dir(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    (tmp_path / "secret.json").write_text('{"token": "s3cr3t"}')
    (model / "tokenizer_config.json").symlink_to(tmp_path / "secret.json")
    assert_bake_error(model, "unsafe_model", "links outside the model directory", tmp_path)


def test_fetch_refuses_a_truncated_safetensors_header(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])  # the header says more bytes than the file has
    assert_bake_error(model, "invalid_model", "exceeds the file", tmp_path)
    weights.write_bytes(b"\x01\x02\x03")  # not even the 8-byte length
    assert_bake_error(model, "invalid_model", "truncated safetensors file", tmp_path)


def test_fetch_refuses_a_huge_declared_header(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "m")
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert_bake_error(model, "invalid_model", "exceeds the file", tmp_path)


# --- a malicious chat template in the model's tokenizer -------------------------------------

MALICIOUS_TEMPLATE = (
    "PWNED{{ ''.__class__.__mro__[1].__subclasses__() }}"
    "{{ cycler.__init__.__globals__.os.popen('touch /tmp/bakehouse-template-pwned').read() }}"
)


def test_the_models_own_chat_template_is_never_rendered(tmp_path: Path) -> None:
    """baking.chat renders with the template Bakehouse ships, whatever the model directory says."""
    from transformers import AutoTokenizer

    from baking.chat import CHAT_TEMPLATE, render

    hostile = tmp_path / "hostile-tokenizer"
    shutil.copytree(TOKENIZER_DIR, hostile)
    config = json.loads((hostile / "tokenizer_config.json").read_text())
    (hostile / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": MALICIOUS_TEMPLATE}))
    (hostile / "chat_template.jinja").write_text(MALICIOUS_TEMPLATE)

    tokenizer = AutoTokenizer.from_pretrained(str(hostile))
    assert tokenizer.chat_template == MALICIOUS_TEMPLATE  # the hostile template did load
    messages = [{"role": "user", "content": "How fast am I going?"}]
    text = render(tokenizer, messages, add_generation_prompt=True)
    clean = render(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)), messages, add_generation_prompt=True)
    assert text == clean == "<|im_start|>user\nHow fast am I going?<|im_end|>\n<|im_start|>assistant\n"
    assert "PWNED" not in text and "PWNED" not in CHAT_TEMPLATE
    assert not Path("/tmp/bakehouse-template-pwned").exists()
