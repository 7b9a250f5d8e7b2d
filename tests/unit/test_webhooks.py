"""Standard Webhooks signing/verification, webhook target (SSRF) rules, backoff and event helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timezone

import httpx
import pytest

from ldm_serve import webhooks as wh
from ldm_serve.errors import InvalidInput, WebhookVerificationError

# Example from the Standard Webhooks specification / reference libraries (external vector).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


def _independent_signature(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    key = base64.b64decode(secret.split("_", 1)[1])
    mac = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


# -- signing ---------------------------------------------------------------------------------------


def test_sign_matches_spec_example():
    assert wh.sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIGNATURE


def test_sign_matches_independent_hmac_for_random_secret():
    secret = wh.generate_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "j1", "prompt": "ünïcode"}}).encode()
    assert wh.sign(secret, "msg_abc", 1700000000, body) == _independent_signature(
        secret, "msg_abc", 1700000000, body
    )


def test_sign_matches_standardwebhooks_package():
    standardwebhooks = pytest.importorskip("standardwebhooks.webhooks")
    secret = wh.generate_secret()
    body = '{"a":1,"b":"two"}'
    ts = 1700000123
    reference = standardwebhooks.Webhook(secret).sign(
        "msg_x", datetime.fromtimestamp(ts, tz=timezone.utc), body
    )
    assert wh.sign(secret, "msg_x", ts, body.encode()) == reference


def test_standardwebhooks_package_verifies_our_headers():
    standardwebhooks = pytest.importorskip("standardwebhooks.webhooks")
    secret = wh.generate_secret()
    body = wh.encode_event(wh.WebhookEvent("job.started", {"id": "j1"}))
    headers = wh.build_headers(secret, wh.new_webhook_id(), int(datetime.now().timestamp()), body)
    payload = standardwebhooks.Webhook(secret).verify(body, headers)
    assert payload["type"] == "job.started" and payload["data"] == {"id": "j1"}


@pytest.mark.parametrize(
    "secret",
    ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not*base64!", "whsec_" + base64.b64encode(b"short").decode()],
)
def test_malformed_secret_is_refused(secret):
    with pytest.raises(InvalidInput, match="webhook_secret"):
        wh.sign(secret, "m", 1, b"")


def test_headers_carry_one_signature_per_secret():
    old, new = wh.generate_secret(), wh.generate_secret()
    headers = wh.build_headers([old, new], "msg_1", 123, b"{}")
    assert headers["webhook-id"] == "msg_1" and headers["webhook-timestamp"] == "123"
    assert headers["webhook-signature"].split(" ") == [
        _independent_signature(old, "msg_1", 123, b"{}"),
        _independent_signature(new, "msg_1", 123, b"{}"),
    ]


# -- verification ----------------------------------------------------------------------------------


def _spec_headers(signature: str = SPEC_SIGNATURE) -> dict[str, str]:
    return {"Webhook-Id": SPEC_ID, "Webhook-Timestamp": str(SPEC_TS), "Webhook-Signature": signature}


def test_verify_accepts_spec_example_case_insensitively():
    wh.verify(SPEC_SECRET, _spec_headers(), SPEC_BODY, now=SPEC_TS + 10)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda h, b: (h, b + b" "), "no webhook-signature matches"),
        (lambda h, b: ({**h, "Webhook-Id": "msg_other"}, b), "no webhook-signature matches"),
        (lambda h, b: ({**h, "Webhook-Signature": "v1,AAAA"}, b), "no webhook-signature matches"),
        (
            lambda h, b: ({**h, "Webhook-Signature": SPEC_SIGNATURE.replace("v1,", "v2,")}, b),
            "no webhook-signature",
        ),
        (lambda h, b: ({k: v for k, v in h.items() if k != "Webhook-Signature"}, b), "missing header"),
        (lambda h, b: ({**h, "Webhook-Timestamp": "soon"}, b), "not a unix time"),
    ],
)
def test_verify_rejects_tampering(mutate, match):
    headers, body = mutate(_spec_headers(), SPEC_BODY)
    with pytest.raises(WebhookVerificationError, match=match):
        wh.verify(SPEC_SECRET, headers, body, now=SPEC_TS)


def test_verify_rejects_wrong_secret():
    with pytest.raises(WebhookVerificationError):
        wh.verify(wh.generate_secret(), _spec_headers(), SPEC_BODY, now=SPEC_TS)


def test_verify_timestamp_tolerance():
    wh.verify(SPEC_SECRET, _spec_headers(), SPEC_BODY, now=SPEC_TS + 299)
    with pytest.raises(WebhookVerificationError, match="older than 300"):
        wh.verify(SPEC_SECRET, _spec_headers(), SPEC_BODY, now=SPEC_TS + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        wh.verify(SPEC_SECRET, _spec_headers(), SPEC_BODY, now=SPEC_TS - 301)
    wh.verify(SPEC_SECRET, _spec_headers(), SPEC_BODY, tolerance_s=10_000, now=SPEC_TS + 5000)


def test_verify_key_rotation_any_signature_any_secret():
    rotated = f"v1,bm90IGEgc2lnbmF0dXJl v1a,xyz {SPEC_SIGNATURE}"
    wh.verify(SPEC_SECRET, _spec_headers(rotated), SPEC_BODY, now=SPEC_TS)
    wh.verify([wh.generate_secret(), SPEC_SECRET], _spec_headers(), SPEC_BODY, now=SPEC_TS)


# -- target rules ----------------------------------------------------------------------------------


def _public(host: str, port: int) -> list[str]:
    return [PUBLIC_V4, PUBLIC_V6]


@pytest.mark.parametrize(
    ("url", "rule"),
    [
        ("ftp://example.com/x", "scheme must be http or https"),
        ("javascript:alert(1)", "scheme must be http or https"),
        ("http:///path", "must include a host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com@10.0.0.1/", "credentials"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://exa mple.com/", "spaces or control"),
        ("http://example.com/\n", "spaces or control"),
        ("http://bad_host!.com/", "not a valid hostname"),
        # IPv4 literals
        ("http://127.0.0.1/", "loopback"),
        ("http://10.1.2.3/", "private"),
        ("http://192.168.0.10:8080/", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://224.0.0.1/", "multicast"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://240.0.0.1/", "reserved"),
        ("http://100.64.0.1/", "non-global"),
        # decimal / octal / hex / short forms of 127.0.0.1
        ("http://2130706433/", "non-canonical numeric"),
        ("http://0x7f000001/", "non-canonical numeric"),
        ("http://0177.0.0.1/", "non-canonical numeric"),
        ("http://127.1/", "non-canonical numeric"),
        ("http://0x7f.0.0.1/", "non-canonical numeric"),
        # IPv6 literals
        ("http://[::1]/", "loopback"),
        ("http://[::]/", "unspecified"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fe80::1%25eth0]:8000/", "link-local"),
        ("http://[fc00::5]/", "private"),
        ("http://[ff02::1]/", "multicast"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped loopback"),
        ("http://[::ffff:a9fe:a9fe]/", "IPv4-mapped link-local"),
        ("http://[64:ff9b::10.0.0.1]/", "NAT64-embedded private"),
        ("http://[2002:7f00:1::1]/", "6to4-embedded loopback"),
        # names of this machine
        ("http://localhost:8000/hook", "names this machine"),
        ("http://api.localhost/hook", "names this machine"),
    ],
)
def test_refused_targets_name_the_rule(url, rule):
    with pytest.raises(InvalidInput, match=rule) as info:
        wh.validate_webhook_url(url, resolve=_public)
    assert info.value.field == "webhook.url"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/hooks?a=1#frag", "https://example.com/hooks?a=1"),
        ("HTTP://Example.COM:8443", "http://example.com:8443/"),
        (f"http://{PUBLIC_V4}/x", f"http://{PUBLIC_V4}/x"),
        (f"http://[{PUBLIC_V6.upper()}]:81/x", f"http://[{PUBLIC_V6}]:81/x"),
        ("https://bücher.example/h", "https://xn--bcher-kva.example/h"),
        ("http://[::ffff:93.184.216.34]/", "http://[::ffff:5db8:d822]/"),
    ],
)
def test_public_targets_are_accepted_and_normalised(url, expected):
    assert wh.validate_webhook_url(url, resolve=_public) == expected


@pytest.mark.parametrize(
    ("answers", "rule"),
    [
        (["10.0.0.7"], "resolves to 10.0.0.7, not a public address \\(private\\)"),
        ([PUBLIC_V4, "127.0.0.1"], "loopback"),  # one bad answer is enough (rebinding across records)
        (["::1"], "loopback"),
        (["fe80::1%2"], "link-local"),
        (["::ffff:192.168.1.1"], "IPv4-mapped private"),
        ([], "does not resolve"),
    ],
)
def test_hostnames_are_judged_by_what_they_resolve_to(answers, rule):
    calls = []

    def resolve(host, port):
        calls.append((host, port))
        return answers

    with pytest.raises(InvalidInput, match=rule):
        wh.validate_webhook_url("https://hooks.example.net/x", resolve=resolve)
    assert calls == [("hooks.example.net", 443)]


def test_resolution_failure_is_refused():
    def resolve(host, port):
        raise OSError("Name or service not known")

    with pytest.raises(InvalidInput, match="does not resolve"):
        wh.validate_webhook_url("http://nx.example.org/", resolve=resolve)


def test_allow_private_skips_address_rules_but_not_syntax_rules():
    def no_dns(host, port):
        raise AssertionError("no DNS lookup expected")

    for url in ("http://127.0.0.1:9000/h", "http://[::1]/", "http://localhost/", "http://intranet.corp/"):
        assert wh.validate_webhook_url(url, allow_private=True, resolve=no_dns)
    for url in ("ftp://127.0.0.1/", "http://u:p@127.0.0.1/", "http://2130706433/"):
        with pytest.raises(InvalidInput):
            wh.validate_webhook_url(url, allow_private=True, resolve=no_dns)


def test_length_limit():
    url = "https://example.com/" + "a" * 2100
    with pytest.raises(InvalidInput, match="longer than 2048"):
        wh.validate_webhook_url(url, resolve=_public)
    assert wh.validate_webhook_url(url, resolve=_public, max_length=4096) == url


def test_check_target_records_checked_addresses():
    target = wh.check_webhook_target("https://hooks.example.net:8443/x", resolve=_public)
    assert (target.scheme, target.host, target.port) == ("https", "hooks.example.net", 8443)
    assert target.addresses == (PUBLIC_V4, PUBLIC_V6)


# -- delivery pieces (no network) ------------------------------------------------------------------


def test_post_signed_connects_to_the_checked_address():
    """DNS rebinding: the request goes to the address that passed the check, with the real Host/SNI."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    target = wh.check_webhook_target("https://hooks.example.net:8443/x?y=1", resolve=_public)
    outcome = wh.post_signed(
        target, b"{}", {"webhook-id": "m"}, timeout_s=1.0, transport=httpx.MockTransport(handler)
    )
    assert outcome.ok and outcome.status_code == 204 and outcome.error is None
    (request,) = seen
    assert request.url.host == PUBLIC_V4 and request.url.port == 8443 and request.url.query == b"y=1"
    assert request.headers["host"] == "hooks.example.net:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.net"
    assert request.content == b"{}"


