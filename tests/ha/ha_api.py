"""Home Assistant's REST API, for tests/ha_real.rs: standard library only.

    ha_api.py BASE onboard                 -> prints an access token (creates the owner user)
    ha_api.py BASE TOKEN METHOD PATH [JSON] -> prints the response body (exit 1 on HTTP >= 400)
"""
import json
import sys
import urllib.error
import urllib.parse
import urllib.request


def call(base, token, method, path, body=None, form=None):
    headers = {}
    data = None
    if token:
        headers["Authorization"] = "Bearer " + token
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def onboard(base):
    client_id = base + "/"
    status, text = call(base, None, "POST", "/api/onboarding/users", {
        "client_id": client_id, "name": "Test", "username": "test", "password": "test-password",
        "language": "en"})
    if status >= 400:
        sys.exit(f"onboarding: HTTP {status}: {text}")
    code = json.loads(text)["auth_code"]
    status, text = call(base, None, "POST", "/auth/token", form={
        "grant_type": "authorization_code", "code": code, "client_id": client_id})
    if status >= 400:
        sys.exit(f"token: HTTP {status}: {text}")
    print(json.loads(text)["access_token"])


def main():
    base = sys.argv[1]
    if sys.argv[2] == "onboard":
        return onboard(base)
    token, method, path = sys.argv[2:5]
    body = json.loads(sys.argv[5]) if len(sys.argv) > 5 else None
    status, text = call(base, token, method, path, body)
    sys.stdout.write(text)
    if status >= 400:
        sys.stderr.write(f"HTTP {status}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
