"""Benchmark: EAP-IG attribution, batched, against one sample a pass and against bare passes.

Three figures, all measured in the same run so their ratios are comparable:

1. **End to end** over ``--n-samples`` samples in batches of ``--batch-size`` (the library calls
   only: encoding, attribution, greedy selection, faithfulness; model loading is timed apart).
2. **Batched versus one sample at a time**: the per-sample time of the batched attribution of (1)
   against attribution with batch size 1 (the reference EAP-IG code's protocol) on the first
   ``--single-samples`` samples.
3. **Attribution versus bare passes** of the same count and batch size: for every batch of (1),
   as many forward + backward passes as attribution runs (one per integration step for
   ``eap-ig-activations``, the step at alpha = 1 also being its clean run), plus the one no-grad
   forward the corrupt baseline's corrupted run costs, of the plain Hugging Face model: backbone
   forward, the LM head at the answer-predicting positions (attribution reads the logits only
   there too), mean answer NLL, backward to the *input embeddings* (no parameter gradients:
   attribution computes none either). Peak memory of both:
   on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the call; on the
   CPU the peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``
   after ``malloc_trim`` hands freed memory back) above the resident size before the call, or
   where that reset is not allowed, the resident size sampled every 2 ms.

Models: ``--model`` (default ``smollm2``, the bundled SmolLM2-135M-Instruct; a local HF folder or
a .gguf file) or ``--config NAME`` for a random-weight model of a known shape (``llama-3.2-1b``,
``smollm2-135m``) with the bundled SmolLM2 tokenizer, for GPU machines. ``--device``/``--dtype``
default to CUDA + bf16 when present, else CPU + fp32.

Usage: python bench/attribution.py [--n-samples 32] [--batch-size 16] [--steps 5]
       [--single-samples 8] [--model smollm2 | --config llama-3.2-1b] [--device cuda]
       [--dtype bfloat16] [--threads N] [--method eap-ig-activations] [--ablation corrupt] [--draws 4]
       python bench/attribution.py --n-samples 100      # the 100-sample end-to-end figure
Prints seconds, peak memory and ratios; never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager

import torch

from cud.circuits.settings import CircuitSettings

#: Random-weight model shapes for --config (Hugging Face LlamaConfig arguments).
CONFIGS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
}


# Timing and memory -------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Meter:
    """Wall time and peak memory of a block, on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.hwm = False
        if not self.cuda:
            try:  # peak RSS that can be reset: exact, no sampling thread
                import ctypes
                self.libc = ctypes.CDLL("libc.so.6")
                self._reset_hwm()
                _proc_status_bytes("VmHWM")
                self.hwm = True
            except (OSError, KeyError, AttributeError):
                import psutil
                self.process = psutil.Process(os.getpid())

    def _reset_hwm(self) -> None:
        self.libc.malloc_trim(0)  # cached free memory back to the system, out of the RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self, into: dict, memory: bool | None = None):
        """Adds ``seconds`` and, with ``memory`` (default: on CUDA, where it is free),
        ``peak_bytes`` (the max over calls) to ``into``. On the CPU the peak needs malloc_trim,
        which hands the freed memory cud keeps (``cud.runtime.memory``) back to the system
        and so slows the block down: timed blocks and memory blocks are run apart."""
        memory = self.cuda if memory is None else memory
        self.sync()
        if not memory:
            pass
        elif self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        elif self.hwm:
            self._reset_hwm()
            before = _proc_status_bytes("VmRSS")
        else:
            before = self.process.memory_info().rss
            peak = [before]
            stop = threading.Event()

            def sample():
                while not stop.wait(0.002):
                    peak[0] = max(peak[0], self.process.memory_info().rss)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            into["seconds"] = into.get("seconds", 0.0) + time.perf_counter() - start
            if not memory:
                return
            if self.cuda:
                used = torch.cuda.max_memory_allocated(self.device) - before
            elif self.hwm:
                used = _proc_status_bytes("VmHWM") - before
            else:
                stop.set()
                sampler.join()
                used = max(peak[0], self.process.memory_info().rss) - before
            into["peak_bytes"] = max(into.get("peak_bytes", 0), used)


