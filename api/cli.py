"""`baleen` command line: `baleen serve [flags]`, `baleen make-model OUT --preset NAME`.

`serve` takes SGLang's flag names (the seeds' `python -m sglang.launch_server ...` commands work with the
module name swapped: `python -m baleen.launch_server ...`). `engine_config_from_args` is the one place
where flags become an EngineConfig; a flag whose feature EngineConfig does not have yet is refused
(exit code 2), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baleen.actors.engine_config import EngineConfig
    from baleen.api.state import ServerConfig


def _size(text: str) -> int:
    from baleen.model.make_model import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _make_model_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from baleen.model.presets import PRESET_NAMES

    p = sub.add_parser(
        "make-model",
        help="write a seeded random checkpoint in the released DeepSeek-V3 layout",
        description="Write config.json, safetensors shards, tokenizer files and generation_config.json "
        "for a preset, with seeded random weights (the same seed gives byte-identical files).",
    )
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty)")
    p.add_argument("--preset", required=True, choices=PRESET_NAMES, help="model shape")
    p.add_argument(
        "--fp8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="block-FP8 weights as V3 ships them (default: the preset's choice; tiny is BF16, v3-* FP8)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument(
        "--max-shard-size",
        type=_size,
        default=None,
        metavar="SIZE",
        help="split weights into shards of at most SIZE, e.g. 5GB, 500MB, 2MiB (default 5GB)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _make_model(args: argparse.Namespace) -> int:
    from baleen.model.make_model import DEFAULT_MAX_SHARD_BYTES, make_model

    shard = args.max_shard_size or DEFAULT_MAX_SHARD_BYTES
    try:
        out = make_model(
            args.out, args.preset, fp8=args.fp8, seed=args.seed, max_shard_bytes=shard, progress=args.progress
        )
    except ValueError as e:
        print(f"baleen make-model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.preset} checkpoint to {out}")
    return 0


# ---- serve -----------------------------------------------------------------------------------------------

# Flags for features EngineConfig does not have yet: argparse dest -> the value that asks for nothing.
# NOTE: each one is passed on as soon as EngineConfig has a field of the same name; until then any other
# value is refused. Shrink this table as the engine grows.
PENDING_FLAGS: dict[str, Any] = {
    "tp_size": 1,
    "dp_size": 1,
    "enable_dp_attention": False,
    "ep_size": 1,
    "nnodes": 1,
    "node_rank": 0,
    "dist_init_addr": None,
    "dist_timeout": None,
    "enable_torch_compile": False,
    "torch_compile_max_bs": None,
    "cuda_graph_bs": None,
    "cuda_graph_max_bs": None,
}
# Flags that only turn something off that this build never turns on: passed on when EngineConfig has the
# field, harmless (and accepted) when it does not.
NOOP_FLAGS = ("disable_cuda_graph",)
_DTYPES = {"auto": "auto", "half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
           "float32": "float32"}


class UnsupportedFlag(ValueError):
    """A flag asks for a feature this build does not have."""


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the serve flags describe; UnsupportedFlag/ValueError for what cannot be served."""
    from baleen.actors.engine_config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    values = vars(args)
    for dest, neutral in PENDING_FLAGS.items():
        if dest not in fields and values.get(dest, neutral) not in (neutral, None):
            raise UnsupportedFlag(f"{_shown(dest, values[dest])}: this build of baleen does not support "
                                  f"{_FEATURES.get(dest, dest)} yet; drop the flag")
    _check_quantization(args)
    device = args.device
    if (args.cuda_graph_bs or args.cuda_graph_max_bs) and _resolved_device(device) == "cpu" and not args.debug_eager_graphs:
        raise UnsupportedFlag("--cuda-graph-bs/--cuda-graph-max-bs: CUDA graphs need --device cuda")
    if args.disable_mla:  # not pending: the KV cache layout is MLA's latent, there is no per-head K/V path
        raise UnsupportedFlag("--disable-mla: baleen serves DeepSeek models only with MLA (a latent KV cache), never "
                              "as plain multi-head attention; drop the flag (--attention-backend torch is the "
                              "unoptimised reference attention, if that is what you want)")
    attention_backend = args.attention_backend
    if args.enable_flashinfer_mla:  # SGLang's older spelling of --attention-backend flashinfer
        if attention_backend not in (None, "flashinfer"):
            raise UnsupportedFlag(f"--enable-flashinfer-mla means --attention-backend flashinfer, which contradicts "
                                  f"--attention-backend {attention_backend}; drop one of them")
        attention_backend = "flashinfer"
    specs = tuple(args.custom_logit_processor or ())
    if specs:
        from baleen.model.logit_processors import LogitProcessorRegistry

        for spec in specs:
            LogitProcessorRegistry.parse_spec(spec)  # ValueError naming the bad spec
    kwargs: dict[str, Any] = {
        "model_path": args.model_path, "tokenizer_path": args.tokenizer_path, "device": device,
        "dtype": _DTYPES[args.dtype], "load_format": args.load_format,
        "enable_custom_logit_processor": args.enable_custom_logit_processor or bool(specs),
        "custom_logit_processors": specs, "random_seed": args.random_seed, "multiprocess": not args.single_process,
        "attention_backend": attention_backend,
    }
    for dest in ("context_length", "page_size", "max_running_requests", "max_total_tokens",
                 "chunked_prefill_size", "enable_mixed_chunk", "mixed_chunk_size", "max_queued_requests",
                 "mem_fraction_static", "schedule_conservativeness",
                 "kv_cache_dtype", "kv_cache_fp8_math", "disable_overlap_schedule", "disable_radix_cache", "fp8_tiled_weights",
                 "speculative_algorithm", "speculative_num_steps", "speculative_eagle_topk",
                 "speculative_num_draft_tokens", "speculative_draft_model_path", "decode_log_interval",
                 "debug_eager_graphs", *PENDING_FLAGS, *NOOP_FLAGS):
        value = values.get(dest)
        if dest in fields and value is not None:
            kwargs[dest] = tuple(value) if isinstance(value, list) else value
    return EngineConfig(**kwargs)


