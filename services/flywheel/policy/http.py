"""HTTP front end of the policy: TGI-compatible routes on the service's aiohttp app, and the strict
JSON helpers that the OpenAI-compatible routes (`flywheel.policy.openai_routes`) share.

TGI (text-generation-inference's router): `POST /` (a list, or SSE when `stream`),
`POST /generate`, `POST /generate_stream` (SSE, `data:{json}` events), `GET /info`, and
`/health` from ServiceServer. JSON shapes and validation messages follow TGI's so that
`text_generation.Client` / `AsyncClient` work unchanged; error bodies are TGI's
`{"error", "error_type"}` with 422 / 429 / 503 (error_middleware), as TGI also answers on
its OpenAI routes.

Every request body is checked strictly: an unknown field is a 422 naming the known ones.
Answers carry `interaction_id`, `policy_version` and `feedback_token` as extra JSON fields and
as `x-flywheel-*` headers (a stream's headers leave before the version is known, so a stream
has the interaction id in its headers and all three in its last event). The end user is the
`x-flywheel-user-id` header (OpenAI: the `user` field), "anonymous" by default; give feedback
with the same user_id, the feedback token is bound to it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from flywheel.core import errors
from flywheel.core.server import ServiceServer
from flywheel.policy.requests import GenerationRequest, TokenEvent
from flywheel.policy.service import PolicyService, Served, new_id

H_ID, H_VERSION, H_TOKEN, H_USER = (
    "x-flywheel-interaction-id",
    "x-flywheel-policy-version",
    "x-flywheel-feedback-token",
    "x-flywheel-user-id",
)
TGI_BODY = ("inputs", "parameters", "stream")
TGI_PARAMS = (
    "adapter_id best_of decoder_input_details details do_sample frequency_penalty grammar max_new_tokens "
    "repetition_penalty return_full_text seed stop temperature top_k top_n_tokens top_p truncate typical_p watermark"
).split()
bad = errors.InvalidArgument


# ---------------------------------------------------------------------------- strict JSON helpers
async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the body is not valid JSON ({e}): send a JSON object") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def strict(obj: dict[str, Any], known: tuple[str, ...] | list[str], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise bad(f"unknown field(s) {', '.join(map(repr, unknown))} in {where}: the fields are {', '.join(known)}")


def number(obj: dict[str, Any], name: str, kind: type = float) -> Any:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and not float(v).is_integer()):
        raise bad(f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)[:40]}")
    return kind(v)


def flag(obj: dict[str, Any], name: str, default: bool = False) -> bool:
    v = obj.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"`{name}` must be true or false, got {json.dumps(v)[:40]}")
    return v


def stops(obj: dict[str, Any], name: str) -> list[str]:
    v = obj.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(f"`{name}` must be a string or a list of strings")
    return list(v)


def unsupported(obj: dict[str, Any], name: str, ok: Callable[[Any], bool], fix: str) -> None:
    v = obj.get(name)
    if v is not None and not ok(v):
        raise bad(f"`{name}` = {json.dumps(v)[:60]} is not supported by this server: {fix}")


def user_of(service: PolicyService, request: web.Request, fallback: str | None = None) -> str:
    caller = service.auth.caller(request.headers)
    return request.headers.get(H_USER) or fallback or (caller.who if caller.who != "anonymous" else "anonymous")


def id_headers(s: Served) -> dict[str, str]:
    return {H_ID: s.interaction_id, H_VERSION: str(s.result.version), H_TOKEN: s.feedback_token}


def extras(s: Served) -> dict[str, Any]:
    return {"interaction_id": s.interaction_id, "policy_version": s.result.version, "feedback_token": s.feedback_token}


# ---------------------------------------------------------------------------- TGI
def tgi_request(body: dict[str, Any]) -> tuple[GenerationRequest, dict[str, Any]]:
    """GenerationRequest from TGI's {inputs, parameters, stream}, with TGI's validation rules."""
    strict(body, TGI_BODY, "the request")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise bad("`inputs` must be a string: the prompt")
    if not inputs.strip():
        raise bad("`inputs` cannot be empty: send some text")
    p = body.get("parameters") or {}
    if not isinstance(p, dict):
        raise bad("`parameters` must be a JSON object")
    strict(p, TGI_PARAMS, "parameters")
    t, top_p, top_k = number(p, "temperature"), number(p, "top_p"), number(p, "top_k", int)
    rep, max_new, seed = number(p, "repetition_penalty"), number(p, "max_new_tokens", int), number(p, "seed", int)
    if t is not None and t <= 0:
        raise bad(f"`temperature` must be strictly positive (got {t}): leave it unset for greedy decoding")
    if top_p is not None and not 0 < top_p < 1:
        raise bad(f"`top_p` must be > 0.0 and < 1.0 (got {top_p}): leave it unset to turn it off")
    if top_k is not None and top_k <= 0:
        raise bad(f"`top_k` must be strictly positive (got {top_k}): leave it unset to turn it off")
    if rep is not None and rep <= 0:
        raise bad(f"`repetition_penalty` must be strictly positive (got {rep}): 1.0 means no penalty")
    if max_new is not None and max_new <= 0:
        raise bad(f"`max_new_tokens` must be strictly positive (got {max_new})")
    if seed is not None and not 0 <= seed < 2**64:
        raise bad(f"`seed` must be an integer from 0 to 2**64-1 (got {seed})")
    unsupported(p, "best_of", lambda v: v == 1, "leave it unset or 1 (call again for more answers)")
    unsupported(p, "decoder_input_details", lambda v: v is False, "leave it false")
    unsupported(p, "frequency_penalty", lambda v: v == 0, "use repetition_penalty")
    for name in ("grammar", "top_n_tokens", "truncate", "typical_p", "adapter_id"):
        unsupported(p, name, lambda v: False, "leave it unset")
    unsupported(p, "watermark", lambda v: v is False, "leave it false")
    sampling = flag(p, "do_sample") or (t is not None and t != 1.0) or top_k is not None or top_p is not None
    req = GenerationRequest(
        prompt=inputs,
        max_new_tokens=max_new,
        temperature=(t or 1.0) if sampling else 0.0,
        top_p=top_p or 1.0,
        top_k=top_k or 0,
        repetition_penalty=rep or 1.0,
        seed=seed,
        stop=stops(p, "stop"),
        do_sample=sampling,
        logprobs=True,
    )
    opts = {
        "details": flag(p, "details"),
        "full": flag(p, "return_full_text"),
        "stream": flag(body, "stream"),
        "sampling": sampling,
    }
    return req, opts


def tgi_token(ev: TokenEvent) -> dict[str, Any]:
    t = ev.token
    if t is None:
        return {"id": 0, "text": ev.text, "logprob": None, "special": False}
    return {"id": t.id, "text": ev.text, "logprob": t.logprob, "special": t.special}


def tgi_answer(req: GenerationRequest, s: Served, opts: dict[str, Any]) -> dict[str, Any]:
    r = s.result
    out: dict[str, Any] = {"generated_text": (req.prompt if opts["full"] else "") + r.text}
    if opts["details"]:
        out["details"] = {
            "finish_reason": r.finish_reason,
            "generated_tokens": r.generated_tokens,
            "seed": r.seed if opts["sampling"] else None,
            "prefill": [],
            "tokens": [{"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special} for t in r.tokens],
            "top_tokens": None,
            "best_of_sequences": None,
        }
    return out | extras(s)


def sse(obj: Any) -> bytes:
    return b"data:" + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def stream_sse(
    request: web.Request,
    events: AsyncIterator[tuple[TokenEvent, Served | None]],
    iid: str,
    render: Callable[[int, TokenEvent, Served | None], list[Any]],
    done: bytes | None = None,
) -> web.StreamResponse:
    """Send `events` as SSE. The first event is awaited before the headers, so a refused request
    still gets its 422/429/503; later errors become a TGI error event. A client that goes away
    closes the engine stream, which frees the slot."""
    async with contextlib.aclosing(events):
        first = await anext(events)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", H_ID: iid})
        await resp.prepare(request)
        i = 0
        try:
            item: tuple[TokenEvent, Served | None] | None = first
            while item is not None:
                for obj in render(i, *item):
                    await resp.write(sse(obj))
                i += 1
                item = await anext(events, None)
            if done is not None:
                await resp.write(done)
        except (ConnectionResetError, ConnectionError):
            return resp  # the client went away; aclosing frees the slot
        except errors.FlywheelError as e:
            await resp.write(sse(e.http_body()))
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp


def add_tgi_routes(app: web.Application, service: PolicyService) -> None:
    """Register the TGI routes of `service` on the server's aiohttp app (before start)."""

    async def generate(request: web.Request, as_list: bool = False) -> web.StreamResponse:
        req, opts = tgi_request(await read_json(request))
        if opts["stream"]:
            return await tgi_stream(request, req, opts)
        s = await service.generate(req, user_of(service, request))
        body = tgi_answer(req, s, opts)
        return web.json_response([body] if as_list else body, headers=id_headers(s))

    async def tgi_stream(request: web.Request, req: GenerationRequest, opts: dict[str, Any]) -> web.StreamResponse:
        iid = new_id()
        events = service.stream(req, user_of(service, request), interaction_id=iid)

        def render(i: int, ev: TokenEvent, s: Served | None) -> list[Any]:
            out: dict[str, Any] = {"index": i, "token": tgi_token(ev), "top_tokens": None}
            out["generated_text"] = out["details"] = None
            if s is not None:
                r = s.result
                out["generated_text"] = (req.prompt if opts["full"] else "") + r.text
                seed = r.seed if opts["sampling"] else None
                out["details"] = {
                    "finish_reason": r.finish_reason,
                    "generated_tokens": r.generated_tokens,
                    "seed": seed,
                }
                out |= extras(s)
            return [out]

        return await stream_sse(request, events, iid, render)

    async def root(request: web.Request) -> web.StreamResponse:
        return await generate(request, as_list=True)

    async def generate_stream(request: web.Request) -> web.StreamResponse:
        req, opts = tgi_request(await read_json(request))
        return await tgi_stream(request, req, opts)

    async def info(request: web.Request) -> web.Response:
        i = service.info()
        return web.json_response(
            {
                "model_id": i["model"],
                "model_sha": None,
                "model_dtype": i["dtype"],
                "model_device_type": i["device"],
                "model_pipeline_tag": "text-generation",
                "max_concurrent_requests": i["max_concurrent_sequences"] + i["max_queue"],
                "max_best_of": 1,
                "max_stop_sequences": 16,
                "max_input_tokens": i["max_input_tokens"],
                "max_total_tokens": i["max_context_tokens"],
                "max_batch_size": i["max_concurrent_sequences"],
                "router": "flywheel-policy",
                "version": "flywheel",
                "sha": None,
                "docker_label": None,
                "policy_version": i["version"],
                "running_sequences": i["running"],
                "waiting_requests": i["waiting"],
                "spooled_interactions": i["spooled_interactions"],
                "last_swap_error": i["last_swap_error"],
            }
        )

    async def health_details(request: web.Request) -> web.Response:
        i = service.info()
        server: ServiceServer | None = next((v for v in request.app.values() if isinstance(v, ServiceServer)), None)
        ok = bool(i["ready"]) and (server is None or server.serving)
        status = "serving" if ok else "not_serving"
        body = {"status": status, "policy_version": i["version"], "last_swap_error": i["last_swap_error"]}
        body |= {"spooled_interactions": i["spooled_interactions"], "running": i["running"], "waiting": i["waiting"]}
        return web.json_response(body, status=200 if ok else 503)

    r = app.router
    r.add_post("/", root)
    r.add_post("/generate", generate)
    r.add_post("/generate_stream", generate_stream)
    r.add_get("/info", info)
    r.add_get("/health/details", health_details)
