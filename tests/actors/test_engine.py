"""The Engine end to end on the embedded tiny model (CPU, fp32): batching, overlap, processes, failures."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from baleen.actors.engine import Engine, EngineConfig, EngineDead
from baleen.messages import RequestOutput, SamplingParams, StepPlan
from baleen.model.make_model import tiny_model_path
from baleen.model.runner import ModelRunner
from baleen.model.step import PendingStep

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(tiny_model_path())


def _prompts(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(16, 1000) for _ in range(rng.randint(3, 70))], rng.randint(3, 18)) for _ in range(n)]


async def _collect(engine: Engine, prompt: str | list[int], params: SamplingParams) -> tuple[list[int], str, RequestOutput]:
    ids: list[int] = []
    text = ""
    last: RequestOutput | None = None
    async for out in engine.generate(prompt, params):
        ids += out.token_ids
        text += out.text
        last = out
    assert last is not None
    return ids, text, last


async def _run_all(engine: Engine, prompts: list[tuple[list[int], int]]) -> list[list[int]]:
    outs = await asyncio.gather(
        *[_collect(engine, p, SamplingParams(max_new_tokens=n, **GREEDY)) for p, n in prompts]  # type: ignore[arg-type]
    )
    for (_, n), (ids, _, last) in zip(prompts, outs):
        assert last.finish_reason == "length" and len(ids) == n
    return [ids for ids, _, _ in outs]


def test_concurrent_requests_equal_each_alone_in_every_mode(model_path: str) -> None:
    prompts = _prompts(16)

    async def main() -> None:
        base = EngineConfig(model_path=model_path, chunked_prefill_size=64)
        async with await Engine.start(base) as engine:
            alone = [(await _run_all(engine, [p]))[0] for p in prompts]
            together = await _run_all(engine, prompts)
        assert together == alone
        for cfg in (
            EngineConfig(model_path=model_path, chunked_prefill_size=64, disable_overlap_schedule=True),
            EngineConfig(model_path=model_path, chunked_prefill_size=64, multiprocess=True),
            EngineConfig(model_path=model_path, chunked_prefill_size=64, multiprocess=True, disable_overlap_schedule=True),
        ):
            async with await Engine.start(cfg) as engine:
                assert await _run_all(engine, prompts) == alone, cfg

    asyncio.run(main())


def test_shared_system_prompt_is_computed_once(model_path: str) -> None:
    rng = random.Random(1)
    system = [rng.randrange(16, 1000) for _ in range(70)]
    prompts = [system + [rng.randrange(16, 1000) for _ in range(rng.randint(2, 9))] for _ in range(4)]
    params = SamplingParams(max_new_tokens=6, **GREEDY)  # type: ignore[arg-type]

    async def run(cfg: EngineConfig) -> list[tuple[list[int], int]]:
        async with await Engine.start(cfg) as engine:
            first = await _collect(engine, prompts[0], params)
            rest = await asyncio.gather(*[_collect(engine, p, params) for p in prompts[1:]])
            return [(ids, last.cached_tokens) for ids, _, last in [first, *rest]]

    cached = asyncio.run(run(EngineConfig(model_path=model_path, page_size=16)))
    uncached = asyncio.run(run(EngineConfig(model_path=model_path, page_size=16, disable_radix_cache=True)))
    assert [ids for ids, _ in cached] == [ids for ids, _ in uncached]
    assert cached[0][1] == 0 and all(c == 64 for _, c in cached[1:])  # 70 shared tokens -> 4 whole pages
    assert all(c == 0 for _, c in uncached)


@pytest.mark.parametrize("multiprocess", [False, True], ids=["in-process", "multiprocess"])
def test_flush_cache_frees_every_prefix_no_request_holds(model_path: str, multiprocess: bool) -> None:
    rng = random.Random(2)
    done, running = ([rng.randrange(16, 1000) for _ in range(70)] for _ in range(2))
    params = SamplingParams(max_new_tokens=6, **GREEDY)  # type: ignore[arg-type]

    async def main() -> None:
        config = EngineConfig(model_path=model_path, page_size=16, multiprocess=multiprocess)
        async with await Engine.start(config) as engine:
            first, _, _ = await _collect(engine, done, params)
            started: list[RequestOutput] = []

            async def hold() -> None:  # a request in flight: its prefix stays
                long = SamplingParams(max_new_tokens=4000, **GREEDY)  # type: ignore[arg-type]
                async for out in engine.generate(running, long, rid="running"):
                    started.append(out)

            task = asyncio.create_task(hold())
            while not any(o.token_ids for o in started):
                await asyncio.sleep(0.01)
            flushed = await engine.flush_cache()
            assert flushed.num_pages >= 4 and flushed.num_held_pages >= 4  # 70-token prompts: 4 whole pages each
            again, _, last = await _collect(engine, done, params)
            assert again == first and last.cached_tokens == 0  # recomputed: the same tokens
            await engine.abort("running")
            await asyncio.wait_for(task, 5)
            assert started[-1].finish_reason == "abort"
            flushed = await engine.flush_cache()  # both prompts' pages now: nothing is held
            assert flushed.num_pages >= 8 and flushed.num_held_pages == 0
            for _ in range(100):
                if engine.metrics.get("num_used_pages") == 0 and engine.metrics.get("num_cached_pages") == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.metrics["num_used_pages"] == engine.metrics["num_cached_pages"] == 0
        with pytest.raises(EngineDead):
            await engine.flush_cache()

    asyncio.run(main())


def test_stop_string_cuts_text_and_stops_generation(model_path: str) -> None:
    async def main() -> None:
        async with await Engine.start(EngineConfig(model_path=model_path)) as engine:
            prompt = "The whale said"
            ids, text, _ = await _collect(engine, prompt, SamplingParams(max_new_tokens=40, **GREEDY))  # type: ignore[arg-type]
            stop = text[len(text) // 2 : len(text) // 2 + 3]
            assert stop and stop in text
            ids2, text2, last = await _collect(engine, prompt, SamplingParams(max_new_tokens=40, stop=[stop], **GREEDY))  # type: ignore[arg-type]
            assert text2 == text[: text.index(stop)]
            assert last.finish_reason == "stop" and last.matched_stop == stop
            assert len(ids2) < len(ids)

    asyncio.run(main())


def test_abort_and_early_exit_free_pages(model_path: str) -> None:
    async def main() -> None:
        async with await Engine.start(EngineConfig(model_path=model_path, disable_radix_cache=True)) as engine:
            params = SamplingParams(max_new_tokens=2000, **GREEDY)  # type: ignore[arg-type]
            async for out in engine.generate("leave early", params):
                if out.token_ids:
                    break
            got: list[RequestOutput] = []

            async def consume() -> None:
                async for out in engine.generate("abort me", params, rid="victim"):
                    got.append(out)

            task = asyncio.create_task(consume())
            while not any(o.token_ids for o in got):
                await asyncio.sleep(0.01)
            await engine.abort("victim")
            await asyncio.wait_for(task, 5)
            assert got[-1].finish_reason == "abort"
            for _ in range(100):
                if engine.metrics.get("num_running_requests") == 0 and engine.metrics.get("num_used_pages") == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.metrics["num_running_requests"] == 0
            assert engine.metrics["num_used_pages"] == 0

    asyncio.run(main())


def test_killed_worker_fails_requests_fast_and_engine_is_unhealthy(
    model_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        engine = await Engine.start(EngineConfig(model_path=model_path, multiprocess=True))
        try:
            outs: list[RequestOutput] = []

            async def consume(i: int) -> None:
                async for out in engine.generate(f"request {i}", SamplingParams(max_new_tokens=8000, **GREEDY)):  # type: ignore[arg-type]
                    outs.append(out)

            tasks = [asyncio.create_task(consume(i)) for i in range(3)]
            while len(outs) < 3:
                await asyncio.sleep(0.01)
            assert engine._child is not None and engine._child.pid is not None
            os.kill(engine._child.pid, signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
            assert time.monotonic() - killed < 1.0
            errors = [o for o in outs if o.finish_reason == "error"]
            assert len(errors) == 3 and all("died" in (o.error or "") for o in errors)
            assert not engine.healthy
            assert "killed by SIGKILL" in await asyncio.wait_for(engine.wait_dead(), 1.0)
            with pytest.raises(RuntimeError):
                async for _ in engine.generate("after death"):
                    pass
        finally:
            await engine.close()

    with caplog.at_level(logging.ERROR, logger="baleen.engine"):
        asyncio.run(main())
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "baleen-rank0" in record.getMessage() and "killed by SIGKILL" in record.getMessage()


def _fail_launches(monkeypatch: pytest.MonkeyPatch, after: int) -> list[StepPlan]:
    """Make the in-process model runner raise on every step after the first `after`; the steps it ran."""
    launched: list[StepPlan] = []
    launch = ModelRunner.launch

    def failing(self: ModelRunner, plan: StepPlan) -> PendingStep:
        if len(launched) >= after:
            raise RuntimeError("injected step failure")
        launched.append(plan)
        return launch(self, plan)

    monkeypatch.setattr(ModelRunner, "launch", failing)
    return launched


def test_warm_up_runs_before_start_returns_and_leaves_no_trace(
    model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = _fail_launches(monkeypatch, after=1000)

    async def main() -> None:
        # page_size 1: any token the warm-up left in the prefix cache would be a cached page
        async with await Engine.start(EngineConfig(model_path=model_path, page_size=1)) as engine:
            assert len(launched) >= 2  # its prefill and its decode ran inside start()
            await asyncio.sleep(0.4)  # the scheduler's metrics report after the warm-up
            m = engine.metrics
            assert m["num_cached_pages"] == 0 and m["num_used_pages"] == 0
            assert m["cache_hit_rate"] == 0 and m["gen_throughput"] == 0
            ids, _, last = await _collect(engine, [5, 6, 7], SamplingParams(max_new_tokens=3, **GREEDY))  # type: ignore[arg-type]
            assert len(ids) == 3 and last.cached_tokens == 0

    asyncio.run(main())


def test_failed_warm_up_fails_start_with_the_cause(model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_launches(monkeypatch, after=0)
    with pytest.raises(EngineDead, match=r"warm-up generation failed: .*RuntimeError: injected step failure"):
        asyncio.run(Engine.start(EngineConfig(model_path=model_path)))


def test_failed_actor_is_the_engines_death(
    model_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with await Engine.start(EngineConfig(model_path=model_path)) as engine:
            _fail_launches(monkeypatch, after=0)
            ids, _, last = await _collect(engine, "doomed", SamplingParams(max_new_tokens=4, **GREEDY))  # type: ignore[arg-type]
            assert ids == [] and last.finish_reason == "error" and "injected step failure" in (last.error or "")
            assert "injected step failure" in await asyncio.wait_for(engine.wait_dead(), 1.0)
            assert not engine.healthy

    with caplog.at_level(logging.ERROR, logger="baleen.engine"):
        asyncio.run(main())
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)  # logged with its traceback


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("baleen")}


def test_close_and_ctrl_c_leave_no_processes_or_segments(model_path: str, tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, faulthandler, logging, os, signal, sys
            from baleen.actors.engine import Engine, EngineConfig
            from baleen.messages import SamplingParams

            async def main():
                engine = await Engine.start(EngineConfig(model_path={model_path!r}, multiprocess=True))
                try:
                    print("child", engine._child.pid, flush=True)
                    async for out in engine.generate("x", SamplingParams(max_new_tokens=None, ignore_eos=True)):
                        pass
                finally:
                    await engine.close()

            if __name__ == "__main__":
                # as in a terminal, even if started with SIGINT ignored (a background job of a non-interactive shell,
                # e.g. `make test &`, passes SIG_IGN on, and Ctrl-C then never reached this engine)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                logging.basicConfig(level=logging.INFO, stream=sys.stderr)
                faulthandler.register(signal.SIGUSR1)  # the test asks for every thread's stack if it hangs
                try:
                    asyncio.run(main())
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
            """
        )
    )
    before = _shm_segments()
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("child"), line
    child_pid = int(line.split()[1])
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still running 30 s after Ctrl-C; its log and stacks:\n{err[-12000:]}") from None
    assert "interrupted" in out, err[-4000:]
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
    # Ring segments are named baleen_<creator pid>_...: only this engine's count (other engines may run beside it).
    ours = {s for s in _shm_segments() - before if s.split("_")[1] in (str(proc.pid), str(child_pid))}
    assert ours == set()


