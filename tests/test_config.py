"""Config loading: llama-swap compatibility (defaults, ports, macros, aliases, routing) and every error path.

Pure: parses YAML text, never starts a process. Error tests assert the key path the message
starts with, since that is what a user needs to find the mistake.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from swapper.config.load import load_config, parse_config
from swapper.config.schema import (
    DEFAULT_GROUP,
    DEFAULT_UPSTREAM_IGNORE_PATHS,
    Config,
    ConfigError,
    GroupConfig,
)


def load(text: str) -> Config:
    return parse_config(textwrap.dedent(text))


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text))
    return str(info.value)


def one_model(body: str, top: str = "") -> str:
    """A config with model ``m`` whose keys are ``body`` (indented under it)."""
    indented = textwrap.indent(textwrap.dedent(body), "    ")
    return f"{textwrap.dedent(top)}\nmodels:\n  m:\n{indented}"


# --- defaults, ports, health timeout ---------------------------------------------


def test_minimal_model_gets_defaults() -> None:
    config = load("""
        models:
          m1:
            cmd: svr --port ${PORT}
    """)
    m1 = config.models["m1"]
    assert m1.cmd == ("svr", "--port", "5800")
    assert m1.cmd_text == "svr --port 5800"
    assert m1.proxy == "http://127.0.0.1:5800"
    assert m1.port == 5800
    assert m1.check_endpoint == "/health"
    assert m1.ttl == 0
    assert m1.unload_timeout == 10
    assert m1.health_check_timeout == 120
    assert m1.concurrency_limit == 1000  # unset: maxQueued's default
    assert m1.cmd_stop is None
    assert config.routing.use == "group"
    assert config.routing.groups == (GroupConfig(DEFAULT_GROUP, ("m1",), swap=True, exclusive=True),)
    assert config.warnings == ()
    assert config.log_level == "info"
    assert config.log_to_stdout == "proxy"
    assert config.upstream_ignore_paths == DEFAULT_UPSTREAM_IGNORE_PATHS


def test_ports_follow_sorted_model_ids_not_file_order() -> None:
    config = load("""
        startPort: 6000
        models:
          c:
            cmd: svr --port 7777
            proxy: http://127.0.0.1:7777
          b:
            cmd: svr --port ${PORT}
          a:
            cmd: svr --port ${PORT}
    """)
    assert config.models["a"].port == 6000
    assert config.models["b"].port == 6001
    assert config.models["b"].proxy == "http://127.0.0.1:6001"
    assert config.models["c"].port is None
    assert config.models["c"].proxy == "http://127.0.0.1:7777"
    assert list(config.models) == ["c", "b", "a"]  # file order kept for listing


def test_port_is_substituted_everywhere_in_the_model() -> None:
    config = load("""
        models:
          m:
            cmd: svr --port ${PORT}
            proxy: http://localhost:${PORT}/
            cmdStop: stop-port ${PORT} ${PID}
            name: "on ${PORT}"
    """)
    m = config.models["m"]
    assert m.proxy == "http://localhost:5800"
    assert m.cmd_stop == ("stop-port", "5800", "${PID}")
    assert m.name == "on 5800"


def test_hardcoded_port_without_proxy_is_an_error() -> None:
    message = error("""
        models:
          m:
            cmd: svr --port 111
    """)
    assert message.startswith("models.m.proxy: ")
    assert "proxy uses ${PORT} but cmd does not" in message


def test_explicit_proxy_with_port_but_cmd_without_is_an_error() -> None:
    message = error("""
        models:
          m:
            cmd: svr
            proxy: http://127.0.0.1:${PORT}
    """)
    assert "proxy uses ${PORT} but cmd does not" in message


@pytest.mark.parametrize(("value", "expected"), [(5, 15.0), (15, 15.0), (300, 300.0), (-3, 15.0)])
def test_health_check_timeout_has_a_floor_of_15(value: int, expected: float) -> None:
    config = load(one_model("cmd: svr --port ${PORT}", f"healthCheckTimeout: {value}"))
    assert config.health_check_timeout == expected
    assert config.models["m"].health_check_timeout == expected


def test_start_port_may_be_a_macro() -> None:
    config = load(one_model("cmd: svr --port ${PORT}", 'macros:\n  base: 9100\nstartPort: "${base}"'))
    assert config.start_port == 9100
    assert config.models["m"].port == 9100


@pytest.mark.parametrize("value", ["0", "-5", "70000", "abc"])
def test_bad_start_port(value: str) -> None:
    assert error(one_model("cmd: svr --port ${PORT}", f"startPort: {value}")).startswith("startPort: ")


def test_running_out_of_ports_is_an_error() -> None:
    message = error("""
        startPort: 65535
        models:
          a: {cmd: "svr ${PORT}"}
          b: {cmd: "svr ${PORT}"}
    """)
    assert message.startswith("models.b.cmd: ")


# --- macros -----------------------------------------------------------------------------------


def test_macro_in_macro_resolves() -> None:
    config = load("""
        macros:
          a: 1
          b: "x-${a}"
        models:
          m:
            cmd: svr ${b} --port ${PORT}
    """)
    assert config.models["m"].cmd == ("svr", "x-1", "--port", "5800")


def test_forward_macro_reference_is_an_error() -> None:
    message = error("""
        macros:
          a: "${b}"
          b: 1
        models:
          m: {cmd: "svr ${a} ${PORT}"}
    """)
    assert message.startswith("macros.a: unknown macro '${b}'")


def test_model_macro_forward_reference_is_an_error() -> None:
    message = error("""
        models:
          m:
            macros:
              first: "${second}"
              second: 2
            cmd: svr ${first} ${PORT}
    """)
    assert message.startswith("models.m.macros.first: unknown macro '${second}'")


@pytest.mark.parametrize("name", ["PORT", "MODEL_ID", "PID"])
def test_reserved_macro_names(name: str) -> None:
    message = error(one_model("cmd: svr ${PORT}", f"macros:\n  {name}: 1"))
    assert message.startswith(f"macros.{name}: ")
    assert "reserved" in message


def test_reserved_macro_name_in_model() -> None:
    message = error(one_model("macros:\n  PORT: 1\ncmd: svr ${PORT}"))
    assert message.startswith("models.m.macros.PORT: ")


@pytest.mark.parametrize("name", ["bad name", "dollar$", "x" * 64])
def test_invalid_macro_names(name: str) -> None:
    message = error(one_model("cmd: svr ${PORT}", f'macros:\n  "{name}": 1'))
    assert message.startswith(f"macros.{name}: invalid macro name")


def test_macro_name_of_63_characters_is_fine() -> None:
    name = "x" * 63
    config = load(one_model(f"cmd: svr ${{{name}}} ${{PORT}}", f"macros:\n  {name}: ok"))
    assert config.models["m"].cmd[1] == "ok"


def test_macro_values_must_be_scalars() -> None:
    message = error(one_model("cmd: svr ${PORT}", "macros:\n  list: [1, 2]"))
    assert message.startswith("macros.list: value must be a string, number or bool")


def test_macro_self_reference_is_an_error() -> None:
    message = error(one_model("cmd: svr ${PORT}", 'macros:\n  loop: "a ${loop}"'))
    assert message.startswith("macros.loop: must not reference itself")


def test_model_macro_overrides_global_and_model_id_is_available() -> None:
    config = load("""
        macros:
          ctx: 4096
          args: "--ctx ${ctx} --alias ${MODEL_ID}"
        models:
          small:
            cmd: svr ${args} --port ${PORT}
          big:
            macros:
              ctx: 32768
            cmd: svr ${args} --port ${PORT}
    """)
    assert config.models["small"].cmd_text == "svr --ctx 4096 --alias small --port 5801"
    assert config.models["big"].cmd_text == "svr --ctx 32768 --alias big --port 5800"


def test_global_macros_apply_to_top_level_keys_but_not_model_ids() -> None:
    config = load("""
        macros:
          key: sk-123
          level: debug
        apiKeys: ["${key}"]
        logLevel: ${level}
        models:
          m: {cmd: "svr ${PORT}"}
    """)
    assert config.api_keys == ("sk-123",)
    assert config.log_level == "debug"


def test_model_id_macro_at_top_level_is_an_error() -> None:
    message = error(one_model("cmd: svr ${PORT}", 'apiKeys: ["${MODEL_ID}"]'))
    assert message.startswith("apiKeys[0]: unknown macro '${MODEL_ID}'")


def test_metadata_macros_keep_their_type() -> None:
    config = load("""
        models:
          m:
            macros:
              temp: 0.7
              fast: true
              ctx: 8192
            cmd: svr --port ${PORT}
            metadata:
              port: ${PORT}
              t: "${temp}"
              flag: ${fast}
              note: "${MODEL_ID} on ${PORT} temp=${temp} fast=${fast}"
              nested:
                list: ["${ctx}", false, "model: ${MODEL_ID}"]
    """)
    meta = config.models["m"].metadata
    assert meta["port"] == 5800 and isinstance(meta["port"], int)
    assert meta["t"] == 0.7 and isinstance(meta["t"], float)
    assert meta["flag"] is True
    assert meta["note"] == "m on 5800 temp=0.7 fast=true"
    assert meta["nested"] == {"list": [8192, False, "model: m"]}


def test_exact_macro_chain_keeps_the_final_type() -> None:
    config = load(one_model('cmd: svr ${PORT}\nmetadata: {n: "${b}"}', 'macros:\n  a: 3\n  b: "${a}"'))
    assert config.models["m"].metadata == {"n": 3}


def test_unknown_macro_names_the_field() -> None:
    assert error(one_model("cmd: svr ${nope} ${PORT}")) == "models.m.cmd: unknown macro '${nope}'"


def test_unknown_macro_in_nested_metadata_names_the_path() -> None:
    message = error(one_model('cmd: svr ${PORT}\nmetadata: {a: {b: ["ok", "${x}"]}}'))
    assert message == "models.m.metadata.a.b[1]: unknown macro '${x}'"


def test_port_used_outside_a_cmd_without_port_is_an_error() -> None:
    message = error(one_model("cmd: svr --port 9\nproxy: http://127.0.0.1:9\nname: 'on ${PORT}'"))
    assert message.startswith("models.m.name: unknown macro '${PORT}'")


def test_pid_is_left_for_cmd_stop_only() -> None:
    config = load(one_model("cmd: svr ${PORT}\ncmdStop: docker stop ${MODEL_ID} --pid ${PID}"))
    assert config.models["m"].cmd_stop == ("docker", "stop", "m", "--pid", "${PID}")
    message = error(one_model("cmd: svr ${PORT} ${PID}"))
    assert message.startswith("models.m.cmd: unknown macro '${PID}'")


# --- environment macros -------------------------------------------------------------------------


def test_env_macros_are_substituted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_TEST_DIR", "/srv/models")
    monkeypatch.setenv("SWAPPER_TEST_KEY", "sk-abc")
    config = load("""
        macros:
          models_dir: "${env.SWAPPER_TEST_DIR}/gguf"
        apiKeys: ["${env.SWAPPER_TEST_KEY}"]
        models:
          m:
            cmd: svr -m ${models_dir}/a.gguf --port ${PORT}
    """)
    assert config.models["m"].cmd == ("svr", "-m", "/srv/models/gguf/a.gguf", "--port", "5800")
    assert config.api_keys == ("sk-abc",)


def test_unset_env_var_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWAPPER_TEST_UNSET", raising=False)
    message = error(one_model("cmd: svr ${env.SWAPPER_TEST_UNSET} ${PORT}"))
    assert "environment variable 'SWAPPER_TEST_UNSET' is not set" in message
    assert message.startswith("<config>:4: ")


def test_env_in_yaml_comments_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWAPPER_TEST_UNSET", raising=False)
    config = load("""
        # the key comes from ${env.SWAPPER_TEST_UNSET}
        models:
          m:
            cmd: svr ${PORT}  # was ${env.SWAPPER_TEST_UNSET}
            name: "a # not a comment"
    """)
    assert config.models["m"].cmd == ("svr", "5800")
    assert config.models["m"].name == "a # not a comment"


def test_env_in_commented_cmd_line_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWAPPER_TEST_UNSET", raising=False)
    monkeypatch.setenv("SWAPPER_TEST_FLAG", "--verbose")
    config = load("""
        models:
          m:
            cmd: |
              svr --port ${PORT}
              # --key ${env.SWAPPER_TEST_UNSET}
              ${env.SWAPPER_TEST_FLAG} --tag '# ${env.SWAPPER_TEST_FLAG}'
    """)
    # Inside a block scalar '#' is text, so the env macro after it is still filled in.
    assert config.models["m"].cmd == ("svr", "--port", "5800", "--verbose", "--tag", "# --verbose")


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\0b"])
def test_env_values_with_newline_or_nul_are_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    if "\0" in value:
        # The OS refuses NUL in the environment, so the check is exercised through a patched mapping.
        monkeypatch.setattr("swapper.config.load.os.environ", {"SWAPPER_TEST_BAD": value})
    else:
        monkeypatch.setenv("SWAPPER_TEST_BAD", value)
    message = error(one_model("cmd: svr ${env.SWAPPER_TEST_BAD} ${PORT}"))
    assert "environment variable 'SWAPPER_TEST_BAD' contains a newline or NUL" in message


def test_env_value_is_escaped_inside_double_quotes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_TEST_TRICKY", 'say "hi" \\ bye')
    config = load(one_model('cmd: svr ${PORT}\ndescription: "${env.SWAPPER_TEST_TRICKY}"'))
    assert config.models["m"].description == 'say "hi" \\ bye'


def test_env_value_is_escaped_inside_single_quotes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPPER_TEST_TRICKY", "it's")
    config = load(one_model("cmd: svr ${PORT}\ndescription: '${env.SWAPPER_TEST_TRICKY}'"))
    assert config.models["m"].description == "it's"


# --- cmd parsing --------------------------------------------------------------------------------


def test_cmd_comment_lines_and_backslash_continuation() -> None:
    config = load("""
        models:
          m:
            cmd: |
              # the server binary ${undefined_macro_in_a_comment}
              /opt/svr \\
                --port ${PORT} \\
                --prompt 'two  spaces'
                # trailing comment
              --flag
    """)
    m = config.models["m"]
    assert m.cmd == ("/opt/svr", "--port", "5800", "--prompt", "two  spaces", "--flag")
    assert m.cmd_text == "/opt/svr --port 5800 --prompt 'two  spaces' --flag"


def test_folded_multiline_macro_in_cmd() -> None:
    config = load("""
        macros:
          "latest-llama": >
            /path/llama-server
            --port ${PORT}
        models:
          m:
            cmd: |
              ${latest-llama}
              --model x.gguf
    """)
    assert config.models["m"].cmd == ("/path/llama-server", "--port", "5800", "--model", "x.gguf")
    assert config.models["m"].cmd_text == "/path/llama-server --port 5800 --model x.gguf"


def test_cmd_is_required() -> None:
    # Without cmd, a proxy alone makes a service swapper does not spawn (tests/test_services.py).
    assert error(one_model("name: x")) == (
        "models.m.cmd: is required (or proxy alone, for a service swapper does not spawn)"
    )


def test_cmd_of_only_comments_is_empty() -> None:
    message = error("""
        models:
          llama:
            cmd: |
              # nothing here
    """)
    assert message == "models.llama.cmd: must not be empty"


def test_cmd_with_unbalanced_quote() -> None:
    assert error(one_model("cmd: svr '${PORT}")).startswith("models.m.cmd: cannot be split into arguments")


def test_cmd_must_be_a_string() -> None:
    assert error(one_model("cmd: [svr, a]")).startswith("models.m.cmd: must be a string")


def test_cmd_stop_of_only_comments_means_none() -> None:
    config = load(one_model("cmd: svr ${PORT}\ncmdStop: |\n  # disabled\n"))
    assert config.models["m"].cmd_stop is None


def test_docker_example() -> None:
    config = load("""
        models:
          "docker-llama":
            proxy: "http://127.0.0.1:${PORT}"
            cmd: |
              docker run --name ${MODEL_ID}
              --init --rm -p ${PORT}:8080 -v /mnt/nvme/models:/models
              ghcr.io/ggml-org/llama.cpp:server
              --model '/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf'
            cmdStop: docker stop ${MODEL_ID}
    """)
    m = config.models["docker-llama"]
    assert m.cmd[:4] == ("docker", "run", "--name", "docker-llama")
    assert "5800:8080" in m.cmd
    assert m.cmd[-1] == "/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    assert m.cmd_stop == ("docker", "stop", "docker-llama")


# --- other model keys ---------------------------------------------------------------------------


def test_model_fields_are_decoded() -> None:
    config = load("""
        models:
          m:
            cmd: svr ${PORT}
            checkEndpoint: none
            env: ["CUDA_VISIBLE_DEVICES=0,1", "EMPTY=", "EQ=a=b"]
            useModelName: openai/x
            unlisted: true
            name: " Model M "
            description: A model
            ttl: 300
            unloadTimeout: 45
            concurrencyLimit: 2
            maxWait: 5
            sendLoadingState: true
    """)
    m = config.models["m"]
    assert m.check_endpoint is None
    assert m.env == (("CUDA_VISIBLE_DEVICES", "0,1"), ("EMPTY", ""), ("EQ", "a=b"))
    assert m.use_model_name == "openai/x"
    assert m.unlisted is True
    assert (m.name, m.description) == ("Model M", "A model")
    assert (m.ttl, m.unload_timeout, m.concurrency_limit, m.max_wait) == (300, 45, 2, 5)
    assert m.send_loading_state is True
    assert config.send_loading_state is False


def test_check_endpoint_is_a_path_on_the_models_proxy() -> None:
    # llama-swap joins it to the proxy with one slash, and keeps only a full URL's path.
    assert (
        parse_config(one_model("cmd: svr ${PORT}\ncheckEndpoint: health")).models["m"].check_endpoint
        == "/health"
    )
    config = parse_config(one_model("cmd: svr ${PORT}\ncheckEndpoint: http://127.0.0.1:9/v1/models?x=1"))
    assert config.models["m"].check_endpoint == "/v1/models?x=1"
    assert "models.m.checkEndpoint: a full URL; its path '/v1/models?x=1' is probed" in config.warnings[0]


def test_proxy_must_be_http_url() -> None:
    assert error(one_model("cmd: svr 1\nproxy: localhost:1")).startswith("models.m.proxy: must be an http")


@pytest.mark.parametrize("entry", ["NOEQUALS", "=value", "BAD NAME=1"])
def test_bad_env_entry(entry: str) -> None:
    message = error(one_model(f'cmd: svr ${{PORT}}\nenv: ["OK=1", "{entry}"]'))
    assert message.startswith("models.m.env[1]: expected 'NAME=value'")


def test_ttl_rules() -> None:
    config = load("""
        globalTTL: 60
        models:
          absent: {cmd: "svr ${PORT}"}
          minus_one: {cmd: "svr ${PORT}", ttl: -1}
          never: {cmd: "svr ${PORT}", ttl: 0}
          own: {cmd: "svr ${PORT}", ttl: 5}
    """)
    ttls = {mid: m.ttl for mid, m in config.models.items()}
    assert ttls == {"absent": 60, "minus_one": 60, "never": 0, "own": 5}
    assert config.global_ttl == 60
    assert error(one_model("cmd: svr ${PORT}\nttl: -2")).startswith("models.m.ttl: ")
    assert error(one_model("cmd: svr ${PORT}", "globalTTL: -1")).startswith("globalTTL: ")


def test_unload_timeout_rules() -> None:
    config = load("""
        unloadTimeout: 0
        models:
          a: {cmd: "svr ${PORT}"}
          b: {cmd: "svr ${PORT}", unloadTimeout: 0}
          c: {cmd: "svr ${PORT}", unloadTimeout: 3}
    """)
    assert [m.unload_timeout for m in config.models.values()] == [10, 10, 3]
    config = load(one_model("cmd: svr ${PORT}", "unloadTimeout: 25"))
    assert config.models["m"].unload_timeout == 25
    assert error(one_model("cmd: svr ${PORT}", "unloadTimeout: -1")).startswith("unloadTimeout: ")
    message = error(one_model("cmd: svr ${PORT}\nunloadTimeout: -1"))
    assert message.startswith("models.m.unloadTimeout: ")


def test_concurrency_limit_rules() -> None:
    config = load("""
        concurrencyLimit: 4
        models:
          a: {cmd: "svr ${PORT}"}
          b: {cmd: "svr ${PORT}", concurrencyLimit: 0}
          c: {cmd: "svr ${PORT}", concurrencyLimit: 2}
    """)
    assert [m.concurrency_limit for m in config.models.values()] == [4, 4, 2]
    config = load(one_model("cmd: svr ${PORT}", "concurrencyLimit: 0"))
    assert config.models["m"].concurrency_limit == 1000
    config = load(one_model("cmd: svr ${PORT}", "maxQueued: 50"))
    assert config.models["m"].concurrency_limit == 50  # unset: admit what the queue allows
    assert error(one_model("cmd: svr ${PORT}", "concurrencyLimit: -1")).startswith("concurrencyLimit: ")
    message = error(one_model("cmd: svr ${PORT}\nconcurrencyLimit: -1"))
    assert message.startswith("models.m.concurrencyLimit: ")


def test_max_wait_rules() -> None:
    config = load("""
        maxWait: 12
        models:
          a: {cmd: "svr ${PORT}"}
          b: {cmd: "svr ${PORT}", maxWait: 2.5}
    """)
    assert [m.max_wait for m in config.models.values()] == [12, 2.5]
    assert load(one_model("cmd: svr ${PORT}")).models["m"].max_wait == 30
    assert error(one_model("cmd: svr ${PORT}", "maxWait: 0")).startswith("maxWait: ")
    assert error(one_model("cmd: svr ${PORT}\nmaxWait: 0")).startswith("models.m.maxWait: ")


def test_send_loading_state_inherits_global() -> None:
    config = load("""
        sendLoadingState: true
        models:
          a: {cmd: "svr ${PORT}"}
          b: {cmd: "svr ${PORT}", sendLoadingState: false}
    """)
    assert config.send_loading_state is True
    assert [m.send_loading_state for m in config.models.values()] == [True, False]


def test_filters() -> None:
    config = load("""
        models:
          m:
            cmd: svr ${PORT}
            filters:
              stripParams: " top_p, model , temperature,top_p,, "
              setParams:
                model: ignored
                temperature: 0.7
                provider: {zdr: true}
    """)
    filters = config.models["m"].filters
    assert filters.strip_params == ("temperature", "top_p")
    assert filters.set_params == {"temperature": 0.7, "provider": {"zdr": True}}


def test_legacy_strip_params_key() -> None:
    config = load(one_model("cmd: svr ${PORT}\nfilters: {strip_params: 'b, a'}"))
    assert config.models["m"].filters.strip_params == ("a", "b")


# --- aliases and setParamsByID ----------------------------------------------------


def test_aliases_resolve() -> None:
    config = load("""
        models:
          llama:
            cmd: svr ${PORT}
            aliases: [gpt-4o-mini, "l3"]
    """)
    assert config.aliases == {"gpt-4o-mini": "llama", "l3": "llama"}
    assert config.models["llama"].aliases == ("gpt-4o-mini", "l3")
    assert config.resolve("l3") == "llama"
    assert config.resolve("llama") == "llama"
    assert config.resolve("other") is None


def test_alias_objects_from_older_examples_are_accepted() -> None:
    config = load(one_model("cmd: svr ${PORT}\naliases:\n  - id: gpt-4o-mini\n    name: x"))
    assert config.aliases == {"gpt-4o-mini": "m"}
    assert config.warnings == ("models.m.aliases[0].name: not supported by swapper; ignored",)


def test_duplicate_alias_across_models_names_both() -> None:
    message = error("""
        models:
          b: {cmd: "svr ${PORT}", aliases: [x]}
          a: {cmd: "svr ${PORT}", aliases: [x]}
    """)
    assert message == "models.a.aliases: alias 'x' already used by model 'b'"


def test_alias_equal_to_another_model_id() -> None:
    message = error("""
        models:
          a: {cmd: "svr ${PORT}", aliases: [b]}
          b: {cmd: "svr ${PORT}"}
    """)
    assert message.startswith("models.a.aliases: alias 'b' is already the id of model 'b'")


def test_alias_listed_twice() -> None:
    assert error(one_model("cmd: svr ${PORT}\naliases: [x, x]")).startswith(
        "models.m.aliases: alias 'x' is listed twice"
    )


def test_empty_alias() -> None:
    assert error(one_model("cmd: svr ${PORT}\naliases: ['']")).startswith(
        "models.m.aliases[0]: must not be empty"
    )


def test_set_params_by_id_keys_become_aliases() -> None:
    config = load("""
        models:
          gpt:
            cmd: svr ${PORT}
            aliases: [gpt-mini]
            filters:
              setParamsByID:
                "${MODEL_ID}":
                  effort: medium
                "${MODEL_ID}:high":
                  effort: high
                  model: ignored
                gpt-mini:
                  effort: low
    """)
    assert config.aliases == {"gpt-mini": "gpt", "gpt:high": "gpt"}
    assert config.resolve("gpt:high") == "gpt"
    assert config.models["gpt"].aliases == ("gpt-mini", "gpt:high")
    assert config.models["gpt"].filters.set_params_by_id == {
        "gpt": {"effort": "medium"},
        "gpt:high": {"effort": "high"},
        "gpt-mini": {"effort": "low"},
    }


def test_set_params_by_id_alias_conflicts_with_other_model() -> None:
    message = error("""
        models:
          a: {cmd: "svr ${PORT}", aliases: [shared]}
          b:
            cmd: svr ${PORT}
            filters: {setParamsByID: {shared: {x: 1}}}
    """)
    assert message == "models.b.filters.setParamsByID: alias 'shared' already used by model 'a'"


def test_set_params_by_id_key_naming_another_model() -> None:
    message = error("""
        models:
          a: {cmd: "svr ${PORT}"}
          b:
            cmd: svr ${PORT}
            filters: {setParamsByID: {a: {x: 1}}}
    """)
    assert message.startswith("models.b.filters.setParamsByID: key 'a' is the id of model 'a'")


def test_set_params_by_id_keys_resolving_to_the_same_name() -> None:
    message = error("""
        models:
          m:
            cmd: svr ${PORT}
            filters:
              setParamsByID:
                "${MODEL_ID}:x": {a: 1}
                "m:x": {a: 2}
    """)
    assert message == "models.m.filters.setParamsByID: two keys resolve to 'm:x'"


# --- routing -----------------------------------------------------------------------------------

THREE_MODELS = """
models:
  a: {cmd: "svr ${PORT}", aliases: [alpha]}
  b: {cmd: "svr ${PORT}"}
  c: {cmd: "svr ${PORT}"}
