"""Config loading: environment substitution, every kind of problem by key path, defaults."""
from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path

import pytest

from gateway.config import DEFAULT_MODEL_ID, Config, ConfigError, Limits, load
from gateway.config.loader import check_config, literal_secrets, load_text, parse
from gateway.keytool import hash_key, new_team_key

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "gateway.example.yaml"
H1, H2, H3 = "a" * 64, "b" * 64, "c" * 64


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(textwrap.dedent(text), env or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def loads(text: str, env: dict[str, str] | None = None) -> Config:
    return load_text(textwrap.dedent(text), env or {})


# ---- environment substitution ---------------------------------------------------------------

def test_env_variable_is_substituted_before_parsing_so_numbers_stay_numbers():
    cfg = loads("upstream: {api_key: '${KEY}'}\nserver: {port: ${PORT}}\n",
                {"KEY": "sk-secret", "PORT": "9001"})
    assert cfg.upstream.api_key == "sk-secret"
    assert cfg.server.port == 9001


def test_env_default_is_used_when_unset_or_empty():
    text = "server: {port: ${PORT:-9100}, host: '${HOST:-127.0.0.1}'}\n"
    assert loads(text).server.port == 9100
    assert loads(text, {"PORT": "", "HOST": ""}).server.host == "127.0.0.1"
    assert loads(text, {"PORT": "9200"}).server.port == 9200
    assert loads("upstream: {api_key: '${K:-}'}").upstream.api_key == ""


def test_set_but_empty_variable_without_default_is_used_as_is():
    assert loads("upstream: {api_key: '${KEY}'}", {"KEY": ""}).upstream.api_key == ""


def test_missing_env_variable_is_reported_at_its_key_path_without_a_type_error():
    assert problems_of("""
        server:
          port: ${PORT}
        upstream:
          api_key: ${UPSTREAM_API_KEY}
        teams:
          - name: ${TEAM_NAME}
    """) == [
        "server.port: environment variable PORT is not set",
        "upstream.api_key: environment variable UPSTREAM_API_KEY is not set",
        "teams[0].name: environment variable TEAM_NAME is not set",
    ]


def test_missing_env_variable_inside_a_longer_value_and_in_a_list():
    assert problems_of("""
        store: {url: "redis://:${REDIS_PASSWORD}@redis:6379/0"}
        admin: {keys: ["${ADMIN_KEY_HASH}"]}
    """) == [
        "store.url: environment variable REDIS_PASSWORD is not set",
        "admin.keys[0]: environment variable ADMIN_KEY_HASH is not set",
    ]


def test_env_variable_in_a_comment_is_harmless():
    assert loads("# api_key: ${OLD_KEY}\nserver: {port: 1}  # was ${OLD_PORT}\n").server.port == 1


def test_double_dollar_is_a_literal_reference():
    assert loads("upstream: {api_key: '$${NOT_A_VAR}'}").upstream.api_key == "${NOT_A_VAR}"


def test_malformed_reference_is_a_problem():
    assert problems_of("upstream: {api_key: '${KEY:default}'}") == [
        "upstream.api_key: malformed reference '${KEY:default}' (write ${VAR} or ${VAR:-default})"]


def test_missing_env_variable_with_yaml_syntax_error_is_reported_by_line():
    problems = problems_of("server:\n  host: ${HOST}\n  port: [1, 2\n")
    assert re.fullmatch(r"line \d+, column \d+: YAML syntax error: .+", problems[0])
    assert problems[1:] == ["line 2: environment variable HOST is not set"]


# ---- defaults ------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n# only a comment\n", "{}", "server:\nteams:\n"])
def test_empty_config_means_all_defaults(text):
    cfg = loads(text)
    assert cfg.store.url == "memory://" and cfg.teams == () and cfg.admin.key_hashes == ()
    assert cfg.server == Config().server and cfg.cache == Config().cache
    assert cfg.server.metrics is True and cfg.logging.access_log is True
    assert [m.id for m in cfg.models] == [DEFAULT_MODEL_ID]
    assert parse(None) == cfg


def test_default_model_and_alias_lookup():
    cfg = parse({})
    model = cfg.model("gemini-3-pro-image-preview")
    assert model is cfg.model(DEFAULT_MODEL_ID) is not None
    assert model.upstream_id == DEFAULT_MODEL_ID
    assert (model.prices.prompt, model.prices.completion, model.prices.image) == (2.0, 12.0, 120.0)
    assert cfg.model("gpt-4o") is None


def test_configured_models_replace_the_default_and_upstream_id_defaults_to_id():
    cfg = parse({"models": [
        {"id": "fast", "aliases": ["f", "quick"], "prices_usd_per_million": {"prompt": 1}},
        {"id": "slow", "upstream_id": "vendor/slow-v2", "default_completion_tokens": 5000},
    ]})
    assert cfg.model("quick").id == "fast" and cfg.model("fast").upstream_id == "fast"
    assert cfg.model("fast").prices.prompt == 1.0 and cfg.model("fast").prices.image == 0.0
    assert cfg.model("slow").upstream_id == "vendor/slow-v2"
    assert cfg.model("slow").default_completion_tokens == 5000
    assert cfg.model(DEFAULT_MODEL_ID) is None


def test_team_limits_inherit_defaults_key_by_key_and_null_lifts_a_limit():
    cfg = loads(f"""
        limits_defaults: {{requests_per_minute: 100, max_concurrent: 4, max_image_mb: 3}}
        teams:
          - name: a
            keys: ["sha256:{H1}"]
            limits: {{requests_per_minute: 10, max_concurrent: null}}
          - name: b
    """)
    a, b = cfg.teams
    assert a.limits == Limits(requests_per_minute=10, max_concurrent=None, max_image_mb=3)
    assert b.limits == cfg.limits_defaults == Limits(requests_per_minute=100, max_concurrent=4,
                                                     max_image_mb=3)
    assert b.key_hashes == () and b.quota.tokens_per_day is None and b.quota.usd_per_month is None


def test_team_cache_overrides_the_global_cache_key_by_key():
    cfg = loads("""
        cache: {mode: off, ttl_s: 60, scope: global}
        teams:
          - {name: a, cache: {mode: always}}
          - {name: b}
    """)
    assert cfg.cache.mode == "off"  # YAML 1.1 would have read `off` as false
    a, b = cfg.teams
    assert (a.cache.mode, a.cache.ttl_s, a.cache.scope) == ("always", 60, "global")
    assert b.cache == cfg.cache


# ---- problems, each with its path ----------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("server: {port: 70000}", "server.port: must be an integer from 0 to 65535 (0 = any free port)"),
    ("server: {port: '8080'}", "server.port: must be an integer from 0 to 65535 (0 = any free port)"),
    ("server: {port: true}", "server.port: must be an integer from 0 to 65535 (0 = any free port)"),
    ("server: {max_body_mb: 0}", "server.max_body_mb: must be a positive number"),
    ("server: {max_body_mb: .inf}", "server.max_body_mb: must be a positive number"),
    ("server: {host: ''}", "server.host: must be a non-empty string"),
    ("server: {metrics_path: metrics}", "server.metrics_path: must start with /"),
    ("server: {metrics: 'true'}", "server.metrics: must be true or false"),
    ("server: {metrics: yes}", "server.metrics: must be true or false"),
    ("server: [1]", "server: must be a mapping"),
    ("upstream: {timeout_s: -1}", "upstream.timeout_s: must be a positive number"),
    ("upstream: {max_retries: 1.5}", "upstream.max_retries: must be an integer >= 0"),
    ("upstream: {api_key: 12}", "upstream.api_key: must be a string"),
    ("upstream: {base_url: 'api.yisu.com'}", "upstream.base_url: must be an http:// or https:// "
     "URL of the host root, without /v1 (the gateway appends /v1/chat/completions)"),
    ("upstream: {base_url: 'https://api.yisu.com/v1/'}", "upstream.base_url: must be an http:// or "
     "https:// URL of the host root, without /v1 (the gateway appends /v1/chat/completions)"),
    ("models: []", "models: must list at least one model (leave the key out for the default)"),
    ("models: {id: x}", "models: must be a list"),
    ("models: [{aliases: [x]}]", "models[0].id: is required"),
    ("models: [{id: x, aliases: x}]", "models[0].aliases: must be a list"),
    ("models: [{id: x, prices_usd_per_million: {image: -1}}]",
     "models[0].prices_usd_per_million.image: must be a number >= 0"),
    ("models: [{id: x, default_completion_tokens: 0}]",
     "models[0].default_completion_tokens: must be a positive integer"),
    ("limits_defaults: {max_images_per_request: 2.0}",
     "limits_defaults.max_images_per_request: must be a positive integer"),
    ("store: {url: 'http://localhost:6379'}",
     "store.url: must start with memory://, redis://, rediss:// or redis+cluster://"),
    ("store: {on_error: fail}", "store.on_error: must be one of: open, closed"),
    ("cache: {mode: sometimes}", "cache.mode: must be one of: off, deterministic, always"),
    ("cache: {scope: [team]}", "cache.scope: must be one of: team, global"),
    ("cache: {ttl_s: 0}", "cache.ttl_s: must be a positive integer"),
    ("teams: [{name: a, limits: {tokens_per_minute: 10000000000000}}]",
     "teams[0].limits.tokens_per_minute: must be at most 1000000000000"),
    ("account: {quota: {usd_per_month: 2000000}}", "account.quota.usd_per_month: must be at most 1000000"),
    ("teams: [{name: 'the team'}]", "teams[0].name: must be letters, digits, '_', '.' or '-'"),
    ("teams: [{keys: []}]", "teams[0].name: is required"),
    ("teams: [null]", "teams[0].name: is required"),
    ("teams: [x]", "teams[0]: must be a mapping"),
    ("teams: [{name: a, quota: {usd_per_month: 0}}]",
     "teams[0].quota.usd_per_month: must be a positive number"),
    ("teams: [{name: a, quota: {tokens_per_day: 1.5}}]",
     "teams[0].quota.tokens_per_day: must be a positive integer"),
    ("teams: [{name: a, cache: {scope: all}}]", "teams[0].cache.scope: must be one of: team, global"),
    ("logging: {level: verbose}", "logging.level: must be one of: debug, info, warning, error"),
    ("logging: {format: xml}", "logging.format: must be one of: json, text"),
    ("logging: {access_log: 1}", "logging.access_log: must be true or false"),
    ("- a\n- b\n", "config: must be a mapping"),
])
def test_each_problem_names_its_key_path(text, problem):
    assert problems_of(text) == [problem]


