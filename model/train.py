"""Train the embedded default model through baleen's own DeepSeek-V3 modules (one definition of the architecture).

    python -P -m baleen.model.train OUT [--time-budget 420] [--steps N] [--seed 0]          # stage 1
    python -P -m baleen.model.train OUT --init model/data --mixture finetune --lr 1e-3         # stage 2
    python -P -m baleen.model.train OUT --init model/data --mtp-only --mixture mtp [--self-distill 4000]
                                                         # stage 3: the MTP layer alone, on the model's own text too

The serving modules run unchanged over a flat batch: each row of `row_len` tokens holds whole documents (one
ForwardBatch sequence each, positions from 0) and a padding tail; `PackedAttentionBackend` is an attention
backend like the others (plan once, run per layer) whose expanded-MLA `run` is causal attention inside each
document, fused by SDPA. Without a cached prefix MLA runs its expanded form, so nothing reads the KV cache; the
latents the layers write land in a two-slot scratch cache. Parameters are float32 under bf16 autocast on CUDA,
with AdamW; the model is built with every kernel of its KernelChoice off, so the torch references run everywhere
(the Triton kernels have no backward). The MTP layer shares the embedding and the output head and learns the
next-next token (loss weight 0.3, DeepSeek-V3 §2.2), plus the main model's own next distribution (a distillation
term: the drafter is judged by agreeing with the model); its gradient reaches the main model through the hidden
states it reads. Routing is balanced without an auxiliary loss: after each step every gate's
e_score_correction_bias moves by 0.01 towards equal expert loads (DeepSeek-V3 §2.1.2, whose 0.001 suits a far
longer run).

Writes OUT/config.json, tokenizer.json, the weights (BF16, released names, no MTP copies of the embedding and the
head: `make_model` adds them), loss.csv and train.json. Imports torch, safetensors and tokenizers only.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import multiprocessing
import random
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from baleen.model import corpus
from baleen.model.attention import AttentionBackend, TorchAttentionBackend
from baleen.model.batch import ForwardBatch
from baleen.model.config import ModelConfig
from baleen.model.deepseek import DeepseekMTP, DeepseekV3ForCausalLM
from baleen.model.kernel_choice import KernelChoice
from baleen.model.kv_cache import KVCache
from baleen.model.layers import materialize
from baleen.model.moe import MoEExperts, MoEGate
from baleen.model.presets import preset
from baleen.model.tokenizer_build import build_tokenizer

FAMILIES = ("capitals", "reasoning", "arithmetic", "tools", "chat", "text")
PAD_ID = 2
TOKENIZER_VOCAB = 4000
MTP_WEIGHT = 0.3
ROUTER_LR_SCALE = 0.1
BIAS_UPDATE = 1e-2  # V3 used 1e-3 over ~10^5 steps; a few thousand steps need a faster rule


@dataclass(frozen=True)
class TrainConfig:
    """What one run does; `steps=None` sizes the run to `time_budget_s` from the first steps' speed."""

    seed: int = 0
    steps: int | None = None
    time_budget_s: float = 420.0
    rows: int = 64
    row_len: int = 1024
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    workers: int = 6
    mixture: str = "pretrain"  # corpus.MIXTURES: "finetune" is stage 2, from `init`'s weights
    init: str | None = None  # a folder with trained-weights-*.safetensors and trained-tokenizer.json
    mtp_only: bool = False  # train the MTP layer alone: the main model (its embedding and head too) stays as loaded
    self_distill: int = 0  # with mtp_only: this many greedy continuations of the model's own, half the documents
    mtp_target: str = "data"  # "argmax": the MTP layer learns the main model's top-1 only (see `losses`)


# ---- tokenizer and batches ---------------------------------------------------------------------------------
def train_tokenizer(seed: int = 0, num_docs: int = 30000) -> Tokenizer:
    """BPE over a sample of the corpus (special tokens taken out) and the plays; one token per digit."""
    specials = [t for t in vars(corpus).values() if isinstance(t, str) and t.startswith("<｜") and t.endswith("｜>")]
    texts = []
    for doc in corpus.documents(seed + 7919, num_docs):
        text = doc.text
        for s in specials:
            text = text.replace(s, "\n")
        texts.append(text)
    texts.append(corpus.shakespeare())
    return build_tokenizer(TOKENIZER_VOCAB, texts=texts, single_digits=True)