"""


def test_groups_with_defaults_and_default_group() -> None:
    config = load(
        THREE_MODELS
        + """
routing:
  router:
    use: group
    settings:
      groups:
        g1:
          members: [a]
        g2:
          swap: false
          exclusive: false
          persistent: true
          members: [b]
"""
    )
    assert config.routing.groups == (
        GroupConfig("g1", ("a",), swap=True, exclusive=True, persistent=False),
        GroupConfig("g2", ("b",), swap=False, exclusive=False, persistent=True),
        GroupConfig(DEFAULT_GROUP, ("c",), swap=True, exclusive=True, persistent=False),
    )


def test_default_group_is_left_out_when_every_model_is_grouped() -> None:
    config = load(THREE_MODELS + "groups:\n  all: {members: [a, b, c]}\n")
    assert [g.name for g in config.routing.groups] == ["all"]


def test_legacy_top_level_groups() -> None:
    config = load(THREE_MODELS + "groups:\n  pair: {swap: false, members: [a, b]}\n")
    assert config.routing.use == "group"
    assert config.routing.groups[0] == GroupConfig("pair", ("a", "b"), swap=False)
    assert config.routing.groups[1] == GroupConfig(DEFAULT_GROUP, ("c",))


def test_model_in_two_groups_names_both_groups() -> None:
    message = error(THREE_MODELS + "groups:\n  g1: {members: [a]}\n  g2: {members: [b, a]}\n")
    assert message == "groups.g2.members: model 'a' is in both groups 'g1' and 'g2'"


def test_model_listed_twice_in_a_group() -> None:
    message = error(THREE_MODELS + "groups:\n  g1: {members: [a, a]}\n")
    assert message.startswith("groups.g1.members: model 'a' is listed twice")


def test_a_group_member_that_is_no_model_is_left_out_with_a_warning() -> None:
    # llama-swap's loader takes it (a model commented out, its group left as it was).
    base = THREE_MODELS + "routing:\n  router:\n    settings:\n      groups:\n        g1: {members: [%s]}\n"
    config = parse_config(base % "alpha, zzz")
    assert config.routing.groups[0].members == ("a",)  # the alias's model
    path = "routing.router.settings.groups.g1.members"
    assert f"{path}: 'alpha' is an alias of 'a'; using the model" in config.warnings
    assert f"{path}: 'zzz' is not a model id; left out of the group" in config.warnings


def test_group_members_are_required() -> None:
    message = error(THREE_MODELS + "groups:\n  g1: {swap: false}\n")
    assert message == "groups.g1.members: is required"


def test_default_group_name_is_reserved() -> None:
    message = error(THREE_MODELS + "groups:\n  '(default)': {members: [a]}\n")
    assert message.startswith("groups.(default): ")


def test_legacy_groups_with_routing_router_is_an_error() -> None:
    message = error(THREE_MODELS + "groups:\n  g: {members: [a]}\nrouting:\n  router:\n    use: group\n")
    assert message.startswith("groups: ")
    assert "routing.router" in message


def test_legacy_matrix_with_routing_router_is_an_error() -> None:
    text = THREE_MODELS + "matrix:\n  sets: {s: a}\nrouting:\n  router:\n    use: matrix\n"
    assert error(text).startswith("matrix: ")


def test_legacy_groups_and_matrix_together_is_an_error() -> None:
    message = error(THREE_MODELS + "groups:\n  g: {members: [a]}\nmatrix:\n  sets: {s: a}\n")
    assert message.startswith("matrix: ")
    assert "groups" in message


def test_legacy_groups_with_only_a_scheduler_block_is_fine() -> None:
    text = THREE_MODELS + "groups:\n  g: {members: [a]}\nrouting:\n  scheduler:\n    use: fifo\n"
    assert load(text).routing.groups[0].name == "g"


def test_matrix_router_requires_matrix_settings() -> None:
    message = error(THREE_MODELS + "routing:\n  router:\n    use: matrix\n")
    assert message.startswith("routing.router.settings.matrix: is required")


def test_unknown_router() -> None:
    message = error(THREE_MODELS + "routing:\n  router:\n    use: x\n")
    assert message == "routing.router.use: unknown router 'x' (valid: group, matrix, memory)"


MATRIX = (
    THREE_MODELS
    + """
