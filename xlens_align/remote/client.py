"""Talking to an NDIF server: host and key, the deployment check, and requests in bounded time.

nnsight's own `RemoteBackend` waits on its websocket without a timeout (a server that accepts
the connection and never answers hangs the caller forever) and reports a dropped stack as a
JSON parse error. `BoundedBackend` runs the same protocol with a connect timeout and an overall
deadline per request, and every failure becomes one of the `RemoteRunError` subclasses below,
each saying what happened, to which host and model, and what to do.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = [
    "BoundedBackend",
    "ConnectionLost",
    "ModelNotDeployed",
    "RemoteResultError",
    "RemoteRunError",
    "RemoteTimeout",
    "ServerError",
    "ServerUnreachable",
    "deployment_states",
    "model_status",
    "resolve_host",
    "translate",
]


class RemoteRunError(RuntimeError):
    """A remote run failed; the message names the host and the model."""


class ServerUnreachable(RemoteRunError, ConnectionError):
    """Nothing accepts connections at the host (wrong host or port, server down)."""


class RemoteTimeout(RemoteRunError, TimeoutError):
    """The server accepted the connection but did not answer within the time allowed."""


class ModelNotDeployed(RemoteRunError):
    """The host serves no running deployment of the model."""


class ServerError(RemoteRunError):
    """The server ran the request and reported an exception (its message is included)."""


class ConnectionLost(RemoteRunError):
    """The server, its API or the model's actor went away while a request was running."""


class RemoteResultError(RemoteRunError, ValueError):
    """A result came back with the wrong shape or with inf/NaN."""


def resolve_host(host: str | None, api_key: str | None) -> tuple[str, str]:
    """(host, api_key) from the arguments, else ``NDIF_HOST`` / ``NDIF_API_KEY``, else nnsight's
    configuration (the hosted NDIF)."""
    from nnsight import CONFIG

    host = host or os.environ.get("NDIF_HOST") or CONFIG.API.HOST
    if not isinstance(host, str) or not host.startswith(("http://", "https://")):
        raise ValueError(f"host must be an http:// or https:// URL of an NDIF server, got {host!r}")
    key = api_key if api_key is not None else os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or ""
    if not isinstance(key, str):
        raise TypeError(f"api_key must be a str, got {type(key).__name__}")
    return host.rstrip("/"), key


def _headers(api_key: str) -> dict[str, str]:
    return {"ndif-api-key": api_key} if api_key else {}


def deployment_states(host: str, api_key: str = "", timeout: float = 10.0) -> dict[str, str]:
    """{model_key: application state} of every deployment the host reports at ``/status``
    (e.g. ``RUNNING``, ``DEPLOYING``); raises `ServerUnreachable` / `RemoteTimeout`."""
    import httpx

    try:
        r = httpx.get(f"{host}/status", headers=_headers(api_key), timeout=httpx.Timeout(timeout))
        r.raise_for_status()
        body = r.json()
    except httpx.TimeoutException as e:
        raise RemoteTimeout(f"NDIF host {host} did not answer GET /status within {timeout:g} s") from e
    except httpx.HTTPStatusError as e:
        raise ServerError(f"NDIF host {host} answered GET /status with {e.response.status_code}") from e
    except (httpx.HTTPError, ValueError) as e:
        raise ServerUnreachable(f"cannot reach an NDIF server at {host} ({type(e).__name__}: {e})") from e
    states: dict[str, str] = {}
    for name, d in (body.get("deployments") or {}).items():
        if not isinstance(d, dict):
            continue
        key = d.get("model_key") or _key_of(name)
        state = str(d.get("application_state") or d.get("deployment_level") or "UNKNOWN")
        if states.get(key) != "RUNNING":  # several replicas: the healthiest wins
            states[key] = state
    return states


def _key_of(name: str) -> str:
    """The model key in a ``/status`` entry's name: ``<replica>:<actor class>:<model key>`` (ndif
    0.1.2) or the key itself."""
    parts = name.split(":", 2)
    if len(parts) == 3 and "." not in parts[0] and "." not in parts[1] and parts[2].startswith("nnsight."):
        return parts[2]
    return name


def model_status(model_key: str, host: str, api_key: str = "", timeout: float = 10.0) -> str:
    """The state of `model_key` on `host` (``RUNNING``, ``DEPLOYING``, ...) or ``NOT_DEPLOYED``."""
    return deployment_states(host, api_key, timeout).get(model_key, "NOT_DEPLOYED")