def test_limit_problem_inside_the_third_team():
    assert problems_of("""
        teams:
          - {name: a}
          - {name: b}
          - {name: c, limits: {requests_per_minute: -5}}
    """) == ["teams[2].limits.requests_per_minute: must be a positive integer"]


@pytest.mark.parametrize("text, problem", [
    ("teams: [{name: a, limts: {}}]", "teams[0].limts: unknown key (did you mean 'limits'?)"),
    ("servr: {}", "servr: unknown key (did you mean 'server'?)"),
    ("cache: {ttl: 5}", "cache.ttl: unknown key (did you mean 'ttl_s'?)"),
    ("models: [{id: x, prices_usd_per_million: {imag: 1}}]",
     "models[0].prices_usd_per_million.imag: unknown key (did you mean 'image'?)"),
    ("store: {zzz: 1}", "store.zzz: unknown key (known keys: url, on_error, lease_ttl_s)"),
])
def test_unknown_keys_are_problems_with_a_suggestion(text, problem):
    assert problems_of(text) == [problem]


def test_duplicate_yaml_key_is_a_problem_with_its_line():
    assert problems_of("server:\n  port: 1\n  port: 2\n") == ["line 3: duplicate key 'port'"]


def test_yaml_syntax_error_names_line_and_column():
    (problem,) = problems_of("server:\n  port: 1\n bad: [\n")
    assert re.fullmatch(r"line [34], column \d+: YAML syntax error: .+", problem), problem


