"""Settings: environment over TOML over defaults, Microsoft's sample names, clear errors."""

from __future__ import annotations

import pytest

from ringrelay.config import ConfigError, load_settings

CONN = "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=Full;SharedAccessKey=k="


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith(("RINGRELAY_", "ANH")):
            monkeypatch.delenv(name)


def test_defaults_need_no_configuration() -> None:
    s = load_settings()
    assert s.database_url == "sqlite:///./ringrelay.db"
    assert s.delivery_backend == "sandbox"
    assert s.ring_window_seconds == 45
    assert s.webhook_secret is None


def test_environment_wins_over_toml(tmp_path, monkeypatch) -> None:
    toml = tmp_path / "ringrelay.toml"
    toml.write_text('ring_window_seconds = 30\ndefault_ttl_seconds = 3600\nwebhook_secret = "t"\n')
    monkeypatch.setenv("RINGRELAY_RING_WINDOW_SECONDS", "40")
    s = load_settings(toml)
    assert s.ring_window_seconds == 40
    assert s.default_ttl_seconds == 3600
    assert s.webhook_secret is not None and s.webhook_secret.get_secret_value() == "t"
    monkeypatch.setenv("RINGRELAY_CONFIG", str(toml))
    assert load_settings().default_ttl_seconds == 3600


@pytest.mark.parametrize(
    "names",
    [
        ("ANHHubConnectionString", "ANHHubName", "ANHHubApiVersion"),
        ("ANH_Hub_Connection_String", "ANH_Hub_Name", "ANH_Hub_Api_Version"),
        ("RINGRELAY_NH_CONNECTION_STRING", "RINGRELAY_NH_HUB_NAME", "RINGRELAY_NH_API_VERSION"),
    ],
)
def test_sample_app_setting_names_are_accepted(monkeypatch, names) -> None:
    conn, hub, version = names
    monkeypatch.setenv(conn, CONN)
    monkeypatch.setenv(hub, "calls")
    monkeypatch.setenv(version, "2015-01")
    s = load_settings()
    assert s.delivery_backend == "notificationhubs"
    assert s.nh_messages_url() == "https://contoso.servicebus.windows.net/calls/messages/"
    assert s.nh_resource_uri() == "https://contoso.servicebus.windows.net/calls"
    assert s.nh_api_version == "2015-01"


def test_sample_hub_url_is_used_as_given(monkeypatch) -> None:
    monkeypatch.setenv("ANH_Hub_Connection_String", CONN)
    monkeypatch.setenv("ANH_Hub_URL", "https://contoso.servicebus.windows.net/calls/messages/")
    s = load_settings()
    assert s.nh_messages_url() == "https://contoso.servicebus.windows.net/calls/messages/"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ANHHubConnectionString": CONN.replace(";SharedAccessKey=k=", "")}, "SharedAccessKey"),
        ({"ANHHubConnectionString": "garbage"}, "ANHHubConnectionString"),
        ({"ANHHubConnectionString": CONN}, "nh_hub_name"),
        ({"RINGRELAY_RING_WINDOW_SECONDS": "soon"}, "RINGRELAY_RING_WINDOW_SECONDS"),
        ({"RINGRELAY_DEFAULT_TTL_SECONDS": "10"}, "RINGRELAY_DEFAULT_TTL_SECONDS"),
        ({"RINGRELAY_DATABASE_URL": "mysql://x"}, "RINGRELAY_DATABASE_URL"),
        ({"RINGRELAY_DELIVERY": "notificationhubs"}, "nh_connection_string"),
        ({"ANH_Hub_URL": "ftp://x", "ANHHubConnectionString": CONN}, "ANHHubUrl"),
    ],
)
def test_malformed_settings_name_the_setting(monkeypatch, env, named) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert named in str(err.value)
    assert "k=" not in str(err.value).replace("SharedAccessKey", "")  # no secret echoed


def test_missing_config_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings("/nonexistent/ringrelay.toml")


def _direct_config(tmp_path, apns_extra: str = "", fcm_extra: str = "") -> str:
    from ringrelay.fakes.apns import write_signing_key
    from ringrelay.fakes.fcm import write_service_account

    write_signing_key(tmp_path / "AuthKey.p8")
    write_service_account(tmp_path / "sa.json", "contoso-calling", "https://127.0.0.1:1/token")
    return f"""
[[apns]]
bundle_id = "com.contoso.calling"
team_id = "ABCDE12345"
key_id = "KEY1234567"
key_file = "{tmp_path / "AuthKey.p8"}"
{apns_extra}

[[apns]]
app_id = "dev-build"
bundle_id = "com.contoso.calling"
team_id = "ABCDE12345"
key_id = "KEY1234567"
key_file = "{tmp_path / "AuthKey.p8"}"
environment = "sandbox"

[[fcm]]
service_account_file = "{tmp_path / "sa.json"}"
{fcm_extra}
"""


