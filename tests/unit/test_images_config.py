"""The ``images:`` config and its per-team override, and what check-config says about them."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, ImagesConfig, S3Config
from gateway.config.loader import check_config, literal_secrets, parse

KEY = "k" * 32
BASE = {"upstream": {"timeout_s": 60}}


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse({**BASE, **data})
    return e.value.problems


def test_defaults_are_inline_in_the_store():
    config = parse(BASE)
    assert config.images == ImagesConfig()
    assert (config.images.delivery, config.images.storage, config.images.url_ttl_s, config.images.max_n) == \
        ("inline", "store", 86400, 4)


def test_a_team_overrides_keys_of_the_global_section():
    config = parse({**BASE, "images": {"signing_key": KEY, "url_ttl_s": 3600, "public_base_url": "https://img.example/",
                                       "storage": "s3://my-bucket/gw", "s3": {"endpoint_url": "http://minio:9000"}},
                    "teams": [{"name": "design", "images": {"delivery": "url", "max_n": 2}}, {"name": "ops"}]})
    design, ops = config.teams
    assert design.images == ImagesConfig(delivery="url", storage="s3://my-bucket/gw", url_ttl_s=3600,
                                         public_base_url="https://img.example", signing_key=KEY, max_n=2,
                                         s3=S3Config(endpoint_url="http://minio:9000"))
    assert ops.images == config.images and config.images.delivery == "inline"
    assert KEY not in repr(config)  # a secret never reaches a log line through a repr


@pytest.mark.parametrize("data, problem", [
    ({"images": {"delivery": "url"}}, "images.signing_key: is required when images.delivery is url"),
    ({"teams": [{"name": "t", "images": {"delivery": "url"}}]},
     "images.signing_key: is required when teams[0].images.delivery is url"),
    ({"images": {"signing_key": "short"}}, "images.signing_key: must be at least 32 characters"),
    ({"images": {"delivery": "links"}}, "images.delivery: must be one of: inline, url"),
    ({"images": {"storage": "gs://bucket"}}, "images.storage: must be store or s3://bucket/prefix"),
    ({"images": {"url_ttl_s": 0}}, "images.url_ttl_s: must be a positive integer"),
    ({"images": {"max_n": -1}}, "images.max_n: must be a positive integer"),
    ({"images": {"public_base_url": "img.example"}}, "images.public_base_url: must be an http:// or https:// URL"),
    ({"images": {"s3": {"presign": "yes"}}}, "images.s3.presign: must be true or false"),
    ({"images": {"storage": "s3://bkt", "url_ttl_s": 8 * 86400}},
     "images.url_ttl_s: must be at most 604800 (a week) with presigned S3 links"),
    ({"images": {"storage": "s3://bkt"}, "teams": [{"name": "t", "images": {"url_ttl_s": 8 * 86400}}]},
     "teams[0].images.url_ttl_s: must be at most 604800 (a week) with presigned S3 links"),
    ({"teams": [{"name": "t", "images": {"storage": "s3://bkt"}}]}, "teams[0].images.storage: unknown key"),
])
def test_each_problem_is_named_by_its_key_path(data, problem):
    assert any(p.startswith(problem) for p in problems(data)), problems(data)


def test_presign_off_lifts_the_week_cap():
    config = parse({**BASE, "images": {"storage": "s3://bkt", "url_ttl_s": 30 * 86400, "s3": {"presign": False}}})
    assert config.images.url_ttl_s == 30 * 86400


def test_check_config_names_the_key_and_warns_of_a_key_written_in_the_file(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("upstream: {timeout_s: 60}\nimages:\n  delivery: url\n  signing_key: ${IMAGE_URL_SIGNING_KEY}\n")
    assert check_config(path, env={}) == ["images.signing_key: environment variable IMAGE_URL_SIGNING_KEY is not set"]
    assert check_config(path, env={"IMAGE_URL_SIGNING_KEY": KEY}) == []
    assert literal_secrets(path) == []
    path.write_text(f"images:\n  signing_key: {KEY}\n")
    assert [w.split(":")[0] for w in literal_secrets(path)] == ["images.signing_key"]


def test_the_example_file_takes_the_signing_key_from_the_environment():
    from gateway.config import load

    example = Path(__file__).resolve().parents[2] / "config" / "gateway.example.yaml"
    assert load(example, {"UPSTREAM_API_KEY": "x"}).images.signing_key == ""
    assert load(example, {"UPSTREAM_API_KEY": "x", "IMAGE_URL_SIGNING_KEY": KEY}).images.signing_key == KEY
