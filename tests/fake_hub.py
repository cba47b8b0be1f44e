"""A local stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub's create_repo,
create_branch and upload_folder (every file inline, no LFS): it records each request it gets."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.fail_commit_with: int | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.commits: list[dict] = []
        self.validated: list[str] = []
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                     "body": body})
                return body

            def do_GET(self):
                self._record()
                if self.path.startswith("/api/whoami"):
                    return self._reply(200, {"name": "quantgate-test", "type": "user", "auth": {}})
                self._reply(404, {"error": f"not found: {self.path}"})

            def do_POST(self):
                body = self._record()
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.path.startswith("/api/repos/create"):
                    spec = json.loads(body)
                    return self._reply(200, {"url": f"{hub.endpoint}/{spec.get('organization')}/{spec['name']}",
                                             "name": spec["name"]})
                if self.path.startswith("/api/validate-yaml"):
                    # The Hub checks a README's front matter before the commit; so does this.
                    import yaml
                    content = json.loads(body)["content"]
                    try:
                        front = yaml.safe_load(content.split("---\n", 2)[1]) if content.startswith("---\n") else {}
                        errors = [] if isinstance(front, dict) else [{"message": "front matter is not a mapping"}]
                    except yaml.YAMLError as e:
                        errors = [{"message": str(e)}]
                    hub.validated.append(content)
                    return self._reply(400 if errors else 200, {"errors": errors, "warnings": []})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if parts[:2] == ["api", "models"] and "branch" in parts:
                    return self._reply(200, {})
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    if hub.fail_commit_with:
                        return self._reply(hub.fail_commit_with, {"error": "planted failure"})
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                             for line in lines if line["key"] == "file"}
                    repo = "/".join(parts[2:parts.index("commit")])
                    hub.commits.append({"repo": repo, "revision": parts[-1], "header": header, "files": files})
                    return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/abc123",
                                             "commitOid": "abc123" + "0" * 34, "success": True})
                self._reply(404, {"error": f"not found: {self.path}"})

        return Handler