def test_post_signed_reports_errors_and_retry_after_without_raising():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def throttle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": "7"})

    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "http://127.0.0.1/"})

    target = wh.check_webhook_target("http://127.0.0.1:1/", allow_private=True)
    failed = wh.post_signed(target, b"{}", {}, timeout_s=1.0, transport=httpx.MockTransport(refuse))
    assert not failed.ok and failed.status_code is None and "ConnectError" in failed.error
    throttled = wh.post_signed(target, b"{}", {}, timeout_s=1.0, transport=httpx.MockTransport(throttle))
    assert (throttled.ok, throttled.status_code, throttled.retry_after_s) == (False, 429, 7.0)
    moved = wh.post_signed(target, b"{}", {}, timeout_s=1.0, transport=httpx.MockTransport(redirect))
    assert (moved.ok, moved.status_code) == (False, 302)  # redirects are not followed


def test_backoff_doubles_is_capped_and_honours_retry_after():
    config = wh.DeliveryConfig(base_delay_s=2.0, max_delay_s=30.0, jitter=0.1)
    mid = lambda: 0.5  # noqa: E731  (no jitter)
    assert [wh.backoff_delay(n, config, rng=mid) for n in (1, 2, 3, 4, 5, 6)] == [2, 4, 8, 16, 30, 30]
    assert wh.backoff_delay(1, config, rng=lambda: 0.0) == pytest.approx(1.8)
    assert wh.backoff_delay(1, config, rng=lambda: 1.0) == pytest.approx(2.2)
    assert wh.backoff_delay(1, config, rng=mid, retry_after_s=20) == 20
    assert wh.backoff_delay(1, config, rng=mid, retry_after_s=3600) == 30


