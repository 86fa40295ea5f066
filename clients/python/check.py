"""Drives twilio-python (Debian's python3-twilio) through cacheproxy,
replacing the Conversations domain's base URL and recording what the
sidecar answered. cacheproxy's Go tests run it
(internal/proxy/twiliopython_test.go) with CACHEPROXY_URL, ACCOUNT_SID,
AUTH_TOKEN, CONV, MEMBER and LIST_COUNT set.

It lists a conversation's participants (pages of two, followed through
next_page_url as given) twice: the second pass must be answered from the
cache, every page; an update between passes must be seen by the next.
"""
import json
import os
import sys

from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client


class Recording(TwilioHttpClient):
    """The default HTTP client, recording each answer's Cache-Status."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def request(self, method, url, **kwargs):
        res = super().request(method, url, **kwargs)
        self.seen.append({"method": method, "url": url, "status": res.status_code,
                          "cache_status": res.headers.get("Cache-Status", "")})
        return res


def env(k):
    v = os.environ.get(k)
    if not v:
        raise SystemExit("missing environment variable " + k)
    return v


def main():
    base = env("CACHEPROXY_URL")
    http = Recording()
    client = Client(env("ACCOUNT_SID"), env("AUTH_TOKEN"), http_client=http)
    client.conversations.base_url = base + "/conversations"
    conv, member, count = env("CONV"), env("MEMBER"), int(env("LIST_COUNT"))
    participants = client.conversations.v1.conversations(conv).participants

    first = participants.list(page_size=2)
    assert len(first) == count, (len(first), count)
    for s in http.seen:
        assert s["url"].startswith(base), "a page went around the sidecar: " + s["url"]
    mark = len(http.seen)
    second = participants.list(page_size=2)
    assert [p.sid for p in second] == [p.sid for p in first]
    again = http.seen[mark:]
    assert len(again) >= 3, again
    for s in again:
        assert s["cache_status"].startswith("cacheproxy; hit; ttl="), s
    participants(member).update(attributes='{"v":"python"}')
    third = participants.list(page_size=2)
    assert [p.attributes for p in third if p.sid == member] == ['{"v":"python"}'], [p.attributes for p in third]
    print(json.dumps({"ok": True, "requests": len(http.seen)}))


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("assertion failed:", repr(e), file=sys.stderr)
        raise
