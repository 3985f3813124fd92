"""Each part's report as one JSON message on an MQTT topic (paho-mqtt, QoS 1 by default).

paho's network thread connects in the background and reconnects by itself (0.2 s to 5 s apart) while the broker
is away; messages handed to it wait in its session and are sent when it is back. This publisher's own thread
hands them over from the bounded queue (publish/base.py) and keeps at most `window` of them unacknowledged at
paho, so a long outage fills the bounded queue (oldest dropped, counted) rather than memory.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt

from filo_line.publish.base import Item, QueuedDelivery
from filo_line.report import PartReport


def _connect_args(url: str) -> tuple[str, int, bool, str | None, str | None]:
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    port = parts.port or (8883 if tls else 1883)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname or "127.0.0.1", port, tls, user, password


def _client(client_id: str, url: str) -> mqtt.Client:
    _, _, tls, user, password = _connect_args(url)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if user:
        client.username_pw_set(user, password)
    if tls:
        client.tls_set()
    return client


def shown_url(url: str) -> str:
    """The URL without its password, for logs and --check."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}"


class MqttPublisher:
    kind = "mqtt"

    def __init__(self, url: str, topic: str, qos: int = 1, client_id: str | None = None, capacity: int = 10_000,
                 window: int = 200, on_state: Callable[[bool], None] | None = None,
                 on_drop: Callable[[], None] | None = None) -> None:
        self.url = url
        self.topic = topic
        self.qos = qos
        self.target = f"{shown_url(url)} topic {topic}"
        self._window = window
        self._on_state = on_state
        self._connected = threading.Event()
        self._unacked = 0
        self._lock = threading.Lock()
        self.delivered = 0
        self._client = _client(client_id or f"filo-line-{os.getpid()}-{id(self):x}", url)
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=5)
        self._client.on_connect = self._connect_cb
        self._client.on_disconnect = self._disconnect_cb
        self._client.on_publish = self._publish_cb
        self._queue = QueuedDelivery(f"mqtt-{topic}", self._deliver, capacity, on_drop=on_drop)

    # --- paho's callbacks (its network thread) ---

    def _connect_cb(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self._connected.set()
            with self._lock:
                self._unacked = 0  # paho resends what it held; those acks come back as new publishes count
            if self._on_state:
                self._on_state(True)

    def _disconnect_cb(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if self._on_state:
            self._on_state(False)

    def _publish_cb(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._unacked = max(0, self._unacked - 1)
            self.delivered += 1

    # --- the interface ---

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def dropped(self) -> int:
        return self._queue.dropped

    def start(self) -> None:
        host, port, _, _, _ = _connect_args(self.url)
        self._client.connect_async(host, port, keepalive=30)
        self._client.loop_start()
        self._queue.start()

    def publish(self, report: PartReport, image: bytes | None) -> None:
        self._queue.put((report, None))

    def _deliver(self, item: Item) -> bool:
        with self._lock:
            if self._unacked >= self._window:
                return False
        payload = json.dumps(item[0].message(), separators=(",", ":"))
        info = self._client.publish(self.topic, payload, qos=self.qos)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho holds it for later
            return False
        with self._lock:
            self._unacked += 1
        return True

    def stop(self, flush_s: float = 2.0) -> None:
        end = time.monotonic() + flush_s
        self._queue.stop(flush_s)
        while self.connected and self._unacked and time.monotonic() < end:
            time.sleep(0.02)
        self._client.disconnect()
        self._client.loop_stop()

    def check(self, timeout_s: float = 5.0) -> str:
        """Connect once with a client of its own and wait for the broker's CONNACK."""
        host, port, _, _, _ = _connect_args(self.url)
        probe = _client(f"filo-line-check-{os.getpid()}", self.url)
        answered = threading.Event()
        result: dict[str, object] = {}

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            result["code"] = reason_code
            answered.set()

        probe.on_connect = on_connect
        probe.connect_timeout = timeout_s
        probe.connect(host, port, keepalive=10)  # OSError when nothing listens
        end = time.monotonic() + timeout_s
        try:
            while not answered.is_set() and time.monotonic() < end:
                probe.loop(timeout=0.1)
        finally:
            probe.disconnect()
        if not answered.is_set():
            raise TimeoutError(f"broker {shown_url(self.url)}: no CONNACK within {timeout_s:.0f} s")
        code = result["code"]
        if getattr(code, "is_failure", False):
            raise RuntimeError(f"broker {shown_url(self.url)} refused the connection: {code}")
        return f"broker {self.target}: connected"
