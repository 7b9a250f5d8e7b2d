"""``ldm-serve client txt2img | img2img | inpaint | jobs | watch | cancel | models``: a running server's client.

Talks to ``--url`` (``$LDM_URL``, default http://127.0.0.1:8000) with ``--api-key``
(``$LDM_API_KEY``). Submitting prints the job id, follows the job (queue position while
queued, then one bar of steps per image, from the job's server-sent events) and writes
the images as ``<job id>-<index>-seed<seed>.<ext>``. ``--no-wait`` only submits; ``--json``
prints JSON for scripts. Ctrl-C asks whether to cancel the job on the server
(``--cancel-on-interrupt``: cancel without asking). Exit codes: 0 done, 1 the job failed or
the server could not be reached, 2 the server refused the request (4xx; its message is
printed), 130 interrupted.

Import-light on purpose: httpx and tqdm, never torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launcher.progress import JobProgress, add_progress_args, progress_enabled

if TYPE_CHECKING:
    from launcher.remote import Remote

POLL_S = 0.5  # how often a queued job's position is read
RECONNECTS = 5  # event-stream reconnections (with Last-Event-ID) before giving up
EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED = 1, 2, 130
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


class Interrupted(Exception):
    """Ctrl-C while following a job (after the cancel question was answered)."""


def _remote(args: argparse.Namespace) -> Remote:
    from launcher.remote import DEFAULT_URL, Remote

    url = args.url or os.environ.get("LDM_URL") or DEFAULT_URL
    key = args.api_key if args.api_key is not None else os.environ.get("LDM_API_KEY")
    return Remote(url, key or None)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# --------------------------------------------------------------------------------------------------
# following a job
# --------------------------------------------------------------------------------------------------


def watch_job(remote: Remote, job_id: str, progress: JobProgress) -> dict[str, Any]:
    """Follow a job to its end: poll its queue position while queued, then read its events.

    Returns:
        The final job view (the ``done`` event's data).
    """
    from launcher.remote import ServerError

    while True:
        job = remote.job(job_id)
        if job["status"] != "queued":
            break
        progress.queued(job.get("queue_position"))
        time.sleep(POLL_S)
    last: str | None = None
    started = False
    for _ in range(RECONNECTS):
        try:
            for event, event_id, data in remote.events(job_id, last):
                last = event_id or last
                if event == "progress":
                    progress.step(int(data["step"]), int(data["total"]))
                elif event == "image":
                    progress.image_done(int(data["index"]))
                elif event == "status" and data.get("status") == "running":
                    started = True
                elif event == "status" and data.get("status") == "queued" and started:
                    progress.queued(None)  # requeued (its worker was lost)
                elif event == "done":
                    return data
        except ServerError as exc:
            if exc.status:  # the server answered an error: no point reconnecting
                raise
        time.sleep(1.0)
    return remote.job(job_id)


def _on_interrupt(remote: Remote, job_id: str, args: argparse.Namespace) -> None:
    """Ask (or, with --cancel-on-interrupt, don't ask) whether to cancel the job, and do it."""
    cancel = args.cancel_on_interrupt
    if not cancel:
        print(f"\ninterrupted: cancel job {job_id} on the server? [y/N] ", end="", file=sys.stderr, flush=True)
        try:
            answer = sys.stdin.readline()
        except KeyboardInterrupt:
            answer = ""
        cancel = answer.strip().lower() in ("y", "yes")
    if cancel:
        remote.reopen()
        view = remote.cancel(job_id)
        state = "canceled" if view["status"] == "canceled" else f"cancel requested (status {view['status']})"
        print(f"job {job_id}: {state}", file=sys.stderr, flush=True)
    else:
        print(f"job {job_id} keeps running; follow it with: ldm-serve client watch {job_id}", file=sys.stderr)


def follow(remote: Remote, view: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """:func:`watch_job` with progress bars; Ctrl-C goes through :func:`_on_interrupt`, then raises Interrupted."""
    enabled = progress_enabled(args.progress, args.quiet)
    progress = JobProgress(enabled, int(view["parameters"]["n"]), list(view.get("seeds") or []))
    try:
        try:
            return watch_job(remote, view["id"], progress)
        finally:
            progress.close()
    except KeyboardInterrupt:
        _on_interrupt(remote, view["id"], args)
        raise Interrupted from None


def save_images(remote: Remote, view: dict[str, Any], out_dir: str) -> list[dict[str, Any]]:
    """Write the job's images as ``<job id>-<index>-seed<seed>.<ext>`` in ``out_dir``."""
    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    ext = _EXTENSIONS.get(view["parameters"]["output_format"], "img")
    files = []
    for image in view["images"]:
        path = target / f"{view['id']}-{image['index']}-seed{image['seed']}.{ext}"
        path.write_bytes(remote.image(image["url"]))
        files.append({"index": image["index"], "seed": image["seed"], "path": str(path)})
    return files


def finish(remote: Remote, view: dict[str, Any], args: argparse.Namespace) -> int:
    """Follow a job, save its images and report; the command's exit code."""
    try:
        final = follow(remote, view, args)
    except Interrupted:
        return EXIT_INTERRUPTED
    files = save_images(remote, final, args.out_dir) if final["status"] == "succeeded" else []
    if args.json:
        _print_json({**final, "files": files})
    else:
        for f in files:
            print(f"{f['path']}  seed={f['seed']}")
    if final["status"] != "succeeded":
        reason = (final.get("error") or {}).get("message", "")
        print(f"error: job {final['id']} {final['status']}" + (f": {reason}" if reason else ""), file=sys.stderr)
        return EXIT_FAILED
    return 0


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------

_FIELDS = ("prompt", "negative_prompt", "n", "seed", "steps", "guidance_scale", "eta", "width", "height",
           "model", "output_format", "priority")


def _request_body(args: argparse.Namespace) -> dict[str, Any]:
    body = {name: getattr(args, name) for name in _FIELDS}
    if args.metadata:
        try:
            body["metadata"] = json.loads(args.metadata)
        except ValueError:
            raise SystemExit(f"error: --metadata is not valid JSON: {args.metadata[:60]!r}") from None
    return body


def _submit(args: argparse.Namespace, path: str, files: dict[str, bytes] | None = None, **extra: Any) -> int:
    remote = _remote(args)
    try:
        view = remote.submit(path, {**_request_body(args), **extra}, files=files)
        if args.json and args.no_wait:
            _print_json(view)
        else:
            print(f"job {view['id']}", flush=True)
        if args.no_wait:
            return 0
        return finish(remote, view, args)
    finally:
        remote.close()


def _cmd_txt2img(args: argparse.Namespace) -> int:
    return _submit(args, "/v1/txt2img")


def _cmd_inpaint(args: argparse.Namespace) -> int:
    files = {"image": Path(args.image).read_bytes(), "mask": Path(args.mask).read_bytes()}
    return _submit(args, "/v1/inpaint", files, mask_resize=args.mask_resize or None)


def _cmd_img2img(args: argparse.Namespace) -> int:
    return _submit(args, "/v1/img2img", {"image": Path(args.image).read_bytes()}, strength=args.strength)


def _cmd_watch(args: argparse.Namespace) -> int:
    return _query(args, lambda r: finish(r, r.job(args.job_id), args))


def _query(args: argparse.Namespace, call: Any) -> Any:
    """``call(remote)`` on a client of the server, closed afterwards."""
    remote = _remote(args)
    try:
        return call(remote)
    finally:
        remote.close()


def _cmd_cancel(args: argparse.Namespace) -> int:
    view = _query(args, lambda r: r.cancel(args.job_id))
    if args.json:
        _print_json(view)
    else:
        print(f"{view['id']}  {view['status']}" + ("  (cancel requested)" if view["cancel_requested"] else ""))
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    page = _query(args, lambda r: r.jobs(args.limit, args.status))
    if args.json:
        _print_json(page)
        return 0
    for job in page["data"]:
        p = job["progress"]
        print(f"{job['id']}  {job['status']:<9} {job['kind']:<8} {job['model']}  step {p['step']}/{p['total']}"
              f"  {job['created_at']}  {job['parameters']['prompt'][:40]!r}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    models = _query(args, lambda r: r.models())
    if args.json:
        _print_json(models)
        return 0
    for m in models["data"]:
        note = "  UNTRAINED" if m.get("untrained") else ""
        print(f"{m['id']}  workers={m['workers']}  default_size={m.get('default_size')}{note}")
    return 0


def _refusals(func: Any) -> Any:
    """Run a client command; a server error prints the server's message and exits 2 (4xx) or 1."""

    def run(args: argparse.Namespace) -> int:
        from launcher.remote import ServerError

        try:
            return int(func(args) or 0)
        except ServerError as exc:
            where = f"HTTP {exc.status}" if exc.status else "no answer"
            print(f"error: {exc} ({where})", file=sys.stderr)
            return EXIT_REFUSED if 400 <= exc.status < 500 else EXIT_FAILED

    return run


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server URL (default: $LDM_URL, else http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="bearer API key (default: $LDM_API_KEY)")
    common.add_argument("--json", action="store_true", help="print JSON on stdout (for scripts)")
    return common


def _following() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out-dir", default=".", help="where to write <job id>-<index>-seed<seed>.<ext> (default: .)")
    p.add_argument("--cancel-on-interrupt", action="store_true", help="Ctrl-C cancels the job without asking")
    add_progress_args(p)
    return p


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--n", type=int, help="number of images")
    p.add_argument("--seed", type=int, help="seed of image 0 (image i uses seed + i; default random)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--eta", type=float)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--model", help="model id (ldm-serve client models)")
    p.add_argument("--output-format", choices=["png", "jpeg", "webp"])
    p.add_argument("--priority", choices=["high", "normal", "low"])
    p.add_argument("--metadata", help="JSON object echoed back in the job")
    p.add_argument("--no-wait", action="store_true", help="submit, print the job id and exit")


def add_commands(sub: Any) -> None:
    """Add ``client`` and its subcommands to the ``ldm-serve`` parser."""
    client = sub.add_parser("client", help="talk to a running server: submit, follow, list and cancel jobs",
                            description=__doc__.split("\n\n")[1])
    csub = client.add_subparsers(dest="client_command", required=True)
    common, following = _common(), _following()

    t2i = csub.add_parser("txt2img", parents=[common, following], help="submit a text-to-image job and follow it")
    _job_args(t2i)
    t2i.set_defaults(func=_refusals(_cmd_txt2img))

    i2i = csub.add_parser("img2img", parents=[common, following], help="submit an image-to-image job and follow it")
    _job_args(i2i)
    i2i.add_argument("--image", required=True, help="init image (PNG / JPEG / WebP)")
    i2i.add_argument("--strength", type=float, help="in (0, 1]: how far from the image to go (server default 0.75)")
    i2i.set_defaults(func=_refusals(_cmd_img2img))

    inp = csub.add_parser("inpaint", parents=[common, following], help="submit an inpainting job and follow it")
    _job_args(inp)
    inp.add_argument("--image", required=True, help="PNG / JPEG / WebP file")
    inp.add_argument("--mask", required=True, help="white = repaint; the image's size")
    inp.add_argument("--mask-resize", action="store_true", help="resize the mask to the image's size")
    inp.set_defaults(func=_refusals(_cmd_inpaint))

    watch = csub.add_parser("watch", parents=[common, following], help="follow a job and save its images")
    watch.add_argument("job_id")
    watch.set_defaults(func=_refusals(_cmd_watch))

    cancel = csub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(func=_refusals(_cmd_cancel))

    jobs = csub.add_parser("jobs", parents=[common], help="list your jobs, newest first")
    jobs.add_argument("--status", action="append", choices=["queued", "running", "succeeded", "failed",
                                                             "canceled", "expired"], help="repeatable")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.set_defaults(func=_refusals(_cmd_jobs))

    models = csub.add_parser("models", parents=[common], help="the models the server serves")
    models.set_defaults(func=_refusals(_cmd_models))