routing:
  router:
    use: matrix
    settings:
      matrix:
%s
"""
)


def matrix_config(body: str) -> str:
    return MATRIX % textwrap.indent(textwrap.dedent(body), "        ")


def test_matrix_settings_are_stored() -> None:
    config = load(
        matrix_config("""
        vars:
          g: a
          v.1-x: b
        evict_costs:
          g: 50
          c: 3
        sets:
          standard: "(g | c) & v.1-x"
          alone: "a"
    """)
    )
    matrix = config.routing.matrix
    assert config.routing.use == "matrix"
    assert matrix is not None
    assert matrix.vars == {"g": "a", "v.1-x": "b"}
    assert matrix.evict_costs == {"a": 50, "c": 3}
    assert matrix.sets == (("standard", "(g | c) & v.1-x"), ("alone", "a"))
    # Every model is in (default) too; the matrix planner simply ignores groups.
    assert config.routing.groups == (GroupConfig(DEFAULT_GROUP, ("a", "b", "c")),)


def test_legacy_top_level_matrix_selects_the_matrix_router() -> None:
    config = load(THREE_MODELS + "matrix:\n  sets:\n    s: 'a & b'\n")
    assert config.routing.use == "matrix"
    assert config.routing.matrix is not None
    assert config.routing.matrix.sets == (("s", "a & b"),)


def test_matrix_var_mapped_to_an_alias_is_an_error() -> None:
    message = error(matrix_config("vars: {g: alpha}\nsets: {s: g}"))
    assert message.startswith("routing.router.settings.matrix.vars.g: 'alpha' is an alias of 'a'")


def test_matrix_var_mapped_to_an_unknown_model() -> None:
    message = error(matrix_config("vars: {g: nope}\nsets: {s: g}"))
    assert message == "routing.router.settings.matrix.vars.g: unknown model 'nope'"


@pytest.mark.parametrize("name", ["has space", "x" * 33, "under_score", "a/b"])
def test_matrix_var_names(name: str) -> None:
    message = error(matrix_config(f"vars: {{'{name}': a}}\nsets: {{s: a}}"))
    assert message.startswith(f"routing.router.settings.matrix.vars.{name}: invalid var name")


@pytest.mark.parametrize("cost", ["0", "-1", "1.5", "true", "'3'"])
def test_matrix_evict_costs_must_be_positive_integers(cost: str) -> None:
    message = error(matrix_config(f"evict_costs: {{a: {cost}}}\nsets: {{s: a}}"))
    assert message.startswith("routing.router.settings.matrix.evict_costs.a: must be a positive integer")


def test_matrix_evict_cost_for_unknown_name() -> None:
    message = error(matrix_config("evict_costs: {alpha: 2}\nsets: {s: a}"))
    assert message == "routing.router.settings.matrix.evict_costs.alpha: unknown var or model 'alpha'"


def test_matrix_evict_cost_given_twice_for_one_model() -> None:
    message = error(matrix_config("vars: {g: a}\nevict_costs: {g: 2, a: 3}\nsets: {s: a}"))
    assert message.startswith("routing.router.settings.matrix.evict_costs.a: model 'a' already has")


def test_matrix_needs_at_least_one_set() -> None:
    message = error(matrix_config("vars: {g: a}\nsets: {}"))
    assert message == "routing.router.settings.matrix.sets: at least one set is required"


def test_matrix_set_must_be_text() -> None:
    message = error(matrix_config("sets: {s: ''}"))
    assert message == "routing.router.settings.matrix.sets.s: must not be empty"


def test_memory_router_settings() -> None:
    config = load(
        THREE_MODELS
        + """
