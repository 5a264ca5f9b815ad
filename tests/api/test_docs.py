"""`/docs` and `/redoc` work offline: every file they load is this server's own, behind the key guard."""

import re
import tempfile

import pytest
from fastapi.testclient import TestClient

from api.app import create_api
from api.auth import COOKIE
from workers.settings import Settings

KEY = "docs-test-key"
# The page's references: attributes and the URLs the inline script passes to Swagger UI.
REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)|url:\s*['"]([^'"]+)|spec-url=["']([^"']+)""")


def _references(page: str) -> list[str]:
    return [next(g for g in match.groups() if g) for match in REFERENCE.finditer(page)]


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_api(Settings(storage_dir=tempfile.mkdtemp(), api_keys=frozenset({KEY}))))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_this_servers_files(client, page):
    client.cookies.set(COOKIE, KEY)  # a browser logged in at /login
    answer = client.get(page)
    assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]
    urls = _references(answer.text)
    assert any(url.endswith(".js") for url in urls) and "/openapi.json" in urls
    assert [url for url in urls if not url.startswith("/")] == []  # no CDN, no font service
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert not re.search(r"https?://", answer.text)  # nothing the pattern missed either


def test_docs_and_their_files_need_the_key_like_every_page(client):
    client.cookies.clear()
    for path in ("/docs", "/docs-assets/swagger-ui-bundle.js", "/openapi.json"):
        assert client.get(path).status_code == 401, path
    assert client.get("/docs-assets/swagger-ui.css", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
