"""A request's prompt as token ids of one model, and the length limits it must fit.

Tokenized once when submitted, and again at admission if a hot swap brought another tokenizer
meanwhile; every error is an InvalidArgument that says what to change.
"""

from __future__ import annotations

from jinja2 import TemplateError

from flywheel.core import errors
from flywheel.policy.kvbatch import LoadedModel
from flywheel.policy.requests import GenerationRequest


def prompt_ids(req: GenerationRequest, loaded: LoadedModel) -> list[int]:
    """The prompt, or the chat through the model's template, as `loaded`'s token ids. `req` passed
    `requests.validate_request` (shape, roles, size)."""
    bad = errors.InvalidArgument
    if req.messages is not None:
        if not loaded.tokenizer.chat_template:
            raise bad(f"model {loaded.source!r} has no chat template: send a prompt instead of messages")
        try:
            return list(loaded.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True))
        except Exception as e:  # noqa: BLE001 - a template can reject a conversation shape
            reason = str(e)[:200] if isinstance(e, TemplateError) else type(e).__name__
            raise bad(f"the chat template rejected these messages ({reason}): change the roles or their order") from e
    if req.prompt is None or not req.prompt.strip():
        raise bad("prompt is empty: send some text (or messages)")
    return loaded.encode(req.prompt)


def check_length(n: int, max_new: int, max_input_tokens: int, loaded: LoadedModel) -> None:
    """A prompt of `n` tokens fits the input limit, and with `max_new` tokens the model's context."""
    if n > max_input_tokens:
        raise errors.InvalidArgument(
            f"the prompt has {n} tokens, over the limit of {max_input_tokens} input tokens: shorten it"
        )
    if n + max_new > loaded.context:
        raise errors.InvalidArgument(
            f"prompt ({n} tokens) + max_new_tokens ({max_new}) = {n + max_new} is over the model's context "
            f"of {loaded.context} tokens: lower max_new_tokens to at most {max(loaded.context - n, 0)} "
            f"or shorten the prompt"
        )