_FEATURES = {
    "tp_size": "tensor parallelism", "dp_size": "data-parallel attention", "enable_dp_attention": "DP attention",
    "ep_size": "expert parallelism",
    "nnodes": "multi-node serving", "node_rank": "multi-node serving", "dist_init_addr": "multi-node serving",
    "dist_timeout": "multi-rank start-up", "enable_torch_compile": "torch.compile",
    "torch_compile_max_bs": "torch.compile", "cuda_graph_bs": "CUDA graphs", "cuda_graph_max_bs": "CUDA graphs",
}


def _shown(dest: str, value: Any) -> str:
    """The flag as the user wrote it, e.g. "--tp 8", "--enable-torch-compile", "--cuda-graph-bs 1 2 4"."""
    flag = {"tp_size": "--tp", "dp_size": "--dp", "ep_size": "--ep"}.get(dest, "--" + dest.replace("_", "-"))
    if value is True:
        return flag
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def _resolved_device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_quantization(args: argparse.Namespace) -> None:
    """--quantization may only name the checkpoint's own format (block FP8); weights are never re-quantized."""
    if args.quantization is None:
        return
    if args.quantization != "fp8":
        raise UnsupportedFlag(f"--quantization {args.quantization}: only the checkpoint's block-wise fp8 format is "
                              "supported; drop the flag to serve the checkpoint as it is stored")
    from baleen.model.config import ModelConfig
    from baleen.model.make_model import default_model_path

    path = args.model_path or str(default_model_path())
    try:
        quant = ModelConfig.from_hf(path).quant
    except OSError as e:
        raise ValueError(f"cannot read the model config at {path}: {e}") from e
    if quant is None:
        raise UnsupportedFlag(f"--quantization fp8: the checkpoint at {path} is not FP8 and baleen does not "
                              "quantize weights at load time; drop the flag")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The HTTP server's settings from the serve flags."""
    from baleen.api.state import ServerConfig

    return ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                        served_model_name=args.served_model_name or args.model_path or "default",
                        chat_template=args.chat_template, reasoning_parser=args.reasoning_parser,
                        tool_call_parser=args.tool_call_parser, max_request_bytes=args.max_request_size,
                        graceful_shutdown_s=args.graceful_shutdown_timeout, log_level=args.log_level,
                        sse_ping_interval_s=args.sse_ping_interval,
                        stay_up_after_engine_death=args.stay_up_after_engine_death)


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Every `serve` flag (SGLang's names where SGLang has the flag)."""
    from baleen.actors.worker import ATTENTION_BACKENDS
    from baleen.api.chat_template import BUILTIN_TEMPLATES
    from baleen.api.reasoning import REASONING_PARSERS
    from baleen.api.tool_parser import TOOL_CALL_PARSERS
    from baleen.model.build import DEFAULT_KV_CACHE_FP8_MATH, KV_CACHE_FP8_MATH

    g = p.add_argument_group("model")
    g.add_argument("--model-path", "--model", dest="model_path", default=None,
                   help="checkpoint directory (default: the embedded tiny model)")
    g.add_argument("--tokenizer-path", default=None, help="directory or tokenizer.json (default: the model's)")
    g.add_argument("--served-model-name", default=None, help="the name /v1/models lists (default: the model path)")
    g.add_argument("--trust-remote-code", action="store_true", help="accepted for compatibility; no effect")
    g.add_argument("--dtype", default="auto", choices=sorted(_DTYPES), help="activation dtype (default: auto)")
    g.add_argument("--quantization", default=None, help="only 'fp8', and only for an FP8 checkpoint")
    g.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"),
                   help="dummy: random weights of the configured shape, no files read")
    g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--context-length", type=int, default=None, help="default: the model's max_position_embeddings")
    g.add_argument("--random-seed", type=int, default=0)
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=30000, help="0 picks a free port (the ready line says which)")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (not on /health, /metrics)")
    g.add_argument("--max-request-size", type=_size, default=32 << 20, metavar="SIZE",
                   help="largest request body, e.g. 32MiB (default); larger ones get HTTP 413")
    g.add_argument("--graceful-shutdown-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM, time in-flight requests get before they are aborted (default 5)")
    g.add_argument("--sse-ping-interval", type=float, default=0.0, metavar="SECONDS",
                   help="send a ': ping' SSE comment on /v1 streams idle this long, for proxies that close idle "
                        "connections (default 0: never; SGLang's and vLLM's benchmark clients fail on comments)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error", "critical"))
    g.add_argument("--decode-log-interval", type=int, default=None, metavar="STEPS",
                   help="log running requests, KV usage, throughput and the speculative accept length every STEPS "
                        "decode steps (default 40)")
    g.add_argument("--stay-up-after-engine-death", action="store_true",
                   help="when a worker process dies (or an engine actor fails), keep the server up answering 503 "
                        "(default: log the cause and exit with code 1 within 5 s, for a supervisor to restart it)")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", "--tp-size", dest="tp_size", type=int, default=1)
    g.add_argument("--dp", "--dp-size", dest="dp_size", type=int, default=1)
    g.add_argument("--enable-dp-attention", action="store_true")
    g.add_argument("--ep", "--ep-size", dest="ep_size", type=int, default=1, help="expert-parallel ranks")
    g.add_argument("--nnodes", type=int, default=1)
    g.add_argument("--node-rank", type=int, default=0)
    g.add_argument("--dist-init-addr", default=None)
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS")
    g = p.add_argument_group("memory and scheduling")
    g.add_argument("--mem-fraction-static", type=float, default=None)
    g.add_argument("--max-running-requests", type=int, default=None)
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="waiting requests beyond this get HTTP 503 (default 4096)")
    g.add_argument("--max-total-tokens", type=int, default=None)
    g.add_argument("--chunked-prefill-size", type=int, default=None, help="-1 disables chunking")
    g.add_argument("--enable-mixed-chunk", action="store_true",
                   help="running decodes ride along with a prefill chunk (which shrinks by one token per decode row) "
                        "instead of waiting for a step without prefill, so streams do not stall while a long prompt "
                        "prefills (default off, as SGLang)")
    g.add_argument("--mixed-chunk-size", type=int, default=None,
                   help="with --enable-mixed-chunk: the most prompt tokens a step that carries decode rows takes "
                        "(default: the chunk); about one decode step's work keeps streams smooth while long prompts "
                        "prefill, and a step without decode rows still takes a whole chunk")
    g.add_argument("--schedule-conservativeness", type=float, default=None,
                   help="scales the decode tokens admission keeps in reserve per running request (default 1.0 = 256; "
                        "lower runs more requests at once and preempts the newest when the KV pool runs out)")
    g.add_argument("--page-size", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default=None, choices=("auto", "fp8_e4m3", "bf16", "bfloat16", "float16", "float32"),
                   help="auto: the model dtype; fp8_e4m3 halves the KV bytes (a per-layer scale from the checkpoint's "
                        "*.self_attn.k_scale / kv_scale when it has them, else 1.0)")
    g.add_argument("--kv-cache-fp8-math", default=None, choices=KV_CACHE_FP8_MATH,
                   help="attention over an FP8 cache on Hopper (the Gluon MLA kernel): fp8 multiplies in "
                        "e4m3, with the query and the softmax probabilities rounded to e4m3 as FlashMLA's FP8 path "
                        "does (twice the MMA rate); bf16 converts the cache to bf16 and multiplies as a bf16 cache "
                        f"would (exact). Default: {DEFAULT_KV_CACHE_FP8_MATH}. Other kernels always convert.")
    g.add_argument("--disable-overlap-schedule", action="store_true")
    g.add_argument("--disable-radix-cache", action="store_true")
    g.add_argument("--single-process", action="store_true",
                   help="run the worker inside the server process (default: a separate process)")
    g = p.add_argument_group("kernels")
    g.add_argument("--attention-backend", default=None, choices=ATTENTION_BACKENDS)
    g.add_argument("--enable-flashinfer-mla", action="store_true",
                   help="SGLang's older name for --attention-backend flashinfer; means exactly that")
    g.add_argument("--disable-mla", action="store_true",
                   help="refused: baleen serves DeepSeek models only with MLA (SGLang's flag, accepted to say so)")
    g.add_argument("--cuda-graph-bs", type=int, nargs="+", default=None)
    g.add_argument("--cuda-graph-max-bs", type=int, default=None)
    g.add_argument("--disable-cuda-graph", action="store_true")
    g.add_argument("--debug-eager-graphs", action="store_true",
                   help="debugging: the CUDA-graph paths run their bodies eagerly instead of capturing, on any device "
                        "(on CPU too: the graphed decode and speculative steps without a GPU; slow)")
    g.add_argument("--fp8-tiled-weights", default=None, choices=("auto", "on", "off"),
                   help="tiled copies of the FP8 weights decode reads: faster GEMMs at 2-64 tokens for their memory "
                        "again (default auto: on, off with --enable-dp-attention)")
    g.add_argument("--enable-torch-compile", action="store_true")
    g.add_argument("--torch-compile-max-bs", type=int, default=None)
    g = p.add_argument_group("speculative decoding (MTP)")
    g.add_argument("--speculative-algorithm", default=None, choices=("EAGLE", "NEXTN"),
                   help="draft with the model's MTP layer and verify the drafts in one forward (NEXTN: an alias); "
                        "--max-running-requests and the CUDA graph sizes then default to 48")
    g.add_argument("--speculative-num-steps", type=int, default=None, help="drafts a verify step checks (default 3)")
    g.add_argument("--speculative-eagle-topk", type=int, default=None,
                   help="draft branches per step (default 1; only 1, a chain of drafts, is supported)")
    g.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="tokens a verify step runs: --speculative-num-steps + 1 with topk 1 (default 4)")
    g.add_argument("--speculative-draft-model-path", default=None,
                   help="a NextN checkpoint (as SGLang's export writes it); default: the model's own MTP layer")
    g = p.add_argument_group("OpenAI API")
    g.add_argument("--chat-template", default=None,
                   help=f"built-in {sorted(BUILTIN_TEMPLATES)} or a .jinja path (default: the checkpoint's)")
    g.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS)
    g.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS)
    g.add_argument("--grammar-backend", default="xgrammar", choices=("xgrammar",),
                   help="structured output's grammar engine (SGLang's flag; xgrammar is the one baleen has)")
    g.add_argument("--enable-custom-logit-processor", action="store_true",
                   help="let requests name a registered logit processor (custom_logit_processor)")
    g.add_argument("--custom-logit-processor", action="append", default=None, metavar="NAME=module:attr",
                   help="register a processor factory under NAME (repeatable); implies the flag above")


def _serve(args: argparse.Namespace, prog: str = "baleen serve") -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_config = engine_config_from_args(args)
        server_config = server_config_from_args(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from baleen.actors.actor import run
    from baleen.launch_server import serve

    try:
        return run(serve(server_config, engine_config))
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def serve_main(argv: list[str] | None = None, prog: str = "baleen serve") -> int:
    """`baleen serve` / `python -m baleen.launch_server`: parse the serve flags and serve until SIGTERM."""
    parser = argparse.ArgumentParser(prog=prog, description=SERVE_DESCRIPTION)
    add_serve_flags(parser)
    return _serve(parser.parse_args(argv), prog)


SERVE_DESCRIPTION = "Serve a model over the OpenAI-compatible HTTP API (SGLang's flag names)."


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `baleen` console script."""
    parser = argparse.ArgumentParser(prog="baleen", description="DeepSeek-V3-family inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_flags(sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API",
                                   description=SERVE_DESCRIPTION))
    _make_model_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "make-model":
        return _make_model(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