routing:
  router:
    use: memory
    settings:
      memory:
        gpuBudget: 20GiB
        ramBudget: "64 GB"
        reserve: 0
        stateFile: /var/lib/swapper/footprints.json
        releaseTimeout: 4
"""
    )
    memory = config.routing.memory
    assert config.routing.use == "memory"
    assert memory.gpu_budget == 20 * 1024**3
    assert memory.ram_budget == 64 * 1000**3
    assert memory.reserve == 0
    assert memory.state_file == "/var/lib/swapper/footprints.json"
    assert memory.release_timeout == 4


def test_memory_router_defaults() -> None:
    config = load(THREE_MODELS + "routing:\n  router:\n    use: memory\n")
    assert config.routing.memory.gpu_budget is None
    assert config.routing.memory.reserve == 512 * 1024**2


def test_memory_budget_must_be_a_size() -> None:
    text = (
        THREE_MODELS
        + "routing:\n  router:\n    use: memory\n    settings:\n      memory: {gpuBudget: lots}\n"
    )
    assert error(text).startswith("routing.router.settings.memory.gpuBudget: must be a byte count")


def test_scheduler_priorities_resolve_aliases() -> None:
    text = (
        THREE_MODELS
        + """
routing:
  scheduler:
    use: fifo
    settings:
      fifo:
        priority: {alpha: 10, b: 5}
