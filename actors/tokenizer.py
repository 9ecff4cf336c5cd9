"""The tokenizer actor: text prompts become token ids (HF `tokenizers`, batch-encoded) for the scheduler."""

from __future__ import annotations

import time
from array import array

from tokenizers import Tokenizer

from baleen.actors.actor import Actor
from baleen.actors.channel import Channel
from baleen.messages import AbortRequest, GenerateRequest, Message, NewRequest


class TokenizerActor(Actor[list[Message], None]):
    """Encodes every text request drained in one go (the Rust tokenizer runs a batch in parallel)."""

    def __init__(self, tokenizer: Tokenizer, inbox: Channel, scheduler: Channel) -> None:
        super().__init__(inbox, name="tokenizer")
        self.tokenizer = tokenizer
        self.scheduler = scheduler

    def decide(self, messages: list[Message]) -> list[Message] | None:
        texts = [m.text for m in messages if isinstance(m, GenerateRequest) and m.input_ids is None]
        # The chat template already starts with BOS, so nothing is added here.
        encoded = iter(self.tokenizer.encode_batch(texts, add_special_tokens=False) if texts else [])
        out: list[Message] = []
        now = time.time()
        for msg in messages:
            match msg:
                case GenerateRequest():
                    ids = array("i", next(encoded).ids).tobytes() if msg.input_ids is None else msg.input_ids
                    out.append(NewRequest(rid=msg.rid, input_ids=ids, sampling=msg.sampling, arrival_time=now,
                                          warmup=msg.warmup))
                case AbortRequest():
                    out.append(msg)  # keeps aborts ordered after the request they abort
                case _:
                    raise TypeError(f"tokenizer got an unexpected {type(msg).__name__}")
        return out or None

    async def launch(self, plan: list[Message]) -> None:
        for msg in plan:
            await self.scheduler.send(msg)
        return None
