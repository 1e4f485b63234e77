"""core.sources.check_model_source: the allow-lists of model URLs."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import Settings
from core.sources import check_model_source


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    return tmp_path / "models"


@pytest.fixture
def settings(tmp_path: Path, root: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", model_roots=str(root), model_buckets="models, team-b")


@pytest.mark.parametrize("url", ["bakehouse://smollm2-135m-instruct", "bakehouse://qwen2.5-0.5b_v1"])
def test_cache_names_are_allowed(url: str, settings: Settings) -> None:
    check_model_source(url, settings)


@pytest.mark.parametrize(
    "url", ["bakehouse://../etc", "bakehouse://a/../../b", "bakehouse://a..b", "bakehouse://", "bakehouse://UPPER"]
)
def test_bad_cache_names_are_refused(url: str, settings: Settings) -> None:
    with pytest.raises(ValueError, match="bakehouse:// model name"):
        check_model_source(url, settings)


def test_file_inside_a_root_is_allowed(root: Path, settings: Settings) -> None:
    check_model_source(f"file://{root / 'tiny'}", settings)
    check_model_source(f"file://localhost{root / 'tiny'}", settings)
    check_model_source(f"file://{root / 'not-yet-there'}", settings)  # the worker reports a missing dir


def test_file_outside_the_roots_is_refused(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="outside the allowed model roots"):
        check_model_source(f"file://{tmp_path / 'elsewhere'}", settings)
    with pytest.raises(ValueError, match="outside the allowed model roots"):
        check_model_source(f"file://{settings.model_root_paths[0]}/%2e%2e/elsewhere", settings)


def test_file_symlink_out_of_the_root_is_judged_by_its_target(tmp_path: Path, root: Path, settings: Settings) -> None:
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="outside the allowed model roots"):
        check_model_source(f"file://{root / 'link'}", settings)


def test_file_on_another_host_is_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="on this machine"):
        check_model_source("file://evil.example/models/tiny", settings)


def test_default_root_is_the_model_cache(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, model_roots="")
    check_model_source(f"file://{tmp_path / 'models' / 'x'}", settings)
    with pytest.raises(ValueError, match="outside"):
        check_model_source(f"file://{tmp_path / 'x'}", settings)


def test_s3_only_listed_buckets(settings: Settings) -> None:
    check_model_source("s3://models/tiny/", settings)
    check_model_source("s3://team-b/x", settings)
    with pytest.raises(ValueError, match="bucket 'other' is not allowed"):
        check_model_source("s3://other/tiny/", settings)


def test_s3_refused_when_no_bucket_is_configured(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no bucket is allowed"):
        check_model_source("s3://models/tiny/", Settings(data_dir=tmp_path))


@pytest.mark.parametrize(
    "url", ["http://example.com/model", "https://huggingface.co/x", "ftp://h/x", "hf://x", "/abs/path", "file"]
)
def test_other_schemes_are_refused(url: str, settings: Settings) -> None:
    with pytest.raises(ValueError, match="scheme|must be a URL"):
        check_model_source(url, settings)


def test_nul_byte_is_refused(root: Path, settings: Settings) -> None:
    with pytest.raises(ValueError, match="NUL"):
        check_model_source(f"file://{root}/tiny\x00", settings)