@pytest.mark.parametrize("text, problem", [
    ("a: 1\n\x01\n", "line 2: YAML syntax error: unacceptable character #x0001: "
                      "special characters are not allowed"),
    ("server: {}\n---\nteams: []\n", "line 2, column 1: YAML syntax error: expected a single "
                                     "document in the stream, but found another document"),
])
def test_yaml_errors_that_are_not_syntax_slips(text, problem):
    assert problems_of(text) == [problem]


def test_absurdly_large_number_is_a_problem_not_a_crash():
    assert problems_of(f"server: {{max_body_mb: {10 ** 400}}}") == [
        "server.max_body_mb: must be a positive number"]


def test_yaml_merge_keys_work_and_an_override_is_not_a_duplicate():
    cfg = loads("""
        teams:
          - {name: a, limits: &base {requests_per_minute: 5, max_concurrent: 2}}
          - name: b
            limits:
              <<: *base
              max_concurrent: 3
    """)
    assert cfg.teams[1].limits.requests_per_minute == 5
    assert cfg.teams[1].limits.max_concurrent == 3


def test_duplicate_model_ids_and_aliases():
    assert problems_of("""
        models:
          - {id: a, aliases: [b]}
          - {id: b, aliases: [c, a, c]}
    """) == [
        "models[1].id: same model name as models[0].aliases[0]",
        "models[1].aliases[1]: same model name as models[0].id",
        "models[1].aliases[2]: same model name as models[1].aliases[0]",
    ]