@dataclass
class Batch:
    """One step's rows, flattened: [N = rows * row_len] each, and the documents' lengths in order."""

    input_ids: torch.Tensor  # token t
    next_ids: torch.Tensor  # token t + 1 of the same document (the MTP layer's input), pad at the end
    positions: torch.Tensor
    target1: torch.Tensor  # token t + 1, weight1 1 where it is trained
    weight1: torch.Tensor
    target2: torch.Tensor  # token t + 2, weight2 likewise
    weight2: torch.Tensor
    has_next: torch.Tensor  # bool: token t + 1 is in the same document (the MTP's distillation positions)
    family: torch.Tensor  # family index of each token's document
    real: torch.Tensor  # bool, False on the padding at the end of rows
    seg_lens: list[int]


class BatchMaker:
    """Step -> Batch, a pure function of (seed, step): the same batches in any worker, in any order."""

    def __init__(self, tokenizer_json: str, seed: int, rows: int, row_len: int, mixture: str = "pretrain",
                 extra: list[list[int]] | None = None, extra_share: float = 0.0) -> None:  # fmt: skip
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.seed, self.rows, self.row_len, self.mixture = seed, rows, row_len, mixture
        self.extra, self.extra_share = extra or [], extra_share  # token-id documents (free text), drawn this often

    def tokenize(self, doc: corpus.Doc) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        trained: list[bool] = []
        for enc, (_, flag) in zip(self.tok.encode_batch([t for t, _ in doc.pieces], add_special_tokens=False),
                                  doc.pieces):
            ids += enc.ids
            trained += [flag] * len(enc.ids)
        return ids[: self.row_len], trained[: self.row_len]

    def __call__(self, step: int) -> Batch:
        L = self.row_len
        docs = corpus.documents(self.seed * 1_000_003 + step, 1 << 30, self.mixture)
        rng = random.Random(self.seed * 1_000_003 + step + 1)
        cols: dict[str, list[int]] = {k: [] for k in ("ids", "nxt", "pos", "t1", "w1", "t2", "w2", "nx", "fam", "real")}
        seg_lens: list[int] = []
        waiting: list[tuple[str, list[int], list[bool]]] = []  # documents (family, ids) that did not fit a row's end
        for _ in range(self.rows):
            used, misses = 0, 0
            while misses < 8:  # a row's tail is filled with the next documents that fit, else padded
                if waiting and used + len(waiting[0][1]) <= L:
                    family, ids, flags = waiting.pop(0)
                else:
                    if self.extra and rng.random() < self.extra_share:
                        family, ids = "text", self.extra[rng.randrange(len(self.extra))][:L]
                        flags = [True] * len(ids)
                    else:
                        doc = next(docs)
                        family, (ids, flags) = doc.family, self.tokenize(doc)
                    if len(ids) == L and family != "text":
                        continue  # a conversation longer than a row: its answer would be cut off
                    if used + len(ids) > L:
                        waiting.append((family, ids, flags))
                        misses += 1
                        continue
                n = len(ids)
                fam = FAMILIES.index(family)
                cols["ids"] += ids
                cols["nxt"] += [*ids[1:], PAD_ID]
                cols["pos"] += range(n)
                cols["t1"] += [*ids[1:], PAD_ID]
                cols["w1"] += [*flags[1:], False]
                cols["t2"] += [*ids[2:], PAD_ID, PAD_ID][:n]
                cols["w2"] += [*flags[2:], False, False][:n]
                cols["nx"] += [1] * (n - 1) + [0]
                cols["fam"] += [fam] * n
                cols["real"] += [1] * n
                seg_lens.append(n)
                used += n
            if used < L:  # the row's tail: one padding segment
                pad = L - used
                for k, v in (("ids", PAD_ID), ("nxt", PAD_ID), ("t1", PAD_ID), ("w1", 0), ("t2", PAD_ID),
                             ("w2", 0), ("nx", 0), ("fam", 0), ("real", 0)):
                    cols[k] += [v] * pad
                cols["pos"] += range(pad)
                seg_lens.append(pad)

        def t(k: str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(cols[k], dtype=dtype)

        return Batch(t("ids"), t("nxt"), t("pos"), t("t1"), t("w1", torch.float32), t("t2"), t("w2", torch.float32),
                     t("nx", torch.bool), t("fam"), t("real", torch.bool), seg_lens)


def batches(maker: BatchMaker, start: int, workers: int) -> Generator[Batch, None, None]:
    """Batches for steps start, start + 1, ... made ahead by worker processes (made inline with workers=0)."""
    if workers == 0:
        step = start
        while True:
            yield maker(step)
            step += 1
    ctx = multiprocessing.get_context("spawn")  # NOTE: not fork: the tokenizer's threads (and CUDA) do not survive it
    with ctx.Pool(workers) as pool:
        pending = collections.deque(pool.apply_async(maker, (step,)) for step in range(start, start + 2 * workers))
        step = start + 2 * workers
        while True:  # at most 2 * workers batches made ahead
            yield pending.popleft().get()
            pending.append(pool.apply_async(maker, (step,)))
            step += 1


def forward_batch(batch: Batch, device: torch.device) -> tuple[ForwardBatch, ForwardBatch]:
    """The main model's ForwardBatch (every document a fresh sequence) and the MTP layer's (next ids)."""
    lens = batch.seg_lens
    n = sum(lens)
    qo = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    common = dict(
        positions=batch.positions.to(device), out_loc=torch.zeros(n, dtype=torch.int64, device=device),
        qo_indptr=qo, seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        prefix_lens=torch.zeros(len(lens), dtype=torch.int32, device=device),
        page_table=torch.zeros((len(lens), 1), dtype=torch.int32, device=device),
        logits_indices=torch.zeros(0, dtype=torch.int64, device=device),
        seq_lens_cpu=list(lens), extend_lens_cpu=list(lens), page_size=1,
    )
    main = ForwardBatch(input_ids=batch.input_ids.to(device), **common)  # type: ignore[arg-type]
    mtp = ForwardBatch(input_ids=batch.next_ids.to(device), **common)  # type: ignore[arg-type]
    return main, mtp


# ---- attention over packed rows ----------------------------------------------------------------------------
class PackedAttentionBackend(AttentionBackend):
    """Causal attention within each document of rows of `row_len` tokens (a batch's sequences fill whole rows)."""

    def __init__(self, row_len: int) -> None:
        self.row_len = row_len
        self._mask: torch.Tensor | None = None  # [rows, 1, L, L] bool, True where a query sees a key

    def plan(self, batch: ForwardBatch) -> None:
        L = self.row_len
        if batch.num_tokens % L:
            raise ValueError(f"{batch.num_tokens} tokens do not fill rows of {L}")
        device = batch.input_ids.device
        lens = torch.tensor(batch.extend_lens_cpu, device=device)
        seg = torch.repeat_interleave(torch.arange(len(lens), device=device), lens).view(-1, L)  # [R, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        self._mask = ((seg[:, :, None] == seg[:, None, :]) & causal).unsqueeze(1)

    def run_expanded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        assert self._mask is not None, "plan(batch) first"
        L, (T, H, _) = self.row_len, q.shape

        def rows(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [R, H, L, D]
            return x.reshape(T // L, L, H, x.shape[-1]).transpose(1, 2)

        o = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=self._mask, scale=scale)
        return o.transpose(1, 2).reshape(T, H, v.shape[-1])

    def run_absorbed(self, q_latent: torch.Tensor, q_pe: torch.Tensor, kv_cache_layer: torch.Tensor,
                     scale: float, kv_scale: float = 1.0) -> torch.Tensor:
        raise ValueError("training runs the expanded form only (no cached prefix)")


# ---- the model ---------------------------------------------------------------------------------------------
def build_model(config: ModelConfig, device: torch.device, mla_mode: str = "expanded") -> tuple[
        DeepseekV3ForCausalLM, DeepseekMTP]:  # fmt: skip
    """Float32 main model + MTP layer (sharing the embedding and the head), freshly initialised, trainable."""
    # The fused Triton kernels have no backward: the torch references everywhere, on CUDA too.
    kernels = KernelChoice(mla_prep=False, moe_route=False, fp8_weights=False, fp8_absorb=False, glue=False)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, dtype=torch.float32, mla_mode=mla_mode, kernels=kernels)
        mtp = DeepseekMTP(config, dtype=torch.float32, mla_mode=mla_mode, kernels=kernels)
    mtp.share_embedding(model.model.embed_tokens)
    mtp.shared_head.head = model.lm_head  # DeepSeek-V3's MTP modules share the output head too
    materialize(model, device)
    materialize(mtp, device)
    init_weights([model, mtp], config, seed=0)
    return model, mtp


def _params(modules: list[nn.Module]) -> dict[str, nn.Parameter]:
    seen: dict[int, str] = {}
    out: dict[str, nn.Parameter] = {}
    for prefix, m in zip(("", "mtp."), modules):
        for name, p in m.named_parameters():
            if id(p) not in seen:
                seen[id(p)] = prefix + name
                out[prefix + name] = p
    return out


@torch.no_grad()
def init_weights(modules: list[nn.Module], config: ModelConfig, seed: int) -> None:
    """Norms 1, router biases 0, weights N(0, 0.02); outputs into the residual stream scaled by 1/sqrt(2 layers)."""
    gen = torch.Generator().manual_seed(seed)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    for name, p in _params(modules).items():
        if name.endswith("e_score_correction_bias"):
            p.zero_()
            p.requires_grad_(False)  # moved by the load-balancing rule, not by gradients
            continue
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        p.requires_grad_(True)


class ExpertLoads:
    """Counts each gate's routed tokens during a step (forward hooks), then nudges its bias towards balance."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.gates = [m for root in modules for m in root.modules() if isinstance(m, MoEGate)]
        self.counts: dict[int, torch.Tensor] = {}
        self.real: torch.Tensor | None = None  # [N] bool: the step's tokens that count (not row padding)
        for g in self.gates:
            g.register_forward_hook(self._hook)

    def _hook(self, gate: nn.Module, inputs: object, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        assert isinstance(gate, MoEGate) and gate.e_score_correction_bias is not None
        n = gate.e_score_correction_bias.shape[0]
        ids = output[1] if self.real is None else output[1][self.real]
        c = torch.bincount(ids.flatten().long(), minlength=n)[:n]
        prev = self.counts.get(id(gate))
        self.counts[id(gate)] = c if prev is None else torch.add(prev, c)

    @torch.no_grad()
    def update(self, rate: float) -> float:
        """Apply the bias rule; returns the worst max/mean load ratio seen this step."""
        worst = 0.0
        for g in self.gates:
            load = self.counts.pop(id(g)).float()
            assert g.e_score_correction_bias is not None
            g.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))
            worst = max(worst, float(load.max() / load.mean().clamp(min=1)))
        return worst


@dataclass
class StepLosses:
    main: torch.Tensor  # next-token cross-entropy over the trained tokens
    mtp: torch.Tensor  # the MTP layer's: next-next-token cross-entropy + distillation from the main model
    per_token: torch.Tensor  # [N] main loss where weight1 > 0, else 0 (detached)
    mtp_agree: torch.Tensor  # share of positions where the MTP's top-1 is the main model's next top-1 (detached)


def losses(model: DeepseekV3ForCausalLM, mtp: DeepseekMTP, batch: Batch, attn: PackedAttentionBackend,
           device: torch.device, frozen_main: bool = False, mtp_target: str = "data") -> StepLosses:
    """The step's losses. The MTP layer learns the data's next-next token (DeepSeek-V3 §2.2) and, at every position
    whose next token is in the document, the main model's own distribution one token later (KL to it, the teacher
    detached): as a drafter it is judged by how often its top-1 is the main model's next top-1, on the model's own
    outputs as much as on the data's. `frozen_main`: the main model runs without gradients (an MTP-only stage).
    `mtp_target` "argmax": the MTP layer learns only the main model's top-1 one token later (cross-entropy on it), at
    every position whose next token is in the document: the drafter's own metric, not the text's distribution."""
    main_batch, mtp_batch = forward_batch(batch, device)
    cfg = model.config
    kv = KVCache.for_model(cfg, num_pages=2, page_size=1, dtype=torch.bfloat16, device=device, with_mtp=True)
    attn.plan(main_batch)  # the MTP batch has the same documents: one plan serves both
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_main):
        hidden = model(main_batch, kv, attn)  # [N, H]
    w1, w2 = batch.weight1.to(device), batch.weight2.to(device)
    rows1 = w1.nonzero().squeeze(1)
    ce1 = F.cross_entropy(model.compute_logits(hidden[rows1]), batch.target1.to(device)[rows1], reduction="none")
    h2 = mtp(mtp_batch, hidden, kv, attn)
    rows3 = batch.has_next.to(device).nonzero().squeeze(1)
    with torch.no_grad():
        teacher = F.log_softmax(model.compute_logits(hidden[rows3 + 1]).float(), dim=-1)
    student = F.log_softmax(mtp.compute_logits(h2[rows3]).float(), dim=-1)
    agree = (student.detach().argmax(-1) == teacher.argmax(-1)).float().mean()
    per_token = torch.zeros_like(w1).index_put_((rows1,), ce1.detach().float())
    if mtp_target == "argmax":
        return StepLosses(ce1.mean(), F.nll_loss(student, teacher.argmax(-1)), per_token, agree)
    if mtp_target != "data":
        raise ValueError(f"mtp_target {mtp_target!r}: 'data' or 'argmax'")
    rows2 = w2.nonzero().squeeze(1)
    ce2 = F.cross_entropy(mtp.compute_logits(h2[rows2]), batch.target2.to(device)[rows2])
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return StepLosses(ce1.mean(), ce2 + kl, per_token, agree)


@torch.no_grad()
def greedy_continuations(model: DeepseekV3ForCausalLM, prompts: list[list[int]], new_tokens: int,
                         device: torch.device, page: int = 16) -> list[list[int]]:  # fmt: skip
    """Each prompt and its greedy continuation of `new_tokens` tokens (a model built with mla_mode "auto": the
    prompt prefilled, then one decode step a token over the paged cache; torch attention)."""
    n = len(prompts)
    per = -(-(max(len(p) for p in prompts) + new_tokens) // page)
    tables = [[1 + i * per + j for j in range(per)] for i in range(n)]
    kv = KVCache.for_model(model.config, 1 + n * per, page, torch.float32, device)
    attn = TorchAttentionBackend()
    seqs = [list(p) for p in prompts]
    ids, prefix, extend = [t for p in prompts for t in p], [0] * n, [len(p) for p in prompts]
    for _ in range(new_tokens):
        batch = ForwardBatch.build(ids, prefix, extend, tables, page, device=device)
        attn.plan(batch)
        nxt = model.compute_logits(model(batch, kv, attn)[batch.logits_indices]).argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.append(int(t))
        ids, prefix, extend = [s[-1] for s in seqs], [len(s) - 1 for s in seqs], [1] * n
    return seqs


def self_distill_docs(config: ModelConfig, init: Path, tok: Tokenizer, count: int, seed: int,
                      device: torch.device) -> list[list[int]]:  # fmt: skip
    """`count` documents of the model's own text: bos + a training passage's first 48 tokens + its greedy 48 more
    (what the MTP layer drafts in serving is the model's output, not the plays')."""
    model, mtp = build_model(config, device, mla_mode="auto")
    load_trained(model, mtp, config, init)
    model.post_load()  # the absorbed form's matrices, for decoding over the cache
    rng = random.Random(seed + 17)
    text = corpus.shakespeare()
    bos = tok.token_to_id(corpus.BOS)
    assert bos is not None, "the tokenizer has no bos token"
    prompts = [[bos, *tok.encode(corpus.text_doc(rng, text, 400, 600).pieces[1][0], add_special_tokens=False).ids[:48]]
               for _ in range(count)]  # fmt: skip
    out: list[list[int]] = []
    batch = 1024 if device.type == "cuda" else 256  # on the GPU a decode step's cost is its launches: big batches
    for i in range(0, count, batch):
        out += greedy_continuations(model, prompts[i : i + batch], 48, device)
    return out


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train(out: Path, tcfg: TrainConfig, config: ModelConfig, device: torch.device) -> dict[str, object]:
    """The whole run; returns its summary (also in OUT/train.json)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if tcfg.init is None:
        tok = train_tokenizer(tcfg.seed)
    else:  # stage 2 keeps stage 1's tokenizer
        tok = Tokenizer.from_file(str(Path(tcfg.init) / "trained-tokenizer.json"))
    tok.save(str(out / "trained-tokenizer.json"))
    extra: list[list[int]] = []
    if tcfg.self_distill:
        if not tcfg.mtp_only or tcfg.init is None:
            raise ValueError("--self-distill needs --mtp-only and --init (the frozen model writes the documents)")
        extra = self_distill_docs(config, Path(tcfg.init), tok, tcfg.self_distill, tcfg.seed, device)
        print(f"{len(extra)} self-generated documents in {time.monotonic() - t0:.1f}s", flush=True)
    maker = BatchMaker(tok.to_str(), tcfg.seed, tcfg.rows, tcfg.row_len, tcfg.mixture, extra, 0.5 if extra else 0.0)
    stream = batches(maker, 0, tcfg.workers)
    torch.manual_seed(tcfg.seed)
    model, mtp = build_model(config, device)
    if tcfg.init is not None:
        load_trained(model, mtp, config, Path(tcfg.init))
    if tcfg.mtp_only:
        if tcfg.init is None:
            raise ValueError("--mtp-only trains the MTP layer of --init's model: give --init")
        model.requires_grad_(False)  # the embedding and the head the MTP layer shares too
    params = _params([model, mtp])
    trainable = [p for p in params.values() if p.requires_grad]
    # Router weights learn 10x slower: Adam's full-size steps would otherwise swing every token to the same
    # experts faster than the bias rule can pull them back.
    router = [p for n, p in params.items() if p.requires_grad and n.endswith("mlp.gate.weight")]
    decay = [p for p in trainable if p.dim() >= 2 and not any(p is r for r in router)]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": router, "weight_decay": 0.0, "lr_scale": ROUTER_LR_SCALE}]
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    loads = ExpertLoads([mtp] if tcfg.mtp_only else [model, mtp])
    attn = PackedAttentionBackend(tcfg.row_len)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    total = tcfg.steps or 10**9
    log_rows: list[dict[str, float]] = []
    fam_sum = torch.zeros(len(FAMILIES), device=device)
    fam_cnt = torch.zeros(len(FAMILIES), device=device)
    run_sum = torch.zeros(3, device=device)  # main loss, MTP loss and MTP agreement summed since the last log line
    run_n = 0
    t_train = t_mark = time.monotonic()
    step = 0
    print(f"setup {t_train - t0:.1f}s; {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters", flush=True)
    for step, batch in enumerate(stream):
        if step >= total or (tcfg.steps is None and time.monotonic() - t0 > tcfg.time_budget_s):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, tcfg) * group["lr_scale"]
        loads.real = batch.real.to(device)
        with autocast:
            step_losses = losses(model, mtp, batch, attn, device, frozen_main=tcfg.mtp_only,
                                 mtp_target=tcfg.mtp_target)
            loss = step_losses.main + MTP_WEIGHT * step_losses.mtp
        per_token = step_losses.per_token
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        opt.step()
        imbalance = loads.update(BIAS_UPDATE)
        run_sum += torch.stack([step_losses.main.detach(), step_losses.mtp.detach(), step_losses.mtp_agree]).float()
        run_n += 1
        fam = batch.family.to(device)
        fam_sum.index_add_(0, fam, per_token)
        fam_cnt.index_add_(0, fam, (per_token > 0).float())
        if tcfg.steps is None and step == 30:  # size the run to the budget from the speed of steps 10-30
            per_step = (time.monotonic() - t_mark) / 20
            total = max(step + 1, int((tcfg.time_budget_s - (time.monotonic() - t0)) / per_step) + step)
            print(f"{per_step * 1000:.0f} ms/step: {total} steps in the budget", flush=True)
        if step == 10:
            t_mark = time.monotonic()
        if step % tcfg.log_every == 0 or step == total - 1:
            mean = (run_sum / run_n).tolist()
            run_sum.zero_()
            run_n = 0
            row = {"step": step, "elapsed_s": round(time.monotonic() - t_train, 1), "loss": round(mean[0], 4),
                   "mtp_loss": round(mean[1], 4), "mtp_agree": round(mean[2], 4), "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                   "max_load": round(imbalance, 2)}
            fam_mean = (fam_sum / fam_cnt.clamp(min=1)).tolist()
            row.update({f"loss_{f}": round(v, 4) for f, v in zip(FAMILIES, fam_mean)})
            fam_sum.zero_()
            fam_cnt.zero_()
            log_rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    stream.close()
    train_s = time.monotonic() - t_train
    write_trained(out, model, mtp, config)
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(log_rows[0]))
        writer.writeheader()
        writer.writerows(log_rows)
    summary: dict[str, object] = {
        "steps": step, "train_s": round(train_s, 1), "total_s": round(time.monotonic() - t0, 1),
        "tokens_per_step": tcfg.rows * tcfg.row_len, "final_loss": log_rows[-1]["loss"],
        "final_mtp_loss": log_rows[-1]["mtp_loss"], "device": torch.cuda.get_device_name() if device.type == "cuda"
        else "cpu", "config": asdict(tcfg),
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---- writing the weights -------------------------------------------------------------------------------------
def trained_tensors(model: DeepseekV3ForCausalLM, mtp: DeepseekMTP, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every distinct tensor under its released checkpoint name (the MTP layer's embedding and head are the main
    model's, so they are not repeated), float32 on the CPU."""
    out: dict[str, torch.Tensor] = {}
    mtp_prefix = f"model.layers.{config.num_hidden_layers}."
    for root, rename in ((model, lambda n: n), (mtp, mtp.checkpoint_name)):
        modules = dict(root.named_modules())
        for name, p in root.named_parameters():
            owner, _, pname = name.rpartition(".")
            if root is mtp and name.startswith(("embed_tokens.", "shared_head.head.")):
                continue
            t = p.detach().float().cpu()
            if isinstance(modules[owner], MoEExperts):
                inter = modules[owner].intermediate_size  # type: ignore[union-attr]
                for j in range(t.shape[0]):
                    base = rename(f"{owner}.{j}")
                    if pname == "w13":
                        out[f"{base}.gate_proj.weight"] = t[j, :inter].contiguous()
                        out[f"{base}.up_proj.weight"] = t[j, inter:].contiguous()
                    else:
                        out[f"{base}.down_proj.weight"] = t[j].contiguous()
                continue
            out[rename(name)] = t
    assert all(not k.startswith(mtp_prefix + "embed_tokens") for k in out)
    return out


@torch.no_grad()
def load_trained(model: DeepseekV3ForCausalLM, mtp: DeepseekMTP, config: ModelConfig, folder: Path) -> None:
    """Start from trained weights (`trained-weights-*.safetensors` in folder), router biases included."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("trained-weights-*.safetensors")):
        tensors.update(load_file(f))
    prefix = f"model.layers.{config.num_hidden_layers}."
    main = [(k, v.float()) for k, v in tensors.items() if not k.startswith(prefix)]
    own = [(k, v.float()) for k, v in tensors.items() if k.startswith(prefix)]
    filled = model.load_weights(main)
    filled |= {f"mtp.{n}" for n in mtp.load_weights(own)}
    if len(filled) < len(tensors) // 2:
        raise ValueError(f"{folder} does not hold this model's weights")


def write_trained(out: Path, model: DeepseekV3ForCausalLM, mtp: DeepseekMTP, config: ModelConfig) -> None:
    """config.json + the weights in BF16 (router biases float32), two shards (each under 16 MiB)."""
    from baleen.model.make_model import save_trained_weights

    save_trained_weights(out, trained_tensors(model, mtp, config), config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=None, help="fixed step count (default: fill --time-budget)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds for setup + training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--row-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--override", default="{}", help="JSON config.json fields to change (small CPU trials)")
    p.add_argument("--mixture", default="pretrain", choices=sorted(corpus.MIXTURES))
    p.add_argument("--init", default=None, help="start from the trained-* weights and tokenizer in this folder")
    p.add_argument("--mtp-only", action="store_true", help="train the MTP layer of --init's model alone")
    p.add_argument("--self-distill", type=int, default=0, help="with --mtp-only: greedy continuations to train on")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 100, or steps / 10)")
    p.add_argument("--mtp-target", default="data", choices=("data", "argmax"),
                   help="the MTP layer's target: the data's next-next token + KL to the main model, or its top-1")
    a = p.parse_args(argv)
    raw = preset("trained")
    raw.update(json.loads(a.override))
    config = ModelConfig.from_dict(raw)
    tcfg = TrainConfig(seed=a.seed, steps=a.steps, time_budget_s=a.time_budget, rows=a.rows, row_len=a.row_len,
                       lr=a.lr, workers=a.workers, mixture=a.mixture, init=a.init, mtp_only=a.mtp_only, self_distill=a.self_distill,
                       mtp_target=a.mtp_target,
                       warmup_steps=a.warmup if a.warmup is not None else min(100, (a.steps or 1000) // 10))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "config.json").write_text(json.dumps(dict(sorted(raw.items())), indent=2) + "\n")
    random.seed(a.seed)
    print(json.dumps(train(a.out, tcfg, config, torch.device(a.device)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