def test_failing_logit_processor_fails_only_its_request(model_path: str) -> None:
    # builtins:len cannot be built from (params, tokenizer); operator:itemgetter builds but fails when called.
    cfg = EngineConfig(
        model_path=model_path,
        enable_custom_logit_processor=True,
        custom_logit_processors=("ctor_fail=builtins:len", "call_fail=operator:itemgetter"),
    )

    async def main() -> None:
        async with await Engine.start(cfg) as engine:
            params = [
                SamplingParams(max_new_tokens=8, **GREEDY),  # type: ignore[arg-type]
                SamplingParams(max_new_tokens=8, custom_logit_processor="ctor_fail", **GREEDY),  # type: ignore[arg-type]
                SamplingParams(max_new_tokens=8, custom_logit_processor="call_fail", **GREEDY),  # type: ignore[arg-type]
            ]
            outs = await asyncio.gather(*[_collect(engine, f"prompt {i}", p) for i, p in enumerate(params)])
            assert outs[0][2].finish_reason == "length" and len(outs[0][0]) == 8
            for ids, _, last in outs[1:]:
                assert last.finish_reason == "error" and last.error_kind == "invalid" and ids == []
                assert "logit processor" in (last.error or "") or "len" in (last.error or "")
            assert engine.healthy
            ids, _, last = await _collect(engine, "after", params[0])
            assert last.finish_reason == "length" and len(ids) == 8
            with pytest.raises(ValueError, match="outside the model's vocabulary"):
                async for _ in engine.generate([5, 10**6], params[0]):
                    pass

    asyncio.run(main())


