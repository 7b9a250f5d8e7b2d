"""Key policies (ldm_serve.api_keys), signed URLs (ldm_serve.signed_urls) and model size bounds
(ldm_serve.model_limits): pure functions, no Redis."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ldm_serve.api_keys import hash_key, load_keyring
from ldm_serve.contract import GenerationPayload, JobKind
from ldm_serve.errors import ConfigError, InvalidInput
from ldm_serve.jobview import job_view
from ldm_serve.model_limits import check_size, model_constraints
from ldm_serve.settings import Settings, owner_of
from ldm_serve.signed_urls import sign_url, url_signer, verify
from tests.serving_support import ROOT

ALICE = hash_key("alice-key")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plain_keys_keep_working_with_the_default_policy() -> None:
    ring = load_keyring(Settings(api_keys="k1, k2", quota_concurrent_jobs=5, default_priority_high=False))
    assert ring.enabled and len(ring) == 2
    caller = ring.lookup("k1")
    assert caller is not None and caller.owner == owner_of("k1")
    assert caller.policy.concurrent_jobs == 5 and not caller.policy.priority_high and not caller.policy.admin
    assert ring.lookup("k3") is None


def test_no_keys_means_anonymous_default_policy() -> None:
    ring = load_keyring(Settings(max_job_pixel_steps=1000, quota_pixel_steps_per_minute=5000))
    assert not ring.enabled
    anon = ring.anonymous()
    assert anon.owner is None and anon.policy.max_job_pixel_steps == 1000


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_keys_file_holds_hashed_keys_with_their_own_policies(tmp_path: Path, suffix: str) -> None:
    entries = [
        {"name": "alice", "sha256": ALICE, "concurrent_jobs": 2, "priority_high": True},
        {"name": "ops", "sha256": hash_key("ops-key"), "admin": True, "requests_per_minute": 0},
    ]
    if suffix == ".json":
        text = json.dumps({"keys": entries})
    else:
        text = "\n".join(
            "[[keys]]\n" + "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
                                     for k, v in e.items()) for e in entries
        )
    path = write(tmp_path, "keys" + suffix, text)
    ring = load_keyring(Settings(api_keys_file=path, api_keys="plain", quota_requests_per_minute=77))
    alice = ring.lookup("alice-key")
    assert alice is not None and alice.owner == owner_of("alice-key")
    assert alice.policy.name == "alice" and alice.policy.concurrent_jobs == 2 and alice.policy.priority_high
    assert alice.policy.requests_per_minute == 77  # omitted: the default
    ops = ring.lookup("ops-key")
    assert ops is not None and ops.policy.admin and ops.policy.requests_per_minute == 0
    assert ring.lookup("plain") is not None
    assert ring.lookup(ALICE) is None  # the hash itself is not a key
    assert "alice-key" not in path.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps({"keys": [{"name": "a", "sha256": "nothex"}]}), "sha256"),
        (json.dumps({"keys": [{"name": "a", "sha256": ALICE, "admn": True}]}), "admn"),
        (json.dumps({"keys": []}), "keys"),
        (json.dumps({"keys": [{"name": "a", "sha256": ALICE}, {"name": "b", "sha256": ALICE}]}), "twice"),
        (json.dumps({"keys": [{"name": "a", "sha256": ALICE, "max_job_pixel_steps": 10, "pixel_steps_per_minute": 5}]}),
         "could never be admitted"),
        ("{not json", "not valid json"),
    ],
)
def test_bad_keys_files_are_refused_at_start(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_keyring(Settings(api_keys_file=write(tmp_path, "keys.json", text)))


def test_missing_keys_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_keyring(Settings(api_keys_file=tmp_path / "absent.toml"))


def test_hash_key_command_prints_a_keys_file_entry() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "hash-key", "--name", "alice"], input="alice-key\n",
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout
    assert f'sha256 = "{ALICE}"' in out and 'name = "alice"' in out


def test_signed_urls_verify_until_they_expire() -> None:
    now = 1_800_000_000.0
    url = sign_url("https://api.example.com/", "s" * 32, "/v1/jobs/abc/images/0", 300, now=now)
    assert url.startswith("https://api.example.com/v1/jobs/abc/images/0?expires=")
    query = dict(p.split("=") for p in url.split("?")[1].split("&"))
    expires, sig = int(query["expires"]), query["signature"]
    assert expires >= now + 300 and expires % 60 == 0
    assert verify("s" * 32, "/v1/jobs/abc/images/0", expires, sig, now=now) is None
    assert verify("s" * 32, "/v1/jobs/abc/images/1", expires, sig, now=now) == "does not match this URL"
    assert verify("s" * 32, "/v1/jobs/abc/images/0", expires + 60, sig, now=now) == "does not match this URL"
    assert verify("t" * 32, "/v1/jobs/abc/images/0", expires, sig, now=now) == "does not match this URL"
    assert verify("s" * 32, "/v1/jobs/abc/images/0", expires, sig, now=expires + 1) == "has expired"


def test_signed_urls_need_a_secret_and_are_off_by_default() -> None:
    assert url_signer(Settings()) is None
    with pytest.raises(ValueError, match="url_signing_secret"):
        Settings(public_base_url="https://x.example")


def test_job_view_links_are_signed_when_enabled() -> None:
    payload = GenerationPayload(
        job_id="abc", kind=JobKind.TXT2IMG, model="m", prompt="p", n=2, width=64, height=64, steps=2,
        guidance_scale=5.0, seeds=[1, 2], created_at=time.time(),
    )
    rec = {"status": "succeeded", "payload": payload.model_dump_json(), "image:0": "1", "image:1": "1"}
    plain = job_view(rec)
    assert [i["url"] for i in plain["images"]] == ["/v1/jobs/abc/images/0", "/v1/jobs/abc/images/1"]
    signer = url_signer(Settings(public_base_url="https://api.example.com", url_signing_secret="x" * 16))
    signed = job_view(rec, signer=signer)
    assert all(i["url"].startswith(f"https://api.example.com/v1/jobs/abc/images/{i['index']}?expires=")
               and "&signature=" in i["url"] for i in signed["images"])
    assert signed["links"]["events"].startswith("https://api.example.com/v1/jobs/abc/events?expires=")


def test_model_size_bound_is_twice_the_default_size_within_the_settings() -> None:
    c = model_constraints(64, 32, Settings())
    assert (c.size_multiple, c.min_side, c.max_width, c.max_height) == (32, 64, 128, 128)
    capped = model_constraints(512, 64, Settings(max_width=768, max_height=640))
    assert (capped.max_width, capped.max_height) == (768, 640)
    explicit = model_constraints(64, 8, Settings(model_max_side=100))
    assert explicit.max_width == 96  # rounded down to the multiple
    check_size("m", [c], 128, 64)
    with pytest.raises(InvalidInput, match="between 64 and 128 pixels for model 'm', got 1024") as err:
        check_size("m", [c], 1024, 64)
    assert err.value.field == "width"
    with pytest.raises(InvalidInput, match="multiple of 32") as err:
        check_size("m", [c], 64, 72)
    assert err.value.field == "height"
    check_size("m", [], 4096, 4096)  # no advertised constraints: the settings' bounds only
    # every live worker must be able to run it
    with pytest.raises(InvalidInput, match="between 64 and 96"):
        check_size("m", [c, model_constraints(64, 32, Settings(model_max_side=96))], 128, 64)
