"""A stand-in for EngineCore that runs no model: every step gives each running request its next token at once.

It runs in the core's own process, as the real one does, so a gateway benchmark measures everything but the
model: HTTP, SSE, JSON, detokenization, the pipe between the processes. Tokens cycle through ordinary English
words of the real tokenizer, so detokenization does real work. KVGATE_FAKE_STEP_S paces the steps (the
spawned process reads it from the environment), to stand for an engine of a given step rate."""

from __future__ import annotations

import os
import time

from engine.config import EngineConfig
from engine.model_source import read_model_config
from engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineInfo,
    RequestUpdate,
    SchedulerStats,
    Shutdown,
    StepOutputs,
    ToCore,
)

_TEXT = ("The quick brown fox jumps over the lazy dog while the river runs past an old stone house and "
         "children play in the warm summer light near the quiet village square. ")


class FakeEngineCore:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        hf_config = read_model_config(config.model)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.words = tokenizer.encode(_TEXT * 4, add_special_tokens=False)
        max_len = config.max_model_len or 4096
        blocks, block_size = config.num_kv_blocks or 1 << 20, config.block_size or 16
        self.info = EngineInfo(str(config.model), "none", "fake", max_len, blocks, block_size,
                               hf_config.vocab_size, blocks * block_size)
        self.running: dict[str, list[int]] = {}  # request id -> [tokens generated, max_tokens]
        self._updates: list[RequestUpdate] = []
        self.step_s = float(os.environ.get("KVGATE_FAKE_STEP_S", "0"))
        self._next_step = 0.0

    def handle(self, message: ToCore) -> bool:
        if isinstance(message, AddRequest):
            self.running[message.request_id] = [0, message.params.max_tokens]
        elif isinstance(message, AbortRequests):
            for request_id in message.request_ids:
                if self.running.pop(request_id, None) is not None:
                    self._updates.append(RequestUpdate(request_id, [], finish_reason="abort"))
        elif isinstance(message, Shutdown):
            return False
        return True

    def has_work(self) -> bool:
        return bool(self.running or self._updates)

    def step(self) -> StepOutputs:
        if self.step_s:
            time.sleep(max(0.0, self._next_step - time.monotonic()))
            self._next_step = time.monotonic() + self.step_s
        updates, self._updates = self._updates, []
        words = self.words
        for request_id, state in list(self.running.items()):
            done, limit = state
            state[0] = done + 1
            finished = state[0] >= limit
            if finished:
                del self.running[request_id]
            updates.append(RequestUpdate(request_id, [words[done % len(words)]],
                                         finish_reason="length" if finished else None))
        return StepOutputs(updates, SchedulerStats(num_running=len(self.running)))
