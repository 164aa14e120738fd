"""Starting Ray for a simulated round: one more try when its GCS server or raylet misses Ray's 30 s.

Ray's own start cannot be made slow on demand, so `ray.init` is replaced here by one
that fails the ways Ray does (`RuntimeError: Timed out waiting for file .../gcs_server_port_...`,
and a bare `Exception: The current node timed out during startup...` from `ray._private.node`).
"""

from __future__ import annotations

from typing import Any

import pytest

ray = pytest.importorskip("ray")

from free_common.bench.simulate import ray_backend_config, ray_running  # noqa: E402

_MISSED = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0f"
_RAYLET_LATE = (
    "The current node timed out during startup. This could happen because some of the"
    " raylet failed to startup or the GCS has become overloaded."
)


def _fake_ray(monkeypatch: pytest.MonkeyPatch, failures: list[str | Exception]) -> list[str]:
    calls: list[str] = []

    def init(**kwargs: Any) -> None:
        calls.append(f"init {sorted(kwargs['runtime_env'])} {kwargs['num_cpus']}")
        if failures:
            failure = failures.pop(0)
            raise failure if isinstance(failure, Exception) else RuntimeError(failure)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return calls


def test_a_ray_that_misses_its_start_is_started_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_ray(monkeypatch, [_MISSED])
    with ray_running(ray_backend_config(2)):
        assert calls == ["init ['env_vars'] 2", "shutdown", "init ['env_vars'] 2"]
    assert calls[-1] == "shutdown"  # and down again once the run is over


def test_a_raylet_that_registers_late_is_started_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_ray(monkeypatch, [Exception(_RAYLET_LATE)])
    with ray_running(ray_backend_config(2)):
        assert calls == ["init ['env_vars'] 2", "shutdown", "init ['env_vars'] 2"]


def test_a_ray_that_misses_it_twice_fails_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_ray(monkeypatch, [_MISSED, _MISSED])
    with pytest.raises(RuntimeError, match="Timed out waiting"), ray_running(ray_backend_config(2)):
        pass
    assert calls.count("init ['env_vars'] 2") == 2


def test_any_other_failure_to_start_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_ray(monkeypatch, ["Maybe you called ray.init twice by accident?"])
    with pytest.raises(RuntimeError, match="twice"), ray_running(ray_backend_config(2)):
        pass
    assert calls == ["init ['env_vars'] 2"]