def test_delivery_rechecks_the_url_and_refuses_without_sending(monkeypatch):
    """A URL that passed at submission (allow_private then) is re-checked when delivered."""
    monkeypatch.setattr(wh.delivery, "_config", wh.DeliveryConfig(secret=wh.generate_secret(), allow_private=False))
    record = wh.deliver_webhook(
        url="http://127.0.0.1:9/hook",
        event=wh.WebhookEvent("job.succeeded", {"id": "j1"}).to_dict(),
        webhook_id="msg_1",
        job_id="j1",
    )
    assert record["result"] == "refused" and "loopback" in record["error"] and record["status_code"] is None


def test_delivery_without_a_secret_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(wh.delivery, "_config", wh.DeliveryConfig())
    with pytest.raises(RuntimeError, match="configure_delivery"):
        wh.deliver_webhook(url="http://127.0.0.1/", event={"type": "job.started"}, webhook_id="m", job_id="j")


def test_configure_delivery_validates_the_secret(monkeypatch):
    monkeypatch.setattr(wh.delivery, "_config", wh.DeliveryConfig())
    with pytest.raises(InvalidInput, match="webhook_secret"):
        wh.configure_delivery(wh.DeliveryConfig(secret="not-a-secret"))


# -- events ----------------------------------------------------------------------------------------