def test_direct_apps_and_routes_from_toml(tmp_path) -> None:
    config = tmp_path / "ringrelay.toml"
    config.write_text(_direct_config(tmp_path) + '\n[routes]\nwns = "sandbox"\n')
    settings = load_settings(config)
    assert [a.name for a in settings.apns] == ["com.contoso.calling", "dev-build"]
    assert settings.apns[1].environment == "sandbox"
    assert [f.name for f in settings.fcm] == ["contoso-calling"]
    # Direct where configured, the sandbox only where the routes say so, nothing else.
    assert {p.value: t for p, t in settings.transport_routes().items()} == {
        "apns": "apns",
        "fcm": "fcm",
        "wns": "sandbox",
    }


@pytest.mark.parametrize(
    ("apns_extra", "fcm_extra", "named"),
    [
        ('team_id = "abc"', "", "apns[0].team_id"),
        ('environment = "staging"', "", "apns[0].environment"),
        ("colour = 1", "", "apns[0].colour"),
        ("", 'service_account_file = "/nonexistent.json"', "fcm[0].service_account_file"),
    ],
)
def test_malformed_direct_settings_name_the_table_and_key(
    tmp_path, apns_extra, fcm_extra, named
) -> None:
    config = tmp_path / "ringrelay.toml"
    text = _direct_config(tmp_path, apns_extra, "")
    if fcm_extra:
        text = text.replace(f'service_account_file = "{tmp_path / "sa.json"}"', fcm_extra)
    if apns_extra.startswith("team_id"):
        text = text.replace('team_id = "ABCDE12345"\nkey_id', "key_id", 1)
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert named in str(err.value)


def test_apns_key_file_must_be_a_p256_key(tmp_path) -> None:
    config = tmp_path / "ringrelay.toml"
    text = _direct_config(tmp_path)
    (tmp_path / "AuthKey.p8").write_text(
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    )
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert "apns[0].key_file" in str(err.value)


def test_duplicate_app_ids_and_impossible_routes_are_refused(tmp_path) -> None:
    config = tmp_path / "ringrelay.toml"
    config.write_text(_direct_config(tmp_path).replace('app_id = "dev-build"', ""))
    with pytest.raises(ConfigError, match="configured twice"):
        load_settings(config)
    config.write_text(_direct_config(tmp_path) + '\n[routes]\nwns = "apns"\n')
    with pytest.raises(ConfigError, match=r"routes\.wns"):
        load_settings(config)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("ring_windw_seconds = 30\n", "ring_windw_seconds: unknown key (did you mean"),
        ('[routes]\nwnss = "sandbox"\n', "routes.wnss: unknown key"),
        ("ring_window_seconds = \n", "not valid TOML: Invalid value (at line 1"),
    ],
)
def test_toml_typos_and_syntax_errors_are_refused(tmp_path, text, named) -> None:
    config = tmp_path / "ringrelay.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert str(err.value).startswith(f"{config}: ")
    assert named in str(err.value)


def test_unknown_key_in_an_apns_table_is_named(tmp_path) -> None:
    config = tmp_path / "ringrelay.toml"
    config.write_text(_direct_config(tmp_path, apns_extra='bundel_id = "x"'))
    with pytest.raises(ConfigError, match=r"apns\[0\]\.bundel_id: unknown key"):
        load_settings(config)


def test_sample_names_and_lower_case_keys_are_known_in_toml(tmp_path) -> None:
    config = tmp_path / "ringrelay.toml"
    config.write_text(f'ANHHubConnectionString = "{CONN}"\nnh_hub_name = "calls"\n')
    assert load_settings(config).nh_hub_name == "calls"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RINGRELAY_LOG_LEVEL": "LOUD"}, "RINGRELAY_LOG_LEVEL: expected one of DEBUG"),
        ({"RINGRELAY_APNS": "not json"}, "RINGRELAY_APNS: not valid JSON"),
        ({"RINGRELAY_ROUTES": "{"}, "RINGRELAY_ROUTES: not valid JSON"),
        ({"RINGRELAY_NH_CA_FILE": "/nonexistent/ca.pem"}, "RINGRELAY_NH_CA_FILE: no such file"),
        (
            {"RINGRELAY_DATABASE_URL": "sqlite:///./no/such/folder/r.db"},
            "RINGRELAY_DATABASE_URL: the folder no/such/folder does not exist",
        ),
    ],
)
def test_more_malformed_settings_name_the_setting(monkeypatch, env, named) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert named in str(err.value)


def test_log_level_is_case_insensitive(monkeypatch) -> None:
    monkeypatch.setenv("RINGRELAY_LOG_LEVEL", "debug")
    assert load_settings().log_level == "DEBUG"


def test_a_direct_apps_ca_file_must_exist(tmp_path) -> None:
    config = tmp_path / "ringrelay.toml"
    config.write_text(_direct_config(tmp_path, fcm_extra='ca_file = "/nonexistent/ca.pem"'))
    with pytest.raises(ConfigError, match=r"fcm\[0\]\.ca_file: no such file"):
        load_settings(config)