@pytest.mark.parametrize("setting, dp, want", [("auto", 1, True), ("auto", 2, False), ("on", 2, True), ("off", 1, False)])
def test_fp8_tiled_weights_setting_reaches_the_worker(model_path: str, setting: str, dp: int, want: bool) -> None:
    # auto: tiled copies except under DP attention, where every rank holds all of attention's weights.
    from baleen.actors.engine_config import plan_startup
    from baleen.model.config import ModelConfig

    dp_flags = {"tp_size": 2, "dp_size": 2, "enable_dp_attention": True} if dp > 1 else {}
    config = EngineConfig(model_path=model_path, device="cpu", fp8_tiled_weights=setting, **dp_flags)
    plan = plan_startup(config, model_path, ModelConfig.from_hf(model_path))
    assert plan.worker.fp8_tiled_weights is want
    with pytest.raises(ValueError, match="fp8_tiled_weights"):
        plan_startup(EngineConfig(model_path=model_path, device="cpu", fp8_tiled_weights="yes"), model_path,
              ModelConfig.from_hf(model_path))


def test_cpu_weights_that_do_not_fit_the_host_are_refused_before_any_rank_loads(
        model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A CPU rank holds dense weights: a model this host cannot hold in the dtype asked is refused at start-up with
    the sizes, naming --dtype bfloat16 when that would fit (DeepSeek-V3 in float32 is ~2.7 TB); --dtype auto takes
    bfloat16 then."""
    from baleen.actors import engine_config
    from baleen.model.config import ModelConfig
    from baleen.model.loader import Checkpoint

    ckpt = Checkpoint(model_path)
    params = ckpt.num_elements()
    ckpt.close()
    assert params > 1_000_000  # the tiny model's tensors, counted from the headers
    real = engine_config.available_memory_bytes()
    assert real is None or real > params * 4  # this machine: /proc/meminfo read, and the tiny model fits
    config = ModelConfig.from_hf(model_path)
    monkeypatch.setattr(engine_config, "available_memory_bytes", lambda: params * 3)  # bf16 fits, float32 does not
    with pytest.raises(ValueError, match=r"in float32 .* --dtype bfloat16 needs"):
        engine_config.plan_startup(EngineConfig(model_path=model_path, device="cpu", dtype="float32"), model_path,
                                   config)  # fmt: skip
    auto = EngineConfig(model_path=model_path, device="cpu")  # --dtype auto: float32 on CPU, unless it cannot fit
    assert engine_config.plan_startup(auto, model_path, config).worker.dtype == "bfloat16"
    bf16 = EngineConfig(model_path=model_path, device="cpu", dtype="bfloat16")
    assert engine_config.plan_startup(bf16, model_path, config).worker.dtype == "bfloat16"
    monkeypatch.setattr(engine_config, "available_memory_bytes", lambda: params)
    with pytest.raises(ValueError, match=r"GiB are available$"):  # nothing to suggest in bf16 either
        engine_config.plan_startup(bf16, model_path, config)
    dummy = EngineConfig(model_path=model_path, device="cpu", load_format="dummy")
    assert engine_config.plan_startup(dummy, model_path, config).worker.load_format == "dummy"  # no weights read


def test_schedule_conservativeness_scales_the_decode_reserve(model_path: str) -> None:
    from baleen.actors.engine_config import plan_startup
    from baleen.model.config import ModelConfig

    def reserve(c: float) -> int:
        config = EngineConfig(model_path=model_path, device="cpu", schedule_conservativeness=c)
        return plan_startup(config, model_path, ModelConfig.from_hf(model_path)).scheduler.decode_reserve_tokens

    assert (reserve(1.0), reserve(0.5), reserve(0.0)) == (256, 128, 0)
    with pytest.raises(ValueError, match="--schedule-conservativeness must be >= 0"):
        reserve(-1.0)


def test_cuda_steps_take_at_most_max_cuda_step_tokens(model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    # --chunked-prefill-size -1 (or a larger chunk) over a long context: steps of 65k tokens crashed on the H100.
    from baleen.actors.engine_config import MAX_CUDA_STEP_TOKENS, plan_startup
    from baleen.model.config import ModelConfig

    def plan(**flags: Any) -> Any:  # a plan only: nothing starts on the device
        return plan_startup(EngineConfig(model_path=model_path, **flags), model_path, ModelConfig.from_hf(model_path))

    long = dict(device="cuda", context_length=4 * MAX_CUDA_STEP_TOKENS)
    for flags in (dict(chunked_prefill_size=-1), dict(chunked_prefill_size=2 * MAX_CUDA_STEP_TOKENS)):
        with caplog.at_level("WARNING", logger="baleen.engine"):
            got = plan(**long, **flags)
        assert got.worker.chunked_prefill_size == got.scheduler.chunked_prefill_size == MAX_CUDA_STEP_TOKENS
        assert "tokens a step at most on CUDA" in caplog.text
    assert plan(device="cuda", context_length=4096, chunked_prefill_size=-1).worker.chunked_prefill_size is None
    assert plan(**long).worker.chunked_prefill_size == 8192
    cpu = plan(device="cpu", context_length=4 * MAX_CUDA_STEP_TOKENS, chunked_prefill_size=-1)
    assert cpu.worker.chunked_prefill_size is None


def test_mixed_chunk_size_reaches_the_scheduler(model_path: str, caplog: pytest.LogCaptureFixture) -> None:
    from baleen.actors.engine_config import plan_startup
    from baleen.model.config import ModelConfig

    def plan(**flags: Any) -> Any:
        return plan_startup(EngineConfig(model_path=model_path, device="cpu", **flags), model_path,
                            ModelConfig.from_hf(model_path))  # fmt: skip

    assert plan(enable_mixed_chunk=True, mixed_chunk_size=64).scheduler.mixed_chunk_size == 64
    assert plan(enable_mixed_chunk=True).scheduler.mixed_chunk_size is None
    with caplog.at_level("WARNING", logger="baleen.engine"):
        plan(mixed_chunk_size=64)
    assert "--mixed-chunk-size has no effect without --enable-mixed-chunk" in caplog.text
    with pytest.raises(ValueError, match="--mixed-chunk-size must be >= 1"):
        plan(enable_mixed_chunk=True, mixed_chunk_size=0)