def load_bench_model(args):
    from cud.models import load_model, prepare
    from cud.models.loading import pick_device, pick_dtype
    if args.config is None:
        return load_model(args.model, device=args.device, dtype=args.dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from cud.models.loading import resolve
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    try:
        where, gguf = resolve("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(str(where), gguf_file=gguf,
                                                  local_files_only=True)
    except Exception:  # no bundled model: the byte-level tiny tokenizer (longer sequences)
        from cud.models import tiny_tokenizer
        tokenizer = tiny_tokenizer()
    config = LlamaConfig(**CONFIGS[args.config])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype, on the target device
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    return prepare(model.eval(), tokenizer, name=f"random {args.config}")


# The three measurements ----------------------------------------------------------------------
def end_to_end(lm, runner, bs, baseline, settings, selection, meter, memory=None):
    from cud.circuits.attribution import attribute
    from cud.circuits.faithfulness import faithfulness
    from cud.circuits.selection import select
    stats = {"attribute": {}, "select": {}, "faithfulness": {}}
    faith = []
    for batch in bs:
        with meter.measure(stats["attribute"], memory):
            z_base = baseline.for_batch(runner, batch, token_input=settings.reference)
            att = attribute(runner, batch, baseline, settings, z_base=z_base)
        with meter.measure(stats["select"], memory):
            circuits = select(runner.graph, att.edge_scores, selection)
        with meter.measure(stats["faithfulness"], memory):
            f = faithfulness(runner, batch, circuits, baseline, settings.metric,
                             clean_logprob=att.clean_logprob, z_base=z_base,
                             token_input=settings.reference)
        faith.append(f.faithfulness)
    return stats, torch.cat(faith)


def one_at_a_time(runner, bs1, baseline, settings, meter, memory=None):
    from cud.circuits.attribution import attribute
    stats = {}
    for batch in bs1:
        with meter.measure(stats, memory):
            attribute(runner, batch, baseline, settings)
    return stats


def bare_passes(lm, bs, steps, meter, memory=None, forwards=0):
    """Per batch: ``forwards`` no-grad forwards, then ``steps`` forward + backward passes to the
    input embeddings."""
    from cud.circuits.metrics import AnswerTargets
    model, device = lm.model, lm.device
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    stats = {}

    def loss_of(embeds, batch, targets):
        hidden = backbone(inputs_embeds=embeds, attention_mask=batch.attention_mask.long()
                          ).last_hidden_state
        return -targets.mean_logprob(head(hidden[targets.positions])).sum()

    for batch in bs:
        batch = batch.to(device)
        targets = AnswerTargets.from_batch(batch.input_ids, batch.answer_mask)
        with meter.measure(stats, memory):
            with torch.no_grad():
                for _ in range(forwards):
                    loss_of(embed(batch.input_ids), batch, targets)
            for _ in range(steps):
                embeds = embed(batch.input_ids).detach().requires_grad_()
                torch.autograd.grad(loss_of(embeds, batch, targets), embeds)
    return stats


# Report --------------------------------------------------------------------------------------
def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 20:,.0f} MiB"


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2",
                        help="bundled short name, local HF folder or .gguf (default smollm2)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="random-weight model of this shape instead of --model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: fp32 on "
                        "CPU, bf16 on GPU)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=CircuitSettings.steps,
                        help="integration steps of EAP-IG")
    parser.add_argument("--n-edges", type=int, default=CircuitSettings.n_edges,
                        help="greedy circuit size (default: cud circuits')")
    parser.add_argument("--method", default="eap-ig-activations",
                        help="attribution method (default eap-ig-activations)")
    parser.add_argument("--ablation", default="corrupt", choices=["corrupt", "zero"],
                        help="what a patched edge carries (default corrupt, as cud circuits)")
    parser.add_argument("--draws", type=int, default=CircuitSettings.draws,
                        help="corrupted prompts averaged per sample (default: cud circuits')")
    parser.add_argument("--convention", default="cud", choices=["cud", "reference"],
                        help="attribution convention (README)")
    parser.add_argument("--single-samples", type=int, default=8,
                        help="samples run one at a time for the batched-vs-single figure (0: skip)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-pass comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--give-back-memory", action="store_true",
                        help="leave glibc's malloc as it is (cud's CLI keeps freed memory: "
                        "cud.runtime.memory)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = False
    if not args.give_back_memory:
        from cud.runtime.memory import retain_freed_memory
        retained = retain_freed_memory()

    from cud.circuits.attribution import AttributionSettings, attribute
    from cud.circuits.ablation import make_ablation
    from cud.circuits.runner import ResidualRunner
    from cud.circuits.selection import SelectionSettings
    from cud.data import batches, encode_samples, load_qa

    t = time.perf_counter()
    lm = load_bench_model(args)
    load_s = time.perf_counter() - t
    meter = Meter(lm.device)
    n_params = sum(p.numel() for p in lm.model.parameters())
    runner = ResidualRunner(lm.adapter)
    g = runner.graph
    print(f"model {lm.name}: {n_params / 1e6:,.0f}M parameters, {lm.dtype}, {lm.device}, "
          f"loaded in {load_s:.1f} s; {g.n_layers} layers x {g.n_heads} heads, "
          f"{g.n_edges:,} edges")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start, freed memory "
          f"{'kept' if retained else 'given back'}")

    settings = AttributionSettings(method=args.method, steps=args.steps, metric="kl",
                                   convention=args.convention)
    selection = SelectionSettings(selection="greedy", n_edges=args.n_edges)
    baseline = make_ablation(args.ablation, tokenizer=lm.tokenizer, draws=args.draws)
    n_passes = settings.n_passes(g.n_layers)
    # the corrupted runs' recorded outputs
    forwards = args.draws if args.ablation == "corrupt" else 0

    t = time.perf_counter()
    samples = load_qa(f"builtin:{args.n_samples}")
    enc = encode_samples(lm.tokenizer, samples, max_length=lm.adapter.max_positions)
    bs = batches(enc, batch_size=args.batch_size, pad_token_id=lm.pad_token_id)
    encode_s = time.perf_counter() - t
    n_tokens = sum(len(e) for e in enc)
    print(f"data: {len(enc)} builtin samples, {n_tokens / len(enc):.1f} tokens on average, "
          f"{len(bs)} batches of up to {args.batch_size} (padded length "
          f"{min(b.input_ids.shape[1] for b in bs)}-{max(b.input_ids.shape[1] for b in bs)})")
    print(f"method {settings.method}, {settings.steps} steps, metric {settings.metric}, "
          f"{args.ablation} ablation ({args.draws} draws), greedy {args.n_edges} edges + faithfulness\n")

    # warm-up: first calls pay for lazy initialisation (kernels, allocator, thread pools)
    attribute(runner, bs[0], baseline, AttributionSettings(steps=1))

    e2e, faith = end_to_end(lm, runner, bs, baseline, settings, selection, meter)
    e2e_s = encode_s + sum(s["seconds"] for s in e2e.values())
    attr = e2e["attribute"]
    n = len(enc)

    single = None
    if args.single_samples > 0:
        bs1 = batches(enc[:args.single_samples], batch_size=1, pad_token_id=lm.pad_token_id)
        single = one_at_a_time(runner, bs1, baseline, settings, meter)
        n1 = len(bs1)
    bare = None if args.no_bare else bare_passes(lm, bs, n_passes, meter, forwards=forwards)
    bare1 = None
    if not args.no_bare and single is not None:
        bare1 = bare_passes(lm, bs1, n_passes, meter, forwards=forwards)
    load_end = os.getloadavg()[0]
    if not meter.cuda:  # peaks apart from the timed runs, on the first batch of each
        mem, _ = end_to_end(lm, runner, bs[:1], baseline, settings, selection, meter, True)
        for stage, st in mem.items():
            e2e[stage]["peak_bytes"] = st["peak_bytes"]
        if single is not None:
            single["peak_bytes"] = one_at_a_time(runner, bs1[:1], baseline, settings, meter,
                                                 True)["peak_bytes"]
        if bare is not None:
            bare["peak_bytes"] = bare_passes(lm, bs[:1], n_passes, meter, True,
                                             forwards=forwards)["peak_bytes"]
        if bare1 is not None:
            bare1["peak_bytes"] = bare_passes(lm, bs1[:1], n_passes, meter, True,
                                              forwards=forwards)["peak_bytes"]

    print(f"End to end, {n} samples (model loading {load_s:.1f} s, not included):")
    rows = [("encode + batch", f"{encode_s:.2f}", "", "")]
    for stage, st in e2e.items():
        rows.append((stage, f"{st['seconds']:.2f}", f"{st['seconds'] / n:.3f}",
                     mib(st["peak_bytes"])))
    rows.append(("total", f"{e2e_s:.2f}", f"{e2e_s / n:.3f}", ""))
    print_table(rows, ("stage", "seconds", "s/sample", "peak memory"))
    ok = faith[torch.isfinite(faith)]
    print(f"faithfulness of the {args.n_edges}-edge circuits: median {ok.median():.3f} "
          f"(n = {len(ok)}); 100-sample target: at most 240 s end to end\n")

    rows = [(f"batched, batch size {args.batch_size}", f"{attr['seconds']:.2f}", str(n),
             f"{attr['seconds'] / n:.3f}", f"{n / attr['seconds']:.2f}", "1.00",
             mib(attr["peak_bytes"]))]
    if single is not None:
        per1 = single["seconds"] / n1
        rows.append(("one sample a pass", f"{single['seconds']:.2f}", str(n1), f"{per1:.3f}",
                     f"{1 / per1:.2f}", f"{(attr['seconds'] / n) / per1:.2f}",
                     mib(single["peak_bytes"])))
    if bare is not None:
        rows.append((f"bare passes, batch size {args.batch_size}", f"{bare['seconds']:.2f}",
                     str(n), f"{bare['seconds'] / n:.3f}", f"{n / bare['seconds']:.2f}",
                     f"{bare['seconds'] / attr['seconds']:.2f}", mib(bare["peak_bytes"])))
    if bare1 is not None:
        per_b1 = bare1["seconds"] / n1
        rows.append(("bare passes, one sample a pass", f"{bare1['seconds']:.2f}", str(n1),
                     f"{per_b1:.3f}", f"{1 / per_b1:.2f}", f"{per_b1 / (attr['seconds'] / n):.2f}",
                     mib(bare1["peak_bytes"])))
    print(f"Attribution ({n_passes} forward/backward passes a batch, the last of them also the "
          f"clean run, + {forwards} forward for the baseline):")
    print_table(rows, ("run", "seconds", "samples", "s/sample", "samples/s", "time vs batched",
                       "peak memory"))
    print()
    if single is not None:
        print(f"batched throughput / one-at-a-time throughput: "
              f"{per1 / (attr['seconds'] / n):.2f}x   (target >= 2)")
    if bare1 is not None:
        print(f"the same ratio for the bare passes:            "
              f"{per_b1 / (bare['seconds'] / n):.2f}x   (what batching gives the model itself "
              f"on this device)")
    if bare is not None:
        print(f"attribution time / bare passes time:          "
              f"{attr['seconds'] / bare['seconds']:.2f}x   (target <= 1.5)")
        print(f"attribution peak memory / bare peak memory:   "
              f"{attr['peak_bytes'] / max(bare['peak_bytes'], 1):.2f}x")
    print(f"load average at the end: {load_end:.2f}")


if __name__ == "__main__":
    main()