def test_duplicate_team_names_and_key_hashes_in_teams_and_admin():
    assert problems_of(f"""
        teams:
          - {{name: a, keys: ["sha256:{H1}", "sha256:{H2}"]}}
          - {{name: a, keys: ["sha256:{H1.upper()}"]}}
        admin: {{keys: ["sha256:{H2}", "sha256:{H3}"]}}
    """) == [
        "teams[1].name: same team name as teams[0].name",
        "teams[1].keys[0]: same key hash as teams[0].keys[0]",
        "admin.keys[0]: same key hash as teams[0].keys[1]",
    ]


def test_a_key_not_in_hash_form_is_a_problem_that_never_echoes_the_key():
    raw, _ = new_team_key("a")
    problems = problems_of(f"""
        teams: [{{name: a, keys: ["{raw}", "sha256:{'a' * 63}", "sha256:{'g' * 64}", "{H1}"]}}]
        admin: {{keys: ["{raw}"]}}
    """)
    message = ("must be 'sha256:' and 64 hex digits, never a raw key; "
               "make a key and its hash with `gateway keys new --team NAME`")
    assert problems == [f"teams[0].keys[{i}]: {message}" for i in range(4)] + [
        f"admin.keys[0]: {message}"]
    assert raw not in "\n".join(problems)


def test_store_url_problem_does_not_echo_the_password():
    (problem,) = problems_of("store: {url: 'http://:hunter2@redis:6379'}")
    assert "hunter2" not in problem


def test_all_problems_are_reported_at_once():
    problems = problems_of(f"""
        server: {{port: -1, hots: x}}
        upstream: {{api_key: ${{MISSING}}}}
        store: {{url: mysql://db}}
        teams:
          - {{name: a, keys: [nope], limits: {{tokens_per_minute: 0}}}}
          - {{name: a, keys: ["sha256:{H1}"]}}
        admin: {{keys: ["sha256:{H1}"]}}
    """)
    assert problems == [
        "upstream.api_key: environment variable MISSING is not set",
        "server.port: must be an integer from 0 to 65535 (0 = any free port)",
        "server.hots: unknown key (did you mean 'host'?)",
        "store.url: must start with memory://, redis://, rediss:// or redis+cluster://",
        "teams[0].keys[0]: must be 'sha256:' and 64 hex digits, never a raw key; "
        "make a key and its hash with `gateway keys new --team NAME`",
        "teams[0].limits.tokens_per_minute: must be a positive integer",
        "teams[1].name: same team name as teams[0].name",
        "admin.keys[0]: same key hash as teams[1].keys[0]",
    ]


# ---- keys ----------------------------------------------------------------------------------