"""
    )
    config = load(text)
    assert {mid: m.priority for mid, m in config.models.items()} == {"a": 10, "b": 5, "c": 0}


def test_scheduler_priority_for_unknown_model() -> None:
    text = THREE_MODELS + "routing:\n  scheduler:\n    settings:\n      fifo:\n        priority: {zz: 1}\n"
    assert error(text) == "routing.scheduler.settings.fifo.priority: unknown model 'zz'"


def test_scheduler_priority_given_twice_through_an_alias() -> None:
    text = (
        THREE_MODELS
        + "routing:\n  scheduler:\n    settings:\n      fifo:\n        priority: {a: 1, alpha: 2}\n"
    )
    assert error(text).startswith("routing.scheduler.settings.fifo.priority.alpha: model 'a' already has")


def test_unknown_scheduler() -> None:
    text = THREE_MODELS + "routing:\n  scheduler:\n    use: lifo\n"
    assert error(text) == "routing.scheduler.use: unknown scheduler 'lifo' (valid: fifo)"


# --- top-level keys -----------------------------------------------------------------------------


def test_top_level_settings() -> None:
    config = load("""
        logLevel: WARN
        logToStdout: both
        logFormat: json
        loadingStateMode: comments
        includeAliasesInList: true
        defaultModel: alpha
        maxBodyBytes: 1MiB
        maxQueued: 50
        apiKeys: [k1, k2]
        upstream:
          ignorePaths: ['^/static/']
        models:
          a: {cmd: "svr ${PORT}", aliases: [alpha]}
    """)
    assert config.log_level == "warn"
    assert config.log_to_stdout == "both"
    assert config.log_format == "json"
    assert config.loading_state_mode == "comments"
    assert config.include_aliases_in_list is True
    assert config.default_model == "a"
    assert config.max_body_bytes == 1024**2
    assert config.max_queued == 50
    assert config.api_keys == ("k1", "k2")
    assert config.upstream_ignore_paths == ("^/static/",)


def test_unknown_log_level_warns_and_uses_info() -> None:
    config = load(one_model("cmd: svr ${PORT}", "logLevel: verbose"))
    assert config.log_level == "info"
    assert config.warnings == ("logLevel: unknown level 'verbose'; using info",)


@pytest.mark.parametrize(
    ("key", "value"),
    [("logToStdout", "stderr"), ("logFormat", "xml"), ("loadingStateMode", "banner")],
)
def test_enumerated_settings_reject_unknown_values(key: str, value: str) -> None:
    message = error(one_model("cmd: svr ${PORT}", f"{key}: {value}"))
    assert message.startswith(f"{key}: unknown value '{value}' (valid: ")


def test_api_keys_validation() -> None:
    assert error(one_model("cmd: svr ${PORT}", "apiKeys: ['ok', '']")) == "apiKeys[1]: must not be empty"
    message = error(one_model("cmd: svr ${PORT}", "apiKeys: ['has space']"))
    assert message == "apiKeys[0]: must not contain spaces"
    assert "has space" not in message


def test_invalid_ignore_path_regex() -> None:
    message = error(one_model("cmd: svr ${PORT}", "upstream:\n  ignorePaths: ['ok', '(unclosed']"))
    assert message.startswith("upstream.ignorePaths[1]: invalid regular expression")


def test_empty_ignore_paths_fall_back_to_default() -> None:
    config = load(one_model("cmd: svr ${PORT}", "upstream:\n  ignorePaths: []"))
    assert config.upstream_ignore_paths == DEFAULT_UPSTREAM_IGNORE_PATHS


def test_default_model_must_exist() -> None:
    assert error(one_model("cmd: svr ${PORT}", "defaultModel: nope")) == "defaultModel: unknown model 'nope'"


@pytest.mark.parametrize(("key", "value"), [("maxBodyBytes", "0"), ("maxQueued", "0"), ("maxQueued", "-3")])
def test_limits_must_be_positive(key: str, value: str) -> None:
    assert error(one_model("cmd: svr ${PORT}", f"{key}: {value}")).startswith(f"{key}: ")


def test_preload_resolves_aliases_and_drops_unknown_ids_with_a_warning() -> None:
    config = load("""
        hooks:
          on_startup:
            preload: [alpha, "", b, a, ghost]
        models:
          a: {cmd: "svr ${PORT}", aliases: [alpha]}
          b: {cmd: "svr ${PORT}"}
    """)
    assert config.preload == ("a", "b")
    assert config.warnings == ("hooks.on_startup.preload: unknown model 'ghost'; not preloaded",)


# --- unsupported and unknown keys ---------------------------------------------------------------


def test_unsupported_keys_warn_once_each_and_still_load() -> None:
    config = load("""
        logTimeFormat: rfc3339
        metricsMaxInMemory: 500
        captureBuffer: 5
        peers:
          openrouter: {proxy: "https://openrouter.ai/api", models: [x]}
        profiles: {coding: {pins: {a: llama}}}
        selectors: {s: {strategy: warm, targets: [llama]}}
        performance: {disabled: true}
        models:
          llama:
            cmd: svr ${PORT}
            capabilities: {in: [text], tools: true}
            timeouts: {connect: 30}
            compat: {ignoreWebsockets: true}
            healthCheckTimeout: 30
    """)
    assert config.models["llama"].cmd == ("svr", "5800")
    assert (config.activity_records, config.capture_bytes) == (500, 5 * 1024 * 1024)
    assert config.warnings == (
        "logTimeFormat: not supported by swapper; ignored",
        "performance: not supported by swapper; ignored",
        "models.llama.compat: not supported by swapper; ignored",
        "models.llama.healthCheckTimeout: not supported by swapper; ignored",
    )
    assert list(config.fleet.peers) == ["openrouter"] and list(config.fleet.selectors) == ["s"]


def test_activity_and_capture_keys() -> None:
    plain = "models:\n  m:\n    cmd: svr ${PORT}\n"
    default = load(plain)
    assert (default.activity_records, default.capture_bytes) == (1000, 0)  # captures off by default
    off = load("metricsMaxInMemory: 0\ncaptureBuffer: 0\n" + plain)
    assert (off.activity_records, off.capture_bytes) == (0, 0)
    assert load("captureBuffer: 512KiB\n" + plain).capture_bytes == 512 * 1024
    with pytest.raises(ConfigError, match="metricsMaxInMemory: must not be negative"):
        load("metricsMaxInMemory: -1\n" + plain)
    with pytest.raises(ConfigError, match="captureBuffer: must not be negative"):
        load("captureBuffer: -5\n" + plain)


def test_unknown_keys_warn_with_their_path() -> None:
    config = load("""
        startport: 7000
        models:
          m:
            cmd: svr ${PORT}
            ttll: 5
            filters: {stripParam: x}
        routing:
          router:
            settingz: {}
    """)
    assert config.warnings == (
        "startport: unknown key; ignored",
        "models.m.ttll: unknown key; ignored",
        "models.m.filters.stripParam: unknown key; ignored",
        "routing.router.settingz: unknown key; ignored",
    )
    assert config.start_port == 5800


def test_unsupported_model_keys_are_not_macro_checked() -> None:
    config = load(one_model("cmd: svr ${PORT}\ncompat: {note: '${undefined}'}"))
    assert config.warnings == ("models.m.compat: not supported by swapper; ignored",)


# --- memory estimates and sizes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024", 1024),
        ("512MiB", 512 * 1024**2),
        ("2GB", 2 * 1000**3),
        ("8G", 8 * 1024**3),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("100kb", 100_000),
        ("3tib", 3 * 1024**4),
        ("7", 7),
    ],
)
def test_size_strings(value: str, expected: int) -> None:
    config = load(one_model(f"cmd: svr ${{PORT}}\nmemory: {{estimate: '{value}', device: gpu}}"))
    assert config.models["m"].memory_estimate == expected
    assert config.models["m"].memory_device == "gpu"


def test_memory_estimate_shorthand_and_defaults() -> None:
    config = load("""
        models:
          a: {cmd: "svr ${PORT}", memoryEstimate: 4GiB}
          b: {cmd: "svr ${PORT}", memoryEstimate: 123456}
          c: {cmd: "svr ${PORT}"}
    """)
    assert [m.memory_estimate for m in config.models.values()] == [4 * 1024**3, 123456, None]
    assert config.models["c"].memory_device == "auto"


@pytest.mark.parametrize("value", ["'12 parsecs'", "'-1GB'", "0", "true", "'GB'"])
def test_bad_sizes(value: str) -> None:
    message = error(one_model(f"cmd: svr ${{PORT}}\nmemoryEstimate: {value}"))
    assert message.startswith("models.m.memoryEstimate: ")


def test_memory_estimate_given_twice() -> None:
    message = error(one_model("cmd: svr ${PORT}\nmemoryEstimate: 1G\nmemory: {estimate: 2G}"))
    assert message.startswith("models.m.memoryEstimate: give either")


def test_memory_device_must_be_known() -> None:
    message = error(one_model("cmd: svr ${PORT}\nmemory: {device: tpu}"))
    assert message == "models.m.memory.device: unknown device 'tpu' (valid: auto, gpu, cpu)"


# --- document-level errors and YAML ------------------------------------------------------------


def test_yaml_syntax_error_names_source_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("models:\n  m:\n    cmd: [unclosed\n", source="models.yaml")
    assert str(info.value).startswith("models.yaml:")
    line = int(str(info.value).split(":")[1])
    assert line in (3, 4)
    assert "invalid YAML" in str(info.value)


def test_duplicate_keys_are_rejected() -> None:
    message = error("""
        models:
          m: {cmd: "svr ${PORT}"}
          m: {cmd: "other ${PORT}"}
    """)
    assert message.startswith("<config>:4: invalid YAML: duplicate key 'm'")


def test_yaml_merge_keys_still_work() -> None:
    config = load("""
        x-base: &base
          cmd: svr ${PORT}
          ttl: 9
        models:
          m:
            <<: *base
            ttl: 3
    """)
    assert config.models["m"].ttl == 3
    assert config.models["m"].cmd == ("svr", "5800")
    assert config.warnings == ("x-base: unknown key; ignored",)


def test_yaml_1_1_boolean_words_stay_strings_for_ids_but_work_as_flags() -> None:
    config = load("""
        models:
          no:
            cmd: svr ${PORT}
            unlisted: yes
    """)
    assert list(config.models) == ["no"]
    assert config.models["no"].unlisted is True


def test_top_level_must_be_a_mapping() -> None:
    assert error("- a\n- b\n").startswith("<config>: the top level must be a mapping")


@pytest.mark.parametrize("text", ["", "models: {}\n", "logLevel: info\n"])
def test_no_models_loads_with_a_warning(text: str) -> None:
    # llama-swap loads an empty config; a peers-only config is the useful case (test_fleet.py).
    assert parse_config(text).warnings[-1] == "models: none defined"


def test_model_must_be_a_mapping() -> None:
    assert error("models:\n  m: svr --port 1\n").startswith("models.m: must be a mapping")


def test_wrong_types_name_the_key() -> None:
    assert error(one_model("cmd: svr ${PORT}\nunlisted: maybe")).startswith(
        "models.m.unlisted: must be true or false"
    )
    assert error(one_model("cmd: svr ${PORT}\nttl: soon")).startswith("models.m.ttl: must be a number")
    assert error(one_model("cmd: svr ${PORT}\nenv: A=1")).startswith("models.m.env: must be a list")
    assert error(one_model("cmd: svr ${PORT}\nmetadata: [1]")).startswith(
        "models.m.metadata: must be a mapping"
    )
    assert error(one_model("cmd: svr ${PORT}", "globalTTL: [1]")).startswith("globalTTL: must be a number")


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  m:\n    cmd: svr --port ${PORT}\n", encoding="utf-8")
    assert load_config(str(path)).models["m"].port == 5800


def test_load_config_reports_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  m:\n    cmd: 'unterminated\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}:")
    with pytest.raises(ConfigError) as missing:
        load_config(str(tmp_path / "absent.yaml"))
    assert str(missing.value).startswith(f"{tmp_path / 'absent.yaml'}: cannot read config")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_env_comment_detection_resumes_after_a_block_scalar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWAPPER_TEST_UNSET", raising=False)
    monkeypatch.setenv("SWAPPER_TEST_SET", "v")
    config = load("""
        models:
          m:
            cmd: |
              svr --port ${PORT}
            name: "x \\" # ${env.SWAPPER_TEST_SET}" # ${env.SWAPPER_TEST_UNSET}
            description: 'it''s # ${env.SWAPPER_TEST_SET}' # ${env.SWAPPER_TEST_UNSET}
    """)
    assert config.models["m"].name == 'x " # v'
    assert config.models["m"].description == "it's # v"


def test_more_model_details() -> None:
    config = load("""
        models:
          m:
            cmd: svr ${PORT}
            checkEndpoint: /v1/models
            aliases: [m, other]
            filters: {stripParams: [b, a, model]}
    """)
    m = config.models["m"]
    assert m.check_endpoint == "/v1/models"
    assert m.aliases == ("other",)
    assert m.filters.strip_params == ("a", "b")
    assert config.warnings == ("models.m.aliases: 'm' is the model's own id; ignored",)


def test_more_errors() -> None:
    assert error("models:\n  '': {cmd: svr}\n") == "models: a model id must not be empty"
    message = error(one_model("cmd: svr ${PORT}\nconcurrencyLimit: 1.5"))
    assert message.startswith("models.m.concurrencyLimit: must be a whole number")
    text = (
        THREE_MODELS
        + "routing:\n  router:\n    use: memory\n    settings:\n      memory: {releaseTimeout: 0}\n"
    )
    assert error(text) == "routing.router.settings.memory.releaseTimeout: must be greater than 0"


def test_matrix_dsl_errors_are_config_errors_at_load() -> None:
    text = """
models:
  a: {cmd: "svr --port ${PORT}"}
routing:
  router:
    use: matrix
    settings:
      matrix:
        sets:
          s: "a & (nope"
"""
    with pytest.raises(ConfigError, match=r'routing\.router\.settings\.matrix: set "s"'):
        parse_config(text)
