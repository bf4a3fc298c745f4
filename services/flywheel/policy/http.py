"""HTTP front end of the policy: TGI-compatible routes on the service's aiohttp app (the
OpenAI-compatible ones are in openai_routes.py; both check bodies with http_validation.py and
answer with http_answers.py).

TGI (text-generation-inference's router): `POST /` (a list, or SSE when `stream`),
`POST /generate`, `POST /generate_stream` (SSE, `data:{json}` events), `GET /info`, and
`/health` from ServiceServer. JSON shapes and validation messages follow TGI's so that
`text_generation.Client` / `AsyncClient` work unchanged; error bodies are TGI's
`{"error", "error_type"}` with 422 / 429 / 503 (error_middleware), as TGI also answers on
its OpenAI routes. Ours on top: `POST /generate_pair`, TGI's body (not streamed) plus an optional
`candidate_version`, answered with two answers and the pair's token: gRPC GeneratePair over HTTP,
through the same PolicyService.pair (same validation, same candidate rule).

Every request body is checked strictly: an unknown field is a 422 naming the known ones.
Answers carry `interaction_id`, `policy_version` and `feedback_token` as extra JSON fields and
as `x-flywheel-*` headers (a stream's headers leave before the version is known, so a stream
has the interaction id in its headers and all three in its last event). The end user is the
`x-flywheel-user-id` header (OpenAI: the `user` field), by default a session's user, else the API
key's name or "anonymous" (a session refuses any other user: core/sessions.py); give feedback with
the same user_id and the same API key: the feedback token is bound to the user in the key's
namespace (core.auth.Caller.scoped_user_id).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from flywheel.core.server import ServiceServer
from flywheel.policy.http_answers import extras, id_headers, stream_sse, user_of
from flywheel.policy.http_validation import bad, flag, number, read_json, stops, strict, unsupported
from flywheel.policy.requests import GenerationRequest, TokenEvent
from flywheel.policy.service import PolicyService, Served, new_id

TGI_BODY = ("inputs", "parameters", "stream")
PAIR_BODY = ("inputs", "parameters", "candidate_version")
TGI_PARAMS = (
    "adapter_id best_of decoder_input_details details do_sample frequency_penalty grammar max_new_tokens "
    "repetition_penalty return_full_text seed stop temperature top_k top_n_tokens top_p truncate typical_p watermark"
).split()


# ---------------------------------------------------------------------------- TGI
def tgi_request(body: dict[str, Any]) -> tuple[GenerationRequest, dict[str, Any]]:
    """GenerationRequest from TGI's {inputs, parameters, stream}, with TGI's validation rules."""
    strict(body, TGI_BODY, "the request")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise bad("`inputs` must be a string: the prompt")
    if not inputs.strip():
        raise bad("`inputs` cannot be empty: send some text")
    p = body.get("parameters")
    p = {} if p is None else p
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
        temperature=(1.0 if t is None else t) if sampling else 0.0,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        repetition_penalty=1.0 if rep is None else rep,
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


def pair_request(body: dict[str, Any]) -> tuple[GenerationRequest, dict[str, Any], int]:
    """The request, options and candidate_version of POST /generate_pair: TGI's body (tgi_request's
    rules) plus `candidate_version`; a pair is never streamed (both answers come at once)."""
    strict(body, PAIR_BODY, "the request")
    candidate = number(body, "candidate_version", int)
    req, opts = tgi_request({k: v for k, v in body.items() if k != "candidate_version"})
    return req, opts, candidate or 0


def tgi_token(ev: TokenEvent) -> dict[str, Any]:
    t = ev.token
    if t is None:
        return {"id": 0, "text": ev.text, "logprob": None, "special": False}
    return {"id": t.id, "text": ev.text, "logprob": t.logprob, "special": t.special}


def tgi_answer(req: GenerationRequest, s: Served, opts: dict[str, Any]) -> dict[str, Any]:
    r = s.result
    out: dict[str, Any] = {"generated_text": ((req.prompt or "") if opts["full"] else "") + r.text}
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


def add_tgi_routes(app: web.Application, service: PolicyService) -> None:
    """Register the TGI routes of `service` on the server's aiohttp app (before start)."""

    async def generate(request: web.Request, as_list: bool = False) -> web.StreamResponse:
        req, opts = tgi_request(await read_json(request))
        if opts["stream"]:
            return await tgi_stream(request, req, opts)
        user, caller = user_of(service, request)
        s = await service.generate(req, user, caller=caller)
        body = tgi_answer(req, s, opts)
        return web.json_response([body] if as_list else body, headers=id_headers(s))

    async def tgi_stream(request: web.Request, req: GenerationRequest, opts: dict[str, Any]) -> web.StreamResponse:
        iid = new_id()
        user, caller = user_of(service, request)
        events = service.stream(req, user, interaction_id=iid, caller=caller)

        def render(i: int, ev: TokenEvent, s: Served | None) -> list[Any]:
            out: dict[str, Any] = {"index": i, "token": tgi_token(ev), "top_tokens": None}
            out["generated_text"] = out["details"] = None
            if s is not None:
                r = s.result
                out["generated_text"] = ((req.prompt or "") if opts["full"] else "") + r.text
                seed = r.seed if opts["sampling"] else None
                out["details"] = {
                    "finish_reason": r.finish_reason,
                    "generated_tokens": r.generated_tokens,
                    "seed": seed,
                }
                out |= extras(s)
            return [out]

        return await stream_sse(request, events, iid, render)

    async def generate_pair(request: web.Request) -> web.Response:
        req, opts, candidate = pair_request(await read_json(request))
        user, caller = user_of(service, request)
        pair = await service.pair(req, user, candidate, caller=caller)
        body: dict[str, Any] = {"pair_id": pair.pair_id, "feedback_token": pair.feedback_token}
        for side, s in (("a", pair.a), ("b", pair.b)):
            body[side] = tgi_answer(req, s, opts) | {"finish_reason": s.result.finish_reason}
        return web.json_response(body)

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
    r.add_post("/generate_pair", generate_pair)
    r.add_get("/info", info)
    r.add_get("/health/details", health_details)
