"""The one admission check: each refusal names its field (as the caller spells it); accepted requests get their
most tokens. Pure: no engine, no tokenizer."""

from __future__ import annotations

from array import array
from typing import Any

import pytest

from baleen.actors.admission import AdmissionError, Limits, check_request, check_sampling
from baleen.messages import SamplingParams

FRONTEND = Limits(max_context_len=64, vocab_size=100)  # what Engine.generate and the HTTP routes know
SCHEDULER = Limits(max_context_len=64, max_kv_tokens=40)  # what the scheduler knows
HTTP = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt": "messages"}


def params(**kwargs: Any) -> SamplingParams:
    return SamplingParams(**{"max_new_tokens": 8, **kwargs})


@pytest.mark.parametrize("prompt, sampling, limits, names, param, fragment", [
    ([], params(), FRONTEND, None, "prompt", "empty"),
    ([1, 100, 7], params(), FRONTEND, None, "prompt", "[100] are outside the model's vocabulary [0, 100)"),
    ([-1], params(), FRONTEND, HTTP, "messages", "[-1]"),
    (array("i", [3, 250, -4, 9]), params(), FRONTEND, None, "prompt", "[250, -4] are outside"),  # read in C
    ([5, 2**40], params(), FRONTEND, None, "prompt", f"[{2**40}] are outside"),  # past int32: no array
    ([1], params(logit_bias={100: 1.0}), FRONTEND, None, "logit_bias", "names token ids [100] outside"),
    ([1] * 60, params(max_new_tokens=10), FRONTEND, None, "max_new_tokens",
     "60 tokens and max_new_tokens is 10: 70 exceeds this model's maximum context length of 64"),
    ([1] * 60, params(max_new_tokens=10), FRONTEND, HTTP, "max_tokens", "lower max_tokens"),
    ([1] * 64, params(max_new_tokens=None), FRONTEND, None, "prompt", "no room to generate"),
    ([1] * 40, params(max_new_tokens=None), SCHEDULER, None, "prompt", "(KV cache: 40 tokens)"),
    ([1] * 30, params(max_new_tokens=20), SCHEDULER, None, "max_new_tokens", "KV cache capacity of 40"),
    ([1], params(max_new_tokens=0), FRONTEND, HTTP, "max_tokens", "max_tokens must be at least 1"),
    ([1], params(max_new_tokens=-2), FRONTEND, None, "max_new_tokens", "max_new_tokens must be >= 0"),
    ([1], params(min_new_tokens=-1), FRONTEND, HTTP, "min_tokens", "min_tokens must be >= 0"),
    ([1], params(max_new_tokens=4, min_new_tokens=9), FRONTEND, HTTP, "min_tokens",
     "min_tokens must be in [0, max_tokens (4)], got 9"),
    ([1], params(temperature=101.0), FRONTEND, None, "temperature", "temperature must be in [0, 100]"),
    ([1], params(top_p=0.0), FRONTEND, None, "top_p", "top_p must be in (0, 1]"),
    ([1], params(top_logprobs=21), FRONTEND, {"top_logprobs": "logprobs"}, "logprobs", "logprobs must be in"),
])
def test_refusals_name_their_field(prompt: list[int], sampling: SamplingParams, limits: Limits,
                                   names: dict[str, str] | None, param: str, fragment: str) -> None:
    with pytest.raises(AdmissionError) as e:
        check_request(prompt, sampling, limits, names=names)
    assert e.value.param == param and e.value.kind == "invalid" and isinstance(e.value, ValueError)
    assert fragment in str(e.value)
    assert (e.value.code == "context_length_exceeded") is ("maximum context length" in str(e.value))


@pytest.mark.parametrize("prompt, sampling, limits, most", [
    ([1] * 56, params(max_new_tokens=8), FRONTEND, 64),  # exactly the context
    ([99], params(max_new_tokens=None), FRONTEND, 64),  # up to the context
    ([1], params(max_new_tokens=None), SCHEDULER, 40),  # up to the KV pool when it is smaller
    ([1] * 30, params(max_new_tokens=10), SCHEDULER, 40),
    ([10**6], params(), SCHEDULER, 9),  # the scheduler does not know the vocabulary
])
def test_accepted_requests_get_their_most_tokens(prompt: list[int], sampling: SamplingParams, limits: Limits,
                                                  most: int) -> None:
    assert check_request(prompt, sampling, limits) == most


def test_the_sampling_half_alone() -> None:
    check_sampling(params())
    with pytest.raises(AdmissionError) as e:
        check_sampling(params(presence_penalty=3.0), {"presence_penalty": "presence"})
    assert e.value.param == "presence" and str(e.value).startswith("presence must be in [-2, 2]")
