"""LLM-drafted descriptions against a real local HTTP server standing in for the chat endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from descriptions import load_file
from service.api.app import create_app
from service.backends.redis_queue import RedisBackend
from service.catalog.llm import LLMError, parse_descriptions
from service.cli import main as cli_main
from tests.service_fixtures import ServerThread, demo_settings, redis_server, redis_url  # noqa: F401


@dataclass
class FakeLLM:
    url: str
    content: str = '["scratched surface", "torn edge", "missing bolt"]'
    status: int = 200
    seen: list[dict] = field(default_factory=list)


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    state = FakeLLM(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": state.content}}]})
            out = payload.encode() if state.status == 200 else b'{"error": "overloaded"}'
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_parse_descriptions() -> None:
    assert parse_descriptions('```json\n["a dent.", "a dent", "Rust"]\n```', 5) == ["a dent", "Rust"]
    assert parse_descriptions("1. crack\n- chip\n* stain.", 2) == ["crack", "chip"]
    with pytest.raises(LLMError, match="no usable"):
        parse_descriptions("   ", 3)


def test_describe_writes_a_draft(llm: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("FILO_LLM_API_KEY", "sk-local")
    monkeypatch.setenv("FILO_LLM_MODEL", "tiny-llm")
    out = tmp_path / "gasket.json"
    rc = cli_main(["describe", "gasket", "--noun", "rubber gasket", "--count", "3", "--out", str(out),
                   "--llm-base-url", llm.url])
    assert rc == 0
    assert "status: draft" in capsys.readouterr().out
    (req,) = llm.seen
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-local"
    assert req["body"]["model"] == "tiny-llm" and "rubber gasket" in req["body"]["messages"][-1]["content"]
    (category,) = load_file(out).categories  # a valid descriptions file, marked for review
    assert category.status == "draft" and category.noun == "rubber gasket"
    assert list(category.descriptions) == ["scratched surface", "torn edge", "missing bolt"]


def test_describe_reports_llm_failure(llm: FakeLLM, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    llm.status = 503
    rc = cli_main(["describe", "gasket", "--out", str(tmp_path / "g.json"), "--llm-base-url", llm.url])
    assert rc == 1 and "503" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


@pytest.mark.redis
def test_put_with_generate_returns_a_draft_only(llm: FakeLLM, redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    settings = demo_settings(redis_url=redis_url, llm_base_url=llm.url, state_dir=tmp_path)
    with ServerThread(create_app(settings, RedisBackend(settings))) as srv:
        r = httpx.put(f"{srv.url}/v1/categories/gasket", json={"generate": True, "count": 2}, timeout=30)
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "draft" and body["descriptions"] == ["scratched surface", "torn edge"]
        assert load_file(body["draft_path"]).categories[0].status == "draft"
        assert Path(body["draft_path"]).is_relative_to(tmp_path)
        # a draft is not inspectable until a person reviews and registers it
        assert httpx.get(f"{srv.url}/v1/categories/gasket", timeout=30).status_code == 404
        llm.status = 500
        r = httpx.put(f"{srv.url}/v1/categories/gasket", json={"generate": True}, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "llm_failed"
