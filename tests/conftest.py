"""Shared fixtures: real Postgres/Redis (a throwaway database per run), SQLite, a tiny model.

In CI (`CI=true`) a missing service fails the test with a message naming it; elsewhere it skips.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "smollm2-tokenizer"
PG_ADMIN_URL = os.environ.get("BAKEHOUSE_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def fleet_dict() -> dict:
    """The shipped example job (examples/fleet-assistant.yaml), validated and dumped as the API stores it."""
    import yaml

    from core.spec import BakeJobSpec

    raw = yaml.safe_load((ROOT / "examples" / "fleet-assistant.yaml").read_text())
    return BakeJobSpec.model_validate(raw).model_dump(mode="json")


def service_missing(name: str, why: str) -> None:
    """Fail in CI, skip elsewhere: a missing service must never pass silently in CI."""
    message = f"{name} is not reachable: {why}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def model_roots_allow_pytest_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """file:// models that tests make under pytest's temp dirs are allowed model sources."""
    if "BAKEHOUSE_MODEL_ROOTS" not in os.environ:
        monkeypatch.setenv("BAKEHOUSE_MODEL_ROOTS", str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh Postgres database migrated to head, dropped at the end of the run."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from core.db import upgrade_database

    if not port_open("127.0.0.1", 5432):
        service_missing("PostgreSQL (127.0.0.1:5432)", "port closed")
    name = f"bakehouse_test_{uuid.uuid4().hex[:12]}"
    # No pool: a connection kept across a Postgres restart (the fault tests do one) would make the
    # DROP at teardown fail and leak the database.
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade_database(url)
    yield url
    from core.db import get_engine

    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from core.db import upgrade_database

    url = f"sqlite:///{tmp_path / 'bakehouse.db'}"
    upgrade_database(url)
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database index of its own for this run, flushed before and after."""
    import redis

    if not port_open(REDIS_HOST, REDIS_PORT):
        service_missing(f"Redis ({REDIS_HOST}:{REDIS_PORT})", "port closed")
    db = 11
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client.flushdb()
    client.close()


def make_tiny_model(out_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A randomly initialised Llama of SmolLM2's architecture, with SmolLM2's real tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir


def write_compressed_artifact(
    out: Path, final: Any, scheme: dict[str, Any], tokenizer: Any, merged: Any = None
) -> Path:
    """An artifact of `compress()`'s output, as the pipeline writes it (empty manifest, stub card)."""
    from baking.export import write_artifact

    write_artifact(
        out,
        final_model=final,
        merged_model=merged,
        tokenizer=tokenizer,
        final_dtype=scheme["dtype_torch"],
        quantization={k: v for k, v in scheme.items() if k != "dtype_torch"},
        manifest={},
        model_card="card",
    )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))
