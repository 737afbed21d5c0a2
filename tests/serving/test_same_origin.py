"""Cross-site request forgery: a page of another origin cannot make a visitor's browser post to the server (without
API keys, the loopback default, any page could reload the model and put its images into the audit log and the
drift window). Posts without an Origin (curl, scripts, gateways) and the server's own page are served."""
import base64
import http.server
import threading

import httpx
import pytest

from tests.conftest import free_port, require_shared
from tests.serving.conftest import xray_paths
from tests.serving.test_operations import metric
from tests.serving.test_page import make_browser


def post(url: str, path: str, headers: dict):
    files = {"file": ("x.jpeg", xray_paths(1)[0].read_bytes())} if path == "/predict" else None
    return httpx.post(f"{url}{path}", files=files, headers=headers, timeout=60)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:1", "http://127.0.0.1.evil.example",
                                    "http://localhost", "file://"])
@pytest.mark.parametrize("path", ["/predict", "/admin/reload"])
def test_a_post_from_another_origin_is_refused_in_one_line(server, origin, path):
    require_shared()
    url, _ = server
    response = post(url, path, {"Origin": origin})
    host = url.removeprefix("http://")
    assert response.status_code == 403 and response.json() == {
        "detail": f"cross-origin request refused: a page of {origin!r} may not post to this server (its Host is "
                  f"{host!r})"}
    assert response.headers["connection"] == "close" and response.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("origin", [None, "same", "same with a trailing slash", "HTTP://127.0.0.1:PORT"])
def test_a_post_without_origin_or_from_the_servers_own_pages_is_served(server, origin):
    require_shared()
    url, _ = server
    port = url.rsplit(":", 1)[1]
    headers = {} if origin is None else {"Origin": {"same": url, "same with a trailing slash": url + "/"}.get(
        origin, origin.replace("PORT", port))}
    response = post(url, "/predict", headers)
    assert response.status_code == 200 and 0 <= response.json()["probability"] <= 1, response.text
    by_name = post(url, "/predict", {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"})
    assert by_name.status_code == 200, by_name.text


def test_a_page_of_another_origin_in_a_real_browser_reaches_the_server_and_is_refused(server, tmp_path):
    """What a visitor's browser does with a hostile page: a no-cors POST of an image and of a reload."""
    require_shared()
    url, _ = server
    image = base64.b64encode(xray_paths(1)[0].read_bytes()).decode()
    (tmp_path / "index.html").write_text(f"""<!doctype html><title>page</title><script>
const bytes = Uint8Array.from(atob("{image}"), c => c.charCodeAt(0));
const form = new FormData(); form.append("file", new Blob([bytes], {{type: "image/jpeg"}}), "x.jpeg");
Promise.allSettled([fetch("{url}/predict", {{method: "POST", mode: "no-cors", body: form}}),
                    fetch("{url}/admin/reload", {{method: "POST", mode: "no-cors"}})])
  .then(() => {{ document.title = "sent"; }});
</script>""")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    page_server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=page_server.serve_forever, daemon=True).start()
    before = httpx.get(f"{url}/metrics").text
    images_before = httpx.get(f"{url}/health").json()["drift"]["images"]
    browser = make_browser(tmp_path)
    try:
        browser.get(f"http://127.0.0.1:{page_server.server_address[1]}/index.html")
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(browser, 30).until(lambda b: b.title == "sent")
    finally:
        browser.quit()
        page_server.shutdown()
    after = httpx.get(f"{url}/metrics").text
    for endpoint in ("/predict", "/admin/reload"):
        name = f'pneumonia_cnn_http_requests_total{{endpoint="{endpoint}",status="403"}}'
        assert metric(after, name) == metric(before, name) + 1, endpoint
    assert metric(after, "pneumonia_cnn_model_reloads_total") == metric(before, "pneumonia_cnn_model_reloads_total")
    assert httpx.get(f"{url}/health").json()["drift"]["images"] == images_before


@pytest.mark.parametrize("host, origins, served", [
    ("127.0.0.1", ["http://127.0.0.1"], True),  # no port on either: the scheme's (80)
    ("example.org", ["https://example.org:443"], True),
    ("example.org:443", ["https://example.org"], True),
    ("example.org", ["http://example.org:8080"], False),
    ("Example.ORG.", ["http://example.org"], True),  # a name's case and trailing dot do not make another host
    ("[::1]:8000", ["http://[::1]:8000"], True),
    ("[::1]:8000", ["http://[::2]:8000"], False),
    ("127.0.0.1:8000", ["http://127.0.0.1:8000", "https://evil.example"], False),  # every Origin must be ours
    ("127.0.0.1:8000", ["http://127.0.0.1:8000:1"], False),  # no port number at all
    ("127.0.0.1:8000", [], True),
])
def test_which_origin_is_the_servers_own(host, origins, served):
    import asyncio

    from pneumonia_cnn.serving.origin import SameOriginMiddleware
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    headers = [(b"host", host.encode())] + [(b"origin", origin.encode()) for origin in origins]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers, "query_string": b"",
             "root_path": ""}
    asyncio.run(SameOriginMiddleware(app)(scope, receive, send))
    assert bool(reached) == served
    assert served or next(m["status"] for m in sent if m["type"] == "http.response.start") == 403
