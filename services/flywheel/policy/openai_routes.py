"""OpenAI-compatible routes of the policy: `POST /v1/completions`, `POST /v1/chat/completions` (both
with `stream`, SSE chunks ending in `data: [DONE]`) and `GET /v1/models`, so the `openai` package
works unchanged. Bodies are checked as strictly as the TGI routes' (both use http_validation.py), with
OpenAI's ranges; the interaction id, version and feedback token ride as extra fields and headers.
The end user is `x-flywheel-user-id`, else the body's `user` (http_answers.user_of): with a session
bearer both must be the session's user or absent (403 otherwise).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from flywheel.core.http import shown
from flywheel.policy.http_answers import extras, id_headers, stream_sse, user_of
from flywheel.policy.http_validation import bad, flag, number, read_json, stops, strict, unsupported
from flywheel.policy.requests import GenerationRequest, TokenEvent
from flywheel.policy.service import PolicyService, Served, new_id

COMMON = "model max_tokens temperature top_p n stream stream_options stop seed user logprobs".split()
COMMON += "presence_penalty frequency_penalty logit_bias top_k repetition_penalty".split()
COMPLETION_FIELDS = (*COMMON, "prompt", "echo", "suffix", "best_of")
CHAT_FIELDS = (*COMMON, "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools")
CHAT_FIELDS += ("tool_choice", "parallel_tool_calls")
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def openai_request(body: dict[str, Any], chat: bool) -> tuple[GenerationRequest, dict[str, Any]]:
    """GenerationRequest from an OpenAI completions / chat body; OpenAI's ranges, precise 422s."""
    strict(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, "the request")
    t, top_p, top_k = number(body, "temperature"), number(body, "top_p"), number(body, "top_k", int)
    max_tokens = number(body, "max_completion_tokens", int) if chat else None
    max_tokens = max_tokens if max_tokens is not None else number(body, "max_tokens", int)
    t = 1.0 if t is None else t
    if not 0 <= t <= 2:
        raise bad(f"`temperature` must be between 0 and 2 (got {t}); 0 is greedy")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad(f"`top_p` must be in (0, 1] (got {top_p})")
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"`max_tokens` must be at least 1 (got {max_tokens})")
    seed = number(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**64:
        raise bad(f"`seed` must be an integer from 0 to 2**64-1 (got {seed})")
    unsupported(body, "n", lambda v: v == 1, "this server returns one choice per request: send n=1 or call again")
    unsupported(body, "best_of", lambda v: v == 1, "send best_of=1")
    for name in ("presence_penalty", "frequency_penalty"):
        unsupported(body, name, lambda v: v == 0, "use repetition_penalty (an extra field) instead")
    unsupported(body, "logit_bias", lambda v: v == {}, "leave it unset")
    unsupported(body, "suffix", lambda v: v == "", "leave it unset")
    unsupported(body, "tools", lambda v: v == [], "this model has no tool calling")
    unsupported(body, "tool_choice", lambda v: v == "none", "this model has no tool calling")
    unsupported(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text", "use text")
    unsupported(body, "top_logprobs", lambda v: v == 0, "only the chosen token's logprob is returned")
    so = body.get("stream_options")
    so = {} if so is None else so
    if not isinstance(so, dict):
        raise bad('`stream_options` must be an object such as {"include_usage": true}')
    strict(so, ("include_usage",), "stream_options")
    rep = number(body, "repetition_penalty")
    want_logprobs = body.get("logprobs")
    if chat:
        messages = chat_messages(body.get("messages"))
        prompt = None
        logprobs = flag(body, "logprobs")
    else:
        messages, prompt = None, completion_prompt(body.get("prompt"))
        if want_logprobs is not None and want_logprobs != 0:
            raise bad(f"`logprobs` = {shown(want_logprobs)} is not supported: leave it unset or 0")
        logprobs = False
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("`user` must be a string: the end user's id")
    req = GenerationRequest(
        prompt=prompt,
        messages=messages,
        max_new_tokens=16 if (max_tokens is None and not chat) else max_tokens,
        temperature=t,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        repetition_penalty=1.0 if rep is None else rep,
        seed=seed,
        stop=stops(body, "stop"),
        do_sample=t > 0,
        logprobs=logprobs,
    )
    opts = {
        "stream": flag(body, "stream"),
        "usage": flag(so, "include_usage"),
        "echo": flag(body, "echo"),
        "user": user,
        "model": body.get("model") if isinstance(body.get("model"), str) else None,
    }
    return req, opts


def completion_prompt(v: Any) -> str:
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if not isinstance(v, str):
        raise bad("`prompt` must be a string (or a list of one string): token arrays and batches are not supported")
    if not v.strip():
        raise bad("`prompt` is empty: send some text")
    return v


def chat_messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise bad("`messages` must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise bad(f'messages[{i}] must be an object such as {{"role": "user", "content": "..."}}')
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {shown(role)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad(f'messages[{i}].content: only text parts ({{"type": "text", "text": ...}}) are supported')
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string")
        out.append({"role": CHAT_ROLES[role], "content": content})
    return out


def usage(s: Served) -> dict[str, int]:
    r = s.result
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generated_tokens,
        "total_tokens": r.prompt_tokens + r.generated_tokens,
    }


def add_openai_routes(app: web.Application, service: PolicyService) -> None:
    """Register the OpenAI routes of `service` on the server's aiohttp app (before start)."""
    created = int(time.time())

    def model_id() -> str:
        return service.config.policy.model_name

    async def completions(request: web.Request, chat: bool) -> web.StreamResponse:
        req, opts = openai_request(await read_json(request), chat)
        user, caller = user_of(service, request, opts["user"])
        kind = "chat.completion" if chat else "text_completion"
        cid = ("chatcmpl-" if chat else "cmpl-") + new_id()
        head = {
            "id": cid,
            "object": kind,
            "created": int(time.time()),
            "model": opts["model"] or model_id(),
            "system_fingerprint": "flywheel",
        }
        prefix = (req.prompt or "") if (opts["echo"] and not chat) else ""
        if not opts["stream"]:
            s = await service.generate(req, user, caller=caller)
            r = s.result
            choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[r.finish_reason], "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": r.text}
                if req.logprobs:
                    toks = [t for t in r.tokens if not t.special]
                    choice["logprobs"] = {
                        "content": [
                            {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()), "top_logprobs": []}
                            for t in toks
                        ]
                    }
            else:
                choice["text"] = prefix + r.text
            body = head | {"choices": [choice], "usage": usage(s)} | extras(s)
            return web.json_response(body, headers=id_headers(s))

        iid = new_id()
        events = service.stream(req, user, interaction_id=iid, caller=caller)

        def render(i: int, ev: TokenEvent, s: Served | None) -> list[Any]:
            out = []
            if i == 0 and (chat or prefix):
                first = {"role": "assistant", "content": ""} if chat else None
                out.append(chunk(first, prefix))
            if ev.text:
                out.append(chunk({"content": ev.text} if chat else None, ev.text))
            if s is not None:
                last = chunk({} if chat else None, "", FINISH[s.result.finish_reason]) | extras(s)
                out.append(last)
                if opts["usage"]:
                    out.append(head | {"object": kind + ".chunk" if chat else kind, "choices": [], "usage": usage(s)})
            return out

        def chunk(delta: dict[str, Any] | None, text: str, finish: str | None = None) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = delta
            else:
                c["text"] = text
            return head | {"object": kind + ".chunk" if chat else kind, "choices": [c]}

        return await stream_sse(request, events, iid, render, done=b"data: [DONE]\n\n")

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await completions(request, chat=True)

    async def text_completions(request: web.Request) -> web.StreamResponse:
        return await completions(request, chat=False)

    async def models(request: web.Request) -> web.Response:
        data = [
            {
                "id": model_id(),
                "object": "model",
                "created": created,
                "owned_by": "flywheel",
                "policy_version": service.info()["version"],
            }
        ]
        return web.json_response({"object": "list", "data": data})

    r = app.router
    r.add_post("/v1/completions", text_completions)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_get("/v1/models", models)