def _server_message(text: str) -> str:
    """The last non-empty lines of a server traceback (what went wrong, not where)."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return "\n".join(lines[-3:]) if lines else "(no message)"


def translate(e: BaseException, where: str) -> RemoteRunError | None:
    """The `RemoteRunError` for an exception raised by a remote trace (None: not a remote failure).

    `where` says which model on which host, for the message."""
    import websocket
    from nnsight.intervention.backends.remote import RemoteError
    from pydantic import ValidationError

    if isinstance(e, RemoteRunError):
        return e
    if isinstance(e, ConnectionRefusedError | ConnectionResetError) or (
        isinstance(e, OSError) and not isinstance(e, TimeoutError) and e.errno is not None
    ):
        return ServerUnreachable(f"{where}: cannot connect ({type(e).__name__}: {e}); is the server up?")
    if isinstance(e, websocket.WebSocketTimeoutException | TimeoutError):
        return RemoteTimeout(f"{where}: the server accepted the connection but did not answer ({e})")
    if isinstance(e, websocket.WebSocketConnectionClosedException | ValidationError):
        return ConnectionLost(
            f"{where}: the connection closed mid-request (server or API stopped?): {type(e).__name__}: {e}"
        )
    if isinstance(e, websocket.WebSocketException):
        return ConnectionLost(f"{where}: websocket failure: {type(e).__name__}: {e}")
    if isinstance(e, RemoteError):
        text = str(e)
        if "Could not deploy this model" in text or "not deployed" in text.lower():
            return ModelNotDeployed(f"{where}: the model is not deployed: {_server_message(text)}")
        if "Error submitting request to model deployment" in text or "temporarily unavailable" in text:
            return ConnectionLost(
                f"{where}: the model's deployment stopped or is restarting: {_server_message(text)}"
            )
        return ServerError(f"{where}: the server raised an exception: {_server_message(text)}")
    return None


def _backend_class() -> type:
    """`BoundedBackend`'s class, built on first use (nnsight's backend is imported lazily)."""
    from nnsight.intervention.backends.remote import RemoteBackend
    from nnsight.schema.response import ResponseModel, Status

    class _Bounded(RemoteBackend):
        """nnsight's blocking remote backend with a connect timeout and an overall deadline."""

        def __init__(
            self, model_key: str, host: str, api_key: str, env: dict, timeout: float, connect: float
        ):
            super().__init__(model_key, host=host, api_key=api_key, env=env)
            self.api_key = api_key  # "" stays "": no fallback to another configured key
            self.display.enabled = False  # no spinner: errors and results are reported by the caller
            self.timeout, self.connect = float(timeout), float(connect)
            self.deadline = float("inf")

        def _left(self, what: str) -> float:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise RemoteTimeout(
                    f"NDIF host {self.host}: no {what} within the timeout of {self.timeout:g} s"
                )
            return left

        def _post(self, request: Any, blob: bytes) -> Any:
            import httpx

            headers = {"ndif-timestamp": repr(time.time()), **_headers(self.api_key)}
            t = httpx.Timeout(self.connect, read=self._left("answer to POST /request"))
            try:
                r = httpx.post(
                    f"{self.host}/request",
                    data={"data": request.metadata()},
                    files={"blob": ("request", blob, "application/octet-stream")},
                    headers=headers,
                    timeout=t,
                )
            except httpx.TimeoutException as e:
                raise RemoteTimeout(f"NDIF host {self.host}: POST /request timed out ({e})") from e
            except httpx.HTTPError as e:
                raise ServerUnreachable(f"NDIF host {self.host}: POST /request failed ({e})") from e
            if r.status_code >= 400:
                try:
                    detail = r.json().get("detail", r.text)
                except ValueError:
                    detail = r.text
                from nnsight.intervention.backends.remote import RemoteError

                raise RemoteError(f"Failed to send request: {detail}")
            return ResponseModel.model_validate_json(r.text)

        def download_result(self, url: Any) -> Any:
            if isinstance(url, bytes | bytearray) or not url:
                return super().download_result(url)
            import httpx

            try:
                r = httpx.get(url, timeout=httpx.Timeout(self.connect, read=self._left("result download")))
                r.raise_for_status()
            except httpx.TimeoutException as e:
                raise RemoteTimeout(f"NDIF host {self.host}: the result download timed out ({e})") from e
            except httpx.HTTPError as e:
                raise ConnectionLost(
                    f"NDIF host {self.host}: the result could not be downloaded ({e})"
                ) from e
            return self.finalize(r.content)

        def request(self, request: Any, tracer: Any) -> Any:
            import websocket

            blob = self._serialize(tracer)
            self.deadline = time.monotonic() + self.timeout
            ws = websocket.create_connection(
                f"{self.ws_host}/subscribe",
                header=_headers(self.api_key) or None,
                timeout=min(self.connect, self._left("websocket connection")),
            )
            try:
                try:
                    first = ws.recv()
                except websocket.WebSocketTimeoutException as e:
                    raise RemoteTimeout(
                        f"NDIF host {self.host} accepted the connection but sent no session id "
                        f"within {self.connect:g} s: not an NDIF server, or a hung one"
                    ) from e
                try:  # an empty message: the API closed the socket (stopping mid-run)
                    request.session_id = json.loads(first)["session_id"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ConnectionLost(
                        f"NDIF host {self.host}: the websocket closed or sent no session id "
                        f"(got {str(first)[:80]!r}): server or API stopped?"
                    ) from e
                self.send(request, blob)
                while True:
                    ws.settimeout(min(1.0, self._left("result")))
                    try:
                        message = ws.recv()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if not message:
                        raise ConnectionLost(
                            f"NDIF host {self.host}: the websocket closed before the result "
                            "(server stopped mid-run?)"
                        )
                    response = self.parse(message)
                    result = self.handle(response)
                    if response.status == Status.COMPLETED:
                        return result
            finally:
                ws.close()

    return _Bounded


_BACKEND: type | None = None


def BoundedBackend(model_key: str, host: str, api_key: str, env: dict, timeout: float, connect: float) -> Any:  # noqa: N802
    """A blocking NDIF backend for one request: at most `connect` seconds to connect and get a
    session id, at most `timeout` seconds from sending to the result."""
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = _backend_class()
    return _BACKEND(model_key, host, api_key, env, timeout, connect)
