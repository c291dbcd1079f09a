"""Load-shedding gates and the bridge's route templates (the metrics' bounded labels)."""

from __future__ import annotations

import pytest

from casledger.http_bridge.middleware import route_template
from casledger.service.limits import Gate, backstop


def test_gate_admits_up_to_its_limit_then_refuses_at_once() -> None:
    gate = Gate(2)

    assert gate.try_enter()
    assert gate.try_enter()
    assert not gate.try_enter()
    assert gate.in_flight == 2
    gate.leave()
    assert gate.try_enter()
    assert not gate.try_enter()


def test_gate_refuses_an_unmatched_leave_and_a_zero_limit() -> None:
    with pytest.raises(RuntimeError):
        Gate(1).leave()
    with pytest.raises(ValueError, match="at least 1"):
        Gate(0)


def test_backstop_is_above_both_bounds() -> None:
    assert backstop(256, 512) > 256 + 512


@pytest.mark.parametrize(("path", "template"), [
    ("/v1/documents/a", "/v1/{name}"),
    ("/v1/projects/p/notes/n", "/v1/{name}"),
    ("/v1/documents", "/v1/{collection}"),
    ("/v1/projects/p/notes", "/v1/{collection}"),
    ("/v1/documents/a:history", "/v1/{name}:history"),
    ("/v1/documents:watch", "/v1/{prefix}:watch"),
    ("/v1:watch", "/v1:watch"),
    ("/healthz", "/healthz"),
    ("/readyz", "/readyz"),
    ("/metrics", "/metrics"),
    ("/openapi.json", "/openapi.json"),
    ("/v1/documents/a:frobnicate", "unmatched"),
    ("/v1/", "unmatched"),
    ("/v2/documents/a", "unmatched"),
    ("/", "unmatched"),
    ("/wp-login.php", "unmatched"),
])
def test_route_template(path: str, template: str) -> None:
    assert route_template(path) == template


# --- settings and wiring -----------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    {"max_in_flight": 0}, {"max_watchers": 0}, {"log_format": "xml"},
    {"metrics_listen": "9464"}, {"metrics_listen": "localhost:http"},
])
def test_settings_refuse_unusable_limits_and_formats(changes: dict[str, object]) -> None:
    from casledger.service.config import Settings, SettingsError

    with pytest.raises(SettingsError):
        Settings(**changes)  # type: ignore[arg-type]


def test_bridge_settings_refuse_a_zero_bound() -> None:
    from casledger.http_bridge.app import BridgeSettings

    with pytest.raises(ValueError, match="at least 1"):
        BridgeSettings(max_watchers=0)


def test_serve_hands_its_limits_and_log_format_to_its_bridge() -> None:
    import os

    from casledger.http_bridge.app import BridgeSettings
    from casledger.service import cli
    from casledger.service.config import load

    command = cli.bridge_command(BridgeSettings(max_in_flight=7, max_watchers=3), "info",
                                 "json")
    assert command[1:3] == ["-m", "casledger.http_bridge"]
    args = cli.build_parser().parse_args(["bridge", *command[3:]])
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CASLEDGER_")}
    bridge = load(BridgeSettings, environ, **cli._given(args, BridgeSettings))

    assert (bridge.max_in_flight, bridge.max_watchers) == (7, 3)
    assert args.log_format == "json"


def test_uvicorn_backstop_sits_above_the_bridges_own_bounds() -> None:
    from casledger.http_bridge.app import BridgeSettings
    from casledger.http_bridge.server import bridge_config

    config = bridge_config(BridgeSettings(max_in_flight=10, max_watchers=20))

    assert config.limit_concurrency is not None
    assert config.limit_concurrency > 10 + 20
    assert config.log_config is None  # uvicorn's lines go through casledger's format


def test_gate_admits_work_by_its_units_and_oversized_work_only_alone() -> None:
    gate = Gate(4)

    assert gate.try_enter(3)
    assert not gate.try_enter(2)  # 3 + 2 > 4: refused whole, nothing taken
    assert gate.in_flight == 3
    assert gate.try_enter()
    gate.leave(3)
    assert not gate.try_enter(10)  # larger than the limit: only alone
    gate.leave()
    assert gate.try_enter(10)
    assert gate.in_flight == 4
    assert not gate.try_enter()
    gate.leave(10)
    assert gate.in_flight == 0
    assert gate.try_enter(0)  # an empty Batch still takes a slot
    assert gate.in_flight == 1