def test_event_envelope_and_encoding():
    event = wh.WebhookEvent("job.progress", {"id": "j1", "progress": {"step": 3, "total": 10}})
    payload = json.loads(wh.encode_event(event))
    assert payload["type"] == "job.progress" and payload["data"]["progress"] == {"step": 3, "total": 10}
    assert datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    assert wh.encode_event(event) == wh.encode_event(event.to_dict())
    with pytest.raises(InvalidInput, match="unknown event type"):
        wh.WebhookEvent("prediction.completed", {})


def test_event_filter():
    assert wh.event_selected("job.progress", None)
    assert wh.event_selected("job.progress", [])
    assert wh.event_selected("job.progress", ["progress"])
    assert wh.event_selected("job.progress", ["job.progress"])
    assert not wh.event_selected("job.progress", ["started", "completed"])
    for terminal in ("job.succeeded", "job.failed", "job.canceled", "job.expired"):
        assert wh.event_selected(terminal, ["completed"])
    assert not wh.event_selected("job.failed", ["succeeded"])


def test_delivery_jobs_queued_under_the_old_path_still_resolve() -> None:
    """RQ stores the function's dotted path; jobs queued before the split named ``ldm_serve.webhooks``."""
    from rq.utils import import_attribute

    assert wh.DELIVER_FUNC == "ldm_serve.webhooks.delivery.deliver_webhook"
    assert import_attribute(wh.DELIVER_FUNC) is import_attribute("ldm_serve.webhooks.deliver_webhook")