def test_new_team_key_round_trips_through_the_config_and_hash_key():
    key, line = new_team_key("design")
    assert re.fullmatch(r"gw-design-[A-Za-z0-9_-]{43}", key)
    assert line == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert hash_key(key) == line.removeprefix("sha256:") == hash_key(key).lower()
    cfg = loads(f"teams: [{{name: design, keys: ['{line.upper().replace('SHA256:', 'sha256:')}']}}]")
    (team,) = cfg.teams
    assert hash_key(key) in team.key_hashes
    assert new_team_key("design")[0] != key


def test_new_team_key_refuses_a_name_the_config_would_refuse():
    with pytest.raises(ValueError):
        new_team_key("bad name")


# ---- files ---------------------------------------------------------------------------------

def test_example_file_loads_with_its_environment():
    cfg = load(EXAMPLE, {"UPSTREAM_API_KEY": "sk-test"})
    assert cfg.upstream.api_key == "sk-test"
    assert [t.name for t in cfg.teams] == ["design", "research"]
    design, research = cfg.teams
    assert design.limits.requests_per_minute == 60 and design.cache.mode == "always"
    assert research.limits.requests_per_minute == cfg.limits_defaults.requests_per_minute
    assert research.limits.max_concurrent is None
    assert cfg.admin.key_hashes and cfg.model("gemini-3-pro-image-preview") is not None
    assert check_config(EXAMPLE, {"UPSTREAM_API_KEY": "sk-test"}) == []


def test_example_file_documents_every_key_of_the_schema():
    text = EXAMPLE.read_text()
    for key in ["host", "port", "max_body_mb", "metrics_path", "metrics", "base_url", "api_key",
                "timeout_s", "connect_timeout_s", "max_retries", "aliases", "upstream_id",
                "prices_usd_per_million", "default_completion_tokens", "requests_per_minute",
                "tokens_per_minute", "max_concurrent", "max_images_per_request", "max_image_mb",
                "url", "on_error", "mode", "ttl_s", "max_entry_mb", "scope", "tokens_per_day",
                "usd_per_month", "level", "format", "access_log"]:
        assert re.search(rf"^\s*(- )?{key}: .*#", text, re.M), f"{key} lacks a comment"


def test_check_config_reports_problems_of_files(tmp_path):
    assert check_config(EXAMPLE, {}) == [
        "upstream.api_key: environment variable UPSTREAM_API_KEY is not set"]
    missing = tmp_path / "nope.yaml"
    assert check_config(missing, {}) == [f"{missing}: cannot read: No such file or directory"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: [\n")
    (problem,) = check_config(bad, {})
    assert problem.startswith("line ") and "YAML syntax error" in problem
    good = tmp_path / "good.yaml"
    good.write_text("")
    assert check_config(good, {}) == []


# ---- secrets written in the file -----------------------------------------------------------

@pytest.mark.parametrize("value, warned", [
    ("sk-live-123", True),
    ("'${UPSTREAM_API_KEY:-sk-live-123}'", True),  # the default is written in the file
    ("'$${UPSTREAM_API_KEY}'", True),  # an escaped reference is literal text
    ("'${UPSTREAM_API_KEY}'", False),
    ("'${UPSTREAM_API_KEY:-}'", False),
    ("''", False),
])
def test_a_secret_written_in_the_file_is_warned_by_key_path(tmp_path, value, warned):
    path = tmp_path / "gateway.yaml"
    path.write_text(f"upstream:\n  api_key: {value}\n")
    warnings = literal_secrets(path)
    assert check_config(path, {"UPSTREAM_API_KEY": "sk-from-env"}) == []  # a warning, not a problem
    if warned:
        (warning,) = warnings
        assert warning.startswith("upstream.api_key: ") and "${UPSTREAM_API_KEY}" in warning
        assert "sk-live-123" not in warning
    else:
        assert warnings == []


def test_literal_secrets_of_files_without_a_key_or_unreadable(tmp_path):
    assert literal_secrets(EXAMPLE) == []
    assert literal_secrets(tmp_path / "nope.yaml") == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: [\n")
    assert literal_secrets(bad) == []
